"""Replay tests snapshot with the project serializer (masks ids, times, temp paths, tokens)."""

from __future__ import annotations

import pytest
from syrupy.assertion import SnapshotAssertion

from tests.syrupy_serializer import TegSnapshotExtension


@pytest.fixture
def snapshot(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    """syrupy's ``snapshot``, rendered by ``TegSnapshotExtension``."""
    return snapshot.use_extension(TegSnapshotExtension)
