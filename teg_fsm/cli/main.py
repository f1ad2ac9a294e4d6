"""The ``teg`` command.

Exit codes: 0 fine, 1 the command's own "no" (divergence, stale diagrams,
migration blockers), 2 bad usage or missing files, 78 (EX_CONFIG) a
configuration the gateway cannot run with; the unit does not restart on 78.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from teg_fsm import __version__

EX_USAGE = 2


def _run(args: argparse.Namespace) -> int:
    from teg_fsm.cli.deferred_imports import defer

    defer()  # before the libraries that import them: ~2.6 MB of RSS a running gateway never uses
    from teg_fsm.adapters.logs import TransitionLog, configure_logging, print_error
    from teg_fsm.app import Gateway
    from teg_fsm.cli.status import AlreadyRunning, RunMarker, now_ms
    from teg_fsm.config import EX_CONFIG, read_config

    config, problems = read_config()
    for problem in problems:
        print_error(f"teg: configuration error: {problem}")
    if problems:
        print_error(f"teg: {len(problems)} configuration problem(s); not starting (exit {EX_CONFIG})")
        return EX_CONFIG
    configure_logging(config.log_level)
    log = logging.getLogger("teg")
    config.data_path.mkdir(parents=True, exist_ok=True)
    marker = RunMarker(config.data_path)
    try:
        marker.acquire(now_ms())
    except AlreadyRunning as exc:
        log.error("not starting: %s", exc)
        return EX_CONFIG
    log.info("teg-fsm %s starting: ThingsBoard %s:%s, data %s", __version__, config.tb_host, config.tb_port,
             config.data_path.resolve())
    gateway = Gateway(config)
    gateway.dispatcher.observers.append(TransitionLog())

    def _terminate(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        gateway.stopped.set()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        gateway.start()
        gateway.stopped.wait()
        gateway.stopped.clear()
        gateway.stop()
    finally:
        marker.release()
    log.info("stopped")
    return 0


def _env_source(args: argparse.Namespace) -> tuple[Mapping[str, str], str]:
    from teg_fsm.config import read_env_file

    if args.env_file is None:
        return os.environ, "the environment"
    try:
        return read_env_file(args.env_file), str(args.env_file)
    except OSError as exc:
        raise SystemExit(_usage_error(f"teg config: cannot read {args.env_file}: {exc.strerror}"))


def _config(args: argparse.Namespace) -> int:
    from teg_fsm.config import EX_CONFIG, effective_settings, read_config

    env, origin = _env_source(args)
    _config_obj, problems = read_config(env)
    if not args.check:
        for name, value, explicit in effective_settings(env):
            print(f"{name}={value}" + ("" if explicit else "    # default"))
    for problem in problems:
        print(f"configuration error: {problem}", file=sys.stderr)
    if problems:
        print(f"{origin}: {len(problems)} problem(s); `teg run` would exit {EX_CONFIG}", file=sys.stderr)
        return EX_CONFIG
    if args.check:
        print(f"{origin}: configuration OK")
    return 0


def _status(args: argparse.Namespace) -> int:
    import sqlite3

    from teg_fsm.cli import audit, status
    from teg_fsm.config import read_config, tool_environment

    where = tool_environment()
    config, _problems = read_config(where.values)  # report what is there even if `run` would refuse it
    data = args.data if args.data is not None else where.resolve(config.data_path)
    controller_set = where.values.get("TEG_CONTROLLER_DATA_PATH")
    controller = where.resolve(config.controller_data_path) if controller_set else data
    inputs = status.StatusInputs(config, data, controller, status.now_ms())
    for line in status.report(inputs):
        print(line)
    journal = data / "teg_journal.db"
    if not journal.exists():
        print(f"teg status: no journal at {journal} (has the gateway run here?)", file=sys.stderr)
        return EX_USAGE
    try:
        states = _checkpoint_states(journal)
    except sqlite3.Error as exc:
        print(f"teg status: cannot read the checkpoints in {journal}: {exc}", file=sys.stderr)
        return EX_USAGE
    if args.mermaid:
        audit._print_mermaid(states)
    return 0


def _checkpoint_states(journal: Path) -> dict[str, str]:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        return dict(db.execute("SELECT machine, state FROM checkpoints").fetchall())


def _migrate(args: argparse.Namespace) -> int:
    from teg_fsm.cli.migrate import inspect_host

    env, origin = _env_source(args) if args.env_file is not None else _default_env_file()
    if args.small_pages:
        from teg_fsm.config import tool_environment

        # Relative paths mean what they mean to the gateway: the service's WorkingDirectory.
        base = tool_environment().base if args.env_file is None else Path.cwd()
        return _small_pages(args, env, base)
    findings = inspect_host(ours=env, ours_origin=origin, old_env_file=args.old_env_file)
    for line in findings.lines():
        print(line)
    return 1 if findings.blockers else 0


def _small_pages(args: argparse.Namespace, env: Mapping[str, str], base: Path) -> int:
    from teg_fsm.cli.migrate import convert_data_dir, old_runner_blockers
    from teg_fsm.config import read_config

    config, _problems = read_config(env)
    data = args.data if args.data is not None else base / config.data_path
    controller = base / config.controller_data_path if env.get("TEG_CONTROLLER_DATA_PATH") else data
    lines, ok = convert_data_dir(data, controller_queue=controller / "communication_queue.db",
                                 blockers=old_runner_blockers())
    for line in lines:
        print(line)
    return 0 if ok else 1


def _default_env_file() -> tuple[Mapping[str, str], str]:
    from teg_fsm.config import tool_environment

    where = tool_environment()
    return where.values, where.origin


def _usage_error(message: str) -> int:
    print(message, file=sys.stderr)
    return EX_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teg", description="TEG-FSM: a state-machine edge gateway for ThingsBoard")
    parser.add_argument("--version", action="version", version=f"teg-fsm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway in the foreground (configured by environment variables)")
    run.set_defaults(func=_run)
    config = sub.add_parser("config", help="print the effective configuration (secrets masked), or --check it")
    config.add_argument("--check", action="store_true", help="only validate; exit 78 naming every problem")
    config.add_argument("--env-file", type=Path, default=None, help="read KEY=value lines from this file instead")
    config.set_defaults(func=_config)
    migrate = sub.add_parser("migrate", help="inspect a host running the existing gateway, or convert its files")
    what = migrate.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="only inspect and report (changes nothing)")
    what.add_argument("--small-pages", action="store_true",
                      help="rewrite the gateway's own files with 1 KiB pages (gateway stopped; docs/MIGRATION.md)")
    migrate.add_argument("--data", type=Path, default=None, help="the data directory (default: TEG_DATA_PATH)")
    migrate.add_argument("--env-file", type=Path, default=None, help="our env file (default /etc/teg-fsm/teg.env)")
    migrate.add_argument("--old-env-file", type=Path, default=None, help="the existing gateway's .env")
    migrate.set_defaults(func=_migrate)
    from teg_fsm.cli import audit

    audit.add_commands(sub)
    sub.choices["status"].set_defaults(func=_status)  # reports the daemon too (teg_fsm/cli/status.py)
    return parser


def _apply_defaults(args: argparse.Namespace) -> int | None:
    """Defaults that depend on the host: the data dir of the installed service, known machine names."""
    if getattr(args, "data", "absent") is None and args.command != "status":
        from teg_fsm.config import read_config, tool_environment

        where = tool_environment()
        args.data = where.resolve(read_config(where.values)[0].data_path)
    machine = getattr(args, "machine", None)
    if machine is not None and not _known_machine(machine, args.file or args.data / "teg_journal.db"):
        from teg_fsm.cli.diagrams import machine_classes

        known = ", ".join(sorted(cls.machine_name for cls in machine_classes()))
        return _usage_error(f"teg {args.command}: unknown machine {machine!r} (known: {known})")
    return None


def _known_machine(name: str, journal: Path) -> bool:
    """One of ours, or one the journal mentions (recorded journals may carry other machines)."""
    from teg_fsm.cli.diagrams import machine_classes
    from teg_fsm.engine.journal import read_entries

    if name in {cls.machine_name for cls in machine_classes()} or not journal.exists():
        return True  # a missing journal gets its own message
    return next(iter(read_entries(journal, machine=name)), None) is not None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        refused = _apply_defaults(args)
        if refused is not None:
            return refused
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`teg journal | head`): that is not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
