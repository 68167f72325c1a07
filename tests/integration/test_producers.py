"""Producers lose nothing: `cxr produce folder` killed and restarted neither drops nor re-announces a file under
a new id, a second run announces nothing new, and a publisher rides out a broker that goes away and returns.

The kill test also puts the cursor where the worst-timed SIGKILL would leave it (Kafka acknowledged the last
batch, its cursor write never happened): a real kill lands in that window only by luck."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from probes import read_records
from producers.folder import FolderCursorStore, event_id_for, signature_of
from producers.publish import ReferencePublisher
from streaming.broker import EmbeddedBroker
from streaming.contracts import Reference, parse_timestamp
from streaming.jvm import DEFAULT_LIB_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def feed_env(kafka_broker: Any, topics: dict[str, str], state_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CXR_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "CXR_INPUT_TOPIC": topics["input_topic"],
        "CXR_STATE_DIR": str(state_dir),
    }


def produce_folder(folder: Path, env: dict[str, str], *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streaming.cli", "produce", "folder", str(folder), "--interval", "0.2", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def announced(kafka_broker: Any, topic: str, at_least: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The references on `topic` once there are `at_least` (everything there now, when `at_least` is 0)."""
    records = read_records(kafka_broker.bootstrap_servers, [topic], at_least or None, timeout_s)
    return [json.loads(r.value) for r in records]


def name_of(ref: dict[str, Any]) -> str:
    return Path(unquote(urlsplit(ref["uri"]).path)).name


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def add(folder: Path, sample: Path, name: str) -> None:
    shutil.copy(sample, folder / name)


def test_a_killed_and_restarted_watch_drops_nothing_and_keeps_event_ids(
    kafka_broker: Any, topics: dict[str, str], sample_jpegs: list[Path], tmp_path: Path
) -> None:
    folder, state = tmp_path / "incoming", tmp_path / "state"
    folder.mkdir()
    env = feed_env(kafka_broker, topics, state)
    topic = topics["input_topic"]
    samples = iter(enumerate(sample_jpegs))

    def add_next(count: int) -> None:
        for _ in range(count):
            i, sample = next(samples)
            add(folder, sample, f"xray-{i:02d}.jpeg")
            time.sleep(0.05)

    add_next(4)
    store = FolderCursorStore.for_folder(state, folder)
    proc = produce_folder(folder, env, "--watch")
    try:
        assert len(announced(kafka_broker, topic, 4)) == 4
        assert wait_for(lambda: len(store.load().files) == 4, 30)
        cursor_before_batch = store.path.read_bytes()
        add_next(3)
        assert len(announced(kafka_broker, topic, 7)) >= 7
        add_next(1)  # still being written (not yet stable) when the feed dies
        proc.kill()  # SIGKILL: no flush, no cursor write, no goodbye
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    # The worst moment for the kill: after Kafka acknowledged the last batch, before its cursor write (the
    # write is atomic, so that leaves the cursor as it was before the batch). Put the machine in that state.
    store.path.write_bytes(cursor_before_batch)
    in_cursor = set(store.load().files)
    before_restart = {name_of(r) for r in announced(kafka_broker, topic, 0)}
    in_flight = before_restart - in_cursor  # acknowledged when killed, not recorded
    assert {f"xray-{i:02d}.jpeg" for i in range(4, 7)} <= in_flight <= {f"xray-{i:02d}.jpeg" for i in range(4, 8)}

    add_next(2)  # added while the feed is down
    proc = produce_folder(folder, env, "--watch")
    try:
        time.sleep(1.0)
        add_next(2)
        every = announced(kafka_broker, topic, 12 + len(in_flight))
        names = {name_of(r) for r in every}
        assert names == {f"xray-{i:02d}.jpeg" for i in range(12)}, sorted(names)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]

    every = announced(kafka_broker, topic, 0)
    ids_per_file: dict[str, set[str]] = defaultdict(set)
    for ref in every:
        ids_per_file[name_of(ref)].add(ref["event_id"])
    assert all(len(ids) == 1 for ids in ids_per_file.values()), ids_per_file  # never under two event ids
    for name, (event_id,) in ids_per_file.items():
        path = (folder / name).resolve()
        signature = signature_of(path)
        assert signature is not None and event_id == event_id_for(path, signature)
    counts = Counter(r["event_id"] for r in every)
    repeated = {name_of(r) for r in every if counts[r["event_id"]] > 1}
    assert repeated == in_flight, (repeated, in_flight)  # announced again, under the same event ids
    assert max(counts.values()) == 2 and len(every) == 12 + len(in_flight)
    assert set(store.load().files) == {f"xray-{i:02d}.jpeg" for i in range(12)}
    assert "published" in output


