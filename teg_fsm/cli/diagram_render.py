"""Graphviz DOT for the machines' pictures and the overview (see ``teg_fsm.cli.diagrams``).

A picture shows the policy: states, and one edge per pair of states whose
label lists the events (one per line, guards in brackets under them).
Internal self-transitions (bookkeeping) are left out; re-entering
self-transitions are listed in the state's box (\u21bb); big or shared
decisions become numbered choice points. The tables (``teg_fsm.cli.diagram_tables``)
list every row and are the authority on evaluation order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from teg_fsm.cli import diagram_model as model
from teg_fsm.engine.machine import GatewayMachine

FONT_PT = 14  # one size for state names and labels (graphviz points)
FONT = "Helvetica"
CHOICE_BRANCHES = 3  # a decision with this many guarded targets gets a choice point
SHARED_FROM = 3  # this many states with the same edge into one state share one drawn edge
_LEFT_BREAK = '<br align="left"/>'  # HTML-label line break, left-aligned
OUTCOMES = ("succeeded", "failed", "timed_out", "cancelled")


def machine_dot(cls: type[GatewayMachine], rankdir: str, tuning: str = "") -> str:
    """The machine as a DOT digraph; compound states become clusters."""
    layout = Layout(cls)
    lines = _header(cls.machine_name, rankdir, tuning)
    lines += ['  __start [shape=point, width=0.18, label=""];']
    lines += list(_state_lines(cls, cls.states, layout.loops, indent="  "))
    lines += [f'  "{choice}" [shape=diamond, label="", width=0.3, height=0.3];' for choice in layout.choices.values()]
    lines += [f'  "{node}" [shape=plain, label="{label}"];' for node, label in layout.from_any.items()]
    initial = _entry_node(cls.initial_state)
    lines.append(f"  __start -> {_id(initial)}{_cluster_attr('lhead', cls.initial_state)};")
    lines += [f"  {edge};" for edge in layout.edges]
    return "\n".join(lines + ["}", ""])


class Layout:
    """What the picture draws: edges, choice points, and self-transitions shown in the state box.

    A *choice point* (UML's diamond) stands for a decision with CHOICE_BRANCHES
    or more guarded targets, or one that several states share (the file_sync
    machine picks its next step the same way after every outcome).
    Its outgoing edges are numbered in evaluation order; the first whose
    guards hold is taken, ``else`` when none does.
    """

    def __init__(self, cls: type[GatewayMachine]) -> None:
        self.cls = cls
        self.loops: dict[str, list[model.Row]] = {}
        self.choices: dict[tuple[tuple[tuple[str, ...], str], ...], str] = {}
        self.from_any: dict[str, str] = {}
        self.edges: list[str] = []
        self._plan(self._decisions())

    def _decisions(self) -> dict[tuple[str, str], list[model.Row]]:
        """Drawn rows per (state, event), in evaluation order."""
        decisions: dict[tuple[str, str], list[model.Row]] = {}
        for row in model.rows(self.cls):
            if row.drawn:
                decisions.setdefault((row.source, row.event), []).append(row)
        return decisions

    def _plan(self, decisions: dict[tuple[str, str], list[model.Row]]) -> None:
        shared: dict[tuple[tuple[tuple[str, ...], str], ...], set[str]] = {}
        for (source, _), rows in decisions.items():
            shared.setdefault(_branches(rows), set()).add(source)
        merged: dict[tuple[str, str], list[model.Row]] = {}
        for (source, event), rows in decisions.items():
            branches = _branches(rows)
            if len(branches) >= CHOICE_BRANCHES or (len(branches) > 1 and len(shared[branches]) > 1):
                choice = self.choices.setdefault(branches, f"__choice{len(self.choices) + 1}")
                merged.setdefault((source, choice), []).append(attrs.evolve(rows[0], target=choice, guards=()))
                continue
            for row in rows:
                if row.source == row.target:
                    self.loops.setdefault(row.source, []).append(row)
                else:
                    merged.setdefault((row.source, row.target), []).append(row)
        self.edges = self._shared_edges(merged)
        for branches, choice in self.choices.items():
            # Branches that lead to the same state share one edge (its label lists them in order).
            conditions: dict[str, list[str]] = {}
            for number, branch in enumerate(branches, 1):
                conditions.setdefault(branch[1], []).append(_choice_condition(number, branch, len(branches)))
            self.edges += [self._choice_edge(choice, target, labels) for target, labels in conditions.items()]

    def _shared_edges(self, merged: dict[tuple[str, str], list[model.Row]]) -> list[str]:
        """One edge per (tail, head); the same label into the same head from SHARED_FROM or
        more states becomes one edge from a "from a, b, c" note (``swap_requested`` in every state)."""
        tails: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        for (tail, head), rows in merged.items():
            tails.setdefault((head, tuple(edge_label_lines(rows))), []).append(tail)
        edges = []
        for (tail, head), rows in merged.items():
            sharing = tails[(head, tuple(edge_label_lines(rows)))]
            if len(sharing) < SHARED_FROM:
                edges.append(self._edge(tail, head, rows))
            elif sharing[0] == tail:
                node = f"__from{len(self.from_any) + 1}"
                self.from_any[node] = _from_label(sharing)
                edges.append(self._edge(node, head, rows))
        return edges

    def _node(self, name: str) -> tuple[str, Any]:
        """(DOT node id, state or None) for a state id or a choice point."""
        if name not in self.cls.states_map:
            return f'"{name}"', None
        state = self.cls.states_map[name]
        return _id(_entry_node(state)), state

    def _edge(self, tail: str, head: str, rows: list[model.Row]) -> str:
        tail_id, tail_state = self._node(tail)
        head_id, head_state = self._node(head)
        clusters = _cluster_attr("ltail", tail_state) + _cluster_attr("lhead", head_state)
        label = "\\l".join(edge_label_lines(rows)).replace("\n", "\\l") + "\\l"
        return f'{tail_id} -> {head_id} [label="{label}"{clusters}]'

    def _choice_edge(self, choice: str, target: str, conditions: list[str]) -> str:
        head_id, head_state = self._node(target)
        clusters = _cluster_attr("lhead", head_state)
        label = "\\l".join(conditions)
        return f'"{choice}" -> {head_id} [label="{label}", style=dashed{clusters}]'


def _choice_condition(number: int, branch: tuple[tuple[str, ...], str], count: int) -> str:
    guards, _ = branch
    condition = f"[{' & '.join(guards)}]" if guards else "else"
    return f"{number}. {condition}" if number < count or guards else condition


def _from_label(states: list[str]) -> str:
    """``from a, b,\\l c`` wrapped three states a line."""
    lines = [", ".join(states[i:i + 3]) for i in range(0, len(states), 3)]
    return "from " + ",\\l ".join(lines) + "\\l"


def _branches(rows: list[model.Row]) -> tuple[tuple[tuple[str, ...], str], ...]:
    return tuple((row.guards, row.target) for row in rows)


def _header(name: str, rankdir: str, tuning: str = "") -> list[str]:
    """Graph defaults; ``tuning`` is extra graph attributes (``nslimit=5``)."""
    # ranksep 0.2: edge labels are ranks of their own and keep their room; 0.3 put ota.svg 3 % over the page budget
    return [
        f'digraph "{name}" {{',
        f'  graph [rankdir={rankdir}, {tuning + ", " if tuning else ""}compound=true, nodesep=0.15, ranksep=0.2, '
        f'fontname="{FONT}", fontsize={FONT_PT}, labeljust=l];',
        f'  node [shape=box, style=rounded, fontname="{FONT}", fontsize={FONT_PT}, margin="0.1,0.04", height=0.4];',
        # decorate: a leader line ties each label to its edge, so no label is ambiguous
        f'  edge [fontname="{FONT}", fontsize={FONT_PT}, arrowsize=0.7, decorate=true];',
    ]


def _state_lines(cls: type[GatewayMachine], states: Any, loops: dict[str, list[model.Row]],
                 indent: str) -> Iterator[str]:
    for state in states:
        if state.states:
            first = next((s for s in state.states if s.initial), state.states[0])
            yield f'{indent}subgraph "cluster_{state.id}" {{'
            yield f"{indent}  label={_state_label(state.id, loops.get(state.id, []))}; style=rounded;"
            yield f'{indent}  "__start_{state.id}" [shape=point, width=0.12, label=""];'
            yield from _state_lines(cls, state.states, loops, indent + "  ")
            yield f'{indent}  "__start_{state.id}" -> {_id(_entry_node(first))}{_cluster_attr("lhead", first)};'
            yield f"{indent}}}"
        else:
            shape = ", peripheries=2" if state.final else ""
            yield f"{indent}{_id(state)} [label={_state_label(state.id, loops.get(state.id, []))}{shape}];"


def _state_label(name: str, loops: list[model.Row]) -> str:
    """The state's name in bold; re-entering self-transitions under it, one per line (\u21bb)."""
    lines = [f"<b>{_html(name)}</b>"] + [f"\u21bb {_html(line)}" for line in edge_label_lines(loops)]
    text = _LEFT_BREAK.join(lines).replace("\n", _LEFT_BREAK)
    return f"<{text}{_LEFT_BREAK if loops else ''}>"



def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _entry_node(state: Any) -> Any:
    """The drawn node an edge into ``state`` points at (a compound's initial child)."""
    while state.states:
        state = next((s for s in state.states if s.initial), state.states[0])
    return state


def _id(state: Any) -> str:
    return f'"{state.id}"'


def _cluster_attr(name: str, state: Any) -> str:
    return f', {name}="cluster_{state.id}"' if state is not None and state.states else ""


def edge_label_lines(rows: list[model.Row]) -> list[str]:
    """One line per event and guard; events differing only in their last word are folded.

    ``fetch_failed``, ``fetch_timed_out`` -> ``fetch_{failed|timed_out}``; all
    four outcomes of a reply -> ``fetch_* (any outcome)``.
    """
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for row in rows:
        stem, last = _split_last(row.event)
        groups.setdefault((stem, row.guards), []).append(last)
    lines = []
    for (stem, guards), lasts in groups.items():
        lines.append(_fold(stem, lasts) + (f"\n [{' & '.join(guards)}]" if guards else ""))
    return lines


def _split_last(event: str) -> tuple[str, str]:
    for outcome in OUTCOMES:
        if event.endswith("_" + outcome):
            return event[: -len(outcome) - 1], outcome
    stem, _, last = event.rpartition("_")
    return (stem, last) if stem else (event, "")


def _fold(stem: str, lasts: list[str]) -> str:
    if lasts == [""]:
        return stem
    if len(lasts) == 1:
        return f"{stem}_{lasts[0]}"
    if sorted(lasts) == sorted(OUTCOMES):
        return f"{stem}_* (any outcome)"
    return f"{stem}_{{{'|'.join(lasts)}}}"


def overview_dot(classes: list[type[GatewayMachine]], rankdir: str, tuning: str = "") -> str:
    """Machines as nodes; one edge per pair listing the events one ``Notify``s to the other."""
    lines = _header("overview", rankdir, tuning)
    lines += [f'  "{cls.machine_name}";' for cls in classes]
    pairs: dict[tuple[str, str], list[str]] = {}
    for source, event, target, _ in model.notifications(classes):
        events = pairs.setdefault((source, target), [])
        if event not in events:
            events.append(event)
    for (source, target), events in pairs.items():
        label = "\\l".join(events) + "\\l"
        lines.append(f'  "{source}" -> "{target}" [label="{label}"];')
    return "\n".join(lines + ["}", ""])
