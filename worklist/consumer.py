"""Feeding the worklist from Kafka: references, results and dead letters in, rows and offsets out, atomically.

The consumer joins no consumer group and commits nothing to Kafka: the store is the only record of how far it
has read, written in the same transaction as the rows (`WorklistStore.apply`), so a crash at any moment resumes
exactly where the rows end. It assigns itself every partition of the three topics (a second worklist reads the
same topics without taking partitions from this one) and picks up partitions added later.

Where a partition resumes is checked against the log as the broker has it (`plan_seeks`): an offset that
retention has deleted meanwhile resumes at the log's start, one past the log's end (the topic was deleted and
created again) reads the new topic from its beginning, each with a warning; a first start may begin at the
end of the topics (`CXR_WORKLIST_START=latest`, `cxr worklist --from-now`) instead of their beginning.

Kafka being away is the normal case to survive, not an error to exit on: every failure closes the client,
waits (capped exponential backoff, interruptible by `stop`) and starts again from the store's offsets. Message
contents never reach the log (they carry patient identifiers); an unreadable message is logged by its
topic, partition, offset and the reason only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaConfigurationError, KafkaError

from streaming.backoff import Backoff
from streaming.contracts import rfc3339
from streaming.positions import (
    REFRESH_PARTITIONS_S,
    new_consumer,
    plan_seeks,
    reader_config,
    short_error,
    starts_from_now,
)
from streaming.settings import Settings
from worklist.events import (
    DeadLetter,
    ImageEvent,
    NormalLabels,
    Unreadable,
    read_dead_letter,
    read_reference,
    read_result,
)
from worklist.store import WorklistStore

log = logging.getLogger("cxr.worklist.consumer")

POLL_TIMEOUT_MS = 500
MAX_POLL_RECORDS = 500
#: With no records for this long, a bounded request to the broker checks that it is still there (an empty
#: poll looks the same whether the topics are quiet or the broker is gone).
PROBE_AFTER_S = 5.0
PROBE_TIMEOUT_MS = 1000
#: How long the log's start and end offsets of newly assigned partitions may take to arrive.
OFFSETS_TIMEOUT_MS = 5000
PRUNE_EVERY_S = 3600.0
#: How many unreadable messages of one poll are logged one by one; the rest are counted in one line.
UNREADABLE_LOGGED_PER_POLL = 5


@dataclass(frozen=True)
class Converted:
    """One poll's records, ready for `WorklistStore.apply`."""

    records: list[ImageEvent | DeadLetter]
    #: per (topic, partition) that had records, readable or not: the next offset to read
    next_offsets: dict[tuple[str, int], int]
    #: (topic, partition, offset, reason) of each message that could not be used
    unreadable: list[tuple[str, int, int, str]]
    #: how many Kafka records were readable
    readable: int


def convert(
    batches: Mapping[Any, Sequence[Any]],
    *,
    results_topic: str,
    dead_letter_topic: str,
    input_topic: str,
    normal_labels: NormalLabels | Sequence[str] = (),
) -> Converted:
    """Kafka records (as `KafkaConsumer.poll` returns them) as worklist records. Pure: no I/O, no logging.

    Every record moves its partition's offset on, whether it could be read or not, so a hostile message is
    skipped once and never blocks the partition.
    """
    out: list[ImageEvent | DeadLetter] = []
    next_offsets: dict[tuple[str, int], int] = {}
    unreadable: list[tuple[str, int, int, str]] = []
    readable = 0
    for batch in batches.values():
        for record in batch:
            topic, partition, offset = record.topic, record.partition, record.offset
            next_offsets[(topic, partition)] = max(next_offsets.get((topic, partition), 0), offset + 1)
            try:
                if topic == results_topic:
                    out.append(read_result(record.value, record.timestamp, normal_labels))
                elif topic == dead_letter_topic:
                    letter, image = read_dead_letter(record.value, record.timestamp, topic, partition, offset)
                    out.append(letter)
                    if image is not None:
                        out.append(image)
                elif topic == input_topic:
                    out.append(read_reference(record.value, record.timestamp))
                else:
                    raise Unreadable("the message comes from a topic the worklist does not read")
            except Unreadable as exc:
                unreadable.append((topic, partition, offset, str(exc)))
                continue
            except Exception as exc:  # a reader's bug must not stop the queue; the type says enough
                unreadable.append((topic, partition, offset, f"the message could not be read ({type(exc).__name__})"))
                continue
            readable += 1
    return Converted(out, next_offsets, unreadable, readable)


