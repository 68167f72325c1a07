"""The worklist's durable state: one SQLite file (WAL) holding studies, their images, the dead letters, what
readers did, a change log for live updates, and the Kafka offsets the rows came from.

Offsets are written in the same transaction as the rows they produced, so a crash at any moment either keeps
both or neither: the consumer resumes exactly where the file says, never skipping and never counting twice
(images are keyed by `event_id` anyway, so a replayed result is a no-op). Times are stored as UTC epoch seconds.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from streaming.contracts import rfc3339
from streaming.triage import PRIORITY_RANK, Priority
from worklist.events import KIND_RANK, DeadLetter, ImageEvent, Kind
from worklist.ordering import Entry, MaxWait, Placed, Policy, order, study_class
from worklist.waits import WaitSummary, summarize

SCHEMA_VERSION = 1
#: The change log keeps this many entries: a page that was away for longer reconciles from the snapshot.
CHANGES_KEPT = 50_000


class Status(StrEnum):
    UNREAD = "unread"
    CLAIMED = "claimed"
    READ = "read"
    DISMISSED = "dismissed"


OPEN = (Status.UNREAD, Status.CLAIMED)
CLOSED = (Status.READ, Status.DISMISSED)


class StoreError(Exception):
    """A request the worklist refuses; `status` is the HTTP status that says so."""

    status = 400


class NotFound(StoreError):
    status = 404


class Conflict(StoreError):
    status = 409


class Verdict(StrEnum):
    AGREE = "agree"
    DISAGREE = "disagree"


@dataclass(frozen=True)
class Change:
    id: int
    at: datetime
    #: the study that changed, or None for a new dead letter
    study_key: str | None
    what: str


@dataclass(frozen=True)
class ScoringStatus:
    """Whether results are still coming: `stalled` when an image has waited longer than allowed for its
    result and no result at all arrived in that time (the job is down or stuck)."""

    state: str  # "live", "idle" (nothing waiting) or "stalled"
    pending: int
    oldest_pending_at: datetime | None
    last_scored_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pending": self.pending,
            "oldest_pending_at": _iso(self.oldest_pending_at),
            "last_scored_at": _iso(self.last_scored_at),
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS images (
    event_id TEXT PRIMARY KEY, study_key TEXT NOT NULL, kind TEXT NOT NULL,
    arrived_at REAL NOT NULL, at REAL NOT NULL,
    study_uid TEXT, series_uid TEXT, sop_instance_uid TEXT, accession TEXT, uri TEXT,
    priority TEXT, top_finding TEXT, score REAL, scores TEXT, model_name TEXT, model_version TEXT,
    stage TEXT, error TEXT, reason TEXT);
CREATE INDEX IF NOT EXISTS images_by_study ON images (study_key);
CREATE INDEX IF NOT EXISTS images_by_kind ON images (kind, arrived_at);
CREATE TABLE IF NOT EXISTS studies (
    key TEXT PRIMARY KEY, study_uid TEXT, accession TEXT, arrived_at REAL NOT NULL,
    ai_priority TEXT, score REAL, top_finding TEXT, model_name TEXT, model_version TEXT,
    images INTEGER NOT NULL DEFAULT 0, scored INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'unread', claimed_by TEXT, claimed_at REAL,
    closed_at REAL, closed_by TEXT, dismiss_reason TEXT,
    person_priority TEXT, person_priority_by TEXT, person_priority_at REAL, queued_from REAL,
    updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS studies_by_status ON studies (status, closed_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
    event_id TEXT, study_key TEXT, stage TEXT NOT NULL, error TEXT NOT NULL, reason TEXT NOT NULL,
    failed_at REAL NOT NULL,
    -- a replayed letter is the same record, while a recreated topic reuses offsets for other letters
    UNIQUE (topic, partition, offset, failed_at, error));
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (failed_at);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, study_key TEXT NOT NULL, model_name TEXT, model_version TEXT,
    finding TEXT, verdict TEXT NOT NULL, reader TEXT, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, study_key TEXT, what TEXT NOT NULL);
"""


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else rfc3339(moment)


def _position(rank: int | None) -> int | None:
    return None if rank is None else rank + 1


