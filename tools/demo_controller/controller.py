"""Demo controller: writes CO2 measurements and health checks into the queue.

The only contract with the gateway is the SQLite file (DESIGN.md): rows in
``messages`` and the ``health_check`` row id=1. ``CONTROLLER_BEHAVIOUR``
(baked in at build time) lets the demo ship a release that crashes at start.
"""

import json
import math
import os
import signal
import sqlite3
import sys
import time

DATA = "/root/data"
BEHAVIOUR = os.environ.get("CONTROLLER_BEHAVIOUR", "healthy")
VERSION = os.environ.get("CONTROLLER_VERSION", "dev")


def connect() -> sqlite3.Connection:
    db = sqlite3.connect(os.path.join(DATA, "communication_queue.db"), timeout=10, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
    db.execute("CREATE TABLE IF NOT EXISTS health_check (id INTEGER PRIMARY KEY, timestamp_ms INTEGER)")
    return db


def interval_s() -> float:
    try:
        with open(os.path.join(DATA, "config.json")) as f:
            return float(json.load(f).get("measurement_interval_s", 2))
    except (OSError, ValueError, AttributeError):
        return 2.0


def main() -> None:
    # As PID 1 in the container, SIGTERM is ignored unless handled: without this
    # `docker stop` would wait its whole timeout and then SIGKILL us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if BEHAVIOUR == "crash":
        print(f"controller {VERSION}: cannot open sensor /dev/ttyCO2 - exiting", flush=True)
        sys.exit(3)
    db = connect()
    put = "INSERT INTO messages (type, message) VALUES (?, ?)"
    db.execute(put, ("log", json.dumps({"ts": int(time.time() * 1000), "values": {"severity": "INFO", "message": f"controller {VERSION} started"}})))
    step = 0
    while True:
        now_ms = int(time.time() * 1000)
        co2 = round(420 + 40 * math.sin(step / 10), 1)
        db.execute(put, ("measurement", json.dumps({"ts": now_ms, "values": {"co2_ppm": co2, "controller_version": VERSION}})))
        db.execute("INSERT INTO health_check (id, timestamp_ms) VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms", (now_ms,))
        step += 1
        time.sleep(interval_s())


if __name__ == "__main__":
    main()
