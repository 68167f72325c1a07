"""Waits between retries of something that is away (a PACS, a Kafka broker): exponential, capped, reset on success.

Shared by the PACS feeds and the worklist's consumer, so that every part of cxr-stream backs off the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    """`first_s`, doubling with each failure in a row, at most `max_s`; `reset()` once the other side answers."""

    first_s: float = 1.0
    max_s: float = 60.0
    #: failures in a row so far
    failures: int = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.first_s * 2 ** min(self.failures, 62))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self.failures > 0
