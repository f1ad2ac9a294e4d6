"""What this box can carry: the ceiling the uplink drain is measured against.

    python tools/bench_ceiling.py 100000 --broker mosquitto --broker standin

Two steps a drain cannot avoid, each timed on its own over the same rows as
``tools/bench_uplink.py`` drains (``tests.integration.uplink_rig.fill``):

- MQTT: packets pre-built from those rows (JSON arrays under the 64 KiB MQTT
  limit, as the gateway builds them) published with paho at QoS 1 over TLS on
  loopback, at most ``TEG_UPLINK_MAX_INFLIGHT``'s default (16) unacknowledged,
  from the first publish to the last PUBACK;
- SQLite: the minimal batch read/delete of the rows from the queue file
  (``SELECT id, message ... LIMIT 2000`` then ``DELETE ... WHERE id <= last``,
  one transaction per batch, WAL, ``synchronous=NORMAL``), nothing else.

Each step is timed three times and the best kept. Prints records/s for each and combined (one after the other, as a drain with
no overlap would do them: ``n / (t_mqtt + t_sqlite)``). The brokers are the
Debian package's mosquitto (``/usr/sbin/mosquitto``, TLS listener, anonymous)
and the bundled ThingsBoard stand-in, each in its own process, so the
publisher here competes for the cores exactly as the gateway would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import paho.mqtt.client as mqtt

if not __package__:  # run as `python tools/bench_ceiling.py`: the repository root holds `tests` and `tools`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration import uplink_rig as rig  # noqa: E402

TOPIC = "v1/devices/me/telemetry"
TOKEN = "bench-token"
DEVICE = "station-1"
MAX_PAYLOAD = 65536  # MQTT remaining length the gateway fills, topic and header included
INFLIGHT = 16  # TEG_UPLINK_MAX_INFLIGHT's default
BATCH_ROWS = 2000  # TEG_UPLINK_BATCH_ROWS's default
PUBLISHER_DEVICES = 200


def publisher_token(i: int) -> str:
    return f"ceiling-token-{i}"


@attrs.frozen
class Broker:
    """Where a TLS broker listens; ``tls_port``/``cafile`` as ``rig.gateway_env`` reads them."""

    kind: str
    tls_port: int
    cafile: str
    connections: list[int] = attrs.field(factory=lambda: [0], eq=False)  # publisher connections so far


@contextlib.contextmanager
def run_broker(kind: str, workdir: Path) -> Iterator[Broker]:
    """Start ``mosquitto`` or ``standin`` in its own process, TLS on loopback."""
    if kind == "mosquitto":
        from tests.rig.mosquitto import run_mosquitto
        from tests.rig.tls import make_tls_material

        tls_dir = workdir / "tls"
        tls_dir.mkdir(parents=True, exist_ok=True)
        with run_mosquitto(workdir, make_tls_material(tls_dir)) as broker:
            yield Broker(kind, broker.tls_port, str(broker.ca_cert))
        return
    if kind != "standin":
        raise SystemExit(f"unknown broker {kind!r}: mosquitto or standin")
    # One device per publisher connection: a device's second session on the stand-in got
    # one PUBACK and then none (not investigated; the gateway keeps its own device).
    publishers = [a for i in range(PUBLISHER_DEVICES) for a in ("--device", f"ceiling-{i}:{publisher_token(i)}")]
    proc = subprocess.Popen([sys.executable, "-m", "tools.tb_standin", "serve", "--port", "0", "--tls-port", "0",
                             "--device", f"{DEVICE}:{TOKEN}", *publishers], stdout=subprocess.PIPE, text=True,
                            cwd=rig.REPO)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        yield Broker(kind, ready["tls_port"], ready["cafile"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # a stand-in holding many records can be slow to stop
            proc.kill()
            proc.wait()


def packets_of(texts: list[str], max_payload: int = MAX_PAYLOAD) -> list[bytes]:
    """The rows as JSON arrays under the packet limit (topic and fixed header counted, as the gateway does)."""
    room = max_payload - len(TOPIC) - 2 - 2 - 5  # topic length, packet id, fixed header
    packets, batch, size = [], [], 1
    for text in texts:
        n = len(text.encode()) + 1
        if batch and size + n > room:
            packets.append(("[" + ",".join(batch) + "]").encode())
            batch, size = [], 1
        batch.append(text)
        size += n
    if batch:
        packets.append(("[" + ",".join(batch) + "]").encode())
    return packets


def time_publish(broker: Broker, packets: list[bytes]) -> float:
    """Seconds from the first publish to the last PUBACK, QoS 1, ``INFLIGHT`` at once."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"teg-ceiling-{time.monotonic_ns()}")
    broker.connections[0] += 1
    client.username_pw_set(publisher_token(broker.connections[0] % PUBLISHER_DEVICES))
    client.tls_set(ca_certs=broker.cafile, cert_reqs=ssl.CERT_REQUIRED)
    client.max_inflight_messages_set(INFLIGHT)
    connected, done = threading.Event(), threading.Event()
    acked = [0]

    def on_publish(*_: object) -> None:
        acked[0] += 1
        if acked[0] == len(packets):
            done.set()

    client.on_connect = lambda *_: connected.set()
    client.on_publish = on_publish
    client.connect("127.0.0.1", broker.tls_port)
    client.loop_start()
    try:
        if not connected.wait(20):
            raise SystemExit(f"could not connect to {broker.kind}")
        started = time.perf_counter()
        for payload in packets:
            client.publish(TOPIC, payload, qos=1)
        if not done.wait(30):
            raise SystemExit(f"{broker.kind}: {acked[0]} of {len(packets)} PUBACKs")
        return time.perf_counter() - started
    finally:
        client.disconnect()
        client.loop_stop()


