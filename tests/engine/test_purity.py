"""Machines are sans-I/O: no module in machines/ imports the outside world."""

from __future__ import annotations

import ast
from pathlib import Path

from teg_fsm.cli.diagrams import machine_classes

FORBIDDEN = {"paho", "docker", "git", "sqlite3", "os", "time", "threading", "subprocess", "socket", "shutil", "pathlib", "random"}
MACHINES = Path(__file__).resolve().parents[2] / "machines"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_machine_module_imports_io_libraries() -> None:
    offenders = {
        path.name: sorted(_imports(path) & FORBIDDEN)
        for path in sorted(MACHINES.glob("*.py"))
        if _imports(path) & FORBIDDEN
    }
    assert offenders == {}


def test_machine_modules_import_only_pure_parts_of_teg_fsm() -> None:
    allowed = {"teg_fsm.machines", "teg_fsm.engine.machine", "teg_fsm.engine.effects", "teg_fsm.engine.events", "teg_fsm.engine.rate_limits"}
    offenders = {}
    for path in sorted(MACHINES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("teg_fsm"):
                if not any(node.module == a or node.module.startswith(a + ".") for a in allowed):
                    offenders.setdefault(path.name, []).append(node.module)
    assert offenders == {}


def test_every_machine_has_a_complete_resume_table() -> None:
    for cls in machine_classes():
        # Checkpoints store the active atomic state (a compound state is never stored).
        states = {s.id for s in cls.states_map.values() if s.is_atomic}
        assert set(cls.resume_table) == states, f"{cls.machine_name}: resume_table must cover {sorted(states)}"
        assert set(cls.resume_table.values()) <= states, cls.machine_name
        assert cls.rest_states <= states, cls.machine_name
        if cls.crash_loop_state is not None:
            assert cls.crash_loop_state in states, cls.machine_name
