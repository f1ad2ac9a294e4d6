"""Components: an adapter plus its wiring (effect handlers, event sources, machines).

See docs/ENGINE.md for the contract. The composition root (teg_fsm/app.py)
lists the gateway's components in ``default_components``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from teg_fsm.app import Gateway
    from teg_fsm.engine.dispatcher import MachineSpec


class Component(Protocol):
    name: str

    def machine_specs(self) -> list[MachineSpec]: ...

    def install(self) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...
