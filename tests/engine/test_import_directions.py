"""The packages show the architecture, and their imports keep to it.

machines -> engine (pure parts only); adapters -> engine; engine -> engine only;
components and the composition root wire everything; the cli sits on top. The
rules are read from the source with ``ast`` (imports under ``TYPE_CHECKING``
count too: a type-only cycle still ties two layers together for a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Which packages each layer may import from (prefix match on the dotted name).
ALLOWED = {
    "teg_fsm.engine": ("teg_fsm.engine",),
    "teg_fsm.machines": (
        "teg_fsm.machines",
        "teg_fsm.engine.machine",
        "teg_fsm.engine.events",
        "teg_fsm.engine.effects",
        "teg_fsm.engine.rate_limits",
    ),
    "teg_fsm.adapters": ("teg_fsm.engine", "teg_fsm.adapters", "teg_fsm.__version__"),
    "teg_fsm.config": ("teg_fsm.engine",),
    "teg_fsm.components": (
        "teg_fsm.engine",
        "teg_fsm.adapters",
        "teg_fsm.machines",
        "teg_fsm.components",
        "teg_fsm.config",
        "teg_fsm.app",
        "teg_fsm.__version__",
    ),
    "teg_fsm.app": ("teg_fsm.engine", "teg_fsm.adapters", "teg_fsm.machines", "teg_fsm.components", "teg_fsm.config"),
    "teg_fsm.cli": ("teg_fsm",),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "machines":
        parts = ["teg_fsm", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return [name for name in names if name.split(".")[0] in {"teg_fsm", "machines"}]


def _layer(module: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to ALLOWED in {__name__}")


def _sources() -> list[Path]:
    return sorted((REPO / "teg_fsm").rglob("*.py")) + sorted((REPO / "machines").rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    offenders: dict[str, list[str]] = {}
    for path in _sources():
        module = _module_name(path)
        if module == "teg_fsm" or _layer(module) != layer:
            continue
        for name in _imported(path):
            if not any(name == allowed or name.startswith(allowed + ".") for allowed in ALLOWED[layer]):
                offenders.setdefault(module, []).append(name)
    assert offenders == {}


def test_every_module_belongs_to_a_layer() -> None:
    for path in _sources():
        module = _module_name(path)
        if module != "teg_fsm":
            _layer(module)


def test_the_rules_catch_an_engine_module_importing_a_machine(tmp_path: Path) -> None:
    # The check itself must be able to fail: feed it a module that breaks the rule.
    bad = tmp_path / "bad.py"
    bad.write_text("from teg_fsm.machines.ota import OtaMachine\nimport teg_fsm.adapters.mqtt_link\n")
    names = _imported(bad)
    assert names == ["teg_fsm.machines.ota.OtaMachine", "teg_fsm.adapters.mqtt_link"]
    assert not any(n.startswith(a) for n in names for a in ALLOWED["teg_fsm.engine"])
