"""The export loop: results in, in offset order per partition, each exported, skipped or dead-lettered.

The loop reads every partition of the results topic without a consumer group, from its cursor (`cursor`), and
saves the cursor only after what it covers was delivered. A result the destination cannot take now (it is
away, slow, overloaded: `ExportError.transient`) is tried again, the same result, with capped exponential
backoff, for as long as it takes: the exporter never skips ahead of a result it has not delivered, so a FHIR
server down for an hour receives that hour's results, in order, when it returns. A result no retry can help
becomes one export dead letter (`cxr.export-dead-letter/v1`) and the loop moves on.

Kafka being away is survived the same way: the client is closed and made again from the cursor. Message
contents never reach the log: a result is named by its event id, topic, partition and offset only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaConfigurationError, KafkaError

from exporters.cursor import ExportCursor
from exporters.errors import ExportCode, ExportError
from exporters.metrics import ExportMetrics
from producers.publish import RELIABLE_DEFAULTS
from streaming.backoff import Backoff
from streaming.contracts import dumps, now_utc, payload_fields, rfc3339
from streaming.positions import (
    REFRESH_PARTITIONS_S,
    new_consumer,
    plan_seeks,
    reader_config,
    short_error,
    starts_from_now,
)
from streaming.settings import Settings
from worklist.events import ImageEvent, Unreadable, read_result

log = logging.getLogger("cxr.exporters")

DEAD_LETTER_SCHEMA = "cxr.export-dead-letter/v1"
POLL_TIMEOUT_MS = 500
#: Few per poll: a slow destination must not leave a large fetched batch to rewind on every retry.
MAX_POLL_RECORDS = 50
#: How often the lag is measured (and so the broker's presence checked).
PROBE_EVERY_S = 5.0
OFFSETS_TIMEOUT_MS = 5000


class Exporter(Protocol):
    """One kind of export: what to do with one result."""

    #: "fhir" or "sr": the cursor's folder, the metrics' label, the dead letters' `exporter`
    name: str
    #: where the exports go, without credentials (the cursor's identity, the dead letters' `destination`)
    destination: str
    #: the Kafka topics it writes to (checked at start: a missing one holds every export back)
    topics: tuple[str, ...]

    def export(self, result: ImageEvent) -> bool:
        """Deliver one result's export everywhere it goes: True, or False when there is nothing to export
        (skipped). Raises `ExportError`."""
        ...

    def close(self) -> None: ...


class KafkaOut:
    """The exporter's one Kafka producer (FHIR bundles, export dead letters); every send waits for its
    acknowledgement, bounded, so the cursor never passes a message Kafka does not have."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._timeout_s = settings.export_timeout_s
        self._producer: KafkaProducer | None = None

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """`ExportError(UNAVAILABLE)` unless Kafka acknowledged the message within the export timeout."""
        timeout_ms = int(self._timeout_s * 1000)
        try:
            if self._producer is None:
                configured = self.settings.kafka_python_config(KafkaProducer.DEFAULT_CONFIG)
                defaults = {**RELIABLE_DEFAULTS, "max_block_ms": timeout_ms, "bootstrap_timeout_ms": timeout_ms}
                self._producer = KafkaProducer(**{**defaults, "client_id": "cxr-export", **configured})
            self._producer.send(topic, key=key, value=value).get(timeout=self._timeout_s)
        except KafkaConfigurationError:
            raise
        except Exception as exc:
            self.close()  # a fresh producer next time: this one may be stuck on a broker that went away
            reason = f"Kafka did not take the message for {topic}: {short_error(exc)}"
            raise ExportError(ExportCode.UNAVAILABLE, reason) from None

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=2)
            except Exception as exc:
                log.debug("closing the Kafka producer: %s", short_error(exc))


def dead_letter_body(
    exporter: Exporter, error: ExportError, record: Any, event_id: str | None, payload_max_bytes: int
) -> dict[str, Any]:
    """A `cxr.export-dead-letter/v1`: the result as it was (replayable), where it came from, and why."""
    return {
        "schema": DEAD_LETTER_SCHEMA,
        "exporter": exporter.name,
        "destination": exporter.destination,
        "event_id": event_id,
        "error": error.code.value,
        "reason": error.reason,
        **payload_fields(record.value, payload_max_bytes),
        "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
        "failed_at": rfc3339(now_utc()),
    }


