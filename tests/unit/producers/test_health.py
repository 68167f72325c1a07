"""The feeds' /metrics, /healthz and /readyz (`producers.health`): readiness from the running feed, counts read at
scrape time, the endpoint served only when CXR_FEED_METRICS_PORT is set, and each feed wiring itself to it."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fake_publisher import FakePublisher
from producers import pacs, scp
from producers.health import FeedHealthError, FeedStatus, feed_health
from producers.orthanc import OrthancFeed, follow
from producers.pacs import ChestFilter, CursorStore, Tally
from producers.publish import ReferencePublisher
from producers.scp import Counts
from streaming.settings import Settings

URL = "http://orthanc.example:8042"


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class PacsLike:
    """What `FeedStatus.follow_pacs` reads of a feed."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.answered_at: float | None = None


class ReceiverLike:
    def __init__(self) -> None:
        self.counts = Counts()


def samples(status: FeedStatus) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(status)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_pacs_feed_is_ready_while_its_server_answers() -> None:
    clock = FakeClock()
    status = FeedStatus("orthanc", stale_after_s=60.0, clock=clock)
    assert status.readiness() == (False, "starting: the server has not answered yet")
    feed = PacsLike()
    status.follow_pacs(feed)  # type: ignore[arg-type]
    assert not status.readiness()[0]  # following, but no answer yet
    feed.answered_at = clock.now
    assert status.readiness() == (True, "ok")
    clock.now += 60.0
    assert status.readiness() == (True, "ok")  # exactly at the limit is still fresh
    clock.now += 30.0
    assert status.readiness() == (False, "no answer from the server for 90 s")
    feed.answered_at = clock.now  # the PACS is back
    assert status.readiness() == (True, "ok")


def test_a_slow_poll_interval_is_not_taken_for_an_outage() -> None:
    assert FeedStatus.for_settings(Settings.load(ready_stale_after_s=120), "dicomweb").stale_after_s == 120
    slow = Settings.load(ready_stale_after_s=120, feed_poll_interval_s=300)
    assert FeedStatus.for_settings(slow, "dicomweb").stale_after_s == 900


def test_the_receiver_is_ready_once_it_listens() -> None:
    status = FeedStatus("scp", stale_after_s=1.0)
    assert not status.readiness()[0]
    status.follow_receiver(ReceiverLike())  # type: ignore[arg-type]
    assert status.readiness() == (True, "ok")


def test_counts_are_read_from_the_feed_when_scraped() -> None:
    clock = FakeClock()
    status = FeedStatus("orthanc", stale_after_s=60.0, clock=clock, wall_clock=lambda: 1_700_000_000.0)
    assert samples(status) == {("cxr_feed_ready", (("feed", "orthanc"),)): 0.0}  # nothing counted before it runs
    feed = PacsLike()
    status.follow_pacs(feed)  # type: ignore[arg-type]
    feed.tally.add(Tally(published=3, not_chest=2, gone=1))
    feed.answered_at = clock.now - 5.0
    found = samples(status)
    assert found[("cxr_feed_instances_total", (("feed", "orthanc"), ("outcome", "published")))] == 3
    assert found[("cxr_feed_instances_total", (("feed", "orthanc"), ("outcome", "not_chest")))] == 2
    assert found[("cxr_feed_instances_total", (("feed", "orthanc"), ("outcome", "unusable")))] == 0
    assert found[("cxr_feed_ready", (("feed", "orthanc"),))] == 1
    assert found[("cxr_feed_last_answer_timestamp_seconds", (("feed", "orthanc"),))] == 1_700_000_000.0 - 5.0
    feed.tally.add(Tally(published=1))
    assert samples(status)[("cxr_feed_instances_total", (("feed", "orthanc"), ("outcome", "published")))] == 4


def test_the_receivers_counts_by_outcome() -> None:
    status = FeedStatus("scp", stale_after_s=1.0)
    receiver = ReceiverLike()
    status.follow_receiver(receiver)  # type: ignore[arg-type]
    receiver.counts.published, receiver.counts.refused = 7, 1
    found = samples(status)
    assert found[("cxr_feed_instances_total", (("feed", "scp"), ("outcome", "published")))] == 7
    assert found[("cxr_feed_instances_total", (("feed", "scp"), ("outcome", "refused")))] == 1
    assert found[("cxr_feed_instances_total", (("feed", "scp"), ("outcome", "stored_only")))] == 0
    assert not any(name == "cxr_feed_last_answer_timestamp_seconds" for name, _ in found)


