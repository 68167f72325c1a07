"""Prometheus metrics and health for the scoring job.

Figures measured on the executors (outcomes, dead-letter reasons, latencies, inference time) travel to the
driver inside the query itself: the job attaches aggregate expressions with `Dataset.observe`, Spark computes
them per micro-batch as part of the batch, and a `StreamingQueryListener` on the driver reads them from the
progress event. Nothing is lost when a Python worker dies, and nothing is counted for a batch that failed.
Histograms are aggregated as cumulative bucket counts in Spark and exported as-is, so no per-row data
crosses to the driver.

A replayed micro-batch (after a restart from the checkpoint) is counted again: counters count references
processed, which then exceeds references received by the size of the replayed batch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from streaming.errors import KNOWN_FAILURES

log = logging.getLogger("cxr.metrics")

if TYPE_CHECKING:
    from pyspark.sql import Column

OBSERVATION = "cxr"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_HISTOGRAMS = {
    "lat": ("latency_s", LATENCY_BUCKETS),
    "inf": ("inference_s", INFERENCE_BUCKETS),
    "pre": ("preprocess_s", (*INFERENCE_BUCKETS, 5.0, 10.0)),
}


def _dead_letter_alias(stage: str, error: str) -> str:
    return f"dl__{stage}__{error}"


def observed_columns() -> list[Column]:
    """Per-batch aggregates over the scorer's outcome columns, for `DataFrame.observe(OBSERVATION, ...)`."""
    from pyspark.sql import functions as F

    def count_if(condition: Column) -> Column:
        return F.sum(F.when(condition, 1).otherwise(0))

    columns = [
        F.count(F.lit(1)).alias("rows"),
        count_if(F.col("scored")).alias("scored"),
        count_if(~F.col("scored")).alias("dead_letter"),
    ]
    for stage, error in KNOWN_FAILURES:
        condition = (F.col("stage") == stage.value) & (F.col("error") == error.value)
        columns.append(count_if(condition).alias(_dead_letter_alias(stage.value, error.value)))
    for prefix, (name, buckets) in _HISTOGRAMS.items():
        value = F.col(name)
        columns += [count_if(value <= bound).alias(f"{prefix}_le_{i}") for i, bound in enumerate(buckets)]
        columns += [F.sum(value).alias(f"{prefix}_sum"), F.count(value).alias(f"{prefix}_count")]
    columns.append(F.max("stuck_threads").alias("stuck"))
    return columns


