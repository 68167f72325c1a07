"""The UDF's row shape, without Spark."""

from __future__ import annotations

from streaming.udf import _OUTCOME_FIELDS, OUTCOME_SCHEMA


def test_outcome_schema_names_the_outcome_fields_in_order() -> None:
    assert [column.split()[0] for column in OUTCOME_SCHEMA.split(", ")] == list(_OUTCOME_FIELDS)


def test_values_reach_the_scorer_as_they_came() -> None:
    import pandas as pd

    from streaming.udf import _messages

    frame = pd.DataFrame(
        {
            "value": [b"\xff\xfe\x00\x81text", bytearray(b"{}"), None, "a batch line"],
            "topic": ["t"] * 4,
            "partition": [0] * 4,
            "offset": [1, 2, 3, 4],
            "timestamp": [pd.Timestamp("2024-05-01T10:00:00")] * 4,
        }
    )
    values = [m.value for m in _messages(frame)]
    assert values == [b"\xff\xfe\x00\x81text", b"{}", None, "a batch line"]


def test_warm_up_counts_distinct_workers_and_lists_their_devices() -> None:
    from streaming.udf import WarmUp

    reports = ["exec-1 101 gpu:0", "exec-1 101 gpu:0", "exec-1 102 gpu:0", "exec-2 101 gpu:1", "driver 7 cpu"]
    assert WarmUp.from_reports(reports) == WarmUp(workers=4, devices=("cpu", "gpu:0", "gpu:1"))
    assert WarmUp.from_reports([]) == WarmUp(workers=0, devices=())
    assert str(WarmUp(2, ("gpu:0", "gpu:1"))) == "2 Python worker(s) on gpu:0, gpu:1"
