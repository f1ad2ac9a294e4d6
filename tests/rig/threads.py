"""What a thread of this process has been doing, from /proc (Linux)."""

from __future__ import annotations

import threading
from pathlib import Path


def voluntary_switches(thread: threading.Thread) -> int:
    """How often ``thread`` has blocked so far: each one is a wake-up later."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))
