"""Machine images: all of a machine's own data as JSON, for journal snapshots.

A checkpoint (``snapshot()``) holds what a machine needs to *resume* after a
restart, through its resume table. Replaying from the middle of a journal needs
more: the machine exactly as it was between two events, in-memory bookkeeping
included (the OTA machine's ``ready``, the uplink's packets in flight), or the
events that follow would meet another machine. An image is that: every
attribute the machine set itself (not the state-chart library's, not the
outbox) and its current state, encoded as tagged JSON.

What can be encoded: JSON values, tuples, sets, dicts with any keys, enums, and
instances (attrs, slotted or plain) of classes defined in ``teg_fsm``. Decoding
creates only classes of ``teg_fsm`` (never imports anything else), so a journal
from elsewhere cannot make ``teg replay`` run foreign code. A machine holding
anything else has no image (``ImageError``); replay then does not vouch for it
until the next ``gateway_started``.
"""

from __future__ import annotations

import enum
from importlib import import_module
from typing import Any

from teg_fsm.engine.machine import GatewayMachine

_PACKAGE = "teg_fsm."
_TAG = "__image__"
# Instance attributes of the engine base and of python-statemachine, not machine data.
_NOT_DATA = frozenset({
    "settings", "outbox", "transition_log", "dirty", "model", "history_values", "state_field",
    "start_configuration_values", "_callbacks", "_config", "_listeners", "_engine",
    # the engine's own per-instance wiring (machine.py): a transition listener, an event index
    "_recorder", "_event_names",
})


class ImageError(ValueError):
    """A value that an image cannot hold, or an image that does not decode."""


def machine_image(machine: GatewayMachine) -> dict[str, Any]:
    """``{"state": ..., "fields": {...}}``: the machine's state and all its own data."""
    from statemachine.state import InstanceState  # the library's per-instance state handles

    fields = {
        name: _encode(value, name)
        for name, value in sorted(vars(machine).items())
        if name not in _NOT_DATA and not isinstance(value, InstanceState)
    }
    return {"state": machine.state_name, "fields": fields}


def restore_image(machine: GatewayMachine, image: dict[str, Any]) -> None:
    """Put the machine exactly where the image says (state and data)."""
    fields = {name: _decode(value) for name, value in image["fields"].items()}
    for name, value in fields.items():
        setattr(machine, name, value)
    machine.place(image["state"])


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return {_TAG: "enum", "cls": _class_path(type(value), where), "value": _encode(value.value, where)}
    if isinstance(value, list):
        return [_encode(v, f"{where}[]") for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {_TAG: "tuple", "items": [_encode(v, f"{where}[]") for v in value]}
    if isinstance(value, (set, frozenset)):
        items = sorted((_encode(v, f"{where}{{}}") for v in value), key=repr)
        return {_TAG: type(value).__name__, "items": items}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: _encode(v, f"{where}.{k}") for k, v in value.items()}
        return {_TAG: "map", "items": [[_encode(k, where), _encode(v, f"{where}.{k}")] for k, v in value.items()]}
    return {_TAG: "object", "cls": _class_path(type(value), where),
            "fields": {k: _encode(v, f"{where}.{k}") for k, v in _instance_fields(value, where).items()}}


def _instance_fields(value: Any, where: str) -> dict[str, Any]:
    if hasattr(value, "__dict__"):
        return dict(vars(value))
    slots = [s for cls in type(value).__mro__ for s in getattr(cls, "__slots__", ())]
    if not slots:
        raise ImageError(f"{where}: {type(value).__name__} has neither __dict__ nor __slots__")
    return {s: getattr(value, s) for s in slots if s != "__weakref__" and hasattr(value, s)}


def _class_path(cls: type, where: str) -> str:
    if not cls.__module__.startswith(_PACKAGE):
        raise ImageError(f"{where}: a {cls.__module__}.{cls.__qualname__} is not machine data an image can hold")
    return f"{cls.__module__}:{cls.__qualname__}"


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: _decode(v) for k, v in value.items()}
    if tag == "tuple":
        return tuple(_decode(v) for v in value["items"])
    if tag in ("set", "frozenset"):
        items = [_decode(v) for v in value["items"]]
        return set(items) if tag == "set" else frozenset(items)
    if tag == "map":
        return {_hashable(_decode(k)): _decode(v) for k, v in value["items"]}
    if tag == "enum":
        return _load(value["cls"])(_decode(value["value"]))
    if tag == "object":
        obj = object.__new__(_load(value["cls"]))
        for name, field in value["fields"].items():
            object.__setattr__(obj, name, _decode(field))  # frozen attrs classes too
        return obj
    raise ImageError(f"unknown image tag {tag!r}")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    if not module.startswith(_PACKAGE):
        raise ImageError(f"an image may only name classes of teg_fsm, not {path!r}")
    target: Any = import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    if not isinstance(target, type):
        raise ImageError(f"{path!r} is not a class")
    return target
