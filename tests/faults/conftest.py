"""Fault tests share the stand-in fixture and closing checks of ``tests/faults/rig.py``."""

import pytest

from tests.faults.rig import tb  # noqa: F401 - a fixture, used by name


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
