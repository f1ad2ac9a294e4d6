"""Audit commands: ``teg diagrams``, ``teg replay``, ``teg journal``, ``teg audit``, ``teg status``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the audit subcommands on the ``teg`` parser."""
    diagrams = sub.add_parser("diagrams", help="generate diagrams/ from the machine classes")
    diagrams.add_argument("--out", type=Path, default=Path("diagrams"))
    diagrams.add_argument("--check", action="store_true",
                          help="exit non-zero naming every stale file and every picture over the A4 page budget")
    diagrams.set_defaults(func=_diagrams)

    replay = sub.add_parser("replay", help="re-run a recorded journal against the current machines")
    replay.add_argument("journal", type=Path, help="teg_journal.db or a .jsonl export")
    replay.add_argument("--since", help="ISO time or unix ms: replay from the last snapshot or start at or before it")
    replay.add_argument("--until", help="ISO time or unix ms: stop after the last event at or before it")
    replay.set_defaults(func=_replay)

    journal = sub.add_parser("journal", help="list the journal: time, event, transitions, effects")
    journal.add_argument("--data", type=Path, default=None, help="data dir (default $TEG_DATA_PATH or ./data)")
    journal.add_argument("--file", type=Path, default=None, help="a journal file (.db or .jsonl) instead of the data dir's")
    journal.add_argument("--machine", help="only events that concern this machine")
    journal.add_argument("--since", help="ISO time or unix ms")
    journal.add_argument("--until", help="ISO time or unix ms")
    journal.add_argument("--limit", type=int, default=0, help="only the last N lines")
    journal.add_argument("--jsonl", action="store_true", help="one JSON entry per line (the replay corpus format)")
    journal.add_argument("--brief", action="store_true",
                         help="one line per event, without the why (guards, effect outcomes, reasons)")
    journal.set_defaults(func=_journal)

    audit = sub.add_parser("audit", help="write one self-contained HTML page: per machine, states over time, "
                                         "the diagram with the transitions taken, and why each was taken")
    audit.add_argument("--data", type=Path, default=None, help="data dir (default $TEG_DATA_PATH or ./data)")
    audit.add_argument("--file", type=Path, default=None, help="a journal file (.db or .jsonl) instead of the data dir's")
    audit.add_argument("--machine", help="only this machine")
    audit.add_argument("--since", help="ISO time or unix ms (default: the journal's first event)")
    audit.add_argument("--until", help="ISO time or unix ms (default: its last event)")
    audit.add_argument("--html", type=Path, required=True, metavar="FILE", help="the page to write")
    audit.set_defaults(func=_audit)

    status = sub.add_parser("status", help="every machine's state (from the checkpoints)")
    status.add_argument("--data", type=Path, default=None)
    status.add_argument("--mermaid", action="store_true", help="print each diagram with the active state")
    # The command itself lives in teg_fsm.cli.main (it reports the daemon as well as the machines).


def _data_dir(arg: Path | None) -> Path:
    return arg if arg is not None else Path(os.environ.get("TEG_DATA_PATH") or "./data")


def _diagrams(args: argparse.Namespace) -> int:
    from teg_fsm.cli import diagrams

    if args.check:
        problems, sizes = diagrams.check_report(args.out)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(f"diagrams are out of date or over the page budget: run `{diagrams.COMMAND}` to regenerate "
                  "(see teg_fsm/cli/diagrams.py for the budget)", file=sys.stderr)
            return 1
        print(f"diagrams up to date ({len(diagrams.machine_classes())} machines)")
        print("\n".join(sizes))
        return 0
    written, sizes = diagrams.write_report(args.out)
    for path in written:
        print(f"wrote {path}")
    print("\n".join(sizes))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from teg_fsm.engine.replay import replay_journal

    if not args.journal.exists():
        print(f"teg replay: no such journal: {args.journal}", file=sys.stderr)
        return 2
    try:
        since, until = _parse_time(args.since), _parse_time(args.until)
    except ValueError as exc:
        print(f"teg replay: bad time: {exc}", file=sys.stderr)
        return 2
    try:
        result = replay_journal(args.journal, since_ms=since, until_ms=until)
    except Exception as exc:  # last resort: a finding to print, never a traceback
        print(f"teg replay: {args.journal} cannot be replayed: {exc!r}")
        return 1
    if result.divergence is not None:
        print(result.divergence.describe())
        return 1
    print(f"identical: {result.events} events")
    return 0


def _parse_time(value: str | None) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def _journal_window(args: argparse.Namespace, command: str) -> tuple[Path, int | None, int | None] | int:
    """The journal file and the --since/--until window, or the exit code after saying what is wrong."""
    path = args.file or _data_dir(args.data) / "teg_journal.db"
    if not path.exists():
        print(f"teg {command}: no journal at {path}", file=sys.stderr)
        return 2
    try:
        return path, _parse_time(args.since), _parse_time(args.until)
    except ValueError as exc:
        print(f"teg {command}: bad time: {exc}", file=sys.stderr)
        return 2


def _journal(args: argparse.Namespace) -> int:
    import sqlite3

    from teg_fsm.cli.journal_lines import journal_line
    from teg_fsm.engine.journal import entry_to_jsonl, read_entries

    window = _journal_window(args, "journal")
    if isinstance(window, int):
        return window
    path, since, until = window
    try:
        entries = list(read_entries(path, machine=args.machine, since_ms=since, until_ms=until,
                                    snapshots=args.machine is None))
        if args.jsonl or args.brief:
            render = entry_to_jsonl if args.jsonl else journal_line
            lines = [render(e) for e in entries]
        else:
            from teg_fsm.cli.journal_why import explained

            lines = explained(entries)
    except (sqlite3.Error, ValueError, TypeError, KeyError) as exc:
        print(f"teg journal: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    for line in lines[-args.limit :] if args.limit else lines:
        print(line)
    return 0


def _audit(args: argparse.Namespace) -> int:
    import sqlite3

    from teg_fsm.cli.audit_report import page

    window = _journal_window(args, "audit")
    if isinstance(window, int):
        return window
    path, since, until = window
    try:
        html = page(path, since_ms=since, until_ms=until, machine=args.machine)
    except sqlite3.Error as exc:
        print(f"teg audit: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    try:
        args.html.write_text(html, encoding="utf-8")
    except OSError as exc:
        print(f"teg audit: cannot write {args.html}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.html} ({len(html.encode()) // 1024} KiB)")
    return 0


def _print_mermaid(states: dict[str, str]) -> None:
    from statemachine.contrib.diagram import MermaidGraphMachine

    from teg_fsm.cli.diagrams import machine_classes

    for cls in machine_classes():
        state = states.get(cls.machine_name)
        try:
            machine = cls({}, start_value=state) if state else cls({})
        except Exception as exc:  # settings without defaults: show the plain diagram
            print(f"%% {cls.machine_name}: cannot highlight ({exc})")
            from statemachine.contrib.diagram import formatter

            print(formatter.render(cls, "mermaid"))
            continue
        print(f"%% {cls.machine_name}: {state or cls.initial_state.id}")
        print(MermaidGraphMachine(machine).get_mermaid())
    print(json.dumps(states))
