"""Per-reference work on threads, each job bounded in time whatever it waits on.

Python cannot kill a thread. A job that runs past its deadline is therefore *abandoned*: whoever waits for it
gets a timeout at once, a fresh thread takes its slot so the jobs behind it go on, and the stuck thread runs on
detached until whatever blocks it returns (most jobs stop by themselves at the deadline: `fetch` checks it
between reads; a read the kernel never returns, a decoder busy in C, cannot). Abandoned threads that are still
running are counted (`stuck`); at `max_stuck` the pool refuses new jobs instead of growing without bound, and it
takes them again as soon as stuck threads come back. Nothing here knows about images: a job is any callable.

Child processes would make jobs killable, at the price of the model input crossing a pipe and a start-up per
process; `bench/isolation.py` measures that trade (see the README's "Guarantees").
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class Job(Generic[T]):
    """One unit of work and how it ended. The callable receives its own `Job`, to report its `phase`."""

    fn: Callable[[Job[T]], T]
    deadline_s: float
    #: What the job is doing now (the callable sets it), so a timeout can say which step overran.
    phase: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    result: T | None = None
    error: BaseException | None = None
    timed_out: bool = False
    #: Refused without running: too many threads are stuck.
    refused: bool = False
    _done: bool = field(default=False, repr=False)

    @property
    def seconds(self) -> float:
        """How long it ran (0 until it finished)."""
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return self.finished_at - self.started_at

    @property
    def deadline_at(self) -> float | None:
        """Absolute `time.monotonic()` by which the job must end; None until it starts."""
        return None if self.started_at is None else self.started_at + self.deadline_s


class DeadlinePool:
    """At most `size` jobs run at once, each for at most its `deadline_s` from when it starts."""

    def __init__(
        self, size: int, max_stuck: int, name: str = "cxr-decode", clock: Callable[[], float] = time.monotonic
    ):
        if size <= 0 or max_stuck <= 0:
            raise ValueError("size and max_stuck must be positive")
        self.size, self.max_stuck, self.name, self._clock = size, max_stuck, name, clock
        self._cond = threading.Condition()
        self._queue: deque[Job[object]] = deque()
        self._live = 0  # threads taking jobs (abandoned ones excluded)
        self._stuck = 0
        self._spawned = 0

    @property
    def stuck(self) -> int:
        """Threads abandoned past their deadline that have not returned yet."""
        with self._cond:
            return self._stuck

    def submit(self, fn: Callable[[Job[T]], T], deadline_s: float) -> Job[T]:
        job: Job[T] = Job(fn, deadline_s)
        with self._cond:
            if self._stuck >= self.max_stuck:
                job.refused = job._done = True
                return job
            self._queue.append(job)  # type: ignore[arg-type]
            self._spawn()
            self._cond.notify_all()
        return job

    def wait(self, job: Job[T]) -> Job[T]:
        """Until `job` ended or overran its deadline (then it is abandoned and marked `timed_out`)."""
        with self._cond:
            while not job._done:
                deadline = job.deadline_at
                if deadline is None:  # queued behind others: its clock has not started
                    self._cond.wait(0.5)
                    continue
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self._abandon(job)
                    break
                self._cond.wait(remaining)
        return job

    def _abandon(self, job: Job[T]) -> None:
        job.timed_out = job._done = True
        self._stuck += 1
        self._live -= 1
        self._spawn()  # its slot goes to a fresh thread, so the queue behind it moves on

    def _spawn(self) -> None:
        while self._live < self.size and self._queue:
            self._live += 1
            self._spawned += 1
            name = f"{self.name}-{self._spawned}"
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._live -= 1  # idle threads end; a later submit starts new ones
                    return
                job = self._queue.popleft()
                job.started_at = self._clock()
                self._cond.notify_all()  # a waiter can start its job's clock
            try:
                job.result = job.fn(job)
            except BaseException as exc:  # handed to the waiter, never lost in a thread
                job.error = exc
            job.finished_at = self._clock()
            with self._cond:
                if job.timed_out:  # abandoned meanwhile: its replacement has the slot, this thread ends
                    self._stuck -= 1
                    return
                job._done = True
                self._cond.notify_all()
