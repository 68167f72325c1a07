"""`/metrics`, `/healthz` and `/readyz` of an exporter (`cxr export fhir|sr`), on `CXR_EXPORT_METRICS_PORT`.

An exporter whose destination is away looks, from outside, exactly like one with nothing to export; these say
which: `cxr_export_retrying` is 1 while it waits to try the same result again, and `/readyz` fails when Kafka
has not answered, or the same result has been retried, for longer than `CXR_READY_STALE_AFTER_S`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from exporters.errors import ExportCode
from streaming.metrics import HealthPortError, serving_health
from streaming.settings import Settings

OUTCOMES = ("exported", "skipped", "dead_letter")


class ExportMetrics:
    """One exporter's counters, and its readiness."""

    def __init__(
        self, exporter: str, stale_after_s: float = 120.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.exporter = exporter
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._kafka_at: float | None = None
        self._retrying_since: float | None = None
        self._retry_reason = ""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.results = Counter(
            "cxr_export_results",
            "Results the exporter finished with: exported, skipped (nothing to export, e.g. not DICOM), dead_letter",
            ["exporter", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "cxr_export_dead_letters", "Results that cannot be exported, by error", ["exporter", "error"], registry=r
        )
        self.retries = Counter(
            "cxr_export_retries",
            "Attempts that failed and will be tried again, by error",
            ["exporter", "error"],
            registry=r,
        )
        self.retrying = Gauge(
            "cxr_export_retrying", "1 while the exporter waits to retry the same result", ["exporter"], registry=r
        )
        self.seconds = Histogram(
            "cxr_export_seconds",
            "Time to export one result (build and deliver to every destination)",
            ["exporter"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.behind = Gauge(
            "cxr_export_offsets_behind_latest", "Results on the topic not yet exported", ["exporter"], registry=r
        )
        self.last_success = Gauge(
            "cxr_export_last_success_timestamp_seconds",
            "Unix time a result was last exported",
            ["exporter"],
            registry=r,
        )
        ready = Gauge("cxr_export_ready", "1 while /readyz says ready", ["exporter"], registry=r)
        ready.labels(exporter).set_function(lambda: 1.0 if self.readiness()[0] else 0.0)
        for outcome in OUTCOMES:  # zeros, not gaps, on the dashboards
            self.results.labels(exporter, outcome)
        for code in ExportCode:
            (self.retries if code is ExportCode.UNAVAILABLE else self.dead_letters).labels(exporter, code.value)
        self.retrying.labels(exporter).set(0)
        self.behind.labels(exporter).set(0)
        self.seconds.labels(exporter)

    def finished(self, outcome: str, seconds: float | None = None) -> None:
        self.results.labels(self.exporter, outcome).inc()
        if outcome == "exported":
            self.last_success.labels(self.exporter).set_to_current_time()
            if seconds is not None:
                self.seconds.labels(self.exporter).observe(seconds)
        self.retry_over()

    def dead_letter(self, code: ExportCode) -> None:
        self.dead_letters.labels(self.exporter, code.value).inc()
        self.finished("dead_letter")

    def retry(self, code: ExportCode, reason: str) -> None:
        self.retries.labels(self.exporter, code.value).inc()
        self.retrying.labels(self.exporter).set(1)
        with self._lock:
            if self._retrying_since is None:
                self._retrying_since = self._clock()
            self._retry_reason = reason

    def retry_over(self) -> None:
        self.retrying.labels(self.exporter).set(0)
        with self._lock:
            self._retrying_since = None

    def kafka_answered(self) -> None:
        with self._lock:
            self._kafka_at = self._clock()

    def set_behind(self, count: int) -> None:
        self.behind.labels(self.exporter).set(count)

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            kafka_at, since, reason = self._kafka_at, self._retrying_since, self._retry_reason
        now = self._clock()
        if kafka_at is None:
            return False, "starting: Kafka has not answered yet"
        if now - kafka_at > self.stale_after_s:
            return False, f"no answer from Kafka for {now - kafka_at:.0f} s"
        if since is not None and now - since > self.stale_after_s:
            return False, f"retrying the same result for {now - since:.0f} s: {reason}"
        return True, "ok"


class ExportHealthError(HealthPortError):
    """The exporter's health port cannot be served: exit code 2."""


@contextmanager
def export_health(settings: Settings, exporter: str) -> Iterator[ExportMetrics]:
    """The exporter's metrics, served on `CXR_EXPORT_METRICS_PORT` while the block runs (none when unset)."""
    metrics = ExportMetrics(exporter, settings.ready_stale_after_s)
    with serving_health(
        metrics.registry,
        metrics.readiness,
        settings.metrics_host,
        settings.export_metrics_port,
        "CXR_EXPORT_METRICS_PORT",
        ExportHealthError,
    ):
        yield metrics
