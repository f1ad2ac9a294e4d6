"""Logs for journald: syslog priorities, one timestamp, and one line per operator-facing transition."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from teg_fsm.adapters.logs import TransitionLog, configure_logging, print_error, syslog_priority
from teg_fsm.engine.journal import Transition


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(("level", "priority"), [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7)])
def test_levels_map_to_syslog_priorities(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


def test_under_systemd_lines_carry_the_priority_and_no_timestamp(restore_root_logger: None) -> None:
    out = io.StringIO()
    configure_logging("INFO", env={"JOURNAL_STREAM": "8:12345"}, stream=out)
    log = logging.getLogger("teg.test")
    log.warning("disk nearly full")
    log.debug("not shown at INFO")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    lines = out.getvalue().splitlines()
    assert lines[0] == "<4>teg.test: disk nearly full"
    assert lines[1] == "<3>teg.test: it failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines[1:])  # the traceback too


def test_in_a_terminal_lines_carry_one_timestamp_and_the_level(restore_root_logger: None) -> None:
    out = io.StringIO()
    configure_logging("INFO", env={}, stream=out)
    logging.getLogger("teg.test").info("hello")
    date, time_, level, rest = out.getvalue().split(" ", 3)
    assert len(date) == 10 and ":" in time_ and level == "INFO" and rest == "teg.test: hello\n"


def test_secrets_never_reach_the_log(restore_root_logger: None) -> None:
    out = io.StringIO()
    configure_logging("INFO", env={"INVOCATION_ID": "x"}, stream=out)
    logging.getLogger("teg.test").info('provision reply {"credentialsValue": "s3cr3t-token"}')
    assert "s3cr3t-token" not in out.getvalue() and "***" in out.getvalue()


def test_configuration_errors_before_logging_go_out_at_error_priority() -> None:
    out = io.StringIO()
    print_error("teg: configuration error: TB_PORT=0", env={"JOURNAL_STREAM": "1:2"}, stream=out)
    print_error("plain", env={}, stream=out)
    assert out.getvalue() == "<3>teg: configuration error: TB_PORT=0\nplain\n"


class _Dispatched:
    def __init__(self, transitions: list[Transition]) -> None:
        self.transitions = transitions


def test_transition_log_tells_operator_facing_moves_and_skips_the_chatty_ones(caplog: pytest.LogCaptureFixture) -> None:
    observer = TransitionLog()
    with caplog.at_level(logging.INFO, logger="teg.transitions"):
        observer(_Dispatched([
            Transition("ota", "fetching", "checking_out", "fetch_succeeded"),
            Transition("uplink", "idle", "draining", "rows_waiting"),
            Transition("uplink", "draining", "degraded_disk_full", "write_failed"),
            Transition("connection", "online", "online", "ping"),
            Transition("controller", "running", "restarting", "restart_requested"),
        ]))
        observer(object())  # whatever the dispatcher hands over, an observer never raises into it
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "ota: fetching -> checking_out (on fetch_succeeded)",
        "uplink: draining -> degraded_disk_full (on write_failed)",
        "controller: running -> restarting (on restart_requested)",
    ]


def test_a_routine_check_that_comes_straight_back_is_not_told_but_one_that_finds_work_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    observer = TransitionLog()
    with caplog.at_level(logging.INFO, logger="teg.transitions"):
        observer(_Dispatched([Transition("file_sync", "in_sync", "scanning", "check_due")]))
        observer(_Dispatched([Transition("file_sync", "scanning", "in_sync", "scan_succeeded")]))
        observer(_Dispatched([Transition("file_sync", "in_sync", "scanning", "check_due")]))
        observer(_Dispatched([Transition("file_sync", "scanning", "writing", "scan_succeeded")]))
    assert [r.getMessage() for r in caplog.records] == [
        "file_sync: in_sync -> scanning (on check_due)",
        "file_sync: scanning -> writing (on scan_succeeded)",
    ]
