"""Durable state of the feeds under `CXR_STATE_DIR`: one small JSON file per feed and source.

Several feeds (and several sources of one feed) share the folder, so each file is named by its feed and a
short hash of its source. Files are replaced atomically (temporary file, fsync, rename, fsync of the folder):
after a crash or power cut a reader finds the old state or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


class StateError(RuntimeError):
    """A state file exists but cannot be used; guessing would re-announce or skip images, so we stop."""


def source_key(source: str) -> str:
    """A short, stable, file-name-safe name for a source (a folder path, a URL)."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def state_file(state_dir: Path, feed: str, source: str) -> Path:
    """`state_dir/<feed>/<hash of source>.json`."""
    return state_dir / feed / f"{source_key(source)}.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that it survives a crash whole (or not at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Makes the rename itself durable (the new directory entry), not just the file's bytes."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when there is no such file; `StateError` when it is unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read the state file {path}: {exc}") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"the state file {path} is corrupt (not JSON: {exc})") from exc
    if not isinstance(data, dict):
        raise StateError(f"the state file {path} is corrupt (not a JSON object)")
    return data
