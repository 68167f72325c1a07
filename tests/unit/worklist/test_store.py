"""The worklist's durable state (worklist/store.py), against a real SQLite file.

Each test states one promise of issue 10: rows and Kafka offsets change together or not at all and survive a
reopen; images are de-duplicated on event_id; a study is as urgent as its most urgent image and never
downgraded by a replay; what readers do (claim, read, dismiss, reopen, a priority of their own, feedback) is
kept and ordered as promised; scoring that stops is noticed; old closed studies are forgotten.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from streaming.contracts import rfc3339
from streaming.triage import Priority
from worklist.events import DeadLetter, ImageEvent, Kind
from worklist.ordering import MaxWait
from worklist.store import CLOSED, Conflict, NotFound, Status, Verdict, WorklistStore

STAT, URGENT, ROUTINE = Priority.STAT, Priority.URGENT, Priority.ROUTINE
#: Arrivals are minutes before the real now: the store stamps what readers do with the real clock.
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(minutes=30)
STALE = timedelta(minutes=2)
#: Caps no test study reaches, so the order seen is the classes' (escalation is test_ordering.py's subject).
NO_CAPS = MaxWait(timedelta(days=1), timedelta(days=1), timedelta(days=1))


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def announced(event_id: str, study: str | None = None, minutes: float = 0.0) -> ImageEvent:
    return ImageEvent(
        Kind.ANNOUNCED,
        event_id=event_id,
        study_key=study or event_id,
        arrived_at=at(minutes),
        at=at(minutes),
        study_uid=study,
        uri=f"file:///xrays/{event_id}.jpeg",
    )


def scored(
    event_id: str,
    study: str | None = None,
    priority: Priority = ROUTINE,
    score: float = 0.2,
    minutes: float = 0.0,
    version: str = "1",
    scored_minutes: float | None = None,
) -> ImageEvent:
    finding = "PNEUMONIA" if priority is not ROUTINE else None
    return ImageEvent(
        Kind.SCORED,
        event_id=event_id,
        study_key=study or event_id,
        arrived_at=at(minutes),
        at=at(minutes + 1 if scored_minutes is None else scored_minutes),
        study_uid=study,
        uri=f"file:///xrays/{event_id}.jpeg",
        priority=priority,
        top_finding=finding,
        score=score,
        scores={"NORMAL": 1 - score, "PNEUMONIA": score},
        model_name="xception",
        model_version=version,
    )


def failed(event_id: str, study: str | None = None, minutes: float = 0.0) -> ImageEvent:
    return ImageEvent(
        Kind.FAILED,
        event_id=event_id,
        study_key=study or event_id,
        arrived_at=at(minutes),
        at=at(minutes + 1),
        study_uid=study,
        stage="fetch",
        error="not_found",
        reason="the file does not exist",
    )


def letter(offset: int, event_id: str | None = None, study: str | None = None, minutes: float = 1.0) -> DeadLetter:
    return DeadLetter(
        topic="cxr.dead-letter",
        partition=0,
        offset=offset,
        stage="fetch" if event_id else "parse",
        error="not_found" if event_id else "invalid_json",
        reason="the file does not exist" if event_id else "the message value is not valid UTF-8 JSON",
        failed_at=at(minutes),
        event_id=event_id,
        study_key=study or event_id,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "worklist.db"


@pytest.fixture
def store(db: Path) -> Iterator[WorklistStore]:
    s = WorklistStore(db, NO_CAPS)
    yield s
    s.close()


def apply(store: WorklistStore, *records: ImageEvent | DeadLetter, offsets: dict[Any, int] | None = None) -> set[str]:
    return store.apply(list(records), offsets or {})


def queue(store: WorklistStore, now: datetime = NOW, **kwargs: Any) -> list[dict[str, Any]]:
    return store.queue(now, **kwargs)[1]


def keys(store: WorklistStore, now: datetime = NOW, **kwargs: Any) -> list[str]:
    return [item["key"] for item in queue(store, now, **kwargs)]


def item(store: WorklistStore, key: str) -> dict[str, Any]:
    return store.study(key, NOW)


def everything(store: WorklistStore) -> tuple[Any, ...]:
    """All that the consumer's writes can change, for before/after comparisons."""
    return (
        store.offsets(),
        queue(store, statuses=(*Status,), limit=10_000),
        store.dead_letters(limit=10_000),
        store.image_counts(),
        store.counts(),
        store.change_range(),
    )


