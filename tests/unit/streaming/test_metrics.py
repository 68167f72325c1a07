"""Metrics: query progress (with the observed per-batch aggregates) to Prometheus, health, and the HTTP endpoint."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streaming.errors import KNOWN_FAILURES
from streaming.metrics import (
    INFERENCE_BUCKETS,
    LATENCY_BUCKETS,
    OBSERVATION,
    JobMetrics,
    MetricsServer,
    QueryHealth,
    offsets_behind_latest,
)

PREPROCESS_BUCKETS = (*INFERENCE_BUCKETS, 5.0, 10.0)


def cumulative(values: list[float], buckets: tuple[float, ...], prefix: str) -> dict[str, Any]:
    """What `observed_columns` computes for one histogram column over a batch."""
    row: dict[str, Any] = {f"{prefix}_le_{i}": sum(v <= b for v in values) for i, b in enumerate(buckets)}
    row[f"{prefix}_sum"] = sum(values)
    row[f"{prefix}_count"] = len(values)
    return row


LATENCIES = [0.04, 0.3, 0.3, 1.5, 7.0, 1000.0]  # the last one is beyond every bucket
INFERENCES = [0.002, 0.02, 0.02, 0.2]
PREPROCESS = [0.01, 0.03, 0.6, 7.0]


def observed_row() -> dict[str, Any]:
    """One micro-batch of 9 references: 6 scored, 3 dead letters (2 not found, 1 invalid JSON)."""
    row: dict[str, Any] = {"rows": 9, "scored": 6, "dead_letter": 3}
    for stage, error in KNOWN_FAILURES:
        row[f"dl__{stage.value}__{error.value}"] = 0
    row["dl__fetch__not_found"] = 2
    row["dl__parse__invalid_json"] = 1
    row.update(cumulative(LATENCIES, LATENCY_BUCKETS, "lat"))
    row.update(cumulative(INFERENCES, INFERENCE_BUCKETS, "inf"))
    row.update(cumulative(PREPROCESS, PREPROCESS_BUCKETS, "pre"))
    return row


def progress(observed: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """A StreamingQueryProgress as Spark reports it (its JSON dict), from a Kafka source."""
    body: dict[str, Any] = {
        "id": "8c5b0b9e-5d7a-4b38-8f0e-1f6d5e1a2b3c",
        "runId": "0f3a8e4c-6b1d-4c2e-9a7f-2d8b3c4e5f60",
        "name": "cxr-scoring",
        "timestamp": "2024-05-01T10:00:00.000Z",
        "batchId": 7,
        "numInputRows": 9,
        "inputRowsPerSecond": 4.5,
        "processedRowsPerSecond": 3.0,
        "durationMs": {"addBatch": 2800, "getBatch": 1, "latestOffset": 3, "triggerExecution": 3000},
        "stateOperators": [],
        "sources": [
            {
                "description": "KafkaV2[Subscribe[cxr.references]]",
                "startOffset": json.dumps({"cxr.references": {"0": 10, "1": 20}}),
                "endOffset": json.dumps({"cxr.references": {"0": 14, "1": 25}}),
                "latestOffset": json.dumps({"cxr.references": {"0": 20, "1": 25}}),
                "numInputRows": 9,
                "inputRowsPerSecond": 4.5,
                "processedRowsPerSecond": 3.0,
            }
        ],
        "sink": {"description": "org.apache.spark.sql.kafka010.KafkaSourceProvider$KafkaTable@1", "numOutputRows": 9},
    }
    if observed is not None:
        body["observedMetrics"] = {OBSERVATION: observed}
    body.update(overrides)
    return body


def scrape(metrics: JobMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the text exposition, parsed back: {(name, sorted labels): value}."""
    text = generate_latest(metrics.registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def buckets(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> list[tuple[float, float]]:
    found = [(float(dict(labels)["le"]), v) for (n, labels), v in samples.items() if n == f"{name}_bucket" and labels]
    return sorted(found)


# ----------------------------------------------------------------------------------------- record_progress


def test_fresh_metrics_show_zeros_for_every_outcome_and_failure() -> None:
    samples = scrape(JobMetrics())
    assert value(samples, "cxr_references_total", outcome="scored") == 0
    assert value(samples, "cxr_references_total", outcome="dead_letter") == 0
    for stage, error in KNOWN_FAILURES:
        assert value(samples, "cxr_dead_letters_total", stage=stage.value, error=error.value) == 0
    assert value(samples, "cxr_end_to_end_latency_seconds_count") == 0
    assert value(samples, "cxr_end_to_end_latency_seconds_bucket", le="+Inf") == 0


def test_progress_counts_outcomes_and_dead_letters() -> None:
    metrics = JobMetrics()
    metrics.record_progress(progress(observed_row()))
    samples = scrape(metrics)
    assert value(samples, "cxr_references_total", outcome="scored") == 6
    assert value(samples, "cxr_references_total", outcome="dead_letter") == 3
    assert value(samples, "cxr_dead_letters_total", stage="fetch", error="not_found") == 2
    assert value(samples, "cxr_dead_letters_total", stage="parse", error="invalid_json") == 1
    assert value(samples, "cxr_dead_letters_total", stage="decode", error="corrupt_image") == 0
    assert value(samples, "cxr_batches_total") == 1


@pytest.mark.parametrize(
    ("name", "values", "bounds"),
    [
        ("cxr_end_to_end_latency_seconds", LATENCIES, LATENCY_BUCKETS),
        ("cxr_inference_seconds", INFERENCES, INFERENCE_BUCKETS),
        ("cxr_preprocess_seconds", PREPROCESS, PREPROCESS_BUCKETS),
    ],
)
def test_histograms_are_cumulative_with_inf_equal_to_count(
    name: str, values: list[float], bounds: tuple[float, ...]
) -> None:
    metrics = JobMetrics()
    metrics.record_progress(progress(observed_row()))
    metrics.record_progress(progress(observed_row()))  # a second batch adds up
    samples = scrape(metrics)
    found = buckets(samples, name)
    assert [b for b, _ in found] == [*bounds, math.inf]
    expected = [2 * sum(v <= b for v in values) for b in bounds] + [2 * len(values)]
    assert [c for _, c in found] == expected
    counts = [c for _, c in found]
    assert counts == sorted(counts)  # cumulative
    assert value(samples, f"{name}_count") == 2 * len(values)
    assert value(samples, f"{name}_sum") == pytest.approx(2 * sum(values))


def test_latency_beyond_the_last_bucket_is_only_in_inf() -> None:
    metrics = JobMetrics()
    metrics.record_progress(progress(observed_row()))
    found = dict(buckets(scrape(metrics), "cxr_end_to_end_latency_seconds"))
    assert found[math.inf] - found[LATENCY_BUCKETS[-1]] == 1


def test_gauges_and_batch_duration() -> None:
    metrics = JobMetrics()
    metrics.record_progress(progress(observed_row()))
    samples = scrape(metrics)
    assert value(samples, "cxr_input_rows_per_second") == 4.5
    assert value(samples, "cxr_processed_rows_per_second") == 3.0
    assert value(samples, "cxr_kafka_offsets_behind_latest") == 6  # (20-14) + (25-25)
    assert value(samples, "cxr_batch_duration_seconds_count") == 1
    assert value(samples, "cxr_batch_duration_seconds_sum") == 3.0
    assert value(samples, "cxr_batch_duration_seconds_bucket", le="2.0") == 0
    assert value(samples, "cxr_batch_duration_seconds_bucket", le="5.0") == 1
    assert value(samples, "cxr_last_progress_timestamp_seconds") > 1.7e9


def test_idle_progress_without_observed_metrics_or_rates() -> None:
    """An idle trigger reports NaN (or no) rates and no observed row: counters stay, gauges drop to 0."""
    metrics = JobMetrics()
    metrics.record_progress(progress(observed_row()))
    metrics.record_progress(
        progress(None, numInputRows=0, inputRowsPerSecond=float("nan"), processedRowsPerSecond="NaN", durationMs={})
    )
    metrics.record_progress({"batchId": 9})
    samples = scrape(metrics)
    assert value(samples, "cxr_input_rows_per_second") == 0.0
    assert value(samples, "cxr_processed_rows_per_second") == 0.0
    assert value(samples, "cxr_references_total", outcome="scored") == 6
    assert value(samples, "cxr_batches_total") == 3
    assert value(samples, "cxr_batch_duration_seconds_count") == 1
    # No source offsets in the last progress: the lag keeps its last known value.
    assert value(samples, "cxr_kafka_offsets_behind_latest") == 6


def test_observed_row_with_nulls_counts_nothing() -> None:
    """Spark reports SUM over an empty batch as null."""
    metrics = JobMetrics()
    row = {key: None for key in observed_row()}
    row["rows"] = 0
    metrics.record_progress(progress(row))
    samples = scrape(metrics)
    assert value(samples, "cxr_references_total", outcome="scored") == 0
    assert value(samples, "cxr_end_to_end_latency_seconds_count") == 0


def test_model_info_shows_only_the_current_model() -> None:
    metrics = JobMetrics()
    metrics.set_model("old", "1")
    metrics.set_model("pneumonia-xception", "0.3.0")
    samples = scrape(metrics)
    assert value(samples, "cxr_model_info", name="pneumonia-xception", version="0.3.0") == 1
    assert ("cxr_model_info", (("name", "old"), ("version", "1"))) not in samples


def test_device_info_shows_the_devices_in_use_and_only_those() -> None:
    metrics = JobMetrics()
    assert not [key for key in scrape(metrics) if key[0] == "cxr_inference_device_info"]  # none before warm-up
    metrics.set_device(["cpu"])
    metrics.set_device(["gpu:0", "gpu:1"])
    samples = scrape(metrics)
    assert value(samples, "cxr_inference_device_info", device="gpu:0") == 1
    assert value(samples, "cxr_inference_device_info", device="gpu:1") == 1
    assert ("cxr_inference_device_info", (("device", "cpu"),)) not in samples


def test_registries_are_independent() -> None:
    first, second = JobMetrics(), JobMetrics()
    first.record_progress(progress(observed_row()))
    assert value(scrape(second), "cxr_references_total", outcome="scored") == 0


# ---------------------------------------------------------------------------------- offsets_behind_latest


def test_offsets_behind_latest_sums_partitions_and_sources() -> None:
    sources = [
        {"endOffset": {"a": {"0": 5, "1": 7}}, "latestOffset": {"a": {"0": 10, "1": 7}}},
        {"endOffset": json.dumps({"b": {"0": 1}}), "latestOffset": json.dumps({"b": {"0": 4}})},
    ]
    assert offsets_behind_latest(sources) == 5 + 0 + 3


def test_offsets_behind_latest_never_negative_and_ignores_unknown_partitions() -> None:
    sources = [{"endOffset": {"a": {"0": 12}}, "latestOffset": {"a": {"0": 10, "1": 99}, "b": {"0": 5}}}]
    assert offsets_behind_latest(sources) == 0


@pytest.mark.parametrize(
    "sources",
    [
        [],
        [{"description": "rate source"}],
        [{"endOffset": None, "latestOffset": None}],
        [{"endOffset": "{not json", "latestOffset": "{}"}],
        [{"endOffset": json.dumps({"a": {"0": 1}}), "latestOffset": None}],
        [{"endOffset": "42", "latestOffset": "43"}],
    ],
)
def test_offsets_behind_latest_is_none_without_kafka_offsets(sources: list[dict[str, Any]]) -> None:
    assert offsets_behind_latest(sources) is None


# ---------------------------------------------------------------------------------------------- QueryHealth


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_readiness_transitions() -> None:
    clock = FakeClock()
    health = QueryHealth(stale_after_s=60.0, clock=clock)
    assert health.readiness() == (False, "query not running")
    health.started()
    ready, reason = health.readiness()
    assert not ready and "no progress" in reason
    health.progressed()
    assert health.readiness() == (True, "ok")
    clock.now += 60.0
    assert health.readiness() == (True, "ok")  # exactly at the limit is still fresh
    clock.now += 30.0
    ready, reason = health.readiness()
    assert not ready and "90 s" in reason
    health.progressed()
    assert health.readiness() == (True, "ok")
    health.terminated("StreamingQueryException: boom")
    ready, reason = health.readiness()
    assert not ready and "boom" in reason
    health.started()  # a restart clears the failure
    assert health.readiness() == (True, "ok")
    health.terminated(None)
    assert health.readiness() == (False, "query not running")


# -------------------------------------------------------------------------------------------- HTTP endpoint


@pytest.fixture
def served() -> Iterator[tuple[str, JobMetrics, QueryHealth]]:
    metrics, health = JobMetrics(), QueryHealth()
    server = MetricsServer(metrics, health, host="127.0.0.1", port=0).start()
    assert server.port > 0
    yield f"http://127.0.0.1:{server.port}", metrics, health
    server.stop()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def test_http_endpoints(served: tuple[str, JobMetrics, QueryHealth]) -> None:
    base, metrics, health = served
    assert get(f"{base}/healthz")[:1] == (200,)
    status, _, body = get(f"{base}/readyz")
    assert status == 503 and "not running" in body
    health.started()
    health.progressed()
    status, _, body = get(f"{base}/readyz")
    assert (status, body.strip()) == (200, "ok")

    metrics.record_progress(progress(observed_row()))
    status, content_type, body = get(f"{base}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert {"cxr_references", "cxr_dead_letters", "cxr_end_to_end_latency_seconds", "cxr_inference_seconds"} <= set(
        families
    )
    scored = [s for s in families["cxr_references"].samples if s.labels.get("outcome") == "scored"]
    assert scored[0].value == 6

    status, _, body = get(f"{base}/nope")
    assert status == 404


def test_stuck_threads_follow_the_last_batch_and_an_empty_batch_leaves_them() -> None:
    metrics = JobMetrics()
    metrics.record_observed({**observed_row(), "stuck": 3})
    assert value(scrape(metrics), "cxr_stuck_decode_threads") == 3
    metrics.record_observed({"rows": 0, "stuck": None})  # a batch without rows says nothing about workers
    assert value(scrape(metrics), "cxr_stuck_decode_threads") == 3
    metrics.record_observed({**observed_row(), "stuck": 0})
    assert value(scrape(metrics), "cxr_stuck_decode_threads") == 0


def test_a_dead_letter_written_by_the_driver_is_counted() -> None:
    metrics = JobMetrics()
    metrics.record_dead_letter("score", "worker_crashed")
    samples = scrape(metrics)
    assert value(samples, "cxr_dead_letters_total", stage="score", error="worker_crashed") == 1
    assert value(samples, "cxr_references_total", outcome="dead_letter") == 1
    assert value(samples, "cxr_dead_letters_total", stage="decode", error="timeout") == 0  # pre-registered
