"""`cxr demo`: the whole system on one machine, with the real model and the real sample X-rays.

Embedded Kafka broker → scoring job in Spark local mode → metrics endpoint; the sixteen sample chest X-rays
that ship with the model package are published as references, and the worklist is shown live as results
arrive, most urgent first.

`cxr demo --pacs` takes the hospital's path instead: an embedded Orthanc receives the sixteen X-rays as DICOM
instances, the Orthanc change-feed follower announces them, and the scorer fetches each over DICOMweb.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

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
from worklist.store import CLOSED, OPEN, WorklistStore

if TYPE_CHECKING:
    from worklist.service import WorklistService

log = logging.getLogger("cxr.demo")
_STYLE = {"STAT": "bold white on red", "URGENT": "bold black on yellow", "ROUTINE": "green"}


def worklist_table(
    items: list[dict[str, Any]], letters: list[dict[str, Any]], counts: dict[str, int], expected: int
) -> Group:
    """The worklist service's queue (`WorklistStore.queue` items, each with its image's name added), in its
    reading order; `score` is the strongest non-normal label's probability."""
    table = Table(title="cxr-stream worklist", title_justify="left", expand=False)
    for name, justify in (("#", "right"), ("priority", "left"), ("top finding", "left"), ("score", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("image")
    for item in items:
        priority = item.get("priority") or "UNSCORED"
        score = item.get("score")
        table.add_row(
            str(item.get("position") or ""),
            Text(f" {priority} ", style=_STYLE.get(priority, "")),
            item.get("top_finding") or "—",
            f"{score:.3f}" if score is not None else "—",
            str(item.get("image", "")),
        )
    scored, failed = counts.get("scored", 0), counts.get("failed", 0)
    lines: list[Any] = [
        table,
        Text(f"{scored} scored, {failed} dead-lettered, {scored + failed}/{expected} done"),
    ]
    for letter in letters:
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
    worklist: WorklistService | None = None
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
        worklist = _start_worklist(settings, workdir)
        console.print(f"[bold]Worklist[/] {worklist.url}  (the live page; API under /api/studies)")

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
        return _follow(console, worklist, sent, args, should_stop)
    except KeyboardInterrupt:
        return 0
    finally:
        console.print()
        feed_stop.set()
        with console.status("stopping…"):
            if feed is not None:  # its last flush needs the broker: it stops first
                feed.join(30)
            if worklist is not None:
                worklist.stop()
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


def _start_worklist(settings: Settings, workdir: Path) -> WorklistService:
    """The worklist service on the configured port, or any free one when that is taken."""
    from worklist.service import WorklistService

    port = settings.worklist_port if port_is_free(settings.worklist_port, settings.worklist_host) else 0
    demo = settings.model_copy(update={"worklist_db": workdir / "worklist.db", "worklist_port": port})
    return WorklistService(demo).start()


def _image_name(store: WorklistStore, key: str, now: datetime) -> str:
    images = store.study(key, now)["image_list"]
    uri = images[0].get("uri") if images else None
    return Path(unquote(urlsplit(uri).path)).name if uri else ""


def _follow(
    console: Console,
    worklist: WorklistService,
    expected: int,
    args: argparse.Namespace,
    should_stop: Callable[[], bool],
) -> int:
    """Show the worklist service's queue in the terminal until every sample has its outcome (or Ctrl-C)."""
    store = worklist.store
    started = time.monotonic()
    done_at: float | None = None

    def table() -> tuple[Group, int]:
        now = datetime.now(UTC)
        _, items = store.queue(now, statuses=[*OPEN, *CLOSED], limit=expected + 50)
        for item in items:
            item["image"] = _image_name(store, item["key"], now)
        counts = store.image_counts()
        _, letters = store.dead_letters(limit=20)
        return worklist_table(items, letters, counts, expected), counts["scored"] + counts["failed"]

    view, done = table()
    with Live(view, console=console, refresh_per_second=4) as live:
        while not should_stop():
            view, done = table()
            live.update(view)
            if done_at is None and done >= expected:
                done_at = time.monotonic()
                hint = "" if args.exit_when_done else "; Ctrl-C stops the demo"
                live.console.print(f"all {expected} answered in {done_at - started:.1f} s{hint}")
            if args.exit_when_done and done_at is not None:
                break
            if args.exit_when_done and time.monotonic() - started > args.timeout:
                console.print(f"[red]timed out after {args.timeout:.0f} s[/]")
                return 1
            time.sleep(0.5)
    return 0 if done_at is not None or should_stop() else 1
