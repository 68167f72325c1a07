"""The folder feed: images recognised by content, references carrying file URIs, and a watcher that waits for
files to be completely written."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from producers.folder import (
    FolderWatcher,
    UnreadableHeader,
    dicom_identifiers,
    image_kind,
    read_header,
    references,
    scan,
)
from streaming.contracts import parse_reference, parse_timestamp
from streaming.fetch import FetchPolicy, fetch

PNG_HEAD = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def write_dicom(path: Path, **identifiers: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = identifiers.get("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX
    for keyword, value in identifiers.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = 2, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = b"\x00\x40\x80\xff"
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------------------ image_kind


def test_image_kind_by_content(tmp_path: Path, sample_jpegs: list[Path]) -> None:
    (tmp_path / "a.png").write_bytes(PNG_HEAD)
    (tmp_path / "b.jpeg").write_bytes(sample_jpegs[0].read_bytes())
    write_dicom(tmp_path / "c.dcm")
    (tmp_path / "d.txt").write_text("hello")
    (tmp_path / "e.jpeg").write_bytes(b"")
    (tmp_path / "f.dcm").write_bytes(b"\x00" * 128 + b"DIC")  # cut short before the magic is complete
    assert image_kind(tmp_path / "a.png") == "png"
    assert image_kind(tmp_path / "b.jpeg") == "jpeg"
    assert image_kind(tmp_path / "c.dcm") == "dicom"
    assert image_kind(tmp_path / "d.txt") is None
    assert image_kind(tmp_path / "e.jpeg") is None
    assert image_kind(tmp_path / "f.dcm") is None


def test_image_kind_ignores_misleading_names(tmp_path: Path, sample_jpegs: list[Path]) -> None:
    (tmp_path / "scan.png").write_bytes(sample_jpegs[0].read_bytes())
    (tmp_path / "scan.jpeg").write_bytes(PNG_HEAD)
    write_dicom(tmp_path / "scan.txt")
    (tmp_path / "fake.dcm").write_text("not a dicom file, just long enough " * 10)
    assert image_kind(tmp_path / "scan.png") == "jpeg"
    assert image_kind(tmp_path / "scan.jpeg") == "png"
    assert image_kind(tmp_path / "scan.txt") == "dicom"
    assert image_kind(tmp_path / "fake.dcm") is None


def test_image_kind_of_unreadable_paths_is_none(tmp_path: Path) -> None:
    assert image_kind(tmp_path / "missing.jpeg") is None
    assert image_kind(tmp_path) is None


# ------------------------------------------------------------------------------------------------------ scan


def test_scan_skips_hidden_files_and_recurses_on_request(tmp_path: Path) -> None:
    (tmp_path / "b.jpeg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / ".partial.jpeg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.dcm").write_bytes(b"x")
    (tmp_path / "sub" / ".DS_Store").write_bytes(b"x")
    assert scan(tmp_path) == [tmp_path / "a.png", tmp_path / "b.jpeg", tmp_path / "sub" / "c.dcm"]
    assert scan(tmp_path, recursive=False) == [tmp_path / "a.png", tmp_path / "b.jpeg"]


# ------------------------------------------------------------------------------------------------ references


def test_references_for_images_only(tmp_path: Path, sample_jpegs: list[Path]) -> None:
    for path in sample_jpegs[:3]:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "x-ray #4?.png").write_bytes(PNG_HEAD)
    before = datetime.now(UTC)
    refs = list(references(scan(tmp_path)))
    after = datetime.now(UTC)

    names = sorted([p.name for p in sample_jpegs[:3]] + ["x-ray #4?.png"])
    policy = FetchPolicy(allowed_roots=(tmp_path.resolve(),))
    for ref, name in zip(refs, names, strict=True):
        assert ref.uri == (tmp_path / name).resolve().as_uri()
        assert ref.uri.startswith("file:///") and "#" not in ref.uri and "?" not in ref.uri
        assert fetch(ref.uri, policy) == (tmp_path / name).read_bytes()  # the scorer reads what was announced
        uuid.UUID(ref.event_id)
        assert ref.study_uid is None and ref.key == ref.event_id
        assert ref.sent_at is not None
        sent = parse_timestamp(ref.sent_at)
        assert before - timedelta(milliseconds=1) <= sent <= after
        assert parse_reference(ref.to_json()) == ref
    assert len({r.event_id for r in refs}) == len(refs) == 4


def test_a_file_version_keeps_its_event_id_and_a_replaced_file_gets_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG_HEAD)
    set_mtime(path, 1_700_000_000)
    first, second = list(references(scan(tmp_path))), list(references(scan(tmp_path)))
    assert first[0].uri == second[0].uri and first[0].event_id == second[0].event_id  # consumers de-duplicate
    path.write_bytes(PNG_HEAD + b"more")
    set_mtime(path, 1_700_000_000)
    (third,) = references(scan(tmp_path))
    assert third.event_id != first[0].event_id


def test_dicom_references_carry_the_header_identifiers(tmp_path: Path) -> None:
    study, series, instance = generate_uid(), generate_uid(), generate_uid()
    path = write_dicom(
        tmp_path / "image",
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        SOPInstanceUID=instance,
        AccessionNumber="ACC-17",
        Modality="DX",
        ViewPosition="PA",
        PatientName="Doe^Jane",
    )
    (ref,) = references([path])
    assert (ref.study_uid, ref.series_uid, ref.sop_instance_uid) == (study, series, instance)
    assert (ref.accession, ref.modality, ref.view_position) == ("ACC-17", "DX", "PA")
    assert ref.key == study
    assert "Doe" not in ref.to_json()


def test_dicom_without_optional_identifiers(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "bare.dcm", StudyInstanceUID="1.2.3", AccessionNumber="")
    assert dicom_identifiers(path) == {"study_uid": "1.2.3"}
    (ref,) = references([path])
    assert ref.study_uid == "1.2.3" and ref.accession is None and ref.modality is None


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_unreadable_dicom_header_still_gets_a_reference(tmp_path: Path) -> None:
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 16)
    assert dicom_identifiers(path) == {}
    (ref,) = references([path])
    assert ref.study_uid is None and ref.uri == path.resolve().as_uri()


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_one_header_reader_for_paths_bytes_and_open_files(tmp_path: Path) -> None:
    """The folder feed and the C-STORE receiver (`producers.scp.read_instance`) read headers the same way."""
    path = write_dicom(tmp_path / "a.dcm", StudyInstanceUID="1.2.3", SOPInstanceUID="1.2.3.4", Modality="DX")
    header = read_header(path)
    assert header == {
        "sop_class_uid": DX,
        "sop_instance_uid": "1.2.3.4",
        "study_uid": "1.2.3",
        "series_uid": None,
        "accession": None,
        "modality": "DX",
        "view_position": None,
    }
    assert read_header(path.read_bytes()) == header
    with path.open("rb") as handle:
        assert read_header(handle) == header
    for garbage in [b"", b"not DICOM"]:
        with pytest.raises(UnreadableHeader):
            read_header(garbage)
    # pydicom reads a truncated header as an empty one: nothing is validated here (the callers do)
    assert set(read_header(b"\x00" * 128 + b"DICM" + b"\xff" * 40).values()) == {None}


# ---------------------------------------------------------------------------------------------- FolderWatcher


def set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def test_watcher_waits_for_a_stable_file_and_yields_it_once(tmp_path: Path) -> None:
    watcher = FolderWatcher(tmp_path, interval_s=0)
    assert watcher.poll() == []
    path = tmp_path / "a.jpeg"
    path.write_bytes(b"\xff\xd8\xff" + b"x" * 10)
    set_mtime(path, 1_700_000_000)
    assert watcher.poll() == []  # seen once: maybe still being written
    assert watcher.poll() == [path]
    assert watcher.poll() == []
    # Replaced under the same name later: a new image, announced again once it is stable.
    path.write_bytes(b"\xff\xd8\xff" + b"y" * 20)
    assert watcher.poll() == []
    assert watcher.poll() == [path]
    assert watcher.poll() == []
    # Removed: forgotten.
    path.unlink()
    assert watcher.poll() == [] and path not in watcher.seen


def test_watcher_skips_files_present_at_start_and_hidden_folders(tmp_path: Path) -> None:
    old = tmp_path / "old.jpeg"
    old.write_bytes(b"\xff\xd8\xff" + b"x" * 10)
    hidden = tmp_path / ".incoming"
    hidden.mkdir()
    (hidden / "partial.jpeg").write_bytes(b"\xff\xd8\xff" + b"x" * 10)
    watcher = FolderWatcher(tmp_path, seen=dict.fromkeys([old]))
    assert watcher.poll() == [] and watcher.poll() == []


def test_watcher_waits_while_the_file_grows_or_is_touched(tmp_path: Path) -> None:
    watcher = FolderWatcher(tmp_path)
    path = tmp_path / "growing.dcm"
    path.write_bytes(b"a" * 100)
    set_mtime(path, 1_700_000_000)
    assert watcher.poll() == []
    with path.open("ab") as handle:
        handle.write(b"b" * 100)
    set_mtime(path, 1_700_000_000)  # same mtime, new size
    assert watcher.poll() == []
    set_mtime(path, 1_700_000_001)  # same size, new mtime
    assert watcher.poll() == []
    assert watcher.poll() == [path]


def test_watcher_never_yields_an_empty_file(tmp_path: Path) -> None:
    watcher = FolderWatcher(tmp_path)
    path = tmp_path / "empty.png"
    path.touch()
    set_mtime(path, 1_700_000_000)
    assert [watcher.poll() for _ in range(3)] == [[], [], []]
    path.write_bytes(PNG_HEAD)
    set_mtime(path, 1_700_000_005)
    assert watcher.poll() == []
    assert watcher.poll() == [path]


def test_watcher_handles_files_that_vanish_and_hidden_files(tmp_path: Path) -> None:
    watcher = FolderWatcher(tmp_path, recursive=False)
    gone = tmp_path / "gone.jpeg"
    gone.write_bytes(b"x")
    (tmp_path / ".tmp-upload.jpeg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "nested.jpeg").write_bytes(b"x")
    assert watcher.poll() == []
    gone.unlink()
    assert watcher.poll() == [] and watcher.poll() == []


def test_watch_yields_until_stopped(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG_HEAD)
    (tmp_path / "b.png").write_bytes(PNG_HEAD)
    polls = iter([False, False, False, True])
    watcher = FolderWatcher(tmp_path, interval_s=0)
    assert list(watcher.watch(stop=lambda: next(polls))) == [tmp_path / "a.png", tmp_path / "b.png"]


def test_watcher_announces_the_real_samples(tmp_path: Path, sample_jpegs: list[Path]) -> None:
    for path in sample_jpegs:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    watcher = FolderWatcher(tmp_path)
    assert watcher.poll() == []
    ready = watcher.poll()
    assert sorted(p.name for p in ready) == sorted(p.name for p in sample_jpegs)
    assert all(image_kind(p) == "jpeg" for p in ready)
