"""Labelled images for `cxr train` and `cxr evaluate`: a folder with one sub-folder per label, or a table.

The Spark edge that turns what a site has into rows of (uri, label), read by Spark itself (the driver lists
nothing and reads no image), plus the pure rules: which sub-folder is a label, what a table must hold, and the
fingerprint that identifies a training set in the bundle it produced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from streaming.settings import Settings
from streaming.sources import SourceError, image_files, read_table, table_format


class DataError(ValueError):
    """Labelled data that cannot be used as given (a configuration error: exit 2)."""


@dataclass(frozen=True)
class LabelledData:
    """The rows (uri, label) and what identifies them."""

    frame: DataFrame
    source: str
    labels: tuple[str, ...]
    counts: dict[str, int]
    fingerprint: str


def label_of(folder: Path, path: Path) -> str | None:
    """The label of a file under `folder`: the name of its first sub-folder (deeper folders belong to it too).

    None for a file directly in `folder`, or under a hidden folder (`.incoming/`: often half-written)."""
    parts = path.relative_to(folder).parts
    if len(parts) < 2 or any(part.startswith(".") for part in parts):
        return None
    return parts[0]


def fingerprint(rows: Iterable[tuple[str, str, str]]) -> str:
    """sha256 over (uri, label, version) rows in uri order: any image added, removed, changed or relabelled
    changes it. `version` is what tells two versions of one file apart (size and modification time)."""
    digest = hashlib.sha256()
    for uri, label, version in rows:
        digest.update(f"{uri}\t{label}\t{version}\n".encode())
    return digest.hexdigest()


def labelled_file(root: Path, path: Path) -> tuple[str, str | None, str]:
    """(uri, label, version) of one listed file; the version (size and mtime_ns, as the folder feed's event ids
    use them) makes the fingerprint change when a file is replaced under the same name."""
    try:
        stat = path.stat()
        version = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        version = "missing"
    return path.as_uri(), label_of(root, path), version


def _labelled_folder(spark: SparkSession, folder: Path) -> DataFrame:
    root = folder.resolve()

    labelled = F.udf(
        lambda listed: labelled_file(root, Path(listed)), "struct<uri string, label string, version string>"
    )
    files = image_files(spark, root).withColumn("l", labelled(F.col("path")))
    rows = files.select(
        F.col("l.uri").alias("uri"), F.col("l.label").alias("label"), F.col("l.version").alias("version")
    )
    return rows.where(F.col("label").isNotNull())


def _labelled_table(spark: SparkSession, path: Path, kind: str) -> DataFrame:
    if kind not in ("csv", "parquet"):
        raise DataError(f"{path}: expected a folder with one sub-folder per label, a .csv or a .parquet table")
    table = read_table(spark, path, kind)
    missing = {"uri", "label"} - set(table.columns)
    if missing:
        raise DataError(f"{path}: the table needs the columns uri and label; missing: {', '.join(sorted(missing))}")
    return table.select(
        F.col("uri").cast("string").alias("uri"),
        F.col("label").cast("string").alias("label"),
        F.lit("").alias("version"),
    ).where(F.col("uri").isNotNull() & F.col("label").isNotNull())


def read_labelled(spark: SparkSession, source: Path) -> LabelledData:
    """The labelled rows of a folder or table, with their labels (sorted), counts and fingerprint."""
    if not source.exists():
        raise DataError(f"no such folder or table: {source}")
    try:
        kind = table_format(source)
    except SourceError as exc:
        raise DataError(str(exc)) from None
    frame = _labelled_folder(spark, source) if kind == "folder" else _labelled_table(spark, source, kind)
    # Cached only while it is counted and fingerprinted: Spark would serve a later read of the same folder in
    # this session from the cache (same plan), blind to files renamed or added since.
    cached = frame.cache()
    try:
        counts = {row["label"]: int(row["count"]) for row in cached.groupBy("label").count().collect()}
        if len(counts) < 2:
            found = ", ".join(counts) or "none"
            raise DataError(f"{source}: found {len(counts)} label(s) ({found}); need at least two")
        digest = fingerprint(
            (row["uri"], row["label"], row["version"]) for row in cached.orderBy("uri", "label").toLocalIterator()
        )
    finally:
        cached.unpersist()
    return LabelledData(frame.select("uri", "label"), str(source), tuple(sorted(counts)), counts, digest)


def with_data_root(settings: Settings, source: Path) -> Settings:
    """Settings whose allowed roots also hold a labelled folder named on the command line (the operator chose
    it); a table's URIs stay bound by the configured `CXR_ALLOWED_ROOTS`."""
    if not source.is_dir() or table_format(source) != "folder":
        return settings
    root = source.resolve()
    if root in settings.allowed_roots:
        return settings
    return settings.model_copy(update={"allowed_roots": [*settings.allowed_roots, root]})
