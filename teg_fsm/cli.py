"""The ``teg`` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence


def _run(args: argparse.Namespace) -> int:
    from teg_fsm.app import Gateway
    from teg_fsm.config import ConfigError, load_config
    from teg_fsm.logs import configure_logging

    try:
        config = load_config()
    except ConfigError as exc:
        print(f"teg: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    gateway = Gateway(config)

    def _terminate(signum: int, _frame: object) -> None:
        logging.getLogger("teg").info("signal %s: stopping", signal.Signals(signum).name)
        gateway.stopped.set()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    gateway.start()
    gateway.stopped.wait()
    gateway.stopped.clear()
    gateway.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teg", description="TEG-FSM: a state-machine edge gateway for ThingsBoard")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway in the foreground (configured by environment variables)")
    run.set_defaults(func=_run)
    from teg_fsm import audit

    audit.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
