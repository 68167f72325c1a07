"""The shared publisher without a broker: reliable defaults, a bounded wait for Kafka, and loud failures."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from producers import publish
from producers.publish import PublishError, ReferencePublisher, connect, producer_config
from streaming.broker import free_port
from streaming.contracts import Reference


def test_the_producer_is_idempotent_and_waits_for_all_replicas_unless_told_otherwise() -> None:
    config = producer_config({"bootstrap_servers": ["h:1"]})
    assert config["acks"] == "all" and config["enable_idempotence"] is True
    assert config["retries"] > 1000 and config["delivery_timeout_ms"] >= 120_000
    assert producer_config({"delivery_timeout_ms": 5000})["delivery_timeout_ms"] == 5000


def test_connect_waits_for_a_broker_then_says_clearly_that_none_answered(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="producers.publish"), pytest.raises(PublishError) as info:
        connect(producer_config({"bootstrap_servers": [f"127.0.0.1:{port}"]}), timeout_s=2.0, attempt_s=0.5)
    assert 2.0 <= time.monotonic() - started < 20
    assert f"no Kafka broker answered at ['127.0.0.1:{port}'] within 2 s" in str(info.value)
    assert "does not answer yet" in caplog.text  # the operator sees that it waits, not a hang


class FakeProducer:
    """Hands back futures that the test settles, as kafka-python's I/O thread would."""

    def __init__(self) -> None:
        self.futures: list[Future] = []

    def send(self, topic: str, key: bytes, value: bytes) -> Future:
        future = Future()
        self.futures.append(future)
        return future

    def flush(self, timeout: float | None = None) -> None:
        for future in self.futures:
            if not future.is_done:
                raise KafkaTimeoutError("Timeout waiting for future")

    def close(self, timeout: float | None = None) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeProducer:
    producer = FakeProducer()
    monkeypatch.setattr(publish, "connect", lambda config, timeout_s: producer)
    return producer


def refs(n: int) -> list[Reference]:
    return [Reference(event_id=f"e{i}", uri=f"file:///x/{i}.jpeg") for i in range(n)]


def test_flush_raises_when_a_reference_was_not_acknowledged(fake: FakeProducer) -> None:
    publisher = ReferencePublisher("t", {})
    first, second = (publisher.send(r) for r in refs(2))
    first.success("metadata")
    second.failure(KafkaTimeoutError("Expiring 1 record(s): 300000 ms has passed since batch creation"))
    with pytest.raises(PublishError, match=r"did not acknowledge 1 reference\(s\) on t \(the first, event e1:"):
        publisher.flush()
    assert first.succeeded() and not second.succeeded()
    publisher.flush()  # reported once; nothing new is pending


def test_flush_raises_when_kafka_does_not_answer_in_time(fake: FakeProducer) -> None:
    publisher = ReferencePublisher("t", {})
    publisher.send(refs(1)[0])
    with pytest.raises(PublishError, match="within 1 s"):
        publisher.flush(timeout_s=1)


def test_send_all_and_close_are_loud_too(fake: FakeProducer) -> None:
    publisher = ReferencePublisher("t", {})

    def settle_then_flush(timeout: float | None = None) -> None:
        for future in fake.futures:
            if not future.is_done:
                future.failure(KafkaTimeoutError("expired"))

    fake.flush = settle_then_flush  # type: ignore[method-assign]
    with pytest.raises(PublishError, match="did not acknowledge 3"):
        publisher.send_all(refs(3))
    publisher.send(refs(1)[0])
    with pytest.raises(PublishError):
        publisher.close()


def test_leaving_on_an_error_does_not_wait_for_kafka(fake: FakeProducer) -> None:
    closed: list[Any] = []
    fake.close = lambda timeout=None: closed.append(timeout)  # type: ignore[method-assign]
    with pytest.raises(ValueError), ReferencePublisher("t", {}) as publisher:
        publisher.send(refs(1)[0])  # never settled
        raise ValueError("the feed failed")
    assert closed == [5.0]
