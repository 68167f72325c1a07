"""score_messages: the whole per-row logic on the real sample X-rays, with a tiny deterministic numpy "model".

The bundle carries the real default descriptor (150x150 RGB, nearest-neighbour, Xception scaling, softmax over
NORMAL/PNEUMONIA, the shipped triage rules), so parse, fetch, decode, preprocess, triage and message building
all run for real; only the TensorFlow model is replaced by a function of the mean input pixel.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from streaming.bundle import Descriptor, LoadedBundle, read_descriptor
from streaming.contracts import DEAD_LETTER_SCHEMA, RESULT_SCHEMA, Reference, Source, rfc3339
from streaming.fetch import FetchPolicy
from streaming.scoring import Outcome, RawMessage, ScoringConfig, score_messages
from streaming.settings import default_bundle_dir

SCORED_AT = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
GAIN = 6.0


def clock() -> datetime:
    return SCORED_AT


@pytest.fixture(scope="module")
def descriptor() -> Descriptor:
    return read_descriptor(default_bundle_dir())


class MeanPixelModel:
    """Logits [0, GAIN * mean(x)] per image; records the size of every chunk it is called with."""

    def __init__(self, fail: bool = False, nan_rows: frozenset[int] = frozenset()) -> None:
        self.chunks: list[int] = []
        self.fail = fail
        self.nan_rows = nan_rows
        self.seen = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.shape[1:] == (150, 150, 3)
        self.chunks.append(len(x))
        if self.fail:
            raise RuntimeError("out of memory")
        means = x.reshape(len(x), -1).mean(axis=1)
        logits = np.stack([np.zeros_like(means), GAIN * means], axis=1)
        for i in range(len(x)):
            if self.seen + i in self.nan_rows:
                logits[i] = np.nan
        self.seen += len(x)
        return logits


def expected_scores(path: Path) -> dict[str, float]:
    """Independently of the pipeline: Keras' load_img (RGB, nearest 150x150), x/127.5 - 1, then the model."""
    with Image.open(path) as img:
        x = np.asarray(img.convert("RGB").resize((150, 150), Image.Resampling.NEAREST), dtype=np.float32)
    mean = float((x / np.float32(127.5) - np.float32(1.0)).mean())
    pneumonia = 1.0 / (1.0 + np.exp(-GAIN * mean))
    return {"NORMAL": 1.0 - pneumonia, "PNEUMONIA": pneumonia}


def reference(path: Path | str, event_id: str, **fields: Any) -> str:
    uri = path if isinstance(path, str) else path.resolve().as_uri()
    return Reference(event_id=event_id, uri=uri, **fields).to_json()


