"""Shared parts of the uplink integration tests and benchmark: a controller-like
writer process, the gateway as a subprocess, and waiting with a deadline."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.rig import waiting
from tests.rig.protocol import protocol_env

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def create_queue(db: Path) -> None:
    """The controller's side of the contract: WAL, messages and health_check."""
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
    conn.execute("CREATE TABLE IF NOT EXISTS health_check (id INTEGER PRIMARY KEY, timestamp_ms INTEGER)")
    conn.commit()
    conn.close()


def record(i: int, ts0: int = 1_700_000_000_000) -> str:
    return json.dumps({"ts": ts0 + i, "values": {"seq": i, "co2": 400 + i % 100, "temp": 21.5}})


def fill(db: Path, n: int, start: int = 0, batch: int = 10_000) -> None:
    """Pre-fill the queue with rows ``start .. start+n-1`` (seq value = i)."""
    create_queue(db)
    conn = sqlite3.connect(db, timeout=30)
    for first in range(start, start + n, batch):
        rows = [("measurement", record(i)) for i in range(first, min(first + batch, start + n))]
        conn.executemany("INSERT INTO messages (type, message) VALUES (?, ?)", rows)
        conn.commit()
    conn.close()


def writer_process(db: Path, n: int, start: int = 0, per_commit: int = 200, pause_s: float = 0.005,
                   bad: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """A separate process that writes like a controller: small commits while the gateway runs."""
    args = [sys.executable, "-m", "tests.integration.uplink_rig", str(db), str(n), str(start), str(per_commit),
            str(pause_s), ",".join(map(str, bad))]
    return subprocess.Popen(args, cwd=REPO)


def _write_main(db: str, n: str, start: str, per_commit: str, pause_s: str, bad: str) -> None:
    path, count, first, step, pause = Path(db), int(n), int(start), int(per_commit), float(pause_s)
    bad_at = {int(b) for b in bad.split(",") if b}
    create_queue(path)
    conn = sqlite3.connect(path, timeout=30)
    for chunk in range(first, first + count, step):
        rows = []
        for i in range(chunk, min(chunk + step, first + count)):
            rows.append(("measurement", "{not json" if i in bad_at else record(i)))
            if i in bad_at:
                rows.append(("measurement", json.dumps({"values": {"x": 1}})))  # lacks ts
        conn.executemany("INSERT INTO messages (type, message) VALUES (?, ?)", rows)
        conn.execute("INSERT INTO health_check (id, timestamp_ms) VALUES (1, ?) "
                     "ON CONFLICT(id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms", (int(time.time() * 1000),))
        conn.commit()
        time.sleep(pause)
    conn.close()


def gateway_env(tb: Any, data: Path, token: str, **extra: str) -> dict[str, str]:
    token_file = data / "tb_access_token"
    data.mkdir(parents=True, exist_ok=True)
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "TEG_", "THINGSBOARD_"))}
    env.update({
        "TB_HOST": "127.0.0.1", "TB_PORT": str(tb.tls_port), "TEG_TLS": "1",
        "THINGSBOARD_CA_CERT": str(tb.cafile), "THINGSBOARD_ACCESS_TOKEN": str(token_file),
        "THINGSBOARD_DEVICE_NAME": "station-1", "TEG_DATA_PATH": str(data), "LOG_LEVEL": "INFO",
        "TEG_RECONNECT_MIN_S": "0.2", "TEG_RECONNECT_MAX_S": "1", "PYTHONPATH": str(REPO),
        **protocol_env(),
    })
    env.update(extra)
    return env


def start_gateway(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen([sys.executable, "-m", "teg_fsm.cli", "run"], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    return waiting.wait_for(predicate, timeout, what, interval)


def seqs(tb: Any, device: str = "station-1") -> list[int]:
    return [int(v) for _, v in tb.telemetry(device, "seq")]


if __name__ == "__main__":
    _write_main(*sys.argv[1:7])