class ResultsConsumer:
    """Reads the results, dead-letter and reference topics into a `WorklistStore` until stopped."""

    def __init__(
        self, settings: Settings, store: WorklistStore, normal_labels: NormalLabels | Sequence[str] = ()
    ) -> None:
        self.settings = settings
        self.store = store
        #: a bundle's labels apply to its own model's results only (`NormalLabels`); a bare sequence to all
        self.normal_labels: NormalLabels | tuple[str, ...] = (
            normal_labels if isinstance(normal_labels, NormalLabels) else tuple(normal_labels)
        )
        self.topics = (settings.results_topic, settings.dead_letter_topic, settings.input_topic)
        self._consumer: KafkaConsumer | None = None
        self._backoff = Backoff(first_s=0.5, max_s=10.0)
        self._lock = threading.Lock()
        self._connected = False
        self._last_poll_at: datetime | None = None
        self._records = 0
        self._unreadable = 0
        self._error: str | None = None
        self._last_contact = 0.0
        self._partitions_checked = 0.0
        self._pruned_at: float | None = None
        self._start_noted = False

    # What the API shows ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /readyz and the page's banner: whether Kafka answers, when it was last polled, what was read."""
        with self._lock:
            return {
                "connected": self._connected,
                "last_poll_at": rfc3339(self._last_poll_at) if self._last_poll_at else None,
                "records": self._records,
                "unreadable": self._unreadable,
                "error": self._error,
            }

    def _set(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self, f"_{name}", value)

    # The loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set. Returns only then; a bad Kafka configuration raises at once.

        `stop` is heard between rounds (a poll of 0.5 s, or a probe of 1 s) and during backoff at once; only a
        connection attempt to a broker that does not answer holds it longer: 1 s at first, up to 5 s while
        Kafka stays away (a TLS/SASL handshake to a distant cluster must still fit)."""
        try:
            while not stop.is_set():
                self._housekeep(stop)
                try:
                    if self._consumer is None:
                        self._consumer = self._connect(stop)
                        if self._consumer is None:
                            continue
                    self._step(self._consumer, stop)
                except KafkaConfigurationError as exc:
                    self._set(connected=False, error=short_error(exc))
                    log.error("the Kafka client settings are not valid; the worklist cannot read Kafka")
                    raise
                except Exception as exc:
                    self._failed(exc)
                    stop.wait(self._backoff.next_delay())
        finally:
            self._close()

    def _connect(self, stop: threading.Event) -> KafkaConsumer | None:
        """A consumer assigned to every partition of the three topics, each at the store's offset; None when
        `stop` was set meanwhile."""
        consumer = new_consumer(self._client_config())
        if stop.is_set():
            consumer.close()
            return None
        try:
            self._assign(consumer, set())
        except BaseException:
            consumer.close()
            raise
        return consumer

    def _client_config(self) -> dict[str, Any]:
        return reader_config(self.settings, "cxr-worklist", MAX_POLL_RECORDS, self._backoff.failures)

    def _assign(self, consumer: KafkaConsumer, current: set[TopicPartition]) -> None:
        """Assign every partition of the three topics; partitions not assigned before resume where
        `plan_seeks` says (the store's offset, checked against the log the broker has now)."""
        wanted = {TopicPartition(topic, p) for topic in self.topics for p in consumer.partitions_for_topic(topic)}
        self._partitions_checked = time.monotonic()
        if wanted == current:
            return
        added = wanted - current
        if not wanted:
            log.warning("none of the topics %s has partitions yet; waiting for them", ", ".join(self.topics))
            consumer.unsubscribe()
            return
        consumer.assign(sorted(wanted))
        if added:
            stored = self.store.offsets()
            from_now = starts_from_now(self.settings.worklist_start, stored, self.topics)
            parts = sorted(added)
            # Raise (KafkaTimeoutError) when the broker does not answer: the loop reconnects.
            beginning = consumer.beginning_offsets(parts, timeout_ms=OFFSETS_TIMEOUT_MS)
            end = consumer.end_offsets(parts, timeout_ms=OFFSETS_TIMEOUT_MS)
            plan = plan_seeks(added, stored, beginning, end, from_now=from_now, reader="the worklist")
            if self.settings.worklist_start == "latest" and not from_now and not self._start_noted:
                log.info("not a first start: the worklist file has offsets, so CXR_WORKLIST_START=latest is ignored")
            self._start_noted = True
            for line in plan.warnings:
                log.warning("%s", line)
            if plan.store:  # decisions a restart must find (no records: nothing else changes)
                self.store.apply([], plan.store)
            for tp, offset in plan.seeks.items():
                consumer.seek(tp, offset)
            if plan.from_end:
                log.info(
                    "first start from now (CXR_WORKLIST_START=latest): %d partition(s) read from their end,"
                    " what they already held is not put on the worklist",
                    plan.from_end,
                )
            log.info(
                "reading %d partition(s) of %s (%d new: %d resumed from the worklist's offsets, %d from the"
                " beginning, %d from the end)",
                len(wanted),
                ", ".join(self.topics),
                len(added),
                plan.resumed,
                plan.from_beginning,
                plan.from_end,
            )

    def _step(self, consumer: KafkaConsumer, stop: threading.Event) -> None:
        """One round, about a second at most: maybe look for new partitions, maybe check that the broker is
        there, else one poll applied in one transaction."""
        now = time.monotonic()
        assigned = set(consumer.assignment())
        if now - self._partitions_checked >= (REFRESH_PARTITIONS_S if assigned else PROBE_AFTER_S):
            self._assign(consumer, assigned)
            assigned = set(consumer.assignment())
            if not assigned:  # the broker answered (the topics' metadata), but they do not exist yet
                self._contact()
        if not assigned:
            stop.wait(POLL_TIMEOUT_MS / 1000)
            return
        if now - self._last_contact >= PROBE_AFTER_S:
            # Raises (KafkaTimeoutError) when the broker does not answer: the loop reconnects.
            consumer.end_offsets(sorted(assigned), timeout_ms=PROBE_TIMEOUT_MS)
            self._contact()
            return
        batches = consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_POLL_RECORDS)
        if batches:
            self._apply(batches)
            self._contact()
        else:
            self._set(last_poll_at=datetime.now(UTC))

    def _contact(self) -> None:
        """The broker answered: clear the error, reset the backoff."""
        self._last_contact = time.monotonic()
        if not self._connected:
            log.info("reading Kafka at %s", self.settings.kafka_bootstrap_servers)
        self._backoff.reset()
        self._set(connected=True, error=None, last_poll_at=datetime.now(UTC))

    def _apply(self, batches: Mapping[Any, Sequence[Any]]) -> None:
        converted = convert(
            batches,
            results_topic=self.settings.results_topic,
            dead_letter_topic=self.settings.dead_letter_topic,
            input_topic=self.settings.input_topic,
            normal_labels=self.normal_labels,
        )
        for topic, partition, offset, reason in converted.unreadable[:UNREADABLE_LOGGED_PER_POLL]:
            log.warning("skipped an unreadable message at %s/%d@%d: %s", topic, partition, offset, reason)
        if len(converted.unreadable) > UNREADABLE_LOGGED_PER_POLL:
            log.warning(
                "skipped %d more unreadable messages in the same poll",
                len(converted.unreadable) - UNREADABLE_LOGGED_PER_POLL,
            )
        # The one place offsets are written: with the rows, in one transaction.
        self.store.apply(converted.records, converted.next_offsets)
        with self._lock:
            self._records += converted.readable
            self._unreadable += len(converted.unreadable)

    def _failed(self, exc: Exception) -> None:
        """Forget the client (the next one resumes from the store's offsets, so nothing a poll read but the
        store did not take is lost) and say why. Only the type and message are logged: a traceback's frames
        could hold message contents."""
        error = short_error(exc)
        kafka = isinstance(exc, KafkaError)
        if not kafka:
            log.error("the worklist could not store what it read (%s); reading it again from its offsets", error)
        elif self._connected or self._backoff.failures == 0:
            log.warning("Kafka at %s: %s; retrying", self.settings.kafka_bootstrap_servers, error)
        else:
            log.debug("Kafka at %s still failing: %s", self.settings.kafka_bootstrap_servers, error)
        self._close()
        self._set(connected=self._connected and not kafka, error=error)

    def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False, timeout_ms=2000)
            except Exception as exc:
                log.debug("closing the Kafka consumer: %s", short_error(exc))

    def _housekeep(self, stop: threading.Event) -> None:
        """Forget what retention allows, at start and about hourly (whether or not Kafka answers)."""
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        if stop.is_set():
            return
        try:
            forgotten = self.store.prune(datetime.now(UTC), timedelta(days=self.settings.worklist_retention_days))
        except Exception as exc:
            log.warning("pruning the worklist failed: %s", short_error(exc))
            return
        if forgotten:
            log.info("forgot %d studies closed more than %g days ago", forgotten, self.settings.worklist_retention_days)
