"""provisioning: make sure an access token file exists, self-provisioning if needed.

At start (``gateway_started``) and whenever the connection machine asks
(``provisioning_requested``, after a missing or rejected token) the token
file is checked. Present: ``provisioned``, and the connection machine gets
``token_ready``. Absent with provisioning credentials: open a ``provision``
session, send the request (the adapter fills in the key and secret from the
configuration and writes the answer's token atomically, mode 0600) and wait
for the answer. NOT_FOUND, FAILURE, no answer or a lost session: close the
session, report ThingsBoard's errorMsg and retry after a backoff (exponential
from ``min_s``, capped at ``max_s``, with jitter), never a tight loop and
never an exit. Absent without credentials: ``unconfigured``, log it and look
again every ``recheck_s`` (an operator may drop a token file in place).

No secret passes through this machine: the effects name no token or secret,
and the answer it sees is ``{status, credentialsType, errorMsg, token_stored}``.

Events: ``gateway_started``, ``provisioning_requested``, ``check_*``,
``connect_*``, ``provision_*``, ``retry_elapsed``.
Effects: CheckToken, Connect(credentials="provision"), RequestProvisioning,
Disconnect, StartTimer, Notify(connection, token_ready), Log.
Persists: the retry step count. Resumes: every state re-enters ``starting``;
``gateway_started`` then checks the token file afresh.
"""

from __future__ import annotations

from typing import Any

import attrs
from statemachine import State

from teg_fsm.engine.effects import Log, Notify, StartTimer
from teg_fsm.engine.effects.mqtt import Connect, Disconnect
from teg_fsm.engine.effects.provisioning import CheckToken, RequestProvisioning
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine


@attrs.define
class ProvisioningSettings:
    min_s: float = 1.0
    max_s: float = 300.0
    factor: float = 2.0
    jitter: float = 0.2
    recheck_s: float = 60.0
    connect_timeout_s: float = 30.0
    answer_timeout_s: float = 30.0
    can_provision: bool = False


class ProvisioningMachine(GatewayMachine):
    """starting -> checking -> provisioned, or connecting -> requesting -> provisioned."""

    machine_name = "provisioning"
    settings_type = ProvisioningSettings
    resume_table = {
        "starting": "starting",
        "checking": "starting",
        "provisioned": "starting",
        "connecting": "starting",
        "requesting": "starting",
        "waiting_retry": "starting",
        "unconfigured": "starting",
    }
    rest_states = frozenset(resume_table)

    starting = State(initial=True)
    checking = State()
    provisioned = State()
    connecting = State()
    requesting = State()
    waiting_retry = State()
    unconfigured = State()

    gateway_started = starting.to(checking)
    provisioning_requested = provisioned.to(checking)
    check_succeeded = (
        checking.to(provisioned, cond="is_token_present")
        | checking.to(connecting, cond="can_provision")
        | checking.to(unconfigured)
    )
    check_failed = checking.to(waiting_retry)
    check_cancelled = checking.to(waiting_retry)  # only at shutdown
    # CheckToken carries no timeout_s, so it never ends timed_out.
    connect_succeeded = connecting.to(requesting)
    connect_failed = connecting.to(waiting_retry)
    connect_timed_out = connecting.to(waiting_retry)
    connect_cancelled = connecting.to(waiting_retry)
    provision_succeeded = requesting.to(provisioned, cond="is_token_stored") | requesting.to(waiting_retry)
    provision_failed = requesting.to(waiting_retry)
    provision_timed_out = requesting.to(waiting_retry)
    provision_cancelled = requesting.to(waiting_retry)
    retry_elapsed = waiting_retry.to(checking) | unconfigured.to(checking)

    def setup(self) -> None:
        self.attempts = 0

    # -- guards -----------------------------------------------------------

    def is_token_present(self, ev: Event) -> bool:
        """The token check found an access token on disk."""
        return bool((ev.data.get("result") or {}).get("present"))

    def can_provision(self) -> bool:
        """Settings allow provisioning a new token (provisioning credentials are configured)."""
        return bool(self.settings.can_provision)

    def is_token_stored(self, ev: Event) -> bool:
        """The provisioning reply's token was written to disk."""
        return bool((ev.data.get("result") or {}).get("token_stored"))

    # -- states -----------------------------------------------------------

    def on_enter_checking(self) -> None:
        self.emit(CheckToken(reply="check"))

    def on_enter_connecting(self) -> None:
        self._log("info", "no access token; provisioning this device with ThingsBoard")
        self.emit(Connect(credentials="provision", reply="connect", timeout_s=self.settings.connect_timeout_s))

    def on_enter_requesting(self) -> None:
        self.emit(RequestProvisioning(reply="provision", timeout_s=self.settings.answer_timeout_s))

    def on_enter_provisioned(self, ev: Event | None = None) -> None:
        if ev is not None and ev.name == "provision_succeeded":
            self.emit(Disconnect())
            self._log("info", "device provisioned; access token stored")
        if self.attempts:
            self.attempts = 0
            self.mark_dirty()
        self.emit(Notify(machine="connection", name="token_ready"))

    def on_enter_unconfigured(self) -> None:
        self._log(
            "error",
            "no access token file and no THINGSBOARD_PROVISION_DEVICE_KEY/SECRET; "
            f"looking for a token again in {self.settings.recheck_s:.0f} s",
        )
        self.emit(StartTimer(name="retry_elapsed", seconds=self.settings.recheck_s))

    def on_enter_waiting_retry(self, ev: Event | None = None) -> None:
        delay = min(self.settings.max_s, self.settings.min_s * self.settings.factor**self.attempts)
        if delay < self.settings.max_s:
            self.attempts += 1
            self.mark_dirty()
        if ev is not None and ev.name.startswith(("provision_", "connect_")):
            self.emit(Disconnect())  # the provision session, if it is still open
        self._log("warning", f"provisioning failed: {_reason(ev)}; retrying in about {delay:.0f} s")
        self.emit(StartTimer(name="retry_elapsed", seconds=delay, jitter=self.settings.jitter))

    def _log(self, level: str, message: str) -> None:
        self.emit(Log(level=level, message=f"provisioning: {message}"))

    # -- persistence ------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"attempts": self.attempts}

    def restore(self, data: Any) -> None:
        self.attempts = int(data.get("attempts", 0))


def _reason(ev: Event | None) -> str:
    """What went wrong, in ThingsBoard's words where it gave any."""
    if ev is None:
        return "unknown"
    result = ev.data.get("result")
    if isinstance(result, dict):
        if result.get("status") == "SUCCESS":
            return f"SUCCESS but the token could not be stored: {result.get('errorMsg')}"
        return f"ThingsBoard answered {result.get('status')}: {result.get('errorMsg')}"
    return str(ev.data.get("error", ev.name))