class BucketHistogram(Collector):
    """A Prometheus histogram fed with pre-aggregated bucket counts (prometheus-client's only takes samples)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name, self.documentation, self.buckets = name, documentation, tuple(buckets)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def add(self, cumulative: Sequence[int], total: float, count: int) -> None:
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, cumulative, strict=True)]
            self._sum += total
            self._count += count

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            buckets = [(str(b), c) for b, c in zip(self.buckets, self._counts, strict=True)]
            buckets.append(("+Inf", self._count))
            family = HistogramMetricFamily(self.name, self.documentation)
            family.add_metric([], buckets, sum_value=self._sum)
        yield family


@dataclass
class QueryHealth:
    """What `/readyz` decides on: the query runs and has reported progress recently (idle queries report too)."""

    stale_after_s: float = 120.0
    clock: Callable[[], float] = time.monotonic
    active: bool = False
    failure: str | None = None
    last_progress: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def started(self) -> None:
        with self._lock:
            self.active, self.failure = True, None

    def progressed(self) -> None:
        with self._lock:
            self.last_progress = self.clock()

    def terminated(self, failure: str | None) -> None:
        with self._lock:
            self.active, self.failure = False, failure

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            if self.failure is not None:
                return False, f"query failed: {self.failure}"
            if not self.active:
                return False, "query not running"
            if self.last_progress is None:
                return False, "query started, no progress yet"
            age = self.clock() - self.last_progress
            if age > self.stale_after_s:
                return False, f"no progress for {age:.0f} s"
            return True, "ok"


class JobMetrics:
    """The job's metrics, in a registry of their own (one job per process in production, many in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # `*_created` series double the exposition and no dashboard reads them
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.references = Counter("cxr_references", "References processed, by outcome", ["outcome"], registry=r)
        self.dead_letters = Counter(
            "cxr_dead_letters", "Dead letters, by pipeline stage and error code", ["stage", "error"], registry=r
        )
        for outcome in ("scored", "dead_letter"):
            self.references.labels(outcome)
        for stage, error in KNOWN_FAILURES:
            self.dead_letters.labels(stage.value, error.value)
        self.latency = BucketHistogram(
            "cxr_end_to_end_latency_seconds",
            "From the reference's sent_at (or Kafka timestamp) to its result",
            LATENCY_BUCKETS,
        )
        self.inference = BucketHistogram(
            "cxr_inference_seconds", "Model inference time per image (batched predict, amortised)", INFERENCE_BUCKETS
        )
        self.preprocess = BucketHistogram(
            "cxr_preprocess_seconds", "Fetch, decode and preprocessing time per image", _HISTOGRAMS["pre"][1]
        )
        for collector in (self.latency, self.inference, self.preprocess):
            r.register(collector)
        self.batch_duration = Histogram(
            "cxr_batch_duration_seconds", "Wall time of each micro-batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batches = Counter("cxr_batches", "Micro-batches completed", registry=r)
        self.input_rate = Gauge("cxr_input_rows_per_second", "Rows arriving per second (last batch)", registry=r)
        self.processed_rate = Gauge(
            "cxr_processed_rows_per_second", "Rows processed per second (last batch)", registry=r
        )
        self.lag = Gauge(
            "cxr_kafka_offsets_behind_latest", "Input offsets not yet processed, summed over partitions", registry=r
        )
        self.model_info = Gauge("cxr_model_info", "The model bundle being served", ["name", "version"], registry=r)
        self.device_info = Gauge(
            "cxr_inference_device_info",
            'Devices the Python workers predict on, as they reported at warm-up: "cpu" or "gpu:<address>"',
            ["device"],
            registry=r,
        )
        self.stuck_threads = Gauge(
            "cxr_stuck_decode_threads",
            "Fetch/decode threads abandoned past their deadline and still running (most in one Python worker, "
            "last batch); at CXR_MAX_STUCK_THREADS that worker answers `unavailable`",
            registry=r,
        )
        self.query_up = Gauge("cxr_query_up", "1 while the streaming query is active", registry=r)
        self.last_progress = Gauge(
            "cxr_last_progress_timestamp_seconds", "Unix time of the last query progress report", registry=r
        )

    def set_model(self, name: str, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version).set(1)

    def set_device(self, devices: Iterable[str]) -> None:
        """The inference devices in use (one series each, value 1), replacing any reported before."""
        self.device_info.clear()
        for device in devices:
            self.device_info.labels(device).set(1)

    def record_progress(self, progress: Mapping[str, Any]) -> None:
        """Fold one `StreamingQueryProgress` (as its JSON dict) into the metrics."""
        self.batches.inc()
        self.last_progress.set(time.time())
        duration_ms = (progress.get("durationMs") or {}).get("triggerExecution")
        if duration_ms is not None:
            self.batch_duration.observe(duration_ms / 1000.0)
        self.input_rate.set(_number(progress.get("inputRowsPerSecond")))
        self.processed_rate.set(_number(progress.get("processedRowsPerSecond")))
        lag = offsets_behind_latest(progress.get("sources") or [])
        if lag is not None:
            self.lag.set(lag)
        observed = (progress.get("observedMetrics") or {}).get(OBSERVATION)
        if observed:
            self.record_observed(observed)

    def record_observed(self, row: Mapping[str, Any]) -> None:
        def n(name: str) -> int:
            return int(row.get(name) or 0)

        self.references.labels("scored").inc(n("scored"))
        self.references.labels("dead_letter").inc(n("dead_letter"))
        for stage, error in KNOWN_FAILURES:
            count = n(_dead_letter_alias(stage.value, error.value))
            if count:
                self.dead_letters.labels(stage.value, error.value).inc(count)
        for prefix, histogram in (("lat", self.latency), ("inf", self.inference), ("pre", self.preprocess)):
            buckets = [n(f"{prefix}_le_{i}") for i in range(len(histogram.buckets))]
            histogram.add(buckets, float(row.get(f"{prefix}_sum") or 0.0), n(f"{prefix}_count"))
        if n("rows"):
            self.stuck_threads.set(n("stuck"))

    def record_dead_letter(self, stage: str, error: str) -> None:
        """One dead letter written by the driver itself (a message that kills its worker)."""
        self.references.labels("dead_letter").inc()
        self.dead_letters.labels(stage, error).inc()


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number == number else 0.0  # NaN when a batch had no input


def _offsets(value: Any) -> dict[str, dict[str, int]] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def offsets_behind_latest(sources: Iterable[Mapping[str, Any]]) -> int | None:
    """Σ over Kafka partitions of (latest offset - offset processed to), from a progress's sources."""
    total, seen = 0, False
    for source in sources:
        end, latest = _offsets(source.get("endOffset")), _offsets(source.get("latestOffset"))
        if not end or not latest:
            continue
        for topic, partitions in latest.items():
            for partition, offset in partitions.items():
                done = end.get(topic, {}).get(partition)
                if done is not None:
                    total += max(0, int(offset) - int(done))
                    seen = True
    return total if seen else None


# HTTP: /metrics, /healthz, /readyz on one port ----------------------------------------------------------


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


#: Whether a process is ready, and why (what `/readyz` answers): `QueryHealth.readiness` for the scoring job, the
#: feeds' own (`producers.health`) for `cxr produce ...`.
Readiness = Callable[[], tuple[bool, str]]


def health_app(registry: CollectorRegistry, readiness: Readiness) -> Callable[..., Iterable[bytes]]:
    """`/metrics` (and `/`) from `registry`, `/healthz` (the process answers), `/readyz` as `readiness()` says."""
    prometheus = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ready, reason = readiness()
            start_response("200 OK" if ready else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [reason.encode() + b"\n"]
        if path in ("/metrics", "/"):
            return prometheus(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class HealthServer:
    """Serves `health_app` from a daemon thread: one port for Prometheus and the kubelet's probes, in any cxr
    process that has metrics (the scoring job, the feeds). Port 0 picks a free one (see `.port`)."""

    def __init__(
        self, registry: CollectorRegistry, readiness: Readiness, host: str = "0.0.0.0", port: int = 9108
    ) -> None:
        app = health_app(registry, readiness)
        self._server = make_server(host, port, app, _ThreadingWSGIServer, _QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="cxr-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class HealthPortError(RuntimeError):
    """The health port cannot be served (in use, privileged): a configuration to fix, exit code 2."""


@contextmanager
def serving_health(
    registry: CollectorRegistry,
    readiness: Readiness,
    host: str,
    port: int | None,
    setting: str,
    error: type[HealthPortError] = HealthPortError,
) -> Iterator[int | None]:
    """`/metrics`, `/healthz` and `/readyz` on `host:port` while the block runs (the bound port), or nothing when
    `port` is None. Raises `error` naming `setting` when the port cannot be bound, before anyone is contacted."""
    if port is None:
        yield None
        return
    try:
        server = HealthServer(registry, readiness, host, port).start()
    except OSError as exc:
        raise error(f"cannot serve metrics and health on {host}:{port} ({setting}): {exc.strerror or exc}") from None
    log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", host, server.port)
    try:
        yield server.port
    finally:
        server.stop()


class MetricsServer(HealthServer):
    """The scoring job's metrics and health: ready while its query runs and reports progress."""

    def __init__(self, metrics: JobMetrics, health: QueryHealth, host: str = "0.0.0.0", port: int = 9108) -> None:
        super().__init__(metrics.registry, health.readiness, host, port)
