"""Can the exporters keep up with the scorer? Their costs, side by side with the peers that skip a step.

Builders, per result, on the sixteen sample X-rays as DICOM (`cxr demo --pacs`'s DX instances):
- `fhir` is what ships: the bundle built and validated by fhir.resources' R4B models; `fhir-unvalidated` builds
  the same dict without the models: the ratio is the price of validating every bundle.
- `sr` is what ships: the header read back, the Comprehensive SR built by highdicom and written as Part 10.

End to end, on the embedded broker, N results on a topic of one partition:
- `export fhir` is `cxr export fhir`'s runner and exporter (build, validate, publish and wait for the
  acknowledgement of each bundle, cursor saved per poll);
- `export sr --out` is `cxr export sr --out DIR`'s (read each image's header back from a file under an allowed
  root, build the SR, write it atomically);
- `copy, ack each` reads the same results and writes them on unchanged with the same per-message wait (the
  floor an exporter that acknowledges each result before moving on can reach);
- `copy, one flush` writes them all and waits once at the end (what giving up the per-result guarantee buys).

    .venv/bin/python -m bench.exporters [--results 2000] [--out bench/results/exporters.json]

It writes the figures as JSON and as a table beside it (`exporters.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import fhir.resources
import highdicom
import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from pydicom import dcmread

from exporters.fhir import build_bundle, bundle_json, unvalidated_bundle
from exporters.interpret import ModelRules
from exporters.metrics import ExportMetrics
from exporters.runner import ExportRunner, KafkaOut
from exporters.service import make_exporter
from exporters.sr import build_sr, read_source, sr_bytes
from streaming.broker import EmbeddedBroker
from streaming.bundle import Descriptor, read_descriptor
from streaming.contracts import Reference, dumps
from streaming.embedded_pacs import sample_instance
from streaming.scoring import result_body
from streaming.settings import Settings, default_bundle_dir, sample_images_dir
from worklist.events import ImageEvent, read_result


def results_for(dicoms: list[bytes], root: Path, descriptor: Descriptor) -> list[tuple[bytes, bytes]]:
    """Each sample DICOM written under `root`, and the `cxr.result/v1` the scorer would make of it (scores
    spread over the triage bands), with the DICOM bytes its URI fetches."""
    finding = next(label for label in descriptor.labels if label not in descriptor.normal_labels)
    scored_at = datetime(2026, 11, 26, 10, 0, 1, tzinfo=UTC)
    out = []
    for index, data in enumerate(dicoms):
        header = dcmread(BytesIO(data), stop_before_pixels=True)
        path = root / f"{header.SOPInstanceUID}.dcm"
        path.write_bytes(data)
        ref = Reference(
            event_id=str(uuid.uuid4()),
            uri=path.as_uri(),
            study_uid=header.StudyInstanceUID,
            series_uid=header.SeriesInstanceUID,
            sop_instance_uid=header.SOPInstanceUID,
            accession=header.AccessionNumber,
        )
        score = (index % 10) / 10 + 0.05
        probs = np.array([score if label == finding else 1 - score for label in descriptor.labels])
        out.append((dumps(result_body(ref, probs, descriptor, scored_at, scored_at)).encode(), data))
    return out


def per_second(work: Callable[[], object], rounds: int = 3, seconds: float = 2.0) -> float:
    """How many times `work` runs per second: the best of `rounds` (after one warm-up call), as timeit
    reports, since a shared machine only ever slows a round down."""
    work()
    best = 0.0
    for _ in range(rounds):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            work()
            count += 1
        best = max(best, count / (time.perf_counter() - started))
    return best


def builders(messages: list[tuple[bytes, bytes]], rules: ModelRules | None) -> dict[str, float]:
    events = [read_result(value, None) for value, _ in messages]
    cycle = {"i": 0}

    def next_pair() -> tuple[ImageEvent, bytes]:
        cycle["i"] = (cycle["i"] + 1) % len(events)
        return events[cycle["i"]], messages[cycle["i"]][1]

    def fhir() -> object:
        return bundle_json(build_bundle(next_pair()[0], rules))

    def fhir_unvalidated() -> object:
        return bundle_json(unvalidated_bundle(next_pair()[0], rules))

    def sr() -> object:
        event, data = next_pair()
        return sr_bytes(build_sr(event, read_source(data), rules))

    return {"fhir": per_second(fhir), "fhir-unvalidated": per_second(fhir_unvalidated), "sr": per_second(sr)}


def copy_topic(bootstrap: str, source: str, target: str, count: int, ack_each: bool) -> float:
    """Results per second read from `source` and written to `target` unchanged."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    consumer.subscribe([source])
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    started, done = time.perf_counter(), 0
    while done < count:
        for records in consumer.poll(timeout_ms=500, max_records=50).values():
            for record in records:
                future = producer.send(target, key=record.key, value=record.value)
                if ack_each:
                    future.get(timeout=30)
                done += 1
    producer.flush()
    elapsed = time.perf_counter() - started
    consumer.close()
    producer.close()
    return count / elapsed


