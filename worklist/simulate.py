"""`cxr worklist simulate`: what FIFO, priority-only and priority-with-caps ordering do to the waits of a day.

Why: AI prioritisation cuts the mean wait of urgent studies but lets the others, and the positives the AI
missed, sink: in Baltruschat et al. (Eur Radiol 2021) the mean report turnaround for pneumothorax fell from 80
to 36 minutes while the maximum rose from 890 to 1,293; a maximum-wait rule brings the tail back. No triage
product publishes these figures for a site's own volume, so a site choosing its caps replays a day here.

The core is a small discrete-event simulation: N readers; whenever one is free and studies wait, it takes the
first study of `worklist.ordering.order` (the very function the live worklist uses, so the simulator cannot
drift from it) and reads it for the reading time. A study's wait is the start of its reading minus its arrival.

The synthetic day (seeded, deterministic) assumes:

* arrivals spread over 24 hours by `HOURLY_PROFILE`: quiet at night, a morning peak from the ward rounds'
  portable films (8-11 h), a busy working day and a moderate evening from the emergency department; within
  an hour, uniform;
* the true class: 2.5 % need a STAT read (e.g. a tension pneumothorax), 12 % an URGENT one, the rest are
  routine; the AI calls 80 % of STAT studies STAT and 10 % URGENT, 85 % of URGENT ones URGENT and 3 % STAT,
  and misses the rest (ROUTINE: the "missed positives"); it flags 4 % of routine studies URGENT and 0.5 % STAT;
  this gives about 3 % STAT, 14 % URGENT and 83 % ROUTINE by the AI;
* 2 % of studies are never scored (a dead letter, or the scoring job down): the worklist reads them in arrival
  order after URGENT (`worklist.ordering`);
* the score (the strongest finding's probability) lies in the AI class's band: STAT 0.85-1, URGENT 0.5-0.85,
  ROUTINE 0-0.5, where a missed positive scores only a little higher than a truly normal study (mean 0.11
  against 0.10): what the model did not see, it does not score;
* the readers read chest X-rays only, all day, at a fixed reading time (or, with `--read-spread`, a
  log-normal one with that coefficient of variation, the same study taking as long under every policy).

The defaults (1,000 studies, 2 readers, 2 minutes a read) keep the readers about 70 % busy over the day but
overloaded from 8 to 11 h, so a queue forms every morning and the three orderings part visibly.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from streaming.contracts import DEAD_LETTER_SCHEMA, parse_timestamp
from streaming.settings import Settings
from streaming.triage import Priority
from worklist.events import ImageEvent, NormalLabels, Unreadable, read_dead_letter, read_result
from worklist.ordering import Entry, MaxWait, Policy, order, study_class
from worklist.waits import WaitSummary, summarize

log = logging.getLogger("cxr.worklist.simulate")

POLICIES = (Policy.FIFO, Policy.PRIORITY, Policy.CAPPED)
UNSCORED = "UNSCORED"
#: Studies truly STAT or URGENT that the AI called ROUTINE: the ones that sink under priority-only ordering.
MISSED = "MISSED_POSITIVES"
_LABELS = {MISSED: "↳ missed positives"}

#: Relative arrivals per hour of the day, 0 h to 23 h (see the module docstring).
HOURLY_PROFILE: tuple[float, ...] = (
    2.0, 1.5, 1.5, 1.5, 1.5, 2.0, 3.0, 6.0, 9.0, 10.0, 9.0, 8.0,
    6.0, 7.0, 7.0, 7.0, 6.0, 5.0, 4.0, 4.0, 3.5, 3.0, 2.5, 2.0,
)  # fmt: skip
#: The AI's class given the true one: (STAT, URGENT, ROUTINE) probabilities.
AI_GIVEN_TRUTH: Mapping[Priority, tuple[float, float, float]] = {
    Priority.STAT: (0.80, 0.10, 0.10),
    Priority.URGENT: (0.03, 0.85, 0.12),
    Priority.ROUTINE: (0.005, 0.04, 0.955),
}
TRUE_SHARE: Mapping[Priority, float] = {Priority.STAT: 0.025, Priority.URGENT: 0.12, Priority.ROUTINE: 0.855}
UNSCORED_SHARE = 0.02
DEFAULT_STUDIES = 1000
DEFAULT_READERS = 2
DEFAULT_READ_MINUTES = 2.0
DEFAULT_SEED = 1
#: A bound that keeps a mistyped `--studies` from running for minutes (a results file is not bounded).
MAX_STUDIES = 20_000
#: Where a synthetic day starts; only the time of day matters.
DAY_START = datetime(2021, 1, 4, tzinfo=UTC)
DAY = timedelta(hours=24)
_SHORTEST_READ = timedelta(seconds=1)


@dataclass(frozen=True)
class Arrival:
    """One study arriving on the worklist."""

    key: str
    arrived_at: datetime
    #: the AI's class; None when no image of the study was scored
    priority: Priority | None
    #: the strongest finding's probability, when scored
    score: float | None = None
    #: what the study really needed, when known (the synthetic day): it finds the missed positives
    true_priority: Priority | None = None

    @property
    def missed(self) -> bool:
        return self.priority is Priority.ROUTINE and self.true_priority in (Priority.STAT, Priority.URGENT)

    def entry(self) -> Entry:
        return Entry(self.key, self.arrived_at, ai_priority=self.priority, score=self.score)


@dataclass(frozen=True)
class Outcome:
    """When one study was read, and whether it had passed its class's maximum wait by then."""

    arrival: Arrival
    started_at: datetime
    finished_at: datetime
    overdue: bool

    @property
    def wait_s(self) -> float:
        return (self.started_at - self.arrival.arrived_at).total_seconds()