# De-duplication and grouping ----------------------------------------------------------------------------


def test_the_same_batch_twice_changes_nothing_the_second_time(store: WorklistStore) -> None:
    batch: list[ImageEvent | DeadLetter] = [
        announced("e1", "S1"),
        scored("e1", "S1", URGENT, 0.7),
        scored("e2", "S2", STAT, 0.9, minutes=2),
        failed("e3", minutes=3),
        letter(5, "e3"),
        letter(6),
    ]
    offsets = {("cxr.results", 0): 10, ("cxr.dead-letter", 0): 7}
    assert store.apply(batch, offsets) == {"S1", "S2", "e3"}
    before = everything(store)
    assert store.apply(batch, offsets) == set()
    assert everything(store) == before
    assert store.image_counts() == {"announced": 0, "scored": 2, "failed": 1}
    assert store.dead_letters()[0] == 2
    assert item(store, "S1")["event_ids"] == ["e1"]


def test_a_study_groups_its_images_and_is_as_urgent_as_its_most_urgent(store: WorklistStore) -> None:
    apply(
        store,
        scored("a1", "A", ROUTINE, 0.30, minutes=0),
        scored("a2", "A", STAT, 0.95, minutes=1),
        scored("a3", "A", URGENT, 0.99, minutes=2),
        scored("b1", "B", URGENT, 0.60, minutes=0),
        scored("b2", "B", URGENT, 0.80, minutes=1),
        announced("b3", "B", minutes=2),
    )
    a, b = item(store, "A"), item(store, "B")
    assert (a["priority"], a["score"], a["event_ids"]) == ("STAT", 0.95, ["a1", "a2", "a3"])
    assert (b["priority"], b["score"], b["top_finding"]) == ("URGENT", 0.80, "PNEUMONIA")
    assert b["images"] == {"total": 3, "scored": 2, "failed": 0, "pending": 1}
    assert a["arrived_at"] == b["arrived_at"]  # the study arrived with its first image
    assert keys(store) == ["A", "B"]


def test_a_study_without_a_uid_is_keyed_by_its_event_id(store: WorklistStore) -> None:
    apply(store, scored("lonely", None, URGENT, 0.7))
    assert keys(store) == ["lonely"]
    assert item(store, "lonely")["study_uid"] is None


def test_queue_order_stat_urgent_unscored_routine_then_score_then_arrival(store: WorklistStore) -> None:
    apply(
        store,
        scored("r", "R", ROUTINE, 0.4, minutes=0),
        announced("u", "U", minutes=1),
        scored("m1", "M1", URGENT, 0.6, minutes=2),
        scored("m2", "M2", URGENT, 0.8, minutes=3),
        scored("s", "S", STAT, 0.9, minutes=4),
    )
    assert keys(store) == ["S", "M2", "M1", "U", "R"]
    assert [i["position"] for i in queue(store)] == [1, 2, 3, 4, 5]


# Progression: announced, failed, scored; never backwards ------------------------------------------------


def test_announced_then_scored_and_a_late_reference_replay_does_not_downgrade(store: WorklistStore) -> None:
    apply(store, announced("e1", "S1"))
    first = item(store, "S1")
    assert first["priority"] is None and first["images"]["pending"] == 1
    assert store.image_counts()["announced"] == 1

    assert apply(store, scored("e1", "S1", STAT, 0.9)) == {"S1"}
    now_scored = item(store, "S1")
    assert now_scored["priority"] == "STAT" and now_scored["images"]["scored"] == 1

    assert apply(store, announced("e1", "S1"), failed("e1", "S1")) == set()  # replays and older news
    assert item(store, "S1")["priority"] == "STAT"
    assert store.image_counts() == {"announced": 0, "scored": 1, "failed": 0}


