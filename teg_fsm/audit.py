"""Audit commands: diagrams, replay, journal, status (filled in by the engine work)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the audit subcommands on the ``teg`` parser."""
