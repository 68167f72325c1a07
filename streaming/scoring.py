"""Scoring a batch of reference messages: parse → fetch → decode → preprocess → predict → triage → messages.

This is the whole per-row logic of the job, as plain Python over plain values, so it is unit-tested without
Spark and reused unchanged by the streaming query, the batch backfill and the benchmarks. Every input row
yields exactly one `Outcome` (a result or a dead letter); a bad image fails its own row, never its batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from streaming import faults
from streaming.bundle import Descriptor, LoadedBundle
from streaming.contracts import (
    Reference,
    Source,
    build_dead_letter,
    build_result,
    dumps,
    now_utc,
    parse_reference,
    parse_timestamp,
    salvage_event_id,
)
from streaming.deadlines import DeadlinePool, Job
from streaming.decode import DecodeLimits, decode_image
from streaming.device import InferenceDevice
from streaming.errors import CxrError, DecodeError, ErrorCode, FetchError, ScoreError, Stage
from streaming.fetch import FetchPolicy, fetch
from streaming.preprocess import InputSpec, Scaling, draft_size_for, to_model_input
from streaming.triage import priority, top_finding

if TYPE_CHECKING:
    from streaming.settings import Settings


@dataclass(frozen=True)
class ScoringConfig:
    """What an executor needs besides the model; built on the driver, pickled with the job."""

    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    inference_batch_size: int = 16
    decode_threads: int = 4
    #: TensorFlow intra-op threads per Python worker; None lets TensorFlow use every core.
    inference_threads: int | None = None
    #: "auto", "cpu" or "gpu": where each Python worker places the model (see `streaming/device.py`)
    inference_device: InferenceDevice = "auto"
    results_topic: str = "cxr.results"
    dead_letter_topic: str = "cxr.dead-letter"
    #: fetch + decode of one reference, from when a thread starts on it
    deadline_s: float = 30.0
    max_stuck_threads: int = 8
    dead_letter_payload_max_bytes: int = 256 * 1024
    fault_injection: bool = False


def scoring_config(settings: Settings, threads: int | None = None) -> ScoringConfig:
    """The executors' view of the settings (they never read the environment themselves)."""
    return ScoringConfig(
        fetch=FetchPolicy(
            allowed_roots=tuple(settings.allowed_roots),
            dicomweb_hosts=tuple(settings.dicomweb_allowed_hosts),
            max_bytes=settings.max_image_bytes,
            timeout_s=settings.fetch_timeout_s,
            authorization=settings.dicomweb_authorization(),
            retries=settings.dicomweb_retries,
            retry_backoff_s=settings.dicomweb_retry_backoff_s,
        ),
        limits=DecodeLimits(max_pixels=settings.max_image_pixels),
        inference_batch_size=settings.inference_batch_size,
        decode_threads=settings.decode_threads,
        inference_threads=threads,
        inference_device=settings.inference_device,
        results_topic=settings.results_topic,
        dead_letter_topic=settings.dead_letter_topic,
        deadline_s=settings.reference_deadline_s,
        max_stuck_threads=settings.max_stuck_threads,
        dead_letter_payload_max_bytes=settings.dead_letter_payload_max_bytes,
        fault_injection=settings.fault_injection,
    )


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One record as read from Kafka."""

    #: the raw bytes (Kafka), or text (a batch file); decoded strictly as UTF-8 when parsed
    value: bytes | str | None
    source: Source
    timestamp: datetime | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """One record to write, plus the figures the metrics need."""

    topic: str
    key: str | None
    value: str
    scored: bool
    stage: str | None = None
    error: str | None = None
    latency_s: float | None = None
    inference_s: float | None = None
    preprocess_s: float | None = None
    #: decode threads of this Python worker stuck past their deadline when the row was written
    stuck_threads: int = 0


class InputRules(Protocol):
    """What preparing an image needs to know of a model: a bundle's `Descriptor`, or the backbone `cxr train`
    computes features with (so training sees exactly the pixels the stream will)."""

    @property
    def input_spec(self) -> InputSpec: ...

    @property
    def scaling(self) -> Scaling: ...


def prepare(
    ref: Reference,
    descriptor: InputRules,
    config: ScoringConfig,
    deadline: float | None = None,
    phase: Callable[[Stage], None] = lambda stage: None,
) -> np.ndarray:
    """The model input for one reference; raises `CxrError` on any failure.

    `deadline` (a `time.monotonic()` value) bounds the fetch from within; `phase` is told when decoding
    starts, so a timeout can name the step that overran.
    """
    data = fetch(ref.uri, config.fetch, deadline=deadline)
    phase(Stage.DECODE)
    if config.fault_injection:
        faults.inject(ref.uri)
    spec = descriptor.input_spec
    image = decode_image(data, config.limits, draft_size=draft_size_for(spec))
    return to_model_input(image, spec, descriptor.scaling)


@dataclass(frozen=True, slots=True)
class Prepared:
    """How preparing one reference ended: its model input, or the error that makes it a dead letter."""

    x: np.ndarray | None
    error: CxrError | None
    #: fetch + decode time (the deadline itself for one that overran; 0 for one refused without running)
    seconds: float = 0.0


@dataclass
class _Row:
    message: RawMessage
    ref: Reference | None = None
    error: CxrError | None = None
    event_id: str | None = None
    x: np.ndarray | None = None
    prep_s: float = 0.0


_pools: dict[tuple[int, int], DeadlinePool] = {}


def decode_pool(config: ScoringConfig) -> DeadlinePool:
    """One pool per process and size: Python workers are reused across batches, so is the pool (and its
    count of stuck threads, which later batches must see)."""
    key = (config.decode_threads, config.max_stuck_threads)
    if key not in _pools:
        _pools[key] = DeadlinePool(config.decode_threads, config.max_stuck_threads)
    return _pools[key]


def _overran(job: Job[np.ndarray], deadline_s: float) -> CxrError:
    if job.phase == Stage.DECODE:
        return DecodeError(ErrorCode.TIMEOUT, f"decoding the image took longer than the deadline of {deadline_s:g} s")
    return FetchError(ErrorCode.TIMEOUT, f"fetching the image took longer than the deadline of {deadline_s:g} s")


def _settle(job: Job[np.ndarray], pool: DeadlinePool, deadline_s: float) -> Prepared:
    """Wait for a job, bounded by its deadline, and say how it ended.

    A job abandoned past its deadline may finish later; whatever it returns then is ignored.
    """
    pool.wait(job)
    if job.refused:
        return Prepared(
            None,
            FetchError(
                ErrorCode.UNAVAILABLE,
                f"this scoring worker has {pool.max_stuck} reads stuck past their deadline and starts no more until "
                "they return (storage or server not answering)",
            ),
        )
    if job.timed_out:
        return Prepared(None, _overran(job, deadline_s), deadline_s)
    if isinstance(job.error, CxrError):
        return Prepared(None, job.error, job.seconds)
    if job.error is not None:  # a decoder bug must not fail the batch
        error = ScoreError(ErrorCode.MODEL_ERROR, f"unexpected {type(job.error).__name__} while preparing the image")
        return Prepared(None, error, job.seconds)
    return Prepared(job.result, None, job.seconds)


def prepare_each(refs: Sequence[Reference], rules: InputRules, config: ScoringConfig) -> Iterator[Prepared]:
    """The model inputs of `refs`, in order, fetched and decoded on this worker's deadline pool.

    Every reference is submitted at once, so the pool prepares the next ones while the caller works on those
    already yielded (TensorFlow releases the GIL: decoding and inference overlap instead of taking turns).
    Each item ends within `config.deadline_s` of when its thread started on it, whatever the image does.
    Shared by the scorer and by `cxr train`'s feature extraction, so both see the same pixels.
    """
    pool = decode_pool(config)

    def _prepare(ref: Reference, job: Job[np.ndarray]) -> np.ndarray:
        job.phase = Stage.FETCH
        return prepare(ref, rules, config, job.deadline_at, partial(setattr, job, "phase"))

    jobs = [pool.submit(partial(_prepare, ref), config.deadline_s) for ref in refs]
    for job in jobs:
        yield _settle(job, pool, config.deadline_s)


def score_messages(
    messages: Sequence[RawMessage],
    bundle: LoadedBundle,
    config: ScoringConfig,
    clock: Callable[[], datetime] = now_utc,
) -> list[Outcome]:
    """One outcome per message, in order, each within a bounded time (`config.deadline_s` per reference)."""
    rows = [_Row(m) for m in messages]
    for row in rows:
        try:
            row.ref = parse_reference(row.message.value)
            row.event_id = row.ref.event_id
        except CxrError as exc:
            row.error = exc
            row.event_id = salvage_event_id(row.message.value)

    descriptor = bundle.descriptor
    pending = [row for row in rows if row.error is None]
    prepared = prepare_each([row.ref for row in pending if row.ref is not None], descriptor, config)
    size = config.inference_batch_size
    ready: list[tuple[_Row, np.ndarray, float]] = []  # row, probabilities, inference seconds per image
    # Predict each chunk as soon as its images are prepared, while the pool prepares the next ones.
    for start in range(0, len(pending), size):
        chunk = pending[start : start + size]
        for row, outcome in zip(chunk, islice(prepared, len(chunk)), strict=True):
            row.x, row.error, row.prep_s = outcome.x, outcome.error, outcome.seconds
        batch = [row for row in chunk if row.x is not None]
        if not batch:
            continue
        started = time.perf_counter()
        try:
            probabilities = bundle.predict(np.stack([row.x for row in batch if row.x is not None]), size)
        except Exception as exc:
            failure = ScoreError(ErrorCode.MODEL_ERROR, f"the model failed on this batch ({type(exc).__name__})")
            for row in batch:
                row.error = failure
            continue
        per_image_s = (time.perf_counter() - started) / len(batch)
        ready.extend((row, probs, per_image_s) for row, probs in zip(batch, probabilities, strict=True))

    scored_at = clock()
    outcomes: dict[int, Outcome] = {}
    for row, probs, per_image_s in ready:
        if not np.all(np.isfinite(probs)):  # NaN/inf cannot be written as JSON: fail this row, not the batch
            row.error = ScoreError(ErrorCode.MODEL_ERROR, "the model produced a non-finite score for this image")
            continue
        outcomes[id(row)] = _result(row, probs, descriptor, config, scored_at, per_image_s)
    stuck = decode_pool(config).stuck
    return [replace(outcomes.get(id(row)) or _dead_letter(row, config, scored_at), stuck_threads=stuck) for row in rows]


def result_body(
    ref: Reference, probs: np.ndarray, descriptor: Descriptor, scored_at: datetime, received_at: datetime | None = None
) -> dict[str, Any]:
    """The `cxr.result/v1` body for one scored reference: scores by label, top finding and triage priority.

    Latency counts from the reference's `sent_at`, else from when it was received (the Kafka timestamp)."""
    scores = {label: float(p) for label, p in zip(descriptor.labels, probs, strict=True)}
    sent_at = parse_timestamp(ref.sent_at) if ref.sent_at else (received_at or scored_at)
    return build_result(
        ref,
        model=descriptor.identity,
        scores=scores,
        top_finding=top_finding(scores, descriptor.normal_labels, descriptor.triage),
        priority=priority(scores, descriptor.triage).value,
        sent_at=sent_at,
        scored_at=scored_at,
    )


