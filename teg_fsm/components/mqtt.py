"""The MQTT component: the link to ThingsBoard, its effect handlers, connection and provisioning.

Other components reach the link as ``gateway.components["mqtt"].link``; hot
paths publish with ``link.publish_async(topic, payload_bytes, qos, on_done)``
(see ``teg_fsm.adapters.mqtt_link``) instead of journaled ``Publish`` effects.
Register this component last: the link starts taking messages in ``start``.

Everything the gateway says on its own account (``Publish`` on the telemetry
or attributes topic, whichever machine emits it, and ``sys_info`` on every
connect) goes through the durable outbox (``teg_fsm.adapters.outbox``, reachable as
``gateway.components["mqtt"].outbox``): stored with strictly increasing ``ts``
per key, sent when connected, deleted on PUBACK. Such a ``Publish`` succeeds
once stored (``{"stored": true}``). Other topics (RPC answers) go out directly.

The machines' states reach ThingsBoard from here too: a dispatcher observer
(``teg_fsm.components.fsm_report.StateReporter``) turns every state change
into ``fsm_<machine>_state`` telemetry and ``fsm_<machine>`` client attributes,
through the same outbox, and says the current states again after a connect.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from teg_fsm import __version__
from teg_fsm.adapters import tokens
from teg_fsm.adapters.mqtt_link import DEVICE, PROVISION, MqttLink, OnDone
from teg_fsm.adapters.outbox import OUTBOX_TOPICS, Outbox
from teg_fsm.adapters.sys_info import read_sys_info
from teg_fsm.components.fsm_report import StateReporter
from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.effects import Log
from teg_fsm.engine.effects.mqtt import (
    ATTRIBUTES_REQUEST_TOPIC,
    ATTRIBUTES_TOPIC,
    CLIENT_RPC_REQUEST_TOPIC,
    PROVISION_REQUEST_TOPIC,
    PROVISION_RESPONSE_TOPIC,
    ClientRpc,
    Connect,
    Disconnect,
    Publish,
    RequestAttributes,
    Subscribe,
)
from teg_fsm.engine.effects.provisioning import CheckToken, MoveTokenAside, RequestProvisioning
from teg_fsm.engine.events import Source
from teg_fsm.engine.runner import Completion

if TYPE_CHECKING:
    from teg_fsm.app import Gateway
    from teg_fsm.config import Config

log = logging.getLogger(__name__)


def settle(completion: Completion) -> OnDone:
    """An ``on_done`` that settles an effect."""

    def on_done(ok: bool, error: str | None) -> None:
        if ok:
            completion.succeed(None)
        else:
            completion.fail(error or "failed")

    return on_done


def stored(completion: Completion) -> Callable[[str | None], None]:
    """The outbox's answer settles a ``Publish``: stored means it will reach ThingsBoard."""

    def on_stored(error: str | None) -> None:
        if error is None:
            completion.succeed({"stored": True})
        else:
            completion.fail(error)

    return on_stored


def connection_settings(config: Config) -> dict[str, Any]:
    """The connection machine's settings from the configuration (tools/bench_fleet.py simulates these)."""
    return {
        "min_s": config.reconnect_min_s,
        "max_s": config.reconnect_max_s,
        "jitter": config.reconnect_jitter,
        "can_provision": bool(config.provision_key and config.provision_secret),
        "client_attributes": {"teg_gateway": "TEG-FSM", "teg_version": __version__},
    }


