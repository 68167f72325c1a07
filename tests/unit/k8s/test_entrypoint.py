"""`k8s/image/entrypoint.sh drain`, the Spark driver pod's preStop hook: it finds the Python driver (`cxr run`),
never the JVM that names the same file among its arguments, asks it to stop, and waits for it within a bound.

The process lookup is replaced by a fake `pgrep` on PATH that names a child of the test: the real one would
look at every process of the machine, and this must never signal anyone else's `cxr run`."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[3] / "k8s" / "image" / "entrypoint.sh"


def driver_pattern() -> re.Pattern[str]:
    """The extended regular expression `driver_python_pid` hands to `pgrep -f` (POSIX ERE, read by Python's re)."""
    match = re.search(r"pgrep -o -f '([^']+)'", ENTRYPOINT.read_text())
    assert match, "driver_python_pid no longer uses pgrep -o -f '...'"
    return re.compile(match.group(1))


@pytest.mark.parametrize(
    "cmdline",
    [
        # spark-submit's PythonRunner starts the main file with spark.pyspark.driver.python
        "/usr/local/bin/python3 /usr/local/lib/python3.11/site-packages/streaming/cli.py run",
        # `cxr run` on its own (the Deployment without the Spark Operator)
        "/usr/local/bin/python3 /usr/local/bin/cxr run",
        "/usr/local/bin/python3.11 /usr/local/bin/cxr run --master local[2]",
    ],
)
def test_the_python_driver_is_found(cmdline: str) -> None:
    assert driver_pattern().search(cmdline)


@pytest.mark.parametrize(
    "cmdline",
    [
        # the JVM whose arguments name the same file
        "/opt/java/bin/java -cp /opt/spark/conf:/usr/local/lib/python3.11/site-packages/pyspark/jars/* "
        "org.apache.spark.deploy.SparkSubmit --conf spark.pyspark.driver.python=/usr/local/bin/python3 "
        "--class org.apache.spark.deploy.PythonRunner "
        "local:///usr/local/lib/python3.11/site-packages/streaming/cli.py run",
        "tini -s -- /usr/local/lib/python3.11/site-packages/pyspark/bin/spark-submit --deploy-mode client run",
        # other cxr commands, and Spark's Python workers
        "/usr/local/bin/python3 /usr/local/bin/cxr runs",
        "/usr/local/bin/python3 /usr/local/bin/cxr worklist --port 8080",
        "/usr/local/bin/python3 -m pyspark.daemon",
    ],
)
def test_nothing_else_is(cmdline: str) -> None:
    assert not driver_pattern().search(cmdline)


@pytest.fixture
def fake_pgrep(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A PATH whose `pgrep` prints the pid written to `tmp_path/pid` (nothing when that file is absent)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pgrep = bin_dir / "pgrep"
    pgrep.write_text(f"#!/bin/sh\ncat {tmp_path / 'pid'} 2>/dev/null\nexit 0\n")
    pgrep.chmod(pgrep.stat().st_mode | stat.S_IXUSR)
    yield tmp_path / "pid", {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def drain(env: dict[str, str], timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ENTRYPOINT), "drain"], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def driver(finish_s: float, *, ignore_term: bool = False) -> subprocess.Popen[str]:
    """A stand-in for `cxr run`: on SIGTERM it finishes its micro-batch (`finish_s`), then exits."""
    code = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, {'signal.SIG_IGN' if ignore_term else 'lambda *a: stop.append(1)'})\n"
        "stop = []\n"
        "print('ready', flush=True)\n"
        "while not stop: time.sleep(0.05)\n"
        f"time.sleep({finish_s})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def test_drain_stops_the_driver_and_waits_for_it(fake_pgrep: tuple[Path, dict[str, str]]) -> None:
    pid_file, env = fake_pgrep
    process = driver(finish_s=1.5)
    pid_file.write_text(f"{process.pid}\n")
    # Reaped as soon as it exits, as its parent in the pod (the JVM, or tini) does: a zombie answers `kill -0`.
    reaper = threading.Thread(target=process.wait)
    reaper.start()
    started = time.monotonic()
    done = drain(env)
    reaper.join(timeout=5)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 1.5  # it waited for the batch in flight
    assert process.returncode == 0
    assert "stopped after" in done.stderr


def test_drain_gives_up_after_its_timeout_and_never_fails_the_hook(fake_pgrep: tuple[Path, dict[str, str]]) -> None:
    pid_file, env = fake_pgrep
    process = driver(finish_s=0, ignore_term=True)
    pid_file.write_text(f"{process.pid}\n")
    try:
        done = drain({**env, "DRAIN_TIMEOUT_S": "1"})
        assert done.returncode == 0 and "still running after 1 s" in done.stderr
        assert process.poll() is None  # left to the kubelet's SIGTERM (and SIGKILL)
    finally:
        process.kill()
        process.wait()


def test_drain_without_a_driver_does_nothing(fake_pgrep: tuple[Path, dict[str, str]]) -> None:
    _, env = fake_pgrep
    done = drain(env)
    assert done.returncode == 0 and "nothing to do" in done.stderr
