"""Where a group-less Kafka reader resumes: its own stored offsets, checked against the log the broker has now.

The worklist and the exporters join no consumer group: each keeps its offsets with its own state (the
worklist's database, an exporter's cursor file), written together with what it did, so a crash resumes exactly
there. These are the pure decisions they share, and the client plumbing both need.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kafka import KafkaConsumer, TopicPartition

from streaming.settings import Settings

_ERROR_CHARS = 200
#: How often a reader looks for new partitions (its client refreshes the topics' metadata as often).
REFRESH_PARTITIONS_S = 30.0


@dataclass(frozen=True)
class SeekPlan:
    """Where newly assigned partitions start reading, and why."""

    #: every partition planned: the offset to read next
    seeks: dict[TopicPartition, int]
    #: offsets to write to the store at once, so that a restart resumes from the same decision: the end of the
    #: log on a first start from now, the log's start or beginning after a gap or a recreated topic
    store: dict[tuple[str, int], int]
    #: one line per partition whose stored offset the log no longer has (for a WARNING each)
    warnings: list[str]
    resumed: int = 0
    from_beginning: int = 0
    from_end: int = 0


def starts_from_now(
    start: Literal["earliest", "latest"], stored: Mapping[tuple[str, int], int], topics: Iterable[str]
) -> bool:
    """Whether partitions without a stored offset begin at the end of their log: only with `start` "latest"
    (`--from-now`) and only on a first start, when the reader's state holds no offset of any of
    `topics`. Once it has started, the store holds an offset for every partition it was assigned, so a
    partition added later (never in the store) is read from its beginning, as is everything after a restart."""
    names = set(topics)
    return start == "latest" and not any(topic in names for topic, _ in stored)


def plan_seeks(
    partitions: Iterable[TopicPartition],
    stored: Mapping[tuple[str, int], int],
    beginning: Mapping[TopicPartition, int] | None = None,
    end: Mapping[TopicPartition, int] | None = None,
    *,
    from_now: bool = False,
    reader: str,
) -> SeekPlan:
    """Where each partition resumes. Pure: the broker's answers come in as `beginning` and `end` (each
    partition's first offset still in the log, and the offset the next message will get).

    - a stored offset inside the log: there (the reader's own record of how far it has read);
    - a stored offset below the log's start: the messages in between were deleted by retention before the
      reader read them; say how many, and read from the log's start;
    - a stored offset past the log's end: the topic was deleted and created again (its offsets start over);
      read it from its beginning (what was read before is de-duplicated on `event_id`);
    - no stored offset: the log's beginning, or with `from_now` its end (`starts_from_now`).

    A partition the broker gave no offsets for resumes at the stored offset, else at its beginning (the
    client's `auto_offset_reset` "earliest" still applies where the log no longer has it).
    """
    beginning = beginning or {}
    end = end or {}
    seeks: dict[TopicPartition, int] = {}
    to_store: dict[tuple[str, int], int] = {}
    warnings: list[str] = []
    resumed = from_beginning = from_end = 0
    for tp in sorted(partitions):
        key = (tp.topic, tp.partition)
        offset, first, last = stored.get(key), beginning.get(tp, 0), end.get(tp)
        if offset is None:
            if from_now and last is not None:
                seeks[tp] = to_store[key] = last
                from_end += 1
            else:
                seeks[tp] = first
                from_beginning += 1
        elif offset < first:
            warnings.append(
                f"{tp.topic}/{tp.partition}: {first - offset} message(s) (offsets {offset} to {first - 1}) were"
                f" deleted by the topic's retention before {reader} read them and can no longer be read;"
                f" reading on from the log's start at offset {first}"
            )
            seeks[tp] = to_store[key] = first
            from_beginning += 1
        elif last is not None and offset > last:
            warnings.append(
                f"{tp.topic}/{tp.partition}: {reader} had read up to offset {offset}, past the log's end"
                f" ({last}): the topic looks recreated (deleted and created again); reading it from its"
                f" beginning (offset {first}; what was read before is de-duplicated on event_id)"
            )
            seeks[tp] = to_store[key] = first
            from_beginning += 1
        else:
            seeks[tp] = offset
            resumed += 1
    return SeekPlan(seeks, to_store, warnings, resumed, from_beginning, from_end)


def short_error(exc: BaseException) -> str:
    """One line for the page's banner and /readyz: the exception type and the start of its message."""
    name, message = type(exc).__name__, str(exc)
    text = (message if message.startswith(name) else f"{name}: {message}" if message else name).splitlines()[0]
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "…"


def reader_config(settings: Settings, client_id: str, max_poll_records: int, failures: int) -> dict[str, Any]:
    """A group-less reader's client settings: our defaults under the configured ones (TLS, SASL, ...), and over
    both what correctness needs: no group, no commits to Kafka, and a position the broker has lost resets to
    the beginning (never to the end, which would skip what the reader has not seen; replays are de-duplicated).

    The first connection attempt is short enough for a stop to be heard, and longer while Kafka stays away
    (`failures` in a row: a slow TLS/SASL handshake must still get through); a configured timeout wins."""
    configured = settings.kafka_python_config(KafkaConsumer.DEFAULT_CONFIG)
    defaults = {
        "client_id": client_id,
        "max_poll_records": max_poll_records,
        "metadata_max_age_ms": int(REFRESH_PARTITIONS_S * 1000),
        "bootstrap_timeout_ms": min(5000, 1000 * 2 ** min(failures, 3)),
        "reconnect_backoff_max_ms": 10_000,
    }
    forced = {
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "key_deserializer": None,
        "value_deserializer": None,
    }
    return {**defaults, **configured, **forced}


def new_consumer(config: dict[str, Any]) -> KafkaConsumer:
    """A `KafkaConsumer` that leaks nothing when it cannot connect: kafka-python raises from a failed bootstrap
    without closing the network client (and its I/O thread) it made, so each retry against a dead broker would
    leak one. Every client it makes is remembered and closed on failure."""
    made: list[Any] = []
    base = KafkaConsumer.DEFAULT_CONFIG["kafka_client"]

    def make(**client_config: Any) -> Any:
        client = base(**client_config)
        made.append(client)
        return client

    try:
        return KafkaConsumer(**{**config, "kafka_client": make})
    except BaseException:
        for client in made:
            client.close()
        raise