def raw(value: str | None, offset: int, timestamp: datetime | None = None) -> RawMessage:
    return RawMessage(value=value, source=Source("cxr.references", 1, offset), timestamp=timestamp)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    root = tmp_path.resolve()
    (root / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def config(sample_jpegs: list[Path], scratch: Path) -> ScoringConfig:
    roots = (sample_jpegs[0].parent.resolve(), scratch)
    return ScoringConfig(fetch=FetchPolicy(allowed_roots=roots), inference_batch_size=16, decode_threads=4)


def run(
    messages: list[RawMessage], descriptor: Descriptor, config: ScoringConfig, model: Callable[..., Any]
) -> list[Outcome]:
    return score_messages(messages, LoadedBundle(descriptor, model), config, clock=clock)


def body(outcome: Outcome) -> dict[str, Any]:
    outcome.value.encode("utf-8")  # what the Kafka sink writes must be encodable
    parsed: dict[str, Any] = json.loads(outcome.value)
    return parsed


# --------------------------------------------------------------------------------------------------- tests


def test_every_real_xray_is_scored_like_keras_would_see_it(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig
) -> None:
    messages = [raw(reference(p, f"ev-{i}"), i) for i, p in enumerate(sample_jpegs)]
    outcomes = run(messages, descriptor, config, MeanPixelModel())
    assert len(outcomes) == 16
    for i, (path, outcome) in enumerate(zip(sample_jpegs, outcomes, strict=True)):
        result = body(outcome)
        assert outcome.scored and outcome.topic == "cxr.results"
        assert (result["schema"], result["event_id"], outcome.key) == (RESULT_SCHEMA, f"ev-{i}", f"ev-{i}")
        expected = expected_scores(path)
        assert result["scores"] == pytest.approx(expected, abs=1e-5)
        assert sum(result["scores"].values()) == pytest.approx(1.0)
        assert result["model"] == {"name": "pneumonia-xception", "version": "0.3.0"}
        pneumonia = expected["PNEUMONIA"]
        assert result["priority"] == ("STAT" if pneumonia >= 0.9 else "URGENT" if pneumonia >= 0.5 else "ROUTINE")
        assert result["top_finding"] == ("PNEUMONIA" if pneumonia >= 0.5 else None)
        assert outcome.stage is None and outcome.error is None
        assert outcome.inference_s is not None and outcome.inference_s >= 0
        assert outcome.preprocess_s is not None and outcome.preprocess_s > 0
    # The stand-in model separates the images enough for both verdicts to occur.
    assert {body(o)["top_finding"] for o in outcomes} == {None, "PNEUMONIA"}


def test_mixed_batch_gives_one_outcome_per_message_in_order(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig, scratch: Path
) -> None:
    kafka_ts = SCORED_AT - timedelta(seconds=2.5)
    messages = [
        raw(reference(sample_jpegs[0], "ev-ok", study_uid="1.2.3", sent_at="2024-05-01T09:59:59.000Z"), 0),
        raw("{not json", 1),
        raw(reference("file:///etc/passwd", "ev-forbidden"), 2),
        raw(reference(scratch / "corrupt.jpeg", "ev-corrupt"), 3),
        raw(reference(sample_jpegs[1], "ev-kafka-ts"), 4, timestamp=kafka_ts),
        raw(None, 5),
        raw(reference(scratch / "missing.jpeg", "ev-missing"), 6),
        raw(reference(scratch / "notes.txt", "ev-text"), 7),
        raw('{"schema": "cxr.reference/v1", "event_id": "ev-no-uri"}', 8),
        raw(reference("ftp://pacs/x.dcm", "ev-ftp"), 9),
    ]
    outcomes = run(messages, descriptor, config, MeanPixelModel())
    assert len(outcomes) == len(messages)

    expected_dead = {
        1: ("parse", "invalid_json", None),
        2: ("fetch", "forbidden_uri", "ev-forbidden"),
        3: ("decode", "corrupt_image", "ev-corrupt"),
        5: ("parse", "invalid_json", None),
        6: ("fetch", "not_found", "ev-missing"),
        7: ("decode", "unsupported_format", "ev-text"),
        8: ("parse", "missing_field", "ev-no-uri"),
        9: ("fetch", "unsupported_uri", "ev-ftp"),
    }
    for i, outcome in enumerate(outcomes):
        if i not in expected_dead:
            assert outcome.scored and outcome.topic == "cxr.results"
            continue
        stage, error, event_id = expected_dead[i]
        letter = body(outcome)
        assert not outcome.scored and outcome.topic == "cxr.dead-letter"
        assert (outcome.stage, outcome.error, outcome.key) == (stage, error, event_id)
        assert (letter["schema"], letter["stage"], letter["error"], letter["event_id"]) == (
            DEAD_LETTER_SCHEMA,
            stage,
            error,
            event_id,
        )
        assert letter["payload"] == messages[i].value
        assert letter["source"] == {"topic": "cxr.references", "partition": 1, "offset": i}
        assert letter["failed_at"] == rfc3339(SCORED_AT)
        assert letter["reason"]
        assert outcome.latency_s is None and outcome.inference_s is None

    first = body(outcomes[0])
    assert outcomes[0].key == "1.2.3" and first["study_uid"] == "1.2.3"
    assert first["sent_at"] == "2024-05-01T09:59:59.000Z" and first["scored_at"] == rfc3339(SCORED_AT)
    assert first["latency_ms"] == 1000.0 and outcomes[0].latency_s == 1.0

    fallback = body(outcomes[4])
    assert fallback["sent_at"] == rfc3339(kafka_ts)
    assert fallback["latency_ms"] == 2500.0 and outcomes[4].latency_s == 2.5


def test_without_any_send_time_latency_is_zero(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig
) -> None:
    (outcome,) = run([raw(reference(sample_jpegs[0], "ev"), 0)], descriptor, config, MeanPixelModel())
    result = body(outcome)
    assert result["sent_at"] == result["scored_at"] and result["latency_ms"] == 0.0
    assert outcome.latency_s == 0.0


def test_future_send_time_gives_no_negative_latency_metric(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig
) -> None:
    future = rfc3339(SCORED_AT + timedelta(seconds=3))
    (outcome,) = run([raw(reference(sample_jpegs[0], "ev", sent_at=future), 0)], descriptor, config, MeanPixelModel())
    assert outcome.latency_s == 0.0
    assert body(outcome)["latency_ms"] == -3000.0


@pytest.mark.parametrize(("batch_size", "chunks"), [(3, [3, 3, 1]), (7, [7]), (16, [7]), (1, [1] * 7)])
def test_inference_batch_size_is_honoured(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig, batch_size: int, chunks: list[int]
) -> None:
    config = ScoringConfig(fetch=config.fetch, inference_batch_size=batch_size)
    messages = [raw(reference(p, f"ev-{i}"), i) for i, p in enumerate(sample_jpegs[:7])]
    model = MeanPixelModel()
    outcomes = run(messages, descriptor, config, model)
    assert model.chunks == chunks
    assert all(o.scored for o in outcomes)
    # Chunking does not change any score.
    unchunked = run(messages, descriptor, ScoringConfig(fetch=config.fetch, inference_batch_size=64), MeanPixelModel())
    assert [body(o)["scores"] for o in outcomes] == [body(o)["scores"] for o in unchunked]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_rows_that_fail_early_never_reach_the_model(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig, scratch: Path, batch_size: int
) -> None:
    config = ScoringConfig(fetch=config.fetch, inference_batch_size=batch_size)
    messages = [raw(reference(p, f"ev-{i}"), i) for i, p in enumerate(sample_jpegs[:5])]
    messages.insert(1, raw(reference(scratch / "corrupt.jpeg", "bad"), 98))
    messages.insert(3, raw("{}", 99))
    model = MeanPixelModel()
    outcomes = run(messages, descriptor, config, model)
    assert sum(model.chunks) == 5 and max(model.chunks) <= batch_size
    assert [o.scored for o in outcomes] == [True, False, True, False, True, True, True]
    assert [o.error for o in outcomes if not o.scored] == ["corrupt_image", "missing_field"]


def test_model_failure_dead_letters_the_ready_rows_only(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig
) -> None:
    messages = [
        raw(reference(sample_jpegs[0], "ev-a"), 0),
        raw("[]", 1),
        raw(reference("file:///etc/shadow", "ev-forbidden"), 2),
        raw(reference(sample_jpegs[1], "ev-b"), 3),
    ]
    outcomes = run(messages, descriptor, config, MeanPixelModel(fail=True))
    assert [(o.stage, o.error, o.key) for o in outcomes] == [
        ("score", "model_error", "ev-a"),
        ("parse", "not_an_object", None),
        ("fetch", "forbidden_uri", "ev-forbidden"),
        ("score", "model_error", "ev-b"),
    ]
    assert all(not o.scored and o.topic == "cxr.dead-letter" for o in outcomes)
    reason = body(outcomes[0])["reason"]
    assert "RuntimeError" in reason and "out of memory" not in reason


def test_a_failing_chunk_dead_letters_only_its_own_rows(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig
) -> None:
    calls = MeanPixelModel()

    def second_call_fails(x: np.ndarray) -> np.ndarray:
        if len(calls.chunks) == 1:
            calls.chunks.append(len(x))
            raise RuntimeError("device lost")
        return calls(x)

    config = ScoringConfig(fetch=config.fetch, inference_batch_size=2)
    messages = [raw(reference(p, f"ev-{i}"), i) for i, p in enumerate(sample_jpegs[:5])]
    outcomes = run(messages, descriptor, config, second_call_fails)
    assert calls.chunks == [2, 2, 1]
    assert [o.error for o in outcomes] == [None, None, "model_error", "model_error", None]


def test_non_finite_scores_fail_their_own_row(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig
) -> None:
    messages = [raw(reference(p, f"ev-{i}"), i) for i, p in enumerate(sample_jpegs[:3])]
    outcomes = run(messages, descriptor, config, MeanPixelModel(nan_rows=frozenset({1})))
    assert [o.scored for o in outcomes] == [True, False, True]
    assert (outcomes[1].stage, outcomes[1].error, outcomes[1].key) == ("score", "model_error", "ev-1")


def test_unencodable_text_fails_its_row_not_the_batch(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig
) -> None:
    """A lone surrogate escape is valid JSON; it must not reach the UTF-8 Kafka sink as text."""
    bad = reference(sample_jpegs[0], "PLACEHOLDER").replace("PLACEHOLDER", "\\udc80")
    also_bad = '{"schema": "cxr.reference/v1", "event_id": "\\ud800"}'
    messages = [raw(bad, 0), raw(also_bad, 1), raw(reference(sample_jpegs[1], "ok"), 2)]
    outcomes = run(messages, descriptor, config, MeanPixelModel())
    assert [(o.stage, o.error, o.key) for o in outcomes] == [
        ("parse", "invalid_field", None),
        ("parse", "invalid_field", None),
        (None, None, "ok"),
    ]
    for outcome in outcomes:
        body(outcome)


def test_empty_batch_calls_no_model(descriptor: Descriptor, config: ScoringConfig) -> None:
    model = MeanPixelModel()
    assert run([], descriptor, config, model) == []
    assert run([raw("nope", 0)], descriptor, config, model)[0].error == "invalid_json"
    assert model.chunks == []


def test_topics_come_from_the_config(sample_jpegs: list[Path], descriptor: Descriptor) -> None:
    config = ScoringConfig(
        fetch=FetchPolicy(allowed_roots=(sample_jpegs[0].parent.resolve(),)),
        results_topic="r",
        dead_letter_topic="d",
    )
    outcomes = run([raw(reference(sample_jpegs[0], "a"), 0), raw(None, 1)], descriptor, config, MeanPixelModel())
    assert [o.topic for o in outcomes] == ["r", "d"]


# ------------------------------------------------------------------------------------ bounded, whatever comes


def test_a_hung_decoder_becomes_a_decode_timeout_and_the_rest_is_scored(
    sample_jpegs: list[Path], descriptor: Descriptor, config: ScoringConfig, scratch: Path, monkeypatch
) -> None:
    from dataclasses import replace

    from streaming import faults

    monkeypatch.setattr(faults, "HANG_S", 5.0)  # the abandoned thread ends during the test run
    hang = scratch / f"{faults.HANG}.jpeg"
    hang.write_bytes(sample_jpegs[0].read_bytes())
    fast = replace(config, deadline_s=0.5, fault_injection=True, decode_threads=2)
    messages = [raw(reference(hang, "ev-hang"), 0)] + [
        raw(reference(p, f"ev-{i}"), i + 1) for i, p in enumerate(sample_jpegs[:4])
    ]
    started = time.monotonic()
    outcomes = run(messages, descriptor, fast, MeanPixelModel())
    assert time.monotonic() - started < 4.0
    letter = body(outcomes[0])
    assert (letter["stage"], letter["error"]) == ("decode", "timeout")
    assert "0.5 s" in letter["reason"]
    assert all(o.scored for o in outcomes[1:])
    assert outcomes[0].stuck_threads >= 1


def test_a_fifo_in_a_root_is_refused_without_blocking(
    descriptor: Descriptor, config: ScoringConfig, scratch: Path
) -> None:
    fifo = scratch / "scan.jpeg"
    os.mkfifo(fifo)
    started = time.monotonic()
    outcomes = run([raw(reference(fifo, "ev-fifo"), 0)], descriptor, config, MeanPixelModel())
    assert time.monotonic() - started < 2.0
    assert (outcomes[0].stage, outcomes[0].error) == ("fetch", "unsupported_uri")


def test_non_utf8_bytes_are_a_parse_dead_letter_with_the_bytes_kept(
    descriptor: Descriptor, config: ScoringConfig
) -> None:
    import base64

    value = b"\xff\xfe\x00\x81" + b'{"schema": "cxr.reference/v1"}'
    message = RawMessage(value=value, source=Source("cxr.references", 0, 5))
    tombstone = RawMessage(value=None, source=Source("cxr.references", 0, 6))
    deep = RawMessage(value=b"[" * 100_000, source=Source("cxr.references", 0, 7))
    outcomes = run([message, tombstone, deep], descriptor, config, MeanPixelModel())
    letters = [body(o) for o in outcomes]
    assert [(d["stage"], d["error"]) for d in letters] == [("parse", "invalid_json")] * 3
    assert letters[0]["payload_encoding"] == "base64"
    assert base64.b64decode(letters[0]["payload"]) == value
    assert letters[1]["payload"] is None
    assert letters[2]["payload"] == "[" * 100_000 and "payload_encoding" not in letters[2]


def test_a_value_near_the_broker_limit_makes_a_dead_letter_that_still_fits(
    descriptor: Descriptor, config: ScoringConfig
) -> None:
    from dataclasses import replace

    huge = json.dumps({"schema": "cxr.reference/v1", "event_id": "ev-big", "padding": "é" * 500_000})
    small = replace(config, dead_letter_payload_max_bytes=64 * 1024)
    outcome = run([raw(huge, 0)], descriptor, small, MeanPixelModel())[0]
    letter = body(outcome)
    assert (letter["error"], letter["event_id"]) == ("missing_field", "ev-big")
    assert letter["payload_truncated"] is True and letter["payload_bytes"] == len(huge.encode())
    assert len(outcome.value.encode()) < 70 * 1024
    assert huge.startswith(letter["payload"])
