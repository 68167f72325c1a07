"""An exporter's metrics and readiness: counters by outcome and error, zeros from the start, `/readyz` failing
when Kafka is silent or the same result has been retried for too long, and the health port served or refused."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request

import pytest

from exporters.errors import ExportCode
from exporters.metrics import OUTCOMES, ExportHealthError, ExportMetrics, export_health
from streaming.metrics import HealthPortError
from streaming.settings import Settings

STALE_S = 120.0


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> ExportMetrics:
    return ExportMetrics("fhir", STALE_S, clock=clock)


def sample(metrics: ExportMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"exporter": metrics.exporter, **labels})


def ready_gauge(metrics: ExportMetrics) -> float | None:
    return sample(metrics, "cxr_export_ready")


# ------------------------------------------------------------------------------------------------ readiness


def test_starting_is_not_ready_until_kafka_answers(metrics: ExportMetrics, clock: FakeClock) -> None:
    ready, reason = metrics.readiness()
    assert not ready
    assert reason.startswith("starting")
    assert ready_gauge(metrics) == 0.0
    clock.advance(10 * STALE_S)
    assert not metrics.readiness()[0]

    metrics.kafka_answered()
    assert metrics.readiness() == (True, "ok")
    assert ready_gauge(metrics) == 1.0


def test_not_ready_when_kafka_is_silent_past_stale(metrics: ExportMetrics, clock: FakeClock) -> None:
    metrics.kafka_answered()
    clock.advance(STALE_S)
    assert metrics.readiness() == (True, "ok")  # at the limit: still ready
    clock.advance(30.4)
    ready, reason = metrics.readiness()
    assert not ready
    assert reason == "no answer from Kafka for 150 s"
    assert ready_gauge(metrics) == 0.0

    metrics.kafka_answered()
    assert metrics.readiness() == (True, "ok")
    assert ready_gauge(metrics) == 1.0


def test_not_ready_when_retrying_the_same_result_past_stale(metrics: ExportMetrics, clock: FakeClock) -> None:
    metrics.kafka_answered()
    metrics.retry(ExportCode.UNAVAILABLE, "the FHIR server answered HTTP 503")
    for _ in range(4):  # Kafka keeps answering; the destination does not
        clock.advance(STALE_S / 4)
        metrics.kafka_answered()
        metrics.retry(ExportCode.UNAVAILABLE, "the FHIR server answered HTTP 503")
    assert metrics.readiness() == (True, "ok")  # retrying for exactly the limit
    clock.advance(1)
    metrics.kafka_answered()
    metrics.retry(ExportCode.UNAVAILABLE, "the FHIR server timed out")
    ready, reason = metrics.readiness()
    assert not ready
    # since the first failure, with the latest reason
    assert reason == "retrying the same result for 121 s: the FHIR server timed out"
    assert ready_gauge(metrics) == 0.0
    assert sample(metrics, "cxr_export_retrying") == 1.0

    metrics.retry_over()
    assert metrics.readiness() == (True, "ok")
    assert sample(metrics, "cxr_export_retrying") == 0.0
    assert ready_gauge(metrics) == 1.0


def test_a_finished_result_ends_the_retry(metrics: ExportMetrics, clock: FakeClock) -> None:
    metrics.kafka_answered()
    metrics.retry(ExportCode.UNAVAILABLE, "away")
    clock.advance(STALE_S + 1)
    metrics.kafka_answered()
    assert not metrics.readiness()[0]
    metrics.finished("exported", 0.2)
    assert metrics.readiness() == (True, "ok")
    assert sample(metrics, "cxr_export_retrying") == 0.0


def test_a_dead_letter_ends_the_retry(metrics: ExportMetrics, clock: FakeClock) -> None:
    metrics.kafka_answered()
    metrics.retry(ExportCode.UNAVAILABLE, "Kafka did not take the dead letter")
    clock.advance(STALE_S + 1)
    metrics.kafka_answered()
    metrics.dead_letter(ExportCode.REJECTED)
    assert metrics.readiness() == (True, "ok")


def test_a_new_retry_after_one_ended_starts_its_own_clock(metrics: ExportMetrics, clock: FakeClock) -> None:
    metrics.kafka_answered()
    metrics.retry(ExportCode.UNAVAILABLE, "first")
    clock.advance(STALE_S - 1)
    metrics.retry_over()
    clock.advance(10)
    metrics.kafka_answered()
    metrics.retry(ExportCode.UNAVAILABLE, "second")
    clock.advance(STALE_S - 1)
    metrics.kafka_answered()
    assert metrics.readiness() == (True, "ok")


def test_kafka_silence_is_reported_before_a_long_retry(metrics: ExportMetrics, clock: FakeClock) -> None:
    metrics.kafka_answered()
    metrics.retry(ExportCode.UNAVAILABLE, "away")
    clock.advance(STALE_S + 5)
    ready, reason = metrics.readiness()
    assert not ready
    assert reason.startswith("no answer from Kafka")


# ------------------------------------------------------------------------------------------------ counters


def test_every_series_starts_at_zero(metrics: ExportMetrics) -> None:
    for outcome in OUTCOMES:
        assert sample(metrics, "cxr_export_results_total", outcome=outcome) == 0.0
    assert set(OUTCOMES) == {"exported", "skipped", "dead_letter"}
    for code in ExportCode:
        if code is ExportCode.UNAVAILABLE:
            assert sample(metrics, "cxr_export_retries_total", error=code.value) == 0.0
            assert sample(metrics, "cxr_export_dead_letters_total", error=code.value) is None
        else:
            assert sample(metrics, "cxr_export_dead_letters_total", error=code.value) == 0.0
            assert sample(metrics, "cxr_export_retries_total", error=code.value) is None
    assert sample(metrics, "cxr_export_retrying") == 0.0
    assert sample(metrics, "cxr_export_offsets_behind_latest") == 0.0
    assert sample(metrics, "cxr_export_ready") == 0.0
    # not pre-registered (yet): absent until the first export is timed
    assert sample(metrics, "cxr_export_seconds_count") in (None, 0.0)
    assert sample(metrics, "cxr_export_last_success_timestamp_seconds") is None  # not 1970


def test_outcomes_are_counted(metrics: ExportMetrics) -> None:
    metrics.finished("exported", 0.05)
    metrics.finished("exported", 0.5)
    metrics.finished("skipped", 0.001)
    metrics.dead_letter(ExportCode.REJECTED)
    metrics.dead_letter(ExportCode.UNREADABLE_RESULT)
    metrics.dead_letter(ExportCode.UNREADABLE_RESULT)

    assert sample(metrics, "cxr_export_results_total", outcome="exported") == 2.0
    assert sample(metrics, "cxr_export_results_total", outcome="skipped") == 1.0
    assert sample(metrics, "cxr_export_results_total", outcome="dead_letter") == 3.0
    assert sample(metrics, "cxr_export_dead_letters_total", error="rejected") == 1.0
    assert sample(metrics, "cxr_export_dead_letters_total", error="unreadable_result") == 2.0
    assert sample(metrics, "cxr_export_dead_letters_total", error="invalid_export") == 0.0
    # only exports are timed
    assert sample(metrics, "cxr_export_seconds_count") == 2.0
    assert sample(metrics, "cxr_export_seconds_sum") == pytest.approx(0.55)
    assert sample(metrics, "cxr_export_seconds_bucket", le="0.1") == 1.0
    last = sample(metrics, "cxr_export_last_success_timestamp_seconds")
    assert last is not None and last > 1.7e9


def test_skips_and_dead_letters_are_not_a_success(metrics: ExportMetrics) -> None:
    metrics.finished("skipped", 0.1)
    metrics.dead_letter(ExportCode.INVALID_EXPORT)
    assert sample(metrics, "cxr_export_last_success_timestamp_seconds") is None
    assert sample(metrics, "cxr_export_seconds_count") in (None, 0.0)


def test_retries_and_lag(metrics: ExportMetrics) -> None:
    metrics.retry(ExportCode.UNAVAILABLE, "away")
    metrics.retry(ExportCode.UNAVAILABLE, "away")
    assert sample(metrics, "cxr_export_retries_total", error="unavailable") == 2.0
    assert sample(metrics, "cxr_export_retrying") == 1.0
    assert sample(metrics, "cxr_export_results_total", outcome="exported") == 0.0
    metrics.set_behind(42)
    assert sample(metrics, "cxr_export_offsets_behind_latest") == 42.0
    metrics.set_behind(0)
    assert sample(metrics, "cxr_export_offsets_behind_latest") == 0.0


def test_each_exporter_has_its_own_registry() -> None:
    fhir, sr = ExportMetrics("fhir"), ExportMetrics("sr")
    fhir.finished("exported")
    assert fhir.registry.get_sample_value("cxr_export_results_total", {"exporter": "fhir", "outcome": "exported"}) == 1
    assert sr.registry.get_sample_value("cxr_export_results_total", {"exporter": "sr", "outcome": "exported"}) == 0
    assert sr.registry.get_sample_value("cxr_export_results_total", {"exporter": "fhir", "outcome": "exported"}) is None


# ------------------------------------------------------------------------------------------------ the health port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def bound_port(caplog: pytest.LogCaptureFixture) -> int:
    """The port the server bound: `export_health` yields the metrics, not the port, so it is read from the
    "metrics and health on http://host:port/..." line `serving_health` logs."""
    lines = [r for r in caplog.records if r.name == "cxr.metrics" and "metrics and health on" in r.msg]
    assert len(lines) == 1
    port = lines[0].args[1]  # type: ignore[index]
    assert isinstance(port, int) and port > 0
    return port


def test_export_health_serves_metrics_healthz_and_readyz(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.load(export_metrics_port=0, metrics_host="127.0.0.1", ready_stale_after_s=30.0)
    with caplog.at_level(logging.INFO, logger="cxr.metrics"), export_health(settings, "sr") as metrics:
        port = bound_port(caplog)
        base = f"http://127.0.0.1:{port}"
        assert metrics.exporter == "sr"
        assert metrics.stale_after_s == 30.0

        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (503, "starting: Kafka has not answered yet\n")
        metrics.kafka_answered()
        metrics.finished("exported", 0.01)
        assert get(f"{base}/readyz") == (200, "ok\n")

        status, text = get(f"{base}/metrics")
        assert status == 200
        assert 'cxr_export_results_total{exporter="sr",outcome="exported"} 1.0' in text
        assert 'cxr_export_dead_letters_total{error="rejected",exporter="sr"} 0.0' in text
        assert 'cxr_export_ready{exporter="sr"} 1.0' in text
        assert 'cxr_export_retrying{exporter="sr"} 0.0' in text
    # stopped with the block
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/healthz", timeout=2)


def test_export_health_without_a_port_serves_nothing() -> None:
    settings = Settings.load(metrics_host="127.0.0.1")
    assert settings.export_metrics_port is None
    with export_health(settings, "fhir") as metrics:
        metrics.finished("skipped")
        assert sample(metrics, "cxr_export_results_total", outcome="skipped") == 1.0


def test_a_taken_port_is_a_configuration_error_naming_the_setting() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = Settings.load(export_metrics_port=port, metrics_host="127.0.0.1")
        with (
            pytest.raises(ExportHealthError, match="CXR_EXPORT_METRICS_PORT") as caught,
            export_health(settings, "fhir"),
        ):
            pytest.fail("the block must not run")
    assert isinstance(caught.value, HealthPortError)
    assert f"127.0.0.1:{port}" in str(caught.value)
