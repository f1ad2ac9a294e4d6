"""What the diagrams show, read from the machine classes' public API and source.

Transitions come from ``cls.states`` / ``state.transitions`` in the order the
library tries them; guard meanings from the guards' docstrings; the effects an
action emits from its source (``ast``), following ``self._helper()`` calls and
module-level helper functions (of the ``machines`` package or beside the caller), so nothing here is
a hand-maintained list.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
from statemachine.callbacks import CallbackGroup

from teg_fsm.engine.machine import GatewayMachine

_MACHINES_PACKAGE = "teg_fsm.machines."
from teg_fsm.engine.effects import Effect, Notify

REPO = Path(__file__).resolve().parents[2]
_ACTION_GROUPS = (CallbackGroup.VALIDATOR, CallbackGroup.BEFORE, CallbackGroup.ON, CallbackGroup.AFTER)
_NOT_GUARD_NAMES = frozenset({"and", "or", "not", "True", "False"})


@attrs.frozen
class Emission:
    """One effect an action may emit; for ``Notify`` also where it goes."""

    effect: str
    machine: str | None = None  # Notify target; None = broadcast
    event: str | None = None  # Notify event name; None = decided at run time

    def describe(self) -> str:
        if self.effect != Notify.__name__:
            return self.effect
        if self.event is None:
            return "Notify(decided at run time)"
        return f"Notify({self.machine or '*'}.{self.event})"


@attrs.frozen
class Row:
    """One transition for one event; rows come in the order python-statemachine tries them
    (the active state's transitions in declaration order, then its ancestors').
    """

    source: str
    event: str
    guards: tuple[str, ...]
    target: str
    internal: bool
    actions: tuple[str, ...]

    @property
    def drawn(self) -> bool:
        """Internal self-transitions are bookkeeping: table only, not the picture."""
        return not (self.internal and self.source == self.target)


@attrs.frozen
class Method:
    """A guard or action: what it means, where it is, what it emits."""

    name: str
    meaning: str
    location: str
    emissions: tuple[Emission, ...]


def rows(cls: type[GatewayMachine]) -> list[Row]:
    """Every transition of every state (nested ones too), in evaluation order.

    Within one state the library tries ``state.transitions`` in declaration
    order and takes the first whose guards hold; rows are grouped by state, then
    by event (first appearance), keeping that order inside each group. Inside a
    phase (a compound state) the active inner state's rows are tried before the
    phase's own, so a phase's rows come after those of its states.
    """
    found: list[Row] = []
    for state in _inner_states_first(cls):
        state_rows = [row for t in state.transitions if not t.initial for row in _transition_rows(cls, state, t)]
        first_seen = {event: i for i, event in reversed(list(enumerate(r.event for r in state_rows)))}
        found.extend(sorted(state_rows, key=lambda r: first_seen[r.event]))
    return found


def all_states(cls: type[GatewayMachine]) -> list[Any]:
    """Top-level states and, depth first, their children."""

    def walk(states: Any) -> Iterator[Any]:
        for state in states:
            yield state
            yield from walk(state.states)

    return list(walk(cls.states))


def _inner_states_first(cls: type[GatewayMachine]) -> list[Any]:
    """Every state, each compound state after its children (the order transitions are tried)."""

    def walk(states: Any) -> Iterator[Any]:
        for state in states:
            yield from walk(state.states)
            yield state

    return list(walk(cls.states))


def _transition_rows(cls: type[GatewayMachine], state: Any, transition: Any) -> Iterator[Row]:
    guards = tuple(str(spec) for spec in transition.cond)
    for event in transition.events:
        actions = tuple(_action_names(cls, transition, event.id))
        # A targetless transition (``s.to(None)``) runs its actions in the active
        # state with no exit or entry: for a reader it is an internal transition.
        targetless = transition.target is None
        target = state.id if targetless else transition.target.id
        yield Row(state.id, event.id, guards, target, targetless or bool(transition.internal), actions)


def _action_names(cls: type[GatewayMachine], transition: Any, event_id: str) -> Iterator[str]:
    for group in _ACTION_GROUPS:
        for spec in transition._specs:
            if spec.group != group or not _applies(spec, event_id):
                continue
            if not spec.is_convention or _lookup(cls, spec.attr_name) is not None:
                yield spec.attr_name


def _applies(spec: Any, event_id: str) -> bool:
    """Per-event convention callbacks (``on_<event>``) belong to their event only."""
    bound_event = getattr(spec.cond, "__self__", None)
    return bound_event is None or getattr(bound_event, "id", None) == event_id


def state_actions(cls: type[GatewayMachine], state: Any, kind: str) -> list[str]:
    """Entry (``kind="enter"``) or exit callbacks of ``state`` that the class defines."""
    specs = getattr(state, kind)
    return [s.attr_name for s in specs if not s.is_convention or _lookup(cls, s.attr_name) is not None]


def guard_names(guard: str) -> list[str]:
    """The methods a guard text names (``!x``, or an expression like ``a and not b``)."""
    return [n for n in re.findall(r"[A-Za-z_]\w*", guard) if n not in _NOT_GUARD_NAMES]


def describe(cls: type[GatewayMachine], name: str) -> Method:
    """Meaning (first docstring line), ``file:line`` and emitted effects of ``cls.<name>``."""
    func = _lookup(cls, name)
    if func is None:
        return _attribute(cls, name)
    doc = inspect.getdoc(func) or ""
    meaning = doc.strip().splitlines()[0] if doc.strip() else ""
    return Method(name, meaning, location(func), tuple(sorted(set(_emissions(cls, func, set())), key=_order)))


def _attribute(cls: type[GatewayMachine], name: str) -> Method:
    """A guard that is a data attribute: where it is first assigned and which methods assign it."""
    assigners: list[str] = []
    first = ""
    for owner in reversed(cls.__mro__):
        for attr_name, func in vars(owner).items():
            lines = _assignment_lines(func, name) if inspect.isfunction(func) else []
            if lines:
                assigners.append(attr_name)
                here = f"{location(func).rsplit(':', 1)[0]}:{lines[0]}"
                first = here if attr_name == "setup" or not first else first
    if not assigners:
        return Method(name, "(not found on the machine)", "", ())
    meaning = f"flag attribute, assigned by {', '.join(f'`{a}`' for a in dict.fromkeys(assigners))}"
    return Method(name, meaning, first, ())


def _assignment_lines(func: Callable[..., Any], name: str) -> list[int]:
    """File lines where ``func`` assigns ``self.<name>``."""
    start = inspect.getsourcelines(func)[1]
    found = []
    for node in ast.walk(_tree(func)):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        elements = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
        if any(_is_self_attribute(e, name) for e in elements):
            found.append(start + node.lineno - 1)
    return found


def _is_self_attribute(node: ast.expr, name: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == name
            and isinstance(node.value, ast.Name) and node.value.id == "self")


def location(func: Callable[..., Any]) -> str:
    source = Path(inspect.getsourcefile(func) or "")
    line = inspect.getsourcelines(func)[1]
    try:
        shown = source.resolve().relative_to(REPO)
    except ValueError:
        shown = Path(source.name)
    return f"{shown.as_posix()}:{line}"


def _order(emission: Emission) -> tuple[str, str, str]:
    return emission.effect, emission.machine or "", emission.event or ""


def _lookup(cls: type, name: str) -> Callable[..., Any] | None:
    try:
        attr = inspect.getattr_static(cls, name)
    except AttributeError:
        return None
    if isinstance(attr, property):
        attr = attr.fget
    if isinstance(attr, (staticmethod, classmethod)):
        attr = attr.__func__
    return attr if inspect.isfunction(attr) else None


def _emissions(cls: type[GatewayMachine], func: Callable[..., Any], seen: set[Any]) -> Iterator[Emission]:
    """Effects constructed by ``func`` or by the machine methods / helpers it calls."""
    if func.__code__ in seen:
        return
    seen.add(func.__code__)
    for call in _calls(func):
        callee = call.func
        for name in _dynamic_methods(cls, callee):
            yield from _emissions(cls, _lookup(cls, name), seen)  # type: ignore[arg-type]
        if isinstance(callee, ast.Attribute) and isinstance(callee.value, ast.Name) and callee.value.id == "self":
            method = _lookup(cls, callee.attr)
            if method is not None:
                yield from _emissions(cls, method, seen)
            continue
        resolved = _resolve(func, callee)
        if isinstance(resolved, type) and issubclass(resolved, Effect):
            yield _emission(cls, resolved, call)
        elif inspect.isfunction(resolved) and _ours(resolved, func):
            yield from _emissions(cls, resolved, seen)


def _ours(helper: Callable[..., Any], caller: Callable[..., Any]) -> bool:
    """Helpers worth reading: the ``machines`` package's, and those beside the caller."""
    return helper.__module__.startswith(_MACHINES_PACKAGE) or helper.__module__ == caller.__module__