def _result(
    row: _Row, probs: np.ndarray, descriptor: Descriptor, config: ScoringConfig, scored_at: datetime, inference_s: float
) -> Outcome:
    ref = row.ref
    assert ref is not None
    body = result_body(ref, probs, descriptor, scored_at, row.message.timestamp)
    return Outcome(
        topic=config.results_topic,
        key=ref.key,
        value=dumps(body),
        scored=True,
        latency_s=max(0.0, body["latency_ms"] / 1000.0),
        inference_s=inference_s,
        preprocess_s=row.prep_s,
    )


def _dead_letter(row: _Row, config: ScoringConfig, failed_at: datetime) -> Outcome:
    error = row.error or ScoreError(ErrorCode.MODEL_ERROR, "the reference was not scored")
    body = build_dead_letter(
        error,
        payload=row.message.value,
        source=row.message.source,
        event_id=row.event_id,
        failed_at=failed_at,
        payload_max_bytes=config.dead_letter_payload_max_bytes,
    )
    return Outcome(
        topic=config.dead_letter_topic,
        key=row.event_id,
        value=dumps(body),
        scored=False,
        stage=error.stage.value,
        error=error.code.value,
    )


def crashed_outcome(message: RawMessage, config: ScoringConfig, clock: Callable[[], datetime] = now_utc) -> Outcome:
    """The dead letter for a message that took its Python worker down, also when it was retried alone."""
    row = _Row(message, event_id=salvage_event_id(message.value))
    row.error = ScoreError(
        ErrorCode.WORKER_CRASHED,
        "the scoring worker died while scoring this reference, again when it was retried on its own",
    )
    return _dead_letter(row, config, clock())
