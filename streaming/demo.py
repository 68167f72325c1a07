"""`cxr demo`: the whole system on one machine, with the real model and the real sample X-rays.

Embedded Kafka broker → scoring job in Spark local mode → metrics endpoint; the sixteen sample chest X-rays
that ship with the model package are published as references, and the worklist is shown live as results
arrive, most urgent first.

`cxr demo --pacs` takes the hospital's path instead: an embedded Orthanc receives the sixteen X-rays as DICOM
instances, the Orthanc change-feed follower announces them, and the scorer fetches each over DICOMweb.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from kafka import KafkaConsumer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from producers.folder import references, scan
from producers.publish import ReferencePublisher
from streaming.broker import EmbeddedBroker, default_partitions, port_is_free
from streaming.embedded_pacs import EmbeddedOrthanc, sample_instance
from streaming.metrics import MetricsServer
from streaming.settings import Settings, sample_images_dir
from streaming.triage import finding_strength, worklist_key

log = logging.getLogger("cxr.demo")
_STYLE = {"STAT": "bold white on red", "URGENT": "bold black on yellow", "ROUTINE": "green"}


def worklist_table(
    results: list[dict[str, Any]], dead: list[dict[str, Any]], expected: int, normal_labels: tuple[str, ...] = ()
) -> Group:
    """The worklist, most urgent first; `score` is the strongest non-normal label's probability."""
    table = Table(title="cxr-stream worklist", title_justify="left", expand=False)
    for name, justify in (
        ("#", "right"),
        ("priority", "left"),
        ("top finding", "left"),
        ("score", "right"),
        ("image", "left"),
        ("latency", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for i, result in enumerate(sorted(results, key=lambda r: worklist_key(r, normal_labels)), 1):
        finding = result.get("top_finding")
        score = finding_strength(result, normal_labels) if result.get("scores") else None
        table.add_row(
            str(i),
            Text(f" {result['priority']} ", style=_STYLE.get(result["priority"], "")),
            finding or "—",
            f"{score:.3f}" if score is not None else "—",
            Path(unquote(urlsplit(result.get("uri", "")).path)).name,
            f"{result.get('latency_ms', 0) / 1000:.1f} s",
        )
    done = len(results) + len(dead)
    lines: list[Any] = [table, Text(f"{len(results)} scored, {len(dead)} dead-lettered, {done}/{expected} done")]
    for letter in dead:
        lines.append(
            Text(f"  dead letter: {letter.get('stage')}/{letter.get('error')}: {letter.get('reason')}", style="red")
        )
    return Group(*lines)


def run_demo(
    args: argparse.Namespace, load_settings: Callable[..., Settings], should_stop: Callable[[], bool] = lambda: False
) -> int:
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="cxr-demo-"))
    samples = sample_images_dir()
    base = load_settings(args)
    broker = EmbeddedBroker(base.jvm_lib_dir, workdir=workdir / "kafka")
    orthanc = EmbeddedOrthanc(workdir / "orthanc") if getattr(args, "pacs", False) else None
    feed_stop = threading.Event()
    feed: threading.Thread | None = None
    server: MetricsServer | None = None
    job = spark = None
    try:
        with console.status("starting the Kafka broker…"):
            broker.start()
            broker.create_topics(
                [base.input_topic, base.results_topic, base.dead_letter_topic], partitions=default_partitions()
            )
        console.print(f"[bold]Kafka[/] broker at {broker.bootstrap_servers} (embedded, KRaft)")
        pacs: dict[str, Any] = {}
        if orthanc is not None:
            with console.status("starting Orthanc…"):
                orthanc.start()
            console.print(f"[bold]Orthanc[/] PACS at {orthanc.url} (embedded; DICOMweb at {orthanc.dicomweb_root})")
            pacs = {
                "dicomweb_allowed_hosts": orthanc.host_port,
                "dicomweb_username": orthanc.username,
                "dicomweb_password": orthanc.password,
                "state_dir": workdir / "state",
            }
        roots = ",".join(str(p) for p in {*base.allowed_roots, samples.resolve()})
        settings = load_settings(
            args,
            kafka_bootstrap_servers=broker.bootstrap_servers,
            checkpoint_dir=workdir / "checkpoint",
            allowed_roots=roots,
            starting_offsets="earliest",
            **pacs,
        )

        from streaming.pipeline import ScoringJob
        from streaming.spark import get_session

        with console.status("starting Spark and loading the model into its Python workers…"):
            spark = get_session(settings, "cxr-demo")
            job = ScoringJob.create(settings, spark)
            port = settings.metrics_port if port_is_free(settings.metrics_port) else 0
            server = MetricsServer(job.metrics, job.health, settings.metrics_host, port).start()
            job.start()
        model = job.descriptor
        assert model is not None
        console.print(f"[bold]Spark[/] {spark.version} local mode; model {model.name} {model.version} loaded")
        console.print(f"[bold]Metrics[/] http://127.0.0.1:{server.port}/metrics  (health: /healthz, /readyz)")

        if orthanc is not None:
            feed = _start_orthanc_feed(settings, orthanc, feed_stop)
            for index, path in enumerate(images := scan(samples)):
                orthanc.upload(sample_instance(path, index))
            sent = len(images)
            console.print(f"stored {sent} chest X-rays in Orthanc; its change feed announces them to Kafka")
        else:
            with ReferencePublisher.for_settings(settings) as publisher:
                sent = publisher.send_all(references(scan(samples)))
            console.print(f"published {sent} chest X-ray references to {settings.input_topic}")
        return _follow(console, settings, sent, args, model.normal_labels, should_stop)
    except KeyboardInterrupt:
        return 0
    finally:
        console.print()
        feed_stop.set()
        with console.status("stopping…"):
            if feed is not None:  # its last flush needs the broker: it stops first
                feed.join(30)
            if job is not None:
                job.stop()
            if server is not None:
                server.stop()
            if spark is not None:
                spark.stop()
            if orthanc is not None:
                orthanc.close()
            broker.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        console.print("stopped cleanly")


