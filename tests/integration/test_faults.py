"""Fault injection against the real broker, real Spark with the Kafka connector, the real model and X-rays.

Each test streams references at a steady pace while something goes wrong: the job SIGKILLed, the broker
stopped, a Python worker killed, a message that kills its worker, the checkpoint disk full, reads that never
end. Each ends the same way: every reference has a result or a dead letter, and duplicates stay within the
bound (at most one micro-batch per restart). The figures are printed (`pytest -s`) for the closing notes.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from probes import wait_for
from streaming import faults
from streaming.contracts import Reference, parse_timestamp
from streams import (
    JobProcess,
    SteadyProducer,
    Tally,
    answered_count,
    image_references,
    job_env,
    wait_until_answered,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.fault]
BATCH = 32  # CXR_MAX_OFFSETS_PER_TRIGGER in job_env


def report(name: str, tally: Tally, sent: list[str], **extra: object) -> None:
    details = "".join(f", {k} {v}" for k, v in extra.items())
    print(f"\n[fault] {name}: {tally.summary(sent)}{details}")


@pytest.fixture
def roots(sample_jpegs: list[Path], tmp_path: Path) -> dict[str, Path]:
    special = tmp_path / "special"
    special.mkdir()
    return {"samples": sample_jpegs[0].parent, "special": special.resolve()}


# --------------------------------------------------------------------------------------------- job killed


def test_job_sigkilled_three_times_loses_nothing(kafka_broker, topics, sample_jpegs, roots, tmp_path: Path) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    env = job_env(bootstrap, topics, [roots["samples"]], tmp_path / "checkpoint")
    job = JobProcess(env, tmp_path / "job.log").start()
    # More than the job can be sent before the third kill: references keep coming across every restart, so
    # each start has new work to be killed in the middle of; the stream stops after the last restart.
    refs = image_references(sample_jpegs, 1000)
    producer = SteadyProducer(bootstrap, topics["input_topic"], refs, rate_per_s=2.0).start()
    rng = random.Random(7)
    kills = 0
    try:
        while kills < 3:
            done = answered_count(bootstrap, topics)
            # Kill once this start has answered something more, at a random moment after that.
            assert wait_for(lambda d=done: answered_count(bootstrap, topics) > d, 240, poll_s=1.0), job.log()[-3000:]
            time.sleep(rng.uniform(0.0, 4.0))
            job.kill()
            kills += 1
            job.start()
        producer.stop()
        producer.join(60)
        tally = wait_until_answered(bootstrap, topics, producer.sent, timeout_s=300)
    finally:
        producer.stop()
        job.stop()
    report("SIGKILL x3", tally, producer.sent, restarts=kills)
    assert not tally.lost(producer.sent), job.log()[-3000:]
    assert tally.duplicates <= kills * BATCH
    assert all(code == -signal.SIGKILL for code in job.exit_codes[:kills])


# ------------------------------------------------------------------------------------------ broker outage


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[object]:
    from streaming.broker import EmbeddedBroker
    from streaming.jvm import DEFAULT_LIB_DIR

    broker = EmbeddedBroker(DEFAULT_LIB_DIR, workdir=tmp_path / "kafka")
    broker.start()
    yield broker
    broker.stop()


def test_broker_stopped_for_30_s_loses_nothing(own_broker, sample_jpegs, roots, tmp_path: Path) -> None:
    """The job rides a 30 s outage out or exits 1; a supervisor (here: this test) restarts it until done."""
    topics = {k: f"outage.{k}" for k in ("input_topic", "results_topic", "dead_letter_topic")}
    own_broker.create_topics(topics.values(), partitions=2)  # type: ignore[attr-defined]
    bootstrap = own_broker.bootstrap_servers  # type: ignore[attr-defined]
    env = job_env(bootstrap, topics, [roots["samples"]], tmp_path / "checkpoint")
    job = JobProcess(env, tmp_path / "job.log").start()
    refs = image_references(sample_jpegs, 160)
    producer = SteadyProducer(bootstrap, topics["input_topic"], refs, rate_per_s=4.0).start()
    restarts = 0
    try:
        assert wait_for(lambda: answered_count(bootstrap, topics) >= 20, 240, poll_s=1.0), job.log()[-3000:]
        own_broker.stop()  # type: ignore[attr-defined]
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 30:
            if not job.running:  # a supervisor's restart, as a Kubernetes restart policy would do
                assert job.exit_codes[-1:] != [0] and job.wait_exit(1) in (None, 1)
                restarts += 1
                job.start()
            time.sleep(1)
        own_broker.start()  # type: ignore[attr-defined]
        producer.join(300)

        def settled() -> bool:
            nonlocal restarts
            if not job.running:
                assert job.wait_exit(1) == 1, job.log()[-3000:]
                restarts += 1
                job.start()
            return not Tally.read(bootstrap, topics["results_topic"], topics["dead_letter_topic"]).lost(producer.sent)

        assert wait_for(settled, 360, poll_s=2.0), job.log()[-3000:]
        tally = wait_until_answered(bootstrap, topics, producer.sent, timeout_s=30)
    finally:
        code = job.stop()
    report("broker down 30 s", tally, producer.sent, job_restarts=restarts, exit_codes=job.exit_codes)
    assert not tally.lost(producer.sent)
    assert tally.duplicates <= (restarts + 1) * BATCH
    assert code == 0


# --------------------------------------------------------------------------------- Python workers that die


def python_workers(root_pid: int) -> list[int]:
    """PySpark worker processes (children of a `pyspark.daemon`) in the process tree under `root_pid`."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    procs = [line.split(None, 2) for line in table.splitlines() if line.strip()]
    children: dict[int, list[int]] = {}
    args = {}
    for pid, ppid, *rest in procs:
        children.setdefault(int(ppid), []).append(int(pid))
        args[int(pid)] = rest[0] if rest else ""
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    daemons = {pid for pid in tree if "pyspark.daemon" in args.get(pid, "")}
    return [pid for pid in tree if any(pid in children.get(d, []) for d in daemons)]


