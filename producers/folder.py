"""The folder feed: one reference per image file, now and (with watch) as new files appear.

A file is announced only once it is completely written: its size and modification time must hold still
across two polls. DICOM files are recognised by content and their UIDs read from the header (pixel data is
not read); PNG and JPEG by content too, so a stray text file is never announced.

Nothing is lost and nothing is announced twice under different ids, across crashes and restarts:

- Each version of a file has one event id, a uuid5 of its resolved path, size and mtime_ns. Announcing the
  same version again repeats the same event id, which consumers de-duplicate; a replaced file (new size or
  modification time) is a new image with a new id.
- `FolderFeed` keeps a cursor under `CXR_STATE_DIR` (`folder/<hash of the folder>.json`): the files it
  announced, with their (size, mtime_ns). It records a file only after Kafka acknowledged its reference, and
  replaces the cursor atomically. A restarted feed announces only files the cursor does not hold as they are.
- The window: a feed killed after Kafka acknowledged a batch but before the cursor was written announces that
  batch again when it restarts, under the same event ids (at-least-once, as everywhere in cxr-stream). A
  file removed from the folder is forgotten, so a file removed and put back unchanged is announced again,
  under its old event id too. A file rewritten with the very same size and mtime_ns is not noticed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from producers.pacs import tag_text
from producers.publish import Acknowledgeable, Publisher
from producers.state import StateError, read_json, state_file, write_atomic
from streaming.contracts import Reference, now_utc, rfc3339

log = logging.getLogger(__name__)
#: (size, mtime_ns): what tells one version of a file from the next.
Signature = tuple[int, int]
#: uuid5 namespace of folder-feed event ids; fixed forever, or every file would get a new id.
EVENT_NAMESPACE = uuid.UUID("d5c35fc3-a3b6-403f-be1b-451e01bc9e1b")
CURSOR_SCHEMA = "cxr.folder-cursor/v1"
#: What `read_header` reads: the `producers.pacs.Instance` field → the header keyword it is read from.
HEADER_FIELDS = {
    "sop_class_uid": "SOPClassUID",
    "sop_instance_uid": "SOPInstanceUID",
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "accession": "AccessionNumber",
    "modality": "Modality",
    "view_position": "ViewPosition",
}
#: The header fields a folder reference carries.
_REFERENCE_FIELDS = ("study_uid", "series_uid", "sop_instance_uid", "accession", "modality", "view_position")


def image_kind(path: Path) -> str | None:
    """'png', 'jpeg', 'dicom' or None, from the first bytes (never from the name)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


class UnreadableHeader(ValueError):
    """A DICOM header that cannot be read; the message never quotes header values."""


def read_header(source: Path | bytes | BinaryIO) -> dict[str, str | None]:
    """The `HEADER_FIELDS` of a DICOM Part 10 file (a path, its bytes or an open binary file), read without
    the pixel data: each without DICOM's padding (spaces, NULs), None when absent or empty. Nothing is
    validated here. `UnreadableHeader` when pydicom cannot read the header."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            BytesIO(source) if isinstance(source, bytes) else source,
            stop_before_pixels=True,
            specific_tags=list(HEADER_FIELDS.values()),
        )
        return {name: tag_text(ds.get(keyword)) for name, keyword in HEADER_FIELDS.items()}
    except Exception:  # pydicom raises many kinds; their messages may quote header values
        raise UnreadableHeader("the DICOM header cannot be read") from None


def dicom_identifiers(path: Path) -> dict[str, str]:
    """The identifiers a folder reference carries (those the header has); none when it cannot be read."""
    try:
        header = read_header(path)
    except UnreadableHeader:  # the scorer will dead-letter it with the reason
        return {}
    return {name: value for name in _REFERENCE_FIELDS if (value := header[name]) is not None}


def signature_of(path: Path) -> Signature | None:
    """(size, mtime_ns), or None when the file is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def event_id_for(resolved: Path, signature: Signature) -> str:
    """The event id of one version of a file: the same however often, and by whichever process, it is announced."""
    size, mtime_ns = signature
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{resolved.as_uri()}\n{size}\n{mtime_ns}"))


def reference_for(path: Path, kind: str, signature: Signature | None = None) -> Reference:
    """The reference announcing `path` as it is now (or as it was when `signature` was taken)."""
    resolved = path.resolve()
    if signature is None:
        stat = os.stat(resolved)
        signature = (stat.st_size, stat.st_mtime_ns)
    extra = dicom_identifiers(path) if kind == "dicom" else {}
    return Reference(
        event_id=event_id_for(resolved, signature),
        uri=resolved.as_uri(),
        sent_at=rfc3339(now_utc()),
        **extra,
    )


