"""The held-out split: stratified, deterministic from the seed, every label on both sides, a given test set."""

from __future__ import annotations

import random

import pytest

from training.data import DataError
from training.split import Part, given_split, held_out_count, part_counts, stratified_split


def rows(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"file:///data/{label}/{i:04d}.png", label) for label, n in counts.items() for i in range(n)]


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(2, 0.25, 1), (3, 0.25, 1), (4, 0.25, 1), (6, 0.25, 2), (10, 0.25, 3), (100, 0.25, 25), (2, 0.9, 1), (5, 0.5, 3)],
)
def test_held_out_count_rounds_half_up_and_leaves_one_on_each_side(n: int, fraction: float, expected: int) -> None:
    assert held_out_count(n, fraction) == expected


@pytest.mark.parametrize(("n", "fraction"), [(1, 0.25), (0, 0.25), (10, 0.0), (10, 1.0)])
def test_held_out_count_refuses_what_cannot_be_split(n: int, fraction: float) -> None:
    with pytest.raises(ValueError):
        held_out_count(n, fraction)


def test_the_split_is_stratified_with_every_label_in_both_parts() -> None:
    data = rows({"NORMAL": 40, "PNEUMONIA": 9, "COVID": 2})
    parts = stratified_split(data, 0.25, seed=0)
    counts = part_counts(data, parts)
    assert counts[Part.TEST] == {"COVID": 1, "NORMAL": 10, "PNEUMONIA": 2}
    assert counts[Part.TRAIN] == {"COVID": 1, "NORMAL": 30, "PNEUMONIA": 7}
    assert set(parts) == {uri for uri, _ in data}


def test_the_split_depends_on_the_seed_and_the_images_only() -> None:
    data = rows({"NORMAL": 30, "PNEUMONIA": 30})
    shuffled = data[:]
    random.Random(7).shuffle(shuffled)
    assert stratified_split(data, 0.25, seed=3) == stratified_split(shuffled, 0.25, seed=3)
    assert stratified_split(data, 0.25, seed=3) != stratified_split(data, 0.25, seed=4)


def test_adding_an_image_moves_few_others() -> None:
    data = rows({"NORMAL": 100, "PNEUMONIA": 100})
    before = stratified_split(data, 0.25, seed=0)
    after = stratified_split([*data, ("file:///data/NORMAL/new.png", "NORMAL")], 0.25, seed=0)
    moved = [uri for uri in before if before[uri] != after[uri]]
    assert len(moved) <= 1


def test_duplicate_rows_count_once() -> None:
    data = rows({"NORMAL": 4, "PNEUMONIA": 4})
    assert stratified_split(data + data, 0.25, seed=0) == stratified_split(data, 0.25, seed=0)


def test_a_label_with_one_image_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"at least 2 usable images.*PNEUMONIA 1"):
        stratified_split(rows({"NORMAL": 5, "PNEUMONIA": 1}), 0.25, seed=0)


def test_an_image_with_two_labels_is_a_data_error() -> None:
    data = [*rows({"NORMAL": 3, "PNEUMONIA": 3}), ("file:///data/NORMAL/0000.png", "PNEUMONIA")]
    with pytest.raises(DataError, match="1 image\\(s\\) carry two different labels"):
        stratified_split(data, 0.25, seed=0)


def test_a_given_test_set_is_used_as_it_is() -> None:
    train = rows({"NORMAL": 5, "PNEUMONIA": 5})
    test = [(uri.replace("/data/", "/test/"), label) for uri, label in rows({"NORMAL": 2, "PNEUMONIA": 1})]
    parts = given_split(train, test)
    assert {parts[uri] for uri, _ in train} == {Part.TRAIN}
    assert {parts[uri] for uri, _ in test} == {Part.TEST}


def test_a_given_test_set_must_cover_every_label_and_share_no_image() -> None:
    train = rows({"NORMAL": 5, "PNEUMONIA": 5})
    with pytest.raises(DataError, match="none to test: \\['PNEUMONIA'\\]"):
        given_split(train, [("file:///test/a.png", "NORMAL")])
    with pytest.raises(DataError, match="none to train on: \\['COVID'\\]"):
        given_split(train, [("file:///t/a.png", "NORMAL"), ("file:///t/b.png", "PNEUMONIA"), ("file:///t/c", "COVID")])
    with pytest.raises(DataError, match="1 image\\(s\\) are in both"):
        given_split(train, [train[0], ("file:///test/b.png", "PNEUMONIA")])
