"""Fuzzing the decoders (PNG, JPEG, DICOM) and the reference parser under Hypothesis.

Whatever the bytes, `decode_image` returns a fully loaded image of mode "L" or "RGB" or raises `DecodeError`,
and `parse_reference` returns a `Reference` or raises `ParseError`; nothing else escapes, MemoryError included
(the limits here are small, so memory is never a legitimate reason), and no input hangs. Inputs are arbitrary
bytes behind each magic number, structurally plausible files built from scratch, and mutations of real files:
the shipped chest X-ray JPEG and PNG / DICOM files of it in every flavour the scorer reads.

Budgets come from CXR_FUZZ_PROFILE (tests/fuzz_profiles.py): "ci" by default, "long" for 100,000+ inputs.
Every input a fuzzer once broke the code with is kept below as an ``@example``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta, timezone
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import assume, event, example, given
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from fuzz_profiles import fuzz_settings, fuzz_timeout
from streaming.contracts import MAX_FIELD_CHARS, REFERENCE_SCHEMA, Reference, parse_reference, salvage_event_id
from streaming.decode import DecodeLimits, decode_image
from streaming.errors import DecodeError, ErrorCode, ParseError, Stage
from streaming.settings import sample_images_dir
from xray_files import (
    PATIENT_ID,
    PATIENT_NAME,
    dicom_bytes,
    encapsulated,
    image_dataset,
    jp2_wrapped,
    jpeg_bytes,
    pillow_pixels,
    png_bytes,
    png_variants,
    rescaled_windowed_12bit,
)

# ------------------------------------------------------------------------------------------------- budgets

#: Big enough for the real X-ray (1016 x 656) and every file built here, small enough that no legitimate
#: decode needs more than a few tens of megabytes: a MemoryError is always a bug.
FUZZ_MAX_PIXELS = 1 << 20
LIMITS = st.sampled_from(
    [
        DecodeLimits(max_pixels=FUZZ_MAX_PIXELS),
        DecodeLimits(max_pixels=FUZZ_MAX_PIXELS),
        DecodeLimits(max_pixels=FUZZ_MAX_PIXELS, max_jpeg_scans=3),
        DecodeLimits(max_pixels=4096),
    ]
)
DRAFTS = st.sampled_from([None, None, (150, 150), (1, 1), (299, 299)])
#: One input taking this long is a hang in the making (they take milliseconds); generous for shared CI cores.
SLOW_INPUT_S = 10.0

DECODE_CODES = frozenset({ErrorCode.UNSUPPORTED_FORMAT, ErrorCode.CORRUPT_IMAGE, ErrorCode.TOO_LARGE})
PARSE_CODES = frozenset(
    {
        ErrorCode.INVALID_JSON,
        ErrorCode.NOT_AN_OBJECT,
        ErrorCode.MISSING_FIELD,
        ErrorCode.INVALID_FIELD,
        ErrorCode.UNSUPPORTED_SCHEMA,
    }
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC = b"\x00" * 128 + b"DICM"

pytestmark = [pytest.mark.filterwarnings("ignore"), fuzz_timeout()]


@pytest.fixture(autouse=True)
def quiet_pydicom() -> Iterator[None]:
    """pydicom logs a warning for most malformed inputs; across 100,000 inputs pytest would keep them all."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


# ------------------------------------------------------------------------------------------------- properties


class _Interrupted(BaseException):
    """Raised by the alarm: a BaseException, so the decoder's `except Exception` handlers cannot swallow it."""


