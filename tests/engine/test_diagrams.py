"""``teg diagrams`` output is generated, marked, complete, fits a page, and is checked for staleness."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from statemachine import State

from teg_fsm.cli import diagram_model, diagram_render, diagrams
from teg_fsm.engine.effects import Log, Notify, StartTimer
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine
from tests.engine.examples import FetcherMachine, FetchThing

REPO = Path(__file__).resolve().parents[2]
needs_dot = pytest.mark.skipif(not diagrams.svg_available(), reason="graphviz dot is not installed")


# -- example machines --------------------------------------------------------


def _notify_reporter(reason: str) -> Notify:
    return Notify(machine="watcher_example", name="phase_reported", data={"reason": reason})


class PhasedMachine(GatewayMachine):
    """A compound phase with two steps: the shape the OTA machine is heading for."""

    machine_name = "phased_example"

    idle = State(initial=True)

    class installing(State.Compound):
        fetching = State(initial=True)
        building = State()
        fetched = fetching.to(building)

    done = State(final=True)

    start = idle.to(installing, cond="is_allowed") | idle.to.itself(internal=True, on="note_refused")
    finish = installing.to(done)
    poke = installing.to.itself(internal=True)

    def setup(self) -> None:
        self.allowed = True

    def is_allowed(self, ev: Event) -> bool:
        """The start request carries permission."""
        return bool(ev.data.get("allowed"))

    def note_refused(self) -> None:
        self._complain("refused")

    def _complain(self, reason: str) -> None:
        self.emit(Log(level="WARNING", message=reason), _notify_reporter(reason))

    def on_enter_done(self) -> None:
        self.emit(StartTimer(name="cool_down", seconds=1.0))


class WatcherMachine(GatewayMachine):
    machine_name = "watcher_example"

    watching = State(initial=True)
    phase_reported = watching.to.itself(internal=True)


def _chain_machine(length: int) -> type[GatewayMachine]:
    """A machine whose states form a long chain with long event names: too big for a page."""
    namespace: dict[str, Any] = {"machine_name": "chain_example", "__module__": __name__}
    states = [State(initial=index == 0, final=index == length - 1) for index in range(length)]
    for index, state in enumerate(states):
        namespace[f"state_number_{index:02d}"] = state
    for index in range(length - 1):
        namespace[f"a_rather_long_event_name_that_moves_on_{index:02d}"] = states[index].to(states[index + 1])
    return type("ChainMachine", (GatewayMachine,), namespace)


# -- generated tree ---------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generation of the real machines' files, copied by the tests that change them."""
    root = tmp_path_factory.mktemp("generated")
    diagrams.write(root / "diagrams")
    return root


