"""The worklist's HTTP API against a real SQLite file: records go in the way the consumer puts them (contract
JSON read by `worklist.events`, applied with `store.apply`), requests go through FastAPI's TestClient, and the
event stream is read both from its generator and over a real socket from uvicorn."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
import uvicorn
from PIL import Image
from pydantic import SecretStr

from streaming.contracts import Reference, Source, build_dead_letter, build_result, rfc3339
from streaming.errors import ErrorCode, FetchError
from streaming.settings import Settings
from worklist import events
from worklist import store as store_module
from worklist.api import accepted_hosts, create_app, host_name
from worklist.live import EventFeed, EventStreamResponse
from worklist.store import WorklistStore
from worklist.views import local_midnight, parse_priorities

with warnings.catch_warnings():  # Starlette nudges towards httpx2; httpx is what the project pins
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

MODEL = {"name": "pneumonia-xception", "version": "0.3.0"}
NORMAL = ("NORMAL",)

# Messages as the pipeline writes them --------------------------------------------------------------------------


def reference(
    event_id: str, study_uid: str | None = None, *, uri: str = "file:///images/x.jpeg", ago_s: float = 0
) -> Reference:
    sent = datetime.now(UTC) - timedelta(seconds=ago_s)
    return Reference(event_id=event_id, uri=uri, study_uid=study_uid, accession=None, sent_at=rfc3339(sent))


def result_json(
    event_id: str,
    study_uid: str | None = None,
    *,
    priority: str = "ROUTINE",
    pneumonia: float = 0.1,
    ago_s: float = 0,
    model: dict[str, str] = MODEL,
    uri: str = "file:///images/x.jpeg",
) -> str:
    ref = reference(event_id, study_uid, uri=uri, ago_s=ago_s)
    body = build_result(
        ref,
        model=model,
        scores={"NORMAL": 1 - pneumonia, "PNEUMONIA": pneumonia},
        top_finding="PNEUMONIA" if pneumonia >= 0.5 else None,
        priority=priority,
        sent_at=datetime.now(UTC) - timedelta(seconds=ago_s),
        scored_at=datetime.now(UTC),
    )
    return json.dumps(body)


def dead_letter_json(event_id: str, offset: int, *, reason: str = "The file does not exist.") -> str:
    ref = reference(event_id, f"9.9.{offset}")
    body = build_dead_letter(
        FetchError(ErrorCode.NOT_FOUND, reason),
        payload=ref.to_json(),
        source=Source("cxr.references", 0, offset),
        event_id=event_id,
        failed_at=datetime.now(UTC),
    )
    return json.dumps(body)


def now_ms() -> int:
    return int(time.time() * 1000)


def add_results(store: WorklistStore, *values: str) -> None:
    store.apply([events.read_result(v, now_ms(), NORMAL) for v in values], {})


def add_references(store: WorklistStore, *refs: Reference) -> None:
    store.apply([events.read_reference(r.to_json(), now_ms()) for r in refs], {})


def add_dead_letter(store: WorklistStore, value: str, offset: int) -> None:
    letter, image = events.read_dead_letter(value, now_ms(), "cxr.dead-letter", 0, offset)
    store.apply([letter, *([image] if image else [])], {})


# Fixtures ---------------------------------------------------------------------------------------------------


class FakeConsumer:
    def __init__(self) -> None:
        self.connected = True
        self.error: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "last_poll_at": datetime.now(UTC),
            "records": 3,
            "unreadable": 0,
            "error": self.error,
        }


@pytest.fixture
def image_root(tmp_path: Path, sample_jpegs: list[Path]) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(sample_jpegs[0], root / "chest.jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def settings(tmp_path: Path, image_root: Path) -> Settings:
    return Settings.load(
        allowed_roots=[image_root],
        worklist_db=tmp_path / "w.db",
        worklist_scoring_stale_after_s=60.0,
        dicomweb_allowed_hosts=["pacs.example:8042"],
        # TestClient's Host, and a proxy's public name (test_changes_from_the_page_itself_...)
        worklist_allowed_hosts=["testserver", "worklist.hospital.example"],
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[WorklistStore]:
    store = WorklistStore(settings.worklist_db)
    yield store
    store.close()


@pytest.fixture
def consumer() -> FakeConsumer:
    return FakeConsumer()


def fast_feed(store: WorklistStore, consumer: FakeConsumer, **kwargs: Any) -> EventFeed:
    options: dict[str, Any] = {"poll_s": 0.02, "scoring_every_s": 0.05} | kwargs
    return EventFeed(store, consumer.status, timedelta(seconds=60), **options)


@pytest.fixture
def client(store: WorklistStore, settings: Settings, consumer: FakeConsumer) -> Iterator[TestClient]:
    app = create_app(store, settings, consumer.status, feed=fast_feed(store, consumer))
    with TestClient(app) as client:
        yield client


@pytest.fixture
def queue(store: WorklistStore) -> dict[str, str]:
    """Four studies, one per class, and one without a study UID (keyed by its event id)."""
    add_results(
        store,
        result_json("e-routine", "1.1", priority="ROUTINE", pneumonia=0.2),
        result_json("e-stat", "1.2", priority="STAT", pneumonia=0.95),
        result_json("e-urgent", "1.3", priority="URGENT", pneumonia=0.7),
        result_json("e-urgent-2", "1.3", priority="ROUTINE", pneumonia=0.3),
    )
    add_references(store, reference("e-waiting", "1.4"))
    add_results(store, result_json("ev/no uid?#%", None, priority="ROUTINE", pneumonia=0.05))
    return {"STAT": "1.2", "URGENT": "1.3", "UNSCORED": "1.4", "ROUTINE": "1.1", "NO_UID": "ev/no uid?#%"}


def path_of(key: str) -> str:
    return "/api/studies/" + quote(key, safe="")


# The queue --------------------------------------------------------------------------------------------------

CONTRACT_FIELDS = ("study_uid", "priority", "top_finding", "score", "arrived_at", "overdue", "status", "event_ids")


def test_queue_is_in_reading_order_with_the_contract_fields(
    client: TestClient, queue: dict[str, str], store: WorklistStore
) -> None:
    page = client.get("/api/studies").json()
    keys = [item["key"] for item in page["items"]]
    # STAT, URGENT, then the unscored one, then ROUTINE by strongest finding (0.2 before 0.05)
    assert keys == [queue["STAT"], queue["URGENT"], queue["UNSCORED"], queue["ROUTINE"], queue["NO_UID"]]
    assert [item["position"] for item in page["items"]] == [1, 2, 3, 4, 5]
    for item in page["items"]:
        assert set(CONTRACT_FIELDS) | {"model"} <= set(item)
        assert item["overdue"] is False and item["status"] == "unread"
        datetime.fromisoformat(item["arrived_at"])
    stat, urgent, unscored = page["items"][:3]
    assert stat["study_uid"] == "1.2" and stat["priority"] == "STAT" and stat["top_finding"] == "PNEUMONIA"
    assert stat["score"] == pytest.approx(0.95) and stat["model"] == MODEL and stat["event_ids"] == ["e-stat"]
    assert urgent["priority"] == "URGENT" and sorted(urgent["event_ids"]) == ["e-urgent", "e-urgent-2"]
    assert urgent["images"] == {"total": 2, "scored": 2, "failed": 0, "pending": 0}
    assert unscored["priority"] is None and unscored["model"] is None and unscored["score"] is None
    no_uid = page["items"][4]
    assert no_uid["study_uid"] is None and no_uid["key"] == "ev/no uid?#%"
    assert page["total"] == 5 and page["offset"] == 0 and page["limit"] == 100
    assert page["last_event_id"] == store.change_range()[1] > 0
    assert page["scoring"]["state"] == "live" and page["scoring"]["pending"] == 1
    assert page["scoring"]["kafka"]["connected"] is True and page["scoring"]["kafka"]["records"] == 3
    datetime.fromisoformat(page["now"])


def test_a_study_past_its_maximum_wait_rises_and_is_marked_overdue(client: TestClient, store: WorklistStore) -> None:
    add_results(
        store,
        result_json("stat", "2.1", priority="STAT", pneumonia=0.95),
        result_json("urgent", "2.3", priority="URGENT", pneumonia=0.8),
        result_json("old-routine", "2.2", priority="ROUTINE", pneumonia=0.1, ago_s=5 * 3600),  # cap: 4 h
    )
    items = client.get("/api/studies").json()["items"]
    # escalated above everything but STAT
    assert [(i["key"], i["overdue"]) for i in items] == [("2.1", False), ("2.2", True), ("2.3", False)]
    assert datetime.fromisoformat(items[1]["due_at"]) < datetime.now(UTC)


def test_filters_and_paging(client: TestClient, queue: dict[str, str]) -> None:
    def keys(query: str) -> list[str]:
        response = client.get(f"/api/studies?{query}")
        assert response.status_code == 200, response.text
        return [item["key"] for item in response.json()["items"]]

    assert keys("priority=STAT,urgent") == [queue["STAT"], queue["URGENT"]]
    assert keys("priority=UNSCORED&priority=ROUTINE") == [queue["UNSCORED"], queue["ROUTINE"], queue["NO_UID"]]
    assert keys("finding=pneumonia") == [queue["STAT"], queue["URGENT"]]
    assert keys("offset=1&limit=2") == [queue["URGENT"], queue["UNSCORED"]]
    page = client.get("/api/studies?priority=ROUTINE&limit=1").json()
    assert page["total"] == 2 and page["limit"] == 1 and page["items"][0]["position"] == 4  # place in the whole queue
    client.post(path_of(queue["STAT"]) + "/read", json={"reader": "Dr A"})
    client.post(path_of(queue["ROUTINE"]) + "/dismiss", json={"reason": "duplicate"})
    assert keys("status=read") == [queue["STAT"]]
    assert keys("status=dismissed") == [queue["ROUTINE"]]
    assert keys("status=all")[:3] == [queue["URGENT"], queue["UNSCORED"], queue["NO_UID"]]  # open ones first
    assert len(keys("status=all")) == 5
    assert client.get("/api/studies?priority=LOW").status_code == 422
    assert client.get("/api/studies?limit=501").status_code == 422
    assert client.get("/api/studies?status=everything").status_code == 422
    assert client.get("/api/studies?offset=-1").status_code == 422


def test_parse_priorities() -> None:
    assert parse_priorities(None) is None and parse_priorities(["", " "]) is None
    assert parse_priorities(["stat, Urgent", "UNSCORED"]) == ["STAT", "URGENT", "UNSCORED"]
    with pytest.raises(ValueError, match="unknown priority"):
        parse_priorities(["STAT,HIGH"])


def test_one_study_and_unknown_ones(client: TestClient, queue: dict[str, str], store: WorklistStore) -> None:
    add_dead_letter(store, dead_letter_json("e-waiting-2", 7), 7)
    study = client.get(path_of(queue["URGENT"])).json()
    assert study["key"] == "1.3" and study["position"] == 2 and len(study["image_list"]) == 2
    assert {i["state"] for i in study["image_list"]} == {"scored"}
    assert study["image_list"][0]["scores"].keys() == {"NORMAL", "PNEUMONIA"}
    failed = client.get(path_of("9.9.7")).json()
    assert failed["image_list"][0]["error"] == {
        "stage": "fetch",
        "code": "not_found",
        "reason": "The file does not exist.",
    }
    for method, suffix in [("GET", ""), ("POST", "/read"), ("POST", "/release"), ("GET", "/thumbnail")]:
        response = client.request(method, path_of("no-such-study") + suffix)
        assert response.status_code == 404, (method, suffix)
        assert "no study" in response.json()["detail"]


def test_any_printable_key_works_in_the_path(client: TestClient, store: WorklistStore) -> None:
    # (a key that is exactly "." or ".." cannot be a path segment: URL parsers resolve it, encoded or not)
    odd = ["ev/1", "a b?c#d", "100%", "%2F", "a/../b", "...", "é✓ü", "x/thumbnail", "x/read", "+&=;,:@'\"<>"]
    add_results(store, *(result_json(key, None) for key in odd))
    for key in odd:
        assert client.get(path_of(key)).json()["key"] == key
        claimed = client.post(path_of(key) + "/claim", json={"reader": "Dr A"})
        assert claimed.status_code == 200 and claimed.json()["key"] == key
        assert client.post(path_of(key) + "/read").json()["status"] == "read"


def test_every_action_and_its_conflicts(client: TestClient, queue: dict[str, str]) -> None:
    url = path_of(queue["URGENT"])
    claimed = client.post(url + "/claim", json={"reader": "Dr A"})
    assert claimed.status_code == 200 and claimed.json()["status"] == "claimed"
    assert claimed.json()["claimed_by"] == "Dr A"
    assert client.post(url + "/claim", json={"reader": " Dr A "}).status_code == 200  # one's own claim again
    taken = client.post(url + "/claim", json={"reader": "Dr B"})
    assert taken.status_code == 409 and "Dr A" in taken.json()["detail"]
    assert client.post(url + "/claim").status_code == 422  # who claims must be said
    assert client.post(url + "/claim", json={}).status_code == 422
    assert client.post(url + "/release").json()["status"] == "unread"
    read = client.post(url + "/read", json={"reader": "Dr B"})
    assert read.json()["status"] == "read" and read.json()["closed_by"] == "Dr B" and read.json()["position"] is None
    again = client.post(url + "/read")
    assert again.status_code == 409 and "read" in again.json()["detail"]
    assert client.post(url + "/reopen").json()["status"] == "unread"
    assert client.post(url + "/reopen").status_code == 409
    dismissed = client.post(url + "/dismiss", json={"reader": "Dr C", "reason": "test image"})
    assert dismissed.json()["status"] == "dismissed"
    assert client.post(url + "/reopen", json={"reader": "Dr C"}).json()["status"] == "unread"

    other = path_of(queue["ROUTINE"])
    raised = client.post(other + "/priority", json={"priority": "STAT", "reader": "Dr A"}).json()
    assert raised["priority"] == "STAT" and raised["person_priority"] == "STAT" and raised["ai_priority"] == "ROUTINE"
    first_two = [i["key"] for i in client.get("/api/studies").json()["items"][:2]]
    assert first_two == [queue["STAT"], queue["ROUTINE"]]  # a person's STAT is read with the STATs
    back = client.post(other + "/priority", json={"priority": None}).json()
    assert back["priority"] == "ROUTINE" and back["person_priority"] is None
    assert client.post(other + "/priority", json={"priority": "LOW"}).status_code == 422
    assert client.post(other + "/priority", json={}).status_code == 422

    agreed = client.post(url + "/feedback", json={"verdict": "agree", "reader": "Dr A"}).json()
    assert agreed["feedback"][0]["verdict"] == "agree" and agreed["feedback"][0]["model"] == MODEL
    assert client.post(url + "/feedback", json={"verdict": "maybe"}).status_code == 422
    unscored = client.post(path_of(queue["UNSCORED"]) + "/feedback", json={"verdict": "agree"})
    assert unscored.status_code == 409  # no AI finding to judge

    assert client.post(url + "/read", json={"reader": "x" * 65}).status_code == 422
    assert client.post(url + "/read", json={"reader": "bad\nname"}).status_code == 422
    assert client.post(url + "/read", json={"reader": "Dr A", "extra": 1}).status_code == 422
    assert client.post(url + "/dismiss", json={"reason": "r" * 201}).status_code == 422


def test_feedback_is_summed_per_model_version(client: TestClient, store: WorklistStore) -> None:
    add_results(
        store,
        result_json("a", "3.1", priority="STAT", pneumonia=0.95),
        result_json("b", "3.2", priority="URGENT", pneumonia=0.6),
        result_json(
            "c", "3.3", priority="URGENT", pneumonia=0.6, model={"name": "pneumonia-xception", "version": "0.4.0"}
        ),
    )
    verdicts = [("3.1", "agree", "A"), ("3.1", "disagree", "A"), ("3.1", "agree", "B"), ("3.2", "disagree", "A")]
    for key, verdict, who in [*verdicts, ("3.3", "agree", "A")]:
        assert client.post(path_of(key) + "/feedback", json={"verdict": verdict, "reader": who}).status_code == 200
    summary = {(i["model"]["version"]): i for i in client.get("/api/feedback").json()["items"]}
    # each reader's latest verdict per study counts once: A disagrees on 3.1 and 3.2, B agrees on 3.1
    assert summary["0.3.0"] | {"agreement": None} == {"model": MODEL, "agree": 1, "disagree": 2, "agreement": None}
    assert summary["0.3.0"]["agreement"] == pytest.approx(1 / 3)
    assert summary["0.4.0"]["agree"] == 1 and summary["0.4.0"]["agreement"] == 1.0


def test_dead_letters_newest_first_and_paged(client: TestClient, store: WorklistStore) -> None:
    for offset in range(3):
        add_dead_letter(store, dead_letter_json(f"dl-{offset}", offset, reason=f"Reason {offset}."), offset)
    page = client.get("/api/dead-letters?limit=2").json()
    assert page["total"] == 3 and page["limit"] == 2 and len(page["items"]) == 2
    first = page["items"][0]
    assert first["stage"] == "fetch" and first["error"] == "not_found" and first["reason"].startswith("Reason")
    assert first["source"]["topic"] == "cxr.dead-letter"
    rest = client.get("/api/dead-letters?offset=2").json()["items"]
    assert len(rest) == 1
    assert {i["event_id"] for i in [*page["items"], *rest]} == {"dl-0", "dl-1", "dl-2"}
    assert client.get("/api/dead-letters?limit=0").status_code == 422


@pytest.mark.parametrize("path", ["/api/dead-letters", "/api/studies"])
def test_offsets_and_limits_beyond_any_page_are_refused_not_a_server_error(client: TestClient, path: str) -> None:
    for query in ("offset=99999999999999999999", "offset=1000000001", "limit=501", "offset=-1", "limit=0"):
        response = client.get(f"{path}?{query}")
        assert response.status_code == 422, query
    assert client.get(f"{path}?offset=1000000000").json()["items"] == []
    assert client.get("/api/events?last_event_id=99999999999999999999").status_code == 422


def test_stats_are_todays_waits_per_class(client: TestClient, store: WorklistStore) -> None:
    add_results(
        store,
        result_json("s", "4.1", priority="STAT", pneumonia=0.95, ago_s=30),
        result_json("r", "4.2", priority="ROUTINE", pneumonia=0.1, ago_s=10),
    )
    client.post(path_of("4.1") + "/read")
    stats = client.get("/api/stats").json()
    assert set(stats["waits"]) == {"STAT", "URGENT", "ROUTINE", "UNSCORED"}
    stat = stats["waits"]["STAT"]
    midnight = datetime.fromisoformat(stats["since"])
    if datetime.now(UTC) - midnight > timedelta(seconds=40):  # both arrived today (unless run just after midnight)
        assert stat["count"] == 1 and 29 <= stat["median"] <= stat["p95"] <= stat["max"] < 60
        assert stats["waits"]["ROUTINE"]["count"] == 1 and stats["waits"]["URGENT"]["count"] == 0
        assert stats["waits"]["URGENT"]["median"] is None
    assert stats["counts"] == {"unread": 1, "claimed": 0, "read": 1, "dismissed": 0}


def test_local_midnight_is_the_start_of_the_local_day() -> None:
    now = datetime.now(UTC)
    midnight = local_midnight(now)
    assert midnight <= now < midnight + timedelta(hours=25)
    local = midnight.astimezone()
    assert (local.hour, local.minute, local.second) == (0, 0, 0) and local.date() == now.astimezone().date()


def test_snapshot(client: TestClient, queue: dict[str, str], store: WorklistStore) -> None:
    add_dead_letter(store, dead_letter_json("dl", 1), 1)
    snapshot = client.get("/api/snapshot").json()
    assert snapshot["last_event_id"] == store.change_range()[1]
    assert snapshot["total"] == 6 and snapshot["items"][0]["key"] == queue["STAT"]
    assert [d["event_id"] for d in snapshot["dead_letters"]] == ["dl"]
    assert snapshot["scoring"]["kafka"]["connected"] is True


def test_health_and_readiness(client: TestClient, consumer: FakeConsumer, store: WorklistStore) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    consumer.connected, consumer.error = False, "no broker answers"
    lost = client.get("/readyz")
    assert lost.status_code == 503 and lost.json()["kafka"] == {
        "connected": False,
        "last_poll_at": lost.json()["kafka"]["last_poll_at"],
        "records": 3,
        "unreadable": 0,
        "error": "no broker answers",
    }
    assert client.get("/api/studies").json()["scoring"]["kafka"]["connected"] is False
    consumer.connected = True
    store.close()
    gone = client.get("/readyz")
    assert gone.status_code == 503 and gone.json()["store"] is False
    assert client.get("/healthz").status_code == 200


def test_readiness_when_the_consumer_cannot_say(store: WorklistStore, settings: Settings) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    with TestClient(create_app(store, settings, broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["kafka"]["connected"] is False


def test_metrics(client: TestClient, queue: dict[str, str], store: WorklistStore) -> None:
    client.post(path_of(queue["STAT"]) + "/feedback", json={"verdict": "agree", "reader": "A"})
    client.post(path_of(queue["ROUTINE"]) + "/read")
    add_dead_letter(store, dead_letter_json("dl", 1), 1)
    add_results(store, result_json("late", "5.1", priority="ROUTINE", ago_s=5 * 3600))
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    expected = [
        'cxr_worklist_studies{status="read"} 1.0',
        'cxr_worklist_studies{status="unread"} 6.0',
        'cxr_worklist_open_studies{priority="STAT"} 1.0',
        'cxr_worklist_open_studies{priority="UNSCORED"} 2.0',  # the waiting one and the dead-lettered one
        'cxr_worklist_open_studies{priority="ROUTINE"} 2.0',
        "cxr_worklist_overdue_studies 1.0",
        "cxr_worklist_scoring_stalled 0.0",
        "cxr_worklist_kafka_connected 1.0",
        "cxr_worklist_dead_letters 1.0",
        'cxr_worklist_feedback{model="pneumonia-xception",verdict="agree",version="0.3.0"} 1.0',
        'cxr_worklist_feedback{model="pneumonia-xception",verdict="disagree",version="0.3.0"} 0.0',
        "cxr_worklist_event_clients 0.0",
        'cxr_worklist_oldest_wait_seconds{priority="ROUTINE"}',
    ]
    for line in expected:
        assert line in text, line
    assert "cxr_worklist_scraped_open_studies 6.0" in text


def test_a_scrape_reads_the_head_of_the_queue_only(
    client: TestClient, store: WorklistStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordering and rendering every open study at each scrape would hold the store's lock for long."""
    limits: list[int] = []
    real = store.queue

    def queue(now: datetime, **kwargs: Any) -> tuple[int, list[dict[str, Any]]]:
        limits.append(kwargs.get("limit", 100))
        return real(now, **kwargs)

    monkeypatch.setattr(store, "queue", queue)
    monkeypatch.setattr("worklist.metrics.SCRAPED", 2)
    add_results(store, *(result_json(f"m{i}", f"12.{i}", priority="URGENT", ago_s=2 * 3600) for i in range(3)))
    text = client.get("/metrics").text
    assert limits == [2]
    assert "cxr_worklist_scraped_open_studies 2.0" in text and 'cxr_worklist_studies{status="unread"} 3.0' in text
    assert "cxr_worklist_overdue_studies 2.0" in text  # a lower bound, as the scraped count says


