"""Publishing references: the one Kafka producer every feed shares."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import TracebackType

from kafka import KafkaProducer

from streaming.contracts import Reference
from streaming.settings import Settings

log = logging.getLogger(__name__)


class ReferencePublisher:
    """Sends `cxr.reference/v1` messages keyed as the contract says; waits for every acknowledgement."""

    def __init__(self, topic: str, client_config: dict[str, object]) -> None:
        self.topic = topic
        self._producer = KafkaProducer(acks="all", linger_ms=5, **client_config)

    @classmethod
    def for_settings(cls, settings: Settings) -> ReferencePublisher:
        """A publisher to the configured input topic, with the configured client settings."""
        return cls(settings.input_topic, settings.kafka_python_config(KafkaProducer.DEFAULT_CONFIG))

    def send(self, ref: Reference) -> None:
        self._producer.send(self.topic, key=ref.key.encode("utf-8"), value=ref.to_json().encode("utf-8"))

    def send_all(self, refs: Iterable[Reference]) -> int:
        count = 0
        for ref in refs:
            self.send(ref)
            count += 1
        self.flush()
        return count

    def flush(self, timeout_s: float = 60.0) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()

    def __enter__(self) -> ReferencePublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
