"""decode_image: every container brings the same chest X-ray to the same 8-bit pixels, and failures are typed.

PNG and DICOM inputs are built in code from the real JPEGs' decoded pixels, so "the same X-ray" is exact.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.uid import UID, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from streaming.decode import DecodeLimits, decode_image, sniff_format
from streaming.errors import DecodeError, ErrorCode, Stage
from streaming.preprocess import InputSpec, Scaling, to_model_input
from xray_files import (
    PATIENT_ID,
    PATIENT_NAME,
    dicom_bytes,
    encapsulated,
    image_dataset,
    jpeg_bytes,
    new_dataset,
    pillow_pixels,
    png_bytes,
    rescaled_windowed_12bit,
)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MODEL_SPEC = InputSpec(150, 150, 3)
XCEPTION = Scaling("xception")


# ------------------------------------------------------------------------------------------------- helpers


def decoded(data: bytes, **kwargs: Any) -> np.ndarray:
    img = decode_image(data, **kwargs)
    return np.asarray(img)


def model_input(data: bytes) -> np.ndarray:
    return to_model_input(decode_image(data), MODEL_SPEC, XCEPTION)


def assert_decode_error(data: bytes, code: ErrorCode, **kwargs: Any) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kwargs)
    err = info.value
    assert err.code is code, err.reason
    assert err.stage is Stage.DECODE
    assert err.reason and err.reason.endswith(".")
    assert PATIENT_NAME not in err.reason and PATIENT_ID not in err.reason and "Doe" not in err.reason
    return err


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring an 8-bit grayscale image, with a token IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def xray(sample_jpeg: Path) -> tuple[bytes, np.ndarray]:
    """The smallest real chest X-ray: its JPEG bytes and Pillow's decode of them (8-bit grayscale)."""
    data = sample_jpeg.read_bytes()
    pixels = pillow_pixels(data)
    assert pixels.dtype == np.uint8 and pixels.ndim == 2
    return data, pixels


@pytest.fixture(scope="module")
def small_xray(xray: tuple[bytes, np.ndarray]) -> np.ndarray:
    """A 128x96 crop of the real X-ray, for tests that build several frames or channels."""
    return np.ascontiguousarray(xray[1][200:296, 300:428])


# ------------------------------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "png"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "jpeg"),
        (b"\x00" * 128 + b"DICM" + b"\x00" * 20, "dicom"),
    ],
)
def test_sniff_format_by_magic_bytes(data: bytes, expected: str) -> None:
    assert sniff_format(data) == expected


def test_sniff_format_rejects_other_bytes() -> None:
    for data in (b"GIF89a" + b"\x00" * 200, b"DICM" + b"\x00" * 200, b"hello", b"\x00" * 131 + b"DICM"):
        with pytest.raises(DecodeError) as info:
            sniff_format(data)
        assert info.value.code is ErrorCode.UNSUPPORTED_FORMAT


# ------------------------------------------------------------------------------------------------- JPEG / PNG


def test_real_jpegs_decode_to_full_resolution_grayscale(sample_jpegs: list[Path]) -> None:
    for path in sample_jpegs:
        data = path.read_bytes()
        img = decode_image(data)
        assert img.mode == "L"
        reference = pillow_pixels(data)
        assert img.size == (reference.shape[1], reference.shape[0])
        np.testing.assert_array_equal(np.asarray(img), reference)


@pytest.mark.parametrize(
    "variant",
    ["L", "RGB", "I;16 (v*257)", "1-bit", "LA", "RGBA", "P"],
)
def test_png_of_the_same_pixels_gives_the_same_model_input(xray: tuple[bytes, np.ndarray], variant: str) -> None:
    data, pixels = xray
    gray = Image.fromarray(pixels)
    builders: dict[str, Callable[[], Image.Image]] = {
        "L": lambda: gray,
        "RGB": lambda: gray.convert("RGB"),
        "I;16 (v*257)": lambda: Image.fromarray(pixels.astype(np.uint16) * 257),
        "LA": lambda: Image.merge("LA", (gray, Image.new("L", gray.size, 77))),
        "RGBA": lambda: gray.convert("RGBA"),
        "P": lambda: gray.convert("RGB").quantize(256),
        "1-bit": lambda: gray.point(lambda v: 255 if v >= 128 else 0).convert("1"),
    }
    source = builders[variant]()
    png = png_bytes(source)
    img = decode_image(png)
    assert img.mode in ("L", "RGB")
    if variant == "I;16 (v*257)":
        with Image.open(BytesIO(png)) as reopened:
            assert reopened.mode.startswith("I")  # really a 16-bit PNG
    if variant == "1-bit":
        expected = np.where(pixels >= 128, 255, 0).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(img), expected)
        return
    if variant == "P":  # quantising a grayscale image to 256 colours is lossless only if <= 256 levels
        np.testing.assert_array_equal(np.asarray(img.convert("L")), pixels)
    np.testing.assert_array_equal(model_input(png), model_input(data))
    assert img.mode == ("L" if variant in ("L", "I;16 (v*257)", "LA", "1-bit") else "RGB")