class InputHung(AssertionError):
    """An input that ran longer than `SLOW_INPUT_S`: an ordinary failure, so Hypothesis shrinks and reports it."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail the block with `InputHung` if it runs longer than `seconds`.

    A loop in Python code is interrupted by SIGALRM (Unix, main thread only); a loop inside C code cannot be
    and is left to pytest-timeout (`check_decode` still fails an input that returns late).
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt) if usable else None
    if usable:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Interrupted:
        raise InputHung(f"one input ran for more than {seconds:g} s") from None
    finally:
        if usable:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def check_decode(data: bytes, limits: DecodeLimits, draft_size: tuple[int, int] | None = None) -> None:
    """The decoder property: a loaded "L"/"RGB" image within the limit, or a typed DecodeError. Nothing else."""
    started = time.perf_counter()
    try:
        with time_limit(SLOW_INPUT_S):
            img = decode_image(data, limits, draft_size=draft_size)
    except DecodeError as err:
        event(f"decode: {err.code.value}")
        assert err.stage is Stage.DECODE
        assert err.code in DECODE_CODES, err
        assert err.reason and err.reason.endswith("."), err
        assert PATIENT_NAME not in err.reason and PATIENT_ID not in err.reason, err
    else:
        event("decode: an image")
        assert isinstance(img, Image.Image)
        assert img.mode in ("L", "RGB"), img.mode
        assert not getattr(img, "tile", None), "the image is not fully loaded"
        assert 0 < img.width * img.height <= limits.max_pixels
        pixels = np.asarray(img)
        assert pixels.dtype == np.uint8
        assert pixels.shape[:2] == (img.height, img.width)
    if time.perf_counter() - started > SLOW_INPUT_S:  # a DecodeError raised after the time ran out
        raise InputHung(f"one input ran for more than {SLOW_INPUT_S:g} s")


def check_parse(value: str | bytes | None) -> Reference | ParseError:
    """The parser property: a valid Reference or a typed ParseError; `salvage_event_id` never raises."""
    outcome: Reference | ParseError
    try:
        outcome = parse_reference(value)
    except ParseError as err:
        event(f"parse: {err.code.value}")
        assert err.stage is Stage.PARSE
        assert err.code in PARSE_CODES, err
        assert err.reason
        outcome = err
    else:
        event("parse: a reference")
        assert isinstance(outcome, Reference)
        for name in Reference.__slots__:
            field = getattr(outcome, name)
            assert field is None or (isinstance(field, str) and len(field) <= MAX_FIELD_CHARS)
            if field is not None:
                field.encode("utf-8")  # no lone surrogates get through
        assert outcome.event_id.strip() and outcome.uri.strip()
        assert parse_reference(outcome.to_json()) == outcome
        assert parse_reference(outcome.to_json().encode("utf-8")) == outcome
    salvaged = salvage_event_id(value)
    assert salvaged is None or (isinstance(salvaged, str) and salvaged.strip() and len(salvaged) <= MAX_FIELD_CHARS)
    if isinstance(outcome, Reference):
        assert salvaged == outcome.event_id
    return outcome


def same_outcome(a: Reference | ParseError, b: Reference | ParseError) -> bool:
    if isinstance(a, ParseError) and isinstance(b, ParseError):
        return a.code is b.code
    return a == b


# ------------------------------------------------------------------------------------------------- corpus


def _crop(rows: int, columns: int) -> np.ndarray:
    return np.ascontiguousarray(_xray_pixels()[200 : 200 + rows, 300 : 300 + columns])


@functools.cache
def _real_jpeg() -> bytes:
    """The smallest of the sixteen real chest X-rays, as shipped."""
    return min(sample_images_dir().glob("*.jpeg"), key=lambda p: p.stat().st_size).read_bytes()


@functools.cache
def _xray_pixels() -> np.ndarray:
    return pillow_pixels(_real_jpeg())


def _jp2(codestream: bytes) -> bytes:
    """A JPEG 2000 codestream in a JP2 wrapper (DICOM forbids it, pydicom and Pillow accept it)."""
    height, width = struct.unpack(">II", codestream[8:16])[::-1]
    return jp2_wrapped(codestream, width, height)


def _compressed(pixels: np.ndarray, tsyntax: UID) -> Dataset:
    ds = image_dataset(pixels)
    ds.compress(tsyntax, pixels)
    return ds


def _with_syntax(ds: Dataset, tsyntax: UID) -> Dataset:
    ds.file_meta.TransferSyntaxUID = tsyntax
    return ds


def _lut_item(entries: int, first: int, bits: int, data: list[int]) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, bits])
    item.add_new(0x00283006, "US", data)
    return item


def _dicom_builders() -> dict[str, Callable[[], Dataset]]:
    """Every DICOM flavour the scorer reads, from a 48 x 64 crop of the real X-ray (small, so inputs are fast)."""
    small = _crop(48, 64)
    rgb = np.ascontiguousarray(np.stack([small, 255 - small, small // 2], axis=-1))
    jpeg = jpeg_bytes(Image.fromarray(small), quality=90)

    def voi_lut() -> Dataset:
        ds = image_dataset(small.astype(np.uint16) * 16, bits_stored=12)
        ds.VOILUTSequence = [_lut_item(4096, 0, 8, [v // 16 for v in range(4096)])]
        return ds

    def modality_lut() -> Dataset:
        ds = image_dataset(small)
        ds.ModalityLUTSequence = [_lut_item(256, 0, 16, [v * 200 for v in range(256)])]
        ds.ModalityLUTSequence[0].ModalityLUTType = "US"
        return ds

    def fragmented_jpeg() -> Dataset:
        ds = image_dataset(small)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([jpeg], fragments_per_frame=3, has_bot=True)
        return ds

    def ybr_jpeg() -> Dataset:
        ds = encapsulated(image_dataset(rgb, "RGB"), JPEGBaseline8Bit, [jpeg_bytes(Image.fromarray(rgb), quality=90)])
        ds.PhotometricInterpretation = "YBR_FULL_422"
        return ds

    def jp2_wrapped() -> Dataset:
        codestream = next(generate_frames(_compressed(small, JPEG2000Lossless).PixelData, number_of_frames=1))
        return encapsulated(image_dataset(small), JPEG2000Lossless, [_jp2(codestream)])

    return {
        "dicom-mono2": lambda: image_dataset(small),
        "dicom-mono1": lambda: image_dataset(255 - small, "MONOCHROME1"),
        "dicom-12bit-rescale-window": lambda: rescaled_windowed_12bit(small),
        "dicom-16bit": lambda: image_dataset(small.astype(np.uint16) * 257, bits_stored=16),
        "dicom-signed": lambda: image_dataset((small.astype(np.int16) - 128).astype(np.int8)),
        "dicom-rgb": lambda: image_dataset(rgb, "RGB"),
        "dicom-multiframe": lambda: image_dataset(np.stack([small, 255 - small])),
        "dicom-voi-lut": voi_lut,
        "dicom-modality-lut": modality_lut,
        "dicom-implicit-vr": lambda: _with_syntax(image_dataset(small), ImplicitVRLittleEndian),
        "dicom-big-endian": lambda: _with_syntax(
            image_dataset(small.astype(np.uint16) * 16, bits_stored=12), ExplicitVRBigEndian
        ),
        "dicom-deflated": lambda: _with_syntax(image_dataset(small), DeflatedExplicitVRLittleEndian),
        "dicom-jpeg-baseline": lambda: encapsulated(image_dataset(small), JPEGBaseline8Bit, [jpeg]),
        "dicom-jpeg-fragments": fragmented_jpeg,
        "dicom-jpeg-ybr": ybr_jpeg,
        "dicom-jpeg2000": lambda: _compressed(small, JPEG2000Lossless),
        "dicom-jp2-wrapped": jp2_wrapped,
        "dicom-jpeg-ls": lambda: _compressed(small, JPEGLSLossless),
        "dicom-rle": lambda: _compressed(small, RLELossless),
        "dicom-rle-rgb": lambda: _compressed(rgb, RLELossless),
    }


JPEG_BASES = ["jpeg-real", "jpeg-progressive", "jpeg-rgb-restart"]
PNG_BASES = ["png-8bit-L", "png-8bit-RGB", "png-16bit", "png-palette", "png-LA", "png-1bit"]
DICOM_BASES = sorted(
    [
        "dicom-mono2",
        "dicom-mono1",
        "dicom-12bit-rescale-window",
        "dicom-16bit",
        "dicom-signed",
        "dicom-rgb",
        "dicom-multiframe",
        "dicom-voi-lut",
        "dicom-modality-lut",
        "dicom-implicit-vr",
        "dicom-big-endian",
        "dicom-deflated",
        "dicom-jpeg-baseline",
        "dicom-jpeg-fragments",
        "dicom-jpeg-ybr",
        "dicom-jpeg2000",
        "dicom-jp2-wrapped",
        "dicom-jpeg-ls",
        "dicom-rle",
        "dicom-rle-rgb",
    ]
)


@functools.cache
def corpus() -> dict[str, bytes]:
    """name -> bytes of every base file; each decodes (checked once, in `test_corpus_decodes`)."""
    crop = _crop(96, 128)
    gray = Image.fromarray(crop)
    rgb = Image.fromarray(np.ascontiguousarray(np.stack([crop, 255 - crop, crop // 2], axis=-1)))
    files = {
        "jpeg-real": _real_jpeg(),
        "jpeg-progressive": jpeg_bytes(gray, quality=85, progressive=True),
        "jpeg-rgb-restart": jpeg_bytes(rgb, quality=85, restart_marker_blocks=4),
        **png_variants(crop),
        "png-palette": png_bytes(rgb.quantize(64)),
        "png-LA": png_bytes(Image.merge("LA", (gray, Image.new("L", gray.size, 77)))),
        "png-1bit": png_bytes(gray.convert("1")),
    }
    files.update({name: dicom_bytes(build()) for name, build in _dicom_builders().items()})
    assert sorted(files) == sorted(JPEG_BASES + PNG_BASES + DICOM_BASES)
    return files


def test_corpus_decodes() -> None:
    """The mutation bases are good files: fuzzing starts from inputs that reach the decoders' depths."""
    for name, data in corpus().items():
        img = decode_image(data, DecodeLimits(max_pixels=FUZZ_MAX_PIXELS))
        assert img.mode in ("L", "RGB"), name


