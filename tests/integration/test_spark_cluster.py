"""`cxr run --master spark://...` on a real Spark standalone cluster: a master and two workers, each its own JVM.

One job run covers the whole path a new user would try when one machine is no longer enough:
  1. the sixteen sample X-rays are scored in the workers' executors (not in the driver), with the scores local
     mode's scorer gives them; the connector jars reach the executors through Spark (fetched into their work
     folders), and so does the model bundle (its folder is deleted once the job scores; an executor started
     after that still scores);
  2. one worker's executor JVM is SIGKILLed in the middle of 120 references: every one of them ends as one
     result or dead letter (duplicates counted and bounded), and the job never stops.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probes import http_get, http_status, wait_for
from spark_cluster import EXECUTOR_CLASS, SparkCluster, free_port, process_tree
from streaming.bundle import ModelRef, read_descriptor, resolve_model_path
from streaming.contracts import Reference
from streaming.settings import default_bundle_dir
from streams import JobProcess, SteadyProducer, answered_count, image_references, job_env, wait_until_answered

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BATCH = 32  # CXR_MAX_OFFSETS_PER_TRIGGER in job_env: what one failed task may have written twice


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkCluster]:
    """A master and two workers of one core and 2 GiB each, on loopback."""
    cluster = SparkCluster(tmp_path_factory.mktemp("spark-cluster"), workers=2, cores=1, memory="2g").start()
    try:
        yield cluster
    finally:
        cluster.stop()


def bundle_copy(target: Path) -> Path:
    """The demo bundle as a self-contained folder of its own (descriptor + model file), to be deleted later."""
    source = default_bundle_dir()
    descriptor = read_descriptor(source)
    model = resolve_model_path(descriptor, source)
    target.mkdir()
    shutil.copy(model, target / model.name)
    copied = descriptor.model_copy(update={"model": ModelRef(path=model.name, format=descriptor.model.format)})
    (target / "bundle.json").write_text(copied.model_dump_json())
    return target


def local_scores(refs: list[Reference], root: Path) -> dict[str, dict[str, float]]:
    """Each reference's scores as local mode's Python worker computes them: the same packing, loading and
    `score_messages`, in this process."""
    from streaming.bundle import load_archive, pack
    from streaming.contracts import Source
    from streaming.scoring import RawMessage, score_messages, scoring_config
    from streaming.settings import Settings

    config = scoring_config(Settings.load(allowed_roots=[root]), threads=1)
    bundle = load_archive(pack(default_bundle_dir()), 1, "cpu")
    messages = [RawMessage(r.to_json(), Source("local", 0, i)) for i, r in enumerate(refs)]
    outcomes = score_messages(messages, bundle, config)
    assert all(o.scored for o in outcomes)
    return {r.event_id: json.loads(o.value)["scores"] for r, o in zip(refs, outcomes, strict=True)}


def result_scores(bootstrap: str, topic: str) -> dict[str, dict[str, float]]:
    return {body["event_id"]: body["scores"] for body in _bodies(bootstrap, topic)}


def _bodies(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    from probes import read_records

    return [json.loads(r.value) for r in read_records(bootstrap, [topic])]


class SparkRest:
    """The driver's monitoring REST API (`/api/v1`): which executors the application has, and what they ran."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def get(self, path: str) -> Any:
        status, body = http_get(f"{self.base}/{path}")
        return json.loads(body) if status == 200 else None

    def app_id(self) -> str | None:
        apps = self.get("applications")
        return apps[0]["id"] if apps else None

    def executors(self, app_id: str, every: bool = False) -> list[dict[str, Any]]:
        """Executors other than the driver: alive ones, or (`every`) also the dead."""
        listed = self.get(f"applications/{app_id}/{'allexecutors' if every else 'executors'}") or []
        return [e for e in listed if e["id"] != "driver"]


