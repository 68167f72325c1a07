"""Fixtures for the streaming unit tests (the sixteen real X-rays come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_jpeg(sample_jpegs: list[Path]) -> Path:
    """One real chest X-ray (the smallest, to keep per-test work low)."""
    return min(sample_jpegs, key=lambda p: p.stat().st_size)
