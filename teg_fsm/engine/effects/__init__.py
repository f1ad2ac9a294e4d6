"""Effect commands: what a machine asks the world to do.

Every effect is a frozen attrs class. ``reply`` names the outcome events: an
effect with ``reply="fetch"`` ends in exactly one of ``fetch_succeeded``,
``fetch_failed``, ``fetch_timed_out`` or ``fetch_cancelled``, addressed to the
machine that issued it. ``reply=None`` means the machine does not care how it
ends (the runner still settles it once, but posts nothing).

``id`` is filled in by the dispatcher as ``<machine>:<event seq>:<index>``, so
ids are deterministic and a replay issues the same ones.

Domain effects live in the submodules of this package (mqtt, queue, docker,
git, files); the engine's own effects are here.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class Effect:
    """Base of all effect commands."""

    id: str = ""
    reply: str | None = None
    timeout_s: float | None = None


@attrs.frozen(kw_only=True)
class StartTimer(Effect):
    """Fire event ``name`` at the issuing machine after ``seconds``.

    Restarting a timer of the same name replaces it. ``jitter`` is a fraction
    (0.2 = up to ±20 %) applied by the engine, so machines stay deterministic.
    """

    name: str
    seconds: float
    jitter: float = 0.0


@attrs.frozen(kw_only=True)
class CancelTimer(Effect):
    """Forget the issuing machine's timer ``name``; a pending firing is dropped."""

    name: str


@attrs.frozen(kw_only=True)
class CancelEffect(Effect):
    """Ask for a running effect to end as ``cancelled``."""

    effect_id: str


@attrs.frozen(kw_only=True)
class Log(Effect):
    """A gateway log record (also forwarded to ThingsBoard by the uplink)."""

    level: str
    message: str


@attrs.frozen(kw_only=True)
class Notify(Effect):
    """Post event ``name`` with ``data`` to another machine (hand-over).

    ``machine=None`` broadcasts to every machine that declares ``name``.
    """

    machine: str | None
    name: str
    data: dict[str, Any] = attrs.field(factory=dict)


def all_effect_types() -> dict[str, type[Effect]]:
    """Every concrete effect class by name, including the domain submodules."""
    import importlib
    import pkgutil
    import sys

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, type[Effect]] = {}
    pending: list[type[Effect]] = [Effect]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            # attrs' slotted classes replace the class they were built from; the
            # discarded original lingers in __subclasses__ until collected.
            if getattr(sys.modules[sub.__module__], sub.__qualname__, None) is not sub:
                continue
            if sub.__name__ in found and found[sub.__name__] is not sub:
                raise TypeError(f"two effect classes named {sub.__name__}")
            found[sub.__name__] = sub
            pending.append(sub)
    return found
