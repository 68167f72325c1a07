"""The folder feed's durable cursor and deterministic event ids, without Kafka: state files written whole,
corrupt ones refused, and a feed that records only what its publisher acknowledged."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from fake_publisher import FakePublisher
from producers import folder as folder_module
from producers.folder import (
    EVENT_NAMESPACE,
    FolderCursor,
    FolderCursorStore,
    FolderFeed,
    announcements,
    event_id_for,
)
from producers.state import StateError, read_json, source_key, state_file, write_atomic

JPEG = b"\xff\xd8\xff" + b"x" * 32


def put(folder: Path, name: str, body: bytes = JPEG, mtime_s: int = 1_700_000_000) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return path


# ------------------------------------------------------------------------------------------------ state files


def test_state_files_are_named_by_feed_and_a_short_hash_of_the_source(tmp_path: Path) -> None:
    path = state_file(tmp_path, "folder", "/data/incoming")
    assert path.parent == tmp_path / "folder" and path.suffix == ".json"
    assert path.stem == source_key("/data/incoming") and len(path.stem) == 16
    assert state_file(tmp_path, "folder", "/data/other") != path
    assert state_file(tmp_path, "orthanc", "/data/incoming").name == path.name  # feeds keep their own folders


def test_write_atomic_replaces_whole_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.json"
    write_atomic(path, b'{"a": 1}')
    write_atomic(path, b'{"a": 2}')
    assert read_json(path) == {"a": 2}
    assert os.listdir(path.parent) == ["state.json"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b'{"a": 1}')

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b'{"a": 2}')
    assert read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_read_json_refuses_what_is_not_a_json_object(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(body)
    with pytest.raises(StateError, match="corrupt"):
        read_json(path)


def test_read_json_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert read_json(tmp_path / "missing.json") is None


# ------------------------------------------------------------------------------------------------- event ids


def test_event_ids_are_uuid5_of_path_size_and_mtime(tmp_path: Path) -> None:
    path = (tmp_path / "a.jpeg").resolve()
    event_id = event_id_for(path, (10, 123))
    assert uuid.UUID(event_id).version == 5
    assert event_id == str(uuid.uuid5(EVENT_NAMESPACE, f"{path.as_uri()}\n10\n123"))
    assert event_id == event_id_for(path, (10, 123))
    assert len({event_id, event_id_for(path, (11, 123)), event_id_for(path, (10, 124))}) == 3
    assert event_id_for(path.with_name("b.jpeg"), (10, 123)) != event_id


def test_event_ids_do_not_depend_on_how_the_path_is_spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path, "sub/a.jpeg")
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    monkeypatch.chdir(tmp_path)
    ids = {a.reference.event_id for a in announcements([Path("sub/a.jpeg"), tmp_path / "link" / "a.jpeg"])}
    assert len(ids) == 1


def test_announcements_carry_the_version_they_announce(tmp_path: Path) -> None:
    path = put(tmp_path, "a.jpeg")
    put(tmp_path, "notes.txt", b"not an image")
    (announcement,) = announcements([path, tmp_path / "notes.txt", tmp_path / "gone.jpeg"])
    assert announcement.path == path and announcement.signature == (len(JPEG), 1_700_000_000 * 10**9)
    assert announcement.reference.event_id == event_id_for(path.resolve(), announcement.signature)


# ---------------------------------------------------------------------------------------------------- cursor


def test_cursor_round_trips_through_json() -> None:
    cursor = FolderCursor("/data/in", {"a.jpeg": (10, 5), "sub/b é.dcm": (0, 2**62)})
    again = FolderCursor.from_json(json.loads(cursor.to_json()))
    assert again == cursor
    assert again.forget(["a.jpeg", "never.png"]) and not again.forget(["never.png"])
    assert list(again.files) == ["sub/b é.dcm"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"schema": "cxr.folder-cursor/v2", "folder": "/d", "files": {}},
        {"schema": "cxr.folder-cursor/v1", "folder": 3, "files": {}},
        {"schema": "cxr.folder-cursor/v1", "folder": "/d", "files": []},
        {"schema": "cxr.folder-cursor/v1", "folder": "/d", "files": {"a": [1]}},
        {"schema": "cxr.folder-cursor/v1", "folder": "/d", "files": {"a": [1, "2"]}},
        {"schema": "cxr.folder-cursor/v1", "folder": "/d", "files": {"a": [1, -2]}},
        {"schema": "cxr.folder-cursor/v1", "folder": "/d", "files": {"a": [True, 2]}},
    ],
)
def test_a_cursor_that_is_not_exactly_ours_is_refused(body: dict[str, object]) -> None:
    with pytest.raises(StateError):
        FolderCursor.from_json(body)


def test_store_lives_under_the_state_dir_by_resolved_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "in").mkdir()
    monkeypatch.chdir(tmp_path)
    store = FolderCursorStore.for_folder(Path("state"), Path("in"))
    assert store == FolderCursorStore.for_folder(Path("state"), tmp_path / "in" / ".." / "in")
    assert store.path.parent == Path("state") / "folder"
    assert store.folder == (tmp_path / "in").resolve()


def test_store_load_missing_is_empty_and_save_is_read_back(tmp_path: Path) -> None:
    store = FolderCursorStore.for_folder(tmp_path / "state", tmp_path)
    cursor = store.load()
    assert cursor.files == {} and cursor.folder == str(tmp_path.resolve())
    cursor.record("a.jpeg", (1, 2))
    store.save(cursor)
    assert store.load() == cursor


def test_a_corrupt_cursor_is_a_clear_error_naming_the_way_out(tmp_path: Path) -> None:
    store = FolderCursorStore.for_folder(tmp_path / "state", tmp_path)
    store.path.parent.mkdir(parents=True)
    store.path.write_text('{"schema": "cxr.folder-cursor/v1", "folder": "/x", "fil')
    with pytest.raises(StateError, match=r"corrupt.*--from-start") as info:
        store.load()
    assert str(store.path) in str(info.value)


def test_a_cursor_of_another_folder_is_refused(tmp_path: Path) -> None:
    store = FolderCursorStore.for_folder(tmp_path / "state", tmp_path)
    write_atomic(store.path, FolderCursor("/elsewhere").to_json())
    with pytest.raises(StateError, match="belongs to /elsewhere"):
        store.load()


# ------------------------------------------------------------------------------------------------------ feed


def names(publisher: FakePublisher) -> list[str]:
    return sorted(Path(r.uri).name for r in publisher.sent)


def test_feed_announces_once_and_a_restart_announces_only_what_is_new(tmp_path: Path) -> None:
    folder, state = tmp_path / "in", tmp_path / "state"
    for name in ("a.jpeg", "b.jpeg", "sub/c.jpeg"):
        put(folder, name)
    put(folder, "notes.txt", b"not an image")
    store = FolderCursorStore.for_folder(state, folder)
    first = FakePublisher()
    assert FolderFeed(folder, store, interval_s=0).run(first) == 3
    assert names(first) == ["a.jpeg", "b.jpeg", "c.jpeg"]
    assert set(store.load().files) == {"a.jpeg", "b.jpeg", "sub/c.jpeg"}

    again = FakePublisher()
    assert FolderFeed(folder, store, interval_s=0).run(again) == 0 and again.sent == []

    put(folder, "d.jpeg")
    put(folder, "a.jpeg", JPEG + b"replaced")
    (folder / "b.jpeg").unlink()
    third = FakePublisher()
    assert FolderFeed(folder, store, interval_s=0).run(third) == 2
    assert names(third) == ["a.jpeg", "d.jpeg"]
    assert set(store.load().files) == {"a.jpeg", "d.jpeg", "sub/c.jpeg"}  # b.jpeg left: forgotten
    replaced = next(r for r in third.sent if r.uri.endswith("a.jpeg"))
    assert replaced.event_id not in {r.event_id for r in first.sent}


def test_from_start_announces_everything_again_under_the_same_event_ids(tmp_path: Path) -> None:
    folder, store = tmp_path / "in", FolderCursorStore.for_folder(tmp_path / "state", tmp_path / "in")
    put(folder, "a.jpeg")
    put(folder, "b.jpeg")
    first = FakePublisher()
    FolderFeed(folder, store, interval_s=0).run(first)
    again = FakePublisher()
    assert FolderFeed(folder, store, interval_s=0, from_start=True).run(again) == 2
    assert [r.event_id for r in again.sent] == [r.event_id for r in first.sent]


def test_feed_records_only_what_kafka_acknowledged(tmp_path: Path) -> None:
    folder, store = tmp_path / "in", FolderCursorStore.for_folder(tmp_path / "state", tmp_path / "in")
    for name in ("a.jpeg", "b.jpeg", "c.jpeg"):
        put(folder, name)
    failing = FakePublisher(ack_only=1)
    with pytest.raises(RuntimeError, match="not acknowledged"):
        FolderFeed(folder, store, interval_s=0).run(failing)
    assert list(store.load().files) == ["a.jpeg"]

    retry = FakePublisher()
    assert FolderFeed(folder, store, interval_s=0).run(retry) == 2
    assert names(retry) == ["b.jpeg", "c.jpeg"]


def test_feed_saves_after_every_batch(tmp_path: Path) -> None:
    folder, store = tmp_path / "in", FolderCursorStore.for_folder(tmp_path / "state", tmp_path / "in")
    for i in range(5):
        put(folder, f"{i}.jpeg")
    failing = FakePublisher(ack_only=4)  # the third batch of two fails
    with pytest.raises(RuntimeError):
        FolderFeed(folder, store, interval_s=0, batch_size=2).run(failing)
    assert len(store.load().files) == 4


def test_a_file_still_being_written_waits_for_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, store = tmp_path / "in", FolderCursorStore.for_folder(tmp_path / "state", tmp_path / "in")
    path = put(folder, "growing.jpeg")

    def writer_appends(seconds: float) -> None:  # between the feed's two polls
        with path.open("ab") as handle:
            handle.write(b"y")

    monkeypatch.setattr(folder_module.time, "sleep", writer_appends)
    publisher = FakePublisher()
    assert FolderFeed(folder, store, interval_s=0).run(publisher) == 0 and publisher.sent == []
    assert store.load().files == {}
    monkeypatch.undo()
    later = FakePublisher()
    assert FolderFeed(folder, store, interval_s=0).run(later) == 1
    assert list(store.load().files) == ["growing.jpeg"]


def test_watch_uses_and_advances_the_same_cursor(tmp_path: Path) -> None:
    folder, store = tmp_path / "in", FolderCursorStore.for_folder(tmp_path / "state", tmp_path / "in")
    put(folder, "old.jpeg")
    FolderFeed(folder, store, interval_s=0).run(FakePublisher())
    feed = FolderFeed(folder, store, interval_s=0)
    publisher = FakePublisher()
    rounds = iter(range(10))

    def stop() -> bool:
        n = next(rounds)
        if n == 1:
            put(folder, "new.jpeg")
        return n >= 4

    feed.run(publisher, watch=True, stop=stop)
    assert names(publisher) == ["new.jpeg"]
    assert set(store.load().files) == {"old.jpeg", "new.jpeg"}


def test_a_vanished_folder_keeps_the_cursor(tmp_path: Path) -> None:
    folder, store = tmp_path / "in", FolderCursorStore.for_folder(tmp_path / "state", tmp_path / "in")
    put(folder, "a.jpeg")
    FolderFeed(folder, store, interval_s=0).run(FakePublisher())
    feed = FolderFeed(folder, store, interval_s=0)
    folder.rename(tmp_path / "unmounted")
    assert feed.run(FakePublisher()) == 0
    assert list(store.load().files) == ["a.jpeg"]
