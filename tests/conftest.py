"""Fixtures shared by the whole suite: the real sample X-rays, one Kafka broker and one Spark session.

The broker and Spark are started once per test run (they are the slow parts) and shared; tests isolate
themselves with topics and checkpoints of their own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streaming.settings import Settings, sample_images_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return sample_images_dir()


@pytest.fixture(scope="session")
def sample_jpegs(sample_dir: Path) -> list[Path]:
    paths = sorted(sample_dir.glob("*.jpeg"))
    assert len(paths) == 16, "the model package should ship sixteen sample chest X-rays"
    return paths


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from streaming.broker import EmbeddedBroker
    from streaming.jvm import DEFAULT_LIB_DIR

    broker = EmbeddedBroker(DEFAULT_LIB_DIR, workdir=tmp_path_factory.mktemp("kafka"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def topics(kafka_broker: object) -> dict[str, str]:
    """Fresh input/results/dead-letter topics for one test, on the shared broker."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "input_topic": f"test.references.{suffix}",
        "results_topic": f"test.results.{suffix}",
        "dead_letter_topic": f"test.dead-letter.{suffix}",
    }
    kafka_broker.create_topics(names.values(), partitions=2)  # type: ignore[attr-defined]
    return names


@pytest.fixture(scope="session")
def spark_settings(kafka_broker: object) -> Settings:
    return Settings.load(
        kafka_bootstrap_servers=kafka_broker.bootstrap_servers,  # type: ignore[attr-defined]
        spark_master="local[2]",
        spark_driver_memory="2g",
        spark_shuffle_partitions=2,
        trigger_interval="500 milliseconds",
    )


@pytest.fixture(scope="session")
def spark(spark_settings: Settings) -> Iterator[object]:
    from streaming.spark import get_session

    session = get_session(spark_settings, "cxr-tests")
    yield session
    session.stop()


@pytest.fixture
def produce(kafka_broker: object) -> Iterator[object]:
    """`produce(topic, [value, ...], keys=None)`: raw values (str, bytes or None) through kafka-python."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, acks="all")  # type: ignore[attr-defined]

    def send(topic: str, values: list[str | bytes | None], keys: list[str | None] | None = None) -> None:
        for i, value in enumerate(values):
            key = keys[i] if keys else None
            producer.send(
                topic,
                value=value.encode() if isinstance(value, str) else value,
                key=key.encode() if key is not None else None,
            )
        producer.flush()

    yield send
    producer.close()


@pytest.fixture
def consume(kafka_broker: object) -> object:
    """`consume([topic, ...], n, timeout_s)`: read until n records arrived (or time ran out); returns them.
    With n None: every record there now."""
    from probes import read_records

    def read(topic_names: list[str], n: int | None, timeout_s: float = 120.0) -> list[object]:
        return read_records(kafka_broker.bootstrap_servers, topic_names, n, timeout_s)  # type: ignore[attr-defined]

    return read


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real Orthanc (with DICOMweb) on loopback ports, shared by the run; tests isolate by their own UIDs."""
    from orthanc_server import OrthancServer

    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def chest_dicoms(sample_jpegs: list[Path]) -> list[object]:
    """The sixteen real X-rays as DX instances in several transfer syntaxes (see `orthanc_server`)."""
    from orthanc_server import chest_xray_dicoms

    return list(chest_xray_dicoms(sample_jpegs))