def scan(folder: Path, recursive: bool = True) -> list[Path]:
    """Image candidates, skipping hidden files and folders (.incoming/, .Trash/: often half-written)."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        p
        for p in folder.glob(pattern)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


class Announcement(NamedTuple):
    path: Path
    signature: Signature
    reference: Reference


def announcements(paths: Iterable[Path]) -> Iterator[Announcement]:
    """A reference for each image among `paths`, with the file version it announces.

    The version is read before the content, so a file that changes meanwhile looks changed on the next poll
    and is announced again rather than recorded as announced."""
    for path in paths:
        signature = signature_of(path)
        kind = image_kind(path) if signature is not None else None
        if signature is None or kind is None:
            log.debug("skipping a file that is gone or is not PNG, JPEG or DICOM")
            continue
        yield Announcement(path, signature, reference_for(path, kind, signature))


def references(paths: Iterable[Path]) -> Iterator[Reference]:
    for announcement in announcements(paths):
        yield announcement.reference


@dataclass
class FolderWatcher:
    """Polls a folder; yields each new file once it has stopped changing.

    A file replaced under the same name (new size or modification time) is a new image and is announced
    again; a file that disappears is forgotten, so the memory held is bounded by the folder's contents.
    """

    folder: Path
    recursive: bool = True
    interval_s: float = 1.0
    #: Files already announced, with the (size, mtime) they had then; `None` for "as found at start-up".
    seen: dict[Path, tuple[int, int] | None] = field(default_factory=dict)
    #: Files of `seen` that the last poll found gone.
    gone: list[Path] = field(default_factory=list)
    _pending: dict[Path, tuple[int, int]] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        """Files seen but not yet stable (being written)."""
        return len(self._pending)

    def poll(self) -> list[Path]:
        ready = []
        present = scan(self.folder, self.recursive)
        for path in present:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if path in self.seen:
                if self.seen[path] is None:
                    self.seen[path] = signature
                if self.seen[path] == signature:
                    continue
            if self._pending.get(path) == signature and stat.st_size > 0:
                ready.append(path)
                self.seen[path] = signature
                self._pending.pop(path, None)
            else:
                self._pending[path] = signature
        present_set = set(present)
        self.gone = sorted(self.seen.keys() - present_set)
        for path in self.gone:
            del self.seen[path]
        for path in self._pending.keys() - present_set:
            del self._pending[path]
        return ready

    def watch(self, stop: Callable[[], bool] = lambda: False) -> Iterator[Path]:
        while not stop():
            yield from self.poll()
            time.sleep(self.interval_s)


# ------------------------------------------------------------------------------------------------ the cursor


@dataclass
class FolderCursor:
    """The files of one folder already announced (and acknowledged), keyed by their path inside the folder."""

    folder: str
    files: dict[str, Signature] = field(default_factory=dict)

    def record(self, name: str, signature: Signature) -> None:
        self.files[name] = signature

    def forget(self, names: Iterable[str]) -> bool:
        """Drop files that left the folder (the cursor stays as small as the folder); True if any was held."""
        dropped = [name for name in names if self.files.pop(name, None) is not None]
        return bool(dropped)

    def to_json(self) -> bytes:
        body = {
            "schema": CURSOR_SCHEMA,
            "folder": self.folder,
            "files": {name: list(sig) for name, sig in sorted(self.files.items())},
        }
        return (json.dumps(body, ensure_ascii=False, indent=0) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "the cursor") -> FolderCursor:
        """Strict: a cursor that is not exactly what we write is corrupt, never half-trusted."""
        if data.get("schema") != CURSOR_SCHEMA:
            raise StateError(f"{where} is not a folder cursor ({CURSOR_SCHEMA}): schema {data.get('schema')!r}")
        folder, files = data.get("folder"), data.get("files")
        if not isinstance(folder, str) or not isinstance(files, dict):
            raise StateError(f"{where} is corrupt: it needs a 'folder' string and a 'files' object")
        parsed: dict[str, Signature] = {}
        for name, sig in files.items():
            if not (
                isinstance(sig, list)
                and len(sig) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sig)
            ):
                raise StateError(f"{where} is corrupt: file {name!r} has no [size, mtime_ns] pair")
            parsed[name] = (sig[0], sig[1])
        return cls(folder, parsed)


@dataclass(frozen=True)
class FolderCursorStore:
    """Where one folder's cursor lives: `state_dir/folder/<short hash of the resolved folder path>.json`."""

    path: Path
    folder: Path

    @classmethod
    def for_folder(cls, state_dir: Path, folder: Path) -> FolderCursorStore:
        resolved = folder.resolve()
        return cls(state_file(state_dir, "folder", str(resolved)), resolved)

    def load(self) -> FolderCursor:
        """The saved cursor, an empty one when there is none; `StateError` (with what to do) when corrupt."""
        try:
            data = read_json(self.path)
            if data is None:
                return FolderCursor(str(self.folder))
            cursor = FolderCursor.from_json(data, f"the cursor {self.path}")
        except StateError as exc:
            raise StateError(
                f"{exc}. Not guessing which images were announced: repair or remove it, or run with --from-start "
                "to announce every image again"
            ) from exc
        if cursor.folder != str(self.folder):
            raise StateError(f"the cursor {self.path} belongs to {cursor.folder}, not to {self.folder}")
        return cursor

    def save(self, cursor: FolderCursor) -> None:
        write_atomic(self.path, cursor.to_json())


