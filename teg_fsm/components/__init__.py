"""Components: an adapter plus its wiring (effect handlers, event sources, machines).

See docs/ENGINE.md for the contract. ``default_components`` is the one list the
composition root uses; order matters only for start-up (MQTT last, so every
handler is registered before the first message arrives).
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


def default_components(gateway: Gateway) -> list[Component]:
    """The gateway's components, in start order."""
    components: list[Component] = []
    from teg_fsm.components.uplink import UplinkComponent; components.append(UplinkComponent(gateway))  # noqa: E702, I001
    from teg_fsm.components.rpc import RpcComponent; components.append(RpcComponent(gateway))  # noqa: E702, I001
    from teg_fsm.components.file_sync import FileSyncComponent; components.append(FileSyncComponent(gateway))  # noqa: E702, I001
    from teg_fsm.components.ota import OtaComponent; components.append(OtaComponent(gateway))  # noqa: E702, I001
    from teg_fsm.components.controller import ControllerComponent; components.append(ControllerComponent(gateway))  # noqa: E702, I001
    from teg_fsm.components.mqtt import MqttComponent  # keep last: MQTT starts taking messages

    components.append(MqttComponent(gateway))
    return components
