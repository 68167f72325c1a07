"""Wait figures (worklist/waits.py): nearest-rank percentiles, checked by hand, so the page and the simulator
report observed waits that anyone can recompute."""

from __future__ import annotations

import pytest

from worklist.waits import WaitSummary, nearest_rank, summarize


def test_nearest_rank_by_hand() -> None:
    values = [float(v) for v in range(1, 21)]  # 1 … 20
    assert nearest_rank(values, 0.95) == 19.0  # rank ceil(0.95 x 20) = 19
    assert nearest_rank(values, 0.5) == 10.0  # rank ceil(0.5 x 20) = 10
    assert nearest_rank(values, 1.0) == 20.0
    assert nearest_rank(values, 0.0) == 1.0  # rank never below 1
    hundred = [float(v) for v in range(1, 101)]
    assert nearest_rank(hundred, 0.95) == 95.0
    assert nearest_rank([7.0], 0.95) == 7.0


def test_p95_of_a_few_values_is_the_maximum() -> None:
    # with fewer than 20 values, rank ceil(0.95 n) = n: the 95th percentile is an observed maximum
    assert summarize([3.0, 1.0, 2.0]).p95 == 3.0
    assert summarize([float(v) for v in range(1, 20)]).p95 == 19.0  # n = 19
    assert summarize([float(v) for v in range(1, 21)]).p95 == 19.0  # n = 20: the first value below the max


def test_summary_by_hand() -> None:
    summary = summarize([600.0, 0.0, 60.0, 120.0])  # unsorted on purpose
    assert summary == WaitSummary(count=4, mean=195.0, median=60.0, p95=600.0, max=600.0)
    # median by nearest rank: rank ceil(0.5 x 4) = 2 → the second smallest, an observed value
    assert summary.as_dict() == {"count": 4, "mean": 195.0, "median": 60.0, "p95": 600.0, "max": 600.0}


def test_odd_count_median_is_the_middle() -> None:
    assert summarize([5.0, 1.0, 3.0]).median == 3.0


def test_empty_input_has_a_count_and_no_figures() -> None:
    summary = summarize([])
    assert summary == WaitSummary(0, None, None, None, None)
    assert summary.as_dict() == {"count": 0, "mean": None, "median": None, "p95": None, "max": None}


def test_summarize_does_not_reorder_the_callers_list() -> None:
    waits = [3.0, 1.0, 2.0]
    summarize(waits)
    assert waits == [3.0, 1.0, 2.0]


@pytest.mark.parametrize("n", [1, 2, 19, 20, 21, 99, 100, 101, 1000])
def test_percentiles_are_observed_values_in_order(n: int) -> None:
    values = [float(v * 7 % 101) for v in range(n)]
    s = summarize(values)
    assert s.median in values and s.p95 in values
    assert s.mean is not None and s.median is not None and s.p95 is not None and s.max is not None
    assert min(values) <= s.median <= s.p95 <= s.max == max(values)