def test_workers_killed_mid_batch_and_a_message_that_kills_its_worker_cost_only_themselves(
    kafka_broker, topics, sample_jpegs, roots, tmp_path: Path
) -> None:
    """Two Python workers SIGKILLed from outside (an OOM kill), then a message whose decoder kills its worker.

    The first kind costs one retry of its batch; the second is found by halving and dead-lettered alone.
    """
    bootstrap = kafka_broker.bootstrap_servers
    poison = roots["special"] / f"{faults.CRASH}.jpeg"
    shutil.copy(sample_jpegs[0], poison)
    batch = 8  # small micro-batches: halving finds the poison in 4 crashes (8, 4, 2, 1), each a new worker
    env = job_env(
        bootstrap,
        topics,
        [roots["samples"], roots["special"]],
        tmp_path / "checkpoint",
        CXR_FAULT_INJECTION="true",
        CXR_MAX_OFFSETS_PER_TRIGGER=str(batch),
    )
    job = JobProcess(env, tmp_path / "job.log").start()
    refs = image_references(sample_jpegs, 120)
    bad = Reference(event_id="poison-" + uuid.uuid4().hex[:8], uri=poison.as_uri())
    refs.insert(90, bad)  # after the kills below
    producer = SteadyProducer(bootstrap, topics["input_topic"], refs, rate_per_s=10.0).start()
    killed = 0
    try:
        assert wait_for(lambda: answered_count(bootstrap, topics) >= 10, 240, poll_s=1.0), job.log()[-3000:]
        for _ in range(2):
            assert job.process is not None
            assert wait_for(lambda: bool(python_workers(job.process.pid)), 60, poll_s=0.2)  # type: ignore[union-attr]
            os.kill(random.choice(python_workers(job.process.pid)), signal.SIGKILL)
            killed += 1
            time.sleep(3)
        producer.join(120)
        tally = wait_until_answered(bootstrap, topics, producer.sent, timeout_s=420)
        assert job.running, job.log()[-3000:]  # the query rode both out: no restart needed
    finally:
        job.stop()
    report("workers killed, then a poison message", tally, producer.sent, workers_killed=killed)
    assert not tally.lost(producer.sent)
    assert {eid for eid, d in tally.dead_letters.items() if d["error"] == "worker_crashed"} == {bad.event_id}
    assert tally.dead_letters[bad.event_id]["stage"] == "score"
    assert set(tally.results) == {r.event_id for r in refs if r is not bad}
    assert tally.duplicates <= (killed + 1) * batch
    assert "worker_crashed" in job.log()


# ------------------------------------------------------------------------------------------- checkpoints


