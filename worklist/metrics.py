"""Prometheus gauges, so that a stalled scorer or an overdue STAT study raises an alert with nobody watching
the page."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worklist.live import EventFeed
from worklist.store import Verdict, WorklistStore
from worklist.views import PRIORITY_FILTERS

#: The head of the queue a scrape reads: ordering the open studies is the one cost that grows with the queue
#: (and holds the store's lock), so a scrape renders no more than this many of them.
SCRAPED = 500


class WorklistCollector(Collector):
    """The worklist's gauges, read from the store at scrape time (nothing to keep in step)."""

    def __init__(self, store: WorklistStore, feed: EventFeed) -> None:
        self.store = store
        self.feed = feed

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not touch the store

    def collect(self) -> Iterable[Metric]:
        now = datetime.now(UTC)
        studies = GaugeMetricFamily("cxr_worklist_studies", "Studies on the worklist, by status.", labels=["status"])
        for status, count in sorted(self.store.counts().items()):
            studies.add_metric([status], count)
        yield studies
        # The head of the queue, never all of it (rendering 20,000 open studies would hold the store's lock for
        # half a second a scrape). In reading order every STAT study and every overdue one comes before the
        # rest, so the overdue count and the STAT figures are exact while those number under SCRAPED; the other
        # figures by class are exact while the whole queue fits, and lower bounds beyond.
        _, items = self.store.queue(now, limit=SCRAPED)
        yield GaugeMetricFamily(
            "cxr_worklist_scraped_open_studies",
            f"Open studies the figures by priority and the overdue count cover: the head of the queue, at most"
            f" {SCRAPED}. Below the open studies of cxr_worklist_studies, those figures are lower bounds.",
            value=len(items),
        )
        open_by = GaugeMetricFamily(
            "cxr_worklist_open_studies",
            f"Open (unread or claimed) studies, by priority, among the first {SCRAPED} in reading order.",
            labels=["priority"],
        )
        oldest = GaugeMetricFamily(
            "cxr_worklist_oldest_wait_seconds",
            f"How long the longest-waiting open study has waited, by priority, among the first {SCRAPED} in"
            " reading order.",
            labels=["priority"],
        )
        for name in PRIORITY_FILTERS:
            mine = [i for i in items if (i["priority"] or "UNSCORED") == name]
            open_by.add_metric([name], len(mine))
            arrived = [datetime.fromisoformat(i["arrived_at"]) for i in mine]
            oldest.add_metric([name], max(((now - a).total_seconds() for a in arrived), default=0.0))
        yield open_by
        yield oldest
        overdue = sum(1 for i in items if i["overdue"])
        yield GaugeMetricFamily(
            "cxr_worklist_overdue_studies",
            f"Open studies past their maximum wait, among the first {SCRAPED} in reading order.",
            value=overdue,
        )
        scoring = self.feed.scoring()
        stalled = 1.0 if scoring["state"] == "stalled" else 0.0
        yield GaugeMetricFamily(
            "cxr_worklist_scoring_stalled", "1 while images wait for results and none arrive.", value=stalled
        )
        yield GaugeMetricFamily(
            "cxr_worklist_pending_images", "Images announced but not yet scored.", value=scoring["pending"]
        )
        connected = 1.0 if scoring["kafka"]["connected"] else 0.0
        yield GaugeMetricFamily("cxr_worklist_kafka_connected", "1 while the consumer reaches Kafka.", value=connected)
        total_letters, _ = self.store.dead_letters(limit=0)
        yield GaugeMetricFamily("cxr_worklist_dead_letters", "Dead letters kept for the page.", value=total_letters)
        feedback = GaugeMetricFamily(
            "cxr_worklist_feedback",
            "Readers' verdicts on the AI's finding (latest per reader and study), by model version.",
            labels=["model", "version", "verdict"],
        )
        for item in self.store.feedback_summary():
            for verdict in Verdict:
                model = item["model"]
                feedback.add_metric([model["name"] or "", model["version"] or "", verdict.value], item[verdict.value])
        yield feedback
        yield GaugeMetricFamily("cxr_worklist_event_clients", "Pages following live updates.", value=self.feed.clients)
