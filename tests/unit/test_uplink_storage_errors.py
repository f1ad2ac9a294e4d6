"""A storage error is logged once per kind and minute: on a full disk the log cannot feed on itself."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from teg_fsm.adapters.uplink_io import StorageErrorLog


def test_repeated_storage_errors_are_logged_once_a_minute_and_the_recovery_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    errors = StorageErrorLog(monotonic=lambda: now[0])
    full = sqlite3.OperationalError("database or disk is full")
    with caplog.at_level(logging.WARNING, logger="teg_fsm.adapters.uplink_io"):
        for _ in range(10_000):
            errors.failed(full)
        now[0] = 61.0
        errors.failed(full)
        errors.failed(sqlite3.OperationalError("disk I/O error"))
        errors.succeeded()
        errors.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "uplink storage error: database or disk is full",
        "uplink storage error: database or disk is full (9999 more like it not logged)",
        "uplink storage error: disk I/O error",
        "uplink storage works again after 10002 failed jobs",
    ]
