"""Writing a bundle atomically: a whole bundle or none, never over one that is there unless forced."""

from __future__ import annotations

from pathlib import Path

import pytest

from streaming.bundle import Descriptor, TrainingRecord, read_descriptor
from streaming.settings import default_bundle_dir
from training.export import ExportError, check_target, staged, write_descriptor


def test_an_absent_or_empty_target_is_fine(tmp_path: Path) -> None:
    check_target(tmp_path / "new", force=False)
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty", force=False)


def test_a_non_empty_target_is_refused_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "bundle.json").write_text("{}")
    with pytest.raises(ExportError, match=r"not empty.*--force"):
        check_target(tmp_path / "old", force=False)
    check_target(tmp_path / "old", force=True)


def test_a_file_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        check_target(tmp_path / "file", force=True)


def test_the_bundle_appears_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "site" / "bundle"
    with staged(out, force=False) as staging:
        (staging / "model.keras").write_bytes(b"model")
        assert not out.exists()
        assert staging.parent == out.parent and staging.name.startswith(".bundle.partial-")
    assert (out / "model.keras").read_bytes() == b"model"
    assert [p.name for p in out.parent.iterdir()] == ["bundle"]


def test_a_failed_training_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError), staged(out, force=False) as staging:
        (staging / "model.keras").write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_target_folder_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    with staged(tmp_path / "bundle", force=False) as staging:
        (staging / "bundle.json").write_text("{}")
    assert (tmp_path / "bundle" / "bundle.json").exists()


def test_force_replaces_the_old_bundle_whole(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old-model.keras").write_bytes(b"old")
    with staged(out, force=True) as staging:
        (staging / "model.keras").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == ["model.keras"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_target_filled_meanwhile_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(ExportError), staged(out, force=False) as staging:
        (staging / "model.keras").write_bytes(b"new")
        out.mkdir()
        (out / "theirs").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_the_descriptor_is_written_as_read_back(tmp_path: Path) -> None:
    base = read_descriptor(default_bundle_dir())
    record = TrainingRecord(
        data_fingerprint="abc",
        data_source="/data",
        examples={"NORMAL": 3, "PNEUMONIA": 4},
        backbone="demo (trunk)",
        head="logistic (reg 0.1)",
        trained_at="2025-01-01T00:00:00Z",
    )
    descriptor = Descriptor.model_validate(base.model_dump() | {"training": record.model_dump()})
    write_descriptor(tmp_path, descriptor)
    assert read_descriptor(tmp_path) == descriptor
