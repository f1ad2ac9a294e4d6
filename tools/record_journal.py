"""Record the replay corpus: run real scenario tests and keep the journals they wrote.

    python tools/record_journal.py [--out tests/replay/corpus] [--list] [SCENARIO ...]

Each scenario is an existing whole-gateway integration test (real stand-in,
real dockerd at ``$DOCKER_HOST``, real git, real SQLite). The tool runs them
with pytest, loading this module as a plugin (``-p tools.record_journal``)
with ``TEG_RECORD_JOURNALS=<dir>`` set: after each test's teardown (gateways
stopped, journals closed) the plugin exports every ``teg_journal.db`` under the
test's ``tmp_path`` to ``<dir>/<test name>.jsonl``. The tool then checks and
copies them to the corpus under their scenario names.

An export starts at the first ``gateway_started`` entry (a restarted gateway
appends a second run to the same file; both are kept) and must not contain any
token found in a ``tb_access_token*`` file of the test, nor a provisioning
secret from the scenario's environment; a journal that does is refused.
Nothing is fabricated: every line was written by the real dispatcher.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from teg_fsm.engine.events import STARTED
from teg_fsm.engine.journal import JournalEntry, entry_to_jsonl, read_journal

ENV = "TEG_RECORD_JOURNALS"
CORPUS = REPO / "tests" / "replay" / "corpus"
MAX_BYTES = 300 * 1024
# Secrets the scenario tests use as literals (token files are checked too).
KNOWN_SECRETS = ("prov-secret-s3cr3t", "files-token-0123456", "known-token", "revoked-token-123")

_INTEGRATION = "tests/integration/"
SCENARIOS: dict[str, str] = {
    "ota_success_rollback_missing_tag": _INTEGRATION
    + "test_ota_e2e.py::test_assign_good_bad_missing_and_good_again",
    "ota_killed_in_probation_resumes": _INTEGRATION
    + "test_ota_e2e.py::test_gateway_killed_in_probation_resumes_and_commits",
    "file_sync_lifecycle": _INTEGRATION
    + "test_file_sync.py::test_files_are_created_updated_versioned_restored_mirrored_and_released",
    "uplink_offline_logs_buffered": _INTEGRATION
    + "test_uplink.py::test_gateway_logs_written_offline_reach_thingsboard_with_severity_and_prefix",
    "uplink_malformed_rows_dead_lettered": _INTEGRATION
    + "test_uplink.py::test_malformed_rows_go_to_dead_letters_and_later_rows_are_delivered",
    "provisioning_first_start": _INTEGRATION
    + "test_connection_provisioning.py::test_first_start_without_token_self_provisions_writes_a_0600_token_and_connects_with_it",
    "provisioning_rejected_token": _INTEGRATION
    + "test_connection_provisioning.py::test_a_rejected_token_is_moved_aside_kept_and_the_device_reprovisioned",
    "connection_server_restart": _INTEGRATION
    + "test_connection_provisioning.py::test_a_stopped_and_restarted_server_leads_to_backoff_and_a_reconnect",
}


# -- exporting ---------------------------------------------------------------


def from_first_start(entries: Iterable[JournalEntry]) -> Iterator[JournalEntry]:
    """Entries from the first ``gateway_started`` on (a pruned head cannot be replayed)."""
    started = False
    for entry in entries:
        started = started or (entry.name == STARTED and entry.source == "system")
        if started:
            yield entry


def secrets_under(root: Path) -> list[str]:
    """Token file contents under ``root`` plus the scenario tests' literal secrets."""
    found = [p.read_text().strip() for p in root.rglob("tb_access_token*") if p.is_file()]
    return [s for s in (*found, *KNOWN_SECRETS) if len(s) >= 6]


def export(db: Path, out: Path, secrets: Iterable[str] = ()) -> int:
    """Export one journal database to JSON Lines; refuse one that leaks a secret."""
    lines = [entry_to_jsonl(e) for e in from_first_start(read_journal(db))]
    text = "".join(line + "\n" for line in lines)
    leaked = [s[:4] + "..." for s in secrets if s in text]
    if leaked:
        raise ValueError(f"{db}: journal contains secrets ({', '.join(leaked)}); not recorded")
    out.write_text(text, encoding="utf-8")
    return len(lines)


# -- the pytest plugin (active when TEG_RECORD_JOURNALS is set) ----------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After the test's fixtures are torn down, export the journals in its tmp_path."""
    funcargs = getattr(item, "funcargs", None) or {}
    tmp_path = funcargs.get("tmp_path")
    yield
    target = os.environ.get(ENV)
    if not target or tmp_path is None:
        return
    journals = sorted(Path(tmp_path).rglob("teg_journal.db"))
    secrets = secrets_under(Path(tmp_path))
    for index, db in enumerate(journals):
        suffix = f".{index}" if len(journals) > 1 else ""
        export(db, Path(target) / f"{item.name}{suffix}.jsonl", secrets)


# -- the command ---------------------------------------------------------------


def record(names: list[str], out: Path, pytest_args: list[str]) -> int:
    """Run the scenarios' tests and copy their journals into ``out``; returns an exit code."""
    with tempfile.TemporaryDirectory(prefix="teg-record-") as work:
        env = {**os.environ, ENV: work}
        # The working-tree hygiene check is CI's business; in a shared checkout
        # other people's edits during the run would refuse a good recording.
        args = [sys.executable, "-m", "pytest", "-p", "tools.record_journal", "-q", "-p", "no:cacheprovider",
                "-p", "no:tests.rig.hygiene", *pytest_args, *(SCENARIOS[n] for n in names)]
        rc = subprocess.run(args, check=False, cwd=REPO, env=env).returncode
        if rc != 0:
            print(f"record_journal: the scenario tests failed (pytest exit {rc}); corpus unchanged", file=sys.stderr)
            return rc
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            test = SCENARIOS[name].rpartition("::")[2]
            source = Path(work) / f"{test}.jsonl"
            if not source.exists():
                print(f"record_journal: {name}: the test wrote no single journal", file=sys.stderr)
                return 1
            size = source.stat().st_size
            if size > MAX_BYTES:
                print(f"record_journal: {name}: {size} bytes is over {MAX_BYTES}; record a smaller run",
                      file=sys.stderr)
                return 1
            (out / f"{name}.jsonl").write_bytes(source.read_bytes())
            print(f"recorded {name}.jsonl: {sum(1 for _ in source.open())} entries, {size} bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--out", type=Path, default=CORPUS, help="corpus directory")
    parser.add_argument("--list", action="store_true", help="list the scenarios and their tests")
    parser.add_argument("--pytest-arg", action="append", default=[], help="extra pytest argument (repeatable)")
    args = parser.parse_args(argv)
    if args.list:
        for name, test in SCENARIOS.items():
            print(f"{name:<40} {test}")
        return 0
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)} (see --list)")
    return record(args.scenarios or list(SCENARIOS), args.out, args.pytest_arg)


if __name__ == "__main__":
    sys.exit(main())
