"""Small example machines that exercise the engine (not part of the gateway)."""

from __future__ import annotations

from typing import Any

import attrs
from statemachine import State

from teg_fsm.engine.effects import Effect, StartTimer
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine


@attrs.frozen(kw_only=True)
class FetchThing(Effect):
    """A test effect: the runner handler decides how it ends."""

    url: str


@attrs.define
class FetcherSettings:
    retry_s: float = 5.0
    timeout_s: float | None = None


class FetcherMachine(GatewayMachine):
    """Fetches something, retries after a timer, survives restarts."""

    machine_name = "fetcher"
    settings_type = FetcherSettings
    resume_table = {"idle": "idle", "fetching": "fetching", "waiting": "waiting", "done": "done", "failed": "failed"}
    rest_states = frozenset({"idle", "done", "failed"})
    crash_loop_state = "failed"
    max_resumes = 2

    idle = State(initial=True)
    fetching = State()
    waiting = State()
    done = State()
    failed = State()

    fetch_requested = idle.to(fetching) | failed.to(fetching) | done.to(fetching)
    fetch_succeeded = fetching.to(done)
    fetch_failed = fetching.to(waiting)
    fetch_timed_out = fetching.to(waiting)
    fetch_cancelled = fetching.to(failed)
    retry_elapsed = waiting.to(fetching)
    resumed = fetching.to.itself() | waiting.to(fetching) | failed.to.itself(internal=True)

    def setup(self) -> None:
        self.url = ""
        self.attempts = 0
        self.results: list[Any] = []

    def on_fetch_requested(self, ev: Event) -> None:
        self.url = ev.data["url"]
        self.attempts = 0

    def on_enter_fetching(self) -> None:
        self.attempts += 1
        self.emit(FetchThing(url=self.url, reply="fetch", timeout_s=self.settings.timeout_s))

    def on_enter_waiting(self) -> None:
        self.emit(StartTimer(name="retry_elapsed", seconds=self.settings.retry_s))

    def on_fetch_succeeded(self, ev: Event) -> None:
        self.results.append(ev.data.get("result"))

    def snapshot(self) -> dict[str, Any]:
        return {"url": self.url, "attempts": self.attempts}

    def restore(self, data: Any) -> None:
        self.url = data.get("url", "")
        self.attempts = data.get("attempts", 0)


class CounterMachine(GatewayMachine):
    """Counts ticks; the benchmark's machine."""

    machine_name = "counter"
    resume_table = {"even": "even", "odd": "odd"}
    rest_states = frozenset({"even", "odd"})

    even = State(initial=True)
    odd = State()
    tick = even.to(odd) | odd.to(even)

    def setup(self) -> None:
        self.count = 0

    def on_tick(self) -> None:
        self.count += 1


@attrs.frozen(kw_only=True)
class Download(Effect):
    """A test effect issued on entering ``downloading``."""

    attempt: int


class UpdaterMachine(GatewayMachine):
    """A compound machine: ``working`` nests ``downloading`` and ``installing``.

    ``cancel`` is declared on the compound state, so it applies in either
    nested state. ``progress`` is a targetless transition of ``working``: it
    runs its action in whichever nested state is active, with no exit or
    entry. (``to.itself(internal=True)`` would not do here: python-statemachine
    3.2.2 re-enters the ancestors of a nested state on it, and exits the
    nested states of a compound one; see docs/ENGINE.md.)
    ``install_failed`` raises after issuing an effect, for containment.
    """

    machine_name = "updater"
    resume_table = {"idle": "idle", "downloading": "downloading", "installing": "installing", "halted": "halted"}
    rest_states = frozenset({"idle", "halted"})
    error_state = "halted"

    idle = State(initial=True)
    halted = State()

    class working(State.Compound):
        downloading = State(initial=True)
        installing = State()

        downloaded = downloading.to(installing)

    start = idle.to(working) | halted.to(working)
    progress = working.to(None)
    cancel = working.to(idle)
    installed = working.installing.to(idle)
    install_failed = working.installing.to(idle)
    halt_requested = working.to(halted)

    def setup(self) -> None:
        self.attempts = 0
        self.progress_seen = 0
        self.entered: list[str] = []

    def on_enter_working(self) -> None:
        self.entered.append("working")

    def on_exit_working(self) -> None:
        self.entered.append("-working")

    def on_enter_downloading(self) -> None:
        self.attempts += 1
        self.entered.append("downloading")
        self.emit(Download(attempt=self.attempts))

    def on_enter_installing(self) -> None:
        self.entered.append("installing")

    def on_progress(self, ev: Event) -> None:
        self.progress_seen += ev.data.get("step", 1)

    def on_install_failed(self) -> None:
        self.emit(Download(attempt=-1))
        raise RuntimeError("install script crashed")

    def snapshot(self) -> dict[str, Any]:
        return {"attempts": self.attempts}

    def restore(self, data: Any) -> None:
        self.attempts = data.get("attempts", 0)
