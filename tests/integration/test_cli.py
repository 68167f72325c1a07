"""The `cxr` commands as an operator runs them: separate processes against the real broker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from probes import http_get, http_status
from streaming.broker import free_port
from streaming.contracts import Reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cxr(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streaming.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,  # type: ignore[arg-type]
    )


def kafka_env(kafka_broker, topics: dict[str, str]) -> dict[str, str]:
    return {
        "CXR_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        **{f"CXR_{name.upper()}": topic for name, topic in topics.items()},
    }


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_produce_folder_publishes_existing_and_new_images(kafka_broker, topics, consume, sample_jpegs, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in sample_jpegs[:2]:
        shutil.copy(path, folder / path.name)
    (folder / "README.txt").write_text("not an image")
    env = {**kafka_env(kafka_broker, topics), "CXR_STATE_DIR": str(tmp_path / "state")}
    proc = cxr("produce", "folder", str(folder), "--watch", "--interval", "0.2", env=env)
    try:
        first = consume([topics["input_topic"]], 2, timeout_s=60)
        assert len(first) == 2
        shutil.copy(sample_jpegs[2], folder / "new.jpeg")
        every = consume([topics["input_topic"]], 3, timeout_s=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    refs = [json.loads(r.value) for r in every]
    assert sorted(Path(r["uri"].removeprefix("file://")).name for r in refs) == sorted(
        [sample_jpegs[0].name, sample_jpegs[1].name, "new.jpeg"]
    )
    assert all(r["schema"] == "cxr.reference/v1" and r["sent_at"].endswith("Z") for r in refs)
    assert len({r["event_id"] for r in refs}) == 3


def test_run_scores_until_sigterm_and_exits_cleanly(kafka_broker, topics, produce, consume, sample_jpegs, tmp_path):
    """`cxr run` with the Spark UI on: our metrics and health, and Spark's own Prometheus endpoints."""
    port, ui_port = free_port(), free_port()
    env = {
        **kafka_env(kafka_broker, topics),
        "CXR_ALLOWED_ROOTS": str(sample_jpegs[0].parent),
        "CXR_CHECKPOINT_DIR": str(tmp_path / "checkpoint"),
        "CXR_METRICS_PORT": str(port),
        "CXR_SPARK_MASTER": "local[2]",
        "CXR_SPARK_DRIVER_MEMORY": "1g",
        "CXR_SPARK_UI": "true",
        "CXR_SPARK_CONF": json.dumps({"spark.ui.port": str(ui_port)}),
    }
    proc = cxr("run", env=env)
    try:
        refs = [Reference(event_id=str(uuid.uuid4()), uri=p.as_uri()) for p in sample_jpegs[:2]]
        produce(topics["input_topic"], [r.to_json() for r in refs])
        results = consume([topics["results_topic"]], 2, timeout_s=240)
        assert {json.loads(r.value)["event_id"] for r in results} == {r.event_id for r in refs}
        assert wait_for(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 60)
        assert http_status(f"http://127.0.0.1:{port}/healthz") == 200
        # Spark's native endpoints: the servlet sink (with the streaming query's gauges) and executors.
        status, text = http_get(f"http://127.0.0.1:{ui_port}/metrics/prometheus/")
        assert status == 200 and "cxr-scoring" in text.replace("_", "-")
        assert "spark-streaming" in text.replace("_", "-")
        status, text = http_get(f"http://127.0.0.1:{ui_port}/metrics/executors/prometheus")
        assert status == 200 and "metrics_executor_" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]


def test_run_exits_non_zero_when_the_query_fails(kafka_broker, topics, produce, sample_jpegs, tmp_path):
    env = {
        **kafka_env(kafka_broker, topics),
        "CXR_RESULTS_TOPIC": f"missing.{uuid.uuid4().hex[:8]}",  # not created; the broker does not auto-create
        "CXR_KAFKA__MAX_BLOCK_MS": "3000",
        "CXR_ALLOWED_ROOTS": str(sample_jpegs[0].parent),
        "CXR_CHECKPOINT_DIR": str(tmp_path / "checkpoint"),
        "CXR_METRICS_PORT": str(free_port()),
        "CXR_SPARK_MASTER": "local[1]",
        "CXR_SPARK_DRIVER_MEMORY": "1g",
    }
    produce(topics["input_topic"], [Reference(event_id="e1", uri=sample_jpegs[0].as_uri()).to_json()])
    proc = cxr("run", env=env)
    try:
        output = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 1, output[-3000:]
    assert "the scoring query failed" in output


def test_run_with_a_gpu_configured_but_not_found_exits_2_at_warm_up(tmp_path):
    """No silent CPU fallback: the workers find no GPU while warming up, before any stream (or broker) is touched."""
    env = {
        "CXR_INFERENCE_DEVICE": "gpu",
        "CXR_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # never contacted
        "CXR_CHECKPOINT_DIR": str(tmp_path / "checkpoint"),
        "CXR_METRICS_PORT": str(free_port()),
        "CXR_SPARK_MASTER": "local[1]",
        "CXR_SPARK_DRIVER_MEMORY": "1g",
    }
    proc = cxr("run", env=env)
    try:
        output = proc.communicate(timeout=240)[0]  # bounded: it fails during warm-up, well within this
    finally:
        proc.kill()
    assert proc.returncode == 2, output[-3000:]
    assert "DeviceError: no GPU found" in output
    assert "spark.task.resource.gpu.amount" in output


def test_demo_scores_the_sixteen_samples_and_exits_when_done(tmp_path):
    env = {"CXR_METRICS_PORT": "0", "CXR_WORKLIST_PORT": "0", "CXR_SPARK_DRIVER_MEMORY": "1g", "COLUMNS": "120"}
    proc = cxr("demo", "--exit-when-done", "--timeout", "300", env=env, cwd=tmp_path)
    output = proc.communicate(timeout=420)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "Worklist http://127.0.0.1:" in output  # the worklist service runs, and its queue is the table
    assert "16 scored, 0 dead-lettered, 16/16 done" in output
    assert "STAT" in output and "ROUTINE" in output
    assert "/metrics" in output
    assert "stopped cleanly" in output


def test_demo_through_an_embedded_orthanc_scores_the_sixteen_over_dicomweb(tmp_path):
    """`cxr demo --pacs`: Orthanc stores the samples as DICOM, its change feed announces them, the scorer
    fetches each over DICOMweb; a missing Orthanc would be exit 2, never a silent skip."""
    env = {"CXR_METRICS_PORT": "0", "CXR_WORKLIST_PORT": "0", "CXR_SPARK_DRIVER_MEMORY": "1g", "COLUMNS": "160"}
    proc = cxr("demo", "--pacs", "--exit-when-done", "--timeout", "300", env=env, cwd=tmp_path)
    output = proc.communicate(timeout=420)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "Orthanc" in output and "/dicom-web" in output
    assert "16 scored, 0 dead-lettered, 16/16 done" in output
    assert "stopped cleanly" in output