def time_sqlite(db: Path) -> tuple[float, list[str]]:
    """Seconds to read and delete every row in batches; the rows' texts, in id order."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    texts: list[str] = []
    started = time.perf_counter()
    while True:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute("SELECT id, message FROM messages ORDER BY id LIMIT ?", (BATCH_ROWS,)).fetchall()
        if rows:
            conn.execute("DELETE FROM messages WHERE id <= ?", (rows[-1][0],))
        conn.execute("COMMIT")
        if not rows:
            break
        texts += [r[1] for r in rows]
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed, texts


def ceiling(n: int, broker: Broker, workdir: Path, repeat: int = 3) -> dict[str, float]:
    """Records/s of the SQLite step, the MQTT step and both one after the other, over ``n`` rows.

    Each step is timed ``repeat`` times and its best time kept: a ceiling is what the box
    can do, and a step this short (tens of ms) is easily hit by another job's time slice.
    """
    template = workdir / f"ceiling-{time.monotonic_ns()}.db"
    rig.fill(template, n)
    sql_times, mqtt_times = [], []
    for _ in range(repeat):
        db = workdir / f"ceiling-{time.monotonic_ns()}.db"
        shutil.copyfile(template, db)
        sql_s, texts = time_sqlite(db)
        _remove(db)
        assert len(texts) == n, (len(texts), n)
        sql_times.append(sql_s)
        mqtt_times.append(time_publish(broker, packets_of(texts)))
    _remove(template)
    sql_s, mqtt_s = min(sql_times), min(mqtt_times)
    return {"sqlite_per_s": n / sql_s, "mqtt_per_s": n / mqtt_s, "combined_per_s": n / (sql_s + mqtt_s),
            "sqlite_s": sql_s, "mqtt_s": mqtt_s}


def _remove(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db}{suffix}")


def describe(r: dict[str, float]) -> str:
    return (f"MQTT {r['mqtt_per_s']:>9,.0f}/s, SQLite {r['sqlite_per_s']:>9,.0f}/s, "
            f"combined {r['combined_per_s']:>9,.0f} records/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="?", type=int, default=100_000)
    parser.add_argument("--broker", action="append", choices=("mosquitto", "standin"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for kind in args.broker or ["mosquitto", "standin"]:
        with tempfile.TemporaryDirectory(prefix="teg-ceiling-") as tmp, run_broker(kind, Path(tmp)) as broker:
            for run in range(args.runs):
                r = ceiling(args.rows, broker, Path(tmp))
                print(f"{kind:<9} run {run + 1}: {describe(r)}  (load avg {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