def test_failed_then_scored_is_scored_and_a_failure_keeps_the_study_on_the_queue(store: WorklistStore) -> None:
    apply(store, announced("e1", "S1"), failed("e1", "S1"))
    failing = item(store, "S1")
    assert failing["priority"] is None and failing["images"]["failed"] == 1 and failing["status"] == "unread"
    assert failing["image_list"][0]["error"] == {
        "stage": "fetch",
        "code": "not_found",
        "reason": "the file does not exist",
    }
    apply(store, scored("e1", "S1", URGENT, 0.7))
    assert item(store, "S1")["images"] == {"total": 1, "scored": 1, "failed": 0, "pending": 0}


def test_an_image_stays_with_the_study_it_was_first_filed_under(store: WorklistStore) -> None:
    apply(store, announced("e1", "S1"))
    apply(store, scored("e1", None, STAT, 0.9))  # a result that lost its study UID on the way
    assert keys(store) == ["S1"]


def test_arrival_is_the_earliest_any_message_said(store: WorklistStore) -> None:
    apply(store, announced("e1", "S1", minutes=5))
    apply(store, scored("e1", "S1", URGENT, 0.7, minutes=2))
    assert item(store, "S1")["arrived_at"] == rfc3339(at(2))


def test_a_new_image_reopens_a_read_study_but_a_replay_does_not(store: WorklistStore) -> None:
    apply(store, scored("e1", "S1", URGENT, 0.7))
    store.mark_read("S1", "dr-a")
    assert keys(store) == []
    apply(store, scored("e1", "S1", URGENT, 0.7), announced("e1", "S1"))  # replays
    assert item(store, "S1")["status"] == "read"
    apply(store, announced("e2", "S1", minutes=3))  # a new image of the same study
    reopened = item(store, "S1")
    assert reopened["status"] == "unread" and reopened["closed_at"] is None
    assert keys(store) == ["S1"]


# What readers do ----------------------------------------------------------------------------------------


def test_claims_conflict_between_readers(store: WorklistStore) -> None:
    apply(store, scored("e1", "S1", STAT, 0.9))
    store.claim("S1", "dr-a")
    store.claim("S1", "dr-a")  # claiming again is harmless
    with pytest.raises(Conflict, match="dr-a"):
        store.claim("S1", "dr-b")
    assert item(store, "S1")["claimed_by"] == "dr-a"
    assert keys(store) == ["S1"]  # a claimed study is still on the queue
    store.release("S1")
    store.claim("S1", "dr-b")
    assert item(store, "S1")["claimed_by"] == "dr-b"


def test_read_dismiss_reopen(store: WorklistStore) -> None:
    apply(store, scored("a", "A", STAT, 0.9), scored("b", "B", URGENT, 0.7), scored("c", "C", ROUTINE, 0.1))
    store.mark_read("A", "dr-a")
    store.dismiss("C", "dr-a", "duplicate upload")
    assert keys(store) == ["B"]
    assert set(keys(store, statuses=CLOSED)) == {"A", "C"}
    assert (item(store, "A")["status"], item(store, "A")["closed_by"]) == ("read", "dr-a")
    assert item(store, "C")["status"] == "dismissed"
    with pytest.raises(Conflict):
        store.mark_read("A", "dr-b")
    with pytest.raises(Conflict):
        store.reopen("B")  # open studies cannot be reopened
    store.reopen("A")
    assert keys(store) == ["A", "B"]
    assert store.counts() == {"unread": 2, "claimed": 0, "read": 0, "dismissed": 1}