# ------------------------------------------------------------------------------------------------- mutations

INTERESTING_BYTES = [
    0x00,
    0x01,
    0x02,
    0x07,
    0x08,
    0x0F,
    0x10,
    0x7F,
    0x80,
    0x81,
    0xC0,
    0xC2,
    0xD8,
    0xD9,
    0xDA,
    0xFE,
    0xFF,
]
INTERESTING_U16 = [0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 32, 64, 255, 256, 1023, 4095, 32767, 32768, 65534, 65535]
INTERESTING_U32 = [0, 1, 2, 8, 255, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]


@st.composite
def byte_mutations(draw: st.DrawFn, base: bytes, header: int = 1024) -> bytes:
    """`base` after 1-8 byte-level edits: flips, interesting values, insertions, deletions, duplications,
    a truncation. Offsets are drawn from the whole file or from its first `header` bytes, where the fields that
    size everything live."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        limit = len(data) - 1 if draw(st.booleans()) else min(len(data), header) - 1
        pos = draw(st.integers(0, max(limit, 0)))
        op = draw(st.sampled_from(["flip", "set", "set16", "set32", "insert", "delete", "duplicate", "truncate"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255))
        elif op == "set16":
            order = draw(st.sampled_from([">H", "<H"]))
            data[pos : pos + 2] = struct.pack(order, draw(st.sampled_from(INTERESTING_U16)))
        elif op == "set32":
            order = draw(st.sampled_from([">I", "<I"]))
            data[pos : pos + 4] = struct.pack(order, draw(st.sampled_from(INTERESTING_U32)))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 256))]
        elif op == "duplicate":
            length = draw(st.integers(1, 512))
            data[pos:pos] = data[pos : pos + length] * draw(st.integers(1, 8))
        else:
            del data[pos:]
    return bytes(data)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk after the signature, as far as the lengths allow."""
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


@st.composite
def png_field_mutations(draw: st.DrawFn, base: bytes) -> bytes:
    """The PNG with IHDR fields overwritten (valid CRC), chunks dropped, repeated or with edited payloads, and
    CRCs recomputed, so the edits get past the CRC check to the decoder."""
    chunks = png_chunks(base)
    ihdr = bytearray(chunks[0][1])
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(["width", "height", "depth", "colour", "compression", "filter", "interlace"]))
        if field in ("width", "height"):
            offset = 0 if field == "width" else 4
            value = draw(st.sampled_from([0, 1, 2, 127, 129, 1000, 1 << 20, 100_000, 2**31 - 1, 2**32 - 1]))
            ihdr[offset : offset + 4] = struct.pack(">I", value)
        else:
            index = {"depth": 8, "colour": 9, "compression": 10, "filter": 11, "interlace": 12}[field]
            ihdr[index] = draw(st.sampled_from([0, 1, 2, 3, 4, 6, 8, 16, 255]))
    chunks[0] = (b"IHDR", bytes(ihdr))
    for _ in range(draw(st.integers(0, 3))):
        index = draw(st.integers(0, len(chunks) - 1))
        action = draw(st.sampled_from(["drop", "repeat", "payload", "split-idat"]))
        kind, payload = chunks[index]
        if action == "drop":
            del chunks[index]
        elif action == "repeat":
            chunks.insert(index, chunks[index])
        elif action == "payload":
            chunks[index] = (
                kind,
                draw(byte_mutations(payload, header=64)) if payload else draw(st.binary(max_size=64)),
            )
        elif kind == b"IDAT" and len(payload) > 2:
            cut = draw(st.integers(1, len(payload) - 1))
            chunks[index : index + 1] = [(b"IDAT", payload[:cut]), (b"IDAT", payload[cut:])]
        if not chunks:
            break
    return PNG_MAGIC + b"".join(png_chunk(kind, payload) for kind, payload in chunks)


def jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of each marker segment before the first scan's data."""
    found, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        found.append((pos, marker))
        if marker == 0xDA:
            break
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return found


@st.composite
def jpeg_field_mutations(draw: st.DrawFn, base: bytes) -> bytes:
    """The JPEG with header fields overwritten: frame size, precision, components and sampling factors,
    quantisation and Huffman tables, scan parameters, restart interval; or segments repeated or dropped."""
    data = bytearray(base)
    segments = jpeg_segments(base)
    for _ in range(draw(st.integers(1, 4))):
        pos, marker = draw(st.sampled_from(segments))
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = pos + 4
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            field = draw(st.sampled_from(["precision", "height", "width", "components", "sampling", "marker"]))
            if field == "precision":
                data[body] = draw(st.sampled_from([0, 1, 2, 8, 12, 16, 255]))
            elif field in ("height", "width"):
                offset = body + (1 if field == "height" else 3)
                data[offset : offset + 2] = struct.pack(">H", draw(st.sampled_from(INTERESTING_U16)))
            elif field == "components":
                data[body + 5] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 255]))
            elif field == "sampling" and length > 8:
                data[body + 7] = draw(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x44, 0x41, 0xFF]))
            else:
                data[pos + 1] = draw(st.sampled_from([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC9, 0xCA, 0xCB, 0xF7]))
        elif (marker == 0xDA and length >= 6) or (marker in (0xC4, 0xDB, 0xDD) and length > 2):
            offset = body + draw(st.integers(0, length - 3))
            data[offset] = draw(st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255))
        elif draw(st.booleans()):
            segment = bytes(data[pos : pos + 2 + length])
            data[pos:pos] = segment * draw(st.integers(1, 3))
        else:
            del data[pos : pos + 2 + length]
        segments = jpeg_segments(bytes(data)) or [(2, 0xD8)]
    return bytes(data)


# -------------------------------------------------------------------------------- DICOM header mutations

#: value strategies by VR, for header fields written with their own VR or a wrong one
VR_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "US": st.sampled_from(INTERESTING_U16) | st.integers(0, 65535),
    "SS": st.sampled_from([-32768, -1, 0, 1, 8, 16, 32767]),
    "UL": st.sampled_from(INTERESTING_U32),
    "IS": st.sampled_from(["0", "1", "-1", "8", "16", "65535", "99999999999", "2147483648", ""]),
    "DS": st.sampled_from(["0", "1", "-1", "0.5", "1e308", "-1e308", "1e-308", "nan", "inf", "-inf", "", "8"]),
    "FD": st.sampled_from([0.0, 1.0, -1.0, 1e308, float("inf"), float("nan"), 8.0]),
    "OB": st.binary(max_size=16),
    "CS": st.sampled_from(["", "MONOCHROME2", "RGB", "X" * 16, "8"]),
}
PHOTOMETRIC = [
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "PALETTE COLOR",
    "YBR_PARTIAL_420",
    "HSV",
    "",
    "monochrome2",
    "MONOCHROME2 ",
    "NONSENSE",
]
US_FIELDS = [
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PlanarConfiguration",
]
DS_FIELDS = ["RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"]
ALL_FIELDS = [*US_FIELDS, *DS_FIELDS, "PhotometricInterpretation", "NumberOfFrames", "VOILUTFunction"]
TRANSFER_SYNTAXES = sorted({*AllTransferSyntaxes, "1.2.3.4", "1.2.840.10008.1.2.4.100"})


@st.composite
def lut_items(draw: st.DrawFn) -> Dataset:
    entries = draw(st.sampled_from([0, 1, 2, 255, 256, 4096, 65535]))
    first = draw(st.sampled_from([0, 1, 100, 32768, 65535]))
    bits = draw(st.sampled_from([0, 1, 8, 10, 12, 16, 17, 32, 65535]))
    data = draw(st.lists(st.integers(0, 65535), max_size=300) | st.just([v % 65536 for v in range(entries)]))
    return _lut_item(entries, first, bits, data)


