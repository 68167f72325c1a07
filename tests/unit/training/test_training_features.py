"""Feature extraction per image: the stream's own prepare, the backbone in chunks, one row per image whatever
happens to it (no Spark, no TensorFlow: a numpy stand-in for the backbone)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from streaming.bundle import read_descriptor
from streaming.contracts import Reference
from streaming.fetch import FetchPolicy
from streaming.scoring import ScoringConfig, prepare
from streaming.settings import default_bundle_dir
from training.backbone import resolve
from training.features import FeatureRow, extract, partitions_for


class MeanBackbone:
    """Features [mean, std] of each input; records the chunks it sees."""

    def __init__(self, fail: bool = False, nan: bool = False) -> None:
        self.chunks: list[np.ndarray] = []
        self.fail, self.nan = fail, nan

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.chunks.append(batch)
        if self.fail:
            raise MemoryError("out of memory")
        flat = batch.reshape(len(batch), -1)
        out = np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1).astype(np.float32)
        if self.nan:
            out[0, 0] = np.nan
        return out


@pytest.fixture
def folder(tmp_path: Path, sample_jpegs: list[Path]) -> Path:
    for path in sample_jpegs[:3]:
        shutil.copy(path, tmp_path / path.name)
    data = sample_jpegs[0].read_bytes()
    (tmp_path / "broken.jpeg").write_bytes(data[: len(data) // 3])
    return tmp_path


def config_for(root: Path, batch: int = 2) -> ScoringConfig:
    return ScoringConfig(fetch=FetchPolicy(allowed_roots=(root.resolve(),)), inference_batch_size=batch)


def test_each_image_yields_features_or_the_reason_it_has_none(folder: Path, sample_jpegs: list[Path]) -> None:
    uris = [
        (folder / sample_jpegs[0].name).as_uri(),
        (folder / "broken.jpeg").as_uri(),
        (folder / "missing.jpeg").as_uri(),
        sample_jpegs[3].as_uri(),  # outside the allowed root
        (folder / sample_jpegs[1].name).as_uri(),
        (folder / sample_jpegs[2].name).as_uri(),
    ]
    backbone = MeanBackbone()
    rows = extract(uris, backbone, resolve(None), config_for(folder))
    assert [(r.stage, r.error) for r in rows] == [
        (None, None),
        ("decode", "corrupt_image"),
        ("fetch", "not_found"),
        ("fetch", "forbidden_uri"),
        (None, None),
        (None, None),
    ]
    assert all(r.features is not None and r.features.shape == (2,) for r in rows if r.error is None)
    assert [len(c) for c in backbone.chunks] == [1, 2]  # chunks of inference_batch_size, failures skipped


def test_the_backbone_sees_exactly_the_pixels_the_stream_feeds_the_model(
    folder: Path, sample_jpegs: list[Path]
) -> None:
    """The default backbone's input rules are the demo bundle's: the same prepare, the same array."""
    uri = (folder / sample_jpegs[0].name).as_uri()
    backbone = MeanBackbone()
    config = config_for(folder)
    extract([uri], backbone, resolve(None), config)
    expected = prepare(Reference(event_id="x", uri=uri), read_descriptor(default_bundle_dir()), config)
    np.testing.assert_array_equal(backbone.chunks[0][0], expected)


def test_a_backbone_failure_costs_its_chunk_only(folder: Path, sample_jpegs: list[Path]) -> None:
    uris = [(folder / p.name).as_uri() for p in sample_jpegs[:3]]
    rows = extract(uris, MeanBackbone(fail=True), resolve(None), config_for(folder, batch=8))
    assert {(r.stage, r.error) for r in rows} == {("score", "model_error")}
    rows = extract(uris, MeanBackbone(nan=True), resolve(None), config_for(folder, batch=8))
    assert [(r.stage, r.error) for r in rows] == [("score", "model_error"), (None, None), (None, None)]


def test_no_images_no_rows() -> None:
    assert extract([], MeanBackbone(), resolve(None), ScoringConfig()) == []


def test_failed_rows_carry_no_features() -> None:
    from streaming.errors import DecodeError, ErrorCode

    row = FeatureRow.failed(DecodeError(ErrorCode.TIMEOUT, "slow"))
    assert (row.features, row.stage, row.error) == (None, "decode", "timeout")


@pytest.mark.parametrize(
    ("rows", "slots", "expected"),
    [(0, 2, 1), (1, 2, 1), (5, 2, 2), (64, 2, 2), (65, 2, 2), (1000, 2, 16), (1000, 32, 32)],
)
def test_tasks_hold_about_64_images_and_use_every_core(rows: int, slots: int, expected: int) -> None:
    assert partitions_for(rows, slots) == expected