def _copy(generated: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(generated, tmp_path / "repo")
    return tmp_path / "repo" / "diagrams", tmp_path / "repo" / "docs" / "diagrams"


def test_committed_diagrams_are_current() -> None:
    assert diagrams.check(REPO / "diagrams") == []


def test_check_names_missing_stale_and_orphaned_files(generated: Path, tmp_path: Path) -> None:
    out, previews = _copy(generated, tmp_path)
    assert diagrams.check(out) == []
    (out / "orphan.mmd").write_text(f"%% {diagrams._NOTE}\nstateDiagram-v2\n")
    (out / "uplink.md").write_text((out / "uplink.md").read_text() + "\nhand edit")
    (out / "rpc.mmd").unlink()
    problems = diagrams.check(out)
    assert f"{out / 'orphan.mmd'}: no machine generates it any more" in problems
    assert f"{out / 'uplink.md'}: stale" in problems
    assert f"{out / 'rpc.mmd'}: missing" in problems
    assert len(problems) == 3
    diagrams.write(out)
    assert diagrams.check(out) == [] and not (out / "orphan.mmd").exists()


@needs_dot
def test_check_covers_svgs_and_png_previews(generated: Path, tmp_path: Path) -> None:
    out, previews = _copy(generated, tmp_path)
    (previews / "ota.png").unlink()
    (previews / "controller.png").write_bytes((previews / "controller.png").read_bytes()[:-10])
    shutil.copy(previews / "rpc.png", previews / "retired_machine.png")
    (out / "uplink.svg").write_text((out / "uplink.svg").read_text().replace("idle", "IDLE"))
    problems = diagrams.check(out)
    assert sorted(problems) == sorted([
        f"{previews / 'ota.png'}: missing",
        f"{previews / 'controller.png'}: stale",
        f"{previews / 'retired_machine.png'}: no machine generates it any more",
        f"{out / 'uplink.svg'}: stale",
    ])


@needs_dot
def test_generation_is_deterministic(generated: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    diagrams.write(again / "diagrams")
    first = {p.relative_to(generated): p.read_bytes() for p in sorted(generated.rglob("*")) if p.is_file()}
    second = {p.relative_to(again): p.read_bytes() for p in sorted(again.rglob("*")) if p.is_file()}
    assert first.keys() == second.keys() and first == second
    assert any(name.suffix == ".png" for name in first)


def test_every_generated_text_file_says_so_in_its_first_line(generated: Path) -> None:
    texts = [p for p in generated.rglob("*") if p.suffix in (".md", ".mmd", ".svg")]
    assert texts
    for path in texts:
        assert "generated by `teg diagrams`" in path.read_text().splitlines()[0], path


def test_teg_diagrams_check_fails_with_the_regenerate_hint(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "ghost.md").write_text(f"<!-- {diagrams._NOTE} -->\n")
    done = subprocess.run(
        [sys.executable, "-m", "teg_fsm.cli", "diagrams", "--check", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert done.returncode == 1
    assert "run `teg diagrams` to regenerate" in done.stderr and "ghost.md" in done.stderr


# -- page budget -----------------------------------------------------------------


def test_page_budget_is_a4_landscape_with_readable_text() -> None:
    assert diagrams.PAGE_PX == (1123, 794)
    assert diagrams.MIN_SCALE * diagram_render.FONT_PT == diagrams.MIN_TEXT_PT
    assert diagrams.BUDGET_PX == (2246, 1588)


@needs_dot
def test_a_picture_over_the_page_budget_fails_the_check(tmp_path: Path) -> None:
    chain = _chain_machine(40)
    out = tmp_path / "diagrams"
    diagrams.write(out, classes=[chain])
    picture = next(p for p in diagrams.pictures([chain]) if p.name == "chain_example")
    assert not picture.fits and picture.page_scale < diagrams.MIN_SCALE
    problems = diagrams.check(out, classes=[chain])
    over = [p for p in problems if "over the page budget" in p]
    assert over == [f"{out / 'chain_example'}.svg: {picture.describe()}"]


@needs_dot
def test_every_real_picture_fits_the_page_and_reports_its_size() -> None:
    report = diagrams.size_report()
    assert len(report) == len(diagrams.machine_classes()) + 1  # and the overview
    for line in report:
        width, height = (int(v) for v in re.search(r"(\d+) x (\d+) px at 100 %", line).groups())
        assert width <= diagrams.BUDGET_PX[0] and height <= diagrams.BUDGET_PX[1], line
        assert "over the page budget" not in line


# -- what the pictures show -------------------------------------------------------------


def test_internal_self_transitions_stay_out_of_the_picture() -> None:
    from teg_fsm.machines.uplink import UplinkMachine

    dot = diagram_render.machine_dot(UplinkMachine, "TB")
    assert "rows_waiting" not in dot and "data_packet" not in dot
    assert "mqtt_connected" in dot and "is_throttled" in dot


def test_parallel_edges_merge_into_one_labelled_edge() -> None:
    from teg_fsm.machines.ota import OtaMachine

    dot = diagram_render.machine_dot(OtaMachine, "TB")
    # An edge out of a phase (cluster) is drawn from a node inside it with ltail: it
    # is a different edge from one out of that node itself.
    edges = re.findall(r'^\s*("[^"]+") -> ("[^"]+")(?:.*(ltail="[^"]+"))?', dot, re.MULTILINE)
    assert len(edges) == len(set(edges))
    assert any(ltail for _, _, ltail in edges)
    assert "build_{failed|timed_out|cancelled}" in dot  # one edge, the outcomes folded


def test_state_names_and_labels_share_one_font_size() -> None:
    from teg_fsm.machines.controller import ControllerMachine

    dot = diagram_render.machine_dot(ControllerMachine, "TB")
    assert set(re.findall(r"fontsize=(\d+)", dot)) == {str(diagram_render.FONT_PT)}


def test_compound_states_are_drawn_as_clusters() -> None:
    dot = diagram_render.machine_dot(PhasedMachine, "TB")
    cluster = re.search(r'subgraph "cluster_installing" \{(.*?)\n  \}', dot, re.DOTALL)
    assert cluster is not None
    assert '"fetching"' in cluster.group(1) and '"building"' in cluster.group(1)
    assert '"__start_installing" -> "fetching"' in cluster.group(1)
    assert '"idle" -> "fetching" [label="start\\l [is_allowed]\\l", lhead="cluster_installing"]' in dot
    assert 'ltail="cluster_installing"' in dot and '"done" [label=<<b>done</b>>, peripheries=2]' in dot


@needs_dot
def test_compound_machine_renders_to_svg_with_its_cluster() -> None:
    picture = diagrams.draw("phased_example", lambda r, t: diagram_render.machine_dot(PhasedMachine, r, t))
    assert 'class="cluster"' in picture.svg and ">installing<" in picture.svg and picture.fits


def test_overview_shows_notifications_between_machines() -> None:
    edges = diagram_model.notifications([PhasedMachine, WatcherMachine])
    assert edges == [("phased_example", "phase_reported", "watcher_example", "note_refused")]
    real = diagram_model.notifications(diagrams.machine_classes())
    assert ("file_sync", "restart_requested", "controller", "take_in") in real
    assert ("rpc", "ota_rollback_requested", "ota", "on_rpc_requested") in real  # declared by notified_events
    assert not any(source == target for source, _, target, _ in real)


# -- what the tables say ---------------------------------------------------------------


def _table_rows(md: str) -> list[list[str]]:
    section = md.split("## Transitions", 1)[1].split("## Guards", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if re.match(r"^\| \d+ \|", line)]


def _library_rows(cls: type[GatewayMachine]) -> list[tuple[str, str, str, bool]]:
    """(state, event, target, internal) straight from the library, state by state.

    A targetless transition (``s.to(None)``) stays in ``s`` with no exit/entry: internal."""
    found = []
    states = list(cls.states_map.values())
    for state in states:
        for transition in state.transitions:
            for event in transition.events:
                if transition.target is None:
                    found.append((state.id, event.id, state.id, True))
                else:
                    found.append((state.id, event.id, transition.target.id, bool(transition.internal)))
    return found


@pytest.mark.parametrize("cls", diagrams.machine_classes() + [PhasedMachine], ids=lambda c: c.machine_name)
def test_table_lists_every_transition_in_evaluation_order(cls: type[GatewayMachine], tmp_path: Path) -> None:
    out = tmp_path / "d"
    diagrams.write(out, classes=[cls])
    md = (out / f"{cls.machine_name}.md").read_text()
    assert "the first row whose guards all hold is taken" in md
    table = [(r[1], r[2].strip("`"), r[4].removesuffix(" (internal)"), r[4].endswith("(internal)"))
             for r in _table_rows(md)]
    library = _library_rows(cls)
    assert sorted(table) == sorted((s, e, t, i and s == t) for s, e, t, i in library)
    for state, event in {(s, e) for s, e, _, _ in library}:
        in_table = [row for row in table if row[:2] == (state, event)]
        in_library = [(s, e, t, i and s == t) for s, e, t, i in library if (s, e) == (state, event)]
        assert in_table == in_library  # the order the library tries them


def test_uplink_table_shows_the_bookkeeping_and_rpc_its_only_transition() -> None:
    uplink = (REPO / "diagrams" / "uplink.md").read_text()
    bookkeeping = re.findall(r"^\| \d+ \| (\w+) \| `data_packet_succeeded` \|  \| (\w+) \(internal\) \|", uplink, re.M)
    assert bookkeeping and all(state == target for state, target in bookkeeping)
    rpc = _table_rows((REPO / "diagrams" / "rpc.md").read_text())
    assert [r[1:5] for r in rpc] == [["serving", "`rpc_requested`", "", "serving (internal)"]]


@pytest.mark.parametrize("cls", diagrams.machine_classes(), ids=lambda c: c.machine_name)
def test_every_guard_has_a_meaning_and_a_place_in_the_code(cls: type[GatewayMachine]) -> None:
    md = (REPO / "diagrams" / f"{cls.machine_name}.md").read_text()
    guards = md.split("## Guards", 1)[1].split("## Actions", 1)[0]
    named = {name for state in cls.states_map.values() for t in state.transitions for spec in t.cond
             for name in diagram_model.guard_names(str(spec))}
    for name in named:
        row = re.search(rf"^\| `{name}` \| (.+) \| (\S+):(\d+) \|$", guards, re.MULTILINE)
        assert row is not None, name
        meaning, path, line = row.groups()
        assert meaning != "(no docstring)", name
        source_line = (REPO / path).read_text().splitlines()[int(line) - 1]
        assert f"def {name}(" in source_line or f"self.{name} =" in source_line, (name, source_line)


def test_actions_list_the_effects_they_emit_through_helpers() -> None:
    refused = diagram_model.describe(PhasedMachine, "note_refused")
    assert [e.describe() for e in refused.emissions] == ["Log", "Notify(watcher_example.phase_reported)"]
    assert refused.location.startswith("tests/engine/test_diagrams.py:")
    assert [e.effect for e in diagram_model.describe(FetcherMachine, "on_enter_fetching").emissions] == [
        FetchThing.__name__]
    ota = (REPO / "diagrams" / "ota.md").read_text()
    assert re.search(r"^\| `\w+` \| [^|]*Notify\(controller\.swap_requested\)", ota, re.MULTILINE)


class FlaggedMachine(GatewayMachine):
    """A guard that is a plain data attribute, set by an action and by setup()."""

    machine_name = "flagged_example"

    waiting = State(initial=True)
    retrying = State(final=True)

    retry_elapsed = waiting.to(retrying, cond="transient")
    fetch_failed = waiting.to.itself(internal=True, on="note_transient")

    def setup(self) -> None:
        self.transient = False

    def note_transient(self) -> None:
        self.transient = True


def test_guard_that_is_a_flag_attribute_names_who_sets_it() -> None:
    flag = diagram_model.describe(FlaggedMachine, "transient")
    assert flag.meaning == "flag attribute, assigned by `setup`, `note_transient`"
    assert flag.location.startswith("tests/engine/test_diagrams.py:")


class FallbackPhaseMachine(GatewayMachine):
    """An event handled both by an inner state and by its phase."""

    machine_name = "fallback_phase_example"

    idle = State(initial=True)
    fetching = State()
    given_up = State()
    failed = State()
    working = State(states=[fetching])

    begin = idle.to(fetching)
    # The phase says "any failure here -> failed"; fetching has its own row for it.
    broke = fetching.to(given_up) | working.to(failed)
    reset = given_up.to(idle) | failed.to(idle)
    resume_table = {"idle": "idle", "fetching": "fetching", "given_up": "given_up", "failed": "failed", "working": "fetching"}


def test_a_phase_rows_come_after_its_inner_states_rows_as_the_library_tries_them(tmp_path: Path) -> None:
    machine = FallbackPhaseMachine()
    machine.handle(Event(seq=1, ts_ms=1, source="test", name="begin"))
    machine.handle(Event(seq=2, ts_ms=2, source="test", name="broke"))
    assert machine.state_name == "given_up"  # the inner state's row won
    diagrams.write(tmp_path, classes=[FallbackPhaseMachine])
    broke_rows = [r[1] for r in _table_rows((tmp_path / "fallback_phase_example.md").read_text()) if r[2] == "`broke`"]
    assert broke_rows == ["fetching", "working"]
