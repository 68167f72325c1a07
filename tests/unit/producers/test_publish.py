"""The shared publisher without a broker: reliable defaults, a bounded wait for Kafka, and loud failures."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError, NotLeaderForPartitionError
from kafka.producer.future import FutureProduceResult, FutureRecordMetadata
from kafka.structs import TopicPartition

from producers import publish
from producers.publish import PublishError, ReferencePublisher, connect, producer_config
from streaming.broker import free_port
from streaming.contracts import Reference
from streaming.settings import Settings


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
    """Hands back kafka-python's own record futures, which the test settles (`acknowledge`, `refuse`) as the
    producer's I/O thread would; `send_s`: how long each send blocks (Kafka away, no metadata yet)."""

    def __init__(self) -> None:
        self.futures: list[FutureRecordMetadata] = []
        self.batches: list[FutureProduceResult] = []
        self.send_s = 0.0

    def send(self, topic: str, key: bytes, value: bytes) -> FutureRecordMetadata:
        time.sleep(self.send_s)
        batch = FutureProduceResult(TopicPartition(topic, 0))
        future = FutureRecordMetadata(batch, 0, -1, None, len(key), len(value), -1)
        self.batches.append(batch)
        self.futures.append(future)
        return future

    def acknowledge(self, i: int) -> None:
        self.batches[i].success((i, -1, None))

    def refuse(self, i: int, error: Exception) -> None:
        self.batches[i].failure(error)

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


def later(seconds: float, action: Any, *args: Any) -> None:
    timer = threading.Timer(seconds, action, args)
    timer.daemon = True
    timer.start()


def test_send_and_wait_waits_for_its_own_reference_only(fake: FakeProducer) -> None:
    publisher = ReferencePublisher("t", {})
    first, second, third = refs(3)
    publisher.send(first)  # another feed's (or association's) reference, which Kafka will refuse
    fake.refuse(0, NotLeaderForPartitionError("gone"))
    later(0.2, fake.acknowledge, 1)
    started = time.monotonic()
    publisher.send_and_wait(second, timeout_s=5)  # returns once Kafka acknowledged this one
    assert time.monotonic() - started < 2
    # its own failure is raised here, once, and not reported again by the next flush
    later(0.1, fake.refuse, 2, NotLeaderForPartitionError("gone"))
    with pytest.raises(PublishError, match=r"did not acknowledge the reference on t \(event e2: NotLeader"):
        publisher.send_and_wait(third, timeout_s=5)
    with pytest.raises(PublishError, match=r"did not acknowledge 1 reference\(s\) on t \(the first, event e0:"):
        publisher.flush(timeout_s=1)  # the other one's failure is still the flush's to report
    publisher.flush(timeout_s=1)


def test_send_and_wait_has_one_deadline_for_the_send_and_the_acknowledgement(fake: FakeProducer) -> None:
    publisher = ReferencePublisher("t", {})
    fake.send_s = 0.4  # Kafka is away: the send itself blocks
    started = time.monotonic()
    with pytest.raises(PublishError, match=r"did not acknowledge the reference on t within 0\.6 s"):
        publisher.send_and_wait(refs(1)[0], timeout_s=0.6)  # never acknowledged
    assert 0.55 <= time.monotonic() - started < 0.9  # not 0.4 + 0.6

    def no_metadata(topic: str, key: bytes, value: bytes) -> None:
        raise KafkaTimeoutError("Failed to update metadata after 20.0 secs.")

    fake.send = no_metadata  # type: ignore[assignment,method-assign]
    with pytest.raises(PublishError, match="Kafka took no reference for t in time"):
        publisher.send_and_wait(refs(1)[0], timeout_s=1)


def test_client_defaults_replace_ours_but_not_what_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    configs: list[dict[str, Any]] = []
    monkeypatch.setattr(publish, "connect", lambda config, timeout_s: configs.append(dict(config)))
    ReferencePublisher.for_settings(Settings.load(), client_defaults={"max_block_ms": 1000, "linger_ms": 0})
    assert (configs[-1]["max_block_ms"], configs[-1]["linger_ms"], configs[-1]["acks"]) == (1000, 0, "all")
    publisher = ReferencePublisher.for_settings(
        Settings.load(kafka={"max_block_ms": "9000"}), client_defaults={"max_block_ms": 1000}
    )
    assert configs[-1]["max_block_ms"] == 9000 and publisher.max_block_s == 9.0
    ReferencePublisher.for_settings(Settings.load())
    assert configs[-1]["max_block_ms"] == publish.RELIABLE_DEFAULTS["max_block_ms"]
