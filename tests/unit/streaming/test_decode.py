"""decode_image: every container brings the same chest X-ray to the same 8-bit pixels, and failures are typed.

PNG and DICOM inputs are built in code from the real JPEGs' decoded pixels, so "the same X-ray" is exact.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
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
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from streaming.decode import DecodeLimits, decode_image, sniff_format
from streaming.errors import DecodeError, ErrorCode, Stage
from streaming.preprocess import InputSpec, Scaling, to_model_input
from xray_files import (
    PATIENT_ID,
    PATIENT_NAME,
    dicom_bytes,
    encapsulated,
    image_dataset,
    jp2_box,
    jp2_wrapped,
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
    with pytest.raises(ValueError):
        DecodeLimits(max_jpeg_scans=0)


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


def test_reasons_name_the_limit_not_the_declared_size() -> None:
    err = assert_decode_error(png_header_only(9_001, 9_001), ErrorCode.TOO_LARGE)
    assert "81018001" not in err.reason and "9001" not in err.reason
    assert "60000000" in err.reason


# ------------------------------------------------------------------------------------ decompression bombs
#
# Each bomb declares far more than it carries. The decoder must refuse it with a typed error, fast, and without
# allocating what it declares. Memory is measured in a fresh interpreter (this one's peak RSS is whatever the
# suite reached before), under an address-space cap so that a regression fails the test, not the machine.

SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})
BOMB_SECONDS = 1.0
BOMB_RSS_BYTES = 64 << 20
REPO_ROOT = Path(__file__).resolve().parents[3]

_BOMB_PROBE = """
import json, resource, sys, time
from pathlib import Path

from streaming.decode import DecodeLimits, decode_image
from streaming.errors import DecodeError

def peak() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

manifest = json.loads(Path(sys.argv[1]).read_text())
for path in manifest["warmup"]:
    decode_image(Path(path).read_bytes())
try:
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    cap = pages * resource.getpagesize() + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
except (OSError, ValueError):
    pass

def measure(path: str, max_pixels: int) -> dict:
    data = Path(path).read_bytes()
    before, started = peak(), time.perf_counter()
    try:
        decode_image(data, DecodeLimits(max_pixels=max_pixels))
        outcome = "decoded"
    except DecodeError as err:
        outcome = err.code.value
    except BaseException as exc:
        outcome = "escaped " + type(exc).__name__
    return {"outcome": outcome, "seconds": time.perf_counter() - started, "rss": peak() - before}

print(json.dumps({case["name"]: measure(case["path"], case["max_pixels"]) for case in manifest["cases"]}))
"""


def jpeg_with_frame_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOFn) declaring another size; the scans are left as they were."""
    pos = 2
    while data[pos + 1] not in SOF_MARKERS and data[pos + 1] != 0xF7:
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return data[: pos + 5] + struct.pack(">HH", height, width) + data[pos + 9 :]


