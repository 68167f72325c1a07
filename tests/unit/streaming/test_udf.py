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
