"""Where `cxr batch` references come from: a folder of images, or a table of references, read by Spark itself.

Nothing is listed or read on the driver. A folder goes through Spark's binary-file source with only the path
selected (no file content is read there); each executor then turns its paths into references with the folder
feed's own code (`producers.folder.announcements`): PNG, JPEG and DICOM recognised by content, the event id a
uuid5 of the resolved path, size and mtime_ns, DICOM UIDs from the header, hidden files and folders skipped.
So a backfill of a folder and the folder feed announce the same file under the same event id, and consumers
that de-duplicate on `event_id` see one image.

A table is read by the reader its name asks for (`table_format`):

- JSON lines (`.jsonl`, `.json`, `.ndjson`): one `cxr.reference/v1` message per line, passed on as bytes, as
  Kafka would hold them, so a line that is not a reference becomes its own dead letter (blank lines are skipped);
- CSV (with a header) or Parquet (a file, or a folder of Parquet files): a `uri` column and optionally the
  contract's other columns (`CONTRACT_COLUMNS`); a row without an event id gets a uuid5 of its uri, the same
  in every run, so a rerun recognises what an earlier one scored.

Every source becomes the same narrow frame (`REFERENCE_COLUMNS`: event_id, value, offset), and `kafka_rows`
shapes it like the Kafka source's rows, so the scorer (`pipeline.scored`) cannot tell a backfill from the stream.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pandas as pd  # at module level: pandas UDFs resolve their type hints in this module's globals

from producers.folder import announcements
from streaming.contracts import REFERENCE_SCHEMA, dumps

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

#: uuid5 namespace of the event ids given to table rows that have none; fixed forever, or reruns disagree.
TABLE_NAMESPACE = uuid.UUID("f269b9a4-57c9-4cee-a5d0-ce3457c1cd78")
#: The reference fields a CSV or Parquet table may carry besides `uri` (DESIGN.md, "Messages").
CONTRACT_COLUMNS = ("event_id", "study_uid", "series_uid", "sop_instance_uid", "accession", "modality", "view_position")
#: Table readers by file suffix.
TABLE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
#: What every source yields: the event id (None where it cannot be read), the reference message as bytes
#: (None for a listed file that is not an image), and a row number for dead letters to point back at.
REFERENCE_COLUMNS = ("event_id", "value", "offset")
_REFERENCE_STRUCT = "event_id string, value string"
#: Files Spark writes beside a Parquet table's data, which do not make a folder "not a table".
_TABLE_SIDECARS = ("_SUCCESS", "_metadata", "_common_metadata")


class SourceError(ValueError):
    """A batch source that cannot be read as one (an unknown table format, no `uri` column): a configuration
    for the operator to fix, never retried."""


# ------------------------------------------------------------------------------------ pure: which reader


def table_format(path: Path) -> str:
    """'folder', 'jsonl', 'csv' or 'parquet' for a batch source; `SourceError` for anything else.

    A folder is a Parquet table when its name ends in `.parquet`, or when what it holds (hidden files and
    Spark's `_SUCCESS` aside) is only `.parquet` files, as Spark and pandas write a table; any other folder is
    a folder of images.
    """
    if path.is_dir():
        if path.suffix.lower() == ".parquet" or is_parquet_listing(os.listdir(path)):
            return "parquet"
        return "folder"
    found = TABLE_FORMATS.get(path.suffix.lower())
    if found is None:
        known = ", ".join(sorted(TABLE_FORMATS))
        raise SourceError(f"{path.name}: not a folder, and not a table cxr batch reads (by suffix: {known})")
    return found


def is_parquet_listing(names: list[str]) -> bool:
    """Do these folder entries look like a Parquet table (only `.parquet` data files besides sidecars)?"""
    visible = [n for n in names if not n.startswith(".") and n not in _TABLE_SIDECARS and not n.endswith(".crc")]
    return bool(visible) and all(n.lower().endswith(".parquet") for n in visible)


def source_topic(source: Path) -> str:
    """What dead letters name as their `source.topic`: the batch and the source's name."""
    return f"batch:{source.name}"


# ---------------------------------------------------------------------------------- pure: rows → references


def hidden(relative: PurePosixPath) -> bool:
    """Skipped like the folder feed skips it: a hidden file, or anything under a hidden folder."""
    return any(part.startswith(".") for part in relative.parts)


def local_path(listed: str) -> str:
    """A local path from the `path` Spark's file sources list (`file:/a/b c.png`, not percent-encoded)."""
    for prefix in ("file://", "file:"):
        if listed.startswith(prefix):
            return listed[len(prefix) :]
    return listed


def folder_reference(path: str, root: str) -> tuple[str | None, str | None]:
    """(event id, reference message) for one listed file, by the folder feed's own rules and code; (None, None)
    for a hidden file or one that is gone or is not a PNG, JPEG or DICOM (recognised by content).

    It reads the file's first bytes (and a DICOM header): it runs on the executors, where the files are."""
    file = Path(path)
    try:
        relative = PurePosixPath(file.relative_to(root).as_posix())
    except ValueError:  # not under the folder as given (a link Spark followed): judge the name alone
        relative = PurePosixPath(file.name)
    if hidden(relative):
        return None, None
    for announcement in announcements([file]):
        reference = announcement.reference
        return reference.event_id, reference.to_json()
    return None, None


def table_event_id(uri: str) -> str:
    """The event id of a table row that has none: a uuid5 of its uri, the same in every run."""
    return str(uuid.uuid5(TABLE_NAMESPACE, uri))


def _text(value: Any) -> str | None:
    """A table cell as contract text: None for a missing, NaN or blank cell."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value)
    return text if text.strip() else None


def table_reference(row: Mapping[str, Any]) -> tuple[str | None, str]:
    """(event id, `cxr.reference/v1` message) for one row of a CSV or Parquet table of references.

    Blank cells are absent fields. A row without an event id gets `table_event_id(uri)`; a row without a uri
    keeps whatever it has, so the scorer dead-letters it (`parse`/`missing_field`) with the row as payload.
    """
    body: dict[str, str] = {"schema": REFERENCE_SCHEMA}
    uri = _text(row.get("uri"))
    event_id = _text(row.get("event_id"))
    if event_id is None and uri is not None:
        event_id = table_event_id(uri)
    if event_id is not None:
        body["event_id"] = event_id
    if uri is not None:
        body["uri"] = uri
    for name in CONTRACT_COLUMNS[1:]:
        value = _text(row.get(name))
        if value is not None:
            body[name] = value
    return event_id, dumps(body)


def column_map(columns: list[str]) -> dict[str, str]:
    """The table's columns that carry contract fields, matched case-insensitively: {field: column}.

    `SourceError` without a `uri` column: a table of references without uris is a wrong file, not bad rows."""
    by_name: dict[str, str] = {}
    for column in columns:
        by_name.setdefault(column.strip().lower(), column)
    if "uri" not in by_name:
        shown = ", ".join(columns[:12]) or "none"
        raise SourceError(f"the table has no 'uri' column (columns: {shown})")
    return {name: by_name[name] for name in ("uri", *CONTRACT_COLUMNS) if name in by_name}


# ----------------------------------------------------------------------------------------- the Spark edge


def image_files(spark: SparkSession, folder: Path) -> DataFrame:
    """One row per candidate file under `folder` (column `path`: a local path), listed by Spark itself.

    Spark's binary-file source with recursive lookup and only the path selected, so no file content is read
    anywhere. Hidden files and folders are not listed; note that Spark's listing also leaves out names that
    start with `_` and files ending in `._COPYING_` (half-copied by `hadoop fs`). Whether a file is an image
    is for the caller to tell (`producers.folder.image_kind`), on the executors.
    """
    from pyspark.sql import functions as F

    listed = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(os.path.abspath(folder))
        .select(F.col("path"))
    )
    return listed.select(F.regexp_replace("path", r"^file:(//)?", "").alias("path"))


def _folder_udf(root: str) -> Any:
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(_REFERENCE_STRUCT)  # type: ignore[call-overload]
    def announce(paths: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        from streaming import logs

        logs.silence_header_quoters()  # DICOM headers are read here; their values must not reach a log
        for batch in paths:
            rows = [folder_reference(path, root) for path in batch]
            yield pd.DataFrame(rows, columns=["event_id", "value"])

    # It reads files and the clock (sent_at): evaluated once per row, never once per struct field.
    return announce.asNondeterministic()


def folder_references(spark: SparkSession, folder: Path) -> DataFrame:
    """`REFERENCE_COLUMNS` for every listed file; value None for one that is not an image."""
    from pyspark.sql import functions as F

    announce = _folder_udf(os.path.abspath(folder))
    files = image_files(spark, folder)
    refs = files.select(announce(F.col("path")).alias("r"), F.monotonically_increasing_id().alias("offset"))
    return refs.select(F.col("r.event_id"), F.col("r.value").cast("binary").alias("value"), F.col("offset"))


def json_lines_references(spark: SparkSession, path: Path) -> DataFrame:
    """`REFERENCE_COLUMNS` for a file of reference messages, one per line, each line's bytes as they are."""
    from pyspark.sql import functions as F

    lines = spark.read.text(os.path.abspath(path)).where(F.col("value").rlike(r"\S"))
    return lines.select(
        F.get_json_object("value", "$.event_id").alias("event_id"),
        F.col("value").cast("binary").alias("value"),
        F.monotonically_increasing_id().alias("offset"),
    )


def _table_udf(fields: tuple[str, ...]) -> Any:
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(_REFERENCE_STRUCT)  # type: ignore[call-overload]
    def to_reference(rows: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in rows:
            built = [table_reference(dict(zip(fields, values, strict=True))) for values in batch.itertuples(False)]
            yield pd.DataFrame(built, columns=["event_id", "value"])

    return to_reference.asNondeterministic()


def read_table(spark: SparkSession, path: Path, kind: str) -> DataFrame:
    """A CSV (with a header row) or Parquet table as Spark reads it, every column as it is."""
    location = os.path.abspath(path)
    return spark.read.option("header", "true").csv(location) if kind == "csv" else spark.read.parquet(location)


def table_references(spark: SparkSession, path: Path, kind: str) -> DataFrame:
    """`REFERENCE_COLUMNS` for a CSV or Parquet table with a `uri` column (`SourceError` without one)."""
    from pyspark.sql import functions as F

    table = read_table(spark, path, kind)
    columns = column_map(table.columns)
    cells: list[Column] = [F.col(f"`{column}`").cast("string").alias(name) for name, column in columns.items()]
    to_reference = _table_udf(tuple(columns))
    refs = table.select(to_reference(F.struct(*cells)).alias("r"), F.monotonically_increasing_id().alias("offset"))
    return refs.select(F.col("r.event_id"), F.col("r.value").cast("binary").alias("value"), F.col("offset"))


def batch_references(spark: SparkSession, source: Path) -> DataFrame:
    """`REFERENCE_COLUMNS` for a folder or a table (`table_format` picks the reader)."""
    kind = table_format(source)
    if kind == "folder":
        return folder_references(spark, source)
    if kind == "jsonl":
        return json_lines_references(spark, source)
    return table_references(spark, source, kind)


def kafka_rows(references: DataFrame, topic: str) -> DataFrame:
    """References shaped like the Kafka source's rows (`pipeline.KAFKA_SCHEMA`): what `pipeline.scored` reads.

    The timestamp is when the query runs (the stream's would be when Kafka received the reference): it is
    what a result's latency counts from when the reference has no `sent_at`."""
    from pyspark.sql import functions as F

    return references.select(
        F.col("value"),
        F.lit(topic).alias("topic"),
        F.lit(0).alias("partition"),
        F.col("offset"),
        F.current_timestamp().alias("timestamp"),
    )
