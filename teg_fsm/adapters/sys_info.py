"""The ``sys_info`` client attribute, as the existing gateway publishes it on every connect.

Its dashboard's "OS state" card reads the fields ``btime``, ``procs_running``,
``processes`` and ``cpu`` from this attribute; they come from ``/proc/stat``:
boot time (unix seconds), runnable processes, processes created since boot,
and the aggregate ``cpu`` line's jiffies (user, nice, system, idle, iowait,
irq, softirq, steal, guest, guest_nice; as many as the kernel gives).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")
FIELDS = ("btime", "procs_running", "processes", "cpu")


def parse_proc_stat(text: str) -> dict[str, Any]:
    """The ``sys_info`` fields found in ``/proc/stat`` text; lines that do not parse are skipped."""
    info: dict[str, Any] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name not in FIELDS or name in info:
            continue
        numbers = rest.split()
        if not numbers or not all(n.isdigit() for n in numbers):
            continue
        info[name] = [int(n) for n in numbers] if name == "cpu" else int(numbers[0])
    return info


def read_sys_info(path: Path = PROC_STAT) -> dict[str, Any]:
    """``{"sys_info": {...}}``; without a readable ``/proc/stat``, the reason in ``error``."""
    try:
        return {"sys_info": parse_proc_stat(path.read_text(errors="replace"))}
    except OSError as exc:
        return {"sys_info": {"error": f"cannot read {path}: {exc.strerror or exc}"}}
