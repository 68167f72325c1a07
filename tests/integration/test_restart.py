"""Crash and resume: stop the job, send more, start it again on the same checkpoint. Nothing is lost."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from probes import http_status
from streaming.contracts import Reference
from streaming.metrics import MetricsServer
from streaming.pipeline import ScoringJob

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _refs(paths: list[Path]) -> dict[str, str]:
    return {
        eid: Reference(event_id=eid, uri=p.as_uri()).to_json() for eid, p in ((str(uuid.uuid4()), p) for p in paths)
    }


def _event_ids(records: list) -> list[str]:
    return [json.loads(r.value)["event_id"] for r in records]


def test_restart_on_the_same_checkpoint_resumes_without_loss(
    spark, spark_settings, topics, produce, consume, sample_jpegs, tmp_path: Path
) -> None:
    settings = spark_settings.model_copy(
        update={**topics, "checkpoint_dir": tmp_path / "checkpoint", "allowed_roots": [sample_jpegs[0].parent]}
    )
    out = [topics["results_topic"], topics["dead_letter_topic"]]

    first = _refs(sample_jpegs[:5])
    produce(topics["input_topic"], list(first.values()))
    job = ScoringJob.create(settings, spark)
    job.start()
    assert len(consume(out, len(first), timeout_s=180)) >= len(first)
    job.stop()

    # While the job is down: more references, one of them broken.
    second = _refs(sample_jpegs[5:9])
    broken = Reference(event_id=str(uuid.uuid4()), uri=(sample_jpegs[0].parent / "missing.jpeg").as_uri())
    second[broken.event_id] = broken.to_json()
    produce(topics["input_topic"], list(second.values()))

    job = ScoringJob.create(settings, spark)
    job.start()
    try:
        records = consume(out, len(first) + len(second), timeout_s=180)
    finally:
        job.stop()
    seen = _event_ids(records)
    assert set(first) | set(second) <= set(seen)  # duplicates of a replayed batch allowed, losses not
    assert broken.event_id in _event_ids([r for r in records if r.topic == topics["dead_letter_topic"]])


def test_readyz_turns_ready_while_running_and_not_ready_when_the_query_fails(
    spark, spark_settings, topics, produce, sample_jpegs, tmp_path: Path
) -> None:
    from pydantic import SecretStr

    settings = spark_settings.model_copy(
        update={
            **topics,
            # The results topic does not exist (the broker does not auto-create): the sink must fail.
            "results_topic": f"missing.{uuid.uuid4().hex[:8]}",
            "checkpoint_dir": tmp_path / "checkpoint",
            "allowed_roots": [sample_jpegs[0].parent],
            "kafka": {"max_block_ms": SecretStr("3000")},
        }
    )
    job = ScoringJob.create(settings, spark)
    server = MetricsServer(job.metrics, job.health, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert http_status(f"{base}/healthz") == 200
        assert http_status(f"{base}/readyz") == 503  # not started yet
        job.start()
        assert job.wait_for_batches(1, timeout_s=120)
        assert http_status(f"{base}/readyz") == 200  # running, idle, progressing
        produce(topics["input_topic"], [Reference(event_id="e1", uri=sample_jpegs[0].as_uri()).to_json()])
        deadline = time.monotonic() + 120
        while job.query.isActive and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not job.query.isActive and job.query.exception() is not None
        deadline = time.monotonic() + 30
        while http_status(f"{base}/readyz") != 503 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert http_status(f"{base}/readyz") == 503
        assert http_status(f"{base}/healthz") == 200
    finally:
        job.stop()
        server.stop()


# A job SIGKILLed mid-stream (driver, JVM and Python workers at once) and started again on its checkpoint is
# tests/integration/test_faults.py's `test_job_sigkilled_three_times_loses_nothing`: three kills, nothing lost.
