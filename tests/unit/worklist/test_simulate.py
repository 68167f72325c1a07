"""`cxr worklist simulate` (worklist/simulate.py): the event loop against hand-computed cases, the synthetic
day, a results file and the command line. Pure and fast: no Kafka, no Spark."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.cli import main
from streaming.contracts import Reference, build_result
from streaming.triage import Priority
from worklist.ordering import MaxWait, Policy
from worklist.simulate import (
    MISSED,
    POLICIES,
    UNSCORED,
    Arrival,
    by_class,
    compare,
    read_results_file,
    reading_times,
    simulate,
    synthetic_day,
)

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
TEN = timedelta(minutes=10)
STAT, URGENT, ROUTINE = Priority.STAT, Priority.URGENT, Priority.ROUTINE


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def waits(arrivals: list[Arrival], policy: Policy, *, readers: int = 1, max_wait: MaxWait | None = None) -> dict:
    outcomes = simulate(arrivals, readers=readers, read_time=TEN, policy=policy, max_wait=max_wait or MaxWait())
    return {o.arrival.key: o.wait_s / 60 for o in outcomes}


def test_hand_computed_fifo_against_priority() -> None:
    # One reader, 10-minute reads. R1 (ROUTINE) arrives at 0 and is read 0-10. At 10 both R2 (arrived 1) and
    # S (STAT, arrived 2) wait. FIFO: R2 10-20 (wait 9), S 20-30 (wait 18). Priority: S 10-20 (wait 8),
    # R2 20-30 (wait 19). Priority-with-caps: nothing is near a cap, so as priority.
    day = [Arrival("R1", at(0), ROUTINE, 0.1), Arrival("R2", at(1), ROUTINE, 0.2), Arrival("S", at(2), STAT, 0.9)]
    assert waits(day, Policy.FIFO) == {"R1": 0, "R2": 9, "S": 18}
    assert waits(day, Policy.PRIORITY) == {"R1": 0, "S": 8, "R2": 19}
    assert waits(day, Policy.CAPPED) == {"R1": 0, "S": 8, "R2": 19}


def test_hand_computed_a_short_routine_cap_changes_the_order() -> None:
    # One reader, 10-minute reads, ROUTINE capped at 15 minutes. A (URGENT, 0) is read 0-10.
    # Priority: at 10, U1 (URGENT, 2) before R (ROUTINE, 1): U1 10-20 (wait 8); at 20, U2 (URGENT, 12) before
    #   R: U2 20-30 (wait 8); R 30-40 (wait 29).
    # Capped: at 10, R is due at 1+15 = 16, not yet overdue: U1 10-20 (wait 8); at 20, R is overdue (20 >= 16)
    #   and goes first: R 20-30 (wait 19); U2 30-40 (wait 18).
    day = [
        Arrival("A", at(0), URGENT, 0.6),
        Arrival("R", at(1), ROUTINE, 0.1),
        Arrival("U1", at(2), URGENT, 0.6),
        Arrival("U2", at(12), URGENT, 0.6),
    ]
    short = MaxWait(routine=timedelta(minutes=15))
    assert waits(day, Policy.PRIORITY, max_wait=short) == {"A": 0, "U1": 8, "U2": 8, "R": 29}
    assert waits(day, Policy.CAPPED, max_wait=short) == {"A": 0, "U1": 8, "R": 19, "U2": 18}
    assert waits(day, Policy.CAPPED) == {"A": 0, "U1": 8, "U2": 8, "R": 29}  # the default 4 h cap: no change
    outcomes = simulate(day, readers=1, read_time=TEN, policy=Policy.CAPPED, max_wait=short)
    assert [(o.arrival.key, o.overdue) for o in outcomes] == [("A", False), ("U1", False), ("R", True), ("U2", False)]


def test_hand_computed_two_readers() -> None:
    # Two readers, three studies at 0: two are read at once, the third (STAT first under priority) waits 10.
    day = [Arrival("a", at(0), ROUTINE, 0.1), Arrival("b", at(0), ROUTINE, 0.3), Arrival("s", at(0), STAT, 0.9)]
    assert waits(day, Policy.FIFO, readers=2) == {"a": 0, "b": 0, "s": 10}
    assert waits(day, Policy.PRIORITY, readers=2) == {"s": 0, "b": 0, "a": 10}
    # an idle reader takes a study the moment it arrives, even long after the last read finished
    later = [*day, Arrival("late", at(100), ROUTINE, 0.1)]
    assert waits(later, Policy.FIFO, readers=2)["late"] == 0


def test_per_study_reading_times_and_summaries() -> None:
    day = [Arrival("a", at(0), URGENT, 0.6), Arrival("b", at(0), URGENT, 0.5), Arrival("u", at(1), None)]
    times = {"a": timedelta(minutes=5), "b": timedelta(minutes=20), "u": timedelta(minutes=1)}
    outcomes = simulate(day, readers=1, read_time=times, policy=Policy.PRIORITY, max_wait=MaxWait())
    assert [(o.arrival.key, o.wait_s / 60) for o in outcomes] == [("a", 0), ("b", 5), ("u", 24)]
    classes = by_class(outcomes)
    assert list(classes) == ["STAT", "URGENT", "ROUTINE", UNSCORED]  # UNSCORED only because there is one
    assert classes["STAT"].count == 0 and classes["STAT"].max is None
    assert classes["URGENT"].mean == 150.0 and classes["URGENT"].max == 300.0
    assert classes[UNSCORED].max == 24 * 60


def test_missed_positives_are_a_row_only_when_the_truth_is_known() -> None:
    day = [Arrival("m", at(0), ROUTINE, 0.3, true_priority=URGENT), Arrival("n", at(0), ROUTINE, 0.1, ROUTINE)]
    outcomes = simulate(day, readers=1, read_time=TEN, policy=Policy.PRIORITY, max_wait=MaxWait())
    classes = by_class(outcomes)
    assert list(classes) == ["STAT", "URGENT", "ROUTINE", MISSED]
    assert classes[MISSED].count == 1 and classes["ROUTINE"].count == 2
    assert MISSED not in by_class(simulate(day[1:], readers=1, read_time=TEN, policy=Policy.FIFO, max_wait=MaxWait()))


def test_invalid_simulations_are_refused() -> None:
    day = [Arrival("a", at(0), ROUTINE, 0.1)]
    with pytest.raises(ValueError, match="reader"):
        simulate(day, readers=0, read_time=TEN, policy=Policy.FIFO, max_wait=MaxWait())
    with pytest.raises(ValueError, match="key"):
        simulate(day * 2, readers=1, read_time=TEN, policy=Policy.FIFO, max_wait=MaxWait())
    with pytest.raises(ValueError, match="positive"):
        simulate(day, readers=1, read_time=timedelta(0), policy=Policy.FIFO, max_wait=MaxWait())
    assert simulate([], readers=1, read_time=TEN, policy=Policy.FIFO, max_wait=MaxWait()) == []


_arrivals = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=120),
        st.one_of(st.none(), st.sampled_from(list(Priority))),
        st.floats(min_value=0, max_value=1, allow_nan=False),
        st.integers(min_value=1, max_value=15),
    ),
    max_size=30,
)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(raw=_arrivals, readers=st.integers(min_value=1, max_value=3), routine_min=st.integers(min_value=5, max_value=60))
def test_every_study_is_read_once_by_a_free_reader_never_before_it_arrives(
    raw: list[tuple[int, Priority | None, float, int]], readers: int, routine_min: int
) -> None:
    day = [Arrival(f"k{n}", at(t), p, None if p is None else s) for n, (t, p, s, _) in enumerate(raw)]
    times = {f"k{n}": timedelta(minutes=m) for n, (*_, m) in enumerate(raw)}
    caps = MaxWait(routine=timedelta(minutes=routine_min))
    for policy, outcomes in compare(day, readers=readers, read_time=times, max_wait=caps).items():
        assert sorted(o.arrival.key for o in outcomes) == sorted(a.key for a in day), policy
        for o in outcomes:
            assert o.started_at >= o.arrival.arrived_at
            assert o.finished_at - o.started_at == times[o.arrival.key]
            # never more reads at once than readers; and a study only waits while every reader is busy
            busy = sum(1 for x in outcomes if x.started_at <= o.started_at < x.finished_at)
            assert busy <= readers
            if o.wait_s > 0:
                busy_at_arrival = sum(1 for x in outcomes if x.started_at <= o.arrival.arrived_at < x.finished_at)
                assert busy_at_arrival == readers


def test_the_synthetic_day_is_deterministic_and_plausible() -> None:
    day = synthetic_day(1000, seed=7)
    assert day == synthetic_day(1000, seed=7)
    assert day != synthetic_day(1000, seed=8)
    assert len(day) == 1000 and len({a.key for a in day}) == 1000
    start = datetime(2021, 1, 4, tzinfo=UTC)
    assert all(start <= a.arrived_at < start + timedelta(hours=24) for a in day)
    share = {p: sum(a.priority is p for a in day) / len(day) for p in (*Priority, None)}
    assert 0.01 <= share[STAT] <= 0.06 and 0.10 <= share[URGENT] <= 0.19 and share[ROUTINE] >= 0.75
    assert 0.005 <= share[None] <= 0.04
    night = sum(a.arrived_at.hour in (1, 2, 3, 4) for a in day)
    morning = sum(a.arrived_at.hour in (8, 9, 10, 11) for a in day)
    assert morning > 4 * night
    # scores are consistent with the classes: STAT above URGENT above ROUTINE
    bands = {p: [a.score for a in day if a.priority is p and a.score is not None] for p in Priority}
    assert min(bands[STAT]) >= 0.85 > max(bands[URGENT]) >= min(bands[URGENT]) >= 0.5 > max(bands[ROUTINE])
    assert any(a.missed for a in day)


def test_the_default_day_shows_what_the_evidence_describes() -> None:
    """Priority cuts the urgent wait but lets ROUTINE (and missed positives) sink; the caps bring the tail back."""
    day = synthetic_day()
    caps = MaxWait()
    runs = compare(day, readers=2, read_time=timedelta(minutes=2), max_wait=caps)
    fifo, prio, capped = (by_class(runs[p]) for p in POLICIES)
    minutes = 60.0
    assert prio["URGENT"].mean < fifo["URGENT"].mean / 10  # type: ignore[operator]
    assert prio["STAT"].mean < fifo["STAT"].mean / 10  # type: ignore[operator]
    assert prio["ROUTINE"].max > 2 * fifo["ROUTINE"].max  # type: ignore[operator]
    assert prio[MISSED].max > 2 * fifo[MISSED].max  # type: ignore[operator]
    # with caps, no ROUTINE study waits much beyond its 4 h (one reading time, at most a few)
    assert capped["ROUTINE"].max <= caps.routine.total_seconds() + 10 * minutes  # type: ignore[operator]
    assert capped["ROUTINE"].max < prio["ROUTINE"].max  # type: ignore[operator]
    assert capped["URGENT"].mean < fifo["URGENT"].mean / 10  # type: ignore[operator]


def test_reading_times_fixed_or_seeded() -> None:
    day = synthetic_day(300, seed=3)
    fixed = reading_times(day, 2.0, 0.0, seed=3)
    assert set(fixed.values()) == {timedelta(minutes=2)}
    spread = reading_times(day, 2.0, 0.5, seed=3)
    assert spread == reading_times(day, 2.0, 0.5, seed=3)
    assert len(set(spread.values())) > 250
    mean = sum(t.total_seconds() for t in spread.values()) / len(spread) / 60
    assert 1.7 < mean < 2.3


def _result(event_id: str, study: str | None, priority: str, score: float, sent: datetime) -> str:
    ref = Reference(event_id=event_id, uri=f"file:///x/{event_id}.png", study_uid=study)
    return json.dumps(
        build_result(
            ref,
            model={"name": "m", "version": "1"},
            scores={"Pneumothorax": score, "No Finding": 1 - score},
            top_finding="Pneumothorax",
            priority=priority,
            sent_at=sent,
            scored_at=sent + timedelta(seconds=3),
        )
    )


def _dead_letter(event_id: str, sent: datetime) -> str:
    ref = Reference(event_id=event_id, uri=f"file:///x/{event_id}.png", sent_at=sent.isoformat())
    return json.dumps(
        {
            "schema": "cxr.dead-letter/v1",
            "event_id": event_id,
            "stage": "fetch",
            "error": "not_found",
            "reason": "the file does not exist",
            "payload": ref.to_json(),
            "failed_at": (sent + timedelta(seconds=2)).isoformat(),
        }
    )


def _results_file(tmp_path: Path) -> Path:
    # Replayed long after the fact (2023): arrival must come from each line's own sent_at, not "now".
    day = datetime(2023, 3, 1, 9, 0, tzinfo=UTC)
    lines = [
        _result("e1", "study-A", "ROUTINE", 0.2, day),
        _result("e2", "study-A", "URGENT", 0.7, day + timedelta(minutes=1)),  # the study is as urgent as this
        _result("e3", "study-B", "STAT", 0.95, day + timedelta(minutes=2)),
        _result("e3", "study-B", "STAT", 0.95, day + timedelta(minutes=2)),  # at-least-once: a duplicate
        _result("e4", None, "ROUTINE", 0.1, day + timedelta(minutes=3)),  # no study uid: its own study
        _dead_letter("e5", day + timedelta(minutes=4)),  # never scored
        "this is not JSON {",
        "",
        json.dumps({"schema": "cxr.result/v1", "event_id": "e6"}),  # no sent_at: no arrival time
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_results_file_round_trip(tmp_path: Path) -> None:
    day = read_results_file(_results_file(tmp_path))
    assert day.lines == 8
    assert sum(day.unreadable.values()) == 2
    studies = {a.key: a for a in day.arrivals}
    assert set(studies) == {"study-A", "study-B", "e4", "e5"}
    start = datetime(2023, 3, 1, 9, 0, tzinfo=UTC)
    assert studies["study-A"].arrived_at == start  # its first image
    assert (studies["study-A"].priority, studies["study-A"].score) == (URGENT, 0.7)
    assert studies["study-B"].priority is STAT and studies["study-B"].arrived_at == start + timedelta(minutes=2)
    assert studies["e5"].priority is None and studies["e5"].arrived_at == start + timedelta(minutes=4)
    # one reader, 10 minutes a read, priority: A at 9:00 (0); at 9:10 B (STAT, 8), at 9:20 e5 (unscored, 16),
    # at 9:30 e4 (ROUTINE, 27)
    got = waits(day.arrivals, Policy.PRIORITY)
    assert got == {"study-A": 0, "study-B": 8, "e5": 16, "e4": 27}


def test_cli_json_has_all_three_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worklist", "simulate", "--studies", "200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == {"fifo", "priority", "priority-with-caps"}
    assert out["studies"] == 200 and out["readers"] == 2 and out["unit"] == "minutes"
    assert out["max_wait_minutes"] == {"STAT": 15.0, "URGENT": 60.0, "ROUTINE": 240.0}
    for classes in out["policies"].values():
        assert sum(classes[c]["count"] for c in ("STAT", "URGENT", "ROUTINE", "UNSCORED") if c in classes) == 200


def test_cli_overrides_a_cap_and_reads_a_results_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _results_file(tmp_path)
    argv = ["worklist", "simulate", "--results", str(path), "--readers", "1", "--read-minutes", "10"]
    assert main([*argv, "--max-wait", "routine=5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_wait_minutes"]["ROUTINE"] == 5.0
    assert sum(out["unreadable_lines"].values()) == 2
    assert out["policies"]["priority"]["ROUTINE"]["max"] == 27.0
    # the 5-minute ROUTINE cap makes e4 (arrived 9:03) overdue at 9:08: at 9:10 the STAT study B (arrived 9:02)
    # still goes first (escalation never passes STAT), but at 9:20 e4 goes before the unscored e5 (arrived
    # 9:04, due 10:04), which it would follow under priority alone: e4 waits 17, e5 26
    capped = out["policies"]["priority-with-caps"]
    assert (capped["ROUTINE"]["max"], capped["ROUTINE"]["over_cap"], capped["STAT"]["max"]) == (17.0, 1, 8.0)
    assert capped["UNSCORED"]["max"] == 26.0
    assert main(argv) == 0  # the table
    table = capsys.readouterr().out
    assert "priority-with-caps" in table and "UNSCORED" in table and "ROUTINE 240" in table


def test_cli_a_missing_results_file_is_a_configuration_error(tmp_path: Path) -> None:
    assert main(["worklist", "simulate", "--results", str(tmp_path / "nope.jsonl")]) == 2


def test_cli_a_file_with_nothing_usable_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.jsonl"
    path.write_text("garbage\n[]\n", encoding="utf-8")
    assert main(["worklist", "simulate", "--results", str(path)]) == 2


@pytest.mark.parametrize(
    "flags",
    [
        ["--readers", "0"],
        ["--studies", "-3"],
        ["--studies", "1000000"],
        ["--read-minutes", "0"],
        ["--read-minutes", "nan"],
        ["--read-spread", "-1"],
        ["--max-wait", "ROUTINE=0"],
        ["--max-wait", "LATER=10"],
        ["--max-wait", "ROUTINE"],
    ],
)
def test_cli_rejects_bad_flags(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["worklist", "simulate", *flags])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
