"""The UDF's row shape, without Spark."""

from __future__ import annotations

from streaming.udf import _OUTCOME_FIELDS, OUTCOME_SCHEMA


def test_outcome_schema_names_the_outcome_fields_in_order() -> None:
    assert [column.split()[0] for column in OUTCOME_SCHEMA.split(", ")] == list(_OUTCOME_FIELDS)
