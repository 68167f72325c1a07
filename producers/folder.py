"""The folder feed: one reference per image file, now and (with watch) as new files appear.

A file is announced only once it is completely written: its size and modification time must hold still
across two polls. DICOM files are recognised by content and their UIDs read from the header (pixel data is
not read); PNG and JPEG by content too, so a stray text file is never announced.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from streaming.contracts import Reference, now_utc, rfc3339

log = logging.getLogger(__name__)
_DICOM_FIELDS = {
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "accession": "AccessionNumber",
    "modality": "Modality",
    "view_position": "ViewPosition",
}


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


def dicom_identifiers(path: Path) -> dict[str, str]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_DICOM_FIELDS.values()))
    except Exception:  # unreadable header: the scorer will dead-letter it with the reason
        return {}
    found = {}
    for name, keyword in _DICOM_FIELDS.items():
        value = ds.get(keyword)
        if value not in (None, ""):
            found[name] = str(value)
    return found


def reference_for(path: Path, kind: str) -> Reference:
    extra = dicom_identifiers(path) if kind == "dicom" else {}
    return Reference(
        event_id=str(uuid.uuid4()),
        uri=path.resolve().as_uri(),
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


def references(paths: Iterable[Path]) -> Iterator[Reference]:
    for path in paths:
        kind = image_kind(path)
        if kind is None:
            log.debug("skipping a file that is not PNG, JPEG or DICOM")
            continue
        yield reference_for(path, kind)


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
    _pending: dict[Path, tuple[int, int]] = field(default_factory=dict)

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
        gone = self.seen.keys() - set(present)
        for path in gone:
            del self.seen[path]
        return ready

    def watch(self, stop: Callable[[], bool] = lambda: False) -> Iterator[Path]:
        while not stop():
            yield from self.poll()
            time.sleep(self.interval_s)