@st.composite
def dicom_field_mutations(draw: st.DrawFn, name: str) -> bytes:
    """A DICOM base with 1-4 header edits: image pixel fields set to interesting values, with their own VR or a
    wrong one, deleted, multi-valued; LUT sequences replaced; pixel data cut, replaced or re-fragmented; the
    file meta declaring another transfer syntax than the body is written in."""
    ds = pydicom.dcmread(BytesIO(corpus()[name]))
    relabel: str | None = None
    with pydicom.config.disable_value_validation():
        for _ in range(draw(st.integers(1, 4))):
            edit = draw(st.sampled_from(["field", "field", "wrong-vr", "delete", "multi", "lut", "pixels", "syntax"]))
            keyword = draw(st.sampled_from(ALL_FIELDS))
            tag = pydicom.datadict.tag_for_keyword(keyword)
            assert tag is not None
            if edit == "field":
                if keyword in US_FIELDS:
                    ds.add_new(tag, "US", draw(VR_VALUES["US"]))
                elif keyword in DS_FIELDS:
                    ds.add_new(tag, "DS", draw(VR_VALUES["DS"]))
                elif keyword == "PhotometricInterpretation":
                    ds.add_new(tag, "CS", draw(st.sampled_from(PHOTOMETRIC)))
                elif keyword == "NumberOfFrames":
                    ds.add_new(tag, "IS", draw(VR_VALUES["IS"]))
                else:
                    ds.add_new(tag, "CS", draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "", "BOGUS"])))
            elif edit == "wrong-vr":
                vr = draw(st.sampled_from(sorted(VR_VALUES)))
                ds.add_new(tag, vr, draw(VR_VALUES[vr]))
            elif edit == "delete":
                if keyword in ds:
                    del ds[keyword]
            elif edit == "multi":
                if keyword in US_FIELDS:
                    ds.add_new(tag, "US", draw(st.lists(VR_VALUES["US"], min_size=0, max_size=3)))
                elif keyword in DS_FIELDS:
                    ds.add_new(tag, "DS", draw(st.lists(VR_VALUES["DS"], min_size=0, max_size=3)))
            elif edit == "lut":
                which = draw(st.sampled_from(["VOILUTSequence", "ModalityLUTSequence"]))
                setattr(ds, which, draw(st.lists(lut_items(), min_size=0, max_size=2)))
            elif edit == "pixels":
                pixel_data = bytes(ds.PixelData) if "PixelData" in ds else b""
                how = draw(st.sampled_from(["cut", "random", "fragments", "delete"]))
                if how == "cut":
                    ds.PixelData = pixel_data[: draw(st.integers(0, max(len(pixel_data) - 1, 0)))]
                elif how == "random":
                    ds.PixelData = draw(st.binary(max_size=256))
                elif how == "fragments" and ds.file_meta.TransferSyntaxUID.is_encapsulated and pixel_data:
                    try:
                        frames = list(generate_frames(pixel_data, number_of_frames=1))
                    except Exception:  # an earlier edit broke the encapsulation: treat it all as one frame
                        frames = [pixel_data]
                    frames = frames + frames if draw(st.booleans()) else frames
                    mutants = [draw(byte_mutations(frame, header=256)) or b"\x00\x00" for frame in frames]
                    fragments = min(draw(st.integers(1, 4)), min(len(frame) for frame in mutants) // 2)
                    ds.PixelData = encapsulate(
                        mutants, fragments_per_frame=max(fragments, 1), has_bot=draw(st.booleans())
                    )
                elif "PixelData" in ds:
                    del ds.PixelData
            else:
                relabel = draw(st.sampled_from(TRANSFER_SYNTAXES))
        try:
            data = dicom_bytes(ds)
        except Exception:
            assume(False)
            raise
    return data if relabel is None else relabelled(data, relabel)


def relabelled(part10: bytes, tsyntax: str) -> bytes:
    """The same dataset bytes behind file meta that declares another transfer syntax."""
    (group_length,) = struct.unpack("<I", part10[140:144])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    meta.TransferSyntaxUID = UID(tsyntax)
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    return part10[:132] + buf.getvalue() + part10[144 + group_length :]


# --------------------------------------------------------------------------------- files built from scratch

PNG_KINDS = [b"IDAT", b"PLTE", b"tRNS", b"gAMA", b"iCCP", b"zTXt", b"iTXt", b"tEXt", b"acTL", b"fcTL", b"fdAT", b"sBIT"]


@st.composite
def png_from_scratch(draw: st.DrawFn) -> bytes:
    """Signature, an IHDR of plausible fields, chunks of known and random kinds (zlib streams where PNG has
    them), IEND; CRCs valid unless drawn otherwise."""
    width = draw(st.sampled_from([1, 2, 3, 8, 17, 64, 1000, 5000]) | st.integers(0, 2**31))
    height = draw(st.sampled_from([1, 2, 3, 8, 17, 64, 1000, 5000]) | st.integers(0, 2**31))
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 0, 3]))
    colour = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
    interlace = draw(st.sampled_from([0, 1, 2]))
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(PNG_KINDS) | st.binary(min_size=4, max_size=4))
        raw = draw(st.binary(max_size=512))
        payload = zlib.compress(raw) if kind in (b"IDAT", b"zTXt", b"iCCP") and draw(st.booleans()) else raw
        chunks.append((kind, payload))
    if draw(st.booleans()):
        chunks.append((b"IEND", b""))
    out = PNG_MAGIC + b"".join(png_chunk(kind, payload) for kind, payload in chunks)
    return draw(byte_mutations(out)) if draw(st.integers(0, 3)) == 0 else out


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", min(len(payload) + 2, 0xFFFF)) + payload


@st.composite
def jpeg_from_scratch(draw: st.DrawFn) -> bytes:
    """SOI, then segments of every kind a decoder meets before and between scans (tables, frame headers of any
    process, scans with entropy-coded bytes, restart intervals, APPn), in a drawn order, maybe an EOI."""
    parts = [b"\xff\xd8"]
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["dqt", "dht", "sof", "sos", "dri", "app", "raw"]))
        if kind == "dqt":
            parts.append(
                jpeg_segment(
                    0xDB, bytes([draw(st.sampled_from([0, 1, 16, 17]))]) + draw(st.binary(min_size=64, max_size=128))
                )
            )
        elif kind == "dht":
            counts = draw(st.lists(st.integers(0, 4), min_size=16, max_size=16))
            table = bytes([draw(st.sampled_from([0x00, 0x01, 0x10, 0x11]))]) + bytes(counts)
            parts.append(jpeg_segment(0xC4, table + draw(st.binary(min_size=sum(counts), max_size=sum(counts)))))
        elif kind == "sof":
            marker = draw(st.sampled_from([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC9, 0xCA, 0xCB, 0xF7]))
            components = draw(st.sampled_from([1, 3, 4, 0, 2]))
            header = struct.pack(
                ">BHHB",
                draw(st.sampled_from([8, 12, 16, 2, 0])),
                draw(st.sampled_from(INTERESTING_U16[:12])),
                draw(st.sampled_from(INTERESTING_U16[:12])),
                components,
            )
            specs = b"".join(
                bytes([i + 1, draw(st.sampled_from([0x11, 0x22, 0x21, 0x44])), 0]) for i in range(components)
            )
            parts.append(jpeg_segment(marker, header + specs))
        elif kind == "sos":
            components = draw(st.integers(1, 3))
            spec = b"".join(bytes([i + 1, 0x00]) for i in range(components))
            params = bytes(draw(st.lists(st.integers(0, 255), min_size=3, max_size=3)))
            parts.append(jpeg_segment(0xDA, bytes([components]) + spec + params))
            parts.append(draw(st.binary(max_size=512)).replace(b"\xff", b"\xff\x00"))
        elif kind == "dri":
            parts.append(jpeg_segment(0xDD, struct.pack(">H", draw(st.sampled_from([0, 1, 2, 65535])))))
        elif kind == "app":
            parts.append(jpeg_segment(draw(st.integers(0xE0, 0xEF)), draw(st.binary(max_size=64))))
        else:
            parts.append(draw(st.binary(max_size=32)))
    if draw(st.booleans()):
        parts.append(b"\xff\xd9")
    return b"".join(parts)


