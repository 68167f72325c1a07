"""Producing model inputs in killable child processes instead of threads: what it costs, measured side by side.

Child processes would give deadlines (kill the child), crash isolation (a decoder segfault kills only the child)
and decoding outside the parent's GIL in one mechanism. This prices that against what ships: a thread pool
calling `streaming.scoring.prepare` in the Python worker. Every mode is driven by the same thread pool of N
driver threads over the same references (the sixteen sample chest X-rays, cycled, as file:// URIs), so only the
callable differs:

  threads        a driver thread calls `prepare` itself (what ships)
  process        a driver thread checks out one of N long-lived children (forkserver with the decoders
                 preloaded, or spawn), sends it the URI and waits, with a deadline, for the float32 model input
                 bytes to come back over a pipe
  process+kill   the same, but every K-th image its child is killed mid-task (a deadline firing), replaced and
                 the image retried on the replacement: the price of the recovery path, deadline wait excluded
  ipc            N=1, the child returns a ready-made array without fetching or decoding: the round trip alone

It also reports the start-up cost of a pool (time to its first result, and until every child has returned one)
and the memory of one child. Throughput is the best of the rounds, latency percentiles pool every image of every
round, and CPU counts the parent process plus its children (not the forkserver itself). Usage:
    .venv/bin/python -m bench.isolation [--images 256] [--threads 1,2,4] [--kill-every 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import resource
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np

from streaming.bundle import Descriptor, read_descriptor
from streaming.contracts import Reference
from streaming.fetch import FetchPolicy
from streaming.scoring import ScoringConfig, prepare
from streaming.settings import default_bundle_dir, sample_images_dir

_READY = b"ready"
_STOP = b""
_ECHO = "\x00echo"  # not a URI: the child answers with a ready-made array (prices the round trip alone)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ChildFailed(RuntimeError):
    """A child missed its deadline, died, or could not prepare the image."""


def _child_main(conn: Connection, descriptor: Descriptor, config: ScoringConfig) -> None:
    """A child's whole life: for each URI received, send back the model input's raw float32 bytes (or an error)."""
    spec = descriptor.input_spec
    ready_made = np.zeros((spec.height, spec.width, spec.channels), dtype=np.float32)
    conn.send_bytes(_READY)
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:  # the parent went away
            return
        if message == _STOP:
            return
        try:
            if message == _ECHO.encode():
                x = ready_made
            else:
                x = prepare(Reference(event_id="bench", uri=message.decode()), descriptor, config)
            conn.send_bytes(np.ascontiguousarray(x, dtype=np.float32).data)
        except Exception as exc:  # reported, never fatal: the child stays usable
            conn.send_bytes(pickle.dumps(f"{type(exc).__name__}: {exc}"))


@dataclass
class _Child:
    process: BaseProcess
    conn: Connection


class ChildPool:
    """N long-lived children, each used by one driver thread at a time; a child past its deadline is replaced."""

    def __init__(
        self, ctx: BaseContext, size: int, descriptor: Descriptor, config: ScoringConfig, start_timeout_s: float = 120.0
    ) -> None:
        self._ctx = ctx
        self._size = size
        self._descriptor = descriptor
        self._config = config
        self._start_timeout_s = start_timeout_s
        spec = descriptor.input_spec
        self._shape = (spec.height, spec.width, spec.channels)
        self._nbytes = int(np.prod(self._shape)) * 4
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.children: list[_Child] = []
        self.restart_s: list[float] = []
        self.retired_cpu_s = 0.0

    def _spawn(self) -> _Child:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_child_main, args=(child_end, self._descriptor, self._config), daemon=True
        )
        process.start()
        child_end.close()  # so the parent sees EOF when the child dies
        return _Child(process, parent_end)

    def _await_ready(self, child: _Child) -> None:
        if not child.conn.poll(self._start_timeout_s) or child.conn.recv_bytes() != _READY:
            raise ChildFailed("a child did not start in time")

    def _roundtrip(self, child: _Child, message: bytes) -> np.ndarray:
        child.conn.send_bytes(message)
        return self._receive(child)

    def _receive(self, child: _Child) -> np.ndarray:
        if not child.conn.poll(self._config.deadline_s):
            raise TimeoutError
        data = child.conn.recv_bytes()
        if len(data) != self._nbytes:
            raise ChildFailed(pickle.loads(data))
        return np.frombuffer(data, dtype=np.float32).reshape(self._shape)

    def start(self, warm_uri: str) -> tuple[float, float]:
        """Start every child at once and have each prepare `warm_uri`; seconds to the first result and to all."""
        started = time.perf_counter()
        children = [self._spawn() for _ in range(self._size)]
        finished: list[float] = []
        for child in children:
            self._await_ready(child)
            self._roundtrip(child, warm_uri.encode())
            finished.append(time.perf_counter() - started)
        self.children = children
        for child in children:
            self._idle.put(child)
        return finished[0], finished[-1]

    def warm(self, uri: str) -> None:
        """Have every child prepare `uri` once (untimed)."""
        for child in self.children:
            self._roundtrip(child, uri.encode())

    def prepare(self, uri: str, kill: bool = False) -> np.ndarray:
        """The model input for `uri`, from whichever child is idle; `kill` kills it mid-task and retries once."""
        child = self._idle.get()
        try:
            child.conn.send_bytes(uri.encode())
            if kill:  # stand-in for a deadline firing: kill it mid-task, replace it, retry on the replacement
                child = self._replace(child)
                child.conn.send_bytes(uri.encode())
            return self._receive(child)
        except TimeoutError:
            child = self._replace(child)
            raise ChildFailed("the child missed its deadline") from None
        except (EOFError, OSError):
            child = self._replace(child)
            raise ChildFailed("the child died") from None
        finally:
            self._idle.put(child)

    def _replace(self, child: _Child) -> _Child:
        started = time.perf_counter()
        pid = child.process.pid
        assert pid is not None
        cpu = cpu_seconds(pid)
        child.process.kill()
        child.process.join()
        child.conn.close()
        fresh = self._spawn()
        self._await_ready(fresh)
        with self._lock:
            self.retired_cpu_s += cpu
            self.children[self.children.index(child)] = fresh
            self.restart_s.append(time.perf_counter() - started)
        return fresh

    def cpu_seconds(self) -> float:
        """CPU time of every child this pool has run (live ones now, killed ones up to their kill)."""
        with self._lock:
            pids = [c.process.pid for c in self.children if c.process.pid is not None]
            return self.retired_cpu_s + sum(cpu_seconds(pid) for pid in pids)

    def close(self) -> None:
        for child in self.children:
            with contextlib.suppress(OSError):  # already dead
                child.conn.send_bytes(_STOP)
        for child in self.children:
            child.process.join(5)
            if child.process.is_alive():
                child.process.kill()
                child.process.join()
            child.conn.close()
        self.children = []


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory_mib(pid: int) -> dict[str, float]:
    """RSS, peak RSS and PSS (shared pages split among their sharers) of a process, in MiB (Linux /proc)."""
    figures: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0]) / 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                figures["Pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return figures


@dataclass
class Figures:
    """One mode at one N, over every round."""

    mode: str
    threads: int
    rates: list[float] = field(default_factory=list)
    latencies_s: list[np.ndarray] = field(default_factory=list)
    cpu_per_image_s: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return max(self.rates)

    def latency_ms(self, q: float) -> float:
        return float(np.percentile(np.concatenate(self.latencies_s), q) * 1000)

    @property
    def cpu_ms(self) -> float:
        return float(np.median(self.cpu_per_image_s) * 1000)


Producer = Callable[[int, str], np.ndarray]


def _no_children() -> float:
    return 0.0


def drive(
    executor: ThreadPoolExecutor,
    produce: Producer,
    uris: Sequence[str],
    figures: Figures,
    child_cpu: Callable[[], float] = _no_children,
) -> None:
    """Produce a model input for every URI through `executor`; adds one round to `figures`."""
    latencies = np.empty(len(uris))

    def one(i: int) -> None:
        started = time.perf_counter()
        x = produce(i, uris[i])
        latencies[i] = time.perf_counter() - started
        assert x.dtype == np.float32 and x.ndim == 3

    cpu_before = own_cpu_seconds() + child_cpu()
    started = time.perf_counter()
    list(executor.map(one, range(len(uris))))
    wall = time.perf_counter() - started
    cpu = own_cpu_seconds() + child_cpu() - cpu_before
    figures.rates.append(len(uris) / wall)
    figures.latencies_s.append(latencies)
    figures.cpu_per_image_s.append(cpu / len(uris))


def process_modes(pool: ChildPool, n: int, kill_every: int) -> list[tuple[str, Producer, Callable[[], float]]]:
    """The child-process modes over `pool`: plain, with a kill per `kill_every` images, and (N=1) IPC alone."""

    def plain(_: int, uri: str) -> np.ndarray:
        return pool.prepare(uri)

    def killing(i: int, uri: str) -> np.ndarray:
        return pool.prepare(uri, kill=i % kill_every == kill_every - 1)

    def echo(_: int, __: str) -> np.ndarray:
        return pool.prepare(_ECHO)

    modes: list[tuple[str, Producer, Callable[[], float]]] = [
        ("process", plain, pool.cpu_seconds),
        (f"process+kill/{kill_every}", killing, pool.cpu_seconds),
    ]
    if n == 1:
        modes.append(("ipc", echo, pool.cpu_seconds))
    return modes


def forkserver_context(preload: Sequence[str]) -> BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", default="1,2,4", help="the Ns to compare, comma-separated")
    parser.add_argument("--kill-every", type=int, default=64, help="K: kill and restart one child per K images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", choices=("forkserver", "spawn"), default="forkserver")
    parser.add_argument("--startup-n", type=int, default=2, help="pool size for the start-up measurements")
    args = parser.parse_args()
    sizes = [int(n) for n in args.threads.split(",")]

    root = sample_images_dir().resolve()
    paths = sorted(root.glob("*.jpeg"))
    uris = [p.as_uri() for p in (paths * (args.images // len(paths) + 1))[: args.images]]
    descriptor = read_descriptor(default_bundle_dir())
    config = ScoringConfig(fetch=FetchPolicy(allowed_roots=(root,)))
    # The parent of a real pool may hold TensorFlow's threads: never fork it. The forkserver imports the
    # decoders once and forks each child from that clean, preloaded process.
    forkserver = forkserver_context(["__main__", "streaming.scoring"])
    contexts: dict[str, BaseContext] = {"forkserver": forkserver, "spawn": mp.get_context("spawn")}
    ctx = contexts[args.context]

    # (d) Start-up: the first forkserver pool pays for launching the server and preloading the decoders.
    startup: list[tuple[str, float, float]] = []
    child_memory: dict[str, dict[str, float]] = {}
    for label, startup_ctx in (
        ("forkserver, server launch + preload", forkserver),
        ("forkserver, server running", forkserver),
        ("spawn", contexts["spawn"]),
    ):
        pool = ChildPool(startup_ctx, args.startup_n, descriptor, config)
        first, every = pool.start(uris[0])
        startup.append((label, first, every))
        if label == "spawn":
            pid = pool.children[0].process.pid
            assert pid is not None
            pool.warm(uris[1])
            child_memory["spawn child, after 2 images"] = memory_mib(pid)
        pool.close()

    results: dict[tuple[str, int], Figures] = {}
    restarts: list[float] = []
    spec = descriptor.input_spec
    per_image_bytes = spec.height * spec.width * spec.channels * 4

    def local(_: int, uri: str) -> np.ndarray:
        return prepare(Reference(event_id="bench", uri=uri), descriptor, config)

    for n in sizes:
        executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix="bench-driver")
        pool = ChildPool(ctx, n, descriptor, config)
        pool.start(uris[0])
        warm_up = uris[: len(paths)]
        list(executor.map(lambda u: local(0, u), warm_up))  # warm-up, untimed
        for u in warm_up:
            pool.warm(u)
        modes = [("threads", local, _no_children), *process_modes(pool, n, args.kill_every)]
        for _ in range(args.rounds):  # interleaved, so the modes at one N see the same background load
            for mode, produce, child_cpu in modes:
                if mode != "threads":
                    pool.warm(uris[0])  # a restarted child is cold: warm it outside the timed run
                figures = results.setdefault((mode, n), Figures(mode, n))
                drive(executor, produce, uris, figures, child_cpu)
        restarts.extend(pool.restart_s)
        pid = pool.children[0].process.pid
        assert pid is not None
        child_memory[f"{args.context} child (N={n}), after the runs"] = memory_mib(pid)
        pool.close()
        executor.shutdown()

    print(
        f"\n{len(uris)} images (16 sample X-rays cycled), {args.rounds} interleaved rounds, {os.cpu_count()} cores,"
        f" children: {args.context}; images/s best of rounds, latency over every image of every round"
    )
    print(
        f"{'mode':<17} {'N':>2} {'images/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu ms/img':>10}"
        f" {'img/s vs threads':>17} {'p50 vs threads':>15}"
    )
    for (mode, n), fig in results.items():
        base = results[("threads", n)]
        ratios = f"{fig.rate / base.rate:>16.2f}x {fig.latency_ms(50) / base.latency_ms(50):>14.2f}x"
        if mode == "ipc":  # not the same work: no ratio
            ratios = f"{'-':>17} {'-':>15}"
        print(
            f"{mode:<17} {n:>2} {fig.rate:>9.1f} {fig.latency_ms(50):>7.2f} {fig.latency_ms(99):>7.2f}"
            f" {fig.cpu_ms:>10.2f} {ratios}"
        )
    print(f"  (ipc: round trip of one {per_image_bytes / 1024:.0f} KiB float32 model input, nothing decoded)")
    if restarts:
        print(
            f"\n(c) {len(restarts)} kill + restart + ready: mean {np.mean(restarts) * 1000:.1f} ms,"
            f" max {np.max(restarts) * 1000:.1f} ms (deadline wait excluded)"
        )
    print(f"\n(d) start-up of a pool of {args.startup_n}: first result / every child's first result")
    for label, first, every in startup:
        print(f"  {label:<37} {first * 1000:>7.0f} ms / {every * 1000:>7.0f} ms")
    print("\nmemory, MiB (RSS / peak RSS / PSS: shared pages split among their sharers)")
    for label, mem in child_memory.items():
        print(f"  {label:<37} {mem.get('VmRSS', 0):>6.1f} / {mem.get('VmHWM', 0):>6.1f} / {mem.get('Pss', 0):>6.1f}")
    own = memory_mib(os.getpid())
    print(f"  {'this parent (no TensorFlow loaded)':<37} {own.get('VmRSS', 0):>6.1f} / {own.get('VmHWM', 0):>6.1f}")


if __name__ == "__main__":
    main()
