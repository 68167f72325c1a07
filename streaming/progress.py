"""Progress of long Spark work: a bar with rate and ETA on a terminal, a plain log line everywhere else.

One entry point, `spark_progress`, a context manager:

    with spark_progress(spark, "scoring", total=48_000, unit="references") as progress:
        for chunk in chunks:
            write(chunk)                    # Spark jobs started in the block are followed as well
            progress.advance(len(chunk))    # units done: what the rate and the ETA count

    with spark_progress(spark, "extracting features"):   # no total and no advance(): Spark's tasks count
        features.write.parquet(out)

Spark jobs started inside the block (from the thread that entered it) run in a job group of their own, and a
background thread reads their task counts from `sparkContext.statusTracker()`: with units (a `total` or any
`advance`) they show as the work in flight ("tasks 3/8"); without, they are the units themselves (the total
then grows as Spark plans more stages). On a terminal (stderr a TTY) a rich bar is drawn on stderr; anywhere
else (a pod, a pipe, CI), or with `enabled=False`, a plain line is logged every `log_every_s` seconds, so
Kubernetes logs show how far a job is and when it should end. A final line is logged either way.

Progress never fails the work it watches: a status query that fails is logged at debug level and skipped.
The pure parts (formatting, rate, ETA, task tallies) are plain functions, tested without Spark.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)
#: How often the bar is redrawn and Spark's status read (a few cheap py4j calls) while a terminal shows it.
REFRESH_S = 0.5
#: How often Spark's status is read when only log lines show progress.
_QUIET_POLL_S = 5.0
#: The rate is measured over this much recent time (steady after start-up costs, quick to follow a change).
RATE_WINDOW_S = 120.0
_GROUP_PROPERTIES = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")


# ------------------------------------------------------------------------------------------------ pure parts


@dataclass(frozen=True)
class TaskCount:
    """Spark tasks finished and planned, over some jobs."""

    done: int = 0
    total: int = 0

    def __add__(self, other: TaskCount) -> TaskCount:
        return TaskCount(self.done + other.done, self.total + other.total)


@dataclass(frozen=True)
class JobTasks:
    """One Spark job as the status tracker reports it: its status and (tasks, completed) of each stage."""

    status: str
    stages: tuple[tuple[int, int], ...]


def tally_tasks(jobs: Iterable[JobTasks]) -> tuple[TaskCount, TaskCount]:
    """(all jobs, running jobs). A finished job counts all its tasks done: a stage it skipped (its data was
    cached) reports no completed task, and would otherwise keep the bar short of its end forever."""
    every, running = TaskCount(), TaskCount()
    for job in jobs:
        planned = sum(tasks for tasks, _ in job.stages)
        finished = sum(min(done, tasks) for tasks, done in job.stages)
        if job.status == "SUCCEEDED":
            finished = planned
        count = TaskCount(finished, planned)
        every += count
        if job.status == "RUNNING":
            running += count
    return every, running


def format_duration(seconds: float | None) -> str:
    """'42s', '3m05s', '1h02m', '2d03h'; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def format_rate(per_s: float | None, unit: str) -> str:
    """'12.3 references/s', '0.25 references/s', '1,204 references/s'; '? unit/s' when unknown."""
    if per_s is None or not math.isfinite(per_s):
        return f"? {unit}/s"
    if per_s >= 100:
        return f"{per_s:,.0f} {unit}/s"
    if per_s >= 1:
        return f"{per_s:.1f} {unit}/s"
    return f"{per_s:.2g} {unit}/s"


def eta_s(done: int, total: int | None, per_s: float | None) -> float | None:
    """Seconds left at the current rate: 0 when done, None when the total or the rate is unknown."""
    if total is None:
        return None
    if done >= total:
        return 0.0
    if per_s is None or per_s <= 0:
        return None
    return (total - done) / per_s