def test_jpeg_draft_size_reduces_the_decode_but_not_below_the_request(xray: tuple[bytes, np.ndarray]) -> None:
    data, pixels = xray
    img = decode_image(data, draft_size=(150, 150))
    assert img.mode == "L"
    assert 150 <= img.width < pixels.shape[1] and 150 <= img.height < pixels.shape[0]
    # no draft unless asked, and never for PNG
    assert decode_image(data).size == (pixels.shape[1], pixels.shape[0])
    png = png_bytes(Image.fromarray(pixels))
    assert decode_image(png, draft_size=(150, 150)).size == (pixels.shape[1], pixels.shape[0])


def test_colour_jpeg_stays_rgb(xray: tuple[bytes, np.ndarray]) -> None:
    _, pixels = xray
    rgb = np.stack([pixels, 255 - pixels, pixels // 2], axis=-1)
    data = jpeg_bytes(Image.fromarray(rgb), quality=95)
    img = decode_image(data)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), pillow_pixels(data))


def test_decoding_leaves_pillow_globals_alone(xray: tuple[bytes, np.ndarray]) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    decode_image(xray[0])
    with pytest.raises(DecodeError):
        decode_image(xray[0], limits=DecodeLimits(max_pixels=10))
    with pytest.raises(DecodeError):
        decode_image(xray[0][: len(xray[0]) // 2])
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before == (89478485, False)


# ------------------------------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2_8bit_uncompressed_is_identical(xray: tuple[bytes, np.ndarray]) -> None:
    data, pixels = xray
    dcm = dicom_bytes(image_dataset(pixels))
    img = decode_image(dcm)
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), pixels)
    np.testing.assert_array_equal(model_input(dcm), model_input(data))


def test_dicom_monochrome1_is_inverted_for_display(xray: tuple[bytes, np.ndarray]) -> None:
    _, pixels = xray
    dcm = dicom_bytes(image_dataset(255 - pixels, "MONOCHROME1"))
    np.testing.assert_array_equal(decoded(dcm), pixels)


def test_dicom_12bit_with_rescale_and_window_maps_back_to_8bit(xray: tuple[bytes, np.ndarray]) -> None:
    _, pixels = xray
    ds = rescaled_windowed_12bit(pixels)  # stored 16v (12 bits), modality 8v - 100, window edges -100 and 1940
    assert (ds.BitsStored, ds.RescaleSlope, ds.RescaleIntercept) == (12, 0.5, -100)
    assert (ds.WindowCenter, ds.WindowWidth) == (920.5, 2041)
    out = decoded(dicom_bytes(ds))
    assert np.abs(out.astype(int) - pixels).max() <= 1
    assert out[pixels == 0].max(initial=0) == 0 and out[pixels == 255].min(initial=255) == 255


def test_dicom_window_clips_outside_and_uses_first_of_several_windows(small_xray: np.ndarray) -> None:
    ds = image_dataset(small_xray)
    ds.WindowCenter = ["128.5", "10"]
    ds.WindowWidth = ["129", "5"]  # first window: 64..192 -> 0..255
    out = decoded(dicom_bytes(ds)).astype(int)
    assert (out[small_xray <= 64] == 0).all()
    assert (out[small_xray >= 192] == 255).all()
    inside = (small_xray > 64) & (small_xray < 192)
    assert inside.any()
    expected = np.floor((small_xray[inside].astype(float) - 64) / 128 * 255 + 0.5)
    assert np.abs(out[inside] - expected).max() <= 1


def test_dicom_16bit_without_window_maps_the_full_stored_range(xray: tuple[bytes, np.ndarray]) -> None:
    _, pixels = xray
    dcm = dicom_bytes(image_dataset(pixels.astype(np.uint16) * 257, bits_stored=16))
    np.testing.assert_array_equal(decoded(dcm), pixels)