def _dynamic_methods(cls: type, callee: ast.expr) -> list[str]:
    """For ``getattr(self, f"_took_{x}")(...)``: every method whose name has that prefix."""
    if not (isinstance(callee, ast.Call) and isinstance(callee.func, ast.Name) and callee.func.id == "getattr"):
        return []
    if len(callee.args) < 2 or not (isinstance(callee.args[0], ast.Name) and callee.args[0].id == "self"):
        return []
    name = callee.args[1]
    if not (isinstance(name, ast.JoinedStr) and name.values and isinstance(name.values[0], ast.Constant)):
        return []
    prefix = str(name.values[0].value)
    return [n for n in sorted(dir(cls)) if n.startswith(prefix) and _lookup(cls, n) is not None]


def _tree(func: Callable[..., Any]) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(func)))


def _calls(func: Callable[..., Any]) -> list[ast.Call]:
    return [node for node in ast.walk(_tree(func)) if isinstance(node, ast.Call)]


def _resolve(func: Callable[..., Any], callee: ast.expr) -> Any:
    """The object a call's callee names in ``func``'s module (``Name`` or ``module.Name``)."""
    if isinstance(callee, ast.Name):
        return func.__globals__.get(callee.id)
    if isinstance(callee, ast.Attribute) and isinstance(callee.value, ast.Name):
        return getattr(func.__globals__.get(callee.value.id), callee.attr, None)
    return None


