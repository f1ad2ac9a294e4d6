"""The composition root: builds config, engine, components and machines.

Nothing else in the gateway creates shared objects; everything a component
needs comes from the ``Gateway`` it is given.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from teg_fsm.adapters.systemd import Notifier, StatusFile, status_line
from teg_fsm.components import Component
from teg_fsm.components.controller import ControllerComponent
from teg_fsm.components.file_sync import FileSyncComponent
from teg_fsm.components.mqtt import MqttComponent
from teg_fsm.components.ota import OtaComponent
from teg_fsm.components.rpc import RpcComponent
from teg_fsm.components.uplink import UplinkComponent
from teg_fsm.config import Config
from teg_fsm.engine.clock import Clock, RealClock
from teg_fsm.engine.codec import Codec
from teg_fsm.engine.dispatcher import Dispatcher, MachineSpec
from teg_fsm.engine.events import Source
from teg_fsm.engine.journal import Journal
from teg_fsm.engine.runner import EffectRunner
from teg_fsm.engine.sqlite_files import QUARANTINE_MARK
from teg_fsm.engine.timers import Timers

log = logging.getLogger(__name__)

STATUS_FILE_NAME = "teg_status.json"
INSTALL_RETRY_MIN_S = 1.0
INSTALL_RETRY_MAX_S = 15.0
ComponentsFactory = Callable[["Gateway"], list[Component]]


def default_components(gateway: Gateway) -> list[Component]:
    """The gateway's components, in start order: MQTT last, so every handler is
    registered before the first message arrives."""
    return [
        UplinkComponent(gateway),
        RpcComponent(gateway),
        FileSyncComponent(gateway),
        OtaComponent(gateway),
        ControllerComponent(gateway),
        MqttComponent(gateway),
    ]


class Gateway:
    """One running gateway: engine plus components."""

    def __init__(
        self,
        config: Config,
        *,
        components: ComponentsFactory = default_components,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or RealClock()
        config.data_path.mkdir(parents=True, exist_ok=True)
        self.codec = Codec()
        self.timers = Timers(self.clock)
        self.started_at = time.time()
        self.journal = Journal(
            config.journal_db, max_bytes=config.journal_max_bytes, max_age_s=config.journal_max_age_s,
            detail_window_s=config.journal_detail_window_s,
        )
        self.status_file = StatusFile(config.data_path / STATUS_FILE_NAME)
        self.dispatcher = Dispatcher(clock=self.clock, timers=self.timers, journal=self.journal, codec=self.codec)
        self.runner = EffectRunner(self.dispatcher.post_outcome, driver=self.timers)  # its deadlines: the dispatcher's thread
        self.dispatcher.attach_runner(self.runner)
        self.notifier = notifier or Notifier()
        self._told: tuple[dict[str, str], dict[str, str]] | None = None  # the status last told
        self.dispatcher.idle_hooks.append(self._heartbeat)
        self.dispatcher.observers.append(lambda _dispatched: self._ping())
        self.components: dict[str, Component] = {}
        for component in components(self):
            self.components[component.name] = component
        self.stopped = threading.Event()
        self._stopping = threading.Event()
        self._installer: threading.Thread | None = None

    def machine_specs(self) -> list[MachineSpec]:
        from teg_fsm.machines.health import HealthMachine

        return [spec for c in self.components.values() for spec in c.machine_specs()] + [MachineSpec(HealthMachine)]

    def start(self) -> None:
        waiting = [c for c in self.components.values() if not self._install(c)]
        self.dispatcher.boot(self.machine_specs(), self.journal.load_checkpoints())
        self.dispatcher.start()
        for component in self.components.values():
            if component not in waiting:
                component.start()
        if waiting:
            self._installer = threading.Thread(target=self._install_later, args=(waiting,),
                                               name="teg-install-retry", daemon=True)
            self._installer.start()
        self._report_quarantines_at_start()
        self.notifier.ready(status_line(self.dispatcher.states()))
        log.info("gateway started: %s", ", ".join(self.dispatcher.machines))

    def _install(self, component: Component) -> bool:
        """Install one component; one whose files cannot be opened (full disk, I/O error) waits instead."""
        try:
            component.install()
            return True
        except (sqlite3.Error, OSError) as exc:
            log.error("%s cannot open its files (%s); running without it and retrying", component.name, exc)
            return False

    def _install_later(self, waiting: list[Component]) -> None:
        """Start-up never fails on storage: retry the waiting components with backoff until they open."""
        delay = INSTALL_RETRY_MIN_S
        while waiting and not self._stopping.wait(delay):
            for component in list(waiting):
                if self._install(component):
                    component.start()
                    waiting.remove(component)
                    log.warning("%s started: its files can be opened again", component.name)
            delay = min(delay * 2, INSTALL_RETRY_MAX_S)

    def _report_quarantines_at_start(self) -> None:
        """Files the components moved aside while opening (the journal reports its own)."""
        own = {Path(p).name for p in self.journal.quarantined}
        since = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.started_at))
        folders = {self.config.data_path, self.config.controller_data_path}
        for folder in folders:
            for path in sorted(folder.glob(f"*{QUARANTINE_MARK}*")):
                stamp = path.name.split(QUARANTINE_MARK, 1)[1][:16]
                if stamp >= since and path.name not in own and not path.name.endswith(("-wal", "-shm")):
                    self.dispatcher.report_quarantine(path)

    def conditions(self) -> dict[str, str]:
        """The declared degraded conditions in force right now."""
        journal = self.journal
        return {journal.condition: journal.condition_detail} if journal.condition else {}

    def _ping(self) -> None:
        """Runs in the dispatcher thread: a wedged dispatcher stops the watchdog pings.

        Pings and status updates are spaced by the watchdog interval; after each
        event too, so a long burst keeps pinging."""
        if self.notifier.watchdog():
            states, conditions = self.dispatcher.states(), self.conditions()
            self.notifier.status(status_line(states, conditions))
            self.status_file.write({"pid": os.getpid(), "conditions": conditions,
                                    "states": {name: info["state"] for name, info in states.items()}})
            self._told = self._status(states)

    def _heartbeat(self) -> float | None:
        """The idle hook: ping if due, then say when to run again.

        Under a systemd watchdog that is the next ping; otherwise only a status that
        changed since it was last told needs a later run (the next update), and an idle
        gateway needs no wake-up at all.
        """
        self._ping()
        if not self.notifier.watchdog_expected and self._status(self.dispatcher.states()) == self._told:
            return None
        return self.notifier.watchdog_due_in() or self.notifier.watchdog_interval_s

    def _status(self, states: Mapping[str, Mapping[str, object]]) -> tuple[dict[str, str], dict[str, str]]:
        """What the status says, to tell whether it changed since it was last told."""
        return {name: str(info["state"]) for name, info in states.items()}, self.conditions()

    def stop(self, quiesce_s: float = 3.0) -> None:
        """Stop taking work, let work in flight settle (bounded), flush, close databases."""
        self.notifier.stopping()
        self._stopping.set()
        if self._installer is not None:
            self._installer.join(INSTALL_RETRY_MAX_S)
        if self.dispatcher.thread is not None and self.dispatcher.thread.is_alive():
            self.dispatcher.post(Source.SYSTEM, "gateway_stopping")
            deadline = time.monotonic() + quiesce_s
            for component in self.components.values():
                quiesce = getattr(component, "quiesce", None)
                if quiesce is not None:
                    quiesce(deadline)
        for component in reversed(list(self.components.values())):
            try:
                component.stop()
            except Exception:
                log.exception("stopping %s failed", component.name)
        self.dispatcher.stop()
        self.runner.shutdown(wait=False)
        self.journal.close()
        self.status_file.write({"pid": None, "stopped": True, "conditions": self.conditions()})
        self.status_file.close()
        self.notifier.close()
        self.stopped.set()
