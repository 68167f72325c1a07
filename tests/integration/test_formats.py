"""The same chest X-ray in every container scores the same, end to end.

Two real samples (one normal, one bacterial pneumonia) are written as their original JPEG, three PNGs and
every flavour of DICOM the scorer reads (see `xray_files`); the real folder producer announces them all, and one
run of the scoring job on the real broker and Spark scores them. Every variant decodes to exactly the JPEG's
pixels, so its scores must be the JPEG's (up to floating-point noise from batching), and DICOM results must
be keyed by, and carry, the identifiers in their own headers.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from probes import read_records
from producers.folder import references, scan
from producers.publish import ReferencePublisher
from streaming.contracts import Reference
from streaming.pipeline import ScoringJob
from streaming.settings import Settings
from xray_files import LOSSLESS_SYNTAXES, dicom_variants, pillow_pixels, png_variants

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JPEG = "jpeg"
PNG_VARIANTS = ("png-8bit-L", "png-8bit-RGB", "png-16bit")
DICOM_VARIANTS = ("mono2-8bit", "mono1-8bit", "12bit-rescale-window", "jpeg-baseline", *LOSSLESS_SYNTAXES)
#: Allowed difference from the original JPEG's scores. Every variant decodes to exactly the JPEG's pixels, so
#: the model input is identical and only floating-point noise (a different batch composition) may remain.
TOLERANCE = 1e-4
#: The bound actually held: identical inputs have so far given bit-identical scores (difference 0.0), so this
#: only leaves room for the ~1e-7 a different batch composition could make on another CPU.
EXACT = 1e-6
DICOM_IDENTIFIERS = {
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
}


@dataclass(frozen=True)
class File:
    sample: str  # "normal" or "bacteria"
    variant: str  # "jpeg", a PNG variant or a DICOM variant
    path: Path


@dataclass
class Run:
    files: dict[str, File]  # by URI
    sent: dict[str, Reference]  # by event id
    results: dict[str, dict[str, Any]]  # by event id, with "_key" (the Kafka key)
    dead: list[dict[str, Any]]
    seconds: float


def pick_samples(sample_jpegs: list[Path]) -> dict[str, Path]:
    """The smallest normal and the smallest bacterial-pneumonia sample (both real, keeps the run short)."""
    normal = [p for p in sample_jpegs if p.name.startswith("NORMAL")]
    bacteria = [p for p in sample_jpegs if p.name.startswith("person") and "bacteria" in p.name]
    assert normal and bacteria

    def size(path: Path) -> int:
        return path.stat().st_size

    return {"normal": min(normal, key=size), "bacteria": min(bacteria, key=size)}


def write_variants(folder: Path, samples: dict[str, Path]) -> dict[str, File]:
    """Every variant of every sample into `folder`, by URI (as the folder producer will announce it)."""
    files: dict[str, File] = {}

    def write(sample: str, variant: str, suffix: str, data: bytes) -> None:
        path = (folder / f"{sample}.{variant}{suffix}").resolve()
        path.write_bytes(data)
        files[path.as_uri()] = File(sample, variant, path)

    for sample, source in samples.items():
        jpeg = source.read_bytes()
        pixels = pillow_pixels(jpeg)
        uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
        write(sample, JPEG, ".jpeg", jpeg)
        for variant, data in png_variants(pixels).items():
            write(sample, variant, ".png", data)
        for variant, data in dicom_variants(pixels, jpeg, uids).items():
            write(sample, variant, ".dcm", data)
    return files


@pytest.fixture(scope="module")
def run(
    spark: Any, spark_settings: Settings, kafka_broker: Any, sample_jpegs: list[Path], tmp_path_factory: Any
) -> Run:
    tmp = tmp_path_factory.mktemp("formats")
    folder = tmp / "images"
    folder.mkdir()
    files = write_variants(folder, pick_samples(sample_jpegs))
    suffix = uuid.uuid4().hex[:8]
    topics = {k: f"formats.{k}.{suffix}" for k in ("input_topic", "results_topic", "dead_letter_topic")}
    kafka_broker.create_topics(topics.values(), partitions=2)
    settings = spark_settings.model_copy(
        update={**topics, "checkpoint_dir": tmp / "checkpoint", "allowed_roots": [folder.resolve()]}
    )

    refs = list(references(scan(folder)))
    with ReferencePublisher.for_settings(settings) as publisher:
        publisher.send_all(refs)

    started = time.monotonic()
    job = ScoringJob.create(settings, spark)
    job.start()
    try:
        outputs = [topics["results_topic"], topics["dead_letter_topic"]]
        records = read_records(kafka_broker.bootstrap_servers, outputs, len(refs), timeout_s=240)
    finally:
        job.stop()
    seconds = time.monotonic() - started

    results: dict[str, dict[str, Any]] = {}
    dead: list[dict[str, Any]] = []
    for record in records:
        body = json.loads(record.value) | {"_key": record.key.decode() if record.key is not None else None}
        if record.topic == topics["results_topic"]:
            results[body["event_id"]] = body
        else:
            dead.append(body)
    return Run(files, {r.event_id: r for r in refs}, results, dead, seconds)


def score_differences(run: Run) -> dict[str, float]:
    """The largest |score - the original JPEG's score| of each variant, over samples and labels."""
    by_file = {run.files[r["uri"]]: r["scores"] for r in run.results.values()}
    originals = {f.sample: scores for f, scores in by_file.items() if f.variant == JPEG}
    worst: dict[str, float] = {}
    for file, scores in by_file.items():
        original = originals[file.sample]
        assert set(scores) == set(original) == {"NORMAL", "PNEUMONIA"}
        diff = max(abs(scores[label] - original[label]) for label in original)
        worst[file.variant] = max(worst.get(file.variant, 0.0), diff)
    return worst