def test_a_second_run_announces_nothing_new(
    kafka_broker: Any, topics: dict[str, str], sample_jpegs: list[Path], tmp_path: Path
) -> None:
    folder, state = tmp_path / "incoming", tmp_path / "state"
    folder.mkdir()
    for sample in sample_jpegs[:3]:
        add(folder, sample, sample.name)
    (folder / "README.txt").write_text("not an image")
    env = feed_env(kafka_broker, topics, state)
    topic = topics["input_topic"]

    def run(*flags: str) -> str:
        proc = produce_folder(folder, env, *flags)
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, output[-3000:]
        return output

    assert "published 3 reference(s)" in run()
    first = announced(kafka_broker, topic, 3)
    assert "published 0 reference(s)" in run()
    assert len(announced(kafka_broker, topic, 0)) == 3

    add(folder, sample_jpegs[3], "later.jpeg")
    assert "published 1 reference(s)" in run()
    assert sorted(name_of(r) for r in announced(kafka_broker, topic, 0)) == sorted(
        [*(s.name for s in sample_jpegs[:3]), "later.jpeg"]
    )

    assert "published 4 reference(s)" in run("--from-start")  # everything again, under the same event ids
    again = announced(kafka_broker, topic, 8)
    assert {r["event_id"] for r in again} == {r["event_id"] for r in first} | {
        r["event_id"] for r in again if name_of(r) == "later.jpeg"
    }
    assert len({r["event_id"] for r in again}) == 4


def test_a_corrupt_cursor_stops_the_feed_with_a_clear_error(
    kafka_broker: Any, topics: dict[str, str], sample_jpegs: list[Path], tmp_path: Path
) -> None:
    folder, state = tmp_path / "incoming", tmp_path / "state"
    folder.mkdir()
    add(folder, sample_jpegs[0], "a.jpeg")
    store = FolderCursorStore.for_folder(state, folder)
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{ truncated")
    proc = produce_folder(folder, feed_env(kafka_broker, topics, state))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, output[-3000:]
    assert str(store.path) in output and "--from-start" in output
    assert announced(kafka_broker, topics["input_topic"], 0) == []


def test_a_publisher_delivers_every_reference_across_a_broker_outage(tmp_path: Path) -> None:
    broker = EmbeddedBroker(DEFAULT_LIB_DIR, workdir=tmp_path / "kafka").start()
    try:
        broker.create_topics(["outage.references"], partitions=2)
        refs = [Reference(event_id=f"e{i:02d}", uri=f"file:///x/{i}.jpeg") for i in range(30)]
        config = {"bootstrap_servers": [broker.bootstrap_servers], "delivery_timeout_ms": 90_000}
        publisher = ReferencePublisher("outage.references", config)
        try:
            assert publisher.send_all(refs[:10]) == 10
            broker.stop()
            for ref in refs[10:20]:  # queued while the broker is away
                publisher.send(ref)
            comeback = threading.Timer(4.0, broker.start)
            comeback.start()
            started = time.monotonic()
            publisher.flush()  # retries until the broker is back; raises if anything was not acknowledged
            assert time.monotonic() - started >= 3.0
            comeback.join()
        finally:
            publisher.close()

        broker.stop()  # a publisher that starts while the broker is away waits for it
        comeback = threading.Timer(3.0, broker.start)
        comeback.start()
        with ReferencePublisher("outage.references", config) as late:
            late.send_all(refs[20:])
        comeback.join()

        records = read_records(broker.bootstrap_servers, ["outage.references"])
        assert sorted(json.loads(r.value)["event_id"] for r in records) == [r.event_id for r in refs]  # once each
    finally:
        broker.stop()


def test_the_load_generator_sends_the_count_at_the_rate_each_stamped(
    kafka_broker: Any, topics: dict[str, str], tmp_path: Path, sample_jpegs: list[Path]
) -> None:
    env = feed_env(kafka_broker, topics, tmp_path / "state")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "streaming.cli", "produce", "load", "--rate", "40", "--count", "40"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    refs = announced(kafka_broker, topics["input_topic"], 40)
    assert len(refs) == 40 and len({r["event_id"] for r in refs}) == 40
    assert {name_of(r) for r in refs} == {p.name for p in sample_jpegs}  # the sixteen samples, cycled
    sent = sorted(parse_timestamp(r["sent_at"]) for r in refs)
    assert 0.8 <= (sent[-1] - sent[0]).total_seconds() <= 3.0  # 39 intervals of 25 ms, not all at once
    assert time.monotonic() - started < 90
