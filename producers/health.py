"""`/metrics`, `/healthz` and `/readyz` of a feed (`cxr produce orthanc|dicomweb|scp`), on `CXR_FEED_METRICS_PORT`.

The feeds run unattended in pods; without an endpoint a feed that cannot reach its PACS looks exactly like one
with nothing to announce. So they serve the scoring job's own endpoint (`streaming.metrics.HealthServer`) over
a registry of their own, read at scrape time from what the feed already counts (`Tally`, the receiver's
`Counts`): nothing in the feeds' loops changes for it.

- `/healthz`: the process answers (liveness).
- `/readyz`: a PACS feed is ready while its server answered within `CXR_READY_STALE_AFTER_S` (at least three
  poll intervals): a PACS that is away is retried for as long as it takes, and this is where that shows. The
  C-STORE receiver is ready once it listens (it refuses associations itself, in DICOM, when its storage is low).
- `/metrics`: `cxr_feed_instances_total{feed, outcome}` (published, and why others were not),
  `cxr_feed_ready{feed}`, and for the PACS feeds `cxr_feed_last_answer_timestamp_seconds{feed}`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streaming.metrics import HealthPortError, serving_health
from streaming.settings import Settings

if TYPE_CHECKING:
    from producers.pacs import PacsFeed
    from producers.scp import Receiver

log = logging.getLogger(__name__)


class FeedHealthError(HealthPortError):
    """The feed's health port cannot be served: exit code 2."""


class FeedStatus(Collector):
    """What one feed's `/readyz` and `/metrics` say, read from the running feed when asked.

    Until `follow_pacs` or `follow_receiver` is called the feed is starting: not ready, nothing counted."""

    def __init__(
        self,
        feed: str,
        stale_after_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.feed = feed
        self.stale_after_s = stale_after_s
        self._clock, self._wall_clock = clock, wall_clock
        self._counts: Callable[[], Mapping[str, int]] = dict
        self._answered_at: Callable[[], float | None] = lambda: None
        self._listening = False
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings, feed: str) -> FeedStatus:
        """Stale after `ready_stale_after_s`, but never within three polls: a slow poll interval is not an outage."""
        return cls(feed, max(settings.ready_stale_after_s, 3 * settings.feed_poll_interval_s))

    def follow_pacs(self, feed: PacsFeed[Any]) -> None:
        """Report a PACS feed: its tally, and when its server last answered."""
        with self._lock:
            self._counts = lambda: asdict(feed.tally)
            self._answered_at = lambda: feed.answered_at

    def follow_receiver(self, receiver: Receiver) -> None:
        """Report the C-STORE receiver, which listens by now: its counts."""
        with self._lock:
            self._counts = lambda: asdict(receiver.counts)
            self._listening = True

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            listening, answered_at = self._listening, self._answered_at()
        if listening:
            return True, "ok"
        if answered_at is None:
            return False, "starting: the server has not answered yet"
        age = self._clock() - answered_at
        if age > self.stale_after_s:
            return False, f"no answer from the server for {age:.0f} s"
        return True, "ok"

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, answered_at = dict(self._counts()), self._answered_at()
        instances = CounterMetricFamily(
            "cxr_feed_instances",
            "Instances the feed looked at: published, or why not (not_chest, gone, unusable; stored_only, refused)",
            labels=["feed", "outcome"],
        )
        for outcome, count in sorted(counts.items()):
            instances.add_metric([self.feed, outcome], count)
        yield instances
        ready = GaugeMetricFamily("cxr_feed_ready", "1 while /readyz says ready", labels=["feed"])
        ready.add_metric([self.feed], 1.0 if self.readiness()[0] else 0.0)
        yield ready
        if answered_at is not None:
            last = GaugeMetricFamily(
                "cxr_feed_last_answer_timestamp_seconds", "Unix time the PACS last answered the feed", labels=["feed"]
            )
            last.add_metric([self.feed], self._wall_clock() - (self._clock() - answered_at))
            yield last


@contextmanager
def feed_health(settings: Settings, feed: str) -> Iterator[FeedStatus]:
    """The feed's status, served on `CXR_FEED_METRICS_PORT` while the block runs (not served when it is unset).

    Raises `FeedHealthError` when the port cannot be bound, before the feed contacts anyone."""
    status = FeedStatus.for_settings(settings, feed)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(status)
    with serving_health(
        registry,
        status.readiness,
        settings.metrics_host,
        settings.feed_metrics_port,
        "CXR_FEED_METRICS_PORT",
        FeedHealthError,
    ):
        yield status
