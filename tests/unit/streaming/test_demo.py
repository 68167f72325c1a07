"""The demo's worklist rendering (the demo itself runs in tests/integration/test_cli.py)."""

from __future__ import annotations

from rich.console import Console

from streaming.demo import worklist_table


def result(name: str, priority: str, pneumonia: float, finding: str | None) -> dict[str, object]:
    return {
        "uri": f"file:///x/{name}.jpeg",
        "priority": priority,
        "top_finding": finding,
        "scores": {"NORMAL": 1 - pneumonia, "PNEUMONIA": pneumonia},
        "latency_ms": 1500.0,
        "sent_at": "2026-01-01T00:00:00.000Z",
    }


def test_worklist_puts_urgent_first_and_orders_routine_by_finding_score() -> None:
    results = [
        result("routine-low", "ROUTINE", 0.05, None),
        result("stat", "STAT", 0.97, "PNEUMONIA"),
        result("routine-high", "ROUTINE", 0.45, None),
        result("urgent", "URGENT", 0.6, "PNEUMONIA"),
    ]
    console = Console(width=120, record=True)
    console.print(worklist_table(results, [], 4, ("NORMAL",)))
    text = console.export_text()
    order = [name for name in ("stat", "urgent", "routine-high", "routine-low") if name in text]
    assert sorted(order, key=text.index) == ["stat", "urgent", "routine-high", "routine-low"]
    assert "0.450" in text and "0.050" in text  # the non-normal score, not the NORMAL one
    assert "4 scored, 0 dead-lettered, 4/4 done" in text
