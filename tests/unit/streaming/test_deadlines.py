"""DeadlinePool: jobs bounded in time, stuck threads abandoned, counted, capped, and recovered."""

from __future__ import annotations

import threading
import time

import pytest

from streaming.deadlines import DeadlinePool, Job

pytestmark = pytest.mark.timeout(30)


def test_jobs_run_and_return_their_results_and_errors() -> None:
    pool = DeadlinePool(size=2, max_stuck=2)

    def boom(job: Job[int]) -> int:
        raise ValueError("bad")

    ok = pool.submit(lambda job: 41 + 1, 5.0)
    bad = pool.submit(boom, 5.0)
    assert pool.wait(ok).result == 42 and not ok.timed_out
    assert isinstance(pool.wait(bad).error, ValueError)
    assert pool.stuck == 0


def test_a_job_past_its_deadline_is_abandoned_and_the_queue_behind_it_moves_on() -> None:
    pool = DeadlinePool(size=1, max_stuck=4)
    release = threading.Event()

    def hang(job: Job[None]) -> None:
        job.phase = "decode"
        release.wait(20)

    started = time.monotonic()
    stuck = pool.submit(hang, 0.3)
    behind = pool.submit(lambda job: "next", 5.0)
    pool.wait(stuck)
    assert stuck.timed_out and stuck.phase == "decode"
    assert time.monotonic() - started < 2.0
    assert pool.stuck == 1
    # One slot only, and it was taken by the stuck thread: a fresh thread must run the job behind.
    assert pool.wait(behind).result == "next"
    release.set()
    deadline = time.monotonic() + 5
    while pool.stuck and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.stuck == 0  # the stuck thread came back and was let go


def test_the_deadline_counts_from_the_start_of_a_job_not_from_its_submission() -> None:
    pool = DeadlinePool(size=1, max_stuck=2)
    first = pool.submit(lambda job: time.sleep(0.4), 1.0)
    second = pool.submit(lambda job: time.sleep(0.4), 0.6)  # queued 0.4 s, then runs 0.4 s < 0.6 s
    assert not pool.wait(first).timed_out
    assert not pool.wait(second).timed_out


def test_at_the_cap_new_jobs_are_refused_until_stuck_threads_return() -> None:
    pool = DeadlinePool(size=2, max_stuck=2)
    release = threading.Event()
    hung = [pool.submit(lambda job: release.wait(20), 0.1) for _ in range(2)]
    for job in hung:
        assert pool.wait(job).timed_out
    assert pool.stuck == 2
    refused = pool.submit(lambda job: "never", 5.0)
    assert pool.wait(refused).refused and refused.started_at is None
    release.set()
    deadline = time.monotonic() + 5
    while pool.stuck and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.wait(pool.submit(lambda job: "again", 5.0)).result == "again"


def test_threads_do_not_accumulate_across_batches() -> None:
    pool = DeadlinePool(size=3, max_stuck=2)
    before = threading.active_count()
    for _ in range(20):
        jobs = [pool.submit(lambda job: None, 5.0) for _ in range(10)]
        for job in jobs:
            pool.wait(job)
    time.sleep(0.2)
    assert threading.active_count() <= before + 3


@pytest.mark.parametrize(("size", "stuck"), [(0, 1), (1, 0)])
def test_sizes_must_be_positive(size: int, stuck: int) -> None:
    with pytest.raises(ValueError):
        DeadlinePool(size, stuck)