# -------------------------------------------------------------------------------------------------- the feed


class FolderFeed:
    """Announces every image of a folder once, and with `watch` each new or replaced one, keeping a cursor.

    Without a store (or with `from_start`) it starts from nothing; with a store it records what Kafka
    acknowledged after every batch, so a restart carries on where the last acknowledged batch ended."""

    def __init__(
        self,
        folder: Path,
        store: FolderCursorStore | None,
        *,
        recursive: bool = True,
        interval_s: float = 1.0,
        from_start: bool = False,
        batch_size: int = 500,
    ) -> None:
        self.folder = folder
        self.store = store
        self.interval_s = interval_s
        self.batch_size = batch_size
        if store is None or from_start:
            self.cursor = FolderCursor(str(folder.resolve()))
        else:
            self.cursor = store.load()
        known: dict[Path, Signature | None] = {folder / name: sig for name, sig in self.cursor.files.items()}
        self.watcher = FolderWatcher(folder, recursive, interval_s, seen=known)
        self.sent = 0

    def run(self, publisher: Publisher, *, watch: bool = False, stop: Callable[[], bool] = lambda: False) -> int:
        """Announce what is new: once (two polls, so half-written files wait) or, with `watch`, until `stop`."""
        rounds = 0
        missing = False
        while True:
            rounds += 1
            if self.folder.is_dir():
                missing = False
                self._announce(publisher, self.watcher.poll())
                self._forget(self.watcher.gone)
            elif not missing:  # unmounted for a moment? keep the cursor rather than forget every file
                missing = True
                log.warning("the folder %s is not there; waiting for it", self.folder)
            if (not watch and rounds >= 2) or stop():
                break
            time.sleep(self.interval_s)
        if not watch and self.watcher.pending:
            log.warning("%d file(s) still being written; the next run will announce them", self.watcher.pending)
        return self.sent

    def _announce(self, publisher: Publisher, paths: list[Path]) -> None:
        batch: list[tuple[str, Signature, Acknowledgeable]] = []
        for announcement in announcements(paths):
            future = publisher.send(announcement.reference)
            self.watcher.seen[announcement.path] = announcement.signature  # the version announced, if it moved on
            batch.append((self._name(announcement.path), announcement.signature, future))
            if len(batch) >= self.batch_size:
                self._commit(publisher, batch)
                batch = []
        if batch:
            self._commit(publisher, batch)

    def _commit(self, publisher: Publisher, batch: list[tuple[str, Signature, Acknowledgeable]]) -> None:
        """Flush, then record what Kafka acknowledged; a failed flush still records the ones that made it."""
        try:
            publisher.flush()
        finally:
            acked = [(name, sig) for name, sig, future in batch if future.succeeded()]
            for name, sig in acked:
                self.cursor.record(name, sig)
            if acked:
                self._save()
            self.sent += len(acked)
        log.info("published %d reference(s) (%d in all)", len(acked), self.sent)

    def _forget(self, gone: list[Path]) -> None:
        if gone and self.cursor.forget(self._name(p) for p in gone):
            self._save()

    def _save(self) -> None:
        if self.store is not None:
            self.store.save(self.cursor)

    def _name(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()
