"""A Spark standalone cluster on loopback: one master and N workers, each its own JVM, started with PySpark's own
launcher (`bin/spark-class`), so that jobs run in executors that share nothing with the driver but what Spark
ships them. Used by the cluster test (tests/integration/test_spark_cluster.py) and bench/cluster.py.

Every daemon runs in a process group of its own: the executors a worker starts (and their Python workers) are
in the worker's group, so stopping the group leaves nothing behind, even after a failed test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyspark

from streaming.broker import free_port

SPARK_HOME = Path(pyspark.__file__).parent
SPARK_CLASS = SPARK_HOME / "bin" / "spark-class"
EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"


class ClusterError(RuntimeError):
    """The cluster did not come up (or an expected process was not found); the message carries the logs."""


def get_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def process_tree(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of `root` and all its descendants, from `ps` (no psutil needed)."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    args: dict[int, str] = {}
    for line in table.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 2:
            continue
        pid, ppid = int(parts[0]), int(parts[1])
        children.setdefault(ppid, []).append(pid)
        args[pid] = parts[2] if len(parts) > 2 else ""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append((pid, args.get(pid, "")))
        todo.extend(children.get(pid, []))
    return tree


@dataclass
class Daemon:
    """One master or worker JVM, its log, and the ports it listens on."""

    name: str
    process: subprocess.Popen[bytes]
    log_file: Path
    port: int
    webui_port: int

    def state(self) -> Any:
        return get_json(f"http://127.0.0.1:{self.webui_port}/json/")

    def log(self, tail: int = 4000) -> str:
        return self.log_file.read_text(errors="replace")[-tail:] if self.log_file.exists() else ""


@dataclass
class SparkCluster:
    """Master and `workers` workers of `cores` cores and `memory` each, under `workdir`. `start()`, `stop()`."""

    workdir: Path
    workers: int = 2
    cores: int = 1
    memory: str = "2g"
    #: heap of the master and worker daemons themselves (they only schedule; executors get their own memory)
    daemon_memory: str = "256m"
    master: Daemon | None = None
    worker_daemons: list[Daemon] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.master is not None, "the cluster is not started"
        return f"spark://127.0.0.1:{self.master.port}"

    def env(self) -> dict[str, str]:
        """The environment of the daemons (and what a driver on this machine should also have)."""
        return {
            **os.environ,
            "SPARK_HOME": str(SPARK_HOME),
            "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_DAEMON_MEMORY": self.daemon_memory,
            "SPARK_LOG_DIR": str(self.workdir / "logs"),
            "SPARK_PID_DIR": str(self.workdir / "pids"),
            "SPARK_NO_DAEMONIZE": "1",
        }

    def _launch(self, name: str, main_class: str, *args: str, port: int, webui_port: int) -> Daemon:
        log_file = self.workdir / f"{name}.log"
        argv = [str(SPARK_CLASS), main_class, "--host", "127.0.0.1", "--port", str(port), "--webui-port"]
        with log_file.open("ab") as log:
            process = subprocess.Popen(
                [*argv, str(webui_port), *args],
                env=self.env(),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return Daemon(name, process, log_file, port, webui_port)

    def start(self, timeout_s: float = 90.0) -> SparkCluster:
        """Start the master, then the workers; return once every worker is registered and ALIVE."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.master = self._launch(
                "master", "org.apache.spark.deploy.master.Master", port=free_port(), webui_port=free_port()
            )
            for i in range(self.workers):
                work = self.workdir / f"worker-{i}"
                work.mkdir(exist_ok=True)
                self.worker_daemons.append(
                    self._launch(
                        f"worker-{i}",
                        "org.apache.spark.deploy.worker.Worker",
                        "--cores",
                        str(self.cores),
                        "--memory",
                        self.memory,
                        "--work-dir",
                        str(work),
                        self.url,
                        port=free_port(),
                        webui_port=free_port(),
                    )
                )
            self.wait_for(lambda: self.alive_workers() == self.workers, timeout_s, "workers registered")
        except BaseException:
            self.stop()
            raise
        return self

    def alive_workers(self) -> int:
        try:
            state = self.master_state()
        except OSError:
            return 0
        return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def master_state(self) -> Any:
        assert self.master is not None
        return self.master.state()

    def active_apps(self) -> list[dict[str, Any]]:
        return list(self.master_state().get("activeapps", []))

    def executors(self, worker: int) -> list[dict[str, Any]]:
        """The executors a worker runs now, as its JSON says (`appid`, `id`, `cores`, `memoryMB`, ...)."""
        return list(self.worker_daemons[worker].state().get("executors", []))

    def executor_pids(self, worker: int) -> list[int]:
        """Executor JVMs (`CoarseGrainedExecutorBackend`) started by one worker."""
        root = self.worker_daemons[worker].process.pid
        return [pid for pid, args in process_tree(root)[1:] if EXECUTOR_CLASS in args]

    def kill_executor(self, worker: int) -> int:
        """SIGKILL one executor JVM of a worker (what the kernel's OOM killer does); its pid."""
        pids = self.executor_pids(worker)
        if not pids:
            raise ClusterError(f"worker-{worker} runs no executor\n{self.logs()}")
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def app_work_dir(self, worker: int, app_id: str) -> Path:
        return self.workdir / f"worker-{worker}" / app_id

    def wait_for(self, predicate: Any, timeout_s: float, what: str, poll_s: float = 0.5) -> None:
        """Poll `predicate` until true; past `timeout_s`, a `ClusterError` with the daemons' logs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            dead = [d.name for d in self.daemons() if d.process.poll() is not None]
            if dead:
                raise ClusterError(f"{', '.join(dead)} exited while waiting for {what}\n{self.logs()}")
            time.sleep(poll_s)
        raise ClusterError(f"no {what} within {timeout_s:.0f} s\n{self.logs()}")

    def daemons(self) -> list[Daemon]:
        return ([self.master] if self.master else []) + self.worker_daemons

    def logs(self, tail: int = 3000) -> str:
        """The tail of each daemon's log, for a failure message."""
        return "\n".join(f"--- {d.name} ({d.log_file})\n{d.log(tail)}" for d in self.daemons())

    def stop(self, grace_s: float = 10.0) -> None:
        """Workers first (they stop their executors), then the master; whatever is left is SIGKILLed by group."""
        for daemon in [*reversed(self.worker_daemons), *([self.master] if self.master else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for daemon in self.daemons():
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.process.wait(max(0.1, deadline - time.monotonic()))
            # The group, not just the daemon: executors and Python workers that outlived it go too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.process.wait(10)
        self.worker_daemons = []
        self.master = None

    def __enter__(self) -> SparkCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
