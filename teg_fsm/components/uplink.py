"""The uplink component: controller queue, archive, gateway logs -> ThingsBoard.

Wires ``teg_fsm.machines.uplink.UplinkMachine`` to ``teg_fsm.adapters.uplink_io.UplinkIO``
(one I/O thread over ``QueueStore`` and ``LogBuffer``), registers the
handlers of the uplink effects and of the engine's ``Log`` effect, and puts
``BufferingLogHandler`` on the root logger so gateway logs reach ThingsBoard.

For the RPC machine: ``RepublishArchived`` / ``DiscardArchived`` effects
(succeed with ``{"rows", ...}``), or ``archive_republish`` / ``archive_discard``
on this component from any thread.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from teg_fsm.adapters.gateway_logs import BufferingLogHandler, LogBuffer
from teg_fsm.adapters.queue_store import QueueStore
from teg_fsm.adapters.uplink_io import UplinkIO
from teg_fsm.engine.dispatcher import Dispatched, MachineSpec
from teg_fsm.engine.effects import Log
from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC
from teg_fsm.engine.effects.uplink import DiscardArchived, RepublishArchived, SendPacket, TransferRows
from teg_fsm.engine.events import Source
from teg_fsm.engine.runner import Completion

if TYPE_CHECKING:
    from teg_fsm.app import Gateway

log = logging.getLogger(__name__)
machine_log = logging.getLogger("teg.machines")


class UplinkComponent:
    name = "uplink"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        config = gateway.config
        self.config = config
        self.handler = BufferingLogHandler(logging.getLevelName(config.log_level)
                                           if isinstance(logging.getLevelName(config.log_level), int) else logging.INFO)
        self.io = UplinkIO(
            store=lambda: QueueStore(config.queue_db, config.archive_db, archive_max_rows=config.archive_max_rows,
                                     archive_max_bytes=config.archive_max_bytes),
            logs=lambda: LogBuffer(config.logs_buffer_db),
            handler=self.handler,
            post=lambda name, data: gateway.dispatcher.post(Source.QUEUE, name, data, target="uplink"),
            coalesce_s=config.uplink_coalesce_s,
        )
        # Queue depth and dead letters for ThingsBoard: sampled on the I/O thread at most once per
        # interval, and only after the uplink had something to do (an idle gateway reads nothing).
        self._queue_moved = True
        self._queue_sampled_ms: int | None = None
        self._queue_reported: dict[str, int] | None = None
        gateway.dispatcher.observers.append(self._note_queue_activity)
        gateway.dispatcher.idle_hooks.append(self._sample_queue)

    def machine_specs(self) -> list[MachineSpec]:
        from teg_fsm.machines.uplink import UplinkMachine

        c = self.config
        return [MachineSpec(UplinkMachine, {
            "batch_rows": c.uplink_batch_rows,
            "pending_max_rows": c.pending_max_rows,
            "max_inflight": c.uplink_max_inflight,
            "max_payload_size": c.uplink_max_payload_bytes,
            "rate_messages": c.uplink_rate_messages,
            "rate_telemetry_messages": c.uplink_rate_telemetry_messages,
            "rate_data_points": c.uplink_rate_data_points,
            "packet_timeout_s": c.uplink_puback_timeout_s,
        })]

    def install(self) -> None:
        self.io.open()
        logging.getLogger().addHandler(self.handler)
        register = self.gateway.runner.register
        register(TransferRows, self._transfer)
        register(SendPacket, self._send)
        register(RepublishArchived, self._republish)
        register(DiscardArchived, self._discard)
        register(Log, self._log)

    def start(self) -> None:
        mqtt = self.gateway.components.get("mqtt")
        link = getattr(mqtt, "link", None)
        if link is not None:
            self.io.publish = link.publish_async
        self.io.start()
        self.gateway.dispatcher.post(Source.QUEUE, "rows_waiting", {}, target="uplink")

    def quiesce(self, deadline: float) -> None:
        """Before the link closes: wait (until ``deadline``, monotonic) for in-flight PUBACKs."""
        machine = self.gateway.dispatcher.machines.get("uplink")
        while machine is not None and machine.in_flight() and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)

    def stop(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.io.stop()

    # -- queue depth (dispatcher thread decides, I/O thread reads) ------------------

    def _note_queue_activity(self, dispatched: Dispatched) -> None:
        event = dispatched.event
        if event.target == "uplink" or event.name == "mqtt_connected":
            self._queue_moved = True

    def _sample_queue(self) -> float | None:
        """The idle hook: sample the queue's depth at most once per report interval, if it moved.

        Returns the seconds until the next sample is due while one waits (None: none waits)."""
        now = self.gateway.clock.now_ms()
        interval_ms = self.config.fsm_report_interval_s * 1000
        if not self._queue_moved:
            return None
        if self._queue_sampled_ms is not None and now - self._queue_sampled_ms < interval_ms:
            return (self._queue_sampled_ms + interval_ms - now) / 1000
        self._queue_moved, self._queue_sampled_ms = False, now

        def sample() -> None:
            store, mqtt = self.io.store, self.gateway.components.get("mqtt")
            if store is None or mqtt is None:
                return
            depth = store.depth()
            if depth != self._queue_reported:
                self._queue_reported = depth
                mqtt.say(TELEMETRY_TOPIC, json.dumps({"ts": now, "values": depth}), now)  # type: ignore[attr-defined]

        self.io.submit(sample)
        return None

    # -- handlers (dispatcher thread: they only enqueue) ---------------------------

    def _job(self, completion: Completion, work: Callable[[], None]) -> None:
        def run() -> None:
            try:
                work()
            except Exception as exc:
                completion.fail(f"{type(exc).__name__}: {exc}")
                raise

        self.io.submit(run)

    def _transfer(self, effect: TransferRows, completion: Completion) -> None:
        def work() -> None:
            assert self.io.store is not None
            completion.succeed(self.io.store.transfer(effect.max_rows, effect.pending_max_rows))

        self._job(completion, work)

    def _send(self, effect: SendPacket, completion: Completion) -> None:
        self._job(completion, lambda: self.io.send(effect, completion))

    def _republish(self, effect: RepublishArchived, completion: Completion) -> None:
        def work() -> None:
            completion.succeed(self._do_republish(effect.start_ms, effect.end_ms))

        self._job(completion, work)

    def _discard(self, effect: DiscardArchived, completion: Completion) -> None:
        def work() -> None:
            assert self.io.store is not None
            completion.succeed(self.io.store.discard(effect.start_ms, effect.end_ms))

        self._job(completion, work)

    def _log(self, effect: Log, completion: Completion) -> None:
        level = logging.getLevelName(effect.level.upper())
        machine_log.log(level if isinstance(level, int) else logging.INFO, "%s: %s", completion.origin, effect.message)
        completion.succeed(None)

    def _do_republish(self, start_ms: int, end_ms: int) -> dict[str, Any]:
        assert self.io.store is not None
        result = self.io.store.republish(start_ms, end_ms, self.config.pending_max_rows)
        if result["rows"]:
            self.gateway.dispatcher.post(Source.QUEUE, "pending_refilled", {"top": result["top"]}, target="uplink")
        return result

    # -- archive functions for other components (any thread; waits for the I/O thread) --

    def archive_republish(self, start_ms: int, end_ms: int, timeout: float = 60.0) -> dict[str, Any]:
        return self._call(lambda: self._do_republish(start_ms, end_ms), timeout)

    def archive_discard(self, start_ms: int, end_ms: int, timeout: float = 60.0) -> dict[str, Any]:
        return self._call(lambda: self.io.store.discard(start_ms, end_ms), timeout)  # type: ignore[union-attr]

    def _call(self, fn: Callable[[], dict[str, Any]], timeout: float) -> dict[str, Any]:
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
                raise

        self.io.submit(run)
        return future.result(timeout)