@st.composite
def dicom_from_scratch(draw: st.DrawFn) -> bytes:
    """A valid file meta (any transfer syntax) followed by explicit little-endian elements of drawn tags, VRs,
    lengths (honest or not) and values, with the image pixel module's tags over-represented."""
    tsyntax = draw(st.sampled_from(TRANSFER_SYNTAXES))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    meta.TransferSyntaxUID = UID(tsyntax)
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    body = []
    image_tags = [0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280103]
    tags = sorted(draw(st.lists(st.sampled_from(image_tags) | st.integers(0x00080000, 0x7FE00010), max_size=12)))
    if draw(st.booleans()):
        tags.append(0x7FE00010)
    for tag in tags:
        vr = draw(st.sampled_from(["US", "UL", "CS", "IS", "DS", "OB", "OW", "SQ", "UN", "UI", "LO", "XX"]))
        value = draw(st.binary(max_size=64))
        group, element = tag >> 16, tag & 0xFFFF
        if vr in ("OB", "OW", "SQ", "UN"):
            length = draw(st.sampled_from([len(value), 0xFFFFFFFF, len(value) + 100]))
            body.append(struct.pack("<HH2sHI", group, element, vr.encode(), 0, length) + value)
        else:
            length = draw(st.sampled_from([len(value), len(value) + 7, 0]))
            body.append(struct.pack("<HH2sH", group, element, vr.encode(), length & 0xFFFF) + value)
    return DICOM_MAGIC + buf.getvalue() + b"".join(body)


# ------------------------------------------------------------------------------------------------- regressions


