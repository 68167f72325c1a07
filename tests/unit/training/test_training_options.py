"""`cxr train`'s options and the small rules around them: sizes, normal labels, usable images per label."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data import DataError
from training.train import OptionsError, TrainOptions, check_usable, choose_normal_labels, parse_size


def options(**changes: object) -> TrainOptions:
    return TrainOptions(**({"data": Path("/data/xrays"), "out": Path("/bundles/site")} | changes))  # type: ignore[arg-type]


def test_defaults_are_valid() -> None:
    o = options()
    assert (o.head, o.test_fraction, o.seed, o.stat_sensitivity, o.urgent_sensitivity) == (
        "logistic",
        0.25,
        0,
        0.5,
        0.9,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"head": "forest"}, "--head"),
        ({"test_fraction": 0.0}, "--test-fraction"),
        ({"test_fraction": 1.0}, "--test-fraction"),
        ({"stat_sensitivity": 0.0}, "--stat-sensitivity"),
        ({"urgent_sensitivity": 1.5}, "--urgent-sensitivity"),
        ({"stat_sensitivity": 0.95, "urgent_sensitivity": 0.9}, "must not exceed"),
        ({"reg": -1.0}, "--reg"),
        ({"epochs": 0}, "--epochs"),
        ({"bootstrap": -1}, "--bootstrap"),
        ({"name": " "}, "--name"),
        ({"backbone_scaling": "sideways"}, "--backbone-scaling"),
        ({"backbone_resample": "magic"}, "--backbone-resample"),
        ({"normal_labels": ("NORMAL", "NORMAL")}, "twice"),
        ({"out": Path("/data/xrays/bundle")}, "inside the labelled data"),
        ({"out": Path("/data/xrays")}, "inside the labelled data"),
    ],
)
def test_bad_options_are_refused_with_the_flag_named(changes: dict[str, object], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        options(**changes)


def test_several_problems_are_reported_at_once() -> None:
    with pytest.raises(OptionsError, match=r"--reg.*--epochs"):
        options(reg=-1.0, epochs=0)


@pytest.mark.parametrize(("text", "size"), [("150x150", (150, 150)), ("224X320", (224, 320)), (" 64 x 48 ", (64, 48))])
def test_sizes_are_height_by_width(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["150", "0x150", "axb", "150x150x3", ""])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(OptionsError, match="HEIGHTxWIDTH"):
        parse_size(text)


def test_normal_labels_default_to_the_conventional_names() -> None:
    assert choose_normal_labels(("NORMAL", "PNEUMONIA"), ()) == ("NORMAL",)
    assert choose_normal_labels(("Effusion", "No Finding", "Pneumothorax"), ()) == ("No Finding",)
    assert choose_normal_labels(("COVID", "PNEUMONIA"), ()) == ()


def test_given_normal_labels_must_exist_and_leave_a_finding() -> None:
    assert choose_normal_labels(("clear", "effusion"), ("clear",)) == ("clear",)
    with pytest.raises(DataError, match="names no label of the data: Clear"):
        choose_normal_labels(("clear", "effusion"), ("Clear",))
    with pytest.raises(DataError, match="at least one must be a finding"):
        choose_normal_labels(("clear", "effusion"), ("clear", "effusion"))


def test_a_label_with_fewer_than_two_usable_images_is_a_data_error_naming_why() -> None:
    check_usable(("NORMAL", "PNEUMONIA"), {"NORMAL": 2, "PNEUMONIA": 5}, {}, "")
    with pytest.raises(DataError, match="too few: NORMAL 1, PNEUMONIA 0; left out as unusable: decode/corrupt_image 3"):
        check_usable(("NORMAL", "PNEUMONIA"), {"NORMAL": 1}, {"decode/corrupt_image": 3}, "")