def _priority(value: str | None) -> Priority | None:
    return Priority(value) if value else None


class WorklistStore:
    """All reads and writes of the worklist file. Thread-safe: one connection behind a lock (every call is
    milliseconds; the consumer and the API share it)."""

    def __init__(self, path: Path, max_wait: MaxWait | None = None) -> None:
        self.path = Path(path)
        self.max_wait = max_wait or MaxWait()
        self._lock = threading.RLock()
        try:
            if self.path.exists() and not self.path.is_file():
                raise StoreError(f"{self.path} is not a regular file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
            self._open()
        except (sqlite3.Error, OSError, StoreError) as exc:
            # A file that is not a worklist, a folder, a device, no permission: the operator's to fix (exit 2).
            raise StoreError(f"cannot use {self.path} as the worklist's database: {exc}") from None

    def _open(self) -> None:
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a reader's "read" must survive a power cut, not only the Kafka rows (which would be re-read).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"it has worklist schema {row[0]}, this version reads {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back by itself (a full disk): the original error is the one to see.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # Kafka side ----------------------------------------------------------------------------------

    def offsets(self) -> dict[tuple[str, int], int]:
        """Where to resume: the next offset to read, per (topic, partition)."""
        with self._lock:
            rows = self._db.execute("SELECT topic, partition, next_offset FROM offsets").fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    def apply(
        self, records: Sequence[ImageEvent | DeadLetter], next_offsets: Mapping[tuple[str, int], int]
    ) -> set[str]:
        """Apply one poll's records and move the offsets past them, atomically. Returns the studies changed."""
        now = _ts(datetime.now(UTC))
        changed: set[str] = set()
        with self._transaction() as db:
            for record in records:
                if isinstance(record, DeadLetter):
                    if self._add_dead_letter(db, record):
                        db.execute("INSERT INTO changes (at, study_key, what) VALUES (?, NULL, 'dead_letter')", (now,))
                elif self._add_image(db, record, now):
                    changed.add(record.study_key)
            for key in changed:
                db.execute("INSERT INTO changes (at, study_key, what) VALUES (?, ?, 'study')", (now, key))
            for (topic, partition), offset in next_offsets.items():
                db.execute(
                    "INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (topic, partition) DO UPDATE SET"
                    " next_offset = excluded.next_offset",
                    (topic, partition, offset),
                )
        return changed

    @staticmethod
    def _add_dead_letter(db: sqlite3.Connection, letter: DeadLetter) -> bool:
        cursor = db.execute(
            "INSERT OR IGNORE INTO dead_letters (topic, partition, offset, event_id, study_key, stage, error, reason,"
            " failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                letter.topic,
                letter.partition,
                letter.offset,
                letter.event_id,
                letter.study_key,
                letter.stage,
                letter.error,
                letter.reason,
                _ts(letter.failed_at),
            ),
        )
        return cursor.rowcount > 0

    def _add_image(self, db: sqlite3.Connection, event: ImageEvent, now: float) -> bool:
        known = "SELECT kind, arrived_at, study_key FROM images WHERE event_id = ?"
        old = db.execute(known, (event.event_id,)).fetchone()
        if old is not None and KIND_RANK[Kind(old["kind"])] >= KIND_RANK[event.kind]:
            return False  # a replay, or older news than what we have
        arrived = _ts(event.arrived_at) if old is None else min(old["arrived_at"], _ts(event.arrived_at))
        # An image stays with the study it was first filed under (a result's key equals its reference's anyway).
        key = event.study_key if old is None else old["study_key"]
        db.execute(
            "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event.event_id,
                key,
                event.kind.value,
                arrived,
                _ts(event.at),
                event.study_uid,
                event.series_uid,
                event.sop_instance_uid,
                event.accession,
                event.uri,
                event.priority.value if event.priority else None,
                event.top_finding,
                event.score,
                json.dumps(dict(event.scores)) if event.scores else None,
                event.model_name,
                event.model_version,
                event.stage,
                event.error,
                event.reason,
            ),
        )
        if event.kind is Kind.SCORED:
            db.execute(
                "INSERT INTO meta VALUES ('last_scored_at', ?) ON CONFLICT (key) DO UPDATE SET value ="
                " max(CAST(value AS REAL), CAST(excluded.value AS REAL))",
                (str(_ts(event.at)),),
            )
        self._refresh_study(db, key, now, new_image=old is None)
        return True

    @staticmethod
    def _refresh_study(db: sqlite3.Connection, key: str, now: float, *, new_image: bool) -> None:
        """A study is as urgent as its most urgent image; its score and finding are that image's.

        Three rules keep the queue honest. A study whose scored images are all ROUTINE while another image is
        still waiting or failed counts as unscored: nobody knows yet that the rest is routine. A new image of a
        study already read puts it back on the queue, waiting from that image's arrival (not from the first
        image's, which would make it overdue at once). A priority a person set stands, unless an image scored
        after they set it is more urgent: the AI never lowers a person's priority, but news they have not
        seen may raise it.
        """
        existing = db.execute(
            "SELECT status, queued_from, person_priority, person_priority_at FROM studies WHERE key = ?", (key,)
        ).fetchone()
        images = db.execute("SELECT * FROM images WHERE study_key = ?", (key,)).fetchall()
        newest = max(images, key=lambda i: i["arrived_at"])
        reopen = new_image and existing is not None and existing["status"] in CLOSED
        queued_from = newest["arrived_at"] if reopen else (existing["queued_from"] if existing else None)
        scored = [i for i in images if i["kind"] == Kind.SCORED]
        index, ai_priority = study_class(
            [(Priority(i["priority"]) if i["kind"] == Kind.SCORED else None, i["score"]) for i in images]
        )
        lead = images[index] if index is not None else None
        waiting = [i["arrived_at"] for i in images if queued_from is None or i["arrived_at"] >= queued_from]
        values = {
            "study_uid": next((i["study_uid"] for i in images if i["study_uid"]), None),
            "accession": next((i["accession"] for i in images if i["accession"]), None),
            "arrived_at": min(waiting or [newest["arrived_at"]]),
            "queued_from": queued_from,
            "ai_priority": ai_priority.value if ai_priority else None,
            "score": lead["score"] if lead else None,
            "top_finding": lead["top_finding"] if lead else None,
            "model_name": lead["model_name"] if lead else None,
            "model_version": lead["model_version"] if lead else None,
            "images": len(images),
            "scored": len(scored),
            "failed": sum(1 for i in images if i["kind"] == Kind.FAILED),
            "updated_at": now,
        }
        if existing is None:
            columns = ", ".join(["key", *values])
            marks = ", ".join("?" * (len(values) + 1))
            db.execute(f"INSERT INTO studies ({columns}) VALUES ({marks})", (key, *values.values()))
            return
        person = _priority(existing["person_priority"])
        if person is not None and any(
            i["at"] > (existing["person_priority_at"] or 0.0)
            and PRIORITY_RANK[Priority(i["priority"])] < PRIORITY_RANK[person]
            for i in scored
        ):
            values |= {"person_priority": None, "person_priority_by": None, "person_priority_at": None}
        if reopen:
            values |= {
                "status": Status.UNREAD.value,
                "closed_at": None,
                "closed_by": None,
                "dismiss_reason": None,
                "claimed_by": None,
                "claimed_at": None,
            }
        assignments = ", ".join(f"{name} = ?" for name in values)
        db.execute(f"UPDATE studies SET {assignments} WHERE key = ?", (*values.values(), key))

    # The queue -----------------------------------------------------------------------------------

    @staticmethod
    def _entry(row: sqlite3.Row) -> Entry:
        return Entry(
            key=row["key"],
            arrived_at=_dt(row["arrived_at"]) or datetime.now(UTC),
            ai_priority=_priority(row["ai_priority"]),
            score=row["score"],
            person_priority=_priority(row["person_priority"]),
        )

    def _event_ids(self, keys: Collection[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {k: [] for k in keys}
        if not keys:
            return out
        for row in self._db.execute(
            "SELECT study_key, event_id FROM images WHERE study_key IN (SELECT value FROM json_each(?))"
            " ORDER BY arrived_at, event_id",
            (json.dumps(list(keys)),),
        ):
            out[row[0]].append(row[1])
        return out

    def _view(self, row: sqlite3.Row, placed: Placed, event_ids: list[str], position: int | None) -> dict[str, Any]:
        model = {"name": row["model_name"], "version": row["model_version"]} if row["model_name"] else None
        pending = row["images"] - row["scored"] - row["failed"]
        return {
            "key": row["key"],
            "study_uid": row["study_uid"],
            "accession": row["accession"],
            "priority": placed.priority.value if placed.priority else None,
            "ai_priority": row["ai_priority"],
            "person_priority": row["person_priority"],
            "person_priority_by": row["person_priority_by"],
            "top_finding": row["top_finding"],
            "score": row["score"],
            "arrived_at": _iso(_dt(row["arrived_at"])),
            "due_at": _iso(placed.due_at),
            "overdue": placed.overdue and row["status"] in OPEN,
            "status": row["status"],
            "claimed_by": row["claimed_by"],
            "closed_at": _iso(_dt(row["closed_at"])),
            "closed_by": row["closed_by"],
            "event_ids": event_ids,
            "model": model,
            "images": {"total": row["images"], "scored": row["scored"], "failed": row["failed"], "pending": pending},
            "position": position,
        }

    def queue(
        self,
        now: datetime,
        *,
        statuses: Collection[Status] = OPEN,
        priorities: Collection[str] | None = None,
        finding: str | None = None,
        offset: int = 0,
        limit: int = 100,
        policy: Policy = Policy.CAPPED,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total matching, one page): open studies in reading order, closed ones most recently closed first.

        `position` is the study's place in the whole queue, so a filtered page still says who comes first.
        `priorities` may name "UNSCORED" for studies no image of which has been scored.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM studies WHERE status IN (SELECT value FROM json_each(?))",
                (json.dumps([str(s) for s in statuses]),),
            ).fetchall()
            by_key = {r["key"]: r for r in rows}
            placed = order((self._entry(r) for r in rows), now, self.max_wait, policy)
            is_open = {key: row["status"] in OPEN for key, row in by_key.items()}
            open_rank = {key: i for i, key in enumerate(p.entry.key for p in placed if is_open[p.entry.key])}
            if not all(s in OPEN for s in statuses):
                placed.sort(key=lambda p: (not is_open[p.entry.key], -(by_key[p.entry.key]["closed_at"] or 0)))
            wanted = {p.upper() for p in priorities} if priorities else None
            matching = [
                p
                for p in placed
                if (wanted is None or (p.priority.value if p.priority else "UNSCORED") in wanted)
                and (finding is None or (by_key[p.entry.key]["top_finding"] or "").lower() == finding.lower())
            ]
            page = matching[offset : offset + limit]
            ids = self._event_ids([p.entry.key for p in page])
            items = [
                self._view(by_key[p.entry.key], p, ids[p.entry.key], _position(open_rank.get(p.entry.key)))
                for p in page
            ]
        return len(matching), items

    def open_positions(self, now: datetime) -> dict[str, int]:
        """Every open study's place in the queue, from the few columns ordering needs (no views built)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, arrived_at, ai_priority, score, person_priority FROM studies"
                " WHERE status IN ('unread', 'claimed')"
            ).fetchall()
        placed = order((self._entry(r) for r in rows), now, self.max_wait)
        return {p.entry.key: i for i, p in enumerate(placed, 1)}

    def studies(self, keys: Collection[str], now: datetime) -> dict[str, dict[str, Any] | None]:
        """Several studies at once (None for one that is gone), ordering the queue once for all of them."""
        positions = self.open_positions(now)
        out: dict[str, dict[str, Any] | None] = {}
        for key in keys:
            try:
                out[key] = self.study(key, now, positions)
            except NotFound:
                out[key] = None
        return out

    def study(self, key: str, now: datetime, positions: Mapping[str, int] | None = None) -> dict[str, Any]:
        """One study with its images (each image's scores, or why it could not be scored)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM studies WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"no study {key!r} on the worklist")
            position = None
            if row["status"] in OPEN:
                position = (positions if positions is not None else self.open_positions(now)).get(key)
            images = self._db.execute(
                "SELECT * FROM images WHERE study_key = ? ORDER BY arrived_at, event_id", (key,)
            ).fetchall()
            feedback = self._db.execute(
                "SELECT verdict, finding, reader, at, model_name, model_version FROM feedback WHERE study_key = ?"
                " ORDER BY id",
                (key,),
            ).fetchall()
            view = self._view(row, self._place(row, now), [i["event_id"] for i in images], position)
        view["image_list"] = [
            {
                "event_id": i["event_id"],
                "state": i["kind"],
                "uri": i["uri"],
                "series_uid": i["series_uid"],
                "sop_instance_uid": i["sop_instance_uid"],
                "arrived_at": _iso(_dt(i["arrived_at"])),
                "priority": i["priority"],
                "top_finding": i["top_finding"],
                "score": i["score"],
                "scores": json.loads(i["scores"]) if i["scores"] else None,
                "model": {"name": i["model_name"], "version": i["model_version"]} if i["model_name"] else None,
                "error": {"stage": i["stage"], "code": i["error"], "reason": i["reason"]} if i["error"] else None,
            }
            for i in images
        ]
        view["feedback"] = [
            {
                "verdict": f["verdict"],
                "finding": f["finding"],
                "reader": f["reader"],
                "at": _iso(_dt(f["at"])),
                "model": {"name": f["model_name"], "version": f["model_version"]},
            }
            for f in feedback
        ]
        return view

    def _place(self, row: sqlite3.Row, now: datetime) -> Placed:
        return order([self._entry(row)], now, self.max_wait)[0]

    def image_uri(self, key: str) -> str | None:
        """The image a thumbnail shows: the study's deciding scored image, else its first."""
        with self._lock:
            row = self._db.execute(
                "SELECT uri FROM images WHERE study_key = ? AND uri IS NOT NULL ORDER BY kind = 'scored' DESC,"
                " score DESC, arrived_at LIMIT 1",
                (key,),
            ).fetchone()
            if row is None and self._db.execute("SELECT 1 FROM studies WHERE key = ?", (key,)).fetchone() is None:
                raise NotFound(f"no study {key!r} on the worklist")
        return row[0] if row else None

    # What readers do -----------------------------------------------------------------------------

    def _act(
        self,
        key: str,
        what: str,
        sql: str,
        params: Sequence[Any],
        allowed: Collection[str],
        reader: str | None = None,
    ) -> None:
        """One reader's action, refused when the study's state does not allow it. A named reader cannot read or
        dismiss a study another reader has claimed (two people reporting one study); releasing stays open to
        anyone, so a claim left by someone who went home can be taken over."""
        now = _ts(datetime.now(UTC))
        with self._transaction() as db:
            row = db.execute("SELECT status, claimed_by FROM studies WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"no study {key!r} on the worklist")
            if row["status"] not in allowed:
                raise Conflict(f"the study is {row['status']}; it cannot be {what}")
            if reader is not None and row["status"] == Status.CLAIMED and row["claimed_by"] not in (None, reader):
                raise Conflict(f"the study is claimed by {row['claimed_by']}; release it first")
            db.execute(sql, (*params, key))
            db.execute("INSERT INTO changes (at, study_key, what) VALUES (?, ?, ?)", (now, key, what))

    def claim(self, key: str, reader: str) -> None:
        """Claim a study for reading; a study another reader claimed is refused (release it first)."""
        with self._lock:
            row = self._db.execute("SELECT claimed_by, status FROM studies WHERE key = ?", (key,)).fetchone()
            if row is not None and row["status"] == Status.CLAIMED and row["claimed_by"] != reader:
                raise Conflict(f"the study is claimed by {row['claimed_by']}")
            self._act(
                key,
                "claimed",
                "UPDATE studies SET status = 'claimed', claimed_by = ?, claimed_at = ? WHERE key = ?",
                (reader, _ts(datetime.now(UTC))),
                OPEN,
            )

    def release(self, key: str) -> None:
        self._act(
            key,
            "released",
            "UPDATE studies SET status = 'unread', claimed_by = NULL, claimed_at = NULL WHERE key = ?",
            (),
            OPEN,
        )

    def mark_read(self, key: str, reader: str | None) -> None:
        self._act(
            key,
            "read",
            "UPDATE studies SET status = 'read', closed_at = ?, closed_by = ? WHERE key = ?",
            (_ts(datetime.now(UTC)), reader),
            OPEN,
            reader,
        )

    def dismiss(self, key: str, reader: str | None, reason: str | None) -> None:
        self._act(
            key,
            "dismissed",
            "UPDATE studies SET status = 'dismissed', closed_at = ?, closed_by = ?, dismiss_reason = ? WHERE key = ?",
            (_ts(datetime.now(UTC)), reader, reason),
            OPEN,
            reader,
        )

    def reopen(self, key: str) -> None:
        self._act(
            key,
            "reopened",
            "UPDATE studies SET status = 'unread', closed_at = NULL, closed_by = NULL, dismiss_reason = NULL,"
            " claimed_by = NULL, claimed_at = NULL WHERE key = ?",
            (),
            CLOSED,
        )

    def set_priority(self, key: str, priority: Priority | None, reader: str | None) -> None:
        """A person's priority for the study (None gives the decision back to the AI)."""
        self._act(
            key,
            "prioritised",
            "UPDATE studies SET person_priority = ?, person_priority_by = ?, person_priority_at = ? WHERE key = ?",
            (
                priority.value if priority else None,
                reader if priority else None,
                _ts(datetime.now(UTC)) if priority else None,
            ),
            (*OPEN, *CLOSED),
        )

    def add_feedback(self, key: str, verdict: Verdict, reader: str | None) -> None:
        """Agree or disagree with the AI's finding for the study; counted per model version."""
        now = _ts(datetime.now(UTC))
        with self._transaction() as db:
            ai = "SELECT model_name, model_version, top_finding FROM studies WHERE key = ?"
            row = db.execute(ai, (key,)).fetchone()
            if row is None:
                raise NotFound(f"no study {key!r} on the worklist")
            if row["model_name"] is None:
                raise Conflict("no image of this study has been scored: there is no AI finding to judge")
            db.execute(
                "INSERT INTO feedback (study_key, model_name, model_version, finding, verdict, reader, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, row["model_name"], row["model_version"], row["top_finding"], Verdict(verdict).value, reader, now),
            )
            db.execute("INSERT INTO changes (at, study_key, what) VALUES (?, ?, 'feedback')", (now, key))

    def feedback_summary(self) -> list[dict[str, Any]]:
        """Agreement per model version (the latest verdict of each reader on each study counts once)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model_name, model_version, verdict, count(*) FROM feedback WHERE id IN"
                " (SELECT max(id) FROM feedback GROUP BY study_key, model_name, model_version, coalesce(reader, ''))"
                " GROUP BY model_name, model_version, verdict ORDER BY model_name, model_version"
            ).fetchall()
        summary: dict[tuple[str, str], dict[str, Any]] = {}
        for name, version, verdict, count in rows:
            empty = {"model": {"name": name, "version": version}, "agree": 0, "disagree": 0}
            item = summary.setdefault((name, version), empty)
            item[verdict] = count
        for item in summary.values():
            total = item["agree"] + item["disagree"]
            item["agreement"] = item["agree"] / total if total else None
        return list(summary.values())

    # Dead letters, health, figures ---------------------------------------------------------------

    def dead_letters(self, *, offset: int = 0, limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
        with self._lock:
            total = self._db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            rows = self._db.execute(
                "SELECT * FROM dead_letters ORDER BY failed_at DESC, offset DESC LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return total, [
            {
                "event_id": r["event_id"],
                "study_key": r["study_key"],
                "stage": r["stage"],
                "error": r["error"],
                "reason": r["reason"],
                "failed_at": _iso(_dt(r["failed_at"])),
                "source": {"topic": r["topic"], "partition": r["partition"], "offset": r["offset"]},
            }
            for r in rows
        ]

    def scoring_status(self, now: datetime, stale_after: timedelta) -> ScoringStatus:
        with self._lock:
            pending, oldest = self._db.execute(
                "SELECT count(*), min(arrived_at) FROM images WHERE kind = 'announced'"
            ).fetchone()
            last = self._db.execute("SELECT value FROM meta WHERE key = 'last_scored_at'").fetchone()
        oldest_at = _dt(oldest)
        last_at = _dt(float(last[0])) if last else None
        if not pending or oldest_at is None:
            state = "idle"
        elif now - oldest_at > stale_after and (last_at is None or now - last_at > stale_after):
            state = "stalled"
        else:
            state = "live"
        return ScoringStatus(state, pending, oldest_at, last_at)

    def wait_figures(self, now: datetime, since: datetime) -> dict[str, WaitSummary]:
        """Per class, the waits of studies that arrived since `since`: until read (or dismissed), or until now
        for those still open. UNSCORED is the class of studies no image of which was scored."""
        with self._lock:
            rows = self._db.execute(
                "SELECT arrived_at, closed_at, coalesce(person_priority, ai_priority) AS priority FROM studies"
                " WHERE arrived_at >= ?",
                (_ts(since),),
            ).fetchall()
        waits: dict[str, list[float]] = {name: [] for name in (*(p.value for p in Priority), "UNSCORED")}
        for row in rows:
            end = row["closed_at"] if row["closed_at"] is not None else _ts(now)
            waits[row["priority"] or "UNSCORED"].append(max(0.0, end - row["arrived_at"]))
        return {name: summarize(values) for name, values in waits.items()}

    def image_counts(self) -> dict[str, int]:
        """Images by state: announced (waiting for scoring), scored, failed."""
        with self._lock:
            rows = self._db.execute("SELECT kind, count(*) FROM images GROUP BY kind").fetchall()
        return {str(k): 0 for k in Kind} | {r[0]: r[1] for r in rows}

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, count(*) FROM studies GROUP BY status").fetchall()
        return {str(s): 0 for s in Status} | {r[0]: r[1] for r in rows}

    # Live updates --------------------------------------------------------------------------------

    def changes_since(self, last_id: int, limit: int = 500) -> list[Change]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, at, study_key, what FROM changes WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit)
            ).fetchall()
        return [Change(r[0], _dt(r[1]) or datetime.now(UTC), r[2], r[3]) for r in rows]

    def change_range(self) -> tuple[int, int]:
        """(first kept, last) change ids; (0, 0) when there are none yet."""
        with self._lock:
            first, last = self._db.execute("SELECT min(id), max(id) FROM changes").fetchone()
            if last is None:
                seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
                return (seq[0] + 1, seq[0]) if seq else (0, 0)
        return first, last

    def snapshot(self, now: datetime, stale_after: timedelta, limit: int = 500) -> dict[str, Any]:
        """The head of the open queue (`total` says how long it is) and the change id it is current to, read in
        one transaction: a page applies it, then follows the events after that id."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                _, last = self.change_range()
                total, items = self.queue(now, limit=limit)
                _, letters = self.dead_letters(limit=100)
                scoring = self.scoring_status(now, stale_after)
            finally:
                self._db.execute("COMMIT")
        return {
            "last_event_id": last,
            "now": rfc3339(now),
            "total": total,
            "items": items,
            "dead_letters": letters,
            "scoring": scoring.as_dict(),
        }

    # Housekeeping --------------------------------------------------------------------------------

    def prune(self, now: datetime, retention: timedelta) -> int:
        """Forget studies closed longer ago than `retention`, old dead letters and an overlong change log."""
        cutoff = _ts(now - retention)
        with self._transaction() as db:
            closed = "SELECT key FROM studies WHERE status IN ('read', 'dismissed') AND closed_at < ?"
            keys = [r[0] for r in db.execute(closed, (cutoff,))]
            for key in keys:
                db.execute("DELETE FROM images WHERE study_key = ?", (key,))
                db.execute("DELETE FROM studies WHERE key = ?", (key,))
            db.execute("DELETE FROM dead_letters WHERE failed_at < ?", (cutoff,))
            db.execute("DELETE FROM changes WHERE id <= (SELECT max(id) FROM changes) - ?", (CHANGES_KEPT,))
        return len(keys)
