"""The held-out split of `cxr train`: stratified, deterministic from a seed, every label in both parts.

Within each label, images are ordered by sha256(seed, uri) and the first `held_out_count` go to the test part. So
the split depends only on the seed and the set of images (not on their order, nor on other labels), and adding
a few images moves few others between the parts. The pure rules are here; `assign` is the Spark application
(a small (uri, part) frame joined back).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING

from training.data import DataError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


class Part(StrEnum):
    TRAIN = "train"
    TEST = "test"


#: A label needs this many usable images: one to train on and one to test with.
MIN_PER_LABEL = 2


def held_out_count(n: int, fraction: float) -> int:
    """How many of a label's `n` images are held out: `fraction` of them rounded half up, at least one, and at
    least one left to train on."""
    if n < MIN_PER_LABEL:
        raise ValueError(f"a label needs at least {MIN_PER_LABEL} images to be split, not {n}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the test fraction must be in (0, 1), not {fraction}")
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))


def _rank_key(seed: int, uri: str) -> str:
    return hashlib.sha256(f"{seed}\0{uri}".encode()).hexdigest()


def by_label(rows: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """uris per label, each uri once; `DataError` for a uri labelled two ways (a single-label model cannot learn
    both, and it would sit on both sides of a split)."""
    labels: dict[str, str] = {}
    conflicting: set[str] = set()
    for uri, label in rows:
        seen = labels.setdefault(uri, label)
        if seen != label:
            conflicting.add(uri)
    if conflicting:
        raise DataError(f"{len(conflicting)} image(s) carry two different labels; give each image one label")
    grouped: dict[str, list[str]] = defaultdict(list)
    for uri, label in labels.items():
        grouped[label].append(uri)
    return dict(grouped)


def stratified_split(rows: Iterable[tuple[str, str]], fraction: float, seed: int) -> dict[str, Part]:
    """(uri, label) rows → the part of each uri. `DataError` when a label has fewer than two images."""
    grouped = by_label(rows)
    short = {label: len(uris) for label, uris in grouped.items() if len(uris) < MIN_PER_LABEL}
    if short:
        raise DataError(
            f"each label needs at least {MIN_PER_LABEL} usable images (one to train on, one to test with); "
            f"too few: {_counts(short)}"
        )
    parts: dict[str, Part] = {}
    for uris in grouped.values():
        ranked = sorted(uris, key=lambda uri: _rank_key(seed, uri))
        held_out = held_out_count(len(ranked), fraction)
        parts.update({uri: Part.TEST for uri in ranked[:held_out]})
        parts.update({uri: Part.TRAIN for uri in ranked[held_out:]})
    return parts


def given_split(train: Iterable[tuple[str, str]], test: Iterable[tuple[str, str]]) -> dict[str, Part]:
    """The parts when the test set is given (`--test DATA`): every label of either side needs an image on both
    sides, and no image may be in both (it would be tested on what it was trained on)."""
    train_groups, test_groups = by_label(train), by_label(test)
    overlap = {u for uris in train_groups.values() for u in uris} & {u for uris in test_groups.values() for u in uris}
    if overlap:
        raise DataError(f"{len(overlap)} image(s) are in both the training and the test data")
    missing_test = sorted(set(train_groups) - set(test_groups))
    missing_train = sorted(set(test_groups) - set(train_groups))
    if missing_test or missing_train:
        raise DataError(
            "every label needs usable images in both the training and the test data; "
            f"none to test: {missing_test or '-'}; none to train on: {missing_train or '-'}"
        )
    parts = {uri: Part.TRAIN for uris in train_groups.values() for uri in uris}
    parts.update({uri: Part.TEST for uris in test_groups.values() for uri in uris})
    return parts


def part_counts(rows: Iterable[tuple[str, str]], parts: Mapping[str, Part]) -> dict[Part, dict[str, int]]:
    """Images per label in each part."""
    counts: dict[Part, dict[str, int]] = {Part.TRAIN: defaultdict(int), Part.TEST: defaultdict(int)}
    for uri, label in set(rows):
        counts[parts[uri]][label] += 1
    return {part: dict(sorted(c.items())) for part, c in counts.items()}


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))


def assign(spark: SparkSession, frame: DataFrame, parts: Mapping[str, Part]) -> DataFrame:
    """`frame` (with a `uri` column) with each row's `part`; rows without one are dropped."""
    from pyspark.sql import functions as F

    assignment = spark.createDataFrame([(uri, part.value) for uri, part in parts.items()], "uri string, part string")
    return frame.join(F.broadcast(assignment), on="uri", how="inner")