def _regression_inputs() -> dict[str, bytes]:
    """Inputs that once crashed, hung or exhausted `decode_image`, built from a synthetic gradient at import
    (`@example` needs them before any fixture runs). Each is a case the fuzzers found or the decompression-bomb
    review of streaming/decode.py turned up; see the comments."""
    gradient = (np.arange(48 * 64) % 251).astype(np.uint8).reshape(48, 64)
    jpeg = jpeg_bytes(Image.fromarray(gradient), quality=90)
    found: dict[str, bytes] = {}

    # fuzz (mutated DICOM): a byte flip turned the VR of SOP Class UID into "TI"; pydicom converts values on
    # first access, so reading it raised NotImplementedError past every handler (a file without pixel data)
    ds = image_dataset(gradient)
    del ds.PixelData
    found["dicom-unknown-vr"] = dicom_bytes(ds).replace(b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00TI", 1)

    # review: pydicom walks JP2 boxes by their lengths and loops forever on a zero length (a hang)
    jp2_signature = struct.pack(">I", 12) + b"jP  \r\n\x87\n"
    found["dicom-jp2-zero-length-box"] = dicom_bytes(
        encapsulated(image_dataset(gradient), JPEG2000Lossless, [jp2_signature + b"\x00"])
    )

    # review: a small, honest DICOM header over a JPEG whose frame header declares 65500 x 65500; pylibjpeg
    # sized its output by the codestream (~4 GB) after Pillow refused it
    sof = jpeg.index(b"\xff\xc0")
    huge = jpeg[: sof + 5] + struct.pack(">HH", 65_500, 65_500) + jpeg[sof + 9 :]
    found["dicom-jpeg-frame-65500x65500"] = dicom_bytes(encapsulated(image_dataset(gradient), JPEGBaseline8Bit, [huge]))

    # review: an RLE segment of replicate runs expands 64-fold before pydicom trims it to the plane
    runs = struct.pack("<16L", 1, 64, *([0] * 14)) + b"\x81\x00" * (64 << 10)
    found["dicom-rle-replicate-runs"] = dicom_bytes(encapsulated(image_dataset(gradient), RLELossless, [runs]))

    # review: a deflated dataset whose private element of zeros inflates to 20 MB, from 20 kB
    ds = _with_syntax(image_dataset(gradient), DeflatedExplicitVRLittleEndian)
    ds.add_new(0x00091010, "OB", bytes(20 << 20))
    found["dicom-deflated-20MB"] = dicom_bytes(ds)

    # review: a progressive JPEG whose last scan is repeated 300 times; each repeat costs a pass over the image
    progressive = jpeg_bytes(Image.fromarray(gradient), quality=90, progressive=True)
    last_scan = progressive.rindex(b"\xff\xda")
    found["jpeg-300-scans"] = progressive[:last_scan] + progressive[last_scan:-2] * 300 + progressive[-2:]
    return found


REGRESSIONS = _regression_inputs()
#: with this limit the deflated regression inflates past its allowance (8 x 4096 pixels + 16 MiB of header)
SMALL_LIMITS = DecodeLimits(max_pixels=4096)


def test_regressions_are_typed_errors() -> None:
    """Each regression input is refused with the code the fix gives it, not merely "not a crash"."""
    expected = {
        "dicom-unknown-vr": ErrorCode.CORRUPT_IMAGE,
        "dicom-jp2-zero-length-box": ErrorCode.CORRUPT_IMAGE,
        "dicom-jpeg-frame-65500x65500": ErrorCode.TOO_LARGE,
        "dicom-rle-replicate-runs": ErrorCode.CORRUPT_IMAGE,
        "dicom-deflated-20MB": ErrorCode.TOO_LARGE,
        "jpeg-300-scans": ErrorCode.TOO_LARGE,
    }
    assert sorted(expected) == sorted(REGRESSIONS)
    for name, code in expected.items():
        with pytest.raises(DecodeError) as caught:
            decode_image(REGRESSIONS[name], SMALL_LIMITS)
        assert caught.value.code is code, name


# ------------------------------------------------------------------------------------------------- decoders


@fuzz_settings(ci=300, long=15_000)
@given(
    magic=st.sampled_from([PNG_MAGIC, JPEG_MAGIC, DICOM_MAGIC]),
    tail=st.binary(max_size=2048),
    limits=LIMITS,
    draft=DRAFTS,
)
@example(magic=DICOM_MAGIC, tail=b"\xff" * 64, limits=DecodeLimits(), draft=None)
def test_arbitrary_bytes_behind_each_magic(
    magic: bytes, tail: bytes, limits: DecodeLimits, draft: tuple[int, int] | None
) -> None:
    check_decode(magic + tail, limits, draft)


@fuzz_settings(ci=300, long=15_000)
@given(data=st.one_of(png_from_scratch(), jpeg_from_scratch(), dicom_from_scratch()), limits=LIMITS, draft=DRAFTS)
@example(data=REGRESSIONS["dicom-unknown-vr"], limits=SMALL_LIMITS, draft=None)
@example(data=REGRESSIONS["dicom-jp2-zero-length-box"], limits=SMALL_LIMITS, draft=None)
@example(data=REGRESSIONS["dicom-jpeg-frame-65500x65500"], limits=SMALL_LIMITS, draft=None)
@example(data=REGRESSIONS["dicom-rle-replicate-runs"], limits=SMALL_LIMITS, draft=None)
@example(data=REGRESSIONS["dicom-deflated-20MB"], limits=SMALL_LIMITS, draft=None)
@example(data=REGRESSIONS["jpeg-300-scans"], limits=DecodeLimits(), draft=(150, 150))
def test_files_built_from_scratch(data: bytes, limits: DecodeLimits, draft: tuple[int, int] | None) -> None:
    check_decode(data, limits, draft)


@fuzz_settings(ci=150, long=12_000)
@given(name=st.sampled_from(JPEG_BASES), choice=st.data(), limits=LIMITS, draft=DRAFTS)
def test_mutated_jpegs(name: str, choice: st.DataObject, limits: DecodeLimits, draft: tuple[int, int] | None) -> None:
    base = corpus()[name]
    mutate = st.one_of(byte_mutations(base), jpeg_field_mutations(base))
    check_decode(choice.draw(mutate, label="mutant"), limits, draft)


@fuzz_settings(ci=200, long=12_000)
@given(name=st.sampled_from(PNG_BASES), choice=st.data(), limits=LIMITS, draft=DRAFTS)
def test_mutated_pngs(name: str, choice: st.DataObject, limits: DecodeLimits, draft: tuple[int, int] | None) -> None:
    base = corpus()[name]
    mutate = st.one_of(byte_mutations(base), png_field_mutations(base))
    check_decode(choice.draw(mutate, label="mutant"), limits, draft)


@fuzz_settings(ci=300, long=25_000)
@given(name=st.sampled_from(DICOM_BASES), choice=st.data(), limits=LIMITS)
def test_mutated_dicoms(name: str, choice: st.DataObject, limits: DecodeLimits) -> None:
    base = corpus()[name]
    mutate = st.one_of(byte_mutations(base), dicom_field_mutations(name))
    check_decode(choice.draw(mutate, label="mutant"), limits)


# ------------------------------------------------------------------------------------------------- parser

OPTIONAL_FIELDS = ["study_uid", "series_uid", "sop_instance_uid", "accession", "modality", "view_position"]
SPECIAL_TEXT = [
    "",
    " ",
    "\t\n",
    "\x00",
    "\ud800",
    "a\udfffb",
    "\ud83d\ude00",
    "é",
    "\u2028",
    "\ufeff",
    "file:///data/x.jpeg",
    "ev-1",
]
TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(SPECIAL_TEXT),
    st.sampled_from([MAX_FIELD_CHARS, MAX_FIELD_CHARS + 1]).map(lambda n: "x" * n),
    st.integers(0, 40_000).map(lambda n: "y" * n),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
TIMESTAMPS = st.one_of(
    st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=-9, minutes=-30))])).map(
        lambda moment: moment.isoformat()
    ),
    st.sampled_from(["2024-05-01T10:00:00Z", "2024-05-01T10:00:00.123z", "2024-05-01", "yesterday", "Z", "T"]),
)
SCHEMA_TYPOS = ["cxr.reference/v2", "", REFERENCE_SCHEMA.upper(), REFERENCE_SCHEMA + " "]
PLAUSIBLE_TEXT = st.text(min_size=1, max_size=40).filter(str.strip)
FIELD_VALUES = st.one_of(PLAUSIBLE_TEXT, PLAUSIBLE_TEXT, TEXT, JSON_VALUES)


