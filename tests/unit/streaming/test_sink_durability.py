"""The scorer's Kafka sink asks for durable writes: results and dead letters are acknowledged by every
in-sync replica (acks=all) and not written twice by a retried send (idempotence), unless configured otherwise.
The Python producers share the same defaults (`producers.publish.RELIABLE_DEFAULTS`)."""

from __future__ import annotations

import pytest

from producers.publish import RELIABLE_DEFAULTS, producer_config
from streaming.settings import Settings


def test_the_sink_writes_with_acks_all_and_idempotence() -> None:
    s = Settings.load(kafka_bootstrap_servers="k1:9092,k2:9092,k3:9092")
    assert s.spark_kafka_sink_options() == {
        "kafka.bootstrap.servers": "k1:9092,k2:9092,k3:9092",
        "kafka.acks": "all",
        "kafka.enable.idempotence": "true",
    }


def test_the_source_gets_no_producer_settings() -> None:
    options = Settings.load().spark_kafka_options()
    assert "kafka.acks" not in options and "kafka.enable.idempotence" not in options


def test_client_settings_pass_through_to_the_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    sink = Settings.load().spark_kafka_sink_options()
    assert sink["kafka.security.protocol"] == "SASL_SSL"
    assert (sink["kafka.acks"], sink["kafka.enable.idempotence"]) == ("all", "true")


@pytest.mark.parametrize("acks", ["all", "-1"])
def test_configured_acks_all_keeps_idempotence(monkeypatch: pytest.MonkeyPatch, acks: str) -> None:
    monkeypatch.setenv("CXR_KAFKA__ACKS", acks)
    sink = Settings.load().spark_kafka_sink_options()
    assert (sink["kafka.acks"], sink["kafka.enable.idempotence"]) == (acks, "true")


def test_a_configured_weaker_acks_wins_without_an_idempotence_the_client_would_refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CXR_KAFKA__ACKS", "1")
    sink = Settings.load().spark_kafka_sink_options()
    assert sink["kafka.acks"] == "1" and "kafka.enable.idempotence" not in sink


def test_configured_idempotence_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_KAFKA__ENABLE_IDEMPOTENCE", "false")
    assert Settings.load().spark_kafka_sink_options()["kafka.enable.idempotence"] == "false"


def test_the_python_producers_use_acks_all_and_idempotence_too() -> None:
    config = producer_config(Settings.load().kafka_python_config())
    assert RELIABLE_DEFAULTS["acks"] == "all" and config["acks"] == "all"
    assert config["enable_idempotence"] is True