def simulate(
    arrivals: Iterable[Arrival],
    *,
    readers: int,
    read_time: timedelta | Mapping[str, timedelta],
    policy: Policy,
    max_wait: MaxWait,
) -> list[Outcome]:
    """Read every study once, in the order `worklist.ordering.order` gives at each moment a reader is free.

    `read_time` is one duration for every study or one per study key (so that a study takes as long under
    every policy). Returns the outcomes in reading order. Nothing is dropped: the queue is read to the end.
    """
    if readers < 1:
        raise ValueError("at least one reader is needed")
    pending = sorted(arrivals, key=lambda a: (a.arrived_at, a.key))
    by_key = {a.key: a for a in pending}
    if len(by_key) != len(pending):
        raise ValueError("two arrivals share a key")
    if not pending:
        return []
    now = pending[0].arrived_at
    free = [now] * readers  # when each reader is next free: a heap
    waiting: dict[str, Entry] = {}
    outcomes: list[Outcome] = []
    i = 0
    while i < len(pending) or waiting:
        moment = max(now, free[0])
        if not waiting:
            moment = max(moment, pending[i].arrived_at)
        while i < len(pending) and pending[i].arrived_at <= moment:
            waiting[pending[i].key] = pending[i].entry()
            i += 1
        first = order(waiting.values(), moment, max_wait, policy)[0]
        key = first.entry.key
        del waiting[key]
        duration = read_time if isinstance(read_time, timedelta) else read_time[key]
        if duration <= timedelta(0):
            raise ValueError("reading times must be positive")
        heapq.heapreplace(free, moment + duration)
        outcomes.append(Outcome(by_key[key], moment, moment + duration, first.overdue))
        now = moment
    return outcomes


def class_of(arrival: Arrival) -> str:
    return arrival.priority.value if arrival.priority is not None else UNSCORED


def by_class(outcomes: Sequence[Outcome]) -> dict[str, WaitSummary]:
    """STAT, URGENT and ROUTINE always; UNSCORED and the missed positives (a part of ROUTINE) when there are any."""
    waits: dict[str, list[float]] = {p.value: [] for p in Priority}
    for outcome in outcomes:
        waits.setdefault(class_of(outcome.arrival), []).append(outcome.wait_s)
        if outcome.arrival.missed:
            waits.setdefault(MISSED, []).append(outcome.wait_s)
    names = [p.value for p in Priority] + [name for name in (UNSCORED, MISSED) if name in waits]
    return {name: summarize(waits[name]) for name in names}