def test_an_unwritable_checkpoint_is_a_clear_error_and_exit_2(kafka_broker, topics, roots, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = job_env(kafka_broker.bootstrap_servers, topics, [roots["samples"]], blocker / "checkpoint")
    job = JobProcess(env, tmp_path / "job.log").start()
    assert job.wait_exit(60) == 2
    assert f"the checkpoint location {blocker / 'checkpoint'} cannot be written" in job.log()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (CI runs as root; a failure to mount is a failure, not a skip)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free block of the disk."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_a_full_checkpoint_disk_fails_loudly_and_loses_nothing(
    kafka_broker, topics, sample_jpegs, roots, small_disk: Path, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    env = job_env(bootstrap, topics, [roots["samples"]], small_disk / "checkpoint")
    job = JobProcess(env, tmp_path / "job.log").start()
    refs = image_references(sample_jpegs, 120)
    producer = SteadyProducer(bootstrap, topics["input_topic"], refs, rate_per_s=8.0).start()
    try:
        assert wait_for(lambda: answered_count(bootstrap, topics) >= 10, 240, poll_s=1.0), job.log()[-3000:]
        filler = fill(small_disk)
        code = job.wait_exit(180)
        assert code == 1, job.log()[-3000:]
        # `cxr run` exits 1 when its query fails, and says why in the operator's words.
        assert (
            f"the scoring query failed: the checkpoint location {small_disk / 'checkpoint'} could not be written "
            "(the disk is full" in job.log()
        )
        filler.unlink()  # the operator frees space; the restarted job resumes where the checkpoint says
        job.start()
        producer.join(120)
        tally = wait_until_answered(bootstrap, topics, producer.sent, timeout_s=300)
    finally:
        job.stop()
    report("checkpoint disk full", tally, producer.sent)
    assert not tally.lost(producer.sent)
    assert tally.duplicates <= BATCH


# ------------------------------------------------------------------------------------ reads that never end


class SlowDrip(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server that answers one byte every second, forever (until the test ends)."""

    stop = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom")
        self.end_headers()
        while not self.stop.wait(1.0):
            try:
                self.wfile.write(b"\0")
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def slow_drip() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowDrip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}"
    SlowDrip.stop.set()
    server.shutdown()
    server.server_close()


def test_reads_that_never_end_become_dead_letters_within_the_deadline(
    kafka_broker, topics, sample_jpegs, roots, slow_drip: str, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    special = roots["special"]
    fifo = special / "scan.jpeg"
    os.mkfifo(fifo)
    sock_path = special / "socket.dcm"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    hang = special / f"{faults.HANG}.jpeg"
    shutil.copy(sample_jpegs[0], hang)
    deadline_s = 4.0
    env = job_env(
        bootstrap,
        topics,
        [roots["samples"], special],
        tmp_path / "checkpoint",
        CXR_DICOMWEB_ALLOWED_HOSTS=slow_drip,
        CXR_REFERENCE_DEADLINE_S=str(deadline_s),
        CXR_FETCH_TIMEOUT_S="60",
        CXR_FAULT_INJECTION="true",
    )
    job = JobProcess(env, tmp_path / "job.log").start()
    traps = {
        "fifo": (Reference(event_id="fifo", uri=fifo.as_uri()), ("fetch", "unsupported_uri")),
        "socket": (Reference(event_id="socket", uri=sock_path.as_uri()), ("fetch", "unsupported_uri")),
        "drip": (
            Reference(event_id="drip", uri=f"http://{slow_drip}/dicom-web/studies/1/series/2/instances/3"),
            ("fetch", "timeout"),
        ),
        "hang": (Reference(event_id="hang", uri=hang.as_uri()), ("decode", "timeout")),
    }
    refs = image_references(sample_jpegs, 100)
    for i, (ref, _) in enumerate(traps.values()):
        refs.insert(20 + 25 * i, ref)
    # The job is up and warm before the clock of any trap starts.
    warm_up = SteadyProducer(bootstrap, topics["input_topic"], refs[:5], rate_per_s=50.0).start()
    producer = SteadyProducer(bootstrap, topics["input_topic"], refs[5:], rate_per_s=8.0)
    try:
        warm_up.join(60)
        assert wait_for(lambda: answered_count(bootstrap, topics) >= 5, 240, poll_s=1.0), job.log()[-3000:]
        producer.start().join(120)
        producer.sent[:0] = warm_up.sent
        tally = wait_until_answered(bootstrap, topics, producer.sent, timeout_s=300)
        assert job.running, job.log()[-3000:]
    finally:
        job.stop()
        listener.close()
    report("FIFO, socket, slow drip, hung decoder", tally, producer.sent)
    assert not tally.lost(producer.sent)
    for name, (ref, expected) in traps.items():
        letter = tally.dead_letters[ref.event_id]
        assert (letter["stage"], letter["error"]) == expected, name
        sent_at = parse_timestamp(json.loads(letter["payload"])["sent_at"])
        # Within the deadline, plus the micro-batches it queued behind on a 2-core machine.
        assert (parse_timestamp(letter["failed_at"]) - sent_at).total_seconds() < deadline_s + 30, name
    assert set(tally.results) == {r.event_id for r in refs} - {ref.event_id for ref, _ in traps.values()}
    assert tally.duplicates == 0
