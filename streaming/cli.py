"""`cxr`: the one command line. Flags override the environment, which overrides the config file.

Exit codes, chosen for a supervisor (a Kubernetes restart policy, systemd): 0 stopped on request; 1 failed at
run time (the broker away too long, a checkpoint write that failed, a crash): restarting resumes from the
checkpoint; 2 a configuration the operator must fix (bad settings or flags, a model bundle that does not load,
a checkpoint location that cannot be written, a GPU configured but not found, no Orthanc for the PACS demo);
restarting alone will not help.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from streaming import logs
from streaming.settings import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("cxr")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (also CXR_CONFIG_FILE)")
    parser.add_argument("--log-level", default="INFO", help="console log level (default INFO)")


def _kafka(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", dest="kafka_bootstrap_servers", help="Kafka bootstrap servers")
    parser.add_argument("--input-topic", dest="input_topic")


def _job(parser: argparse.ArgumentParser) -> None:
    _kafka(parser)
    parser.add_argument("--results-topic", dest="results_topic")
    parser.add_argument("--dead-letter-topic", dest="dead_letter_topic")
    parser.add_argument("--model-bundle", type=Path, dest="model_bundle", help="model bundle directory")
    parser.add_argument("--allowed-roots", dest="allowed_roots", help="comma-separated folders file:// may read")
    parser.add_argument("--checkpoint-dir", type=Path, dest="checkpoint_dir")
    parser.add_argument("--metrics-port", type=int, dest="metrics_port")
    parser.add_argument("--master", dest="spark_master", help="Spark master (default local[*])")


_SETTING_FLAGS = (
    "kafka_bootstrap_servers",
    "input_topic",
    "results_topic",
    "dead_letter_topic",
    "model_bundle",
    "allowed_roots",
    "checkpoint_dir",
    "metrics_port",
    "spark_master",
)


def load_settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {name: getattr(args, name, None) for name in _SETTING_FLAGS}
    overrides.update(extra)
    return Settings.load(getattr(args, "config", None), **overrides)


class StopSignal:
    """Ctrl-C and SIGTERM ask the running command to stop; it notices between steps and stops in order.

    Raising from a signal handler would land inside whatever the main thread is doing (often a py4j call
    into Spark, which then loses its connection), so the handler only sets an event. A second signal forces
    a KeyboardInterrupt for the impatient.
    """

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        log.info("stopping (signal %d); again to force", signum)
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout_s: float) -> bool:
        return self.event.wait(timeout_s)


stop = StopSignal()


def broker_topics(settings: Settings) -> list[str]:
    """What `cxr broker` creates: the job's three topics and the exporters' two."""
    return [
        settings.input_topic,
        settings.results_topic,
        settings.dead_letter_topic,
        settings.fhir_topic,
        settings.export_dead_letter_topic,
    ]


def cmd_broker(args: argparse.Namespace) -> int:
    from streaming.broker import EmbeddedBroker, default_partitions

    if args.nodes > 1:
        return _broker_cluster(args)
    settings = load_settings(args)
    topics = broker_topics(settings)
    broker = EmbeddedBroker(settings.jvm_lib_dir, port=args.port or None, workdir=args.data_dir)
    try:
        broker.start()
        broker.create_topics(topics, partitions=args.partitions or default_partitions())
        print(broker.bootstrap_servers, flush=True)
        log.info(
            "Kafka %s ready; topics: %s; data in %s. Ctrl-C stops it.",
            broker.bootstrap_servers,
            ", ".join(topics),
            broker.workdir,
        )
        if _serve_while(lambda: broker.running):
            return 0
        log.error("the broker exited; see %s", broker.log_file)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()


def _serve_while(alive: Callable[[], bool]) -> bool:
    """Waits in the foreground while `alive()`: True when stopped on request, False when it no longer holds."""
    while alive():
        if stop.wait(0.5):
            return True
    return False


def _broker_cluster(args: argparse.Namespace) -> int:
    """`cxr broker --nodes N`: N brokers on loopback, topics replicated; it runs on while a majority of its
    nodes does, so that killing one (to watch the job ride it out) is part of trying it."""
    from streaming.broker import KafkaCluster, default_partitions, replication

    settings = load_settings(args)
    topics = broker_topics(settings)
    cluster = KafkaCluster(settings.jvm_lib_dir, args.nodes, port=args.port or None, workdir=args.data_dir)
    try:
        cluster.start()
        cluster.create_topics(topics, partitions=args.partitions or default_partitions())
        print(cluster.bootstrap_servers, flush=True)
        factor, min_isr = replication(args.nodes)
        log.info(
            "Kafka cluster of %d nodes at %s ready; topics: %s (replication %d, min.insync.replicas %d); data in %s. "
            "Ctrl-C stops it.",
            args.nodes,
            cluster.bootstrap_servers,
            ", ".join(topics),
            factor,
            min_isr,
            cluster.workdir,
        )
        down: set[int] = set()

        def majority_alive() -> bool:
            for node in cluster.nodes:
                if not node.running and node.node_id not in down:
                    down.add(node.node_id)
                    log.warning("Kafka node %d exited; see %s", node.node_id, node.log_file)
            return 2 * sum(n.running for n in cluster.nodes) > args.nodes

        if _serve_while(majority_alive):
            return 0
        log.error("a majority of the Kafka nodes exited; see the logs under %s", cluster.workdir)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


def _node_count(text: str) -> int:
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError("a Kafka cluster needs at least one node")
    return count


def cmd_run(args: argparse.Namespace) -> int:
    from streaming.checkpoint import describe_failure, ensure_writable
    from streaming.metrics import MetricsServer
    from streaming.pipeline import ScoringJob
    from streaming.spark import get_session

    settings = load_settings(args)
    ensure_writable(settings.checkpoint_dir)
    spark = get_session(settings)
    job = ScoringJob.create(settings, spark)
    server = MetricsServer(job.metrics, job.health, settings.metrics_host, settings.metrics_port).start()
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.port)
    try:
        query = job.start()
        log.info("scoring %s → %s / %s", settings.input_topic, settings.results_topic, settings.dead_letter_topic)
        while query.isActive and not stop.wait(1.0):
            pass
        failure = query.exception()
        if failure is not None:
            log.error("the scoring query failed: %s", describe_failure(str(failure), settings.checkpoint_dir))
            return EXIT_FAILED
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        job.stop()
        server.stop()
        spark.stop()


def cmd_produce_folder(args: argparse.Namespace) -> int:
    from producers.folder import FolderCursorStore, FolderFeed
    from producers.publish import ReferencePublisher

    settings = load_settings(args)
    folder = Path(args.folder)
    if not folder.is_dir():
        log.error("not a folder: %s", folder)
        return 2
    store = FolderCursorStore.for_folder(settings.state_dir, folder)
    # The cursor is read before Kafka is contacted: a corrupt one stops us at once, with what to do.
    feed = FolderFeed(
        folder, store, recursive=not args.no_recursive, interval_s=args.interval, from_start=args.from_start
    )
    if args.from_start:
        log.info("announcing every image again (--from-start); cursor %s", store.path)
    else:
        log.info("cursor %s: %d image(s) announced before", store.path, len(feed.cursor.files))
    with ReferencePublisher.for_settings(settings) as publisher:
        if args.watch:
            log.info("watching %s for new images (Ctrl-C stops)", folder)
        try:
            feed.run(publisher, watch=args.watch, stop=stop.is_set)
        except KeyboardInterrupt:
            log.info("stopped")
    log.info("published %d reference(s) to %s", feed.sent, settings.input_topic)
    return 0


def cmd_produce_load(args: argparse.Namespace) -> int:
    from producers.load import LoadGenerator, cycle, image_templates
    from producers.publish import ReferencePublisher
    from streaming.settings import sample_images_dir

    settings = load_settings(args)
    templates = image_templates(Path(args.images) if args.images else sample_images_dir())
    with ReferencePublisher.for_settings(settings) as publisher:
        generator = LoadGenerator(publisher, args.rate, args.duration)
        log.info(
            "sending %s reference(s) at %g/s to %s, cycling %d image(s)",
            args.count if args.count is not None else "timed",
            args.rate,
            settings.input_topic,
            len(templates),
        )
        try:
            generator.run(cycle(templates, args.count), stop=stop.is_set)
        except KeyboardInterrupt:
            log.info("stopped")
    log.info("published %d reference(s) to %s", generator.sent, settings.input_topic)
    return 0


def cmd_produce_orthanc(args: argparse.Namespace) -> int:
    from producers.health import feed_health
    from producers.orthanc import follow

    settings = load_settings(args)
    with feed_health(settings, "orthanc") as status:
        count = follow(settings, args.url, begin=args.begin, stop=stop.is_set, watch=status.follow_pacs)
    log.info("published %d reference(s) to %s", count, settings.input_topic)
    return 0


def cmd_produce_dicomweb(args: argparse.Namespace) -> int:
    from producers.dicomweb import follow
    from producers.health import feed_health

    settings = load_settings(args)
    with feed_health(settings, "dicomweb") as status:
        count = follow(settings, args.url, begin=args.begin, stop=stop.is_set, watch=status.follow_pacs)
    log.info("published %d reference(s) to %s", count, settings.input_topic)
    return 0


def cmd_produce_scp(args: argparse.Namespace) -> int:
    from producers.health import feed_health
    from producers.scp import serve

    settings = load_settings(args, scp_port=args.port, scp_ae_title=args.ae_title, scp_storage=args.storage)
    with feed_health(settings, "scp") as status:
        count = serve(settings, stop=stop.is_set, watch=status.follow_receiver)
    log.info("published %d reference(s) to %s", count, settings.input_topic)
    return 0


def _pacs_feed(feeds: Any, name: str, help_text: str, url_help: str, func: Any) -> None:
    parser = feeds.add_parser(name, help=help_text)
    _common(parser)
    _kafka(parser)
    parser.add_argument("url", help=url_help)
    begin = parser.add_mutually_exclusive_group()
    begin.add_argument(
        "--from-start",
        dest="begin",
        action="store_const",
        const="start",
        help="a first run (no cursor yet) announces every chest X-ray the server holds",
    )
    begin.add_argument(
        "--from-now",
        dest="begin",
        action="store_const",
        const="now",
        help="a first run announces only what arrives from now on (the default)",
    )
    parser.set_defaults(func=func, begin="now")


@contextlib.contextmanager
def _session(settings: Settings, app_name: str) -> Iterator[SparkSession]:
    """A Spark session for one batch command, stopped after it unless it was already running (the session an
    embedding program, such as the test suite, shares)."""
    from pyspark.sql import SparkSession

    from streaming.spark import get_session

    try:  # the active or the default session: one already running in this process is not this command's
        SparkSession.active()
        owned = False
    except Exception:
        owned = True
    spark = get_session(settings, app_name)
    try:
        yield spark
    finally:
        if owned:
            spark.stop()


def cmd_batch(args: argparse.Namespace) -> int:
    """Exit 0 when every reference is answered; 2 for a source or output to fix; 1 when it failed or was
    stopped before the end (run it again: it resumes)."""
    from streaming.batch import OutputError, output_for, run_batch
    from streaming.sources import SourceError, table_format

    source = Path(args.source)
    settings = load_settings(args)
    if not source.exists():
        log.error("no such folder or file: %s", source)
        return EXIT_CONFIG
    if args.chunk_size < 1:
        log.error("--chunk-size must be at least 1")
        return EXIT_CONFIG
    try:  # what can be checked without Spark, before it starts
        table_format(source)
        where = output_for(settings, args.output, args.output_format).describe()
    except (SourceError, OutputError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    try:
        with _session(settings, "cxr-batch") as spark:
            summary = run_batch(
                spark,
                settings,
                source,
                args.output,
                output_format=args.output_format,
                chunk_size=args.chunk_size,
                progress=False if args.no_progress else None,
                stop=stop.is_set,
            )
    except (SourceError, OutputError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    print(summary.line(where), flush=True)
    return EXIT_OK if summary.complete else EXIT_FAILED


def cmd_evaluate(args: argparse.Namespace) -> int:
    from streaming.bundle import BundleError, read_descriptor
    from training.data import DataError, with_data_root
    from training.evaluate import run_evaluation

    source = Path(args.data)
    try:
        descriptor = read_descriptor(args.bundle)
        settings = with_data_root(load_settings(args, model_bundle=args.bundle), source)
    except (BundleError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    out = args.out or Path(f"evaluation-{descriptor.name}-{descriptor.version}")
    try:
        with _session(settings, "cxr-evaluate") as spark:
            run = run_evaluation(spark, settings, source, out)
    except (DataError, BundleError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    _print_evaluation(run.evaluation, run.unscored)
    log.info("report: %s (and %s)", run.files.markdown, run.files.json)
    return EXIT_OK


def _print_evaluation(evaluation: Any, unscored: dict[str, int]) -> None:
    """The confusion matrix and each label's AUROC on the console; the report has the rest."""
    from rich.console import Console
    from rich.table import Table

    matrix = Table(title=f"{evaluation.count} images", caption="rows: true, columns: predicted")
    matrix.add_column("")
    for label in evaluation.labels:
        matrix.add_column(label, justify="right")
    for label, row in zip(evaluation.labels, evaluation.confusion, strict=True):
        matrix.add_row(label, *(str(n) for n in row))
    console = Console()
    console.print(matrix)
    correct = sum(evaluation.confusion[i][i] for i in range(len(evaluation.labels)))
    console.print(f"accuracy {correct}/{evaluation.count} ({evaluation.accuracy:.1%})")
    for metrics in evaluation.per_label:
        if metrics.label in evaluation.normal_labels and len(evaluation.labels) == 2:
            continue  # the other label's, mirrored
        if metrics.auroc is not None and metrics.auroc_ci is not None:
            low, high = metrics.auroc_ci
            console.print(f"AUROC {metrics.label}: {metrics.auroc:.3f} ({low:.3f}-{high:.3f})")
    if unscored:
        console.print("not scored: " + ", ".join(f"{reason} x{n}" for reason, n in sorted(unscored.items())))