def over_cap(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """How many studies of each class started reading after their class's maximum wait."""
    counts: Counter[str] = Counter()
    for outcome in outcomes:
        if outcome.overdue:
            counts[class_of(outcome.arrival)] += 1
            if outcome.arrival.missed:
                counts[MISSED] += 1
    return dict(counts)


def reading_times(arrivals: Iterable[Arrival], minutes: float, spread: float, seed: int) -> dict[str, timedelta]:
    """A reading time per study: fixed when `spread` is 0, else log-normal with that coefficient of variation
    and mean `minutes` (drawn in key order, so the same seed gives the same times)."""
    if minutes <= 0 or spread < 0:
        raise ValueError("the reading time must be positive and its spread non-negative")
    keys = sorted(a.key for a in arrivals)
    if spread == 0:
        return dict.fromkeys(keys, max(timedelta(minutes=minutes), _SHORTEST_READ))
    rng = random.Random(f"{seed}/reading")
    sigma = math.sqrt(math.log1p(spread**2))
    mu = math.log(minutes) - sigma**2 / 2
    # at least a second: a wide spread must not draw a read that takes no time at all
    return {key: max(timedelta(minutes=rng.lognormvariate(mu, sigma)), _SHORTEST_READ) for key in keys}


def _score(rng: random.Random, ai: Priority, missed: bool) -> float:
    if ai is Priority.STAT:
        return 0.85 + 0.15 * rng.betavariate(2, 2)
    if ai is Priority.URGENT:
        return 0.5 + 0.35 * rng.betavariate(2, 2)
    return 0.5 * rng.betavariate(1.5, 5.0) if missed else 0.5 * rng.betavariate(1.2, 5.0)


def synthetic_day(
    studies: int = DEFAULT_STUDIES, seed: int = DEFAULT_SEED, start: datetime = DAY_START
) -> list[Arrival]:
    """A day of arrivals under the assumptions of the module docstring; the same seed gives the same day."""
    if studies < 1:
        raise ValueError("a day needs at least one study")
    rng = random.Random(seed)
    hours = rng.choices(range(24), weights=HOURLY_PROFILE, k=studies)
    offsets = sorted(timedelta(hours=hour, seconds=rng.uniform(0, 3600)) for hour in hours)
    truths = list(TRUE_SHARE)
    classes = list(Priority)
    day = []
    for n, offset in enumerate(offsets, start=1):
        truth = rng.choices(truths, weights=list(TRUE_SHARE.values()))[0]
        ai = rng.choices(classes, weights=AI_GIVEN_TRUTH[truth])[0]
        missed = ai is Priority.ROUTINE and truth is not Priority.ROUTINE
        score = _score(rng, ai, missed)
        if rng.random() < UNSCORED_SHARE:
            day.append(Arrival(f"S{n:05d}", start + offset, None, None, truth))
        else:
            day.append(Arrival(f"S{n:05d}", start + offset, ai, round(score, 4), truth))
    return day


@dataclass(frozen=True)
class FileDay:
    """The studies read from a results file, and what could not be used."""

    arrivals: list[Arrival]
    lines: int
    unreadable: Counter[str]


def _line_time(line: str) -> tuple[int, bool] | None:
    """The line's own arrival time in ms (so that the parser believes it: a file is replayed long after the
    fact), and whether it is a dead letter; None for a line that is no JSON object with a timestamp."""
    try:
        body = json.loads(line)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    dead = body.get("schema") == DEAD_LETTER_SCHEMA
    sent = body.get("sent_at")
    if dead:  # the reference it carries says when the image arrived
        try:
            payload = json.loads(body.get("payload") or "")
        except (ValueError, TypeError):
            payload = None
        sent = (payload.get("sent_at") if isinstance(payload, dict) else None) or body.get("failed_at")
    if not isinstance(sent, str):
        return None
    try:
        return round(parse_timestamp(sent).timestamp() * 1000), dead
    except (ValueError, OverflowError):
        return None


def _study(images: Sequence[ImageEvent]) -> Arrival:
    """A study is classed as the store classes it (`ordering.study_class`), and arrived with its first image."""
    index, priority = study_class([(i.priority, i.score) for i in images])
    score = images[index].score if index is not None else None
    return Arrival(images[0].study_key, min(i.arrived_at for i in images), priority, score)


def read_results_file(path: Path, normal_labels: NormalLabels | Sequence[str] = ()) -> FileDay:
    """`cxr.result/v1` messages, one JSON object a line (dead letters too: their studies are unscored).

    A line that cannot be used is counted by reason, never fatal; images are de-duplicated on `event_id` and
    grouped into studies.
    """
    images: dict[str, ImageEvent] = {}
    unreadable: Counter[str] = Counter()
    lines = 0
    with Path(path).open(encoding="utf-8", errors="replace") as handle:
        for raw in handle:
            line = raw.strip()
            if not line:
                continue
            lines += 1
            found = _line_time(line)
            if found is None:
                unreadable["not a JSON object with a sent_at timestamp"] += 1
                continue
            moment, dead = found
            try:
                if dead:
                    _, event = read_dead_letter(line, moment, "file", 0, lines)
                else:
                    event = read_result(line, moment, normal_labels)
            except Unreadable as exc:
                unreadable[str(exc)] += 1
                continue
            if event is None:
                unreadable["a dead letter without an event id"] += 1
                continue
            old = images.get(event.event_id)
            if old is None or (old.priority is None and event.priority is not None):
                images[event.event_id] = event
    studies: dict[str, list[ImageEvent]] = {}
    for event in images.values():
        studies.setdefault(event.study_key, []).append(event)
    return FileDay([_study(group) for group in studies.values()], lines, unreadable)


# --- the command line ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _number(text: str, *, positive: bool = True) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"must be {'positive' if positive else 'zero or more'}: {text}")
    return value


def _positive_float(text: str) -> float:
    return _number(text)


def _non_negative_float(text: str) -> float:
    return _number(text, positive=False)


def _studies(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_STUDIES:
        raise argparse.ArgumentTypeError(f"at most {MAX_STUDIES:,} studies in a synthetic day: {value}")
    return value


def _cap(text: str) -> tuple[Priority, float]:
    name, sep, minutes = text.partition("=")
    try:
        priority = Priority(name.strip().upper())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CLASS=MINUTES with CLASS one of STAT, URGENT, ROUTINE: {text!r}"
        ) from None
    if not sep:
        raise argparse.ArgumentTypeError(f"expected CLASS=MINUTES, e.g. ROUTINE=120: {text!r}")
    return priority, _positive_float(minutes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `cxr worklist simulate`."""
    parser.add_argument(
        "--results",
        type=Path,
        metavar="FILE",
        help="JSON lines of cxr.result/v1 messages (e.g. collected from the results topic; dead letters count as"
        " unscored) to replay; default: a synthetic day",
    )
    parser.add_argument(
        "--studies",
        type=_studies,
        default=DEFAULT_STUDIES,
        metavar="N",
        help=f"studies in the synthetic day (default {DEFAULT_STUDIES:,})",
    )
    parser.add_argument(
        "--readers", type=_positive_int, default=DEFAULT_READERS, metavar="N", help="readers (default 2)"
    )
    parser.add_argument(
        "--read-minutes",
        type=_positive_float,
        default=DEFAULT_READ_MINUTES,
        metavar="M",
        help=f"mean minutes to read one study (default {DEFAULT_READ_MINUTES:g})",
    )
    parser.add_argument(
        "--read-spread",
        type=_non_negative_float,
        default=0.0,
        metavar="CV",
        help="coefficient of variation of the reading time, log-normal per study (default 0: fixed)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="seed of the synthetic day and reading times (default 1)"
    )
    parser.add_argument(
        "--max-wait",
        type=_cap,
        action="append",
        default=[],
        metavar="CLASS=MINUTES",
        help="a class's maximum wait for this run, overriding the settings (repeatable), e.g. ROUTINE=120",
    )
    parser.add_argument("--json", dest="as_json", action="store_true", help="print JSON instead of the table")


def caps(settings: Settings, overrides: Iterable[tuple[Priority, float]] = ()) -> MaxWait:
    """The settings' maximum waits, with `--max-wait` overrides in minutes."""
    max_wait = MaxWait.from_settings(settings)
    for priority, minutes in overrides:
        max_wait = replace(max_wait, **{priority.value.lower(): timedelta(minutes=minutes)})
    return max_wait


@dataclass(frozen=True)
class Report:
    """Everything the command prints, as data (the tests and `--json` read this)."""

    source: str
    studies: int
    readers: int
    read_minutes: float
    read_spread: float
    max_wait: MaxWait
    utilisation: float
    peak_hour: int
    peak_load: float
    classes: Mapping[Policy, Mapping[str, WaitSummary]]
    over_cap: Mapping[Policy, Mapping[str, int]]
    unreadable: Mapping[str, int]

    def as_dict(self) -> dict[str, Any]:
        def minutes(value: float | None) -> float | None:
            return None if value is None else round(value / 60, 2)

        return {
            "source": self.source,
            "studies": self.studies,
            "readers": self.readers,
            "read_minutes": self.read_minutes,
            "read_spread": self.read_spread,
            "max_wait_minutes": {
                p.value: self.max_wait.of(p).total_seconds() / 60
                for p in (Priority.STAT, Priority.URGENT, Priority.ROUTINE)
            },
            "utilisation": round(self.utilisation, 4),
            "peak_hour_studies": self.peak_hour,
            "peak_hour_load": round(self.peak_load, 4),
            "unreadable_lines": dict(self.unreadable),
            "unit": "minutes",
            "policies": {
                policy.value: {
                    name: {
                        "count": s.count,
                        "mean": minutes(s.mean),
                        "median": minutes(s.median),
                        "p95": minutes(s.p95),
                        "max": minutes(s.max),
                        "over_cap": self.over_cap[policy].get(name, 0),
                    }
                    for name, s in self.classes[policy].items()
                }
                for policy in self.classes
            },
        }


def compare(
    arrivals: Sequence[Arrival],
    *,
    readers: int,
    read_time: timedelta | Mapping[str, timedelta],
    max_wait: MaxWait,
    policies: Sequence[Policy] = POLICIES,
) -> dict[Policy, list[Outcome]]:
    """The same arrivals and reading times under each policy."""
    return {
        policy: simulate(arrivals, readers=readers, read_time=read_time, policy=policy, max_wait=max_wait)
        for policy in policies
    }


def _peak_hour(arrivals: Sequence[Arrival]) -> int:
    """The most arrivals in any clock hour (a queue forms where this exceeds what the readers can read)."""
    hours = Counter(a.arrived_at.replace(minute=0, second=0, microsecond=0) for a in arrivals)
    return max(hours.values(), default=0)


def report(
    arrivals: Sequence[Arrival],
    runs: Mapping[Policy, Sequence[Outcome]],
    *,
    source: str,
    readers: int,
    read_minutes: float,
    read_spread: float,
    max_wait: MaxWait,
    unreadable: Mapping[str, int] | None = None,
    min_span: timedelta = timedelta(0),
) -> Report:
    """The figures of a comparison; utilisation is over the day (at least `min_span`, e.g. the synthetic 24 h)."""
    busy = sum(((o.finished_at - o.started_at) for o in next(iter(runs.values()), [])), timedelta(0))
    start = min((a.arrived_at for a in arrivals), default=DAY_START)
    end = max([start + min_span] + [o.finished_at for outcomes in runs.values() for o in outcomes])
    span = (end - start).total_seconds()
    peak = _peak_hour(arrivals)
    return Report(
        source=source,
        studies=len(arrivals),
        readers=readers,
        read_minutes=read_minutes,
        read_spread=read_spread,
        max_wait=max_wait,
        utilisation=busy.total_seconds() / (readers * span) if span > 0 else 0.0,
        peak_hour=peak,
        peak_load=peak * read_minutes / (readers * 60),
        classes={policy: by_class(outcomes) for policy, outcomes in runs.items()},
        over_cap={policy: over_cap(outcomes) for policy, outcomes in runs.items()},
        unreadable=dict(unreadable or {}),
    )


def _fmt(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:,.1f}"


def render(rep: Report) -> Group:
    """The table, then what it assumed (caps, readers, load) in a few lines below it."""
    caps_text = ", ".join(
        f"{p.value} {rep.max_wait.of(p).total_seconds() / 60:g}"
        for p in (Priority.STAT, Priority.URGENT, Priority.ROUTINE)
    )
    reading = f"{rep.read_minutes:g} min a read" + (f" (CV {rep.read_spread:g})" if rep.read_spread else "")
    caption = [
        f"{rep.studies:,} studies ({rep.source}); {rep.readers} reader(s), {reading}.",
        f"Readers busy {rep.utilisation:.0%} of the day; busiest hour {rep.peak_hour} studies"
        f" = {rep.peak_load:.0%} of what they can read.",
        f"Caps (minutes): {caps_text}; only priority-with-caps acts on them.",
        "Over cap: reads that started after their class's cap.",
    ]
    if any(MISSED in classes for classes in rep.classes.values()):
        caption.append("Missed positives: truly STAT or URGENT studies the AI called ROUTINE (part of ROUTINE).")
    table = Table(title="Waits in minutes, by policy and class")
    table.add_column("policy")
    table.add_column("class")
    for name in ("count", "mean", "p95", "max", "over cap"):
        table.add_column(name, justify="right")
    for policy, classes in rep.classes.items():
        for n, (name, summary) in enumerate(classes.items()):
            table.add_row(
                policy.value if n == 0 else "",
                _LABELS.get(name, name),
                f"{summary.count:,}",
                _fmt(summary.mean),
                _fmt(summary.p95),
                _fmt(summary.max),
                f"{rep.over_cap[policy].get(name, 0):,}",
                end_section=n == len(classes) - 1,
            )
    return Group(table, *(Text(line) for line in caption))


def _console() -> Console:
    """A terminal's own width; a pipe or file gets room for the whole table (rich would assume 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 100))


def run_simulation(args: argparse.Namespace, settings: Settings) -> int:
    """Replay the day under the three policies and print the waits; 0 on success, 2 when nothing can be read."""
    max_wait = caps(settings, args.max_wait)
    unreadable: Counter[str] = Counter()
    if args.results is not None:
        if not Path(args.results).is_file():
            raise FileNotFoundError(f"no results file {args.results}")
        day = read_results_file(args.results, NormalLabels.of_bundle(settings.model_bundle))
        arrivals, unreadable, source = day.arrivals, day.unreadable, f"results file {Path(args.results).name}"
        if unreadable:
            log.warning(
                "skipped %d of %d lines: %s",
                sum(unreadable.values()),
                day.lines,
                "; ".join(f"{reason} ({n})" for reason, n in unreadable.most_common()),
            )
        if not arrivals:
            log.error("no usable result in %s: nothing to simulate", args.results)
            return 2
    else:
        arrivals, source = synthetic_day(args.studies, args.seed), "synthetic"
    read_time = reading_times(arrivals, args.read_minutes, args.read_spread, args.seed)
    runs = compare(arrivals, readers=args.readers, read_time=read_time, max_wait=max_wait)
    rep = report(
        arrivals,
        runs,
        source=source if args.results is not None else f"synthetic day, seed {args.seed}",
        readers=args.readers,
        read_minutes=args.read_minutes,
        read_spread=args.read_spread,
        max_wait=max_wait,
        unreadable=unreadable,
        min_span=DAY if args.results is None else timedelta(0),
    )
    if args.as_json:
        print(json.dumps(rep.as_dict(), indent=2, ensure_ascii=False))
    else:
        _console().print(render(rep))
    return 0
