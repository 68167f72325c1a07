"""The session's configuration, without starting Spark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streaming import spark as spark_conf
from streaming.cores import available_cores
from streaming.jvm import JvmSetupError
from streaming.settings import Settings
from streaming.spark import base_conf, connector_jars, local_slots, worker_threads


@pytest.mark.parametrize(
    ("master", "slots"),
    [
        ("local", 1),
        ("local[3]", 3),
        ("local[*]", available_cores()),
        ("local[2,4]", 2),
        ("k8s://https://api:443", None),
        ("spark://host:7077", None),
        ("localhost", None),
    ],
)
def test_local_slots(master: str, slots: int | None) -> None:
    assert local_slots(master) == slots


def test_worker_threads_share_the_machine_among_local_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spark_conf, "available_cores", lambda: 8)
    settings = Settings.load()
    assert worker_threads(settings, "local[2]") == 4
    assert worker_threads(settings, "local[*]") == 1
    assert worker_threads(settings, "local[16]") == 1
    assert worker_threads(settings, "k8s://https://api:443") is None  # Spark's own: the task's cores
    assert worker_threads(settings.model_copy(update={"inference_threads": 3}), "local[*]") == 3
    assert worker_threads(settings.model_copy(update={"inference_threads": 0}), "local[2]") is None


def test_base_conf_attaches_the_connector_and_sets_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spark_conf, "available_cores", lambda: 4)
    conf = base_conf(Settings.load(spark_conf={"spark.ui.port": "4050"}), "local[2]")
    jars = conf["spark.jars"].split(",")
    assert any(Path(j).name.startswith("spark-sql-kafka-0-10_2.13-") for j in jars)
    assert all(Path(j).is_file() for j in jars)
    assert conf["spark.executorEnv.OMP_NUM_THREADS"] == "2"
    assert conf["spark.sql.execution.arrow.pyspark.enabled"] == "true"
    assert conf["spark.python.worker.reuse"] == "true"
    assert conf["spark.sql.streaming.metricsEnabled"] == "true"
    assert conf["spark.ui.port"] == "4050"  # extra settings pass through
    assert "spark.jars.packages" not in conf  # nothing is resolved at job start


def test_available_cores_follow_the_affinity_mask_not_the_machine() -> None:
    assert available_cores() == len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)


def test_connector_version_must_match_pyspark(tmp_path: Path) -> None:
    (tmp_path / "spark").mkdir()
    (tmp_path / "spark" / "spark-sql-kafka-0-10_2.13-3.5.0.jar").write_bytes(b"")
    with pytest.raises(JvmSetupError, match="does not match PySpark"):
        connector_jars(tmp_path)
    with pytest.raises(JvmSetupError, match="make install"):
        connector_jars(tmp_path / "missing")


def test_a_local_driver_jvm_skips_the_c2_compiler_and_a_cluster_keeps_it() -> None:
    local = base_conf(Settings.load(), "local[2]")["spark.driver.extraJavaOptions"]
    cluster = base_conf(Settings.load(), "spark://master:7077")["spark.driver.extraJavaOptions"]
    assert "-XX:TieredStopAtLevel=1" in local and "-Dlog4j2.configurationFile=" in local
    assert "TieredStopAtLevel" not in cluster and "-Dlog4j2.configurationFile=" in cluster
