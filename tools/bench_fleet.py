"""Fleet-scale reconnects, simulated: what ThingsBoard sees when it comes back.

Thousands of gateways lose their sessions at the same instant when ThingsBoard
goes down; how they come back decides whether the server survives its own
recovery. This runs N real ``ConnectionMachine`` instances (the shipped class,
with the settings the gateway gives it under the default configuration) on the engine's own ``FakeClock`` and ``Timers``
(so the jitter is the engine's), with no sockets: a ``Connect`` effect is
answered after ``--connect-latency-s`` with success while the server is up and
failure while it is down.

Timeline: every device connects at t=0 and stays up for ``--settle-s`` (longer
than the machine's ``stable_after_s``); at t=settle the server drops every
session and stays down for ``--outage-s``; the run continues ``--after-s``
after the server is back.

Printed: connect attempts per second as the server sees them (peak during the
outage, peak after recovery, both also as a fraction of the fleet), a coarse
curve of attempts per bin after recovery, and the time until 50/90/99/100 % of
the fleet is back online. ``--jitter`` / ``--max-s`` override the shipped
settings so trade-offs can be compared in one run; ``--compare`` runs a few
variants side by side.

    python tools/bench_fleet.py                    # 10,000 devices, 10-minute outage
    python tools/bench_fleet.py --compare
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teg_fsm.components.mqtt import connection_settings  # noqa: E402
from teg_fsm.config import read_config  # noqa: E402
from teg_fsm.engine.clock import FakeClock  # noqa: E402
from teg_fsm.engine.effects import CancelTimer, StartTimer  # noqa: E402
from teg_fsm.engine.effects.mqtt import Connect  # noqa: E402
from teg_fsm.engine.events import (  # noqa: E402
    Event,
    Outcome,  # noqa: E402
    Source,
    outcome_event_name,
)
from teg_fsm.engine.timers import Timers  # noqa: E402
from teg_fsm.machines.connection import ConnectionMachine  # noqa: E402


class Fleet:
    """N connection machines, one fake clock, one timer heap, one server switch."""

    def __init__(self, devices: int, settings: dict[str, Any], latency_s: float, seed: int) -> None:
        self.clock = FakeClock()
        self.timers = Timers(self.clock, random.Random(seed))
        self.machines = [ConnectionMachine(settings) for _ in range(devices)]
        self.latency_s = latency_s
        self.server_up = True
        self.attempts: Counter[int] = Counter()  # whole second -> Connect effects
        self.online_at: dict[int, float] = {}
        self._answers: list[tuple[float, int, int]] = []  # (due, seq, device)
        self._seq = 0
        self._session = 0

    def now(self) -> float:
        return self.clock.monotonic()

    def deliver(self, device: int, name: str, data: dict[str, Any] | None = None) -> None:
        self._seq += 1
        event = Event(self._seq, self.clock.now_ms(), Source.TEST.value, name, data or {}, "connection")
        machine = self.machines[device]
        _, effects = machine.handle(event)
        for effect in effects:
            self._act(device, effect)
        if machine.state_name == "online":
            self.online_at.setdefault(device, self.now())

    def _act(self, device: int, effect: Any) -> None:
        if isinstance(effect, StartTimer):
            self.timers.start(str(device), effect.name, effect.seconds, effect.jitter)
        elif isinstance(effect, CancelTimer):
            self.timers.cancel(str(device), effect.name)
        elif isinstance(effect, Connect):
            self.attempts[int(self.now())] += 1
            self._seq += 1
            heapq.heappush(self._answers, (self.now() + self.latency_s, self._seq, device))
        # Subscribe, Publish, RequestAttributes, ClientRpc, Log: nothing the server's connect load depends on.

    def _answer(self, device: int) -> None:
        if self.server_up:
            self._session += 1
            self.deliver(device, outcome_event_name("connect", Outcome.SUCCEEDED), {"result": {"session": self._session}})
        else:
            self.deliver(device, outcome_event_name("connect", Outcome.FAILED), {"error": "connection refused"})

    def run_until(self, until: float) -> None:
        while True:
            next_answer = self._answers[0][0] if self._answers else None
            next_timer = self.timers.next_deadline()
            due = min((t for t in (next_answer, next_timer) if t is not None), default=None)
            if due is None or due > until:
                break
            self.clock.set_elapsed(due)
            while self._answers and self._answers[0][0] <= due:
                self._answer(heapq.heappop(self._answers)[2])
            for machine, name, generation in self.timers.pop_due(due):
                if self.timers.consume(machine, name, generation):
                    self.deliver(int(machine), name)
        self.clock.set_elapsed(until)

    def drop_every_session(self) -> None:
        self.server_up = False
        self.online_at.clear()
        for device, machine in enumerate(self.machines):
            self.deliver(device, "mqtt_disconnected", {"session": machine.session, "reason": "server down"})


def shipped_settings() -> dict[str, Any]:
    """What the gateway gives the connection machine with every setting at its default."""
    config, _ = read_config({"TB_HOST": "thingsboard.example", "TB_PORT": "8883"})
    return connection_settings(config)


def simulate(devices: int, outage_s: float, settle_s: float, after_s: float, latency_s: float, seed: int,
             overrides: dict[str, Any]) -> dict[str, Any]:
    fleet = Fleet(devices, {**shipped_settings(), **overrides}, latency_s, seed)
    for device in range(devices):
        fleet.deliver(device, "token_ready")
    fleet.run_until(settle_s)
    assert len(fleet.online_at) == devices, "the fleet did not come up before the outage"
    fleet.drop_every_session()
    back = settle_s + outage_s
    fleet.run_until(back)
    fleet.server_up = True
    fleet.run_until(back + after_s)
    returns = sorted(t - back for t in fleet.online_at.values())

    def quantile(q: float) -> float | None:
        needed = int(q * devices + 0.999999)
        return returns[needed - 1] if len(returns) >= needed else None

    during = [n for s, n in fleet.attempts.items() if settle_s <= s < back]
    after = [n for s, n in fleet.attempts.items() if s >= back]
    return {
        "settings": fleet.machines[0].unstructured_settings(),
        "peak_during": max(during, default=0),
        "peak_after": max(after, default=0),
        "attempts_after": sum(after),
        "curve": {s - int(back): n for s, n in sorted(fleet.attempts.items()) if s >= back},
        "back": {q: quantile(q) for q in (0.5, 0.9, 0.99, 1.0)},
        "devices": devices,
    }


def print_result(label: str, result: dict[str, Any], bin_s: int) -> None:
    devices = result["devices"]
    s = result["settings"]
    print(f"\n== {label}: min_s={s['min_s']} max_s={s['max_s']} factor={s['factor']} jitter={s['jitter']}")
    print(f"peak connect attempts/s during the outage: {result['peak_during']} ({result['peak_during'] / devices:.2%} of the fleet)")
    print(f"peak connect attempts/s after recovery:    {result['peak_after']} ({result['peak_after'] / devices:.2%} of the fleet)")
    back = ", ".join(f"{int(q * 100)} %: {'not back' if t is None else f'{t:.0f} s'}" for q, t in result["back"].items())
    print(f"time after recovery until back online:     {back}")
    bins: Counter[int] = Counter()
    for second, n in result["curve"].items():
        bins[second // bin_s] += n
    if not bins:
        return
    top = max(bins.values())
    print(f"attempts after recovery, per {bin_s} s bin (peak bin {top / bin_s:.0f}/s):")
    for b in range(max(bins) + 1):
        n = bins.get(b, 0)
        print(f"  {b * bin_s:5d}-{(b + 1) * bin_s:<5d} s {n / bin_s:8.1f}/s {'#' * round(50 * n / top)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--outage-s", type=float, nargs="+", default=[600.0])
    parser.add_argument("--settle-s", type=float, default=120.0)
    parser.add_argument("--after-s", type=float, default=1200.0)
    parser.add_argument("--connect-latency-s", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bin-s", type=int, default=30)
    parser.add_argument("--jitter", type=float)
    parser.add_argument("--max-s", type=float)
    parser.add_argument("--compare", action="store_true", help="also run jitter/max_s variants")
    parser.add_argument("--quiet", action="store_true", help="only the summary table")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("jitter", args.jitter), ("max_s", args.max_s)) if v is not None}
    variants = [("shipped settings" if not overrides else "given settings", overrides)]
    if args.compare:
        # (0.2, 300) is what the gateway shipped before this trade-off was measured.
        variants += [(f"jitter {j}, max_s {m:.0f}", {"jitter": j, "max_s": m})
                     for j, m in ((0.2, 300.0), (0.5, 300.0), (1.0, 300.0), (0.5, 120.0), (1.0, 120.0), (0.5, 60.0))]
    print(f"{args.devices} connection machines, connect answered in {args.connect_latency_s * 1000:.0f} ms "
          f"(refused while the server is down)")
    summary = []
    for outage_s in args.outage_s:
        for label, settings in variants:
            result = simulate(args.devices, outage_s, args.settle_s, args.after_s, args.connect_latency_s,
                              args.seed, settings)
            if not args.quiet:
                print_result(f"{label}, outage {outage_s:.0f} s", result, args.bin_s)
            summary.append((outage_s, label, result))
    print("\n| outage | settings | peak attempts/s after recovery (% of fleet) | back online: 50 % / 99 % / all |")
    print("|---|---|---|---|")
    for outage_s, label, result in summary:
        back = " / ".join("never" if t is None else f"{t:.0f} s" for q, t in result["back"].items() if q != 0.9)
        print(f"| {outage_s:.0f} s | {label} | {result['peak_after'] / result['devices']:.2%} | {back} |")

if __name__ == "__main__":
    main()
