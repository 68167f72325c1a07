"""Progress: the figures (rate, ETA, Spark task tallies), their plain line, and the context manager without Spark."""

from __future__ import annotations

import logging
import threading

import pytest

from probes import wait_for
from streaming.progress import (
    JobTasks,
    Progress,
    RateMeter,
    TaskCount,
    eta_s,
    format_duration,
    format_rate,
    progress_line,
    spark_progress,
    tally_tasks,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "?"),
        (float("inf"), "?"),
        (-1.0, "?"),
        (0.0, "0s"),
        (42.4, "42s"),
        (59.6, "1m00s"),
        (185.0, "3m05s"),
        (3720.0, "1h02m"),
        (86400 * 2 + 3 * 3600 + 59, "2d03h"),
    ],
)
def test_durations(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (None, "? images/s"),
        (float("nan"), "? images/s"),
        (0.0, "0 images/s"),
        (0.25, "0.25 images/s"),
        (0.0123, "0.012 images/s"),
        (12.34, "12.3 images/s"),
        (1204.4, "1,204 images/s"),
    ],
)
def test_rates(rate: float | None, text: str) -> None:
    assert format_rate(rate, "images") == text


def test_eta() -> None:
    assert eta_s(10, 100, 3.0) == pytest.approx(30.0)
    assert eta_s(100, 100, None) == 0.0
    assert eta_s(120, 100, 1.0) == 0.0
    assert eta_s(10, None, 3.0) is None
    assert eta_s(10, 100, None) is None
    assert eta_s(10, 100, 0.0) is None


def test_the_plain_line() -> None:
    line = progress_line("scoring", 1200, 48000, "references", 12.3, TaskCount(3, 8))
    assert line == "scoring: 1,200/48,000 references (2.5%), 12.3 references/s, ETA 1h03m; Spark tasks 3/8"
    assert progress_line("reading", 5, None, "tasks", None) == "reading: 5 tasks, ? tasks/s, ETA ?"
    assert progress_line("scoring", 0, 0, "references", None, TaskCount()) == (
        "scoring: 0/0 references, ? references/s, ETA 0s"
    )


def test_rate_over_a_window_of_steps() -> None:
    meter = RateMeter(start=0.0, window_s=60.0)
    assert meter.rate(10.0) is None  # nothing done yet
    meter.update(10.0, 100)
    assert meter.rate(10.0) == pytest.approx(10.0)
    meter.update(20.0, 200)
    assert meter.rate(20.0) == pytest.approx(10.0)
    assert meter.rate(40.0) == pytest.approx(5.0)  # decays while no step arrives
    for t in range(30, 200, 10):  # then a faster steady pace: the window forgets the start
        meter.update(float(t), 200 + (t - 20) * 50)
    assert meter.rate(190.0) == pytest.approx(50.0)


def test_task_tallies_count_finished_jobs_whole() -> None:
    jobs = [
        JobTasks("SUCCEEDED", ((4, 4), (2, 0))),  # its second stage was skipped (cached)
        JobTasks("RUNNING", ((8, 3),)),
        JobTasks("FAILED", ((2, 1),)),
    ]
    every, running = tally_tasks(jobs)
    assert every == TaskCount(done=4 + 2 + 3 + 1, total=4 + 2 + 8 + 2)
    assert running == TaskCount(3, 8)
    assert tally_tasks([]) == (TaskCount(), TaskCount())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_units_once_given_otherwise_spark_tasks() -> None:
    clock = Clock()
    progress = Progress("features", None, "images", clock=clock)
    progress.tasks(TaskCount(2, 10), TaskCount(1, 4))
    clock.now += 2.0
    progress.tasks(TaskCount(6, 10), TaskCount(2, 4))
    assert progress.by_tasks
    done, total, unit, rate, tasks = progress.figures()
    assert (done, total, unit, tasks) == (6, 10, "tasks", None)
    assert rate == pytest.approx(6 / 2.0)

    progress.advance(30)
    clock.now += 1.0
    assert not progress.by_tasks
    done, total, unit, rate, tasks = progress.figures()
    assert (done, total, unit, tasks) == (30, None, "images", TaskCount(2, 4))
    assert rate == pytest.approx(30 / 3.0)


def test_final_line() -> None:
    clock = Clock()
    progress = Progress("scoring", 48, "references", clock=clock)
    progress.advance(48)
    clock.now += 96.0
    assert progress.final_line() == "scoring: 48/48 references in 1m36s (0.5 references/s)"


def test_without_a_terminal_it_logs_plain_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streaming.progress")
    with spark_progress(None, "scoring", total=10, unit="references", enabled=False, log_every_s=0.05) as progress:
        progress.advance(4)
        assert wait_for(lambda: any("4/10 references (40.0%)" in r.message for r in caplog.records), timeout_s=5.0)
        progress.advance(6)
    lines = [r.message for r in caplog.records]
    assert lines[-1].startswith("scoring: 10/10 references in ")
    assert all("ETA" in line for line in lines[:-1])


def test_the_bar_draws_and_stops(capsys: pytest.CaptureFixture[str]) -> None:
    with spark_progress(None, "scoring", total=3, unit="references", enabled=True) as progress:
        for _ in range(3):
            progress.advance()
    assert "scoring" in capsys.readouterr().err


def test_it_stops_its_watcher_when_the_work_fails() -> None:
    with pytest.raises(RuntimeError), spark_progress(None, "scoring", 5, enabled=False, log_every_s=0.05):
        raise RuntimeError("the work failed")
    assert wait_for(lambda: not any(t.name == "cxr-progress" for t in threading.enumerate()), 5.0)
