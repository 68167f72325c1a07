"""Where `cxr batch` references come from: the reader a source asks for, and each row's reference, without Spark.

A folder's file becomes exactly the reference the folder feed announces for it (same code, same event id);
a table row becomes a `cxr.reference/v1` message the stream's parser accepts, or one it dead-letters.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from pydicom.uid import generate_uid

from producers.folder import references, scan
from streaming.batch import BatchSummary, FileOutput, OutputError, chunk_count, output_for, written_formats
from streaming.contracts import REFERENCE_SCHEMA, parse_reference
from streaming.errors import ErrorCode, ParseError
from streaming.settings import Settings
from streaming.sources import (
    CONTRACT_COLUMNS,
    TABLE_NAMESPACE,
    SourceError,
    column_map,
    folder_reference,
    hidden,
    is_parquet_listing,
    local_path,
    source_topic,
    table_event_id,
    table_format,
    table_reference,
)
from xray_files import dicom_bytes, image_dataset

# ---------------------------------------------------------------------------------------------- which reader


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("refs.jsonl", "jsonl"),
        ("refs.json", "jsonl"),
        ("refs.ndjson", "jsonl"),
        ("REFS.JSONL", "jsonl"),
        ("refs.csv", "csv"),
        ("refs.parquet", "parquet"),
    ],
)
def test_a_table_reader_is_picked_by_suffix(tmp_path: Path, name: str, expected: str) -> None:
    (tmp_path / name).write_text("")
    assert table_format(tmp_path / name) == expected


@pytest.mark.parametrize("name", ["refs.txt", "refs.xlsx", "refs", "refs.jsonl.gz"])
def test_any_other_file_is_a_configuration_error(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("")
    with pytest.raises(SourceError, match=r"\.csv.*\.jsonl.*\.parquet"):
        table_format(tmp_path / name)


def test_a_folder_is_images_unless_it_is_a_parquet_table(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpeg").write_bytes(b"\xff\xd8\xff")
    assert table_format(images) == "folder"
    (tmp_path / "empty").mkdir()
    assert table_format(tmp_path / "empty") == "folder"

    written = tmp_path / "written"  # as Spark writes a table
    written.mkdir()
    for name in ("part-00000-1.snappy.parquet", "part-00001-1.snappy.parquet", "_SUCCESS", ".part-00000-1.crc"):
        (written / name).write_bytes(b"")
    assert table_format(written) == "parquet"
    named = tmp_path / "refs.parquet"  # a partitioned table, known by its name
    (named / "site=a").mkdir(parents=True)
    assert table_format(named) == "parquet"


def test_parquet_listing() -> None:
    assert is_parquet_listing(["a.parquet", "b.PARQUET", "_SUCCESS", "_common_metadata", ".a.parquet.crc"])
    assert not is_parquet_listing([])
    assert not is_parquet_listing(["_SUCCESS"])
    assert not is_parquet_listing(["a.parquet", "scan.dcm"])


def test_dead_letters_name_the_batch_source() -> None:
    assert source_topic(Path("/archive/2019")) == "batch:2019"


# ---------------------------------------------------------------------------------------------- folder rows


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        ("file:/archive/a b.png", "/archive/a b.png"),
        ("file:///archive/x.dcm", "/archive/x.dcm"),
        ("file:/archive/p%20q.jpeg", "/archive/p%20q.jpeg"),  # Spark lists names as they are, not encoded
        ("/archive/x.dcm", "/archive/x.dcm"),
    ],
)
def test_local_path_from_what_spark_lists(listed: str, expected: str) -> None:
    assert local_path(listed) == expected


def test_hidden_files_and_folders() -> None:
    assert hidden(PurePosixPath(".x.jpeg"))
    assert hidden(PurePosixPath("a/.incoming/x.jpeg"))
    assert not hidden(PurePosixPath("a/b/x.jpeg"))
    assert not hidden(PurePosixPath("_a/x.jpeg"))


def test_a_listed_file_gets_the_folder_feeds_reference(tmp_path: Path, sample_jpegs: list[Path]) -> None:
    root = tmp_path / "archive"
    (root / "2019" / ".incoming").mkdir(parents=True)
    for path in sample_jpegs[:2]:
        (root / "2019" / path.name).write_bytes(path.read_bytes())
    (root / "2019" / ".incoming" / "partial.jpeg").write_bytes(sample_jpegs[2].read_bytes())
    (root / "notes.jpeg").write_text("a text file with an image's name")
    (root / ".hidden.jpeg").write_bytes(sample_jpegs[3].read_bytes())
    uids = {"study": generate_uid(), "series": generate_uid(), "sop": generate_uid()}
    ds = image_dataset(np.zeros((4, 4), dtype=np.uint8))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uids["study"], uids["series"], uids["sop"]
    ds.AccessionNumber, ds.ViewPosition = "ACC1", "PA"
    (root / "scan.dcm").write_bytes(dicom_bytes(ds))

    feed = {ref.uri: ref for ref in references(scan(root))}
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            event_id, value = folder_reference(str(path), str(root))
            if value is not None:
                found[parse_reference(value).uri] = (event_id, parse_reference(value))

    assert set(found) == set(feed)  # the images, not the text file, not the hidden ones
    assert len(found) == 3
    for uri, (event_id, ref) in found.items():
        assert event_id == ref.event_id == feed[uri].event_id
        assert {k: v for k, v in vars_of(ref).items() if k != "sent_at"} == {
            k: v for k, v in vars_of(feed[uri]).items() if k != "sent_at"
        }
    dicom = found[(root / "scan.dcm").resolve().as_uri()][1]
    assert (dicom.study_uid, dicom.series_uid, dicom.sop_instance_uid) == (uids["study"], uids["series"], uids["sop"])
    assert (dicom.accession, dicom.view_position) == ("ACC1", "PA")


def vars_of(ref: object) -> dict[str, object]:
    return {name: getattr(ref, name) for name in ref.__slots__}  # type: ignore[attr-defined]


def test_not_an_image_or_gone_or_hidden_gives_no_reference(tmp_path: Path, sample_jpeg: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".x.jpeg").write_bytes(sample_jpeg.read_bytes())
    for name in ("notes.txt", "gone.jpeg", ".x.jpeg"):
        assert folder_reference(str(tmp_path / name), str(tmp_path)) == (None, None)


def test_a_replaced_file_is_a_new_image(tmp_path: Path, sample_jpeg: Path) -> None:
    path = tmp_path / "x.jpeg"
    path.write_bytes(sample_jpeg.read_bytes())
    first, _ = folder_reference(str(path), str(tmp_path))
    assert folder_reference(str(path), str(tmp_path))[0] == first  # the same version, the same id
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert folder_reference(str(path), str(tmp_path))[0] != first


# ----------------------------------------------------------------------------------------------- table rows


def test_a_row_without_event_id_gets_a_uuid5_of_its_uri() -> None:
    uri = "file:///archive/a.png"
    event_id, value = table_reference({"uri": uri})
    assert event_id == table_event_id(uri) == str(uuid.uuid5(TABLE_NAMESPACE, uri))
    assert table_reference({"uri": uri}) == (event_id, value)  # reruns agree
    assert table_event_id("file:///archive/b.png") != event_id
    assert json.loads(value) == {"schema": REFERENCE_SCHEMA, "event_id": event_id, "uri": uri}


def test_a_row_with_every_contract_column_is_a_full_reference() -> None:
    row = {name: f"v-{name}" for name in CONTRACT_COLUMNS} | {"uri": "https://pacs/x", "label": "ignored"}
    event_id, value = table_reference(row)
    ref = parse_reference(value)
    assert event_id == ref.event_id == "v-event_id"
    assert ref.uri == "https://pacs/x"
    assert (ref.study_uid, ref.series_uid, ref.sop_instance_uid) == (
        "v-study_uid",
        "v-series_uid",
        "v-sop_instance_uid",
    )
    assert (ref.accession, ref.modality, ref.view_position) == ("v-accession", "v-modality", "v-view_position")
    assert "label" not in json.loads(value)


def test_blank_and_missing_cells_are_absent_fields() -> None:
    event_id, value = table_reference(
        {"uri": "file:///a.png", "event_id": "  ", "accession": None, "modality": float("nan"), "view_position": ""}
    )
    assert event_id == table_event_id("file:///a.png")
    assert set(json.loads(value)) == {"schema", "event_id", "uri"}


def test_a_row_without_uri_is_dead_lettered_by_the_parser() -> None:
    event_id, value = table_reference({"uri": None, "accession": "A1"})
    assert event_id is None
    with pytest.raises(ParseError) as caught:
        parse_reference(value)
    assert caught.value.code == ErrorCode.MISSING_FIELD
    kept, value = table_reference({"uri": "", "event_id": "e1"})
    assert kept == "e1"
    with pytest.raises(ParseError, match="'uri'"):
        parse_reference(value)


def test_columns_are_matched_case_insensitively_and_uri_is_required() -> None:
    assert column_map(["URI", "Event_ID", "label", "accession"]) == {
        "uri": "URI",
        "event_id": "Event_ID",
        "accession": "accession",
    }
    with pytest.raises(SourceError, match="no 'uri' column"):
        column_map(["path", "label"])


# ---------------------------------------------------------------------------------------- where they go to


def test_chunks_and_the_summary_line() -> None:
    assert [chunk_count(n, 8) for n in (0, 1, 8, 9, 48)] == [0, 1, 1, 2, 6]
    summary = BatchSummary(scored=40, dead_letters=2, skipped=6, not_images=1)
    assert summary.complete
    assert summary.line("out") == "scored 40, dead-lettered 2, skipped 6 (already done), not images 1 → out"
    stopped = BatchSummary(scored=8, dead_letters=0, remaining=40)
    assert not stopped.complete and "40 left" in stopped.line("out")


def test_an_output_folder_keeps_one_format(tmp_path: Path) -> None:
    assert written_formats(["part-0-c000.txt", "_SUCCESS", ".part-0-c000.txt.crc"]) == {"jsonl"}
    assert written_formats(["part-0-c000.snappy.parquet"]) == {"parquet"}
    (tmp_path / "out" / "results").mkdir(parents=True)
    (tmp_path / "out" / "results" / "part-0-c000.txt").write_text("{}\n")
    FileOutput(tmp_path / "out", "jsonl")
    with pytest.raises(OutputError, match="--format jsonl"):
        FileOutput(tmp_path / "out", "parquet")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        FileOutput(tmp_path / "file", "jsonl")
    with pytest.raises(OutputError, match="needs --output"):
        output_for(Settings.load(), None, "parquet")