def cmd_train(args: argparse.Namespace) -> int:
    """Exit 0 with the bundle written; 2 for data, flags, a backbone or an --out to fix; 1 when training failed."""
    from streaming.bundle import BundleError
    from training.data import DataError
    from training.export import ExportError, check_target
    from training.train import OptionsError, TrainOptions, parse_size, train

    try:  # what can be checked without Spark, before it starts
        size = parse_size(args.backbone_input) if args.backbone_input else None
    except OptionsError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    given = {
        "name": args.name,
        "version": args.version,
        "backbone": args.backbone,
        "backbone_input": size,
        "backbone_scaling": args.backbone_scaling,
        "backbone_resample": args.backbone_resample,
        "head": args.head,
        "test": args.test,
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "normal_labels": tuple(args.normal_label) if args.normal_label else None,
        "stat_sensitivity": args.stat_sensitivity,
        "urgent_sensitivity": args.urgent_sensitivity,
        "reg": args.reg,
        "epochs": args.epochs,
        "bootstrap": args.bootstrap,
    }
    try:
        options = TrainOptions(
            data=args.data, out=args.out, force=args.force, **{k: v for k, v in given.items() if v is not None}
        )
        check_target(options.out, options.force)
    except (OptionsError, ExportError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    settings = load_settings(args)
    try:
        with _session(settings, "cxr-train") as spark:
            summary = train(spark, settings, options)
    except (DataError, ExportError, BundleError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    for line in summary.lines():
        print(line, flush=True)
    return EXIT_OK


def cmd_worklist(args: argparse.Namespace) -> int:
    settings = load_settings(
        args,
        worklist_port=args.port,
        worklist_db=args.db,
        worklist_host=args.host,
        worklist_start="latest" if getattr(args, "from_now", False) else None,
    )
    if args.worklist_command == "simulate":
        from worklist.simulate import run_simulation

        return run_simulation(args, settings)

    from worklist.service import WorklistService

    try:
        service = WorklistService(settings)
    except OSError as exc:  # the port is taken, or the database folder cannot be written
        log.error(
            "cannot start the worklist on %s:%s with %s: %s",
            settings.worklist_host,
            settings.worklist_port,
            settings.worklist_db,
            exc,
        )
        return EXIT_CONFIG
    service.start()
    log.info(
        "worklist on %s (API under /api/, schema /openapi.json); %s, %s and %s → %s",
        service.url,
        settings.results_topic,
        settings.dead_letter_topic,
        settings.input_topic,
        settings.worklist_db,
    )
    try:
        while service.running and not stop.wait(0.5):
            pass
        return EXIT_OK if stop.is_set() else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        service.stop()


def cmd_export(args: argparse.Namespace) -> int:
    from exporters.service import run_export

    settings = load_settings(
        args,
        fhir_server_url=getattr(args, "server", None),
        sr_stow_url=getattr(args, "stow", None),
        sr_cstore=getattr(args, "cstore", None),
        sr_output_dir=getattr(args, "out", None),
        export_metrics_port=args.export_metrics_port,
        export_start="latest" if args.from_now else None,
        state_dir=args.state_dir,
    )
    run_export(args.exporter, settings, stop.event)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from streaming.demo import run_demo

    return run_demo(args, load_settings, stop.is_set)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description="Streaming chest X-ray scoring on Kafka and Spark.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embedded broker + scoring job + the sample X-rays, with a live worklist")
    _common(demo)
    _job(demo)
    demo.add_argument("--exit-when-done", action="store_true", help="exit once every sample has its outcome")
    demo.add_argument("--timeout", type=float, default=600.0, help="with --exit-when-done: give up after N s")
    demo.add_argument(
        "--pacs",
        action="store_true",
        help="the hospital's path: samples stored in an embedded Orthanc, fetched over DICOMweb",
    )
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="the streaming job against the configured Kafka")
    _common(run)
    _job(run)
    run.set_defaults(func=cmd_run)

    batch = sub.add_parser(
        "batch", help="score a folder of images or a table of references with the same scorer (backfill, resumable)"
    )
    _common(batch)
    _job(batch)
    batch.add_argument(
        "source",
        help="a folder of images (PNG, JPEG, DICOM), or a table of references: JSON lines (.jsonl, .json, .ndjson: "
        "one reference message per line), or CSV or Parquet (.csv, .parquet or a Parquet folder) with a uri column",
    )
    batch.add_argument(
        "--output", type=Path, help="write DIR/results/ and DIR/dead-letter/ here instead of the Kafka topics"
    )
    batch.add_argument(
        "--format",
        dest="output_format",
        choices=("jsonl", "parquet"),
        default="jsonl",
        help="with --output: JSON lines (default) or Parquet (the message in 'value', with typed columns)",
    )
    batch.add_argument(
        "--chunk-size",
        type=int,
        default=2000,
        help="references per committed write (default 2000): a kill loses at most one chunk of work",
    )
    batch.add_argument("--no-progress", action="store_true", help="no progress bar (progress lines are still logged)")
    batch.set_defaults(func=cmd_batch)

    evaluate = sub.add_parser(
        "evaluate", help="evaluate a model bundle on labelled images: the report cxr train writes"
    )
    _common(evaluate)
    evaluate.add_argument("bundle", type=Path, help="the model bundle directory")
    evaluate.add_argument("data", help="a folder with one sub-folder per label, or a CSV/Parquet table (uri, label)")
    evaluate.add_argument("--out", type=Path, help="report folder (default evaluation-<name>-<version>)")
    evaluate.add_argument("--master", dest="spark_master", help="Spark master (default local[*])")
    evaluate.set_defaults(func=cmd_evaluate)

    train = sub.add_parser(
        "train", help="train a model bundle from labelled images: a head on a frozen backbone's features, on Spark"
    )
    _common(train)
    train.add_argument(
        "data", type=Path, help="a folder with one sub-folder per label, or a CSV/Parquet table (uri, label)"
    )
    train.add_argument(
        "--out", type=Path, required=True, help="the bundle folder to write (refused when not empty, unless --force)"
    )
    train.add_argument("--name", help="the bundle's name (default: the --out folder's name)")
    train.add_argument("--version", help="the bundle's version (default: the UTC time of training, 20250101T120000Z)")
    train.add_argument(
        "--backbone",
        type=Path,
        help="a bundle folder (its model's trunk, with the bundle's input and preprocessing) or a .keras feature "
        "extractor (default: the demo bundle's frozen Xception trunk)",
    )
    train.add_argument("--backbone-input", metavar="HxW", help="with a .keras backbone: input size, when not fixed")
    train.add_argument(
        "--backbone-scaling",
        choices=("none", "unit", "xception", "inception", "tf", "torch", "imagenet"),
        help="with a .keras backbone: its pixel scaling (required)",
    )
    train.add_argument(
        "--backbone-resample",
        choices=("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"),
        help="with a .keras backbone: resampling to its input size (default nearest, as Keras' load_img)",
    )
    train.add_argument("--head", choices=("logistic", "keras"), help="MLlib logistic regression (default) or Keras")
    train.add_argument("--test", type=Path, help="a labelled test set (folder or table) instead of a held-out split")
    train.add_argument("--test-fraction", type=float, help="held out per label, when no --test (default 0.25)")
    train.add_argument("--seed", type=int, help="seed of the split, the Keras head and the bootstrap (default 0)")
    train.add_argument(
        "--normal-label",
        action="append",
        help="a label that is no finding (repeatable; default: any label named NORMAL, Normal, normal, No Finding)",
    )
    train.add_argument(
        "--stat-sensitivity", type=float, help="share of each finding's held-out studies STAT must catch (default 0.5)"
    )
    train.add_argument("--urgent-sensitivity", type=float, help="share URGENT (or STAT) must catch (default 0.9)")
    train.add_argument("--reg", type=float, help="L2 strength of the head (default 0.1)")
    train.add_argument("--epochs", type=int, help="epochs of the Keras head (default 300)")
    train.add_argument("--bootstrap", type=int, help="bootstrap resamples for the AUROC intervals (default 1000)")
    train.add_argument("--force", action="store_true", help="replace what --out holds")
    train.add_argument("--master", dest="spark_master", help="Spark master (default local[*])")
    train.set_defaults(func=cmd_train)

    broker = sub.add_parser("broker", help="an embedded Kafka broker (or a cluster: --nodes 3), in the foreground")
    _common(broker)
    _kafka(broker)
    broker.add_argument(
        "--port",
        type=int,
        default=9092,
        help="listener port (0: a free one, or with --data-dir the one that folder was served on); default 9092",
    )
    broker.add_argument(
        "--data-dir",
        type=Path,
        help="keep the broker's data here; started again on it, the broker resumes with its topics, messages and "
        "ports (default: a temporary folder, removed on exit)",
    )
    broker.add_argument(
        "--partitions", type=int, help="partitions of the topics it creates (default: one per core of this machine)"
    )
    broker.add_argument(
        "--nodes",
        type=_node_count,
        default=1,
        help="brokers in the cluster (default 1); from 3, topics are replicated 3 times with min.insync.replicas=2. "
        "Node i listens on --port + i - 1 and keeps its data in DATA_DIR/node-i",
    )
    broker.set_defaults(func=cmd_broker)

    worklist = sub.add_parser("worklist", help="the triage worklist service: the reading queue as API and live page")
    _common(worklist)
    _kafka(worklist)
    worklist.add_argument("--port", type=int, help="HTTP port (default 8080; CXR_WORKLIST_PORT)")
    worklist.add_argument("--host", help="address to listen on (default 127.0.0.1; CXR_WORKLIST_HOST)")
    worklist.add_argument("--db", type=Path, help="the worklist's SQLite file (default .cxr/worklist.db)")
    worklist.add_argument(
        "--from-now",
        action="store_true",
        help="on a first start (a worklist file without offsets), read the topics from their end, not their"
        " beginning: what they already hold is not queued (CXR_WORKLIST_START=latest); later starts resume",
    )
    worklist.set_defaults(func=cmd_worklist, worklist_command=None)
    worklist_sub = worklist.add_subparsers(dest="worklist_command")
    simulate = worklist_sub.add_parser(
        "simulate", help="replay a day of arrivals through FIFO, priority and priority-with-caps ordering"
    )
    _common(simulate)
    from worklist.simulate import add_arguments as add_simulate_arguments

    add_simulate_arguments(simulate)
    simulate.set_defaults(port=None, db=None, host=None)

    export = sub.add_parser("export", help="publish results in the hospital's standards: FHIR R4, DICOM SR")
    exporters = export.add_subparsers(dest="exporter", required=True)
    fhir = exporters.add_parser("fhir", help="a FHIR R4 transaction Bundle per result, to CXR_FHIR_TOPIC and a server")
    fhir.add_argument(
        "--server", help="also POST each bundle to this FHIR R4 base URL (CXR_FHIR_SERVER_URL; CXR_FHIR_TOKEN ...)"
    )
    sr = exporters.add_parser("sr", help="a DICOM Structured Report per scored DICOM instance, back to the PACS")
    sr.add_argument("--stow", help="STOW-RS to this DICOMweb service root, e.g. http://orthanc:8042/dicom-web")
    sr.add_argument("--cstore", help="C-STORE to AET@HOST:PORT (calling AE CXR_SR_CALLING_AE_TITLE)")
    sr.add_argument("--out", type=Path, help="write each SR as a DICOM file into this folder")
    for parser_ in (fhir, sr):
        _common(parser_)
        _kafka(parser_)
        parser_.add_argument("--results-topic", dest="results_topic")
        parser_.add_argument("--model-bundle", type=Path, dest="model_bundle", help="the thresholds' bundle")
        parser_.add_argument("--state-dir", type=Path, help="where the cursor is kept (CXR_STATE_DIR)")
        parser_.add_argument(
            "--metrics-port", type=int, dest="export_metrics_port", help="/metrics, /healthz, /readyz on this port"
        )
        parser_.add_argument(
            "--from-now",
            action="store_true",
            help="on a first start (no cursor yet), export only results that arrive from now on (CXR_EXPORT_START)",
        )
        parser_.set_defaults(func=cmd_export)

    produce = sub.add_parser("produce", help="publish references to the input topic")
    feeds = produce.add_subparsers(dest="feed", required=True)
    folder = feeds.add_parser("folder", help="one reference per PNG/JPEG/DICOM file in a folder")
    _common(folder)
    _kafka(folder)
    folder.add_argument("folder", help="the folder")
    folder.add_argument("--watch", action="store_true", help="keep publishing new files as they appear")
    folder.add_argument(
        "--from-start",
        action="store_true",
        help="announce every image again, ignoring the cursor under CXR_STATE_DIR (same event ids as before)",
    )
    folder.add_argument(
        "--interval", type=float, default=1.0, help="seconds between polls (a file must hold still across two)"
    )
    folder.add_argument("--no-recursive", action="store_true", help="do not descend into sub-folders")
    folder.set_defaults(func=cmd_produce_folder)

    load = feeds.add_parser("load", help="a load generator: references to sample images at a steady rate")
    _common(load)
    _kafka(load)
    load.add_argument("--rate", type=float, default=10.0, help="references per second (default 10)")
    load.add_argument("--duration", type=float, help="stop after this many seconds")
    load.add_argument("--count", type=int, help="stop after this many references")
    load.add_argument("--images", help="folder of images to cycle through (default: the sixteen sample X-rays)")
    load.set_defaults(func=cmd_produce_load)

    _pacs_feed(
        feeds,
        "orthanc",
        "follow an Orthanc server's change feed; publish a DICOMweb reference per new chest X-ray",
        "Orthanc's REST root, e.g. http://orthanc:8042 (credentials: CXR_DICOMWEB_USERNAME/_PASSWORD or _TOKEN)",
        cmd_produce_orthanc,
    )
    _pacs_feed(
        feeds,
        "dicomweb",
        "poll a DICOMweb server (QIDO-RS) for new chest X-rays; publish a DICOMweb reference for each",
        "the DICOMweb service root, e.g. http://pacs:8080/dicom-web (credentials as for orthanc)",
        cmd_produce_dicomweb,
    )
    scp = feeds.add_parser("scp", help="a DICOM C-STORE receiver: store what modalities send, publish references")
    _common(scp)
    _kafka(scp)
    scp.add_argument("--port", type=int, help="TCP port to listen on (default 11112; CXR_SCP_PORT)")
    scp.add_argument("--ae-title", help="this receiver's AE title (default CXR_STREAM; CXR_SCP_AE_TITLE)")
    scp.add_argument(
        "--storage", type=Path, help="folder for received instances, inside CXR_ALLOWED_ROOTS (CXR_SCP_STORAGE)"
    )
    scp.set_defaults(func=cmd_produce_scp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    stop.install()
    from kafka.errors import KafkaConfigurationError
    from pydantic import ValidationError

    from exporters.service import ExportConfigError
    from producers.pacs import PacsError
    from producers.scp import ScpConfigError
    from producers.state import StateError
    from streaming.bundle import BundleError
    from streaming.checkpoint import CheckpointError
    from streaming.device import DeviceError
    from streaming.embedded_pacs import PacsSetupError
    from streaming.jvm import JvmSetupError
    from streaming.metrics import HealthPortError
    from worklist.store import StoreError

    try:
        return int(args.func(args))
    except (
        ValidationError,
        FileNotFoundError,
        BundleError,
        CheckpointError,
        DeviceError,
        ExportConfigError,
        HealthPortError,
        KafkaConfigurationError,
        JvmSetupError,
        PacsError,
        PacsSetupError,
        ScpConfigError,
        StateError,
        StoreError,
    ) as exc:
        log.debug("configuration error", exc_info=True)
        log.error("%s: %s", type(exc).__name__, exc)
        return EXIT_CONFIG
    except Exception as exc:  # a clear one-line error for the operator; the traceback at debug level
        log.debug("failed", exc_info=True)
        log.error("%s: %s", type(exc).__name__, exc)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
