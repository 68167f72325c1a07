"""The `cxr` commands as an operator runs them: separate processes against the real broker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streaming.broker import free_port

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
