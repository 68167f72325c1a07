"""How far an exporter has read the results topic: its own offsets, in one file under `CXR_STATE_DIR`.

The exporters join no consumer group (a group rebalance would hand a half-exported partition to another
process, and a commit to Kafka is not written together with what was exported). The cursor is saved after
what it covers was delivered, so a crash at any moment repeats at most the results since the last save, and
the deterministic ids (`ids`) make that repeat overwrite instead of duplicate.

One file per exporter and per (results topic, destinations): pointing an exporter at a new destination starts
a new cursor, so the new place receives everything the topic still holds, not only what comes next.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from producers.state import StateError, read_json, state_file, write_atomic
from streaming.contracts import dumps, now_utc, rfc3339

SCHEMA = "cxr.export-cursor/v1"
#: A partition number as the cursor writes it: ASCII digits, no sign, no leading zero ("01" and "1" would merge).
_PARTITION = re.compile(r"0|[1-9][0-9]{0,8}")


@dataclass
class ExportCursor:
    """The next offset to export per partition of the results topic."""

    path: Path
    source: str
    offsets: dict[int, int] = field(default_factory=dict)

    @classmethod
    def open(cls, state_dir: Path, exporter: str, source: str) -> ExportCursor:
        """The cursor of `exporter` for `source` (the results topic and the destinations, without credentials);
        empty on a first start. `StateError` when the file exists but is not a cursor of this source: guessing
        would skip results or send them all again."""
        path = state_file(state_dir, f"export-{exporter}", source)
        data = read_json(path)
        if data is None:
            return cls(path, source)
        if data.get("schema") != SCHEMA or data.get("source") != source:
            raise StateError(f"the state file {path} is not an export cursor for {source}")
        raw = data.get("offsets")
        if not isinstance(raw, dict):
            raise StateError(f"the state file {path} is corrupt (no offsets)")
        offsets: dict[int, int] = {}
        for key, value in raw.items():
            if not _PARTITION.fullmatch(key) or isinstance(value, bool) or not isinstance(value, int):
                raise StateError(f"the state file {path} is corrupt (offsets are not partition: offset)")
            if value < 0:
                raise StateError(f"the state file {path} is corrupt (a negative offset)")
            offsets[int(key)] = value
        return cls(path, source, offsets)

    def stored(self, topic: str) -> dict[tuple[str, int], int]:
        """The offsets as `streaming.positions.plan_seeks` takes them."""
        return {(topic, partition): offset for partition, offset in self.offsets.items()}

    def advance(self, moved: Mapping[int, int]) -> bool:
        """Take the next offsets of partitions that moved; True when anything changed."""
        changed = {p: o for p, o in moved.items() if self.offsets.get(p) != o}
        self.offsets.update(changed)
        return bool(changed)

    def save(self) -> None:
        """Atomically: after a crash the file holds this cursor or the previous one, never half of either."""
        body = {
            "schema": SCHEMA,
            "source": self.source,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "saved_at": rfc3339(now_utc()),
        }
        write_atomic(self.path, dumps(body).encode("utf-8") + b"\n")