def progress_line(
    description: str,
    done: int,
    total: int | None,
    unit: str,
    per_s: float | None,
    tasks: TaskCount | None = None,
) -> str:
    """The plain progress line: 'scoring: 1,200/48,000 references (2.5%), 12.3 references/s, ETA 1h05m'."""
    if total is None:
        counts = f"{done:,} {unit}"
    else:
        share = f" ({100.0 * done / total:.1f}%)" if total else ""
        counts = f"{done:,}/{total:,} {unit}{share}"
    line = f"{description}: {counts}, {format_rate(per_s, unit)}, ETA {format_duration(eta_s(done, total, per_s))}"
    if tasks is not None and tasks.total:
        line += f"; Spark tasks {tasks.done:,}/{tasks.total:,}"
    return line


class RateMeter:
    """Units per second over the last `window_s` seconds, from (time, done) samples.

    It keeps the newest sample at or before the window's start as its anchor, so progress that comes in steps
    (a chunk every few minutes) still has a rate, which decays while no step arrives, as it should."""

    def __init__(self, start: float, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque([(start, 0)])

    def update(self, now: float, done: int) -> None:
        self._samples.append((now, done))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rate(self, now: float) -> float | None:
        """None until some unit is done and some time has passed."""
        anchor_t, anchor_done = self._samples[0]
        latest_done = self._samples[-1][1]
        if latest_done <= anchor_done or now <= anchor_t:
            return None
        return (latest_done - anchor_done) / (now - anchor_t)


# ----------------------------------------------------------------------------------------- the live part


class Progress:
    """What `spark_progress` hands out: `advance(units)` after each piece of work is done (committed)."""

    def __init__(
        self,
        description: str,
        total: int | None,
        unit: str,
        *,
        render: Callable[[Progress], None] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description, self.total, self.unit = description, total, unit
        self._clock = clock
        self.started = clock()
        self._done = 0
        self._counting = total is not None
        self._meter = RateMeter(self.started)
        self._task_meter = RateMeter(self.started)
        self.tasks_all = TaskCount()
        self.tasks_running = TaskCount()
        self._lock = threading.Lock()
        self._render = render

    def advance(self, units: int = 1) -> None:
        """Count `units` more as done (rows written, images scored): the rate and the ETA follow these."""
        with self._lock:
            self._done += units
            self._counting = True
            self._meter.update(self._clock(), self._done)
        self._render(self)

    def tasks(self, every: TaskCount, running: TaskCount) -> None:
        """The Spark tasks of the block's jobs, as last read from the status tracker."""
        with self._lock:
            self.tasks_all, self.tasks_running = every, running
            self._task_meter.update(self._clock(), every.done)

    @property
    def by_tasks(self) -> bool:
        """No units given (no total, no advance): Spark's tasks are what is counted."""
        return not self._counting

    def figures(self) -> tuple[int, int | None, str, float | None, TaskCount | None]:
        """(done, total, unit, rate, tasks in flight) as of now: units, or Spark tasks when there are none."""
        now = self._clock()
        with self._lock:
            if self.by_tasks:
                total = self.tasks_all.total or None
                return self.tasks_all.done, total, "tasks", self._task_meter.rate(now), None
            return self._done, self.total, self.unit, self._meter.rate(now), self.tasks_running

    def line(self) -> str:
        done, total, unit, per_s, tasks = self.figures()
        return progress_line(self.description, done, total, unit, per_s, tasks)

    def final_line(self) -> str:
        done, total, unit, _, _ = self.figures()
        elapsed = self._clock() - self.started
        counts = f"{done:,}/{total:,}" if total is not None else f"{done:,}"
        average = done / elapsed if elapsed > 0 else None
        return f"{self.description}: {counts} {unit} in {format_duration(elapsed)} ({format_rate(average, unit)})"


class _Bar:
    """The rich bar on stderr; its numbers come from `Progress.figures`, the same as the log line's."""

    def __init__(self, description: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[tasks]}", style="dim"),
            console=Console(stderr=True),
            refresh_per_second=1 / REFRESH_S,
        )
        self._task = self._bar.add_task(description, total=None, counts="", rate="", eta="?", tasks="")
        self._bar.start()

    def render(self, progress: Progress) -> None:
        done, total, unit, per_s, tasks = progress.figures()
        self._bar.update(
            self._task,
            completed=done,
            total=total,
            counts=f"{done:,}/{total:,} {unit}" if total is not None else f"{done:,} {unit}",
            rate=format_rate(per_s, unit),
            eta=format_duration(eta_s(done, total, per_s)),
            tasks=f"tasks {tasks.done}/{tasks.total}" if tasks is not None and tasks.total else "",
        )

    def stop(self) -> None:
        self._bar.stop()


class _TaskWatch:
    """Reads the task counts of one job group's jobs from Spark's status tracker (finished jobs once)."""

    def __init__(self, spark: SparkSession, group: str) -> None:
        self.tracker = spark.sparkContext.statusTracker()
        self.group = group
        self._finished: dict[int, JobTasks] = {}

    def read(self) -> tuple[TaskCount, TaskCount]:
        jobs: list[JobTasks] = []
        for job_id in self.tracker.getJobIdsForGroup(self.group):
            if job_id in self._finished:
                jobs.append(self._finished[job_id])
                continue
            info = self.tracker.getJobInfo(job_id)
            if info is None:  # no longer retained by Spark's status store
                continue
            stages = []
            for stage_id in info.stageIds:
                stage = self.tracker.getStageInfo(stage_id)
                if stage is not None:
                    stages.append((int(stage.numTasks), int(stage.numCompletedTasks)))
            job = JobTasks(str(info.status), tuple(stages))
            if job.status in ("SUCCEEDED", "FAILED"):
                self._finished[job_id] = job
            jobs.append(job)
        return tally_tasks(jobs)


@contextmanager
def _job_group(spark: SparkSession, group: str, description: str) -> Iterator[None]:
    """Jobs started by this thread inside the block belong to `group`; the thread's previous group comes back."""
    context = spark.sparkContext
    saved = {key: context.getLocalProperty(key) for key in _GROUP_PROPERTIES}
    context.setJobGroup(group, description, interruptOnCancel=False)
    try:
        yield
    finally:
        for key, value in saved.items():
            context.setLocalProperty(key, value)  # type: ignore[arg-type]  # None removes it


@contextmanager
def spark_progress(
    spark: SparkSession | None,
    description: str,
    total: int | None = None,
    *,
    unit: str = "rows",
    enabled: bool | None = None,
    log_every_s: float = 30.0,
) -> Iterator[Progress]:
    """Show the progress of the Spark work done inside the block; yields a `Progress` to `advance()`.

    `total`: units expected (None when unknown). `unit`: what they are, for the display. `enabled`: draw the bar
    (default: when stderr is a terminal); without it, one log line every `log_every_s` seconds. `spark` may be
    None (no Spark tasks are followed then). Nothing here waits without a bound: leaving the block stops the
    watcher thread, waiting for it a few seconds at most.
    """
    show = sys.stderr.isatty() if enabled is None else enabled
    bar = _Bar(description) if show else None
    progress = Progress(description, total, unit, render=bar.render if bar else lambda _: None)
    group = f"cxr-progress-{uuid.uuid4().hex[:12]}"
    watch = _TaskWatch(spark, group) if spark is not None else None
    stop = threading.Event()

    def tick() -> None:
        if watch is not None:
            try:
                progress.tasks(*watch.read())
            except Exception:  # the status of a job must never fail the job
                log.debug("could not read Spark's job status", exc_info=True)
        if bar is not None:
            bar.render(progress)

    def run() -> None:
        poll_s = REFRESH_S if bar is not None else min(_QUIET_POLL_S, log_every_s)
        next_line = time.monotonic() + log_every_s
        while not stop.wait(poll_s):
            tick()
            if bar is None and time.monotonic() >= next_line:
                next_line += log_every_s
                log.info("%s", progress.line())

    thread = threading.Thread(target=run, name="cxr-progress", daemon=True)
    try:
        with _job_group(spark, group, description) if spark is not None else _nothing():
            thread.start()
            yield progress
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5.0)
        if watch is not None:
            tick()
        if bar is not None:
            bar.stop()
        log.info("%s", progress.final_line())


@contextmanager
def _nothing() -> Iterator[None]:
    yield
