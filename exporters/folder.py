"""SRs to a folder: `FolderSink`, one file per SR named by its SOP Instance UID, written atomically."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pydicom

from exporters.errors import ExportCode, ExportError
from exporters.sinks import sop_instance_uid_of
from producers.state import write_atomic


class FolderSink:
    """Writes each SR to `<folder>/<SOPInstanceUID>.dcm`, atomically: a reader sees the whole file or none, and a
    replay overwrites the same file.

    Any OS error is `UNAVAILABLE`, retried until it passes: a full disk or an I/O error may pass, and a folder we
    may not write (EACCES, EROFS, a file in the way) is a configuration problem that the operator fixes while
    the exporter waits; dead-lettering every report meanwhile would help no one."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(os.path.abspath(folder))
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError("the SR output folder exists and is not a folder")
        self.destination = f"folder:{self.folder}"

    def store(self, sr: pydicom.Dataset, data: bytes) -> None:
        uid = sop_instance_uid_of(sr)
        try:
            write_atomic(self.folder / f"{uid}.dcm", data)
        except OSError as exc:  # its text names the file, which is named by a UID: not kept
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            why = os.strerror(exc.errno) if exc.errno else "an OS error"
            raise ExportError(
                ExportCode.UNAVAILABLE, f"the SR could not be written to the folder ({name}: {why})"
            ) from None

    def close(self) -> None:
        """Nothing is held between stores."""

    def __repr__(self) -> str:
        return f"FolderSink({self.destination!r})"
