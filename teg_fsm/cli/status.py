"""``teg status``: is the gateway running, and what is it doing.

The answer comes from things a stopped gateway cannot fake: a lock that
``teg run`` holds on ``<data>/teg.run`` for as long as it lives (a crashed
process releases it, so there is no stale pid file to believe), systemd's view
of the unit where systemd runs, and the gateway's own files (checkpoints,
journal, controller queue, last launched version).

The report is a list of sections, each a function from ``StatusInputs`` to
lines; a new line (e.g. degraded modes) is one more function in ``SECTIONS``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import attrs

from teg_fsm.cli.journal_lines import format_time
from teg_fsm.config import Config

RUN_MARKER = "teg.run"
UNIT = "teg-fsm.service"


class AlreadyRunning(RuntimeError):
    """Another ``teg run`` holds this data directory."""


class RunMarker:
    """Held by ``teg run``: an exclusive lock on ``<data>/teg.run`` with the pid and start time inside."""

    def __init__(self, data_path: Path) -> None:
        self.path = data_path / RUN_MARKER
        self._file: IO[str] | None = None

    def acquire(self, now_ms: int) -> None:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise AlreadyRunning(f"another gateway uses {self.path.parent} ({holder or 'pid unknown'})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "started_ms": now_ms}))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock; the file stays for the next start
            self._file = None


def probe_running(data_path: Path) -> dict[str, int] | None:
    """The running gateway's ``{"pid", "started_ms"}``, or None when nothing holds the lock."""
    path = data_path / RUN_MARKER
    try:
        handle = path.open("r")
    except FileNotFoundError:
        return None  # PermissionError goes to the caller: "not running" would be a guess
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(handle.read() or "{}")
            except ValueError:
                return {}
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def systemd_unit_state(unit: str = UNIT) -> dict[str, str] | None:
    """``systemctl show`` properties of the unit, or None where systemd does not run."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return None
    props = "LoadState,ActiveState,SubState,MainPID,ActiveEnterTimestamp,NRestarts,Result"
    try:
        out = subprocess.run(
            ["systemctl", "show", unit, f"--property={props}"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@attrs.frozen
class StatusInputs:
    config: Config
    data_path: Path
    controller_data_path: Path
    now_ms: int


def _time(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _ago(now_ms: int, ts_ms: int) -> str:
    seconds = max(0, (now_ms - ts_ms) // 1000)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m {seconds}s" if hours else f"{minutes}m {seconds}s"
    return f"{text} ago ({_time(ts_ms)})"


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)


def daemon_lines(inputs: StatusInputs) -> Iterator[str]:
    yield _process_line(inputs)
    unit = systemd_unit_state()
    if unit is not None and unit.get("LoadState") == "loaded":
        yield (f"systemd:       {UNIT} {unit.get('ActiveState')} ({unit.get('SubState')}), "
               f"main pid {unit.get('MainPID')}, restarts {unit.get('NRestarts', '?')}, result {unit.get('Result')}")


def _process_line(inputs: StatusInputs) -> str:
    marker = inputs.data_path / RUN_MARKER
    try:
        running = probe_running(inputs.data_path)
    except OSError as exc:
        return f"gateway:       unknown (cannot read {marker}: {exc.strerror}; run as root)"
    if running is None:
        return f"gateway:       not running (no `teg run` holds {marker})"
    started = running.get("started_ms")
    uptime = f", started {_ago(inputs.now_ms, started)}" if started else ""
    return f"gateway:       running, pid {running.get('pid', '?')}{uptime}"


def condition_lines(inputs: StatusInputs) -> Iterator[str]:
    """Degraded modes the gateway declared, from the live status file the engine writes."""
    from teg_fsm.adapters.systemd import read_status

    live = read_status(inputs.data_path / "teg_status.json")
    if live is None:
        return
    conditions = live.get("conditions")
    conditions = conditions if isinstance(conditions, dict) else {}
    mode = "DEGRADED " + "; ".join(f"{k}: {v}" for k, v in sorted(conditions.items())) if conditions else "ok"
    yield f"conditions:    {mode}{' (stopped)' if live.get('stopped') else ''}"


def controller_lines(inputs: StatusInputs) -> Iterator[str]:
    version_file = inputs.data_path / "last_launched_controller_version.txt"
    try:
        version = version_file.read_text().strip() or "none"
    except OSError:
        version = "none launched yet"
    yield f"controller:    version {version}"
    queue = inputs.controller_data_path / "communication_queue.db"
    if not queue.exists():
        yield f"queue:         no controller queue at {queue}"
        return
    counts = []
    try:
        with closing(_read_only(queue)) as db:
            for table in ("messages", "pending_mqtt_messages"):
                try:
                    counts.append(f"{db.execute(f'SELECT count(*) FROM {table}').fetchone()[0]} {table}")
                except sqlite3.OperationalError:
                    counts.append(f"no {table} table")
    except sqlite3.Error as exc:
        counts.append(f"unreadable ({exc})")
    yield f"queue:         {', '.join(counts)}"


def contact_lines(inputs: StatusInputs) -> Iterator[str]:
    journal = inputs.data_path / "teg_journal.db"
    try:
        with closing(_read_only(journal)) as db:
            last = db.execute("SELECT max(ts_ms) FROM journal WHERE source = 'mqtt'").fetchone()[0]
            try:  # routine repeats (the same message again within a day) live with the traffic
                routine = db.execute("SELECT max(ts_ms) FROM journal_traffic WHERE source = 'mqtt'").fetchone()[0]
                last = max(x for x in (last, routine) if x is not None) if last or routine else None
            except sqlite3.OperationalError:
                pass  # a journal from before traffic had its own table
    except sqlite3.Error:
        last = None
    yield f"thingsboard:   last message {_ago(inputs.now_ms, last) if last else 'never (in the journal kept)'}"


def machine_lines(inputs: StatusInputs) -> Iterator[str]:
    journal = inputs.data_path / "teg_journal.db"
    if not journal.exists():
        yield f"machines:      no journal at {journal} (has the gateway run here?)"
        return
    try:
        with closing(_read_only(journal)) as db:
            rows = db.execute("SELECT machine, state, updated_ms FROM checkpoints ORDER BY machine").fetchall()
    except sqlite3.Error as exc:
        yield f"machines:      cannot read the checkpoints in {journal}: {exc}"
        return
    for machine, state, updated in rows:
        yield f"{machine:<14} {state:<22} since {format_time(updated)}"


Section = Callable[[StatusInputs], Iterator[str]]
SECTIONS: tuple[Section, ...] = (daemon_lines, condition_lines, controller_lines, contact_lines, machine_lines)


def report(inputs: StatusInputs, sections: tuple[Section, ...] = SECTIONS) -> Iterator[str]:
    for section in sections:
        yield from section(inputs)


def now_ms() -> int:
    return int(time.time() * 1000)
