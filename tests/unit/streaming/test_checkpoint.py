"""checkpoint: a location proven writable before the query starts, a failure named in plain words."""

from __future__ import annotations

from pathlib import Path

import pytest

from streaming.checkpoint import CheckpointError, describe_failure, ensure_writable


def test_a_writable_location_is_created_and_left_clean(tmp_path: Path) -> None:
    location = tmp_path / "a" / "b"
    ensure_writable(location)
    assert location.is_dir() and not list(location.iterdir())


def test_a_location_under_a_file_is_refused_with_the_cause(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot be written: Not a directory"):
        ensure_writable(blocker / "checkpoint")


def test_a_full_disk_in_a_failure_is_named_as_such() -> None:
    failure = "java.io.IOException: No space left on device\n at org.apache.spark.sql...HDFSMetadataLog"
    text = describe_failure(f"writing /data/checkpoint/offsets/7 failed: {failure}", Path("/data/checkpoint"))
    assert (
        text
        == "the checkpoint location /data/checkpoint could not be written (the disk is full: No space left on device)"
    )


def test_other_failures_give_their_first_line() -> None:
    assert describe_failure("Kafka went away\nstack...", Path("/c")) == "Kafka went away"
    assert describe_failure("", Path("/c")) == "unknown failure"