def test_dicom_signed_pixels_map_their_signed_range(xray: tuple[bytes, np.ndarray]) -> None:
    _, pixels = xray
    signed = (pixels.astype(np.int16) - 128).astype(np.int8)
    ds = image_dataset(signed)
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(decoded(dicom_bytes(ds)), pixels)


def _voi_lut_dataset(pixels: np.ndarray, lut: np.ndarray, bits_per_entry: int) -> Dataset:
    ds = image_dataset(pixels.astype(np.uint16) * 16, bits_stored=12)
    item = Dataset()
    item.add_new(0x00283002, "US", [len(lut), 0, bits_per_entry])  # LUT Descriptor
    item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUT Data
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = "100", "10"  # present but a VOI LUT takes precedence
    return ds


def test_dicom_voi_lut_sequence_output_range_maps_to_8bit(small_xray: np.ndarray) -> None:
    lut = np.arange(4096) // 16  # 8-bit LUT: stored 16v -> v
    out = decoded(dicom_bytes(_voi_lut_dataset(small_xray, lut, 8)))
    np.testing.assert_array_equal(out, small_xray)


def test_dicom_voi_lut_declared_16bit_holding_12bit_data_is_not_rendered_black(small_xray: np.ndarray) -> None:
    lut = np.arange(4096)  # identity, values need 12 bits although the descriptor claims 16
    out = decoded(dicom_bytes(_voi_lut_dataset(small_xray, lut, 16)))
    assert np.abs(out.astype(int) - small_xray).max() <= 1


def test_dicom_jpeg_baseline_matches_pillow_decode_of_the_same_jpeg(sample_jpegs: list[Path]) -> None:
    for path in sample_jpegs[::5]:
        data = path.read_bytes()
        pixels = pillow_pixels(data)
        ds = encapsulated(image_dataset(pixels), JPEGBaseline8Bit, [data])
        dcm = dicom_bytes(ds)
        out = decoded(dcm)
        # within the brief's tolerance in general; exact because JPEG in DICOM is decoded by Pillow first
        assert np.abs(out.astype(int) - pixels).max() <= 2
        np.testing.assert_array_equal(out, pixels)
        np.testing.assert_array_equal(model_input(dcm), model_input(data))


