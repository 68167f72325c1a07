"""What the worklist's store costs, measured: writing a poll's records with their offsets, and reading the queue
as it grows.

Writes, side by side on the same records: `per-poll` is what ships (one transaction per Kafka poll of up to
500 records, the offsets in it); `per-record` commits each record with its offset on its own, what a consumer
that wrote as it read would do. Both keep the file durable (WAL, synchronous=FULL), so the ratio is the price
of a commit. Reads, at several sizes of open queue: a page of the queue, one study (with its place), the
snapshot a page starts from, and the events for a batch of changes. Usage:
    .venv/bin/python -m bench.worklist [--records 5000] [--sizes 1000,5000,20000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from streaming.triage import Priority
from worklist.events import ImageEvent, Kind
from worklist.live import EventFeed
from worklist.store import WorklistStore


def scored(i: int, now: datetime, rng: random.Random) -> ImageEvent:
    priority = rng.choices(list(Priority), weights=(3, 14, 83))[0]
    score = rng.random()
    return ImageEvent(
        Kind.SCORED,
        event_id=f"e{i}",
        study_key=f"1.2.826.0.1.{i // 2}",  # two images a study
        arrived_at=now - timedelta(seconds=rng.randint(0, 4 * 3600)),
        at=now,
        study_uid=f"1.2.826.0.1.{i // 2}",
        uri=f"file:///xrays/{i}.dcm",
        priority=priority,
        top_finding="PNEUMONIA" if priority is not Priority.ROUTINE else None,
        score=score,
        scores={"NORMAL": 1 - score, "PNEUMONIA": score},
        model_name="pneumonia-xception",
        model_version="0.3.0",
    )


def write(path: Path, records: list[ImageEvent], per_poll: bool) -> float:
    """Records per second into a fresh file."""
    store = WorklistStore(path)
    started = time.perf_counter()
    if per_poll:
        for start in range(0, len(records), 500):
            store.apply(records[start : start + 500], {("cxr.results", 0): start + 500})
    else:
        for offset, record in enumerate(records):
            store.apply([record], {("cxr.results", 0): offset + 1})
    elapsed = time.perf_counter() - started
    store.close()
    return len(records) / elapsed


def timed(fn: Callable[[], object], rounds: int = 3) -> float:
    """Best of `rounds`, in milliseconds."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def reads(store: WorklistStore, key: str) -> tuple[float, ...]:
    """A page of the queue, one study, the snapshot, the events for 50 changes (rendered afresh each round)."""
    feed = EventFeed(store, lambda: {"connected": True}, timedelta(minutes=2))
    changes = store.changes_since(0, limit=50)

    def events() -> None:
        feed._rendered.clear()
        feed.render(changes)

    return (
        timed(lambda: store.queue(datetime.now(UTC), limit=100)),
        timed(lambda: store.study(key, datetime.now(UTC))),
        timed(lambda: store.snapshot(datetime.now(UTC), timedelta(minutes=2))),
        timed(events),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--sizes", default="1000,5000,20000", help="open studies to read the queue at")
    args = parser.parse_args()
    rng = random.Random(1)
    now = datetime.now(UTC)
    folder = Path(tempfile.mkdtemp(prefix="cxr-bench-worklist-"))

    records = [scored(i, now, rng) for i in range(args.records)]
    poll = write(folder / "poll.db", records, per_poll=True)
    single = write(folder / "single.db", records, per_poll=False)
    print(f"writes, {args.records} results with their offsets (durable: WAL, synchronous=FULL)")
    print(f"  per-poll (ships)   {poll:9.0f} records/s")
    print(f"  per-record         {single:9.0f} records/s")
    print(f"  ratio              {poll / single:9.1f}x")

    print("\nreads, milliseconds (best of 3)")
    print(f"  {'open studies':>12} {'queue page':>11} {'one study':>10} {'snapshot':>9} {'events x50':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
        store = WorklistStore(folder / f"read-{size}.db")
        batch = [scored(i, now, rng) for i in range(2 * size)]
        for start in range(0, len(batch), 500):
            store.apply(batch[start : start + 500], {})
        row = reads(store, batch[len(batch) // 2].study_key)
        print(f"  {size:>12} {row[0]:>11.1f} {row[1]:>10.1f} {row[2]:>9.1f} {row[3]:>11.1f}")
        store.close()


if __name__ == "__main__":
    main()
