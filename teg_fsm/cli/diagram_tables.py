"""The Markdown transition tables of ``diagrams/<machine>.md`` (see ``teg_fsm.cli.diagrams``).

Each table answers an auditor's question from the code: which transition is
taken (every row, internal ones too, in evaluation order), what a guard means
and where it is, and what an action emits.
"""

from __future__ import annotations

from collections.abc import Iterable

from teg_fsm.cli import diagram_model as model
from teg_fsm.engine.machine import GatewayMachine

EVALUATION_NOTE = (
    "Rows are in evaluation order. When an event arrives, the rows of the current state for that "
    "event are tried from top to bottom and **the first row whose guards all hold is taken**; the "
    "rows below it are not looked at. In a phase (a state that holds states) the rows of the inner "
    "state are tried first, then the phase's rows. An event with no row that holds is ignored. *internal* rows "
    "stay in the state without running its exit and entry actions; they are left out of the picture."
)


ACTIONS_NOTE = (
    "Effects an action emits, read from its source and the machine methods and helpers it calls "
    "(any branch). `Notify(m.e)` hands event `e` to machine `m`; `Notify(*.e)` to every machine that "
    "declares `e`."
)


def machine_tables(cls: type[GatewayMachine]) -> str:
    """Transitions, guards, actions and entry/exit actions of one machine, as Markdown."""
    rows = model.rows(cls)
    parts = ["## Transitions", "", EVALUATION_NOTE, "", *_transition_table(rows)]
    parts += ["", "## Guards", "", "`!guard` in a row means the guard must be false.", "", *_guard_table(cls, rows)]
    parts += ["", "## Actions", "", ACTIONS_NOTE, "", *_action_table(cls)]
    parts += ["", "## Entry and exit actions", "", *_state_table(cls)]
    return "\n".join(parts) + "\n"


def _transition_table(rows: list[model.Row]) -> list[str]:
    lines = ["| # | State | Event | Guards | Target | Actions |", "| --- | --- | --- | --- | --- | --- |"]
    for number, row in enumerate(rows, 1):
        target = f"{row.target} (internal)" if row.internal and row.target == row.source else row.target
        guards = ", ".join(f"`{g}`" for g in row.guards)
        actions = ", ".join(f"`{a}`" for a in row.actions)
        lines.append(f"| {number} | {row.source} | `{row.event}` | {guards} | {target} | {actions} |")
    return lines


def guard_methods(rows: Iterable[model.Row]) -> list[str]:
    """Every method a guard of ``rows`` calls, in order of first use."""
    return list(dict.fromkeys(name for row in rows for guard in row.guards for name in model.guard_names(guard)))


def _guard_table(cls: type[GatewayMachine], rows: list[model.Row]) -> list[str]:
    lines = ["| Guard | Meaning | Defined at |", "| --- | --- | --- |"]
    for name in guard_methods(rows):
        method = model.describe(cls, name)
        lines.append(f"| `{name}` | {_cell(method.meaning or '(no docstring)')} | {method.location} |")
    return lines


def _action_table(cls: type[GatewayMachine]) -> list[str]:
    lines = ["| Action | Emits | Meaning | Defined at |", "| --- | --- | --- | --- |"]
    for name in model.machine_methods(cls):
        method = model.describe(cls, name)
        emits = ", ".join(e.describe() for e in method.emissions) or "nothing"
        lines.append(f"| `{name}` | {emits} | {_cell(method.meaning)} | {method.location} |")
    return lines


def _state_table(cls: type[GatewayMachine]) -> list[str]:
    lines = ["| State | On entry | On exit |", "| --- | --- | --- |"]
    for state in model.all_states(cls):
        enter = ", ".join(f"`{a}`" for a in model.state_actions(cls, state, "enter"))
        leave = ", ".join(f"`{a}`" for a in model.state_actions(cls, state, "exit"))
        lines.append(f"| {state.id} | {enter} | {leave} |")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def overview_table(classes: list[type[GatewayMachine]]) -> str:
    """Every ``Notify`` one machine sends another, with the action that sends it."""
    lines = ["| From | Event | To | Sent by |", "| --- | --- | --- | --- |"]
    for source, event, target, action in model.notifications(classes):
        cls = next(c for c in classes if c.machine_name == source)
        lines.append(f"| {source} | `{event}` | {target} | `{action}` ({model.describe(cls, action).location}) |")
    return "\n".join(lines) + "\n"
