"""Inbound ThingsBoard messages: JSON in, plain events or settled requests out.

Runs on paho's network thread (called by ``MqttLink``). Requests the gateway
made (attribute requests, client RPCs, provisioning) are matched by request id
to the pending ``Completion``; an answer nobody waits for any more (it came
after the timeout) is posted as an event instead, so nothing is lost silently.
Malformed JSON is logged and dropped; well-formed JSON of the wrong shape is
checked by ``teg_fsm.engine.codec`` (a malformed field is logged by name and left
out, the rest goes through), so machines never see a wrong-typed field. The provisioning answer's
``credentialsValue`` is written to the token file here and removed before
anything is posted: secrets never reach the journal or the logs.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teg_fsm.adapters import tokens
from teg_fsm.engine import codec
from teg_fsm.engine.effects.mqtt import PROVISION_RESPONSE_TOPIC

log = logging.getLogger(__name__)

Post = Callable[[str, dict[str, Any]], None]

_ATTRIBUTES = "v1/devices/me/attributes"
_ATTRIBUTE_RESPONSE = "v1/devices/me/attributes/response/"
_RPC_REQUEST = "v1/devices/me/rpc/request/"
_RPC_RESPONSE = "v1/devices/me/rpc/response/"


class Inbound:
    """Routes one inbound message; keeps the pending request tables."""

    def __init__(self, post: Post, token_path: Path) -> None:
        self._post = post
        self._token_path = token_path
        self._lock = threading.Lock()
        self._ids = {"attributes": itertools.count(1), "rpc": itertools.count(1)}
        self._pending: dict[tuple[str, int], tuple[int, Any]] = {}  # (kind, id) -> (session, completion)
        # Shared attributes pushed while an attribute request is out: ThingsBoard may answer the
        # request from a snapshot taken before that push, and the answer must not undo it.
        self._pushed_since: dict[int, _Pushed] = {}
        # Set by the OTA component: takes v2/<fw|sw>/response/... and v2/fw/error (True when it did).
        self.chunk_sink: Callable[[str, bytes], bool] | None = None

    def expect(self, kind: str, session: int, completion: Any, shared_keys: tuple[str, ...] = ()) -> int:
        """Register a request before publishing it (the answer can beat publish())."""
        with self._lock:
            request_id = 0 if kind == "provision" else next(self._ids[kind])
            self._pending[(kind, request_id)] = (session, completion)
            if kind == "attributes":
                self._pushed_since[request_id] = _Pushed(frozenset(shared_keys))
        return request_id

    def forget(self, kind: str, request_id: int) -> Any:
        with self._lock:
            entry = self._pending.pop((kind, request_id), None)
            if kind == "attributes":
                self._pushed_since.pop(request_id, None)
        return entry[1] if entry else None

    def session_lost(self, session: int, reason: str) -> None:
        with self._lock:
            lost = [key for key, (number, _) in self._pending.items() if number == session]
            completions = [self._pending.pop(key)[1] for key in lost]
        for completion in completions:
            completion.fail(f"session lost before the answer: {reason}")

    def handle(self, session: int, topic: str, payload: bytes) -> None:
        # OTA chunks are raw bytes, not JSON: they go to the package download, if one runs.
        sink = self.chunk_sink
        if topic.startswith("v2/") and sink is not None and sink(topic, payload):
            return
        body = _decode(topic, payload)
        if body is _MALFORMED:
            return
        if topic == _ATTRIBUTES:
            self._shared_update(body)
        elif topic.startswith(_ATTRIBUTE_RESPONSE):
            self._answer("attributes", topic[len(_ATTRIBUTE_RESPONSE):], body)
        elif topic.startswith(_RPC_REQUEST):
            self._rpc_request(topic[len(_RPC_REQUEST):], body)
        elif topic.startswith(_RPC_RESPONSE):
            self._answer("rpc", topic[len(_RPC_RESPONSE):], body)
        elif topic == PROVISION_RESPONSE_TOPIC:
            self._provision_answer(body)
        else:
            log.warning("ignoring a message on unexpected topic %s", topic)

    def _shared_update(self, body: Any) -> None:
        checked = codec.shared_update_from_wire(body)
        for error in checked.errors:
            # The gateway's log reaches ThingsBoard as telemetry: the operator sees which field.
            log.error("shared-attribute update: %s; that part is ignored", error)
        if checked.data is not None:
            with self._lock:
                for pushed in self._pushed_since.values():
                    pushed.note(checked.data["values"], checked.data["deleted"])
            self._post("shared_attributes_updated", checked.data)

    def _rpc_request(self, raw_id: str, body: Any) -> None:
        checked = codec.rpc_request_from_wire(raw_id, body)
        if checked.data is None:
            log.warning("ignoring a malformed RPC request: %s", "; ".join(checked.errors))
            return
        self._post("rpc_requested", checked.data)

    def _answer(self, kind: str, raw_id: str, body: Any) -> None:
        request_id = _int_id(raw_id)
        if request_id is None:
            log.warning("ignoring a %s response with id %r", kind, raw_id)
            return
        with self._lock:
            pushed = self._pushed_since.get(request_id) if kind == "attributes" else None
        completion = self.forget(kind, request_id)
        if kind == "attributes":
            checked = codec.attributes_answer_from_wire(body)
            for error in checked.errors:
                log.error("attribute answer %d: %s; that attribute is ignored", request_id, error)
            result = _newest(checked.data or {}, pushed)
            event = "attributes_received"
        else:
            result = body
            event = "client_rpc_answered"
        if completion is None or not completion.succeed(result):
            self._post(event, {"request_id": request_id, **(result if kind == "attributes" else {"payload": body})})

    def _provision_answer(self, body: Any) -> None:
        if not isinstance(body, dict):
            log.warning("ignoring a provisioning answer that is not a JSON object")
            return
        secret = body.get("credentialsValue")
        result: dict[str, Any] = {
            "status": body.get("status"),
            "credentialsType": body.get("credentialsType"),
            "errorMsg": body.get("errorMsg"),
            "token_stored": False,
        }
        if result["status"] == "SUCCESS":
            if result["credentialsType"] != "ACCESS_TOKEN" or not isinstance(secret, str) or not secret:
                result["errorMsg"] = f"unsupported credentials type {result['credentialsType']!r} (need ACCESS_TOKEN)"
            else:
                try:
                    tokens.write_token(self._token_path, secret)
                    result["token_stored"] = True
                except OSError as exc:
                    result["errorMsg"] = f"cannot write the token file {self._token_path}: {exc.strerror}"
        completion = self.forget("provision", 0)
        if completion is None or not completion.succeed(result):
            self._post("provision_answered", result)


_MALFORMED = object()


def _decode(topic: str, payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8")) if payload else {}
    except (UnicodeDecodeError, ValueError) as exc:
        # The position is enough to debug; the payload may hold a secret.
        log.warning("ignoring malformed JSON on %s (%d bytes): %s", topic, len(payload), type(exc).__name__)
        return _MALFORMED


def _int_id(raw: str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None



class _Pushed:
    """The requested shared attributes pushed (set or deleted) since an attribute request went out."""

    def __init__(self, keys: frozenset[str]) -> None:
        self.keys = keys
        self.values: dict[str, Any] = {}
        self.deleted: set[str] = set()

    def note(self, values: dict[str, Any], deleted: list[str]) -> None:
        for key, value in values.items():
            if key in self.keys:
                self.values[key] = value
                self.deleted.discard(key)
        for key in deleted:
            if key in self.keys:
                self.values.pop(key, None)
                self.deleted.add(key)


def _newest(answer: dict[str, Any], pushed: _Pushed | None) -> dict[str, Any]:
    """The answer with the shared attributes pushed since the request laid over it: a push is newer."""
    if pushed is None or not (pushed.values or pushed.deleted):
        return answer
    shared = {k: v for k, v in (answer.get("shared") or {}).items() if k not in pushed.deleted}
    shared.update(pushed.values)
    return {**answer, "shared": shared}