def often(draw: st.DrawFn, percent: int) -> bool:
    """True roughly `percent` % of the time (Hypothesis favours small integers, so somewhat more often)."""
    return draw(st.integers(0, 99)) < percent


@st.composite
def near_contract_documents(draw: st.DrawFn) -> Any:
    """Mostly the reference schema: each field present most of the time, holding text (sometimes huge or
    unencodable) or any other JSON value; unknown fields; sometimes not an object at all."""
    body: dict[str, Any] = {}
    if often(draw, 90):
        body["schema"] = REFERENCE_SCHEMA if often(draw, 80) else draw(FIELD_VALUES | st.sampled_from(SCHEMA_TYPOS))
    for name in ("event_id", "uri"):
        if often(draw, 90):
            body[name] = draw(PLAUSIBLE_TEXT) if often(draw, 70) else draw(FIELD_VALUES)
    for name in OPTIONAL_FIELDS:
        if often(draw, 30):
            body[name] = draw(PLAUSIBLE_TEXT) if often(draw, 50) else draw(FIELD_VALUES)
    if often(draw, 40):
        body["sent_at"] = draw(TIMESTAMPS) if often(draw, 70) else draw(FIELD_VALUES)
    if often(draw, 30):
        body.update(draw(st.dictionaries(TEXT, JSON_VALUES, max_size=3)))
    if often(draw, 90):
        return body
    return draw(st.sampled_from([[body], None, "text", 1]))


def encode(document: Any, how: str, ascii_only: bool) -> str | bytes:
    text = json.dumps(document, ensure_ascii=ascii_only, allow_nan=True)
    if how == "str":
        return text
    if how == "utf-8-bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass")
    if how in ("utf-8", "surrogatepass"):
        return text.encode("utf-8", "surrogatepass")
    return text.encode(how, "surrogatepass" if how.startswith("utf") else "replace")


#: how a document goes on the wire: as text, as UTF-8 (the contract), or as bytes the contract rules out
ENCODINGS = ["str", "str", "utf-8", "utf-8", "utf-8", "utf-8-bom", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]
ENCODINGS += ["latin-1", "cp1252"]
DEEP = 100_000


def expected_for_bytes(value: bytes) -> Reference | ParseError:
    """What bytes must give: the outcome of their strict UTF-8 text, or INVALID_JSON if there is none."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return ParseError(ErrorCode.INVALID_JSON, "not UTF-8")
    return check_parse(text)


@fuzz_settings(ci=600, long=15_000)
@given(value=st.binary(max_size=4096))
@example(value=b"[" * DEEP)
@example(value=b"[" * DEEP + b"]" * DEEP)
@example(value=b'{"a":' * DEEP)
@example(value=b"\xef\xbb\xbf" + Reference(event_id="e", uri="u").to_json().encode())
@example(value=Reference(event_id="e", uri="u").to_json().encode("utf-16"))
@example(value=b'{"schema":"cxr.reference/v1","event_id":"\xed\xa0\x80","uri":"u"}')  # a UTF-8-encoded surrogate
@example(value=b"\xff\xfe\x00\x00")
@example(value=b"")
def test_parse_reference_arbitrary_bytes(value: bytes) -> None:
    """Bytes are strict UTF-8 JSON or INVALID_JSON; when they are UTF-8, they parse as their text does."""
    assert same_outcome(check_parse(value), expected_for_bytes(value))


@fuzz_settings(ci=600, long=15_000)
@given(value=st.text(max_size=2048) | st.none())
@example(value="[" * DEEP)
@example(value='{"a":' * DEEP)
@example(value="{" + '"x":[' * 5000)
@example(value='{"schema":"cxr.reference/v1","event_id":"\\ud800","uri":"u"}')
@example(value="1" * 5000)
def test_parse_reference_arbitrary_text(value: str | None) -> None:
    check_parse(value)


@fuzz_settings(ci=600, long=15_000)
@example(  # JSON reads the escaped pair as one character; the oracle once compared Python values
    document={"schema": REFERENCE_SCHEMA, "event_id": "0", "uri": "\ud83d\ude00"}, how="str", ascii_only=True
)
@given(document=near_contract_documents(), how=st.sampled_from(ENCODINGS), ascii_only=st.booleans())
def test_parse_reference_near_contract_json(document: Any, how: str, ascii_only: bool) -> None:
    event(f"encoding: {how}")
    value = encode(document, how, ascii_only)
    outcome = check_parse(value)
    if isinstance(value, bytes):
        assert same_outcome(outcome, expected_for_bytes(value))
    if how in ("utf-8-bom", "utf-16", "utf-16-le", "utf-16-be", "utf-32"):
        assert isinstance(outcome, ParseError) and outcome.code is ErrorCode.INVALID_JSON
    if isinstance(outcome, Reference):
        # compared with what the wire says, not with the Python values: an encoding may have replaced
        # characters, and two lone surrogates escaped as "\\ud83d\\ude00" are one character in JSON
        said = json.loads(value if isinstance(value, str) else value.decode("utf-8"))
        assert isinstance(said, dict) and said.get("schema") == REFERENCE_SCHEMA
        assert outcome.event_id == said["event_id"] and outcome.uri == said["uri"]


@fuzz_settings(ci=100, long=2_000)
@given(depth=st.integers(1, 300_000), opener=st.sampled_from(["[", '{"a":', '{"event_id":[']), as_bytes=st.booleans())
def test_parse_reference_deep_nesting(depth: int, opener: str, as_bytes: bool) -> None:
    """Nesting deeper than the interpreter's recursion limit is INVALID_JSON, not a RecursionError."""
    text = opener * depth
    value: str | bytes = text.encode() if as_bytes else text
    outcome = check_parse(value)
    assert isinstance(outcome, ParseError)
