"""The ordering rule (worklist/ordering.py): the one function the worklist, its page and the simulator share.

Each test states one promise of issue 10's item 2: classes, then score, then arrival; a person's priority
wins; unscored studies are neither hidden nor treated as routine; a maximum wait escalates (under CAPPED) and
is reported (under every policy); nothing is ever dropped.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.triage import Priority
from worklist.ordering import Entry, MaxWait, Policy, order, place

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
CAPS = MaxWait()  # STAT 15 min, URGENT 1 h, ROUTINE 4 h
STAT, URGENT, ROUTINE = Priority.STAT, Priority.URGENT, Priority.ROUTINE


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def keys(entries: list[Entry], now: datetime, policy: Policy, max_wait: MaxWait = CAPS) -> list[str]:
    return [p.entry.key for p in order(entries, now, max_wait, policy)]


def test_classes_first_then_score_then_arrival() -> None:
    entries = [
        Entry("routine-high", at(0), ROUTINE, 0.45),
        Entry("urgent-low-early", at(1), URGENT, 0.55),
        Entry("urgent-high", at(5), URGENT, 0.80),
        Entry("urgent-low-late", at(6), URGENT, 0.55),
        Entry("stat-late", at(9), STAT, 0.90),
        Entry("unscored", at(2)),
    ]
    now = at(10)  # nothing is overdue yet
    expected = ["stat-late", "urgent-high", "urgent-low-early", "urgent-low-late", "unscored", "routine-high"]
    assert keys(entries, now, Policy.PRIORITY) == expected
    assert keys(entries, now, Policy.CAPPED) == expected  # with nothing overdue, CAPPED is PRIORITY
    assert keys(entries, now, Policy.FIFO) == [
        "routine-high",
        "urgent-low-early",
        "unscored",
        "urgent-high",
        "urgent-low-late",
        "stat-late",
    ]


@pytest.mark.parametrize("policy", list(Policy))
def test_full_ties_are_broken_by_key_whatever_the_input_order(policy: Policy) -> None:
    same = [Entry(key, at(0), URGENT, 0.7) for key in ("c", "a", "b")]
    assert keys(same, at(1), policy) == ["a", "b", "c"]
    assert keys(list(reversed(same)), at(1), policy) == ["a", "b", "c"]


def test_a_persons_priority_wins_over_the_ais_both_ways() -> None:
    raised = Entry("raised-by-person", at(5), ai_priority=ROUTINE, score=0.1, person_priority=STAT)
    lowered = Entry("lowered-by-person", at(0), ai_priority=STAT, score=0.99, person_priority=ROUTINE)
    urgent = Entry("urgent", at(1), URGENT, 0.6)
    assert raised.priority is STAT and lowered.priority is ROUTINE
    assert keys([lowered, urgent, raised], at(6), Policy.PRIORITY) == [
        "raised-by-person",
        "urgent",
        "lowered-by-person",
    ]
    # ... and the person's class sets the maximum wait too: STAT's 15 minutes, not ROUTINE's 4 hours
    assert place(raised, at(5), CAPS).due_at == at(5 + 15)
    # a person may also classify a study nobody scored: it is read in that class
    unscored_but_stat = Entry("person-stat", at(3), person_priority=STAT)
    assert keys([urgent, unscored_but_stat], at(6), Policy.PRIORITY) == ["person-stat", "urgent"]


def test_unscored_studies_sit_between_urgent_and_routine_in_arrival_order() -> None:
    entries = [
        Entry("unscored-2", at(2)),
        Entry("routine", at(0), ROUTINE, 0.49),
        Entry("unscored-1", at(1)),
        Entry("urgent", at(3), URGENT, 0.51),
    ]
    assert keys(entries, at(4), Policy.PRIORITY) == ["urgent", "unscored-1", "unscored-2", "routine"]


def test_unscored_studies_escalate_at_the_urgent_maximum_wait() -> None:
    unscored = Entry("unscored", at(0))
    stat = Entry("stat", at(59), STAT, 0.99)
    assert CAPS.of(None) == CAPS.urgent
    assert place(unscored, at(59), CAPS).overdue is False
    assert keys([unscored, stat], at(59), Policy.CAPPED) == ["stat", "unscored"]
    placed = place(unscored, at(60), CAPS)  # exactly at the maximum wait: overdue
    assert placed.overdue is True and placed.due_at == at(60)
    # escalated above everything but STAT: a new STAT study is still read first
    assert keys([unscored, stat], at(60), Policy.CAPPED) == ["stat", "unscored"]
    urgent = Entry("urgent", at(59), URGENT, 0.8)
    assert keys([urgent, unscored], at(60), Policy.CAPPED) == ["unscored", "urgent"]


def test_overdue_studies_first_after_stat_earliest_deadline_first_under_capped_only() -> None:
    routine = Entry("routine-5h", at(0), ROUTINE, 0.05)  # due at 4 h: 1 h overdue at 5 h
    urgent = Entry("urgent-70min", at(230), URGENT, 0.6)  # due at 4 h 50: 10 min overdue
    stat = Entry("stat-new", at(299), STAT, 0.95)  # due at 5 h 14: not overdue
    unscored = Entry("unscored-90min", at(210))  # due at 4 h 30 (URGENT's wait): 30 min overdue
    entries = [stat, urgent, unscored, routine]
    now = at(300)
    assert keys(entries, now, Policy.CAPPED) == ["stat-new", "routine-5h", "unscored-90min", "urgent-70min"]
    assert keys(entries, now, Policy.PRIORITY) == ["stat-new", "urgent-70min", "unscored-90min", "routine-5h"]
    assert keys(entries, now, Policy.FIFO) == ["routine-5h", "unscored-90min", "urgent-70min", "stat-new"]
    # `overdue` is reported the same under every policy: a FIFO site still wants to see it
    for policy in Policy:
        flags = {p.entry.key: p.overdue for p in order(entries, now, CAPS, policy)}
        assert flags == {"routine-5h": True, "unscored-90min": True, "urgent-70min": True, "stat-new": False}


def test_overdue_studies_with_the_same_deadline_go_in_arrival_order() -> None:
    caps = MaxWait(stat=timedelta(minutes=10), urgent=timedelta(minutes=20), routine=timedelta(minutes=30))
    a = Entry("routine", at(0), ROUTINE, 0.1)  # due at 30
    b = Entry("urgent", at(10), URGENT, 0.9)  # due at 30
    c = Entry("stat", at(20), STAT, 0.99)  # due at 30
    assert keys([c, b, a], at(30), Policy.CAPPED, caps) == ["stat", "routine", "urgent"]


def test_overdue_stat_studies_come_first_among_stat_earliest_deadline_first() -> None:
    late = Entry("stat-overdue", at(0), STAT, 0.86)  # due at 15: overdue at 20
    strong = Entry("stat-strong", at(10), STAT, 0.99)  # due at 25
    routine = Entry("routine-overdue", at(-300), ROUTINE, 0.1)
    assert keys([strong, routine, late], at(20), Policy.CAPPED) == ["stat-overdue", "stat-strong", "routine-overdue"]


def test_a_shorter_cap_changes_who_is_next() -> None:
    routine = Entry("routine", at(0), ROUTINE, 0.1)
    urgent = Entry("urgent", at(100), URGENT, 0.6)
    assert keys([routine, urgent], at(120), Policy.CAPPED) == ["urgent", "routine"]
    short = MaxWait(routine=timedelta(hours=2))
    assert keys([routine, urgent], at(120), Policy.CAPPED, short) == ["routine", "urgent"]


@pytest.mark.parametrize("field", ["stat", "urgent", "routine"])
@pytest.mark.parametrize("wait", [timedelta(0), timedelta(minutes=-5)])
def test_max_wait_rejects_non_positive_waits(field: str, wait: timedelta) -> None:
    with pytest.raises(ValueError, match=field.upper()):
        MaxWait(**{field: wait})


def test_max_wait_from_seconds() -> None:
    assert MaxWait.from_seconds(900, 3600, 14400) == MaxWait()
    with pytest.raises(ValueError):
        MaxWait.from_seconds(900, 0, 14400)


def test_an_empty_queue_is_an_empty_order() -> None:
    assert order([], T0, CAPS, Policy.CAPPED) == []


_priorities = st.one_of(st.none(), st.sampled_from(list(Priority)))
_entries = st.lists(
    st.builds(
        lambda arrived, ai, score, person: (arrived, ai, None if ai is None else score, person),
        st.integers(min_value=0, max_value=600),
        _priorities,
        st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
        st.one_of(st.none(), st.sampled_from(list(Priority))),
    ),
    max_size=40,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(raw=_entries, now_min=st.integers(min_value=0, max_value=900), routine_h=st.integers(min_value=1, max_value=6))
def test_nothing_is_ever_dropped_or_duplicated(
    raw: list[tuple[int, Priority | None, float | None, Priority | None]], now_min: int, routine_h: int
) -> None:
    entries = [Entry(f"k{n}", at(arrived), ai, score, person) for n, (arrived, ai, score, person) in enumerate(raw)]
    caps = MaxWait(routine=timedelta(hours=routine_h))
    now = at(now_min)
    results = {policy: order(entries, now, caps, policy) for policy in Policy}
    for placed in results.values():
        # a permutation of the input: the very same entries, each exactly once
        assert sorted(id(p.entry) for p in placed) == sorted(id(e) for e in entries)
    # CAPPED is: STAT (overdue ones first, by deadline, then as PRIORITY orders them), the other overdue
    # studies by deadline, then the rest exactly as PRIORITY orders them
    capped = results[Policy.CAPPED]
    stat = [p for p in capped if p.priority == Priority.STAT]
    escalated = [p for p in capped if p.overdue and p.priority != Priority.STAT]
    assert capped[: len(stat)] == stat
    assert capped[len(stat) : len(stat) + len(escalated)] == escalated
    stat_overdue = [p for p in stat if p.overdue]
    assert stat[: len(stat_overdue)] == stat_overdue
    for group in (stat_overdue, escalated):
        assert [p.due_at for p in group] == sorted(p.due_at for p in group)
    by_priority = [p.entry for p in results[Policy.PRIORITY] if not p.overdue]
    assert [p.entry for p in stat if not p.overdue] == [e for e in by_priority if e.priority == Priority.STAT]
    rest = capped[len(stat) + len(escalated) :]
    assert [p.entry for p in rest] == [e for e in by_priority if e.priority != Priority.STAT]
    # FIFO is arrival order
    assert [p.entry.arrived_at for p in results[Policy.FIFO]] == sorted(e.arrived_at for e in entries)
