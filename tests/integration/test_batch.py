"""`cxr batch`: the stream's scorer over a folder or a table of references, in resumable chunks (backfill).

Real Spark (the shared session, in-process), the real model and X-rays, the real broker. Only the kill test
runs `cxr batch` as a process of its own, since it must be SIGKILLed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from probes import read_records, wait_for
from producers.folder import references, scan
from streaming import bundle as bundles
from streaming.batch import run_batch
from streaming.contracts import Source
from streaming.scoring import RawMessage, score_messages, scoring_config
from streaming.sources import SourceError, table_reference
from streams import JobProcess, job_env
from xray_files import dicom_bytes, image_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CXR = Path(sys.executable).parent / "cxr"


def _lines(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(folder.glob("part-*")) for line in path.read_text().splitlines()]


def _dicom_of(sample: Path, path: Path) -> dict[str, str]:
    """A sample X-ray as a native DX DICOM file with UIDs of its own; returns the UIDs."""
    with Image.open(sample) as img:
        ds = image_dataset(np.asarray(img.convert("L"), dtype=np.uint8))
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_instance_uid": generate_uid()}
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uids.values()
    ds.ViewPosition = "PA"
    path.write_bytes(dicom_bytes(ds))
    return uids


def test_batch_scores_a_folder_into_results_and_dead_letters(spark, spark_settings, sample_jpegs, tmp_path: Path):
    images = tmp_path / "images"
    (images / "ward" / ".incoming").mkdir(parents=True)
    for path in sample_jpegs[:6]:
        shutil.copy(path, images / path.name)
    truncated = sample_jpegs[0].read_bytes()
    (images / "broken.jpeg").write_bytes(truncated[: len(truncated) // 3])
    uids = _dicom_of(sample_jpegs[7], images / "ward" / "scan.dcm")
    (images / "ward" / "notes.txt").write_text("not an image")
    shutil.copy(sample_jpegs[8], images / "ward" / ".incoming" / "half-written.jpeg")
    shutil.copy(sample_jpegs[9], images / ".hidden.jpeg")
    settings = spark_settings.model_copy(update={"allowed_roots": [images.resolve()]})
    # The folder feed's references for the same files: a backfill must announce each under the same event id.
    feed = {Path(ref.uri).name: ref for ref in references(scan(images))}
    # Results an earlier run wrote: one from this model (skipped now), one from another version (scored again).
    earlier = tmp_path / "out" / "results"
    earlier.mkdir(parents=True)
    model = {"name": "pneumonia-xception", "version": "0.3.0"}
    done, other = feed[sample_jpegs[0].name].event_id, feed[sample_jpegs[1].name].event_id
    (earlier / "part-00000-earlier-c000.txt").write_text(
        json.dumps({"schema": "cxr.result/v1", "event_id": done, "model": model})
        + "\n"
        + json.dumps({"schema": "cxr.result/v1", "event_id": other, "model": {**model, "version": "0.2.0"}})
        + "\n"
    )

    summary = run_batch(spark, settings, images, tmp_path / "out", chunk_size=4, progress=False)

    assert (summary.scored, summary.dead_letters, summary.not_images, summary.skipped) == (6, 1, 1, 1)
    assert summary.complete and summary.chunks == 2
    results = [r for r in _lines(earlier) if "uri" in r]
    expected = [*(p.name for p in sample_jpegs[1:6]), "scan.dcm"]
    assert sorted(Path(r["uri"]).name for r in results) == sorted(expected)
    assert all(r["schema"] == "cxr.result/v1" and r["priority"] in {"STAT", "URGENT", "ROUTINE"} for r in results)
    (dead,) = _lines(tmp_path / "out" / "dead-letter")
    assert (dead["stage"], dead["error"]) == ("decode", "corrupt_image")
    assert dead["source"]["topic"] == "batch:images"
    assert len(feed) == 8  # six samples, the broken one, the DICOM: not the text file, not the hidden ones
    answered = {Path(r["uri"]).name: r["event_id"] for r in results}
    answered[Path(json.loads(dead["payload"])["uri"]).name] = dead["event_id"]
    assert answered == {name: ref.event_id for name, ref in feed.items() if name != sample_jpegs[0].name}
    scan_result = next(r for r in results if r["uri"].endswith("scan.dcm"))
    assert {k: scan_result[k] for k in uids} == uids


def test_batch_from_a_file_of_references_writes_to_kafka_and_resumes(
    spark, spark_settings, topics, consume, sample_jpegs, tmp_path: Path
):
    lines = tmp_path / "refs.jsonl"
    refs = [
        json.dumps({"schema": "cxr.reference/v1", "event_id": f"b{i}", "uri": p.as_uri()})
        for i, p in enumerate(sample_jpegs[:3])
    ]
    lines.write_text("\n".join([*refs, "not json", ""]) + "\n")
    settings = spark_settings.model_copy(update={**topics, "allowed_roots": [sample_jpegs[0].parent]})

    summary = run_batch(spark, settings, lines, progress=False)

    assert (summary.scored, summary.dead_letters, summary.skipped) == (3, 1, 0)
    records = consume([topics["results_topic"], topics["dead_letter_topic"]], 4, timeout_s=60)
    by_topic = {t: [json.loads(r.value) for r in records if r.topic == t] for t in topics.values()}
    assert sorted(r["event_id"] for r in by_topic[topics["results_topic"]]) == ["b0", "b1", "b2"]
    assert [d["error"] for d in by_topic[topics["dead_letter_topic"]]] == ["invalid_json"]

    # Again: what has a result from this model is skipped (read back from the results topic); dead letters are
    # retried.
    again = run_batch(spark, settings, lines, progress=False)
    assert (again.scored, again.dead_letters, again.skipped) == (0, 1, 3)
    records = consume([topics["results_topic"], topics["dead_letter_topic"]], None)
    assert Counter(r.topic for r in records) == {topics["results_topic"]: 3, topics["dead_letter_topic"]: 2}


def test_a_reference_that_kills_its_worker_is_isolated_like_in_the_stream(
    spark, spark_settings, sample_jpegs, tmp_path: Path
):
    """The stream's crash isolation (test-only fault hook): a `score`/`worker_crashed` dead letter and a run that
    ends, where otherwise every rerun would fail on the same file. (Alone in its chunk: each death costs a worker
    and a model load.)"""
    poison = tmp_path / "cxr-fault-crash.jpeg"
    shutil.copy(sample_jpegs[0], poison)
    lines = tmp_path / "refs.jsonl"
    lines.write_text(json.dumps({"schema": "cxr.reference/v1", "event_id": "k0", "uri": poison.as_uri()}) + "\n")
    settings = spark_settings.model_copy(update={"allowed_roots": [tmp_path.resolve()], "fault_injection": True})

    summary = run_batch(spark, settings, lines, tmp_path / "out", progress=False)

    assert (summary.scored, summary.dead_letters, summary.complete) == (0, 1, True)
    (dead,) = _lines(tmp_path / "out" / "dead-letter")
    assert (dead["event_id"], dead["stage"], dead["error"]) == ("k0", "score", "worker_crashed")


def _expected_scores(settings: Any, values: dict[str, str]) -> dict[str, dict[str, float]]:
    """The stream's per-row path (`scoring.score_messages` with the real model), in this process."""
    archive = bundles.pack(settings.model_bundle)
    bundle = bundles.load_archive(archive, None, "cpu")
    messages = [RawMessage(value, Source("expected", 0, i)) for i, value in enumerate(values.values())]
    outcomes = score_messages(messages, bundle, scoring_config(settings))
    bodies = [json.loads(o.value) for o in outcomes]
    assert all(o.scored for o in outcomes)
    return {b["event_id"]: b["scores"] for b in bodies}


