"""to_model_input must reproduce Keras' load_img + img_to_array (+ preprocess_input) exactly."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from streaming.decode import decode_image
from streaming.preprocess import (
    InputSpec,
    Resample,
    Scaling,
    draft_size_for,
    scale_array,
    to_model_input,
)


@pytest.fixture(scope="module")
def keras() -> ModuleType:
    return pytest.importorskip("keras")


@pytest.fixture(scope="module")
def tiny() -> np.ndarray:
    """A 2x2 RGB array of raw pixel values with known channel contents."""
    return np.array([[[0, 127.5, 255], [51, 102, 153]], [[255, 255, 255], [0, 0, 0]]], dtype=np.float32)


# ------------------------------------------------------------------------------------------------- vs Keras


def test_default_model_input_equals_keras_for_all_real_xrays(keras: ModuleType, sample_jpegs: list[Path]) -> None:
    spec = InputSpec(150, 150, 3)
    for path in sample_jpegs:
        expected_raw = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(150, 150)))
        ours_raw = to_model_input(decode_image(path.read_bytes()), spec, Scaling())
        assert ours_raw.dtype == np.float32 and ours_raw.shape == (150, 150, 3)
        np.testing.assert_array_equal(ours_raw, expected_raw)

        ours = to_model_input(decode_image(path.read_bytes()), spec, Scaling("xception"))
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, expected_raw / 127.5 - 1)


@pytest.mark.parametrize("resample", list(Resample), ids=str)
def test_every_resample_matches_keras_interpolation(keras: ModuleType, sample_jpeg: Path, resample: Resample) -> None:
    expected = keras.utils.img_to_array(
        keras.utils.load_img(sample_jpeg, target_size=(150, 120), interpolation=resample.value)
    )
    ours = to_model_input(decode_image(sample_jpeg.read_bytes()), InputSpec(150, 120, 3, resample), Scaling())
    assert ours.shape == (150, 120, 3)
    np.testing.assert_array_equal(ours, expected)


def test_one_channel_matches_keras_grayscale(keras: ModuleType, sample_jpeg: Path) -> None:
    expected = keras.utils.img_to_array(keras.utils.load_img(sample_jpeg, color_mode="grayscale", target_size=(64, 80)))
    ours = to_model_input(decode_image(sample_jpeg.read_bytes()), InputSpec(64, 80, 1), Scaling())
    assert ours.shape == (64, 80, 1) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_one_channel_from_rgb_uses_luma_and_keeps_a_channel_axis() -> None:
    rgb = Image.fromarray(np.full((10, 10, 3), (200, 100, 50), dtype=np.uint8))
    out = to_model_input(rgb, InputSpec(10, 10, 1), Scaling())
    assert out.shape == (10, 10, 1)
    # ITU-R 601-2 luma, as Pillow's convert("L") and Keras' grayscale mode compute it
    assert out[0, 0, 0] == round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)


def test_keras_scaling_modes_match_preprocess_input(keras: ModuleType, tiny: np.ndarray) -> None:
    from keras.applications import imagenet_utils

    for scheme, mode in (("xception", "tf"), ("tf", "tf"), ("inception", "tf"), ("torch", "torch")):
        expected = imagenet_utils.preprocess_input(tiny.copy(), mode=mode)
        np.testing.assert_array_equal(scale_array(tiny, Scaling(scheme)), expected, err_msg=scheme)


# ------------------------------------------------------------------------------------------------- resizing


def test_no_resize_when_the_size_already_matches() -> None:
    pixels = np.arange(12 * 8, dtype=np.uint8).reshape(8, 12)
    out = to_model_input(Image.fromarray(pixels), InputSpec(8, 12, 3, Resample.LANCZOS), Scaling())
    np.testing.assert_array_equal(out, np.repeat(pixels[..., None], 3, axis=2).astype(np.float32))


def test_nearest_picks_source_pixels_and_is_not_an_average() -> None:
    checker = (np.indices((40, 40)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = to_model_input(Image.fromarray(checker), InputSpec(10, 10, 1), Scaling())
    assert set(np.unique(out)) <= {0.0, 255.0}
    box = to_model_input(Image.fromarray(checker), InputSpec(10, 10, 1, Resample.BOX), Scaling())
    assert np.allclose(box, 127.5, atol=1)


def test_input_is_not_modified(sample_jpeg: Path) -> None:
    img = decode_image(sample_jpeg.read_bytes())
    before = img.tobytes()
    to_model_input(img, InputSpec(150, 150, 3), Scaling("xception"))
    assert img.mode == "L" and img.tobytes() == before


def test_png_rgba_input_is_handled_like_keras(keras: ModuleType, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    rgba = Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8))
    path = tmp_path / "x.png"
    rgba.save(path)
    expected = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(20, 30)))
    ours = to_model_input(decode_image(path.read_bytes()), InputSpec(20, 30, 3), Scaling())
    np.testing.assert_array_equal(ours, expected)


# ------------------------------------------------------------------------------------------------- scaling


def test_scaling_none_is_raw_values(tiny: np.ndarray) -> None:
    out = scale_array(tiny, Scaling())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, tiny)
    assert out is not tiny


@pytest.mark.parametrize("scheme", ["xception", "inception", "tf"])
def test_scaling_tf_family_maps_to_minus_one_one(tiny: np.ndarray, scheme: str) -> None:
    out = scale_array(tiny, Scaling(scheme))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], np.array([-1.0, 0.0, 1.0], dtype=np.float32))
    np.testing.assert_allclose(out[0, 1], [51 / 127.5 - 1, 102 / 127.5 - 1, 153 / 127.5 - 1], rtol=1e-6)


def test_scaling_unit(tiny: np.ndarray) -> None:
    out = scale_array(tiny, Scaling("unit"))
    np.testing.assert_allclose(out[0, 1], [0.2, 0.4, 0.6], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [[1, 1, 1], [0, 0, 0]])


@pytest.mark.parametrize("scheme", ["torch", "imagenet"])
def test_scaling_imagenet_mean_std(tiny: np.ndarray, scheme: str) -> None:
    out = scale_array(tiny, Scaling(scheme))
    assert out.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out[1, 0], (1 - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(out[1, 1], -mean / std, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], (np.array([0.2, 0.4, 0.6]) - mean) / std, rtol=1e-5)


def test_scaling_imagenet_needs_three_channels() -> None:
    with pytest.raises(ValueError, match="channels"):
        scale_array(np.zeros((2, 2, 1), dtype=np.float32), Scaling("torch"))


def test_scaling_custom_scale_offset_then_mean_std(tiny: np.ndarray) -> None:
    custom = Scaling("custom", scale=2.0, offset=-10.0, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 5.0))
    out = scale_array(tiny, custom)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 1], [(102 - 10 - 1) / 2, (204 - 10 - 2) / 4, (306 - 10 - 3) / 5])
    only_scale = scale_array(tiny, Scaling("custom", scale=0.5, offset=1.0))
    np.testing.assert_allclose(only_scale, tiny * 0.5 + 1.0)
    broadcast = scale_array(tiny, Scaling("custom", mean=(100.0,), std=(50.0,)))
    np.testing.assert_allclose(broadcast, (tiny - 100) / 50, rtol=1e-6)


def test_scale_array_works_on_batches_and_leaves_the_input_alone(tiny: np.ndarray) -> None:
    batch = np.stack([tiny, tiny * 0.5])
    before = batch.copy()
    out = scale_array(batch, Scaling("torch"))
    assert out.shape == (2, 2, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], scale_array(tiny, Scaling("torch")))
    np.testing.assert_array_equal(batch, before)


def test_to_model_input_applies_the_scaling() -> None:
    img = Image.fromarray(np.full((4, 4), 51, dtype=np.uint8))
    out = to_model_input(img, InputSpec(4, 4, 1), Scaling("custom", mean=(0.5,), std=(0.25,), scale=1 / 255))
    np.testing.assert_allclose(out, np.full((4, 4, 1), (0.2 - 0.5) / 0.25), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scheme": "caffe"},
        {"scheme": "Xception"},
        {"scheme": "xception", "scale": 2.0},
        {"scheme": "torch", "mean": (0.5, 0.5, 0.5)},
        {"scheme": "custom", "std": (1.0, 0.0, 1.0)},
        {"scheme": "custom", "mean": ()},
    ],
)
def test_invalid_scalings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Scaling(**kwargs)  # type: ignore[arg-type]


def test_custom_mean_count_must_match_channels(tiny: np.ndarray) -> None:
    with pytest.raises(ValueError, match="channels"):
        scale_array(tiny, Scaling("custom", mean=(1.0, 2.0)))


# ------------------------------------------------------------------------------------------------- spec


def test_input_spec_validates_and_accepts_resample_names() -> None:
    assert InputSpec(8, 8, 3, "bilinear").resample is Resample.BILINEAR  # type: ignore[arg-type]
    for bad in ((0, 8, 3), (8, 8, 2), (8, -1, 1)):
        with pytest.raises(ValueError):
            InputSpec(*bad)
    with pytest.raises(ValueError):
        InputSpec(8, 8, 3, "bogus")  # type: ignore[arg-type]


@pytest.mark.parametrize("resample", list(Resample), ids=str)
def test_draft_size_is_never_offered_because_it_changes_the_model_input(resample: Resample) -> None:
    assert draft_size_for(InputSpec(150, 150, 3, resample)) is None


def test_drafting_really_would_change_the_model_input(sample_jpeg: Path) -> None:
    """Why draft_size_for returns None: a drafted decode gives a different tensor, even with BOX."""
    data = sample_jpeg.read_bytes()
    for resample in (Resample.NEAREST, Resample.BOX):
        spec = InputSpec(150, 150, 3, resample)
        full = to_model_input(decode_image(data), spec, Scaling())
        drafted = to_model_input(decode_image(data, draft_size=(150, 150)), spec, Scaling())
        assert np.abs(full - drafted).max() > 2, resample


def test_decoded_png_and_jpeg_of_same_pixels_reach_the_model_identically(sample_jpeg: Path) -> None:
    data = sample_jpeg.read_bytes()
    buf = BytesIO()
    Image.open(BytesIO(data)).save(buf, "PNG")
    spec, scaling = InputSpec(150, 150, 3), Scaling("xception")
    np.testing.assert_array_equal(
        to_model_input(decode_image(buf.getvalue()), spec, scaling),
        to_model_input(decode_image(data), spec, scaling),
    )