def test_scores_in_the_workers_like_local_mode_and_survives_a_killed_executor(
    spark_cluster: SparkCluster, kafka_broker: Any, topics: dict[str, str], sample_jpegs: list[Path], tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    bundle = bundle_copy(tmp_path / "bundle")
    ui_port, metrics_port = free_port(), free_port()
    env = job_env(
        bootstrap,
        topics,
        [sample_jpegs[0].parent],
        tmp_path / "checkpoint",
        CXR_MODEL_BUNDLE=str(bundle),
        CXR_SPARK_UI="true",
        CXR_SPARK_CONF=json.dumps({"spark.ui.port": str(ui_port), "spark.executor.memory": "1g"}),
        SPARK_LOCAL_IP="127.0.0.1",
        CXR_METRICS_PORT=str(metrics_port),
    )
    del env["CXR_SPARK_MASTER"]  # the flag below, as a user would give it
    job = JobProcess(env, tmp_path / "job.log", args=("--master", spark_cluster.url)).start()
    rest = SparkRest(ui_port)

    def context() -> str:
        return f"{job.log()[-3000:]}\n{spark_cluster.logs(1500)}"

    samples = image_references(sample_jpegs, 16)
    try:
        # 1. The sixteen X-rays, scored in the workers' executors.
        SteadyProducer(bootstrap, topics["input_topic"], samples, rate_per_s=100.0).start().join(60)
        first = wait_until_answered(bootstrap, topics, [r.event_id for r in samples], timeout_s=240)
        assert not first.lost([r.event_id for r in samples]), context()
        assert job.running, context()

        app_id = rest.app_id()
        assert app_id is not None, context()
        apps = spark_cluster.active_apps()
        assert [a["id"] for a in apps] == [app_id], apps  # the master runs our application...
        on_workers = [[e for e in spark_cluster.executors(w) if e["appid"] == app_id] for w in range(2)]
        assert all(len(found) == 1 for found in on_workers), on_workers  # ...in an executor on each worker
        executors = rest.executors(app_id)
        assert len(executors) == 2 and all(e["totalTasks"] > 0 for e in executors), executors
        for w in range(2):
            # The connector jars were fetched from the driver into the executor's work folder...
            fetched = {p.name for p in spark_cluster.app_work_dir(w, app_id).rglob("*.jar")}
            assert any(n.startswith("spark-sql-kafka-0-10_") for n in fetched), fetched
            assert any(n.startswith("kafka-clients-") for n in fetched), fetched
            # ...and nothing of the driver's jvm/lib is on the executor's own command line.
            commands = [args for _, args in process_tree(spark_cluster.worker_daemons[w].process.pid)]
            executor_commands = [c for c in commands if EXECUTOR_CLASS in c]
            assert executor_commands and not any("jvm/lib" in c for c in executor_commands), executor_commands
        cluster_scores = result_scores(bootstrap, topics["results_topic"])
        # Health as Kubernetes probes it, and Spark's own Prometheus endpoints: the servlet sink (with the
        # streaming query's gauges) and the executors' metrics, reported from the workers.
        assert http_status(f"http://127.0.0.1:{metrics_port}/readyz") == 200, context()
        assert http_status(f"http://127.0.0.1:{metrics_port}/healthz") == 200
        status, text = http_get(f"http://127.0.0.1:{ui_port}/metrics/prometheus/")
        names = text.replace("_", "-")
        assert status == 200 and "cxr-scoring" in names and "spark-streaming" in names
        status, text = http_get(f"http://127.0.0.1:{ui_port}/metrics/executors/prometheus")
        assert status == 200 and "metrics_executor_" in text

        # 2. The bundle is gone from disk; 120 more references; one executor JVM killed in the middle of them.
        shutil.rmtree(bundle)
        before = {e["id"] for e in executors}
        refs = image_references(sample_jpegs, 120)
        producer = SteadyProducer(bootstrap, topics["input_topic"], refs, rate_per_s=8.0).start()
        assert wait_for(lambda: answered_count(bootstrap, topics) >= 16 + 12, 120), context()
        # In the middle of a task: while the REST API shows worker 0's executor running one.
        victim = str(on_workers[0][0]["id"])
        assert wait_for(
            lambda: any(e["id"] == victim and e["activeTasks"] > 0 for e in rest.executors(app_id)), 60, poll_s=0.1
        ), context()
        killed = spark_cluster.kill_executor(0)
        # The master starts a replacement on the same worker; it gets the model from the broadcast, never from
        # the (deleted) bundle folder, and scores.
        assert wait_for(
            lambda: any(e["id"] not in before and e["completedTasks"] > 0 for e in rest.executors(app_id)), 150
        ), f"no replacement executor scored\n{context()}"
        producer.join(60)
        sent = [r.event_id for r in samples] + producer.sent
        tally = wait_until_answered(bootstrap, topics, sent, timeout_s=150)
        assert job.running, context()
        dead = [e for e in rest.executors(app_id, every=True) if not e["isActive"]]
    finally:
        code = job.stop()
    failed = sum(e["failedTasks"] for e in dead)
    print(f"\n[cluster] executor JVM {killed} killed ({failed} task(s) lost with it): {tally.summary(sent)}")
    assert not tally.lost(sent), context()
    assert not tally.dead_letters, list(tally.dead_letters.values())[:3]
    assert tally.duplicates <= 2 * BATCH
    assert [e["id"] for e in dead] and {e["id"] for e in dead} <= before
    assert code == 0, context()  # SIGTERM: stopped between micro-batches, exit 0

    # The same sixteen references, scored by local mode's scorer: the same scores.
    expected = local_scores(samples, sample_jpegs[0].parent)
    assert cluster_scores.keys() >= expected.keys()
    for event_id, scores in expected.items():
        for label, score in scores.items():
            assert cluster_scores[event_id][label] == pytest.approx(score, abs=1e-5), (event_id, label)