def test_every_variant_was_written_and_announced(run: Run) -> None:
    variants = {(f.sample, f.variant) for f in run.files.values()}
    expected = {JPEG, *PNG_VARIANTS, *DICOM_VARIANTS}
    assert variants == {(s, v) for s in ("normal", "bacteria") for v in expected}
    assert {r.uri for r in run.sent.values()} == set(run.files)


def test_every_file_is_scored_and_none_is_dead_lettered(run: Run) -> None:
    reasons = [(d["stage"], d["error"], d["reason"], d["payload"]) for d in run.dead]
    assert reasons == []
    assert set(run.results) == set(run.sent)
    for event_id, result in run.results.items():
        assert result["schema"] == "cxr.result/v1"
        assert result["uri"] == run.sent[event_id].uri


def test_every_variant_scores_like_the_original_jpeg(run: Run) -> None:
    worst = score_differences(run)
    print(f"\n{len(run.results)} files scored in one job run of {run.seconds:.1f} s; largest |score - JPEG's|:")
    for variant, diff in sorted(worst.items()):
        print(f"  {variant:<22} {diff:.2e}")
    assert set(worst) == {JPEG, *PNG_VARIANTS, *DICOM_VARIANTS}
    over = {variant: diff for variant, diff in worst.items() if diff > TOLERANCE}
    assert over == {}
    # Identical model inputs: anything above floating-point noise would be a decoding difference.
    assert {variant: diff for variant, diff in worst.items() if diff > EXACT} == {}
    by_file = {run.files[r["uri"]]: r for r in run.results.values()}
    for file, result in by_file.items():  # so the triage outcome is the same too
        original = next(r for f, r in by_file.items() if (f.sample, f.variant) == (file.sample, JPEG))
        assert (result["top_finding"], result["priority"]) == (original["top_finding"], original["priority"])


def test_dicom_results_are_keyed_by_study_and_echo_the_header(run: Run) -> None:
    dicom = [r for r in run.results.values() if run.files[r["uri"]].path.suffix == ".dcm"]
    assert len(dicom) == 2 * len(DICOM_VARIANTS)
    sop_instances = set()
    for result in dicom:
        header = pydicom.dcmread(run.files[result["uri"]].path, stop_before_pixels=True)
        assert (header.Modality, header.ViewPosition) == ("DX", "PA")
        for field, keyword in DICOM_IDENTIFIERS.items():
            assert result[field] == str(header[keyword].value)
        assert result["_key"] == result["study_uid"] != result["event_id"]
        sop_instances.add(result["sop_instance_uid"])
    assert len(sop_instances) == len(dicom)
    assert len({r["study_uid"] for r in dicom}) == 2  # one study per sample


def test_png_and_jpeg_results_are_keyed_by_event_id(run: Run) -> None:
    rasters = [r for r in run.results.values() if run.files[r["uri"]].path.suffix in (".png", ".jpeg")]
    assert len(rasters) == 2 * (1 + len(PNG_VARIANTS))
    for result in rasters:
        assert result["_key"] == result["event_id"]
        assert all(result.get(field) is None for field in DICOM_IDENTIFIERS)
