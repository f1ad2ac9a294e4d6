"""RPC benchmark: ``ping`` round trips through the stand-in, idle and while the uplink drains a backlog.

    python tools/bench_rpc.py [--idle-pings 200] [--rows 100000] [--no-control]

A round trip is the stand-in's ``rpc()`` call (REST-like two-way RPC) until it
returns the gateway's reply. The gateway runs as a subprocess (``python -m
teg_fsm.cli run``) against the stand-in over TLS, in this process, as in
tools/bench_uplink.py. Printed: p50/p95/p99/max over N pings

- idle: ``--idle-pings`` pings, one after the other, to a connected, settled gateway;
- drain: a queue pre-filled with ``--rows`` rows; pings one after the other for as
  long as the drain lasts (only pings answered before the last row arrived count).

Control (unless ``--no-control``): during a second drain, the same pings go to
a bare paho device in this process that answers at once, so the stand-in's own
share of the latency under that load shows separately from the gateway's.
Targets: p99 <= 50 ms idle, <= 200 ms under the drain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen

import paho.mqtt.client as mqtt

if not __package__:  # run as `python tools/bench_rpc.py`: the repository root holds `tests` and `tools`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration import uplink_rig as rig  # noqa: E402
from tools.tb_standin import StandIn  # noqa: E402

DEVICE, ECHO = "bench-station", "bench-echo"


def _ms(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000

    return (f"n={len(ordered):>4}  p50 {pct(50):6.1f} ms  p95 {pct(95):6.1f} ms  p99 {pct(99):6.1f} ms  "
            f"max {ordered[-1] * 1000:6.1f} ms  mean {statistics.fmean(ordered) * 1000:6.1f} ms")


def _ping(tb: StandIn, device: str) -> float:
    started = time.perf_counter()
    reply = tb.rpc(device, "ping", timeout=10.0)
    took = time.perf_counter() - started
    if reply not in ({"message": "Pong"}, "Pong"):
        raise SystemExit(f"unexpected ping reply from {device}: {reply!r}")
    return took


@contextmanager
def _gateway(tb: StandIn, tmp: Path, rows: int) -> Iterator[Popen[bytes]]:
    data = tmp / "data"
    if rows:
        rig.fill(data / "communication_queue.db", rows)
    # No Docker engine: the bench must not adopt a controller someone else runs.
    env = rig.gateway_env(tb, data, tb.add_device(DEVICE), THINGSBOARD_DEVICE_NAME=DEVICE, LOG_LEVEL="WARNING",
                          DOCKER_HOST=f"unix://{tmp}/no-docker.sock")
    proc = rig.start_gateway(env, tmp / "gateway.log")
    try:
        rig.wait_for(lambda: "v1/devices/me/rpc/request/+" in tb.subscriptions(DEVICE), 20, "gateway subscribed")
        yield proc
    finally:
        rig.stop(proc)


@contextmanager
def _echo_device(tb: StandIn) -> Iterator[None]:
    """A bare paho device that answers every RPC at once (the control)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.username_pw_set(tb.add_device(ECHO))

    def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        request_id = msg.topic.rsplit("/", 1)[-1]
        c.publish(f"v1/devices/me/rpc/response/{request_id}", json.dumps({"message": "Pong"}), qos=1)

    client.on_message = on_message
    client.connect("127.0.0.1", tb.port)
    client.subscribe("v1/devices/me/rpc/request/+", qos=1)
    client.loop_start()
    try:
        rig.wait_for(lambda: "v1/devices/me/rpc/request/+" in tb.subscriptions(ECHO), 10, "echo device subscribed")
        yield
    finally:
        client.disconnect()
        client.loop_stop()


def _during_drain(tb: StandIn, rows: int, ping: Callable[[], float]) -> tuple[list[float], float]:
    """Ping while the drain lasts; returns the samples and the drain's duration."""
    samples: list[float] = []
    first = rig.wait_for(lambda: tb.telemetry_count(DEVICE) > 0 and time.monotonic(), 30, "drain started")
    done = threading.Event()

    def watch() -> None:
        while tb.telemetry_count(DEVICE) < rows:
            time.sleep(0.01)
        done.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    while not done.is_set():
        took = ping()
        if not done.is_set():
            samples.append(took)
    watcher.join()
    return samples, time.monotonic() - first


def run(idle_pings: int, rows: int, control: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="teg-bench-rpc-") as tmp, StandIn(tls_port=0) as tb:
        with _gateway(tb, Path(tmp) / "idle", 0):
            time.sleep(2.0)  # let start-up traffic (attributes, logs) settle
            for _ in range(5):
                _ping(tb, DEVICE)  # warm-up
            idle = [_ping(tb, DEVICE) for _ in range(idle_pings)]
        print(f"idle           : {_ms(idle)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="teg-bench-rpc-") as tmp, StandIn(tls_port=0) as tb:
        with _gateway(tb, Path(tmp) / "drain", rows):
            busy, took = _during_drain(tb, rows, lambda: _ping(tb, DEVICE))
        print(f"drain {rows:,} rows ({took:.1f} s, {rows / took:,.0f} records/s): {_ms(busy)}", flush=True)
    if control:
        with tempfile.TemporaryDirectory(prefix="teg-bench-rpc-") as tmp, StandIn(tls_port=0) as tb:
            with _echo_device(tb), _gateway(tb, Path(tmp) / "control", rows):
                echo, took = _during_drain(tb, rows, lambda: _ping(tb, ECHO))
            print(f"control: bare paho device, same drain ({took:.1f} s): {_ms(echo)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-pings", type=int, default=200)
    parser.add_argument("--rows", type=int, default=100_000, help="backlog drained while pinging")
    parser.add_argument("--no-control", action="store_true", help="skip the bare-device control run")
    args = parser.parse_args()
    run(args.idle_pings, args.rows, not args.no_control)


if __name__ == "__main__":
    main()