def _emission(cls: type[GatewayMachine], effect: type[Effect], call: ast.Call) -> Emission:
    if not issubclass(effect, Notify):
        return Emission(effect.__name__)
    args = {kw.arg: kw.value for kw in call.keywords if kw.arg}
    return Emission(effect.__name__, _text(cls, args.get("machine")), _text(cls, args.get("name")))


def _text(cls: type[GatewayMachine], node: ast.expr | None) -> str | None:
    """A constant string argument, ``self.machine_name``, or None (broadcast / run time)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        if node.attr == "machine_name":
            return cls.machine_name
    return None


def machine_methods(cls: type[GatewayMachine]) -> list[str]:
    """Names of every action the machine runs: transition and entry/exit callbacks."""
    names = [a for row in rows(cls) for a in row.actions]
    for state in all_states(cls):
        names += state_actions(cls, state, "enter") + state_actions(cls, state, "exit")
    return list(dict.fromkeys(names))


def notifications(classes: list[type[GatewayMachine]]) -> list[tuple[str, str, str, str]]:
    """(from machine, event, to machine, action) for every ``Notify`` between machines.

    A ``Notify`` to no machine goes to every machine that declares the event. An
    event decided at run time is taken from the machine's ``notified_events()``
    declaration when it has one.
    """
    takers = {cls.machine_name: cls.takes() for cls in classes}
    found: set[tuple[str, str, str, str]] = set()
    for cls in classes:
        for action in machine_methods(cls):
            for emission in describe(cls, action).emissions:
                if emission.effect == Notify.__name__:
                    found.update(_edges(cls, action, emission, takers))
    return sorted(found)


def _edges(cls: type[GatewayMachine], action: str, emission: Emission,
           takers: dict[str, frozenset[str]]) -> set[tuple[str, str, str, str]]:
    pairs = [(emission.machine, emission.event)]
    if emission.event is None:
        declared = getattr(cls, "notified_events", None)
        pairs = list(declared()) if callable(declared) else [(emission.machine, "?")]
    edges = set()
    for machine, event in pairs:
        targets = [machine] if machine else [name for name, takes in takers.items() if event in takes]
        edges.update((cls.machine_name, event, target, action) for target in targets if target != cls.machine_name)
    return edges
