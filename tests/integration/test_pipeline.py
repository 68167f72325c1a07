"""The scoring job end to end: real broker, real Spark with the Kafka connector, the real model, real X-rays.

One job run (module-scoped) carries the sixteen sample X-rays and a dozen hostile or broken references in the
same micro-batch; the tests then check the results, the dead letters, the totals and the metrics endpoint.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keras_reference import keras_probabilities
from probes import http_get, read_records
from streaming.contracts import Reference, payload_fields
from streaming.metrics import MetricsServer
from streaming.pipeline import ScoringJob
from streaming.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MAX_BYTES = 600_000  # above every sample JPEG (≤ 300 kB), below the oversized PNG made here


def reference(uri: str, event_id: str | None = None) -> str:
    return Reference(event_id=event_id or str(uuid.uuid4()), uri=uri).to_json()


def hostile_inputs(root: Path, outside: Path, sample: Path) -> list[tuple[str, str | bytes | None, str, str]]:
    """(description, message value, expected stage, expected error) for every kind of bad input."""
    import os
    import socket

    from PIL import Image

    secret = outside / "secret.jpeg"
    secret.write_bytes(sample.read_bytes())
    (root / "escape.jpeg").symlink_to(secret)
    data = sample.read_bytes()
    (root / "truncated.jpeg").write_bytes(data[: len(data) // 2])
    (root / "notes.png").write_text("this is a text file, not a PNG\n")
    (root / "empty.jpeg").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 255, (900, 900), dtype=np.uint8)
    Image.fromarray(noise).save(root / "huge.png")
    assert (root / "huge.png").stat().st_size > MAX_BYTES
    schema_v2 = json.dumps({"schema": "cxr.reference/v2", "event_id": "e-v2", "uri": (root / "x.png").as_uri()})
    os.mkfifo(root / "scan.jpeg")
    os.mknod(root / "zero.dcm", 0o600 | 0o020000, os.makedev(1, 5))  # a character device: /dev/zero's numbers
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "socket.png"))  # closed with the test process; the path stays a socket
    near_limit = json.dumps(
        {"schema": "cxr.reference/v1", "event_id": "e-big", "uri": "gopher://x/1", "padding": "x" * 900_000}
    )
    instance = "/dicom-web/studies/1/series/2/instances/3"
    return [
        ("not UTF-8", b"\xff\xfe\x00\x81" + b'{"schema": "cxr.reference/v1"}', "parse", "invalid_json"),
        ("a tombstone", None, "parse", "invalid_json"),
        ("nesting too deep", "[" * 100_000, "parse", "invalid_json"),
        ("a value near the broker's size limit", near_limit, "fetch", "unsupported_uri"),
        ("a FIFO in the root", reference((root / "scan.jpeg").as_uri()), "fetch", "unsupported_uri"),
        ("a device in the root", reference((root / "zero.dcm").as_uri()), "fetch", "unsupported_uri"),
        ("a socket in the root", reference((root / "socket.png").as_uri()), "fetch", "unsupported_uri"),
        ("a folder", reference(root.as_uri()), "fetch", "unsupported_uri"),
        ("URL-encoded '..'", reference(f"file://{root}/%2e%2e/outside/secret.jpeg"), "fetch", "forbidden_uri"),
        ("file:// with a host", reference(f"file://fileserver{root}/truncated.jpeg"), "fetch", "forbidden_uri"),
        ("decimal loopback", reference(f"http://2130706433{instance}"), "fetch", "forbidden_uri"),
        ("IPv4-mapped IPv6", reference(f"http://[::ffff:127.0.0.1]{instance}"), "fetch", "forbidden_uri"),
        ("cloud metadata", reference(f"http://169.254.169.254{instance}"), "fetch", "forbidden_uri"),
        ("invalid JSON", "{not json", "parse", "invalid_json"),
        ("JSON that is not an object", "[1, 2, 3]", "parse", "not_an_object"),
        ("missing uri", json.dumps({"schema": "cxr.reference/v1", "event_id": "e-no-uri"}), "parse", "missing_field"),
        ("wrong schema version", schema_v2, "parse", "unsupported_schema"),
        ("file that does not exist", reference((root / "nope.jpeg").as_uri()), "fetch", "not_found"),
        ("'..' out of the root", reference(f"file://{root}/../outside/secret.jpeg"), "fetch", "forbidden_uri"),
        ("symlink out of the root", reference((root / "escape.jpeg").as_uri()), "fetch", "forbidden_uri"),
        ("absolute path elsewhere", reference("file:///etc/passwd"), "fetch", "forbidden_uri"),
        ("truncated JPEG", reference((root / "truncated.jpeg").as_uri()), "decode", "corrupt_image"),
        ("text file named .png", reference((root / "notes.png").as_uri()), "decode", "unsupported_format"),
        ("empty file", reference((root / "empty.jpeg").as_uri()), "decode", "corrupt_image"),
        ("image over the size limit", reference((root / "huge.png").as_uri()), "fetch", "too_large"),
    ]


@dataclass
class Run:
    good: list[str]
    bad: list[tuple[str, str | bytes | None, str, str]]
    results: dict[str, dict[str, Any]]
    dead: list[dict[str, Any]]
    total_sent: int
    metrics_text: str
    ready_status: int
    sample_paths: dict[str, Path]


def job_settings(base: Settings, topics: dict[str, str], tmp: Path, roots: list[Path], **extra: Any) -> Settings:
    return base.model_copy(
        update={
            **topics,
            "checkpoint_dir": tmp / "checkpoint",
            "allowed_roots": [r.resolve() for r in roots],
            "max_image_bytes": MAX_BYTES,
            "max_offsets_per_trigger": 1000,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def run(spark, spark_settings, kafka_broker, sample_jpegs, tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("pipeline")
    root, outside = tmp / "root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    suffix = uuid.uuid4().hex[:8]
    topics = {k: f"pipe.{k}.{suffix}" for k in ("input_topic", "results_topic", "dead_letter_topic")}
    kafka_broker.create_topics(topics.values(), partitions=2)

    good = {str(uuid.uuid4()): p for p in sample_jpegs}
    bad = hostile_inputs(root, outside, sample_jpegs[0])
    values: list[str | bytes | None] = [reference(p.as_uri(), eid) for eid, p in good.items()]
    values += [v for _, v, _, _ in bad]
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    for value in values:
        key = b"a-tombstone" if value is None else None  # Kafka takes a null value only with a key
        producer.send(topics["input_topic"], value.encode() if isinstance(value, str) else value, key=key)
    producer.flush()
    producer.close()

    settings = job_settings(spark_settings, topics, tmp, [root, sample_jpegs[0].parent])
    job = ScoringJob.create(settings, spark)
    server = MetricsServer(job.metrics, job.health, "127.0.0.1", 0).start()
    job.start()
    try:
        outputs = [topics["results_topic"], topics["dead_letter_topic"]]
        records = read_records(kafka_broker.bootstrap_servers, outputs, len(values), timeout_s=240)
        # The listener reports a batch just after its commit; wait for the figures to include it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, text = http_get(f"http://127.0.0.1:{server.port}/metrics")
            # Outcomes are counted when a batch is written, its duration when its progress is reported.
            if 'cxr_references_total{outcome="scored"} 16.0' in text and "cxr_batches_total 0.0" not in text:
                break
            time.sleep(0.5)
        ready_status, _ = http_get(f"http://127.0.0.1:{server.port}/readyz")
    finally:
        job.stop()
        server.stop()
    results = {}
    dead = []
    for record in records:
        body = json.loads(record.value)
        if record.topic == topics["results_topic"]:
            results[body["event_id"]] = body | {"_key": record.key.decode() if record.key else None}
        else:
            dead.append(body | {"_key": record.key.decode() if record.key else None})
    return Run(list(good), bad, results, dead, len(values), text, ready_status, good)


def test_every_sample_is_scored_exactly_like_plain_keras(run: Run) -> None:
    from streaming.settings import default_bundle_dir

    assert set(run.results) == set(run.good)
    ids = list(run.sample_paths)
    expected = keras_probabilities(default_bundle_dir(), [run.sample_paths[i] for i in ids])
    for event_id, probs in zip(ids, expected, strict=True):
        scores = run.results[event_id]["scores"]
        assert scores["NORMAL"] == pytest.approx(float(probs[0]), abs=1e-4)
        assert scores["PNEUMONIA"] == pytest.approx(float(probs[1]), abs=1e-4)


def test_results_follow_the_contract(run: Run) -> None:
    for event_id, result in run.results.items():
        assert result["schema"] == "cxr.result/v1"
        assert result["_key"] == event_id  # no study UID in these references: keyed by event id
        assert result["uri"] == run.sample_paths[event_id].as_uri()
        assert result["model"] == {"name": "pneumonia-xception", "version": "0.3.0"}
        assert set(result["scores"]) == {"NORMAL", "PNEUMONIA"}
        assert all(0.0 <= s <= 1.0 for s in result["scores"].values())
        assert result["priority"] in {"STAT", "URGENT", "ROUTINE"}
        pneumonia = result["scores"]["PNEUMONIA"]
        assert result["top_finding"] == ("PNEUMONIA" if pneumonia >= 0.5 else None)
        assert result["priority"] == ("STAT" if pneumonia >= 0.9 else "URGENT" if pneumonia >= 0.5 else "ROUTINE")
        assert result["latency_ms"] >= 0
        assert result["scored_at"].endswith("Z") and result["sent_at"].endswith("Z")
    # The real model on the real images: most bacterial pneumonia cases come out on top.
    flagged = [r for r in run.results.values() if r["top_finding"] == "PNEUMONIA"]
    assert sum("bacteria" in r["uri"] for r in flagged) >= 5


def test_bad_input_becomes_dead_letters_with_reasons(run: Run) -> None:
    by_payload = {d["payload"]: d for d in run.dead}
    assert len(run.dead) == len(run.bad)
    for description, value, stage, error in run.bad:
        letter = by_payload.get(payload_fields(value)["payload"])  # as a dead letter carries it
        assert letter is not None, description
        assert (letter["stage"], letter["error"]) == (stage, error), description
        assert letter["schema"] == "cxr.dead-letter/v1"
        assert letter["reason"] and "\n" not in letter["reason"]
        assert letter["source"]["topic"].startswith("pipe.input_topic")
        assert isinstance(letter["source"]["offset"], int)
    assert by_payload["{not json"]["event_id"] is None
    assert by_payload["{not json"]["_key"] is None
    missing_uri = next(d for d in run.dead if d["error"] == "missing_field")
    assert missing_uri["event_id"] == "e-no-uri" and missing_uri["_key"] == "e-no-uri"


def test_nothing_is_lost(run: Run) -> None:
    assert len(run.results) + len(run.dead) == run.total_sent


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_match_what_was_sent_scored_and_dead_lettered(run: Run) -> None:
    samples = _samples(run.metrics_text)
    assert samples[("cxr_references_total", (("outcome", "scored"),))] == 16
    assert samples[("cxr_references_total", (("outcome", "dead_letter"),))] == len(run.bad)
    for _, _, stage, error in run.bad:
        expected = sum(1 for _, _, s, e in run.bad if (s, e) == (stage, error))
        assert samples[("cxr_dead_letters_total", (("error", error), ("stage", stage)))] == expected
    assert samples[("cxr_end_to_end_latency_seconds_count", ())] == 16
    assert samples[("cxr_end_to_end_latency_seconds_bucket", (("le", "+Inf"),))] == 16
    assert samples[("cxr_inference_seconds_count", ())] == 16
    assert samples[("cxr_inference_seconds_sum", ())] > 0
    assert samples[("cxr_model_info", (("name", "pneumonia-xception"), ("version", "0.3.0")))] == 1
    assert samples[("cxr_batch_duration_seconds_count", ())] >= 1
    assert samples[("cxr_kafka_offsets_behind_latest", ())] == 0
    assert ("cxr_input_rows_per_second", ()) in samples
    assert ("cxr_processed_rows_per_second", ()) in samples
    assert run.ready_status == 200
