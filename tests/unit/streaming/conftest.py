"""Shared fixtures for the streaming unit tests: the real chest X-rays shipped with the model package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_VAL_DIR = ("datasets", "pneumonia-data", "val")


@pytest.fixture(scope="session")
def sample_jpegs() -> list[Path]:
    """The 16 validation JPEGs of `pneumonia_model_package`, sorted, located without importing the package
    (importing it would pull in TensorFlow)."""
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("pneumonia_model_package is not installed; the decode tests need its chest X-rays")
    paths = sorted(Path(spec.submodule_search_locations[0], *_VAL_DIR).glob("*.jpeg"))
    assert len(paths) == 16, f"expected 16 validation JPEGs, found {len(paths)}"
    return paths


@pytest.fixture(scope="session")
def sample_jpeg(sample_jpegs: list[Path]) -> Path:
    """One real chest X-ray (the smallest, to keep per-test work low)."""
    return min(sample_jpegs, key=lambda p: p.stat().st_size)
