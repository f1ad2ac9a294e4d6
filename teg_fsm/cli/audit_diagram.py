"""A machine's diagram with the transitions of an audit window highlighted and counted.

The picture is the one ``teg diagrams`` draws (same DOT, same layout choice);
taken edges are recoloured and labelled "taken N×", states the machine was in
are filled, the state it ended in is outlined. A transition maps to what the
picture draws for it: its edge, the two halves through a choice point, the
edge from a shared "from a, b, c" note, or, for a drawn self-transition, the
state's box (↻ lines). Internal self-transitions are not drawn (they are
bookkeeping) and are only counted in the report's table.

Only the machine class and integers go into the DOT: nothing from the journal
is ever written into the picture, so it needs no escaping.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable

from teg_fsm.cli import diagram_model as model
from teg_fsm.cli.diagram_render import Layout, machine_dot
from teg_fsm.engine.machine import GatewayMachine

TAKEN = "#d9480f"  # edges taken in the window
VISITED_FILL = "#fff4e6"  # states the machine was in
_EDGE = re.compile(r'^("[^"]+"|\w+) -> ("[^"]+"|\w+) \[')
_LABEL = re.compile(r"label=<(.*)>(?=[\],])")
DOT_TIMEOUT_S = 30


def highlighted_svg(
    cls: type[GatewayMachine],
    counts: dict[tuple[str, str, str], int],
    visited: Iterable[str],
    end_state: str | None,
) -> str | None:
    """The SVG (no XML prolog), or None when graphviz ``dot`` is missing or fails."""
    from teg_fsm.cli import diagrams

    if not diagrams.svg_available():
        return None
    try:
        picture = diagrams.draw(cls.machine_name, lambda r, t: machine_dot(cls, r, t))
        dot = highlighted_dot(cls, picture.dot, counts, visited, end_state)
        svg = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, check=True,
                             timeout=DOT_TIMEOUT_S).stdout.decode()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    svg = re.sub(r"^\s*<\?xml[^>]*\?>\s*", "", svg)
    svg = re.sub(r"^\s*<!DOCTYPE[^>]*>\s*", "", svg)
    return re.sub(r"<!--.*?-->\s*", "", svg, flags=re.S)


def highlighted_dot(
    cls: type[GatewayMachine],
    dot: str,
    counts: dict[tuple[str, str, str], int],
    visited: Iterable[str],
    end_state: str | None,
) -> str:
    """``dot`` (as ``machine_dot`` wrote it) with the taken edges and visited states marked."""
    layout = Layout(cls)
    edge_counts: dict[str, int] = {}
    loop_counts: dict[str, int] = {}
    drawn = [row for row in model.rows(cls) if row.drawn]
    for (source, event, target), count in counts.items():
        if source == target:
            if any(r.source == source and r.event == event and r.target == target for r in drawn):
                node = _node_id(cls, source)
                loop_counts[node] = loop_counts.get(node, 0) + count
            continue
        for edge in _edges_for(cls, layout, drawn, source, event, target):
            edge_counts[edge] = edge_counts.get(edge, 0) + count
    nodes = {_node_id(cls, s) for s in visited if s in cls.states_map}
    end = _node_id(cls, end_state) if end_state in cls.states_map else None
    lines = []
    for line in dot.splitlines():
        body = line.strip().rstrip(";")
        if body in edge_counts:
            line = line.replace(body, _mark_edge(body, edge_counts[body]))
        else:
            node = _node_of(body)
            if node is not None and (node in nodes or node in loop_counts or node == end):
                line = line.replace(body, _mark_node(body, loop_counts.get(node, 0), node == end))
        lines.append(line)
    return "\n".join(lines) + "\n"


def _edges_for(cls: type[GatewayMachine], layout: Layout, drawn: list[model.Row],
               source: str, event: str, target: str) -> list[str]:
    """The drawn edge(s) a transition travels along (empty when the picture does not draw it)."""
    if source not in cls.states_map or target not in cls.states_map:
        return []
    tail, head = _node_id(cls, source), _node_id(cls, target)
    rows = [r for r in drawn if r.source == source and r.event == event]
    choice = layout.choices.get(tuple((r.guards, r.target) for r in rows))
    parsed = [(_ends(edge), edge) for edge in layout.edges]
    if choice is not None:
        return [e for (t, h), e in parsed if (t, h) in ((tail, choice), (choice, head))]
    direct = [e for (t, h), e in parsed if (t, h) == (tail, head)]
    if direct:
        return direct
    # A shared edge from a "from a, b, c" note (the same event into one state from many).
    for note, label in layout.from_any.items():
        if source in re.split(r"[,\s]+|\\l", label.removeprefix("from ")):
            return [e for (t, h), e in parsed if (t, h) == (note, head)]
    return []


def _ends(edge: str) -> tuple[str, str]:
    found = _EDGE.match(edge)
    if found is None:
        return "", ""
    return found.group(1).strip('"'), found.group(2).strip('"')


def _node_id(cls: type[GatewayMachine], state_id: str) -> str:
    """The drawn node of a state (a compound state's edges point at its initial child)."""
    state = cls.states_map[state_id]
    while state.states:
        state = next((s for s in state.states if s.initial), state.states[0])
    return str(state.id)


def _node_of(body: str) -> str | None:
    found = re.match(r'^"([^"]+)" \[label=<', body)
    return found.group(1) if found else None


def _mark_edge(edge: str, count: int) -> str:
    edge = edge.replace('[label="', f'[label="taken {count}\u00d7\\l', 1)
    return edge[:-1] + f', color="{TAKEN}", fontcolor="{TAKEN}", penwidth=2.6]'


def _mark_node(node: str, loops: int, end: bool) -> str:
    if loops:
        extra = f'<br align="left"/><font color="{TAKEN}">\u21bb taken {loops}\u00d7</font><br align="left"/>'
        node = _LABEL.sub(lambda m: f"label=<{m.group(1)}{extra}>", node, count=1)
    style = f', style="rounded,filled", fillcolor="{VISITED_FILL}"'
    if end:
        style += f', penwidth=2.6, color="{TAKEN}"'
    return node[:-1] + style + "]"
