"""The controller component: the controller machine wired to the Docker engine.

Lifecycle effects (inspect, start, stop) run one at a time, in the order the
machine issued them, on this component's own worker thread. That order is
what lets a swap overtake a restart safely: the earlier start finishes first
and the swap then replaces its container. Health reads run on the shared
worker pool, so a 60 s stop never delays them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from teg_fsm.adapters.docker_engine import (
    ContainerSettings,
    DockerEngine,
    EngineError,
    EngineWatcher,
)
from teg_fsm.config import Config
from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.effects import Effect
from teg_fsm.engine.effects.controller import (
    CONTAINER_NAME,
    InspectController,
    ReadControllerHealth,
    StartController,
    StopController,
)
from teg_fsm.engine.events import Source
from teg_fsm.engine.runner import Completion
from teg_fsm.engine.sqlite_files import read_text_checked
from teg_fsm.machines.controller import ControllerMachine

if TYPE_CHECKING:
    from teg_fsm.app import Gateway

log = logging.getLogger(__name__)


def boot_version(config: Config) -> str | None:
    """last_launched_controller_version.txt, else TEG_DEFAULT_CONTROLLER_VERSION, else None."""
    text = read_text_checked(config.last_version_file).strip()  # a damaged file is quarantined
    if text:
        return text
    return config.default_controller_version


def container_settings(config: Config, name: str = CONTAINER_NAME) -> ContainerSettings:
    return ContainerSettings(
        data_path=config.controller_data_path,
        logs_path=config.controller_logs_path,
        restart_policy=config.controller_restart_policy,
        privileged=config.controller_privileged,
        extra_mounts=config.controller_extra_mounts,
        stop_timeout_s=config.controller_stop_timeout_s,
        name=name,
    )


class ControllerComponent:
    """Supervises the controller container (machines/controller.py)."""

    name = "controller"

    def __init__(self, gateway: Gateway, container_name: str = CONTAINER_NAME, **machine_settings: Any) -> None:
        """``container_name`` exists for tests sharing one engine; ``machine_settings``
        override the machine's settings (e.g. a short telemetry interval in tests)."""
        self.gateway = gateway
        config = gateway.config
        self.engine = DockerEngine(config.docker_host, container_settings(config, container_name))
        self.watcher = EngineWatcher(config.docker_host, self._post, name=container_name)
        self._serial = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teg-docker")
        self._last: Future[None] | None = None
        self._overrides = machine_settings

    def machine_specs(self) -> list[MachineSpec]:
        config = self.gateway.config
        settings = {
            "boot_version": boot_version(config),
            "health_check_max_age_s": config.health_check_max_age_s,
            "restart_backoff_s": config.restart_backoff_s,
            "restart_backoff_factor": config.restart_backoff_factor,
            "engine_retry_max_s": config.engine_retry_max_s,
            "stop_timeout_s": config.controller_stop_timeout_s,
            **self._overrides,
        }
        return [MachineSpec(ControllerMachine, settings)]

    def install(self) -> None:
        register = self.gateway.runner.register
        register(InspectController, self._in_order(lambda e: self.engine.inspect()))
        register(StartController, self._in_order(lambda e: self.engine.start(e.version)))
        register(StopController, self._in_order(lambda e: self.engine.stop(e.container_id)))
        queue_db = self.gateway.config.queue_db
        register(ReadControllerHealth,
                 lambda e, c: _settle(c, lambda: {**self.engine.read_health(queue_db), "asked_for": e.container_id}),
                 blocking=True)

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        """Never stops the controller: the next gateway adopts it."""
        self.watcher.stop()
        self._serial.shutdown(wait=False, cancel_futures=True)
        if self._last is not None:  # let a short engine call finish rather than cut it off
            wait([self._last], timeout=5.0)
        self.engine.close()

    def _post(self, name: str, data: dict[str, Any]) -> None:
        self.gateway.dispatcher.post(Source.DOCKER, name, data)

    def _in_order(self, work: Callable[[Any], dict[str, Any]]) -> Callable[[Effect, Completion], None]:
        def handler(effect: Effect, completion: Completion) -> None:
            self._last = self._serial.submit(_settle, completion, lambda: work(effect))

        return handler


def _settle(completion: Completion, work: Callable[[], dict[str, Any]]) -> None:
    if completion.settled:  # timed out or cancelled while it waited its turn
        return
    try:
        completion.succeed(work())
    except EngineError as exc:
        flags = {"engine_unreachable": exc.engine_down, "image_missing": exc.image_missing}
        completion.fail(str(exc), {k: True for k, v in flags.items() if v} or None)
    except Exception as exc:
        log.exception("controller effect failed")
        completion.fail(f"{type(exc).__name__}: {exc}")
