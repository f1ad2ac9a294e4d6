"""The file sync component: the files adapter wired to the engine and the MQTT link.

The ``file_sync`` machine decides; ``FileStore`` (``teg_fsm/adapters/files.py``) touches
the disk. Mirrors are published on the MQTT link directly (file contents stay
out of the journal) and wait for their PUBACK, so the effect's result says what
reached ThingsBoard.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from teg_fsm.adapters.files import FileStore
from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.effects.files import MirrorFiles, ScanFiles, WriteFile

if TYPE_CHECKING:
    from teg_fsm.app import Gateway

PUBACK_WAIT_S = 10.0


class FileSyncComponent:
    """Remote file management (FILES / FILE_CONTENT_ / FILE_HASHES / FILE_READ_)."""

    name = "file_sync"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        config = gateway.config
        self.store = FileStore(
            config.controller_data_path,
            config.file_allowed_roots,
            self._publish,
            max_packet_bytes=config.uplink_max_payload_bytes,
        )

    def machine_specs(self) -> list[MachineSpec]:
        from teg_fsm.machines.file_sync import FileSyncMachine

        return [MachineSpec(FileSyncMachine, {"check_interval_s": self.gateway.config.file_check_interval_s})]

    def install(self) -> None:
        register = self.gateway.runner.register
        register(ScanFiles, self.store.handle_scan, blocking=True)
        register(WriteFile, self.store.handle_write, blocking=True)
        register(MirrorFiles, self.store.handle_mirror, blocking=True)

    def start(self) -> None:
        """No event source of its own: the check timer belongs to the machine."""

    def stop(self) -> None:
        """Nothing to stop; a write in progress finishes or leaves the old file (atomic)."""

    def _publish(self, topic: str, payload: str) -> str | None:
        """Publish at QoS 1 and wait for the PUBACK (runs on a worker thread)."""
        mqtt = self.gateway.components.get("mqtt")
        link = getattr(mqtt, "link", None)
        if link is None:
            return "no MQTT link"
        done = threading.Event()
        outcome: list[str | None] = []

        def on_done(ok: bool, error: str | None) -> None:
            outcome.append(None if ok else error or "not acknowledged")
            done.set()

        link.publish_async(topic, payload.encode("utf-8"), 1, on_done)
        if not done.wait(PUBACK_WAIT_S):
            return f"no PUBACK within {PUBACK_WAIT_S:.0f} s"
        return outcome[0]