def test_dicom_ybr_full_422_jpeg_is_converted_to_rgb_once(small_xray: np.ndarray) -> None:
    rgb = np.stack([small_xray, 255 - small_xray, small_xray // 2], axis=-1)
    data = jpeg_bytes(Image.fromarray(rgb), quality=95)  # JFIF YCbCr, 4:2:0
    ds = encapsulated(image_dataset(rgb, "RGB"), JPEGBaseline8Bit, [data])
    ds.PhotometricInterpretation = "YBR_FULL_422"
    img = decode_image(dicom_bytes(ds))
    assert img.mode == "RGB"
    # a missing or doubled YCbCr->RGB conversion would be off by tens to hundreds of levels
    assert np.abs(np.asarray(img).astype(int) - pillow_pixels(data)).max() <= 2


def test_dicom_rgb_uncompressed_is_identical(small_xray: np.ndarray) -> None:
    rgb = np.ascontiguousarray(np.stack([small_xray, 255 - small_xray, small_xray // 2], axis=-1))
    img = decode_image(dicom_bytes(image_dataset(rgb, "RGB")))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgb)


def test_dicom_multiframe_decodes_the_first_frame(small_xray: np.ndarray) -> None:
    frames = np.stack([small_xray, 255 - small_xray, small_xray // 2])
    ds = image_dataset(frames)
    assert ds.NumberOfFrames == 3
    np.testing.assert_array_equal(decoded(dicom_bytes(ds)), small_xray)


@pytest.mark.parametrize("tsyntax", [JPEG2000Lossless, RLELossless, JPEGLSLossless], ids=lambda u: u.name)
def test_dicom_lossless_compressions_are_identical(xray: tuple[bytes, np.ndarray], tsyntax: Any) -> None:
    data, pixels = xray
    encoder = get_encoder(tsyntax)
    if not encoder.is_available:
        pytest.skip(f"no encoder for {tsyntax.name} here: {'; '.join(encoder.missing_dependencies)}")
    ds = image_dataset(pixels)
    ds.compress(tsyntax, pixels)
    assert ds.file_meta.TransferSyntaxUID == tsyntax
    dcm = dicom_bytes(ds)
    np.testing.assert_array_equal(decoded(dcm), pixels)
    np.testing.assert_array_equal(model_input(dcm), model_input(data))


# ------------------------------------------------------------------------------------------------- failures


def test_text_named_png_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "chest.png"
    path.write_text("this is not an image\n")
    assert_decode_error(path.read_bytes(), ErrorCode.UNSUPPORTED_FORMAT)


def test_empty_input_is_corrupt() -> None:
    assert_decode_error(b"", ErrorCode.CORRUPT_IMAGE)


def test_truncated_real_jpegs_are_corrupt(sample_jpegs: list[Path]) -> None:
    for path in sample_jpegs:
        data = path.read_bytes()
        assert_decode_error(data[: len(data) // 2], ErrorCode.CORRUPT_IMAGE)
    assert_decode_error(sample_jpegs[0].read_bytes()[:40], ErrorCode.CORRUPT_IMAGE)


def test_truncated_png_is_corrupt(small_xray: np.ndarray) -> None:
    png = png_bytes(Image.fromarray(small_xray))
    assert_decode_error(png[: len(png) // 2], ErrorCode.CORRUPT_IMAGE)


def test_png_header_claiming_huge_dimensions_is_too_large() -> None:
    # over our limit (81 Mpx > 60 Mpx) but under Pillow's own bomb threshold: our header check
    assert_decode_error(png_header_only(9_000, 9_000), ErrorCode.TOO_LARGE)
    # far over Pillow's threshold as well: Pillow refuses at open
    assert_decode_error(png_header_only(100_000, 100_000), ErrorCode.TOO_LARGE)
    # the same header under a generous limit is merely corrupt (no pixel data to back it)
    assert_decode_error(png_header_only(90, 90), ErrorCode.CORRUPT_IMAGE)


def test_real_images_over_the_pixel_limit_are_too_large(xray: tuple[bytes, np.ndarray]) -> None:
    data, pixels = xray
    tiny = DecodeLimits(max_pixels=1000)
    assert_decode_error(data, ErrorCode.TOO_LARGE, limits=tiny)
    assert_decode_error(png_bytes(Image.fromarray(pixels)), ErrorCode.TOO_LARGE, limits=tiny)
    assert_decode_error(dicom_bytes(image_dataset(pixels)), ErrorCode.TOO_LARGE, limits=tiny)
    exact = DecodeLimits(max_pixels=pixels.size)
    assert decode_image(data, limits=exact).size == (pixels.shape[1], pixels.shape[0])


def test_decode_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DecodeLimits(max_pixels=0)


def test_dicom_non_image_object_is_unsupported() -> None:
    ds = new_dataset(BASIC_TEXT_SR)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    err = assert_decode_error(dicom_bytes(ds), ErrorCode.UNSUPPORTED_FORMAT)
    assert "no pixel data" in err.reason


def test_dicom_image_without_pixel_data_is_corrupt(small_xray: np.ndarray) -> None:
    ds = image_dataset(small_xray)
    del ds.PixelData
    assert_decode_error(dicom_bytes(ds), ErrorCode.CORRUPT_IMAGE)


def test_truncated_dicom_is_corrupt(small_xray: np.ndarray) -> None:
    dcm = dicom_bytes(image_dataset(small_xray))
    for cut in (len(dcm) - 100, len(dcm) // 2, 400, 140):
        assert_decode_error(dcm[:cut], ErrorCode.CORRUPT_IMAGE)


def test_truncated_jpeg_inside_dicom_is_corrupt(xray: tuple[bytes, np.ndarray]) -> None:
    data, pixels = xray
    ds = encapsulated(image_dataset(pixels), JPEGBaseline8Bit, [data[: len(data) // 2]])
    assert_decode_error(dicom_bytes(ds), ErrorCode.CORRUPT_IMAGE)


def test_dicom_garbage_after_preamble_is_corrupt() -> None:
    assert_decode_error(b"\x00" * 128 + b"DICM" + b"\xff" * 64, ErrorCode.CORRUPT_IMAGE)


def test_dicom_palette_colour_is_unsupported(small_xray: np.ndarray) -> None:
    ds = image_dataset(small_xray, "PALETTE COLOR")
    assert_decode_error(dicom_bytes(ds), ErrorCode.UNSUPPORTED_FORMAT)