def test_unknown_studies_are_not_found(store: WorklistStore) -> None:
    for act in (
        lambda: store.claim("nope", "dr-a"),
        lambda: store.mark_read("nope", None),
        lambda: store.dismiss("nope", None, None),
        lambda: store.reopen("nope"),
        lambda: store.set_priority("nope", STAT, None),
        lambda: store.add_feedback("nope", Verdict.AGREE, None),
        lambda: store.study("nope", NOW),
    ):
        with pytest.raises(NotFound):
            act()


def test_a_persons_priority_wins_over_the_ais_and_later_results(store: WorklistStore) -> None:
    apply(store, scored("x", "X", ROUTINE, 0.1, minutes=0), scored("y", "Y", URGENT, 0.7, minutes=1))
    assert keys(store) == ["Y", "X"]
    store.set_priority("X", STAT, "dr-a")
    assert keys(store) == ["X", "Y"]
    x = item(store, "X")
    assert (x["priority"], x["ai_priority"], x["person_priority"]) == ("STAT", "ROUTINE", "STAT")
    apply(store, scored("x2", "X", ROUTINE, 0.05, minutes=2))  # the AI's news does not lower it
    assert keys(store) == ["X", "Y"]
    store.set_priority("Y", ROUTINE, "dr-b")  # a person may lower it; the AI never does
    assert keys(store) == ["X", "Y"] and item(store, "Y")["priority"] == "ROUTINE"
    store.set_priority("X", None, "dr-a")  # the decision goes back to the AI
    assert item(store, "X")["priority"] == "ROUTINE" and item(store, "X")["person_priority"] is None


def test_feedback_is_counted_per_model_version(store: WorklistStore) -> None:
    apply(
        store,
        scored("a", "A", URGENT, 0.7, version="1"),
        scored("b", "B", URGENT, 0.7, version="1"),
        scored("c", "C", STAT, 0.9, version="2"),
        announced("d", "D"),
    )
    store.add_feedback("A", Verdict.AGREE, "dr-a")
    store.add_feedback("B", Verdict.AGREE, "dr-a")
    store.add_feedback("B", Verdict.DISAGREE, "dr-a")  # changed their mind: the latest counts
    store.add_feedback("B", Verdict.AGREE, "dr-b")
    store.add_feedback("C", Verdict.DISAGREE, "dr-a")
    with pytest.raises(Conflict):
        store.add_feedback("D", Verdict.AGREE, "dr-a")  # nothing scored: no AI finding to judge
    summary = {s["model"]["version"]: s for s in store.feedback_summary()}
    assert (summary["1"]["agree"], summary["1"]["disagree"]) == (2, 1)
    assert summary["1"]["agreement"] == pytest.approx(2 / 3)
    assert (summary["2"]["agree"], summary["2"]["disagree"], summary["2"]["agreement"]) == (0, 1, 0.0)
    assert [f["verdict"] for f in item(store, "B")["feedback"]] == ["agree", "disagree", "agree"]
    assert item(store, "B")["feedback"][0]["model"] == {"name": "xception", "version": "1"}


# Atomicity and durability -------------------------------------------------------------------------------


