"""Wait-time figures, computed one way for the page's "today" panel and for the simulator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WaitSummary:
    """Waits in seconds: how many, their mean, median, 95th percentile (nearest rank) and maximum."""

    count: int
    mean: float | None
    median: float | None
    p95: float | None
    max: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The q-th quantile by nearest rank: an observed value, easy to check by hand."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(waits: Sequence[float]) -> WaitSummary:
    if not waits:
        return WaitSummary(0, None, None, None, None)
    values = sorted(waits)
    return WaitSummary(
        len(values), sum(values) / len(values), nearest_rank(values, 0.5), nearest_rank(values, 0.95), values[-1]
    )