class MqttComponent:
    """Wires ``MqttLink`` into the engine."""

    name = "mqtt"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        config = gateway.config
        self.config = config
        self.link = MqttLink(
            host=config.tb_host,
            port=config.tb_port,
            tls=config.tb_tls,
            ca_cert=config.ca_cert,
            token_path=config.token_path,
            post=self._link_event,
            protocol=config.mqtt_protocol,
        )
        self.outbox = Outbox(
            config.logs_buffer_db,
            max_payload_bytes=config.uplink_max_payload_bytes,
            rate_telemetry_messages=config.uplink_rate_telemetry_messages,
            rate_data_points=config.uplink_rate_data_points,
            now_ms=gateway.clock.now_ms,
        )
        # Registered before the dispatcher boots, so ``gateway_started`` is seen; the outbox
        # queues what it is told until its thread starts.
        dispatcher = gateway.dispatcher
        self.states = StateReporter(
            self.say, lambda: {name: m.state_name for name, m in dispatcher.machines.items()},
            interval_ms=int(config.fsm_report_interval_s * 1000))
        dispatcher.observers.append(self.states.observe)
        dispatcher.idle_hooks.append(lambda: self.states.flush(gateway.clock.now_ms()))

    def say(self, topic: str, payload: str, now_ms: int) -> None:
        """A report of the gateway's own (not a machine's ``Publish``): stored in the outbox, then sent."""
        self.outbox.say(topic, payload, now_ms, _unstored_logged(topic))

    def _link_event(self, name: str, data: dict[str, Any]) -> None:
        """From the link's threads: post to the machines; a connect also wakes the outbox."""
        self.gateway.dispatcher.post(Source.MQTT, name, data)
        if name == "mqtt_connected":
            self.outbox.say(ATTRIBUTES_TOPIC, json.dumps(read_sys_info()), self.gateway.clock.now_ms(),
                            lambda error: None)
            self.outbox.wake()

    def machine_specs(self) -> list[MachineSpec]:
        from teg_fsm.machines.connection import ConnectionMachine
        from teg_fsm.machines.provisioning import ProvisioningMachine

        config = self.config
        can_provision = bool(config.provision_key and config.provision_secret)
        backoff = {"min_s": config.reconnect_min_s, "max_s": config.reconnect_max_s}
        return [
            MachineSpec(ConnectionMachine, connection_settings(config)),
            MachineSpec(ProvisioningMachine, {**backoff, "can_provision": can_provision}),
        ]

    def install(self) -> None:
        self.outbox.open()
        register = self.gateway.runner.register
        register(Connect, self._connect)
        register(Disconnect, self._disconnect)
        register(Subscribe, self._subscribe)
        register(Publish, self._publish)
        register(RequestAttributes, self._request_attributes)
        register(ClientRpc, self._client_rpc)
        register(RequestProvisioning, self._request_provisioning)
        register(CheckToken, self._check_token)
        register(MoveTokenAside, self._move_token_aside)
        if not self.gateway.runner.handles(Log):  # the logs component, when present, forwards them too
            register(Log, _log_effect)

    def start(self) -> None:
        """Start the outbox; the connection machine asks for the first connect."""
        self.outbox.publish = self.link.publish_async
        self.outbox.online = lambda: self.link.device_session() is not None
        self.outbox.start()

    def quiesce(self, deadline: float) -> None:
        """Before the link closes: let the outbox's packet in flight get its PUBACK (until ``deadline``)."""
        self.outbox.quiesce(deadline)

    def stop(self) -> None:
        self.link.close()
        self.outbox.stop()

    # -- handlers (dispatcher thread; none of them blocks) -----------------

    def _connect(self, effect: Connect, completion: Completion) -> None:
        self.link.connect(PROVISION if effect.credentials == "provision" else DEVICE, completion)

    def _disconnect(self, effect: Disconnect, completion: Completion) -> None:
        self.link.close_current("disconnect requested")
        completion.succeed(None)

    def _subscribe(self, effect: Subscribe, completion: Completion) -> None:
        self.link.subscribe(tuple(effect.topics), settle(completion))

    def _publish(self, effect: Publish, completion: Completion) -> None:
        if effect.topic in OUTBOX_TOPICS:
            self.outbox.say(effect.topic, effect.payload, self.gateway.clock.now_ms(), stored(completion))
            return
        self.link.publish_async(effect.topic, effect.payload.encode("utf-8"), effect.qos, settle(completion))

    def _request_attributes(self, effect: RequestAttributes, completion: Completion) -> None:
        body = {}
        if effect.client_keys:
            body["clientKeys"] = ",".join(effect.client_keys)
        if effect.shared_keys:
            body["sharedKeys"] = ",".join(effect.shared_keys)
        self._request("attributes", ATTRIBUTES_REQUEST_TOPIC, body, completion, effect.shared_keys)

    def _client_rpc(self, effect: ClientRpc, completion: Completion) -> None:
        self._request("rpc", CLIENT_RPC_REQUEST_TOPIC, {"method": effect.method, "params": dict(effect.params)}, completion)

    def _request(self, kind: str, topic: str, body: dict[str, Any], completion: Completion,
                 shared_keys: tuple[str, ...] = ()) -> None:
        session = self.link.device_session()
        if session is None:
            completion.fail("not connected to ThingsBoard")
            return
        request_id = self.link.inbound.expect(kind, session.number, completion, tuple(shared_keys))

        def published(ok: bool, error: str | None) -> None:
            if not ok and self.link.inbound.forget(kind, request_id) is not None:
                completion.fail(error or "request not sent")

        self.link.publish_async(topic.format(request_id), json.dumps(body).encode(), 1, published, session)

    def _request_provisioning(self, effect: RequestProvisioning, completion: Completion) -> None:
        session = self.link.session
        if session is None or not session.connected or session.purpose != PROVISION:
            completion.fail("no open provision session")
            return
        config = self.config
        if not (config.provision_key and config.provision_secret):
            completion.fail("THINGSBOARD_PROVISION_DEVICE_KEY/SECRET are not set")
            return
        self.link.inbound.expect("provision", session.number, completion)
        body = {
            "deviceName": config.device_name,
            "provisionDeviceKey": config.provision_key,
            "provisionDeviceSecret": config.provision_secret,
        }

        def published(ok: bool, error: str | None) -> None:
            if not ok and self.link.inbound.forget("provision", 0) is not None:
                completion.fail(error or "provisioning request not sent")

        # SUBSCRIBE goes out before the PUBLISH on the same connection, so the
        # broker knows the subscription when the answer is routed.
        self.link.subscribe((PROVISION_RESPONSE_TOPIC,), lambda ok, error: None, session)
        self.link.publish_async(PROVISION_REQUEST_TOPIC, json.dumps(body).encode(), 1, published, session)

    def _check_token(self, effect: CheckToken, completion: Completion) -> None:
        completion.succeed({"present": tokens.token_present(self.config.token_path)})

    def _move_token_aside(self, effect: MoveTokenAside, completion: Completion) -> None:
        try:
            moved = tokens.move_aside(self.config.token_path)
        except OSError as exc:
            completion.fail(f"cannot move the rejected token file {self.config.token_path} aside: {exc.strerror}")
            return
        if moved is not None:
            log.warning("access token rejected by ThingsBoard; token file kept as %s", moved)
        completion.succeed({"moved_to": str(moved) if moved else None})


def _unstored_logged(topic: str) -> Callable[[str | None], None]:
    def on_stored(error: str | None) -> None:
        if error is not None:
            log.warning("a gateway report on %s was not stored: %s", topic, error)

    return on_stored


def _log_effect(effect: Log, completion: Completion) -> None:
    """A machine's report, into the gateway's log (logger ``teg.<machine>``)."""
    level = logging.getLevelName(effect.level.upper())
    machine = effect.id.partition(":")[0] or "machine"
    logging.getLogger(f"teg.{machine}").log(level if isinstance(level, int) else logging.INFO, effect.message)
    completion.succeed(None)