def test_a_parquet_table_scores_exactly_like_the_stream_and_is_not_scored_twice(
    spark, spark_settings, sample_jpegs, tmp_path: Path
):
    rows = [
        {"uri": p.as_uri(), "event_id": f"t{i}" if i % 2 else None, "accession": 1000 + i, "label": "x"}
        for i, p in enumerate(sample_jpegs)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "refs.parquet")
    settings = spark_settings.model_copy(update={"allowed_roots": [sample_jpegs[0].parent]})
    out = tmp_path / "out"

    summary = run_batch(spark, settings, tmp_path / "refs.parquet", out, output_format="parquet", progress=False)

    assert (summary.scored, summary.dead_letters) == (16, 0)
    table = pd.read_parquet(out / "results")
    assert len(table) == 16
    assert set(table.columns) >= {"key", "value", "event_id", "model_name", "model_version", "priority", "scored_at"}
    bodies = {b["event_id"]: b for b in map(json.loads, table["value"])}
    assert list(table["event_id"].sort_values()) == sorted(bodies)
    assert set(table["model_version"]) == {"0.3.0"} and str(table["scored_at"].dtype).startswith("datetime64")
    values = {}
    for row in rows:
        event_id, value = table_reference({**row, "accession": str(row["accession"])})
        values[event_id] = value
    assert set(bodies) == set(values)  # rows without an event id got the uuid5 of their uri
    assert all(bodies[e]["accession"] == str(r["accession"]) for e, r in zip(values, rows, strict=True))
    expected = _expected_scores(settings, values)
    for event_id, scores in expected.items():
        assert bodies[event_id]["scores"] == pytest.approx(scores, abs=1e-6)

    files = sorted(p.name for p in (out / "results").iterdir())
    again = run_batch(spark, settings, tmp_path / "refs.parquet", out, output_format="parquet", progress=False)
    assert (again.scored, again.dead_letters, again.skipped) == (0, 0, 16)
    assert sorted(p.name for p in (out / "results").iterdir()) == files


