"""The token file helpers on a real file system (tmp_path)."""

from __future__ import annotations

import stat
from datetime import datetime, timezone
from pathlib import Path

from teg_fsm.adapters import tokens


def test_write_token_replaces_the_file_with_mode_0600_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "tb_access_token"
    path.write_text("old")
    path.chmod(0o644)
    tokens.write_token(path, "new-token")
    assert path.read_text() == "new-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb_access_token"]


def test_read_token_strips_whitespace_and_treats_empty_or_missing_as_none(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    assert tokens.read_token(path) is None
    path.write_text("  \n")
    assert tokens.read_token(path) is None and not tokens.token_present(path)
    path.write_text("abc\n")
    assert tokens.read_token(path) == "abc"


def test_move_aside_keeps_every_rejected_file_under_a_timestamped_name(tmp_path: Path) -> None:
    path = tmp_path / "tb_access_token"
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    path.write_text("first")
    first = tokens.move_aside(path, now)
    path.write_text("second")
    second = tokens.move_aside(path, now)
    assert first is not None and first.name == "tb_access_token.rejected-20250102T030405Z"
    assert second is not None and second.name == "tb_access_token.rejected-20250102T030405Z-1"
    assert (first.read_text(), second.read_text()) == ("first", "second")
    assert not path.exists()
    assert tokens.move_aside(path, now) is None
