"""How the job reads Kafka, without Spark: tasks per micro-batch follow the cores, not the partitions."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from streaming import broker
from streaming.cores import available_cores
from streaming.pipeline import min_partitions
from streaming.settings import Settings


def session(cores: int) -> Any:
    return SimpleNamespace(sparkContext=SimpleNamespace(defaultParallelism=cores))


def test_a_micro_batch_has_a_task_per_core_whatever_the_topic_has() -> None:
    assert min_partitions(Settings.load(), session(2)) == 2
    assert min_partitions(Settings.load(), session(48)) == 48


def test_min_partitions_can_be_set_or_left_to_kafka() -> None:
    assert min_partitions(Settings.load(min_partitions=6), session(2)) == 6
    assert min_partitions(Settings.load(min_partitions=0), session(2)) is None  # one task per Kafka partition


def test_the_embedded_broker_gives_each_core_a_partition() -> None:
    assert broker.default_partitions() == available_cores()
