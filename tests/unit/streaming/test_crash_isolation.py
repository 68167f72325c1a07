"""pipeline: how a batch whose Python worker died is recognised and split (the Spark side is in integration)."""

from __future__ import annotations

from streaming.pipeline import pieces_to_retry, worker_died


def test_a_dead_worker_is_told_apart_from_other_failures() -> None:
    died = Exception(
        "An error occurred while calling o79.save.\n: org.apache.spark.SparkException: Job aborted due to stage "
        "failure: ... org.apache.spark.SparkException: Python worker exited unexpectedly (crashed)."
    )
    assert worker_died(died)
    assert not worker_died(Exception("org.apache.kafka.common.errors.TimeoutException: Topic not present"))


def test_pieces_halve_down_to_single_messages() -> None:
    rows: list = list(range(5))
    assert pieces_to_retry(rows) == [[2, 3, 4], [0, 1]]
    assert pieces_to_retry([7]) == []
    # Depth first, every message ends alone exactly once if every piece keeps failing.
    pending, singles = [rows], []
    while pending:
        piece = pending.pop()
        if len(piece) == 1:
            singles.append(piece[0])
        pending.extend(pieces_to_retry(piece))
    assert sorted(singles) == rows