def test_openapi_lists_the_paths_and_typed_bodies(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = set(schema["paths"])
    for action in ("read", "claim", "release", "dismiss", "reopen", "priority", "feedback"):
        assert f"/api/studies/{{key}}/{action}" in paths
        assert "post" in schema["paths"][f"/api/studies/{{key}}/{action}"]
    expected = {"/api/studies", "/api/studies/{key}", "/api/studies/{key}/thumbnail", "/api/dead-letters"}
    expected |= {"/api/events", "/api/feedback", "/api/stats", "/api/snapshot", "/healthz", "/readyz", "/metrics"}
    assert expected <= paths
    bodies = schema["components"]["schemas"]
    reader = bodies["ClaimBody"]["properties"]["reader"]
    assert reader["maxLength"] == 64
    assert set(bodies["StudyItem"]["required"]) >= set(CONTRACT_FIELDS) | {"model"}


def test_the_page_and_its_files_are_served_with_safe_headers(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert (
        '<script src="/static/app.js"' in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    )
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from outside: it works offline
    assert client.get("/api/studies").headers["cache-control"] == "no-store"
    assert client.get("/api/studies").headers["x-content-type-options"] == "nosniff"


# Thumbnails -------------------------------------------------------------------------------------------------


def test_thumbnail_of_a_real_chest_x_ray(client: TestClient, store: WorklistStore, image_root: Path) -> None:
    add_results(store, result_json("img", "6.1", uri=(image_root / "chest.jpeg").as_uri()))
    first = client.get(path_of("6.1") + "/thumbnail")
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(first.content)) as image:
        assert image.format == "PNG" and max(image.size) == 256 and min(image.size) > 64
    (image_root / "chest.jpeg").unlink()  # the second one comes from the cache
    assert client.get(path_of("6.1") + "/thumbnail").content == first.content


@pytest.mark.parametrize(
    ("where", "status", "code"),
    [
        ("outside", 404, "forbidden_uri"),  # a real X-ray, but outside the allowed roots
        ("missing", 404, "not_found"),
        ("notes", 404, "unsupported_format"),
        ("http://10.0.0.1/dicom-web/studies/1/series/2/instances/3", 404, "forbidden_uri"),  # host not allowed
        ("ftp://pacs.example/x.dcm", 404, "unsupported_uri"),
        ("http://pacs.example:8042/dicom-web/studies/1/series/2/instances/3", 502, None),  # allowed, unreachable
    ],
)
def test_thumbnail_follows_the_scorers_rules(
    client: TestClient,
    store: WorklistStore,
    image_root: Path,
    tmp_path: Path,
    sample_jpegs: list[Path],
    where: str,
    status: int,
    code: str | None,
) -> None:
    outside = tmp_path / "outside" / "chest.jpeg"
    outside.parent.mkdir()
    shutil.copy(sample_jpegs[1], outside)
    uri = {
        "outside": outside.as_uri(),
        "missing": (image_root / "gone.jpeg").as_uri(),
        "notes": (image_root / "notes.txt").as_uri(),
    }.get(where, where)
    add_results(store, result_json("img", "7.1", uri=uri))
    response = client.get(path_of("7.1") + "/thumbnail")
    assert response.status_code == status, response.text
    body = response.json()
    if code is not None:
        assert body["code"] == code
    assert body["detail"] and str(tmp_path) not in response.text and "pacs.example" not in response.text


def test_thumbnail_of_a_study_without_an_image(client: TestClient, store: WorklistStore) -> None:
    add_dead_letter(store, json.dumps({**json.loads(dead_letter_json("bad", 1)), "payload": "not json"}), 1)
    response = client.get(path_of("bad") + "/thumbnail")
    assert response.status_code == 404 and response.json()["detail"] == "the study has no image to show"


# Server-sent events -----------------------------------------------------------------------------------------


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Blocks of an event stream as dicts: id, event, data (parsed JSON), retry, comment."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                fields["comment"] = value
            elif name == "data":
                fields["data"] = json.loads(value)
            elif name in ("id", "retry"):
                fields[name] = int(value)
            else:
                fields[name] = value
        out.append(fields)
    return out


async def take(stream: AsyncIterator[str], n: int, *, timeout_s: float = 5.0, also: Any = None) -> list[dict]:
    """The first `n` blocks of a stream that match `also` (default: named events), read under a timeout."""
    wanted = also or (lambda block: "event" in block)
    got: list[dict[str, Any]] = []
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in stream:
                got.extend(block for block in parse_sse(chunk) if wanted(block))
                if len(got) >= n:
                    break
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return got[:n]


def test_events_resume_after_a_given_id_with_consecutive_ids(store: WorklistStore, consumer: FakeConsumer) -> None:
    add_results(store, result_json("a", "8.1", priority="STAT", pneumonia=0.95))
    first = store.change_range()[1]
    add_results(store, result_json("b", "8.2"), result_json("c", "8.3"))
    add_dead_letter(store, dead_letter_json("d", 4), 4)
    store.claim("8.1", "Dr A")
    feed = fast_feed(store, consumer)
    blocks = asyncio.run(take(feed.stream(first), 5, also=lambda b: "id" in b))
    ids = [b["id"] for b in blocks]
    assert ids == list(range(first + 1, first + 6))
    assert [b["event"] for b in blocks].count("dead_letter") == 1
    assert blocks[-1]["event"] == "claimed" and blocks[-1]["data"]["study"]["claimed_by"] == "Dr A"
    for block in blocks:
        assert block["data"]["id"] == block["id"] and block["data"]["what"] == block["event"]
    studies = [b["data"] for b in blocks if b["event"] == "study"]
    assert {s["study_key"] for s in studies} >= {"8.2", "8.3"} and all(s["study"]["key"] for s in studies)
    letter = next(b["data"] for b in blocks if b["event"] == "dead_letter")
    assert letter["study_key"] is None and letter["study"] is None
    # resuming after the third one sends the fourth next
    again = asyncio.run(take(fast_feed(store, consumer).stream(ids[2]), 1, also=lambda b: "id" in b))
    assert again[0]["id"] == ids[3]


def test_events_start_now_and_follow_new_changes(store: WorklistStore, consumer: FakeConsumer) -> None:
    add_results(store, result_json("old", "9.1"))

    async def follow() -> list[dict[str, Any]]:
        stream = fast_feed(store, consumer).stream(None)
        head = [await stream.__anext__(), await stream.__anext__()]  # retry, then the scoring status
        assert head[0].startswith("retry: ") and parse_sse(head[1])[0]["event"] == "scoring"
        await anyio.to_thread.run_sync(lambda: add_results(store, result_json("new", "9.2")))
        return await take(stream, 1)

    change = asyncio.run(follow())[0]
    assert change["event"] == "study" and change["data"]["study_key"] == "9.2"
    assert change["data"]["study"]["status"] == "unread" and change["id"] == store.change_range()[1]


def test_events_reset_when_the_resume_point_was_pruned(
    store: WorklistStore, consumer: FakeConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_results(store, *(result_json(f"p{i}", f"10.{i}") for i in range(5)))
    monkeypatch.setattr(store_module, "CHANGES_KEPT", 2)
    store.prune(datetime.now(UTC), timedelta(days=30))
    first, last = store.change_range()
    assert first == last - 1
    feed = fast_feed(store, consumer)
    reset = asyncio.run(take(feed.stream(first - 2), 1))[0]  # the change after it is gone
    assert reset["event"] == "reset" and reset["id"] == last and reset["data"] == {"last_event_id": last}
    assert asyncio.run(take(feed.stream(first - 1), 1, also=lambda b: "id" in b))[0]["id"] == first  # still whole
    assert asyncio.run(take(feed.stream(last + 100), 1))[0]["event"] == "reset"  # from another database
    assert asyncio.run(take(feed.stream(-1), 1))[0]["event"] == "reset"  # an unreadable Last-Event-ID


def test_events_say_when_scoring_or_kafka_changes(store: WorklistStore, consumer: FakeConsumer) -> None:
    async def follow() -> list[dict[str, Any]]:
        stream = fast_feed(store, consumer, heartbeat_s=0.05).stream(None)
        scoring = await take_open(stream, 1, lambda b: b.get("event") == "scoring")
        consumer.connected = False
        scoring += await take_open(stream, 1, lambda b: b.get("event") == "scoring")
        scoring += await take(stream, 1, also=lambda b: "comment" in b)
        return scoring

    first, lost, heartbeat = asyncio.run(follow())
    assert first["data"]["state"] == "idle" and first["data"]["kafka"]["connected"] is True and "id" not in first
    assert lost["data"]["kafka"]["connected"] is False
    assert heartbeat["comment"].strip() == "keep-alive"


def test_closing_the_feed_ends_its_streams(store: WorklistStore, consumer: FakeConsumer) -> None:
    feed = fast_feed(store, consumer)

    async def follow() -> list[str]:
        stream = feed.stream(None)
        chunks = [await stream.__anext__()]
        feed.close()  # what a stopping server does, so that it need not wait for pages that never hang up
        with anyio.fail_after(5):
            chunks.extend([chunk async for chunk in stream])
        return chunks

    assert asyncio.run(follow())[0].startswith("retry: ")


async def take_open(stream: AsyncIterator[str], n: int, wanted: Any, timeout_s: float = 5.0) -> list[dict]:
    """Like `take`, but leaves the stream open to read on."""
    got: list[dict[str, Any]] = []
    with anyio.fail_after(timeout_s):
        while len(got) < n:
            got.extend(block for block in parse_sse(await stream.__anext__()) if wanted(block))
    return got


@pytest.fixture
def server(store: WorklistStore, settings: Settings, consumer: FakeConsumer) -> Iterator[tuple[str, EventFeed]]:
    """The app served by uvicorn on a loopback port, for the event stream over a real socket."""
    feed = fast_feed(store, consumer, max_clients=1)
    app = create_app(store, settings, consumer.status, feed=feed)
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", feed
    server.should_exit = True
    thread.join(10)
    sock.close()


def read_events(chunks: Iterator[str], n: int) -> list[dict[str, Any]]:
    """The next `n` events with ids from a response's text chunks (an iterator kept open: closing it would
    close the connection)."""
    blocks: list[dict[str, Any]] = []
    text = ""
    for chunk in chunks:
        text += chunk
        while "\n\n" in text:
            block, text = text.split("\n\n", 1)
            blocks.extend(b for b in parse_sse(block + "\n\n") if "id" in b)
        if len(blocks) >= n:
            return blocks[:n]
    raise AssertionError("the stream ended early")


def test_events_over_http_resume_from_last_event_id_and_are_bounded(
    server: tuple[str, EventFeed], store: WorklistStore
) -> None:
    url, feed = server
    add_results(store, *(result_json(f"h{i}", f"11.{i}") for i in range(4)))
    first, last = store.change_range()
    timeout = httpx.Timeout(5.0)
    with httpx.Client(timeout=timeout) as http:
        # the header EventSource sends on reconnecting wins over the query parameter
        headers = {"Last-Event-ID": str(first + 1)}
        with http.stream("GET", f"{url}/api/events?last_event_id={first}", headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            chunks = response.iter_text()
            assert [b["id"] for b in read_events(chunks, 2)] == [first + 2, first + 3]
            refused = http.get(f"{url}/api/events")  # one client at most here
            assert refused.status_code == 503 and "too many" in refused.json()["detail"]
        deadline = time.monotonic() + 5
        while feed.clients and time.monotonic() < deadline:  # a page that leaves gives its place back
            time.sleep(0.02)
        assert feed.clients == 0
        with http.stream("GET", f"{url}/api/events?last_event_id={last - 1}") as response:
            assert [b["id"] for b in read_events(response.iter_text(), 1)] == [last]
        key = quote("odd/key ?", safe="")
        add_results(store, result_json("odd/key ?", None))
        assert http.get(f"{url}/api/studies/{key}").json()["key"] == "odd/key ?"  # a real server's raw path too


# ------------------------------------------------------------------------------------------ who may ask


def test_a_password_protects_the_page_and_the_api_but_not_the_probes(
    store: WorklistStore, settings: Settings, consumer: FakeConsumer, queue: dict[str, str]
) -> None:
    protected = settings.model_copy(update={"worklist_password": SecretStr("s3cret")})
    with TestClient(create_app(store, protected, consumer.status, feed=fast_feed(store, consumer))) as client:
        for path in ("/", "/api/studies", "/api/snapshot", "/openapi.json"):
            refused = client.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Basic")
        assert client.get("/api/studies", auth=("cxr", "wrong")).status_code == 401
        assert client.get("/api/studies", auth=("cxr", "s3cret")).status_code == 200
        assert client.post(f"/api/studies/{queue['STAT']}/read").status_code == 401
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert client.get(probe).status_code != 401, probe


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://elsewhere.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://testserver"},
    ],
)
def test_changes_from_another_site_are_refused(
    client: TestClient, store: WorklistStore, queue: dict[str, str], headers: dict[str, str]
) -> None:
    """A reader's browser would send its credentials with another site's form: that must not mark a study read."""
    refused = client.post(f"/api/studies/{queue['STAT']}/read", headers=headers)
    assert refused.status_code == 403
    assert store.study(queue["STAT"], datetime.now(UTC))["status"] == "unread"
    assert client.get("/api/studies", headers=headers).status_code == 200  # reading is not a change


def test_changes_from_the_page_itself_are_accepted_also_behind_a_proxy(
    client: TestClient, queue: dict[str, str]
) -> None:
    same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert client.post(f"/api/studies/{queue['STAT']}/claim", json={"reader": "A"}, headers=same).status_code == 200
    proxied = {"Origin": "https://worklist.hospital.example", "X-Forwarded-Host": "worklist.hospital.example"}
    assert client.post(f"/api/studies/{queue['STAT']}/read", headers=proxied).status_code == 200


@pytest.mark.parametrize("origin", ["null", "file://", "http://", " null "])
def test_changes_from_an_opaque_or_empty_origin_are_refused(
    client: TestClient, store: WorklistStore, queue: dict[str, str], origin: str
) -> None:
    """`Origin: null` is what a sandboxed frame or a file sends: it is not the page, whatever the Host."""
    refused = client.post(f"/api/studies/{queue['STAT']}/read", headers={"Origin": origin})
    assert refused.status_code == 403, origin
    assert store.study(queue["STAT"], datetime.now(UTC))["status"] == "unread"


def test_host_names() -> None:
    assert host_name("127.0.0.1:8080") == "127.0.0.1" and host_name("LocalHost") == "localhost"
    assert host_name("[::1]:8080") == "[::1]" and host_name("::1") == "[::1]" and host_name("[::1") == ""
    assert host_name("worklist.example.:443") == "worklist.example" and host_name("") == ""


def test_which_host_names_the_worklist_answers_to(settings: Settings) -> None:
    loopback = {"localhost", "127.0.0.1", "[::1]"}
    bare = settings.model_copy(update={"worklist_allowed_hosts": []})
    assert accepted_hosts(bare) == loopback
    assert accepted_hosts(bare.model_copy(update={"worklist_host": "::1"})) == loopback
    assert accepted_hosts(bare.model_copy(update={"worklist_host": "127.0.0.2"})) == loopback | {"127.0.0.2"}
    assert accepted_hosts(bare.model_copy(update={"worklist_host": "0.0.0.0"})) is None  # any (with a warning)
    assert accepted_hosts(bare.model_copy(update={"worklist_host": ""})) is None
    listed = Settings.load(worklist_host="0.0.0.0", worklist_allowed_hosts="Worklist.Example:8443, 10.0.0.5")
    assert listed.worklist_allowed_hosts == ["worklist.example:8443", "10.0.0.5"]
    assert accepted_hosts(listed) == loopback | {"worklist.example", "10.0.0.5"}


def test_another_host_name_is_refused_so_that_dns_rebinding_reaches_nothing(
    store: WorklistStore, settings: Settings, consumer: FakeConsumer, queue: dict[str, str]
) -> None:
    """A site whose name is rebound to 127.0.0.1 sends its own name as Host: the page, the API and the changes
    refuse it; the probes answer (a kubelet probes the pod's address)."""
    bare = settings.model_copy(update={"worklist_allowed_hosts": []})
    with TestClient(create_app(store, bare, consumer.status, feed=fast_feed(store, consumer))) as client:
        for path in ("/", "/api/studies", "/api/snapshot", "/static/app.js", "/openapi.json"):
            refused = client.get(path)  # Host: testserver
            assert refused.status_code == 400, path
            assert "CXR_WORKLIST_ALLOWED_HOSTS" in refused.json()["detail"]
        assert client.post(f"/api/studies/{queue['STAT']}/read").status_code == 400
        assert store.study(queue["STAT"], datetime.now(UTC))["status"] == "unread"
        for host in ("127.0.0.1:8080", "localhost", "[::1]:8080"):
            assert client.get("/api/studies", headers={"Host": host}).status_code == 200, host
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert client.get(probe, headers={"Host": "10.1.2.3:8080"}).status_code == 200, probe
    named = settings.model_copy(update={"worklist_allowed_hosts": ["worklist.hospital.example"]})
    with TestClient(create_app(store, named, consumer.status, feed=fast_feed(store, consumer))) as client:
        ok = {"Host": "worklist.hospital.example"}
        assert client.get("/api/studies", headers=ok).status_code == 200
        assert client.get("/api/studies", headers={"Host": "127.0.0.1:9"}).status_code == 200
        assert client.get("/api/studies", headers={"Host": "evil.example"}).status_code == 400
        # behind a proxy both names must be known: a script can set X-Forwarded-Host, never Host
        forwarded = {"Host": "127.0.0.1:8080", "X-Forwarded-Host": "worklist.hospital.example"}
        assert client.get("/api/studies", headers=forwarded).status_code == 200
        for evil in ("evil.example", "worklist.hospital.example, evil.example"):
            headers = {"Host": "127.0.0.1:8080", "X-Forwarded-Host": evil}
            assert client.get("/api/studies", headers=headers).status_code == 400, evil
    anywhere = bare.model_copy(update={"worklist_host": "0.0.0.0"})
    with TestClient(create_app(store, anywhere, consumer.status, feed=fast_feed(store, consumer))) as client:
        assert client.get("/api/studies", headers={"Host": "evil.example"}).status_code == 200


def test_the_service_warns_when_it_answers_to_any_host_name(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from worklist import service as service_module

    started: list[str] = []
    monkeypatch.setattr(service_module.threading.Thread, "start", lambda thread: started.append(thread.name))
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        caplog.clear()
        chosen = settings.model_copy(update={"worklist_allowed_hosts": [], "worklist_host": host, "worklist_port": 0})
        service = service_module.WorklistService(chosen)
        try:
            with caplog.at_level(logging.WARNING, logger="cxr.worklist"):
                service.start()
        finally:
            service._socket.close()
            service.store.close()
        assert any("CXR_WORKLIST_ALLOWED_HOSTS" in r.getMessage() for r in caplog.records) is warned, host
    assert len(started) == 4  # nothing ran: the threads were never started


def test_an_event_stream_whose_client_stopped_reading_ends_and_gives_its_place_back() -> None:
    released: list[bool] = []

    async def endless() -> AsyncIterator[str]:
        while True:
            yield ": keep-alive\n\n"
            await anyio.sleep(0)

    async def run(spec: str) -> list[str]:
        sent: list[str] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])
            if message["type"] == "http.response.body":
                await anyio.sleep_forever()  # the client's buffers are full: the write never completes

        async def receive() -> dict[str, Any]:
            await anyio.sleep_forever()  # and it never hangs up
            return {}

        response = EventStreamResponse(endless(), lambda: released.append(True), write_timeout_s=0.05)
        scope = {"type": "http", "asgi": {"spec_version": spec}, "method": "GET", "path": "/api/events"}
        with anyio.fail_after(5):
            await response(scope, receive, send)  # type: ignore[arg-type]
        return sent

    for spec in ("2.3", "2.4"):  # with and without Starlette's listener for the disconnect
        assert asyncio.run(run(spec)) == ["http.response.start", "http.response.body"]
    assert released == [True, True]


def test_no_swagger_page_that_would_load_scripts_from_the_internet(client: TestClient) -> None:
    assert client.get("/docs").status_code == 404
    assert "/api/studies" in client.get("/openapi.json").json()["paths"]
