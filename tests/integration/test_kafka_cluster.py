"""The scoring job on a replicated Kafka cluster: one broker SIGKILLed mid-stream costs nothing.

Three KRaft brokers on loopback (`streaming.broker.KafkaCluster`, each its own JVM), the topics replicated
three times with min.insync.replicas=2, references produced with acks=all (idempotent), the job's sink
writing with acks=all (idempotent), `cxr run` in Spark local mode as a separate process. While references
stream in, the broker that leads the input topic (the active controller too, when it leads a partition) is
SIGKILLed: its partitions move to the survivors, and every reference still ends as exactly one result or
dead letter (duplicates counted, at most one micro-batch), the job never stops, and the killed broker comes
back into the in-sync replicas. The figures are printed (`pytest -s`).

One cluster and one job run: the test machine has two cores and CI's time is short.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from probes import wait_for
from streaming.broker import KafkaCluster
from streaming.jvm import DEFAULT_LIB_DIR
from streams import (
    JobProcess,
    SteadyProducer,
    answered_count,
    image_references,
    job_env,
    wait_until_answered,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.fault]
BATCH = 32  # CXR_MAX_OFFSETS_PER_TRIGGER in job_env: the duplicate bound of one replayed micro-batch
TOPICS = {k: f"replicated.{k.removesuffix('_topic')}" for k in ("input_topic", "results_topic", "dead_letter_topic")}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    """Its own three brokers (not the suite's shared one), with small heaps: there are three JVMs of them."""
    with KafkaCluster(DEFAULT_LIB_DIR, 3, workdir=tmp_path / "kafka", heap="256m") as started:
        yield started


def min_insync_replicas(bootstrap: str, topics: list[str]) -> dict[str, str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in topics])
    finally:
        admin.close()
    return {name: described["topic"][name]["min.insync.replicas"]["value"] for name in topics}


def test_a_broker_killed_mid_stream_loses_nothing_and_the_job_rides_it_out(
    cluster: KafkaCluster, sample_jpegs: list[Path], tmp_path: Path
) -> None:
    bootstrap = cluster.bootstrap_servers
    assert len(bootstrap.split(",")) == 3
    cluster.create_topics(TOPICS.values(), partitions=2)
    for name in TOPICS.values():
        for state in cluster.partitions(name).values():
            assert len(state.replicas) == 3 and len(state.isr) == 3, (name, state)
    assert set(min_insync_replicas(bootstrap, list(TOPICS.values())).values()) == {"2"}

    job = JobProcess(
        job_env(bootstrap, TOPICS, [sample_jpegs[0].parent], tmp_path / "checkpoint"), tmp_path / "job.log"
    )
    job.start()
    # The sixteen X-rays once to see the job answer, then the stream the broker dies in the middle of.
    warm = SteadyProducer(bootstrap, TOPICS["input_topic"], image_references(sample_jpegs, 16), rate_per_s=50.0)
    stream = SteadyProducer(bootstrap, TOPICS["input_topic"], image_references(sample_jpegs, 284), rate_per_s=12.0)
    killed = 0
    try:
        warm.start().join(60)
        assert wait_for(lambda: answered_count(bootstrap, TOPICS) >= 16, 240, poll_s=1.0), job.log()[-3000:]
        stream.start()
        assert wait_for(lambda: len(stream.sent) >= 80, 60, poll_s=0.2)

        input_partitions = cluster.partitions(TOPICS["input_topic"])
        controller = cluster.active_controller()
        leaders = {state.leader for state in input_partitions.values()}
        killed = controller if controller in leaders else input_partitions[0].leader
        sent_before = warm.sent + stream.sent  # acknowledged by all in-sync replicas before the kill
        cluster.kill(killed)
        killed_at = time.monotonic()

        def moved() -> bool:
            return all(s.leader not in (killed, -1) for s in cluster.partitions(TOPICS["input_topic"]).values())

        assert wait_for(moved, 60), cluster.partitions(TOPICS["input_topic"])
        leaders_moved_s = time.monotonic() - killed_at
        caught_up = wait_until_answered(bootstrap, TOPICS, sent_before, timeout_s=120)
        assert not caught_up.lost(sent_before), job.log()[-3000:]
        caught_up_s = time.monotonic() - killed_at
        assert job.running, job.log()[-3000:]

        # Back on its folder and ports while the stream goes on: it catches up and is in sync again.
        restarted_at = time.monotonic()
        cluster.restart(killed)

        def rejoined() -> bool:
            return all(killed in s.isr for name in TOPICS.values() for s in cluster.partitions(name).values())

        assert wait_for(rejoined, 60), {name: cluster.partitions(name) for name in TOPICS.values()}
        rejoined_s = time.monotonic() - restarted_at

        stream.join(120)
        sent = warm.sent + stream.sent
        tally = wait_until_answered(bootstrap, TOPICS, sent, timeout_s=180)
        assert job.running, job.log()[-3000:]
    finally:
        code = job.stop()
    print(
        f"\n[fault] broker {killed} of 3 SIGKILLed{' (the active controller)' if killed == controller else ''}: "
        f"{tally.summary(sent)}, leaders moved in {leaders_moved_s:.1f} s, "
        f"all {len(sent_before)} sent before it answered {caught_up_s:.1f} s after it, "
        f"restarted and back in sync {rejoined_s:.1f} s later"
    )
    assert len(sent) == 300
    assert not tally.lost(sent), job.log()[-3000:]
    assert tally.duplicates <= BATCH
    assert job.exit_codes == [0] and code == 0  # it never stopped on its own: stopped once, by us, cleanly
