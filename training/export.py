"""Writing a trained bundle so that it appears whole or not at all.

Everything is written into a hidden sibling folder (`.NAME.partial-XXXX`, on the same file system) and renamed
to the target at the end: a training killed at any point leaves no half bundle where `CXR_MODEL_BUNDLE` could
point (only a hidden partial folder, safe to delete). A target that holds anything is refused unless forced;
forced, the old bundle is moved aside, the new one renamed in, and the old one deleted.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streaming.bundle import DESCRIPTOR_NAME, Descriptor


class ExportError(ValueError):
    """The bundle cannot be written where asked (a configuration error: exit 2)."""


def check_target(out: Path, force: bool) -> None:
    """Refuse a target that is a file, or a folder with anything in it, unless `force` (then only a file is
    refused: it is not ours to replace with a folder)."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"{out} exists and is not a folder")
    if not force and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; choose another --out, or --force to replace what it holds")


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """A fresh folder to write the bundle into; renamed to `out` when the block ends without an error, removed
    when it raises (or the process is interrupted)."""
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        commit(staging, out, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def commit(staging: Path, out: Path, force: bool) -> None:
    """Rename `staging` to `out`: at once when `out` is absent or empty; forced, after moving the old aside."""
    check_target(out, force)  # again: something may have been written there meanwhile
    if out.exists():
        if not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.rename(staging, out)


def write_descriptor(folder: Path, descriptor: Descriptor) -> Path:
    """bundle.json as people read it (indented, unset fields left out); read back by `read_descriptor`."""
    path = folder / DESCRIPTOR_NAME
    path.write_text(descriptor.model_dump_json(indent=2, exclude_none=True) + "\n")
    return path
