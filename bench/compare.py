"""cxr-stream against its peers, side by side in one run on one machine: throughput, latency, memory.

For each model (the demo Xception, a CheXNet-sized DenseNet-121, a tiny CNN) and each peer:

    cxr-stream               `cxr run` with its defaults, on topics made as `cxr broker` makes them
    kafka-consumer           one kafka-python consumer process, same decoding and model (bench/consumer_peer.py)
    spark-load-per-batch     cxr-stream's query, the model loaded inside every micro-batch (bench/spark_peers.py)
    spark-predict-batch-udf  Spark's `predict_batch_udf` after a decoding pandas UDF (bench/spark_peers.py)
    plain-loop               Keras in one process, no messaging: the ceiling (bench/plain_loop.py)

each peer in its own process, fed by this one through one embedded Kafka broker:
  1. one reference waits before the peer starts: the time to its result is the start-up time;
  2. warm-up, then sustained throughput: a backlog is kept waiting for `--throughput-s` seconds and the
     answers in that window are counted;
  3. latency: a steady rate at 50 % and 90 % of that throughput for `--latency-s` seconds each; percentiles
     of (result read here - sent_at), the first seconds of each phase left out;
  4. peak resident memory of the peer's process tree and of its largest Python process.
Then the compute ceiling (cores / single-thread preprocessing + inference per image) and cxr-stream's
throughput on one core against two. Writes results.json, results.md and results.png to `--out`.

    .venv/bin/python -m bench.compare                      # the full run (about 40 minutes on 2 cores)
    .venv/bin/python -m bench.compare --models demo --throughput-s 20 --latency-s 15   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import report
from bench.harness import Feeder, PeerProcess, ResultClock, RssSampler, percentiles
from bench.models import MODELS, bundle_dir
from producers.load import image_templates
from producers.publish import ReferencePublisher
from streaming.broker import EmbeddedBroker, default_partitions
from streaming.settings import Settings, sample_images_dir

STREAM_PEERS = ("cxr-stream", "kafka-consumer", "spark-load-per-batch", "spark-predict-batch-udf")
LOADS = (0.5, 0.9)


def peer_command(peer: str, bundle: Path) -> tuple[list[str], str]:
    """argv and the output line that says the peer is up."""
    if peer == "cxr-stream":
        return [sys.executable, "-m", "streaming.cli", "run"], "scoring "
    if peer == "kafka-consumer":
        return [sys.executable, "-m", "bench.consumer_peer", str(bundle)], "ready"
    variant = peer.removeprefix("spark-")
    return [sys.executable, "-m", "bench.spark_peers", variant, str(bundle)], "ready"


class Bench:
    def __init__(self, args: argparse.Namespace, broker: EmbeddedBroker, workdir: Path) -> None:
        self.args, self.broker, self.workdir = args, broker, workdir
        self.templates = image_templates(sample_images_dir())
        self.settings = Settings.load(kafka_bootstrap_servers=broker.bootstrap_servers)

    def env(self, topics: dict[str, str], bundle: Path, run_dir: Path) -> dict[str, str]:
        return {
            **os.environ,
            "CXR_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "CXR_INPUT_TOPIC": topics["input"],
            "CXR_RESULTS_TOPIC": topics["results"],
            "CXR_DEAD_LETTER_TOPIC": topics["dead_letter"],
            "CXR_MODEL_BUNDLE": str(bundle),
            "CXR_CHECKPOINT_DIR": str(run_dir / "checkpoint"),
            "CXR_STATE_DIR": str(run_dir / "state"),
            "CXR_METRICS_PORT": "0",
            "CXR_ALLOWED_ROOTS": str(sample_images_dir()),
        }

    def measure(self, peer: str, model: str, bundle: Path, cores: set[int] | None = None) -> dict[str, Any]:
        a = self.args
        tag = f"{peer}.{model}.{uuid.uuid4().hex[:6]}"
        topics = {"input": f"bench.{tag}.in", "results": f"bench.{tag}.out", "dead_letter": f"bench.{tag}.dlq"}
        self.broker.create_topics(topics.values(), partitions=default_partitions())
        run_dir = self.workdir / tag
        run_dir.mkdir(parents=True)
        clock = ResultClock(self.broker.bootstrap_servers, [topics["results"], topics["dead_letter"]])
        publisher = ReferencePublisher(
            topics["input"], {**self.settings.kafka_python_config(), "acks": 1, "enable_idempotence": False}
        )
        feeder = Feeder(publisher, self.templates)
        argv, marker = peer_command(peer, bundle)
        if cores is not None:
            argv = ["taskset", "-c", ",".join(map(str, sorted(cores))), *argv]
        probe = feeder.send(1)
        print(f"  {peer} / {model}{f' on {len(cores)} core(s)' if cores else ''}: starting", flush=True)
        process = PeerProcess(peer, argv, self.env(topics, bundle, run_dir), run_dir / "peer.log", marker)
        memory = RssSampler(process.process.pid).start()
        out: dict[str, Any] = {"peer": peer, "model": model, "cores": len(cores) if cores else os.cpu_count()}
        try:
            if not clock.wait_for(probe, a.startup_timeout_s):
                raise RuntimeError(f"{peer} gave no result within {a.startup_timeout_s:.0f} s; see {process.log_file}")
            first_at = clock.answered[next(iter(probe))][0]
            out["first_result_s"] = first_at - process.launched_at
            if process.ready_at is not None:
                out["first_result_after_ready_s"] = first_at - process.ready_at
            out["throughput"] = self.throughput(clock, feeder)
            print(f"    {out['throughput']:.1f} images/s", flush=True)
            if not a.throughput_only and cores is None:
                out["latency"] = {
                    f"{int(load * 100)}%": self.latency(clock, feeder, load * out["throughput"]) for load in LOADS
                }
                for load, figures in out["latency"].items():
                    print(f"    at {load}: p50 {figures['p50']}, p99 {figures['p99']}", flush=True)
        finally:
            memory.stop()
            process.stop()
            clock.close()
            publisher.close(5)
        out["peak_rss_mb"] = round(memory.peak_total_mb)
        out["peak_python_rss_mb"] = round(memory.peak_python_worker_mb)
        return out

    def throughput(self, clock: ResultClock, feeder: Feeder) -> float:
        a = self.args
        warm_start = time.monotonic()
        feeder.keep_backlog(clock, 64, warm_start + a.warmup_s, lambda: False)
        half = a.warmup_s / 2
        estimate = clock.answered_between(warm_start + half, time.monotonic()) / half
        backlog = int(min(512, max(32, estimate * 8)))  # about 8 s of work waiting at any time
        start = time.monotonic()
        feeder.keep_backlog(clock, backlog, start + a.throughput_s, lambda: False)
        end = time.monotonic()
        rate = clock.answered_between(start, end) / (end - start)
        clock.wait_for(set(feeder.sent_ids), a.drain_timeout_s)  # the backlog drains before latency is measured
        return rate

    def latency(self, clock: ResultClock, feeder: Feeder, rate: float) -> dict[str, Any]:
        a = self.args
        sent = feeder.steady(rate, a.latency_s)
        ids = {eid for _, eid in sent}
        clock.wait_for(ids, a.drain_timeout_s)
        settle = sent[0][0] + a.settle_s if sent else 0.0
        measured = {eid for at, eid in sent if at >= settle}
        latencies = clock.latencies(measured)
        figures: dict[str, Any] = {k: round(v, 3) if v is not None else None for k, v in percentiles(latencies).items()}
        figures.update(rate=round(rate, 2), sent=len(measured), unanswered=len(measured) - len(latencies))
        return figures

    def plain_loop(self, model: str, bundle: Path, single_thread: bool = False) -> dict[str, Any]:
        argv = [sys.executable, "-m", "bench.plain_loop", str(bundle), "--seconds", str(self.args.plain_s)]
        if single_thread:
            argv.append("--single-thread")
        log_file = self.workdir / f"plain-loop.{model}.{'single' if single_thread else 'all'}.log"
        process = PeerProcess("plain-loop", argv, dict(os.environ), log_file, "images_per_s")
        memory = RssSampler(process.process.pid).start()
        process.process.wait()
        memory.stop()
        process.stop()
        line = [ln for ln in log_file.read_text().splitlines() if "images_per_s" in ln]
        if not line:
            raise RuntimeError(f"the plain loop failed; see {log_file}")
        figures = json.loads(line[-1])
        return {
            "peer": "plain-loop",
            "model": model,
            "throughput": figures["images_per_s"],
            "preprocess_s_per_image": figures["preprocess_s_per_image"],
            "inference_s_per_image": figures["inference_s_per_image"],
            "peak_rss_mb": round(memory.peak_total_mb),
            "peak_python_rss_mb": round(memory.peak_python_worker_mb),
        }


def machine() -> dict[str, Any]:
    import pyspark
    import tensorflow as tf

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    mem = Path("/proc/meminfo").read_text().split()[1] if Path("/proc/meminfo").exists() else "0"
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(mem) / 2**20),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "pyspark": pyspark.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--peers", default=",".join((*STREAM_PEERS, "plain-loop")))
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--throughput-s", type=float, default=60.0)
    parser.add_argument("--latency-s", type=float, default=30.0)
    parser.add_argument("--settle-s", type=float, default=5.0, help="left out at the start of each latency phase")
    parser.add_argument("--plain-s", type=float, default=30.0)
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument("--drain-timeout-s", type=float, default=120.0)
    parser.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--no-scaling", action="store_true", help="skip cxr-stream on one core")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    peers = [p for p in args.peers.split(",") if p]

    workdir = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    runs: list[dict[str, Any]] = []
    ceilings: dict[str, dict[str, float]] = {}
    print(f"bench work folder: {workdir}", flush=True)
    settings = Settings.load()
    with EmbeddedBroker(settings.jvm_lib_dir, workdir=workdir / "kafka") as broker:
        bench = Bench(args, broker, workdir)
        for model in models:
            bundle = bundle_dir(model, workdir / "models")
            print(f"{model}:", flush=True)
            steps: list[Callable[[], dict[str, Any]]] = []
            if "plain-loop" in peers:
                steps.append(lambda m=model, b=bundle: bench.plain_loop(m, b))  # type: ignore[misc]
            steps += [lambda p=p, m=model, b=bundle: bench.measure(p, m, b) for p in peers if p in STREAM_PEERS]  # type: ignore[misc]
            for step in steps:
                runs.append(step())
                print(f"    → {json.dumps(runs[-1])}", flush=True)
            single = bench.plain_loop(model, bundle, single_thread=True)
            per_image = single["preprocess_s_per_image"] + single["inference_s_per_image"]
            cores = len(os.sched_getaffinity(0))
            ceilings[model] = {
                "single_thread_s_per_image": per_image,
                "preprocess_s_per_image": single["preprocess_s_per_image"],
                "inference_s_per_image": single["inference_s_per_image"],
                "ceiling": cores / per_image,
            }
        scaling: dict[str, float] = {}
        if not args.no_scaling and "cxr-stream" in peers and "demo" in models and len(os.sched_getaffinity(0)) >= 2:
            bundle = bundle_dir("demo", workdir / "models")
            one = bench.measure("cxr-stream", "demo", bundle, cores={sorted(os.sched_getaffinity(0))[0]})
            scaling = {"one_core": one["throughput"]}
            scaling["all_cores"] = next(
                r["throughput"] for r in runs if r["peer"] == "cxr-stream" and r["model"] == "demo"
            )
    results = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "runs": runs}
    results.update(ceilings=ceilings, scaling=scaling)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(report.markdown(results))
    report.plot(results, args.out / "results.png")
    print(report.markdown(results))


if __name__ == "__main__":
    main()
