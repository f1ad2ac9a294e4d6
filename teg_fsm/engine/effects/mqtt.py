"""Effects on the MQTT link to ThingsBoard (handled by the MQTT adapter)."""

from __future__ import annotations

import attrs

from teg_fsm.engine.effects import Effect

TELEMETRY_TOPIC = "v1/devices/me/telemetry"
ATTRIBUTES_TOPIC = "v1/devices/me/attributes"
ATTRIBUTES_REQUEST_TOPIC = "v1/devices/me/attributes/request/{}"
ATTRIBUTES_RESPONSE_FILTER = "v1/devices/me/attributes/response/+"
RPC_REQUEST_FILTER = "v1/devices/me/rpc/request/+"
RPC_RESPONSE_TOPIC = "v1/devices/me/rpc/response/{}"
CLIENT_RPC_REQUEST_TOPIC = "v1/devices/me/rpc/request/{}"
CLIENT_RPC_RESPONSE_FILTER = "v1/devices/me/rpc/response/+"
PROVISION_REQUEST_TOPIC = "/provision/request"
PROVISION_RESPONSE_TOPIC = "/provision/response"


@attrs.frozen(kw_only=True)
class Connect(Effect):
    """Open the MQTT session; ``username`` is the token or ``provision``.

    Ends succeeded on CONNACK 0, failed on a refused CONNACK (the result
    carries ``reason_code`` and ``not_authorized``) or a network error.
    ``credentials`` says where the username comes from: ``token_file`` (the
    adapter reads it, so the token never enters the journal) or ``provision``.
    """

    credentials: str = "token_file"


@attrs.frozen(kw_only=True)
class Disconnect(Effect):
    """Close the MQTT session cleanly."""


@attrs.frozen(kw_only=True)
class Subscribe(Effect):
    """Subscribe to topic filters at QoS 1."""

    topics: tuple[str, ...]


@attrs.frozen(kw_only=True)
class Publish(Effect):
    """Publish ``payload`` (JSON text); with QoS 1 it succeeds on PUBACK."""

    topic: str
    payload: str
    qos: int = 1


@attrs.frozen(kw_only=True)
class RequestAttributes(Effect):
    """Ask ThingsBoard for attributes; the adapter picks the request id.

    Succeeds with ``{"client": {...}, "shared": {...}}`` (sections may be
    empty) when the response arrives; give it a ``timeout_s``.
    """

    client_keys: tuple[str, ...] = ()
    shared_keys: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class ClientRpc(Effect):
    """A client-side RPC (e.g. ``getSessionLimits``); succeeds with the reply payload."""

    method: str
    params: dict[str, object] = attrs.field(factory=dict)