# ------------------------------------------------------------------------------------------------- serving


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served() -> Iterator[tuple[str, FeedStatus]]:
    port = free_port()
    with feed_health(Settings.load(feed_metrics_port=port, metrics_host="127.0.0.1"), "orthanc") as status:
        yield f"http://127.0.0.1:{port}", status
    with pytest.raises(OSError):  # stopped with the block
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_the_endpoint_serves_probes_and_metrics(served: tuple[str, FeedStatus]) -> None:
    base, status = served
    assert get(f"{base}/healthz") == (200, "ok\n")
    status_code, body = get(f"{base}/readyz")
    assert status_code == 503 and "not answered" in body
    feed = PacsLike()
    status.follow_pacs(feed)  # type: ignore[arg-type]
    feed.answered_at = time.monotonic()
    feed.tally.published = 2
    assert get(f"{base}/readyz") == (200, "ok\n")
    status_code, body = get(f"{base}/metrics")
    assert status_code == 200 and 'cxr_feed_instances_total{feed="orthanc",outcome="published"} 2.0' in body


def test_no_port_no_endpoint() -> None:
    with feed_health(Settings.load(), "orthanc") as status:  # the default: the feeds serve nothing
        assert Settings.load().feed_metrics_port is None
        assert status.readiness()[0] is False


def test_a_port_that_cannot_be_bound_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings.load(feed_metrics_port=port, metrics_host="127.0.0.1")
        with (
            pytest.raises(FeedHealthError, match=f"127.0.0.1:{port} .*CXR_FEED_METRICS_PORT"),
            feed_health(settings, "scp"),
        ):
            pytest.fail("the feed must not start")


# ------------------------------------------------------------------------------------ the feeds report in


class Orthanc:
    """Enough of Orthanc for one empty page of changes."""

    def get_json(self, url: str, params: Mapping[str, Any] | None = None, *, accept: str = "") -> Any:
        return {"Changes": [], "Done": True, "Last": 0}


def test_a_pacs_feed_notes_each_answer() -> None:
    store = CursorStore.for_source(Path("/nonexistent"), "orthanc", URL, "cxr.orthanc-cursor/v1")
    feed = OrthancFeed(Orthanc(), URL, store, ChestFilter(frozenset({"DX"}), frozenset()))
    assert feed.answered_at is None
    before = time.monotonic()
    assert feed.get(lambda: 42) == 42
    assert feed.answered_at is not None and feed.answered_at >= before


def test_follow_hands_the_running_feed_to_its_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = FakePublisher()

    class Connected:
        def __enter__(self) -> FakePublisher:
            return publisher

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(pacs, "PacsHttp", lambda session, timeout_s: Orthanc())
    monkeypatch.setattr(ReferencePublisher, "for_settings", lambda settings: Connected())
    settings = Settings.load(state_dir=tmp_path, feed_poll_interval_s=0.01)
    status = FeedStatus.for_settings(settings, "orthanc")
    deadline = time.monotonic() + 5
    follow(
        settings,
        URL,
        begin="now",
        stop=lambda: status.readiness()[0] or time.monotonic() > deadline,
        watch=status.follow_pacs,
    )
    assert status.readiness() == (True, "ok")


def test_the_receiver_hands_itself_to_its_status_once_it_listens(tmp_path: Path) -> None:
    root = tmp_path / "root"
    settings = Settings.load(allowed_roots=[root], scp_storage=root / "scp", scp_port=free_port())
    status = FeedStatus.for_settings(settings, "scp")
    deadline = time.monotonic() + 10
    scp.serve(
        settings,
        stop=lambda: status.readiness()[0] or time.monotonic() > deadline,
        publisher=FakePublisher(),
        watch=status.follow_receiver,
    )
    assert status.readiness() == (True, "ok")


def test_the_command_exits_2_when_its_health_port_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from streaming import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("CXR_FEED_METRICS_PORT", str(taken.getsockname()[1]))
        monkeypatch.setenv("CXR_METRICS_HOST", "127.0.0.1")
        monkeypatch.setenv("CXR_STATE_DIR", str(tmp_path))
        monkeypatch.setattr(pacs, "PacsHttp", lambda session, timeout_s: pytest.fail("the PACS was asked"))
        assert cli.main(["produce", "orthanc", URL]) == cli.EXIT_CONFIG
    err = capfd.readouterr().err
    assert "FeedHealthError" in err and "(CXR_FEED_METRICS_PORT)" in err