def j2k_with_image_size(codestream: bytes, width: int, height: int) -> bytes:
    """The JPEG 2000 codestream with its SIZ declaring another size (image offsets are zero as pydicom writes)."""
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    return codestream[:8] + struct.pack(">II", width, height) + codestream[16:]


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def pack_bits(bits: str) -> bytes:
    bits += "1" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def progressive_scan_bomb(width: int, height: int, scans: int) -> bytes:
    """A valid progressive grayscale JPEG whose AC scans are repeated `scans` times.

    Each repeated scan is 16 bytes (one EOB run code per 32767 blocks) yet costs libjpeg a pass over every
    block of the image: a few hundred kilobytes keep a core busy for minutes at tens of megapixels.
    """
    blocks = -(-width // 8) * -(-height // 8)
    head = (
        b"\xff\xd8"
        + jpeg_segment(0xDB, b"\x00" + bytes([1] * 64))
        + jpeg_segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + jpeg_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # DC: one 1-bit code, category 0
        + jpeg_segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\xe0")  # AC: one 1-bit code, EOB14
        + jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00")
        + pack_bits("0" * blocks)
    )
    eob_runs = pack_bits(("0" + "1" * 14) * -(-blocks // 32767)).replace(b"\xff", b"\xff\x00")
    scan = jpeg_segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + eob_runs
    return head + scan * scans + b"\xff\xd9"


def rle_replicate_bomb(run_pairs: int) -> bytes:
    """One RLE segment of `run_pairs` replicate runs: 2 bytes each, 128 bytes each once expanded."""
    return struct.pack("<16L", 1, 64, *([0] * 14)) + b"\x81\x00" * run_pairs


def _file_meta_end(part10: bytes) -> int:
    """Where the dataset starts: after the preamble, DICM, and the group length-prefixed file meta."""
    (group_length,) = struct.unpack("<I", part10[140:144])
    return 144 + group_length


def deflated_bomb(ds: Dataset, inflated_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian file of `ds` with a private OB element of zeros appended.

    Built by streaming the zeros through the compressor, so the test never holds what the file inflates to.
    """
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = dicom_bytes(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = dicom_bytes(ds)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [
        deflated[: _file_meta_end(deflated)],
        compressor.compress(plain[_file_meta_end(plain) :]),
        compressor.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, inflated_bytes)),
    ]
    zeros = bytes(1 << 20)
    for _ in range(inflated_bytes >> 20):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.flush())
    return b"".join(parts)


def _frame0(ds: Dataset) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _compressed(pixels: np.ndarray, tsyntax: UID) -> Dataset:
    ds = image_dataset(pixels)
    ds.compress(tsyntax, pixels)
    return ds


def _declaring(ds: Dataset, rows: int, columns: int) -> bytes:
    ds.Rows, ds.Columns = rows, columns
    return dicom_bytes(ds)


def bomb_cases(pixels: np.ndarray, jpeg: bytes) -> dict[str, tuple[bytes, int, ErrorCode]]:
    """name -> (file, max_pixels, expected code). `pixels` is a small 8-bit X-ray crop, `jpeg` its JPEG."""
    j2k = _frame0(_compressed(pixels, JPEG2000Lossless))
    default = DecodeLimits().max_pixels
    big = 65_535
    cases: dict[str, tuple[bytes, int, ErrorCode]] = {
        # PNG/JPEG headers: Pillow's own guard (>2x its MAX_IMAGE_PIXELS) or ours, both before decoding
        "png-ihdr-100000x100000": (png_header_only(100_000, 100_000), default, ErrorCode.TOO_LARGE),
        "png-ihdr-9000x9000": (png_header_only(9_000, 9_000), default, ErrorCode.TOO_LARGE),
        "jpeg-sof-65500x65500": (jpeg_with_frame_size(jpeg, 65_500, 65_500), default, ErrorCode.TOO_LARGE),
        "jpeg-sof-8000x8000": (jpeg_with_frame_size(jpeg, 8_000, 8_000), default, ErrorCode.TOO_LARGE),
        # a CPU bomb: 2000 scans over 16 Mpx (within the pixel limit), 100 kB, ~5 s of libjpeg without the limit
        "jpeg-2000-progressive-scans": (progressive_scan_bomb(4_000, 4_000, 2_000), default, ErrorCode.TOO_LARGE),
        # DICOM headers declaring 65535 x 65535 over a few bytes, in every transfer syntax family
        "dicom-native-header": (_declaring(image_dataset(pixels), big, big), default, ErrorCode.TOO_LARGE),
        "dicom-jpeg-header": (
            _declaring(encapsulated(image_dataset(pixels), JPEGBaseline8Bit, [jpeg]), big, big),
            default,
            ErrorCode.TOO_LARGE,
        ),
        "dicom-jpeg2000-header": (
            _declaring(_compressed(pixels, JPEG2000Lossless), big, big),
            default,
            ErrorCode.TOO_LARGE,
        ),
        "dicom-jpeg-ls-header": (
            _declaring(_compressed(pixels, JPEGLSLossless), big, big),
            default,
            ErrorCode.TOO_LARGE,
        ),
        "dicom-rle-header": (_declaring(_compressed(pixels, RLELossless), big, big), default, ErrorCode.TOO_LARGE),
        # the DICOM header is small and honest-looking; the codestream inside declares the bomb. Decoders size
        # their output by the codestream (pylibjpeg allocated ~4 GB for this before the codestream check).
        "dicom-jpeg-frame-65500x65500": (
            dicom_bytes(
                encapsulated(image_dataset(pixels), JPEGBaseline8Bit, [jpeg_with_frame_size(jpeg, 65_500, 65_500)])
            ),
            default,
            ErrorCode.TOO_LARGE,
        ),
        "dicom-jpeg2000-siz-65535x65535": (
            dicom_bytes(encapsulated(image_dataset(pixels), JPEG2000Lossless, [j2k_with_image_size(j2k, big, big)])),
            default,
            ErrorCode.TOO_LARGE,
        ),
        "dicom-jp2-ihdr-65535x65535": (
            dicom_bytes(encapsulated(image_dataset(pixels), JPEG2000Lossless, [jp2_wrapped(j2k, big, big)])),
            default,
            ErrorCode.TOO_LARGE,
        ),
        # within the limit but not the image the header describes: inconsistent before the size matters
        "dicom-jpeg-frame-4000x4000": (
            dicom_bytes(
                encapsulated(image_dataset(pixels), JPEGBaseline8Bit, [jpeg_with_frame_size(jpeg, 4_000, 4_000)])
            ),
            default,
            ErrorCode.CORRUPT_IMAGE,
        ),
        # 2 MB of replicate runs expand to 128 MB behind a small header: an inconsistent segment, not a size
        "dicom-rle-replicate-runs": (
            dicom_bytes(encapsulated(image_dataset(pixels), RLELossless, [rle_replicate_bomb(1 << 20)])),
            default,
            ErrorCode.CORRUPT_IMAGE,
        ),
        # 64 kB that inflate to 256 MB, over what one 1 Mpx frame needs (8 MB + 16 MB of header allowance)
        "dicom-deflated-256MB": (deflated_bomb(image_dataset(pixels), 256 << 20), 1_000_000, ErrorCode.TOO_LARGE),
        # the scan bomb inside a DICOM whose header agrees with it
        "dicom-jpeg-frame-2000-scans": (
            _declaring(
                encapsulated(image_dataset(pixels), JPEGBaseline8Bit, [progressive_scan_bomb(4_000, 4_000, 2_000)]),
                4_000,
                4_000,
            ),
            default,
            ErrorCode.TOO_LARGE,
        ),
        # not a bomb but a hang: pydicom walks JP2 boxes by their lengths and loops forever on a zero length
        "dicom-jp2-zero-length-box": (
            dicom_bytes(
                encapsulated(image_dataset(pixels), JPEG2000Lossless, [jp2_box(b"jP  ", b"\r\n\x87\n") + b"\0"])
            ),
            default,
            ErrorCode.CORRUPT_IMAGE,
        ),
    }
    assert all(len(data) < (4 << 20) for data, _, _ in cases.values())
    return cases


BOMBS = [
    "png-ihdr-100000x100000",
    "png-ihdr-9000x9000",
    "jpeg-sof-65500x65500",
    "jpeg-sof-8000x8000",
    "jpeg-2000-progressive-scans",
    "dicom-native-header",
    "dicom-jpeg-header",
    "dicom-jpeg2000-header",
    "dicom-jpeg-ls-header",
    "dicom-rle-header",
    "dicom-jpeg-frame-65500x65500",
    "dicom-jpeg2000-siz-65535x65535",
    "dicom-jp2-ihdr-65535x65535",
    "dicom-jpeg-frame-4000x4000",
    "dicom-rle-replicate-runs",
    "dicom-deflated-256MB",
    "dicom-jpeg-frame-2000-scans",
    "dicom-jp2-zero-length-box",
]


@pytest.fixture(scope="module")
def bomb_results(
    small_xray: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[ErrorCode, dict[str, Any]]]:
    """Decode every bomb once in a fresh interpreter; name -> (expected code, measured outcome)."""
    folder = tmp_path_factory.mktemp("bombs")
    crop = np.ascontiguousarray(small_xray[:48, :64])
    jpeg = jpeg_bytes(Image.fromarray(crop), quality=90)
    cases = bomb_cases(crop, jpeg)
    assert sorted(cases) == sorted(BOMBS)
    warmup = {
        "warm.jpeg": jpeg,
        "warm.png": png_bytes(Image.fromarray(crop)),
        "warm-native.dcm": dicom_bytes(image_dataset(crop)),
        "warm-jpeg.dcm": dicom_bytes(encapsulated(image_dataset(crop), JPEGBaseline8Bit, [jpeg])),
        **{
            f"warm-{t.name}.dcm": dicom_bytes(_compressed(crop, t))
            for t in (JPEG2000Lossless, JPEGLSLossless, RLELossless)
        },
    }
    manifest: dict[str, Any] = {"warmup": [], "cases": []}
    for name, data in warmup.items():
        (folder / name).write_bytes(data)
        manifest["warmup"].append(str(folder / name))
    for name, (data, max_pixels, _) in cases.items():
        (folder / name).write_bytes(data)
        manifest["cases"].append({"name": name, "path": str(folder / name), "max_pixels": max_pixels})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    probe = subprocess.run(
        [sys.executable, "-c", _BOMB_PROBE, str(folder / "manifest.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    return {name: (cases[name][2], measured[name]) for name in cases}


@pytest.mark.parametrize("name", BOMBS)
def test_decompression_bomb_is_refused_quickly_without_allocating_it(
    bomb_results: dict[str, tuple[ErrorCode, dict[str, Any]]], name: str
) -> None:
    expected, measured = bomb_results[name]
    assert measured["outcome"] == expected.value
    assert measured["seconds"] < BOMB_SECONDS
    assert measured["rss"] < BOMB_RSS_BYTES
