"""Images per second per executor core: local mode against a Spark standalone cluster, side by side in one run.

The README's capacity model rests on these figures. `cxr run` scores the demo model in four set-ups, one after
the other, each fed through the same embedded Kafka broker by this process:

    local[1]              driver and executor in one JVM, one task slot
    local[2]              the same, two task slots
    standalone 1 x 1      a master and one worker of one core (their own JVMs, PySpark's `spark-class`)
    standalone 2 x 1      a master and two workers of one core each

Every set-up gets one TensorFlow thread per task slot (`CXR_INFERENCE_THREADS=1`), so that one slot is one core
of scoring and the figures compare per core. Each is measured like `bench.compare` measures cxr-stream: started
with one reference waiting, warmed up under a backlog, then the answers counted over a window while a backlog
is kept waiting (the steady state). The cluster runs on the same machine as the driver, the broker and this
process; on a 2-core machine the two-slot set-ups therefore share their cores with all of those, which makes
their per-core figure a lower bound. Writes cluster.json and cluster.md to `--out`.

    .venv/bin/python -m bench.cluster                                # about 10 minutes on 2 cores
    .venv/bin/python -m bench.cluster --warmup-s 10 --throughput-s 20   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.compare import Bench, machine
from bench.harness import Feeder, ResultClock
from bench.models import bundle_dir
from streaming.broker import EmbeddedBroker
from streaming.settings import Settings
from tests.spark_cluster import SparkCluster


@dataclass(frozen=True)
class Setup:
    """One way of running the job: a local master, or a standalone cluster of `workers` one-core workers."""

    name: str
    slots: int
    local: bool

    @property
    def workers(self) -> int:
        return 0 if self.local else self.slots


SETUPS = (
    Setup("local[1]", 1, True),
    Setup("local[2]", 2, True),
    Setup("standalone 1 x 1", 1, False),
    Setup("standalone 2 x 1", 2, False),
)


#: What a process of this bench's tree is, by its command line (first match wins).
ROLES = (
    ("scoring Python workers", ("pyspark.daemon", "pyspark.worker")),
    ("executor JVMs", ("CoarseGrainedExecutorBackend",)),
    ("master and workers", ("org.apache.spark.deploy.master", "org.apache.spark.deploy.worker")),
    ("driver JVM", ("org.apache.spark.deploy.SparkSubmit",)),
    ("driver Python", ("streaming.cli",)),
    ("Kafka broker", ("kafka.Kafka",)),
)


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role in this process's tree (this process: "bench")."""
    import psutil  # type: ignore[import-untyped]

    me = psutil.Process()
    totals = dict.fromkeys([role for role, _ in ROLES], 0.0) | {"bench": 0.0}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            command = " ".join(proc.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        role = next((r for r, marks in ROLES if any(m in command for m in marks)), "bench")
        totals[role] += times.user + times.system
    return totals


class ClusterBench(Bench):
    """`bench.compare`'s measurement of cxr-stream, with the Spark master and its settings of one set-up, and the
    CPU each role used during the measuring window (in cores: CPU seconds per second)."""

    extra_env: dict[str, str]
    window_cores: dict[str, float]

    def env(self, topics: dict[str, str], bundle: Path, run_dir: Path) -> dict[str, str]:
        return {**super().env(topics, bundle, run_dir), **self.extra_env}

    def throughput(self, clock: ResultClock, feeder: Feeder) -> float:
        """`Bench.throughput`, which keeps a backlog twice (warm-up, then the window): the CPU of the second."""
        spans: list[tuple[float, dict[str, float], float, dict[str, float]]] = []
        keep_backlog = feeder.keep_backlog

        def measured(*args: Any, **kwargs: Any) -> None:
            start, before = time.monotonic(), cpu_by_role()
            keep_backlog(*args, **kwargs)
            spans.append((start, before, time.monotonic(), cpu_by_role()))

        feeder.keep_backlog = measured  # type: ignore[method-assign]
        try:
            rate = super().throughput(clock, feeder)
        finally:
            feeder.keep_backlog = keep_backlog  # type: ignore[method-assign]
        start, before, end, after = spans[-1]
        self.window_cores = {role: max(0.0, after[role] - before[role]) / (end - start) for role in after}
        return rate


@contextlib.contextmanager
def master_for(setup: Setup, workdir: Path) -> Iterator[str]:
    """The master URL of a set-up, with its cluster running for as long as it is used."""
    if setup.local:
        yield f"local[{setup.slots}]"
        return
    with SparkCluster(workdir, workers=setup.workers, cores=1, memory="2g") as cluster:
        yield cluster.url


def measure(bench: ClusterBench, setup: Setup, workdir: Path) -> dict[str, Any]:
    with master_for(setup, workdir) as master:
        bench.extra_env = {
            "CXR_SPARK_MASTER": master,
            "CXR_INFERENCE_THREADS": "1",
            "CXR_SPARK_DRIVER_MEMORY": "1g",
            "CXR_SPARK_CONF": json.dumps({"spark.executor.memory": "1g"}),
            "SPARK_LOCAL_IP": "127.0.0.1",
        }
        run = bench.measure("cxr-stream", "demo", bundle_dir("demo", workdir))
    cores = bench.window_cores
    # Executor side: the Python workers and their JVM (in local mode the driver's JVM is the executor).
    executor = cores["scoring Python workers"] + cores["executor JVMs" if not setup.local else "driver JVM"]
    run.update(
        setup=setup.name,
        slots=setup.slots,
        per_slot=run["throughput"] / setup.slots,
        window_cores={role: round(c, 3) for role, c in cores.items()},
        per_executor_cpu=run["throughput"] / executor if executor else None,
        per_python_cpu=run["throughput"] / cores["scoring Python workers"] if cores["scoring Python workers"] else None,
    )
    return run


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per set-up: the median of its rounds, and the ratios the capacity model needs."""
    rows = []
    for setup in SETUPS:
        mine = [r["throughput"] for r in runs if r["setup"] == setup.name]
        if not mine:
            continue
        rows.append(
            {
                "setup": setup.name,
                "slots": setup.slots,
                "rounds": mine,
                "throughput": statistics.median(mine),
                "per_slot": statistics.median(mine) / setup.slots,
                "first_result_s": statistics.median(r["first_result_s"] for r in runs if r["setup"] == setup.name),
                "per_executor_cpu": _median(r.get("per_executor_cpu") for r in runs if r["setup"] == setup.name),
                "per_python_cpu": _median(r.get("per_python_cpu") for r in runs if r["setup"] == setup.name),
                "window_cores": next(r["window_cores"] for r in runs if r["setup"] == setup.name),
            }
        )
    base = next((row["throughput"] for row in rows if row["setup"] == "local[1]"), None)
    for row in rows:
        row["vs_local_1"] = row["throughput"] / base if base else None
    return rows


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, PySpark {m['pyspark']}; {m['date']}. Demo model, one TensorFlow thread "
        f"per task slot; {results['settings']['throughput_s']:.0f} s windows, median of "
        f"{results['settings']['rounds']} round(s).",
        "",
        "| set-up | task slots (executor cores) | images/s | images/s per slot | ÷ local[1] | first result (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["summary"]:
        ratio = row["vs_local_1"]
        lines.append(
            f"| {row['setup']} | {row['slots']} | {row['throughput']:.1f} | {row['per_slot']:.1f} | "
            f"{f'{ratio:.2f}x' if ratio else '-'} | {row['first_result_s']:.0f} |"
        )
    roles = [role for role, _ in ROLES] + ["bench"]
    lines += [
        "",
        "CPU during the window, in cores (CPU seconds per second), and images per CPU-second of the executor side "
        "(the scoring Python workers and their JVM: the driver's in local mode):",
        "",
        "| set-up | " + " | ".join(roles) + " | images per executor CPU-s | images per Python-worker CPU-s |",
        "|---|" + "---:|" * (len(roles) + 2),
    ]
    for row in results["summary"]:
        cores = row.get("window_cores") or {}
        figures = [f"{cores.get(role, 0.0):.2f}" for role in roles]
        per = [f"{row[k]:.1f}" if row.get(k) else "-" for k in ("per_executor_cpu", "per_python_cpu")]
        lines.append(f"| {row['setup']} | " + " | ".join(figures + per) + " |")
    by_name = {row["setup"]: row for row in results["summary"]}
    pairs = [
        ("standalone 1 x 1", "local[1]", "one slot: the cluster against local mode"),
        ("standalone 2 x 1", "local[2]", "two slots: the cluster against local mode"),
        ("local[2]", "local[1]", "local mode: two slots against one"),
        ("standalone 2 x 1", "standalone 1 x 1", "the cluster: two workers against one"),
    ]
    lines += ["", "| ratio | images/s |", "|---|---:|"]
    for a, b, what in pairs:
        if a in by_name and b in by_name:
            lines.append(f"| {what} | {by_name[a]['throughput'] / by_name[b]['throughput']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(s.name for s in SETUPS), help="comma-separated set-up names")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all set-ups (the median is reported)")
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--throughput-s", type=float, default=45.0)
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument("--drain-timeout-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.throughput_only = True  # what Bench.measure reads: no latency phases here
    wanted = {name.strip() for name in args.setups.split(",")}
    setups = [s for s in SETUPS if s.name in wanted]
    if not setups:
        parser.error(f"no known set-up in {args.setups!r}; known: {', '.join(s.name for s in SETUPS)}")

    workdir = Path(tempfile.mkdtemp(prefix="cxr-bench-cluster-"))
    print(f"bench work folder: {workdir}", flush=True)
    runs: list[dict[str, Any]] = []
    with EmbeddedBroker(Settings.load().jvm_lib_dir, workdir=workdir / "kafka") as broker:
        bench = ClusterBench(args, broker, workdir)
        for round_ in range(args.rounds):
            for setup in setups:
                print(f"{setup.name} (round {round_ + 1}):", flush=True)
                run = measure(bench, setup, workdir / f"{setup.name.replace(' ', '')}.{round_}")
                runs.append(run)
                print(f"    → {json.dumps(run)}", flush=True)
    results = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": runs,
        "summary": summarize(runs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(results, indent=2))
    (args.out / "cluster.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
