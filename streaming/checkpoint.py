"""The streaming query's checkpoint location: proven writable before the query starts, named when it fails.

Spark writes offsets and commits there on every micro-batch; a location that cannot be written (read-only,
missing permissions, a full disk) fails the query at the first batch with a stack trace that hides the cause.
Checking first turns that into one clear line and a configuration exit code; a disk that fills while running
still fails the query (nothing is skipped), and `describe_failure` says so in plain words.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

_CAUSES = {
    "No space left on device": "the disk is full",
    "Disk quota exceeded": "the disk quota is exhausted",
    "Read-only file system": "the file system is read-only",
    "Permission denied": "permission is denied",
    "Not a directory": "a part of the path is not a folder",
}


class CheckpointError(RuntimeError):
    """The checkpoint location cannot be used; the operator must fix it (exit code 2)."""


def ensure_writable(location: Path) -> None:
    """Create the folder and write, sync and remove a probe file in it, or raise `CheckpointError`."""
    probe = location / f".cxr-probe-{uuid.uuid4().hex}"
    try:
        location.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * 4096)  # a few blocks' worth: a full disk refuses here
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as exc:
        cause = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CheckpointError(f"the checkpoint location {location} cannot be written: {cause}") from None


def describe_failure(failure: str, location: Path) -> str:
    """One line for the log: a checkpoint write failure in plain words, else the failure's first line."""
    for marker, cause in _CAUSES.items():
        if marker in failure and (str(location) in failure or "checkpoint" in failure.lower()):
            return f"the checkpoint location {location} could not be written ({cause}: {marker})"
    lines = failure.strip().splitlines()
    return lines[0][:500] if lines else "unknown failure"
