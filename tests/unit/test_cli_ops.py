"""Operator commands: --version, unknown machine names, clean pipes, status of a stopped gateway."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from teg_fsm import __version__

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "replay" / "corpus"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "TEG_", "THINGSBOARD_"))}
    return {**env, **extra}


def _teg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "teg_fsm.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=env or _clean_env(), timeout=60)


def test_version() -> None:
    done = _teg("--version")
    assert (done.returncode, done.stdout) == (0, f"teg-fsm {__version__}\n")


def test_an_unknown_machine_is_a_usage_error_naming_the_known_ones() -> None:
    done = _teg("journal", "--file", str(CORPUS / "provisioning_first_start.jsonl"), "--machine", "nosuch")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("teg journal: unknown machine 'nosuch' (known: connection, controller,")
    known = _teg("journal", "--file", str(CORPUS / "provisioning_first_start.jsonl"), "--machine", "provisioning")
    assert known.returncode == 0 and "provisioning: starting->checking" in known.stdout


def test_journal_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # Much more than a pipe buffer, so the writer really meets a closed pipe.
    line = (CORPUS / "provisioning_first_start.jsonl").read_text().splitlines()[0]
    big = tmp_path / "big.jsonl"
    big.write_text((line + "\n") * 3000)
    done = subprocess.run(
        f"set -o pipefail; {sys.executable} -m teg_fsm.cli journal --file {big} --jsonl | head -n 1",
        shell=True, executable="/bin/bash", cwd=REPO, capture_output=True, text=True, env=_clean_env(), timeout=60)
    assert done.stderr == "" and done.returncode == 0
    assert done.stdout.count("\n") == 1


def test_data_dir_defaults_to_the_service_env_file(tmp_path: Path) -> None:
    data = tmp_path / "station-data"
    data.mkdir()
    env_file = tmp_path / "teg.env"
    env_file.write_text(f"TB_HOST=tb.example\nTB_PORT=8883\nTEG_DATA_PATH={data}\n")
    (data / "last_launched_controller_version.txt").write_text("v1.2.3\n")
    done = _teg("status", env=_clean_env(TEG_ENV_FILE=str(env_file)))
    assert done.returncode == 2  # no journal yet: said, with the place it looked
    assert f"gateway:       not running (no `teg run` holds {data / 'teg.run'})" in done.stdout
    assert "controller:    version v1.2.3" in done.stdout
    assert f"no journal at {data / 'teg_journal.db'}" in done.stderr
    journal = _teg("journal", env=_clean_env(TEG_ENV_FILE=str(env_file)))
    assert journal.returncode == 2 and f"no journal at {data / 'teg_journal.db'}" in journal.stderr
