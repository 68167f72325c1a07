"""Publishing references: the one Kafka producer every feed shares.

Nothing is dropped silently. The producer is idempotent with `acks=all` and retries while the broker is away
(for up to `delivery_timeout_ms`, five minutes unless configured), so a retried send is never written twice;
`flush` raises `PublishError` unless Kafka acknowledged every reference sent since the last flush; and a
publisher started before its broker waits for it (bounded, with a log line) instead of failing at once.
Feeds record a reference as announced only after `flush` returned. A caller that must answer for one
reference at a time (the C-STORE receiver, one thread per association) uses `send_and_wait`, which waits for
that reference's own acknowledgement only, within one deadline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Protocol

from kafka import KafkaProducer, errors
from kafka.errors import KafkaError, KafkaTimeoutError

from streaming.contracts import Reference
from streaming.settings import Settings

log = logging.getLogger(__name__)

#: Our defaults; configured client settings (`CXR_KAFKA__...`) override them, and kafka-python refuses
#: combinations that would break idempotence (e.g. acks=1 with enable_idempotence=true).
RELIABLE_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "retries": 2_147_483_647,
    "delivery_timeout_ms": 300_000,
    "max_block_ms": 120_000,
    "linger_ms": 5,
    "reconnect_backoff_max_ms": 5_000,
}
#: What "no broker answers" raises: kafka-python 3 times out its bootstrap; 2.x said NoBrokersAvailable.
_UNREACHABLE: tuple[type[Exception], ...] = tuple(
    getattr(errors, name)
    for name in ("NoBrokersAvailable", "KafkaTimeoutError", "KafkaConnectionError", "NodeNotReadyError")
    if hasattr(errors, name)
)


class Acknowledgeable(Protocol):
    def succeeded(self) -> bool: ...


class Publisher(Protocol):
    """What feeds need of `ReferencePublisher` (tests pass fakes): `flush` raises unless every reference sent
    so far was acknowledged."""

    def send(self, ref: Reference) -> Acknowledgeable: ...

    def flush(self, timeout_s: float | None = None) -> None: ...


class WaitingPublisher(Protocol):
    """What the C-STORE receiver needs of `ReferencePublisher` (tests pass fakes): one reference at a time,
    `send_and_wait` raising unless that reference was acknowledged in time. (Not part of `Publisher`, which
    the batch feeds' own stand-ins implement too.)"""

    def send_and_wait(self, ref: Reference, timeout_s: float) -> None: ...


class PublishError(RuntimeError):
    """Kafka did not acknowledge references (or could not be reached): they must not be counted as sent."""


def producer_config(client_config: Mapping[str, Any]) -> dict[str, Any]:
    """The reliable defaults under the configured client settings."""
    return {**RELIABLE_DEFAULTS, **client_config}


def connect(config: Mapping[str, Any], timeout_s: float, attempt_s: float = 5.0) -> KafkaProducer:
    """A producer, once a broker answers: retried for up to `timeout_s`, so a feed may start before Kafka."""
    servers = config.get("bootstrap_servers")
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        left = deadline - time.monotonic()
        try:
            producer = KafkaProducer(**{**config, "bootstrap_timeout_ms": int(max(0.5, min(attempt_s, left)) * 1000)})
        except _UNREACHABLE as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PublishError(f"no Kafka broker answered at {servers} within {timeout_s:.0f} s ({exc})") from exc
            log.warning("Kafka at %s does not answer yet; retrying for up to %.0f s more", servers, left)
            time.sleep(min(1.0, left))
            waited = True
            continue
        if waited:
            log.info("Kafka at %s answers now", servers)
        return producer


class ReferencePublisher:
    """Sends `cxr.reference/v1` messages keyed as the contract says; `flush` says whether all of them arrived."""

    def __init__(self, topic: str, client_config: dict[str, object], *, connect_timeout_s: float = 120.0) -> None:
        self.topic = topic
        config = producer_config(client_config)
        self._delivery_timeout_s = float(config["delivery_timeout_ms"]) / 1000
        #: How long `send` may block (topic metadata, buffer memory) when Kafka is away: `max_block_ms`.
        self.max_block_s = float(config["max_block_ms"]) / 1000
        self._lock = threading.Lock()
        self._failures: list[tuple[str, BaseException]] = []
        self._producer = connect(config, connect_timeout_s)

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        *,
        connect_timeout_s: float = 120.0,
        client_defaults: Mapping[str, Any] | None = None,
    ) -> ReferencePublisher:
        """A publisher to the configured input topic, with the configured client settings.

        `client_defaults` (kafka-python spelling, e.g. `{"max_block_ms": 20_000}`) replace `RELIABLE_DEFAULTS`
        for this publisher; the configured client settings (`CXR_KAFKA__...`) still win over them."""
        config = {**(client_defaults or {}), **settings.kafka_python_config(KafkaProducer.DEFAULT_CONFIG)}
        return cls(settings.input_topic, config, connect_timeout_s=connect_timeout_s)

    def _send(self, ref: Reference) -> Any:
        try:
            return self._producer.send(self.topic, key=ref.key.encode("utf-8"), value=ref.to_json().encode("utf-8"))
        except KafkaTimeoutError as exc:
            raise PublishError(f"Kafka took no reference for {self.topic} in time (is it up?): {exc}") from exc

    def send(self, ref: Reference) -> Any:
        """Queue one reference; returns its future (`succeeded()` once acknowledged). `flush` reports failures."""
        future = self._send(ref)
        future.add_errback(self._failed, ref.event_id)
        return future

    def send_and_wait(self, ref: Reference, timeout_s: float) -> None:
        """Send one reference and wait for its own acknowledgement; `PublishError` unless Kafka acknowledged it
        within `timeout_s` of this call.

        Only this reference is waited for: other threads' sends neither delay nor fail it, and its own failure
        is raised here, not reported again by `flush`. The deadline covers the send too, except that
        kafka-python's `send` may block for up to `max_block_ms` (`max_block_s`) by itself when Kafka is away,
        so the call returns within max(`timeout_s`, `max_block_s`) and a little."""
        deadline = time.monotonic() + timeout_s
        try:
            future = self._send(ref)
        except KafkaError as exc:
            raise PublishError(f"Kafka took no reference for {self.topic}: {type(exc).__name__}: {exc}") from exc
        try:
            future.get(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            if future.is_done:  # Kafka answered, with an error (a record that expired is a KafkaTimeoutError too)
                raise PublishError(
                    f"Kafka did not acknowledge the reference on {self.topic} "
                    f"(event {ref.event_id}: {type(exc).__name__}: {exc})"
                ) from exc
            raise PublishError(
                f"Kafka did not acknowledge the reference on {self.topic} within {timeout_s:g} s (event {ref.event_id})"
            ) from exc

    def _failed(self, event_id: str, exc: BaseException) -> None:
        """Runs on the producer's I/O thread."""
        with self._lock:
            self._failures.append((event_id, exc))

    def send_all(self, refs: Iterable[Reference]) -> int:
        count = 0
        for ref in refs:
            self.send(ref)
            count += 1
        self.flush()
        return count

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for every reference sent so far; `PublishError` unless Kafka acknowledged all of them.

        By default it waits a little longer than the delivery timeout, by which time each send has been
        acknowledged or has failed."""
        timeout = self._delivery_timeout_s + 30.0 if timeout_s is None else timeout_s
        try:
            self._producer.flush(timeout=timeout)
        except KafkaTimeoutError as exc:
            raise PublishError(f"Kafka did not acknowledge every reference within {timeout:.0f} s") from exc
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            event_id, error = failures[0]
            raise PublishError(
                f"Kafka did not acknowledge {len(failures)} reference(s) on {self.topic} "
                f"(the first, event {event_id}: {type(error).__name__}: {error})"
            )

    def close(self, timeout_s: float | None = None) -> None:
        """Flush (loudly) and close."""
        try:
            self.flush(timeout_s)
        finally:
            self._close_quietly(5.0)

    def _close_quietly(self, timeout_s: float) -> None:
        with contextlib.suppress(KafkaError):
            self._producer.close(timeout=timeout_s)

    def __enter__(self) -> ReferencePublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: do not wait minutes for a broker that is away, nor hide the first error
            self._close_quietly(5.0)