def test_configuration_errors(spark, spark_settings, tmp_path: Path):
    (tmp_path / "refs.csv").write_text("path,label\n/x.png,NORMAL\n")
    with pytest.raises(SourceError, match="no 'uri' column"):
        run_batch(spark, spark_settings, tmp_path / "refs.csv", tmp_path / "out", progress=False)
    (tmp_path / "refs.txt").write_text("file:///x.png\n")
    for args in (
        ["refs.txt"],
        ["missing.jsonl"],
        ["refs.csv", "--format", "parquet"],
        ["refs.csv", "--chunk-size", "0"],
    ):
        done = subprocess.run([str(CXR), "batch", *args], cwd=tmp_path, capture_output=True, timeout=120, text=True)
        assert done.returncode == 2, (args, done.stderr[-2000:])
    assert not (tmp_path / "out").exists()


class BatchProcess(JobProcess):
    command = ("batch",)


def test_a_killed_batch_resumes_without_losing_or_repeating_results(
    spark, spark_settings, kafka_broker, topics, sample_jpegs, tmp_path: Path
):
    """48 references (the 16 samples three times under distinct event ids) in chunks of about 6, to Kafka:
    `cxr batch` killed once some chunks are written, run again to the end, then once more, finding nothing to do."""
    table = tmp_path / "refs.csv"
    ids = [str(uuid.uuid4()) for _ in range(48)]
    pd.DataFrame({"uri": [sample_jpegs[i % 16].as_uri() for i in range(48)], "event_id": ids}).to_csv(
        table, index=False
    )
    bootstrap = kafka_broker.bootstrap_servers
    env = job_env(bootstrap, topics, [sample_jpegs[0].parent], tmp_path / "checkpoint")
    args = (str(table), "--chunk-size", "6", "--no-progress")

    def results() -> Counter[str]:
        records = read_records(bootstrap, [topics["results_topic"]])
        return Counter(json.loads(r.value)["event_id"] for r in records)

    first = BatchProcess(env, tmp_path / "first.log", args).start()
    try:
        assert wait_for(lambda: sum(results().values()) >= 12 or not first.running, timeout_s=300, poll_s=0.2)
        assert first.running, f"the batch ended before it could be killed:\n{first.log()[-3000:]}"
        first.kill()
    finally:
        if first.running:
            first.kill()
    committed = results()
    assert 12 <= sum(committed.values()) < 48

    # Run again (in this process, on the shared session: the kill above was the subprocess' job) to the end.
    settings = spark_settings.model_copy(update={**topics, "allowed_roots": [sample_jpegs[0].parent]})
    second = run_batch(spark, settings, table, chunk_size=6, progress=False)
    assert second.complete
    assert (second.scored, second.dead_letters) == (48 - len(committed), 0)
    assert second.skipped == len(committed)  # every result already written was skipped

    final = results()
    assert set(final) == set(ids)  # none missing
    # None twice: the contract allows the chunk in flight to be written again, but a result that reached Kafka
    # before the kill is read back and skipped, and a local run retries no task.
    assert all(count == 1 for count in final.values()), final.most_common(3)

    # Once more: nothing left to do, nothing written.
    third = run_batch(spark, settings, table, chunk_size=6, progress=False)
    assert (third.scored, third.dead_letters, third.skipped, third.chunks) == (0, 0, 48, 0)
    assert results() == final