class ExportRunner:
    """Reads the results topic into one `Exporter` until stopped."""

    def __init__(self, settings: Settings, exporter: Exporter, metrics: ExportMetrics, out: KafkaOut) -> None:
        self.settings = settings
        self.exporter = exporter
        self.metrics = metrics
        self.out = out
        self.topic = settings.results_topic
        self.cursor = ExportCursor.open(
            settings.state_dir, exporter.name, f"{settings.results_topic} → {exporter.destination}"
        )
        self._consumer: KafkaConsumer | None = None
        self._backoff = Backoff(first_s=0.5, max_s=10.0)
        self._retry = Backoff(first_s=0.5, max_s=settings.export_retry_max_s)
        self._probed_at = 0.0
        self._partitions_at = 0.0
        self._unsaved = False
        self._connected = False

    # The loop ------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Export until `stop` is set; returns then. A bad Kafka configuration raises at once."""
        log.info(
            "exporting %s → %s (%s); cursor %s",
            self.topic,
            self.exporter.destination,
            self.exporter.name,
            self.cursor.path,
        )
        try:
            while not stop.is_set():
                try:
                    if self._consumer is None:
                        self._consumer = self._connect()
                    self._step(self._consumer, stop)
                except KafkaConfigurationError:
                    log.error("the Kafka client settings are not valid; the exporter cannot read Kafka")
                    raise
                except Exception as exc:
                    self._failed(exc)
                    stop.wait(self._backoff.next_delay())
        finally:
            self._save()
            self._close()

    def _connect(self) -> KafkaConsumer:
        name = f"cxr-export-{self.exporter.name}"
        consumer = new_consumer(reader_config(self.settings, name, MAX_POLL_RECORDS, self._backoff.failures))
        try:
            self._assign(consumer, set())
            self._check_outputs(consumer)
        except BaseException:
            consumer.close()
            raise
        return consumer

    def _check_outputs(self, consumer: KafkaConsumer) -> None:
        """Say so when a topic the exporter writes to does not exist: brokers that do not create topics on
        first use would otherwise hold every export back with nothing but the client's own complaints."""
        for topic in (*self.exporter.topics, self.settings.export_dead_letter_topic):
            if consumer.partitions_for_topic(topic) is None:
                log.error(
                    "the topic %s does not exist; exports wait until it is created (`cxr broker` creates it;"
                    " on Kubernetes, k8s/kafka-topics.yaml)",
                    topic,
                )

    def _assign(self, consumer: KafkaConsumer, current: set[TopicPartition]) -> None:
        """Every partition of the results topic; new ones start where `plan_seeks` says, and that start is
        written to the cursor at once (so a first start `--from-now` stays from that moment)."""
        self._partitions_at = time.monotonic()
        wanted = {TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or ()}
        if wanted == current:
            return
        if not wanted:
            log.warning("the topic %s has no partitions yet; waiting for it", self.topic)
            return
        added = sorted(wanted - current)
        consumer.assign(sorted(wanted))
        stored = self.cursor.stored(self.topic)
        from_now = starts_from_now(self.settings.export_start, stored, [self.topic])
        beginning = consumer.beginning_offsets(added, timeout_ms=OFFSETS_TIMEOUT_MS)
        end = consumer.end_offsets(added, timeout_ms=OFFSETS_TIMEOUT_MS)
        plan = plan_seeks(added, stored, beginning, end, from_now=from_now, reader=f"the {self.exporter.name} exporter")
        for line in plan.warnings:
            log.warning("%s", line)
        for tp, offset in plan.seeks.items():
            consumer.seek(tp, offset)
        if self.cursor.advance({tp.partition: offset for tp, offset in plan.seeks.items()}):
            self._unsaved = True
            self._save()
        log.info(
            "reading %d partition(s) of %s (%d resumed from the cursor, %d from the beginning, %d from the end)",
            len(wanted),
            self.topic,
            plan.resumed,
            plan.from_beginning,
            plan.from_end,
        )

    def _step(self, consumer: KafkaConsumer, stop: threading.Event) -> None:
        now = time.monotonic()
        assigned = set(consumer.assignment())
        if not assigned or now - self._partitions_at >= REFRESH_PARTITIONS_S:
            self._assign(consumer, assigned)
            assigned = set(consumer.assignment())
            if not assigned:
                stop.wait(POLL_TIMEOUT_MS / 1000)
                return
        if now - self._probed_at >= PROBE_EVERY_S:
            # Raises (KafkaTimeoutError) when the broker does not answer: the loop reconnects.
            end = consumer.end_offsets(sorted(assigned), timeout_ms=OFFSETS_TIMEOUT_MS)
            self._probed_at = now
            self._contact()
            behind = sum(max(0, last - self.cursor.offsets.get(tp.partition, last)) for tp, last in end.items())
            self.metrics.set_behind(behind)
        batches = consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_POLL_RECORDS)
        if batches:
            self._contact()
        if not self._export(batches, stop):
            self._rewind(consumer)
            stop.wait(self._retry.next_delay())
        self._save()

    def _export(self, batches: Mapping[TopicPartition, Sequence[Any]], stop: threading.Event) -> bool:
        """Each record in offset order per partition; False at the first one that must be retried."""
        for tp in sorted(batches):
            for record in batches[tp]:
                if stop.is_set():
                    return True
                if not self._one(record):
                    return False
                self._retry.reset()
                self._unsaved |= self.cursor.advance({tp.partition: record.offset + 1})
        return True

    def _one(self, record: Any) -> bool:
        """Export one record; False when it must be tried again."""
        started = time.monotonic()
        where = f"{record.topic}/{record.partition}@{record.offset}"
        try:
            result = read_result(record.value, record.timestamp)
        except Unreadable as exc:
            return self._dead_letter(record, None, ExportError(ExportCode.UNREADABLE_RESULT, str(exc)))
        except Exception as exc:  # a reader's bug: the message is still accounted for
            reason = f"the result could not be read ({type(exc).__name__})"
            return self._dead_letter(record, None, ExportError(ExportCode.UNREADABLE_RESULT, reason))
        try:
            exported = self.exporter.export(result)
        except ExportError as exc:
            if exc.transient:
                if not self._retry.failing:
                    log.warning(
                        "event %s (%s): %s; retrying until it can be exported", result.event_id, where, exc.reason
                    )
                self.metrics.retry(exc.code, exc.reason)
                return False
            return self._dead_letter(record, result.event_id, exc)
        except Exception as exc:  # a builder's bug must not stop every later result; the type says enough
            # The type only, never the message or a traceback: either may quote the result or a DICOM header.
            log.error("event %s (%s): the export failed unexpectedly (%s)", result.event_id, where, type(exc).__name__)
            error = ExportError(ExportCode.INVALID_EXPORT, f"the export failed unexpectedly ({type(exc).__name__})")
            return self._dead_letter(record, result.event_id, error)
        self.metrics.finished("exported" if exported else "skipped", time.monotonic() - started)
        return True

    def _dead_letter(self, record: Any, event_id: str | None, error: ExportError) -> bool:
        body = dead_letter_body(self.exporter, error, record, event_id, self.settings.dead_letter_payload_max_bytes)
        key = event_id.encode("utf-8") if event_id else None
        try:
            self.out.send(self.settings.export_dead_letter_topic, key, dumps(body).encode("utf-8"))
        except ExportError as exc:
            if not self._retry.failing:
                log.warning(
                    "the dead letter of event %s cannot be sent yet (%s); retrying", event_id or "unknown", exc.reason
                )
            self.metrics.retry(exc.code, exc.reason)
            return False
        log.warning(
            "event %s (%s/%d@%d) cannot be exported (%s): %s; dead letter on %s",
            event_id or "unknown",
            record.topic,
            record.partition,
            record.offset,
            error.code.value,
            error.reason,
            self.settings.export_dead_letter_topic,
        )
        self.metrics.dead_letter(error.code)
        return True

    def _rewind(self, consumer: KafkaConsumer) -> None:
        """Back to the cursor: the result to retry comes first again, and nothing fetched after it is lost."""
        for tp in consumer.assignment():
            offset = self.cursor.offsets.get(tp.partition)
            if offset is not None:
                consumer.seek(tp, offset)

    def _save(self) -> None:
        """A cursor that cannot be written (a full disk) is kept in memory and written later: what it covers
        was delivered, and a crash meanwhile only repeats it (the ids make that harmless)."""
        if not self._unsaved:
            return
        try:
            self.cursor.save()
        except OSError as exc:
            log.error("cannot save the export cursor %s (%s); will try again", self.cursor.path, short_error(exc))
            return
        self._unsaved = False

    def _contact(self) -> None:
        if not self._connected:
            log.info("reading Kafka at %s", self.settings.kafka_bootstrap_servers)
        self._connected = True
        self._backoff.reset()
        self.metrics.kafka_answered()

    def _failed(self, exc: Exception) -> None:
        error = short_error(exc)
        if isinstance(exc, KafkaError):
            if self._connected or self._backoff.failures == 0:
                log.warning("Kafka at %s: %s; retrying", self.settings.kafka_bootstrap_servers, error)
        else:
            log.error("the exporter failed (%s); reading again from its cursor", error)
            log.debug("exporter failure", exc_info=True)
        self._connected = False
        self._close_consumer()

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False, timeout_ms=2000)
            except Exception as exc:
                log.debug("closing the Kafka consumer: %s", short_error(exc))

    def _close(self) -> None:
        self._close_consumer()
        self.out.close()
        self.exporter.close()
