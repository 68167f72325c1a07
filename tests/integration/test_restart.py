"""Crash and resume: stop the job, send more, start it again on the same checkpoint. Nothing is lost.

The restart is also how a new model bundle rolls out (k8s/README.md, "Rolling out a new model"): stop between
micro-batches, start with another CXR_MODEL_BUNDLE on the same checkpoint. The job accepts it (nothing in the
checkpoint names the model), resumes after the last committed batch, and every result says which bundle scored
it."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from probes import http_status
from streaming.contracts import Reference
from streaming.metrics import MetricsServer
from streaming.pipeline import ScoringJob
from streaming.settings import default_bundle_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _refs(paths: list[Path]) -> dict[str, str]:
    return {
        eid: Reference(event_id=eid, uri=p.as_uri()).to_json() for eid, p in ((str(uuid.uuid4()), p) for p in paths)
    }


def _event_ids(records: list) -> list[str]:
    return [json.loads(r.value)["event_id"] for r in records]


NEW_VERSION = "0.3.0-rollout"


def _new_bundle(folder: Path) -> Path:
    """The demo bundle under another version: what a retrained model's bundle.json would say (same model file,
    so the test needs no second model)."""
    descriptor = json.loads((default_bundle_dir() / "bundle.json").read_text())
    descriptor["version"] = NEW_VERSION
    folder.mkdir()
    (folder / "bundle.json").write_text(json.dumps(descriptor))
    return folder


def test_restart_on_the_same_checkpoint_with_a_new_bundle_resumes_without_loss(
    spark, spark_settings, topics, produce, consume, sample_jpegs, tmp_path: Path
) -> None:
    settings = spark_settings.model_copy(
        update={**topics, "checkpoint_dir": tmp_path / "checkpoint", "allowed_roots": [sample_jpegs[0].parent]}
    )
    out = [topics["results_topic"], topics["dead_letter_topic"]]
    old_version = json.loads((default_bundle_dir() / "bundle.json").read_text())["version"]

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

    # ...and the job comes back with a new model bundle (drain, switch, resume).
    job = ScoringJob.create(settings.model_copy(update={"model_bundle": _new_bundle(tmp_path / "bundle")}), spark)
    job.start()
    try:
        records = consume(out, len(first) + len(second), timeout_s=180)
        exposition = generate_latest(job.metrics.registry).decode()
    finally:
        job.stop()
    seen = _event_ids(records)
    assert set(first) | set(second) <= set(seen)  # duplicates of a replayed batch allowed, losses not
    assert broken.event_id in _event_ids([r for r in records if r.topic == topics["dead_letter_topic"]])
    versions: dict[str, set[str]] = {}
    for body in (json.loads(r.value) for r in records if r.topic == topics["results_topic"]):
        versions.setdefault(body["event_id"], set()).add(body["model"]["version"])
    assert all(old_version in versions[e] for e in first)  # (a replayed batch may be scored again by the new)
    assert all(versions[e] == {NEW_VERSION} for e in second if e != broken.event_id)
    assert f'cxr_model_info{{name="pneumonia-xception",version="{NEW_VERSION}"}} 1.0' in exposition


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
