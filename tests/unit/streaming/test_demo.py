"""The demo's terminal worklist: the worklist service's own queue, rendered (the demo itself runs in
tests/integration/test_cli.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from streaming.demo import _image_name, worklist_table
from worklist.events import read_result
from worklist.store import WorklistStore


def result(name: str, priority: str, pneumonia: float, finding: str | None) -> str:
    return json.dumps(
        {
            "schema": "cxr.result/v1",
            "event_id": name,
            "uri": f"file:///x/{name}.jpeg",
            "priority": priority,
            "top_finding": finding,
            "scores": {"NORMAL": 1 - pneumonia, "PNEUMONIA": pneumonia},
            "model": {"name": "pneumonia-xception", "version": "0.3.0"},
        }
    )


def test_the_terminal_shows_the_services_queue_urgent_first_routine_by_finding_score(tmp_path: Path) -> None:
    store = WorklistStore(tmp_path / "w.db")
    values = [
        result("routine-low", "ROUTINE", 0.05, None),
        result("stat", "STAT", 0.97, "PNEUMONIA"),
        result("routine-high", "ROUTINE", 0.45, None),
        result("urgent", "URGENT", 0.6, "PNEUMONIA"),
    ]
    store.apply([read_result(v, None, ("NORMAL",)) for v in values], {})
    now = datetime.now(UTC)
    _, items = store.queue(now)
    for item in items:
        item["image"] = _image_name(store, item["key"], now)
    console = Console(width=120, record=True)
    console.print(worklist_table(items, [], store.image_counts(), 4))
    text = console.export_text()
    order = ["stat.jpeg", "urgent.jpeg", "routine-high.jpeg", "routine-low.jpeg"]
    assert sorted(order, key=text.index) == order
    assert "0.450" in text and "0.050" in text  # the non-normal score, not the NORMAL one
    assert "4 scored, 0 dead-lettered, 4/4 done" in text
    store.close()
