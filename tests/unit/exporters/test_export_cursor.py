"""An exporter's cursor: empty on a first start, written whole, read back exactly, and refused (never guessed) when
the file is another source's or corrupt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exporters.cursor import SCHEMA, ExportCursor
from producers.state import StateError, state_file
from streaming.contracts import parse_timestamp

SOURCE = "cxr.results → kafka:cxr.fhir, https://fhir.example/r4"


def write_cursor_file(state_dir: Path, body: Any, *, exporter: str = "fhir", source: str = SOURCE) -> Path:
    path = state_file(state_dir, f"export-{exporter}", source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body), "utf-8")
    return path


def cursor_body(offsets: Any, *, source: str = SOURCE, schema: str = SCHEMA) -> dict[str, Any]:
    return {"schema": schema, "source": source, "offsets": offsets, "saved_at": "2026-11-26T10:00:00.000Z"}


def test_a_first_start_is_empty_and_writes_nothing(tmp_path: Path) -> None:
    cursor = ExportCursor.open(tmp_path, "fhir", SOURCE)
    assert cursor.offsets == {}
    assert cursor.source == SOURCE
    assert cursor.path == state_file(tmp_path, "export-fhir", SOURCE)
    assert cursor.path.parent.name == "export-fhir"
    assert not cursor.path.exists()
    assert cursor.stored("cxr.results") == {}


def test_advance_save_open_roundtrip(tmp_path: Path) -> None:
    cursor = ExportCursor.open(tmp_path, "fhir", SOURCE)
    assert cursor.advance({0: 12, 1: 7})
    assert cursor.advance({0: 13})
    cursor.save()

    again = ExportCursor.open(tmp_path, "fhir", SOURCE)
    assert again.offsets == {0: 13, 1: 7}
    assert again.path == cursor.path
    assert again.stored("cxr.results") == {("cxr.results", 0): 13, ("cxr.results", 1): 7}


def test_advance_says_whether_anything_changed(tmp_path: Path) -> None:
    cursor = ExportCursor.open(tmp_path, "fhir", SOURCE)
    assert not cursor.advance({})
    assert cursor.advance({3: 0})
    assert not cursor.advance({3: 0})
    assert cursor.advance({3: 0, 4: 1})
    assert cursor.offsets == {3: 0, 4: 1}


def test_the_file_is_one_complete_json_object_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    cursor = ExportCursor.open(tmp_path, "sr", SOURCE)
    cursor.advance({2: 5, 0: 100, 10: 1})
    cursor.save()
    cursor.advance({0: 101})
    cursor.save()

    raw = cursor.path.read_bytes()
    assert raw.endswith(b"\n")
    body = json.loads(raw)
    assert body["schema"] == SCHEMA == "cxr.export-cursor/v1"
    assert body["source"] == SOURCE
    assert body["offsets"] == {"0": 101, "2": 5, "10": 1}
    assert list(body["offsets"]) == ["0", "2", "10"]  # sorted by partition
    assert parse_timestamp(body["saved_at"]).tzinfo is not None
    assert body["saved_at"].endswith("Z")
    assert sorted(p.name for p in cursor.path.parent.iterdir()) == [cursor.path.name]


def test_a_failed_write_leaves_the_previous_cursor_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cursor = ExportCursor.open(tmp_path, "fhir", SOURCE)
    cursor.advance({0: 1})
    cursor.save()
    before = cursor.path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("producers.state.os.fsync", full_disk)
    cursor.advance({0: 2})
    with pytest.raises(OSError):
        cursor.save()
    monkeypatch.undo()
    assert cursor.path.read_bytes() == before
    assert sorted(p.name for p in cursor.path.parent.iterdir()) == [cursor.path.name]
    assert ExportCursor.open(tmp_path, "fhir", SOURCE).offsets == {0: 1}


def test_each_exporter_and_source_has_its_own_file(tmp_path: Path) -> None:
    fhir = ExportCursor.open(tmp_path, "fhir", SOURCE)
    sr = ExportCursor.open(tmp_path, "sr", SOURCE)
    moved = ExportCursor.open(tmp_path, "fhir", "cxr.results → kafka:cxr.fhir")
    assert len({fhir.path, sr.path, moved.path}) == 3
    fhir.advance({0: 9})
    fhir.save()
    assert ExportCursor.open(tmp_path, "sr", SOURCE).offsets == {}
    assert ExportCursor.open(tmp_path, "fhir", "cxr.results → kafka:cxr.fhir").offsets == {}


def test_another_sources_file_is_refused(tmp_path: Path) -> None:
    # The same file name holding another source (a hash collision, a file copied by hand): never guessed.
    write_cursor_file(tmp_path, cursor_body({"0": 4}, source="cxr.results → somewhere else"))
    with pytest.raises(StateError, match="not an export cursor"):
        ExportCursor.open(tmp_path, "fhir", SOURCE)


def test_another_schema_is_refused(tmp_path: Path) -> None:
    write_cursor_file(tmp_path, cursor_body({"0": 4}, schema="cxr.folder-cursor/v1"))
    with pytest.raises(StateError, match="not an export cursor"):
        ExportCursor.open(tmp_path, "fhir", SOURCE)


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"\xff\xfe{}", b"null", b"[]", b'"cursor"', b"42"],
    ids=["truncated", "empty", "not-utf8", "null", "array", "string", "number"],
)
def test_a_corrupt_file_is_refused(tmp_path: Path, raw: bytes) -> None:
    path = state_file(tmp_path, "export-fhir", SOURCE)
    path.parent.mkdir(parents=True)
    path.write_bytes(raw)
    with pytest.raises(StateError, match="corrupt"):
        ExportCursor.open(tmp_path, "fhir", SOURCE)


@pytest.mark.parametrize(
    "offsets",
    [
        None,
        [],
        [0, 1],
        "0:1",
        {"0": -1},
        {"0": True},
        {"0": False},
        {"0": 1.0},
        {"0": 1.5},
        {"0": "1"},
        {"0": None},
        {"0": {"offset": 1}},
        {"p0": 1},
        {"-1": 1},
        {"": 1},
        {" 1": 1},
        {"1.0": 1},
        {"0x1": 1},
    ],
    ids=repr,
)
def test_bad_offsets_are_refused(tmp_path: Path, offsets: Any) -> None:
    write_cursor_file(tmp_path, cursor_body(offsets))
    with pytest.raises(StateError, match="corrupt"):
        ExportCursor.open(tmp_path, "fhir", SOURCE)


def test_a_file_without_offsets_is_refused(tmp_path: Path) -> None:
    body = cursor_body({})
    del body["offsets"]
    write_cursor_file(tmp_path, body)
    with pytest.raises(StateError, match="no offsets"):
        ExportCursor.open(tmp_path, "fhir", SOURCE)


@pytest.mark.parametrize("key", ["²", "①", "9" * 5000], ids=["superscript", "circled", "5000-digits"])
def test_odd_digit_keys_are_refused_as_corrupt(tmp_path: Path, key: str) -> None:
    write_cursor_file(tmp_path, cursor_body({key: 1}))
    with pytest.raises(StateError, match="corrupt"):
        ExportCursor.open(tmp_path, "fhir", SOURCE)


def test_an_unreadable_state_folder_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_bytes(b"not a folder")
    with pytest.raises(StateError, match="cannot read"):
        ExportCursor.open(blocker, "fhir", SOURCE)


def test_large_offsets_and_many_partitions_roundtrip(tmp_path: Path) -> None:
    cursor = ExportCursor.open(tmp_path, "fhir", SOURCE)
    offsets = {p: (2**63 - 1) - p for p in range(200)}
    cursor.advance(offsets)
    cursor.save()
    assert ExportCursor.open(tmp_path, "fhir", SOURCE).offsets == offsets


def test_an_offset_of_zero_and_an_empty_cursor_are_read_back(tmp_path: Path) -> None:
    write_cursor_file(tmp_path, cursor_body({}))
    assert ExportCursor.open(tmp_path, "fhir", SOURCE).offsets == {}
    write_cursor_file(tmp_path, cursor_body({"0": 0, "7": 3}))
    assert ExportCursor.open(tmp_path, "fhir", SOURCE).offsets == {0: 0, 7: 3}


def test_stored_is_what_plan_seeks_takes(tmp_path: Path) -> None:
    from kafka import TopicPartition

    from streaming.positions import plan_seeks

    cursor = ExportCursor.open(tmp_path, "fhir", SOURCE)
    cursor.advance({0: 5, 1: 0})
    stored = cursor.stored("cxr.results")
    assert stored == {("cxr.results", 0): 5, ("cxr.results", 1): 0}
    assert cursor.stored("other") == {("other", 0): 5, ("other", 1): 0}
    partitions = [TopicPartition("cxr.results", p) for p in (0, 1, 2)]
    end = dict.fromkeys(partitions, 10)
    plan = plan_seeks(partitions, stored, end=end, reader="the fhir exporter")
    assert plan.seeks == {partitions[0]: 5, partitions[1]: 0, partitions[2]: 0}
    assert (plan.resumed, plan.from_beginning) == (2, 1)