def export(kind: str, settings: Settings, count: int) -> float:
    """Results per second through `cxr export <kind>`'s runner, from the first poll to the last export."""
    out = KafkaOut(settings)
    exporter = make_exporter(kind, settings, out)
    metrics = ExportMetrics(kind)
    runner = ExportRunner(settings, exporter, metrics, out)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    started = time.perf_counter()
    thread.start()
    while (metrics.registry.get_sample_value("cxr_export_results_total", {"exporter": kind, "outcome": "exported"})
           or 0) < count:  # fmt: skip
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join(30)
    return count / elapsed


def table(report: dict[str, Any]) -> str:
    b, e = report["builders_per_second"], report["end_to_end_per_second"]
    lines = [
        "# cxr export: what the exporters cost",
        "",
        f"{report['machine']}; one run of `python -m bench.exporters --results {report['results']}`.",
        "",
        "Builders, one thread, per result (the sixteen sample X-rays as DICOM; best of 3 rounds of 2 s):",
        "",
        "| builder | results/s | ratio to `fhir` |",
        "|---|---:|---:|",
        *(f"| {name} | {rate:.0f} | {rate / b['fhir']:.2f}x |" for name, rate in b.items()),
        "",
        f"End to end on the embedded broker, {report['results']} results on one partition:",
        "",
        "| run | results/s | `export fhir` ÷ run |",
        "|---|---:|---:|",
        *(f"| {name} | {rate:.0f} | {e['export fhir'] / rate:.2f}x |" for name, rate in e.items()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/exporters.json"))
    args = parser.parse_args()

    dicoms = [sample_instance(jpeg, index) for index, jpeg in enumerate(sorted(sample_images_dir().glob("*.jpeg")))]
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, fhir.resources {fhir.resources.__version__}, highdicom "
        f"{highdicom.__version__}; {time.strftime('%Y-%m-%d')}",
        "results": args.results,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        xrays = work / "xrays"
        xrays.mkdir()
        messages = results_for(dicoms, xrays, read_descriptor(default_bundle_dir()))
        report["builders_per_second"] = builders(messages, ModelRules.of_bundle(default_bundle_dir()))

        with EmbeddedBroker(Settings.load().jvm_lib_dir, workdir=work / "kafka") as broker:
            topics = ["bench.results", "bench.fhir", "bench.copy-each", "bench.copy-flush", "bench.export-dl"]
            broker.create_topics(topics, partitions=1)
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all", linger_ms=20)
            for index in range(args.results):
                value = json.loads(messages[index % len(messages)][0])
                value["event_id"] = str(uuid.uuid4())
                producer.send("bench.results", value=json.dumps(value).encode())
            producer.flush()
            producer.close()
            settings = Settings.load(
                kafka_bootstrap_servers=broker.bootstrap_servers,
                results_topic="bench.results",
                fhir_topic="bench.fhir",
                export_dead_letter_topic="bench.export-dl",
                state_dir=work / "state",
                allowed_roots=[xrays],
                sr_output_dir=work / "sr",
            )
            server = broker.bootstrap_servers
            report["end_to_end_per_second"] = {
                "export fhir": export("fhir", settings, args.results),
                "export sr --out": export("sr", settings, args.results),
                "copy, ack each": copy_topic(server, "bench.results", "bench.copy-each", args.results, True),
                "copy, one flush": copy_topic(server, "bench.results", "bench.copy-flush", args.results, False),
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    markdown = table(report)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