def _start_orthanc_feed(settings: Settings, orthanc: EmbeddedOrthanc, stop: threading.Event) -> threading.Thread:
    """The change-feed follower (`cxr produce orthanc`) on a thread of its own, until `stop` is set."""
    from producers.orthanc import follow

    def feed() -> None:
        try:
            follow(settings, orthanc.url, begin="start", stop=stop.is_set)
        except Exception:
            log.exception("the Orthanc follower stopped")

    thread = threading.Thread(target=feed, name="cxr-orthanc-feed", daemon=True)
    thread.start()
    return thread


def _follow(
    console: Console,
    settings: Settings,
    expected: int,
    args: argparse.Namespace,
    normal_labels: tuple[str, ...],
    should_stop: Callable[[], bool],
) -> int:
    consumer = KafkaConsumer(
        settings.results_topic,
        settings.dead_letter_topic,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **settings.kafka_python_config(KafkaConsumer.DEFAULT_CONFIG),
    )
    results: list[dict[str, Any]] = []
    dead: list[dict[str, Any]] = []
    started = time.monotonic()
    done_at: float | None = None
    try:
        with Live(
            worklist_table(results, dead, expected, normal_labels), console=console, refresh_per_second=4
        ) as live:
            while not should_stop():
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        body = json.loads(record.value)
                        (results if record.topic == settings.results_topic else dead).append(body)
                    live.update(worklist_table(results, dead, expected, normal_labels))
                if done_at is None and len(results) + len(dead) >= expected:
                    done_at = time.monotonic()
                    hint = "" if args.exit_when_done else "; Ctrl-C stops the demo"
                    live.console.print(f"all {expected} answered in {done_at - started:.1f} s{hint}")
                if args.exit_when_done and done_at is not None:
                    break
                if args.exit_when_done and time.monotonic() - started > args.timeout:
                    console.print(f"[red]timed out after {args.timeout:.0f} s[/]")
                    return 1
        return 0 if done_at is not None or should_stop() else 1
    finally:
        consumer.close()
