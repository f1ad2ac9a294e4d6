"""connection: the device session to ThingsBoard (offline -> connecting -> online -> backoff).

The machine decides when to connect; the MQTT adapter never reconnects by
itself. It starts ``offline`` and waits for the provisioning machine to say
the token file is ready (``token_ready``). A lost or failed connection waits
in ``backoff`` (exponential from ``min_s`` by ``factor``, capped at ``max_s``,
±``jitter`` applied by the engine's timer) and tries again; the step count
only resets after a session that stayed up ``stable_after_s``, so a server
that accepts and drops at once cannot cause a tight loop. CONNACK "not
authorized" goes to ``credentials_rejected``: with provisioning credentials
the rejected token file is moved aside (kept) in ``handing_over`` and
provisioning takes over; without them the machine retries every ``max_s``.
A missing token file also hands over to provisioning.

On every connect, in order: subscribe to the RPC and attribute topics,
request the OTA and FILES shared attributes (the answer is broadcast as
``shared_attributes_received``), publish the gateway's client attributes and
ask for ``getSessionLimits`` (the answer is broadcast as
``session_limits_received``; no answer means "keep the configured limits").

Events: ``token_ready`` (from provisioning), ``connect_*``, ``mqtt_disconnected``
{session, reason}, ``retry_elapsed``, ``move_aside_*``, ``subscribe_*``,
``shared_request_*``, ``shared_request_due``, ``limits_*``.
Effects: Connect, Subscribe, RequestAttributes, Publish, ClientRpc,
MoveTokenAside, StartTimer, Notify (provisioning_requested,
shared_attributes_received, session_limits_received), Log.
Persists: the backoff step count. Resumes: every state re-enters ``offline``
(a session does not survive a restart) and waits for ``token_ready``.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from statemachine import State

from teg_fsm.engine.effects import Log, Notify, StartTimer
from teg_fsm.engine.effects.mqtt import (
    ATTRIBUTES_RESPONSE_FILTER,
    ATTRIBUTES_TOPIC,
    CLIENT_RPC_RESPONSE_FILTER,
    RPC_REQUEST_FILTER,
    ClientRpc,
    Connect,
    Publish,
    RequestAttributes,
    Subscribe,
)
from teg_fsm.engine.effects.provisioning import MoveTokenAside
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine

TOPICS = (RPC_REQUEST_FILTER, ATTRIBUTES_TOPIC, ATTRIBUTES_RESPONSE_FILTER, CLIENT_RPC_RESPONSE_FILTER)
# sw_size too: after a restart or reconnect the OTA machine learns the package's size from this
# answer alone, and refuses one larger than the free disk before the first chunk (ota_rules.package_of).
SHARED_KEYS = (
    "sw_title", "sw_version", "sw_url", "sw_checksum", "sw_checksum_algorithm", "sw_size",
    "sf_title", "sf_version", "FILES",
)
LIMIT_KEYS = ("maxPayloadSize", "maxInflightMessages", "rateLimits")


@attrs.define
class ConnectionSettings:
    min_s: float = 1.0
    max_s: float = 300.0
    factor: float = 2.0
    jitter: float = 0.2
    stable_after_s: float = 60.0
    connect_timeout_s: float = 30.0
    request_timeout_s: float = 30.0
    limits_timeout_s: float = 70.0  # TB < 3.8 answers {"error": "timeout"} after 60 s
    can_provision: bool = False
    client_attributes: dict[str, Any] = attrs.Factory(dict)


class ConnectionMachine(GatewayMachine):
    """offline -> connecting -> online; backoff, credentials_rejected, handing_over."""

    machine_name = "connection"
    settings_type = ConnectionSettings
    resume_table = {
        "offline": "offline",
        "connecting": "offline",
        "online": "offline",
        "backoff": "offline",
        "credentials_rejected": "offline",
        "handing_over": "offline",
    }
    rest_states = frozenset(resume_table)

    offline = State(initial=True)
    connecting = State()
    online = State()
    backoff = State()
    credentials_rejected = State()
    handing_over = State()

    token_ready = offline.to(connecting) | credentials_rejected.to(connecting)
    connect_succeeded = connecting.to(online)
    connect_failed = (
        connecting.to(handing_over, cond=["is_not_authorized", "can_provision"])
        | connecting.to(credentials_rejected, cond="is_not_authorized")
        | connecting.to(offline, cond="is_token_missing")
        | connecting.to(backoff)
    )
    connect_timed_out = connecting.to(backoff)
    connect_cancelled = connecting.to(backoff)  # only at shutdown; backoff is harmless then
    mqtt_disconnected = online.to(backoff, cond="is_current_session")
    retry_elapsed = backoff.to(connecting) | credentials_rejected.to(connecting)
    move_aside_succeeded = handing_over.to(offline)
    move_aside_failed = handing_over.to(credentials_rejected)
    move_aside_cancelled = handing_over.to(credentials_rejected)  # only at shutdown
    # MoveTokenAside carries no timeout_s, so it never ends timed_out.

    # Outcomes of the on-connect work: handled while online; if the session
    # is gone they arrive in another state and are dropped on purpose.
    subscribe_succeeded = online.to.itself(internal=True)
    subscribe_failed = online.to.itself(internal=True)
    subscribe_timed_out = online.to.itself(internal=True)
    subscribe_cancelled = online.to.itself(internal=True)
    shared_request_succeeded = online.to.itself(internal=True)
    shared_request_failed = online.to.itself(internal=True)
    shared_request_timed_out = online.to.itself(internal=True)
    shared_request_cancelled = online.to.itself(internal=True)
    shared_request_due = online.to.itself(internal=True)
    limits_succeeded = online.to.itself(internal=True)
    limits_failed = online.to.itself(internal=True)
    limits_timed_out = online.to.itself(internal=True)
    limits_cancelled = online.to.itself(internal=True)

    def setup(self) -> None:
        self.attempts = 0
        self.session: int | None = None
        self.online_since_ms = 0

    # -- guards -----------------------------------------------------------

    def is_not_authorized(self, ev: Event) -> bool:
        """The broker refused the connection as not authorised (bad or revoked token)."""
        return bool(ev.data.get("not_authorized"))

    def can_provision(self) -> bool:
        """Settings allow provisioning a new token (provisioning credentials are configured)."""
        return bool(self.settings.can_provision)

    def is_token_missing(self, ev: Event) -> bool:
        """The connection attempt failed because there is no access token to connect with."""
        return bool(ev.data.get("no_token"))

    def is_current_session(self, ev: Event) -> bool:
        """The event belongs to the current MQTT session, not to an earlier one."""
        return ev.data.get("session") == self.session

    # -- states -----------------------------------------------------------

    def on_enter_connecting(self) -> None:
        self.emit(Connect(credentials="token_file", reply="connect", timeout_s=self.settings.connect_timeout_s))

    def on_connect_succeeded(self, ev: Event) -> None:
        self.session = (ev.data.get("result") or {}).get("session")
        self.online_since_ms = self.now_ms

    def on_enter_online(self) -> None:
        self.emit(
            Subscribe(topics=TOPICS, reply="subscribe", timeout_s=self.settings.request_timeout_s),
            self._shared_request(),
            Publish(topic=ATTRIBUTES_TOPIC, payload=json.dumps(self.settings.client_attributes, sort_keys=True)),
            ClientRpc(method="getSessionLimits", reply="limits", timeout_s=self.settings.limits_timeout_s),
        )

    def on_mqtt_disconnected(self, ev: Event) -> None:
        if self.now_ms - self.online_since_ms >= self.settings.stable_after_s * 1000:
            self.attempts = 0  # a session that held up earns a fast first retry
            self.mark_dirty()
        self.session = None

    def on_connect_failed(self, ev: Event) -> None:
        self._log("warning", f"connecting to ThingsBoard failed: {ev.data.get('error')}")

    def on_connect_timed_out(self, ev: Event) -> None:
        self._log("warning", f"connecting to ThingsBoard timed out: {ev.data.get('error')}")

    def on_enter_backoff(self) -> None:
        delay = min(self.settings.max_s, self.settings.min_s * self.settings.factor**self.attempts)
        if delay < self.settings.max_s:
            self.attempts += 1
            self.mark_dirty()
        self.emit(StartTimer(name="retry_elapsed", seconds=delay, jitter=self.settings.jitter))

    def on_enter_credentials_rejected(self) -> None:
        hint = "" if self.settings.can_provision else " and no provisioning credentials are configured"
        self._log("error", f"ThingsBoard rejected the access token{hint}; retrying in {self.settings.max_s:.0f} s")
        self.emit(StartTimer(name="retry_elapsed", seconds=self.settings.max_s, jitter=self.settings.jitter))

    def on_enter_handing_over(self) -> None:
        self.emit(MoveTokenAside(reply="move_aside"))

    def on_enter_offline(self, ev: Event | None = None) -> None:
        # Entered at start (wait for provisioning) or after a hand-over: ask
        # provisioning to look again, now that the token is gone or rejected.
        if ev is not None and ev.name in ("move_aside_succeeded", "connect_failed"):
            self.emit(Notify(machine="provisioning", name="provisioning_requested", data={"reason": ev.name}))

    # -- on-connect work --------------------------------------------------

    def _shared_request(self) -> RequestAttributes:
        return RequestAttributes(shared_keys=SHARED_KEYS, reply="shared_request", timeout_s=self.settings.request_timeout_s)

    def on_subscribe_failed(self, ev: Event) -> None:
        self._log("error", f"subscribing to the RPC and attribute topics failed: {ev.data.get('error')}")

    def on_subscribe_timed_out(self, ev: Event) -> None:
        self._log("error", "subscribing to the RPC and attribute topics timed out")

    def on_shared_request_succeeded(self, ev: Event) -> None:
        result = ev.data.get("result") or {}
        data = {"client": result.get("client") or {}, "shared": result.get("shared") or {}}
        self.emit(Notify(machine=None, name="shared_attributes_received", data=data))

    def on_shared_request_failed(self, ev: Event) -> None:
        self._retry_shared_request(ev)

    def on_shared_request_timed_out(self, ev: Event) -> None:
        self._retry_shared_request(ev)

    def _retry_shared_request(self, ev: Event) -> None:
        self._log("warning", f"requesting the shared attributes failed ({ev.data.get('error')}); asking again")
        self.emit(StartTimer(name="shared_request_due", seconds=self.settings.request_timeout_s, jitter=self.settings.jitter))

    def on_shared_request_due(self) -> None:
        self.emit(self._shared_request())

    def on_limits_succeeded(self, ev: Event) -> None:
        answer = ev.data.get("result")
        if not isinstance(answer, dict) or "error" in answer or not any(k in answer for k in LIMIT_KEYS):
            self._log("info", f"getSessionLimits not answered ({answer!r:.80}); keeping the configured limits")
            return
        limits = {key: answer.get(key) for key in LIMIT_KEYS}
        if not isinstance(limits["rateLimits"], dict):
            limits["rateLimits"] = {}
        self.emit(Notify(machine=None, name="session_limits_received", data=limits))

    def on_limits_timed_out(self) -> None:
        self._log("info", "getSessionLimits got no answer (ThingsBoard < 3.8?); keeping the configured limits")

    def _log(self, level: str, message: str) -> None:
        self.emit(Log(level=level, message=f"connection: {message}"))

    # -- persistence ------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"attempts": self.attempts}

    def restore(self, data: Any) -> None:
        self.attempts = int(data.get("attempts", 0))
