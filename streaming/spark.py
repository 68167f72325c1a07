"""The Spark session: local mode by default, Kafka connector jars attached, tuned for a small machine.

The connector and its dependencies were resolved by Maven at install time (jvm/lib/spark); they are handed
to Spark with `spark.jars`, so a job never resolves anything from the network when it starts
(`spark.jars.packages` would). Spark's own metrics stay on in the standard way: the Prometheus servlet sink
and, for streaming queries, `spark.sql.streaming.metricsEnabled`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pyspark

from streaming.cores import available_cores
from streaming.jvm import JvmSetupError, jars

LOG4J2_CONFIG = Path(__file__).parent / "resources" / "log4j2.properties"
V1_SOURCES = "spark.sql.sources.useV1SourceList"

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from streaming.settings import Settings


def connector_jars(lib_dir: Path) -> list[Path]:
    """The connector jars, checked against the running PySpark: a mismatch fails at the first batch otherwise."""
    found = jars(lib_dir, "spark")
    connector = [p for p in found if p.name.startswith("spark-sql-kafka-0-10_")]
    if not connector:
        raise JvmSetupError(f"spark-sql-kafka-0-10 is missing from {lib_dir / 'spark'}: run 'make install'")
    expected = f"-{pyspark.__version__}.jar"
    if not connector[0].name.endswith(expected):
        raise JvmSetupError(
            f"{connector[0].name} does not match PySpark {pyspark.__version__}: run 'make install' again"
        )
    return found


def local_slots(master: str) -> int | None:
    """Concurrent tasks of a local master (`local`, `local[4]`, `local[*]`, `local[4,2]`); None if not local."""
    match = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master.strip())
    if match is None:
        return None
    slots = match.group(1)
    return available_cores() if slots == "*" else int(slots or 1)


def worker_threads(settings: Settings, master: str | None) -> int | None:
    """Threads for each Python worker's TensorFlow: configured, or in local mode the machine's cores shared
    among the task slots. None on a cluster, where Spark's default (the task's cores) is right."""
    if settings.inference_threads is not None:
        return settings.inference_threads or None
    slots = local_slots(master) if master else None
    return max(1, available_cores() // slots) if slots else None


def local_jvm(master: str | None) -> tuple[str, ...]:
    """JVM options for local mode, where the driver is also the executor and shares a few cores with the
    Python workers. The JVM only moves bytes here (Kafka, Arrow); its C2 compiler spent more CPU than it ever
    won back (measured: the C1-only JVM let the workers score 20 % more images in the first minutes)."""
    return ("-XX:TieredStopAtLevel=1",) if master is not None and local_slots(master) is not None else ()


def base_conf(settings: Settings, master: str | None = "local[*]") -> dict[str, str]:
    """The configuration every cxr-stream session starts from; `settings.spark_conf` overrides any of it."""
    conf = {
        "spark.jars": ",".join(str(p) for p in connector_jars(settings.jvm_lib_dir)),
        "spark.sql.shuffle.partitions": str(settings.spark_shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(settings.arrow_batch_size),
        "spark.python.worker.reuse": "true",
        "spark.driver.memory": settings.spark_driver_memory,
        "spark.ui.enabled": str(settings.spark_ui).lower(),
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.streaming.metricsEnabled": "true",
        "spark.ui.prometheus.enabled": "true",
        "spark.metrics.conf.*.sink.prometheusServlet.class": "org.apache.spark.metrics.sink.PrometheusServlet",
        "spark.metrics.conf.*.sink.prometheusServlet.path": "/metrics/prometheus",
        "spark.sql.adaptive.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        # Streaming queries here are long-lived and small-batched; keep the driver's state small.
        "spark.sql.streaming.minBatchesToRetain": "20",
        "spark.driver.extraJavaOptions": " ".join((f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}", *local_jvm(master))),
        "spark.sql.ui.retainedExecutions": "50",
        # Spark's default list minus kafka: batch writes to Kafka take the DataSource V2 path, the one where
        # `Dataset.observe` metrics are delivered (the V1 path never fills an Observation, which then waits
        # forever; `pipeline.BatchWriter` depends on this).
        V1_SOURCES: "avro,csv,json,orc,parquet,text",
    }
    threads = worker_threads(settings, master)
    if threads:
        conf["spark.executorEnv.OMP_NUM_THREADS"] = str(threads)
    conf.update(settings.spark_conf)
    return conf


def kafka_writes_observable(session: SparkSession) -> bool:
    """True when batch writes to Kafka go through DataSource V2 (see `V1_SOURCES` in `base_conf`)."""
    sources = session.conf.get(V1_SOURCES) or ""
    return "kafka" not in {s.strip().lower() for s in sources.split(",")}


def get_session(settings: Settings, app_name: str = "cxr-stream") -> SparkSession:
    """The session for this process (created once; later calls return the same one)."""
    from pyspark.sql import SparkSession

    # Python workers must run the interpreter (and packages) of the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    builder = SparkSession.builder.appName(app_name)
    master = settings.spark_master
    if master is None and "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        master = "local[*]"
    if master is not None:
        builder = builder.master(master)
    for key, value in base_conf(settings, master).items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel(settings.spark_log_level)
    return session
