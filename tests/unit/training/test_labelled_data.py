"""The pure rules of labelled data: which folder is a label, the fingerprint, the data root, label checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from streaming.settings import Settings
from training.data import DataError, fingerprint, label_of, labelled_file, with_data_root
from training.evaluate import check_labels


def test_the_label_is_the_first_sub_folder(tmp_path: Path) -> None:
    assert label_of(tmp_path, tmp_path / "PNEUMONIA" / "a.jpeg") == "PNEUMONIA"
    assert label_of(tmp_path, tmp_path / "PNEUMONIA" / "2024" / "b.dcm") == "PNEUMONIA"
    assert label_of(tmp_path, tmp_path / "loose.jpeg") is None
    assert label_of(tmp_path, tmp_path / ".incoming" / "c.jpeg") is None
    assert label_of(tmp_path, tmp_path / "NORMAL" / ".partial" / "d.jpeg") is None


def test_the_fingerprint_changes_with_any_image_label_or_version() -> None:
    rows = [("file:///a", "NORMAL", "1:1"), ("file:///b", "PNEUMONIA", "2:2")]
    base = fingerprint(rows)
    assert fingerprint(list(rows)) == base
    assert fingerprint(rows[:1]) != base
    assert fingerprint([rows[0], ("file:///b", "NORMAL", "2:2")]) != base
    assert fingerprint([rows[0], ("file:///b", "PNEUMONIA", "2:3")]) != base
    assert fingerprint([*rows, ("file:///c", "NORMAL", "3:3")]) != base


def test_a_listed_file_carries_its_size_and_mtime(tmp_path: Path) -> None:
    image = tmp_path / "NORMAL" / "a b.jpeg"
    image.parent.mkdir()
    image.write_bytes(b"12345")
    uri, label, version = labelled_file(tmp_path, image)
    assert (uri, label) == (image.as_uri(), "NORMAL")
    assert version.startswith("5:")
    assert labelled_file(tmp_path, tmp_path / "NORMAL" / "gone.jpeg")[2] == "missing"


def test_a_labelled_folder_becomes_an_allowed_root_and_a_table_does_not(tmp_path: Path) -> None:
    settings = Settings.load(allowed_roots=str(tmp_path / "elsewhere"))
    (tmp_path / "labelled" / "NORMAL").mkdir(parents=True)
    widened = with_data_root(settings, tmp_path / "labelled")
    assert widened.allowed_roots[-1] == (tmp_path / "labelled").resolve()
    assert with_data_root(widened, tmp_path / "labelled").allowed_roots == widened.allowed_roots
    table = tmp_path / "refs.csv"
    table.write_text("uri,label\n")
    assert with_data_root(settings, table).allowed_roots == settings.allowed_roots


def test_labels_the_model_does_not_predict_are_refused_by_name() -> None:
    check_labels(("NORMAL",), ("NORMAL", "PNEUMONIA"))
    with pytest.raises(DataError, match=r"normal.*the model's labels: NORMAL, PNEUMONIA"):
        check_labels(("normal", "PNEUMONIA"), ("NORMAL", "PNEUMONIA"))
