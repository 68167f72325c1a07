"""`cxr batch`: the same scorer over a folder in one Spark batch job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from streaming.batch import run_batch

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _lines(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("part-*")) for line in path.read_text().splitlines()]


def test_batch_scores_a_folder_into_results_and_dead_letters(spark, spark_settings, sample_jpegs, tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    for path in sample_jpegs[:6]:
        shutil.copy(path, images / path.name)
    truncated = sample_jpegs[0].read_bytes()
    (images / "broken.jpeg").write_bytes(truncated[: len(truncated) // 3])
    settings = spark_settings.model_copy(update={"allowed_roots": [images.resolve()]})

    summary = run_batch(spark, settings, images, tmp_path / "out")

    assert (summary.scored, summary.dead_letters) == (6, 1)
    results = _lines(tmp_path / "out" / "results")
    assert sorted(Path(r["uri"]).name for r in results) == sorted(p.name for p in sample_jpegs[:6])
    assert all(r["schema"] == "cxr.result/v1" and r["priority"] in {"STAT", "URGENT", "ROUTINE"} for r in results)
    (dead,) = _lines(tmp_path / "out" / "dead-letter")
    assert (dead["stage"], dead["error"]) == ("decode", "corrupt_image")
    assert dead["source"]["topic"] == "batch:images"


def test_batch_from_a_file_of_references_writes_to_kafka(
    spark, spark_settings, topics, consume, sample_jpegs, tmp_path: Path
):
    lines = tmp_path / "refs.jsonl"
    refs = [
        json.dumps({"schema": "cxr.reference/v1", "event_id": f"b{i}", "uri": p.as_uri()})
        for i, p in enumerate(sample_jpegs[:3])
    ]
    lines.write_text("\n".join([*refs, "not json"]) + "\n")
    settings = spark_settings.model_copy(update={**topics, "allowed_roots": [sample_jpegs[0].parent]})

    summary = run_batch(spark, settings, lines)

    assert (summary.scored, summary.dead_letters) == (3, 1)
    records = consume([topics["results_topic"], topics["dead_letter_topic"]], 4, timeout_s=60)
    by_topic = {t: [json.loads(r.value) for r in records if r.topic == t] for t in topics.values()}
    assert sorted(r["event_id"] for r in by_topic[topics["results_topic"]]) == ["b0", "b1", "b2"]
    assert [d["error"] for d in by_topic[topics["dead_letter_topic"]]] == ["invalid_json"]