class Exploding:
    """A record that fails the transaction when the store reads it (as a disk error or a bug would)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("boom")


def test_a_failing_apply_changes_neither_rows_nor_offsets(store: WorklistStore) -> None:
    apply(store, scored("e0", "S0", URGENT, 0.7), offsets={("cxr.results", 0): 1})
    before = everything(store)
    half: Sequence[Any] = [scored("e1", "S1", STAT, 0.9), letter(3, "e1", "S1"), announced("e2"), Exploding()]
    with pytest.raises(RuntimeError, match="boom"):
        store.apply(half, {("cxr.results", 0): 5, ("cxr.dead-letter", 0): 4})
    assert everything(store) == before
    # and the store still works: the same poll, read again, goes in whole
    store.apply(half[:3], {("cxr.results", 0): 5, ("cxr.dead-letter", 0): 4})
    assert store.offsets() == {("cxr.results", 0): 5, ("cxr.dead-letter", 0): 4}
    assert keys(store) == ["S1", "S0", "e2"]


def test_a_failure_in_the_middle_of_the_sql_rolls_back_too(
    store: WorklistStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply(store, announced("e0", "S0"), offsets={("cxr.references", 0): 1})
    before = everything(store)
    real = WorklistStore._refresh_study
    calls = []

    def refresh_then_fail(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        real(*args, **kwargs)
        if len(calls) == 2:
            raise OSError("disk I/O error")

    monkeypatch.setattr(WorklistStore, "_refresh_study", staticmethod(refresh_then_fail))
    with pytest.raises(OSError):
        apply(store, scored("e0", "S0", STAT, 0.9), scored("e1", "S1"), offsets={("cxr.references", 0): 9})
    assert len(calls) == 2
    assert everything(store) == before


def test_rows_and_offsets_survive_a_reopen(db: Path) -> None:
    first = WorklistStore(db, NO_CAPS)
    apply(
        first,
        scored("e1", "S1", STAT, 0.9),
        announced("e2", "S2", minutes=1),
        letter(3, "e3"),
        failed("e3"),
        offsets={("cxr.results", 0): 12, ("cxr.results", 1): 4, ("cxr.dead-letter", 0): 4},
    )
    first.mark_read("S1", "dr-a")
    first.set_priority("S2", URGENT, "dr-b")
    before = everything(first)
    first.close()
    again = WorklistStore(db, NO_CAPS)
    try:
        assert everything(again) == before
        assert again.offsets() == {("cxr.results", 0): 12, ("cxr.results", 1): 4, ("cxr.dead-letter", 0): 4}
    finally:
        again.close()


def test_the_file_is_in_wal_mode(store: WorklistStore, db: Path) -> None:
    import sqlite3

    other = sqlite3.connect(db)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


# Scoring health, waits, housekeeping, change log --------------------------------------------------------


def test_scoring_status_idle_live_stalled(store: WorklistStore) -> None:
    assert store.scoring_status(NOW, STALE).state == "idle"
    apply(store, announced("old", minutes=0))  # 30 minutes ago, never scored
    stalled = store.scoring_status(NOW, STALE)
    assert (stalled.state, stalled.pending) == ("stalled", 1)
    assert stalled.last_scored_at is None
    # a result a minute ago: scoring is moving, the old one is only waiting its turn
    apply(store, scored("fresh", minutes=29, scored_minutes=29.5))
    live = store.scoring_status(NOW, STALE)
    assert (live.state, live.pending) == ("live", 1)
    assert live.as_dict()["oldest_pending_at"] is not None
    # ... until no result comes for longer than allowed
    assert store.scoring_status(NOW + timedelta(minutes=10), STALE).state == "stalled"
    apply(store, scored("old"))
    assert store.scoring_status(NOW + timedelta(minutes=10), STALE).state == "idle"


def test_a_recent_arrival_is_live_not_stalled(store: WorklistStore) -> None:
    apply(store, announced("new", minutes=29.5))
    assert store.scoring_status(NOW, STALE).state == "live"


def test_wait_figures_per_class(store: WorklistStore) -> None:
    apply(
        store,
        scored("s1", "S1", STAT, 0.9, minutes=0),  # waits 30 min, open
        scored("s2", "S2", STAT, 0.9, minutes=20),  # waits 10 min, open
        announced("u1", "U1", minutes=10),  # unscored, 20 min
        scored("r1", "R1", ROUTINE, 0.1, minutes=-90),  # arrived before `since`: not today's
    )
    figures = store.wait_figures(NOW, since=at(-60))
    assert figures["STAT"].count == 2
    assert figures["STAT"].max == pytest.approx(30 * 60, abs=1)
    assert figures["STAT"].median == pytest.approx(10 * 60, abs=1)
    assert figures["UNSCORED"].count == 1 and figures["UNSCORED"].max == pytest.approx(20 * 60, abs=1)
    assert figures["ROUTINE"].count == 0 and figures["URGENT"].max is None
    store.mark_read("S1", "dr-a")  # read now (the real clock): its wait ends then, not later
    read_at = datetime.fromisoformat(store.study("S1", NOW)["closed_at"])
    later = store.wait_figures(read_at + timedelta(hours=1), since=at(-60))
    waits = sorted([(read_at - at(0)).total_seconds(), (read_at + timedelta(hours=1) - at(20)).total_seconds()])
    assert (later["STAT"].median, later["STAT"].max) == pytest.approx((waits[0], waits[1]), abs=1)


def test_prune_forgets_old_closed_studies_and_old_dead_letters_only(store: WorklistStore) -> None:
    apply(
        store,
        scored("a", "A", URGENT, 0.7),
        scored("b", "B", URGENT, 0.7),
        scored("c", "C", STAT, 0.9),
        letter(1, "x", minutes=0),
    )
    store.mark_read("A", "dr-a")
    store.dismiss("B", "dr-a", None)
    assert store.prune(NOW, timedelta(days=30)) == 0
    assert store.prune(NOW + timedelta(days=31), timedelta(days=30)) == 2
    assert keys(store, statuses=(*Status,)) == ["C"]
    assert store.dead_letters()[0] == 0
    assert store.image_counts()["scored"] == 1
    with pytest.raises(NotFound):
        store.study("A", NOW)


def test_change_log_ids_increase_and_changes_since_resumes(store: WorklistStore) -> None:
    assert store.change_range() == (0, 0)
    apply(store, scored("a", "A", URGENT, 0.7), letter(1))
    first, last = store.change_range()
    changes = store.changes_since(0)
    assert [c.id for c in changes] == sorted({c.id for c in changes}) and len(changes) == 2
    assert {(c.study_key, c.what) for c in changes} == {("A", "study"), (None, "dead_letter")}
    assert (first, last) == (changes[0].id, changes[-1].id)
    store.claim("A", "dr-a")
    store.mark_read("A", "dr-a")
    newer = store.changes_since(last)
    assert [(c.study_key, c.what) for c in newer] == [("A", "claimed"), ("A", "read")]
    assert newer[0].id > last and newer[1].id > newer[0].id
    assert store.changes_since(newer[-1].id) == []
    assert [c.id for c in store.changes_since(0, limit=1)] == [first]


def test_a_replay_adds_nothing_to_the_change_log(store: WorklistStore) -> None:
    apply(store, scored("a", "A", URGENT, 0.7), letter(1))
    _, last = store.change_range()
    apply(store, scored("a", "A", URGENT, 0.7), letter(1), announced("a", "A"))
    assert store.changes_since(last) == []


# ------------------------------------------------------------------------------ rules that keep the queue honest


def test_a_routine_image_beside_an_unscored_one_leaves_the_study_unscored(store: WorklistStore) -> None:
    """Nobody knows yet that the image that failed (or is still waiting) is routine too."""
    apply(store, scored("r", "S", ROUTINE, 0.1), failed("f", "S"), scored("o", "O", ROUTINE, 0.3))
    assert item(store, "S")["priority"] is None and item(store, "S")["ai_priority"] is None
    assert keys(store) == ["S", "O"]  # the unscored band comes before ROUTINE
    apply(store, scored("u", "U", URGENT, 0.7), announced("p", "U"))
    assert item(store, "U")["priority"] == "URGENT"  # an urgent image is urgent whatever the rest


def test_a_study_reopened_by_a_new_image_waits_from_that_image(store: WorklistStore) -> None:
    caps = MaxWait(timedelta(minutes=15), timedelta(minutes=60), timedelta(minutes=20))
    capped = WorklistStore(store.path, caps)
    apply(capped, scored("old", "S", ROUTINE, 0.1, minutes=0))
    capped.mark_read("S", "dr-a")
    apply(capped, scored("new", "S", ROUTINE, 0.1, minutes=25))  # 5 minutes before NOW
    reopened = capped.study("S", NOW)
    assert reopened["status"] == "unread" and reopened["arrived_at"].startswith(at(25).isoformat()[:16])
    assert reopened["overdue"] is False  # not 30 minutes old: its new image is 5
    capped.close()


def test_a_newer_more_urgent_image_raises_a_persons_priority_an_older_one_does_not(store: WorklistStore) -> None:
    apply(store, scored("a", "S", URGENT, 0.7))
    store.set_priority("S", ROUTINE, "dr-a")  # the person looked, and judged it routine
    apply(store, scored("a", "S", STAT, 0.99))  # a replay: nothing new
    assert item(store, "S")["priority"] == "ROUTINE" and item(store, "S")["person_priority_by"] == "dr-a"
    later = (datetime.now(UTC) - T0).total_seconds() / 60 + 1
    apply(store, scored("b", "S", URGENT, 0.8, minutes=later - 1, scored_minutes=later))  # news they had not seen
    raised = item(store, "S")
    assert raised["priority"] == "URGENT" and raised["person_priority"] is None


def test_a_recreated_topic_reusing_offsets_keeps_both_dead_letters(store: WorklistStore) -> None:
    first = letter(7, "e1", minutes=1)
    apply(store, first, first)  # a replay of the same letter is one letter
    apply(store, letter(7, "e2", minutes=2))  # the topic was recreated: offset 7 again, another letter
    total, letters = store.dead_letters()
    assert total == 2 and {x["event_id"] for x in letters} == {"e1", "e2"}


def test_positions_of_several_studies_come_from_one_ordering(store: WorklistStore) -> None:
    apply(store, scored("a", "A", ROUTINE, 0.1), scored("b", "B", STAT, 0.9), scored("c", "C", URGENT, 0.7))
    store.mark_read("C", None)
    assert store.open_positions(NOW) == {"B": 1, "A": 2}
    views = store.studies(["A", "C", "gone"], NOW)
    assert views["A"] is not None and views["A"]["position"] == 2
    assert views["C"] is not None and views["C"]["position"] is None  # read: not on the queue
    assert views["gone"] is None


def test_a_failed_write_leaves_the_original_error_and_a_usable_store(
    store: WorklistStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    store._db.execute("PRAGMA max_page_count = 1")  # the next growth is a full disk, which SQLite rolls back
    with pytest.raises(sqlite3.OperationalError, match="full"):
        apply(store, *(scored(f"e{i}", f"S{i}") for i in range(200)))
    store._db.execute("PRAGMA max_page_count = 1073741823")
    apply(store, scored("ok", "OK"))
    assert keys(store) == ["OK"]


def test_a_claimed_study_is_read_or_dismissed_by_its_claimer_only_but_anyone_may_release_it(
    store: WorklistStore,
) -> None:
    apply(store, scored("a", "A", URGENT, 0.7), scored("b", "B", URGENT, 0.7))
    store.claim("A", "dr-a")
    with pytest.raises(Conflict, match="claimed by dr-a"):
        store.mark_read("A", "dr-b")
    with pytest.raises(Conflict, match="claimed by dr-a"):
        store.dismiss("A", "dr-b", None)
    store.release("A")  # dr-a went home: the coordinator takes the claim back
    store.mark_read("A", "dr-b")
    store.claim("B", "dr-a")
    store.mark_read("B", "dr-a")
    assert store.counts()["read"] == 2


@pytest.mark.parametrize("kind", ["garbage", "folder", "device"])
def test_a_path_that_is_not_a_worklist_file_is_refused_untouched(tmp_path: Path, kind: str) -> None:
    """A configuration to fix (the CLI exits 2), and a file that is something else is never overwritten."""
    from worklist.store import StoreError

    if kind == "garbage":
        path = tmp_path / "w.db"
        path.write_bytes(b"\x00not sqlite\xff" * 500)
    elif kind == "folder":
        path = tmp_path / "w.db"
        path.mkdir()
    else:
        path = Path("/dev/null")
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(StoreError, match=r"cannot use .* as the worklist's database"):
        WorklistStore(path)
    if before is not None:
        assert path.read_bytes() == before
