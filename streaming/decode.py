"""Bytes in, one canonical 8-bit image out: PNG, JPEG and DICOM all become the same kind of PIL image.

The model was trained on 8-bit JPEGs read through Pillow, so every input is brought to that form: a fully
loaded, full-resolution image of mode "L" (grayscale) or "RGB". The same chest X-ray must reach the model as
the same pixels whether it arrived as a JPEG, a PNG or any flavour of DICOM; the unit tests hold us to that.

Every failure is a `DecodeError` with a stable code:

* ``UNSUPPORTED_FORMAT``: the bytes are not PNG, JPEG or DICOM Part 10, or they are a DICOM object we cannot
  turn into a picture (no *Pixel Data* at all, e.g. a structured report; float pixel data; a photometric
  interpretation or transfer syntax with no decoder here).
* ``CORRUPT_IMAGE``: an empty input, or a file of a supported format that is truncated or broken (including
  a DICOM header that declares an image but has no *Pixel Data*: pydicom reads a file cut short that way).
* ``TOO_LARGE``: the declared pixel count exceeds `DecodeLimits.max_pixels`, or decoding would cost more than
  a picture within that limit can: a JPEG with more scans than `DecodeLimits.max_jpeg_scans`, a deflated DICOM
  that inflates past one such frame. All of it is checked on headers and by bounded passes before any pixel is
  decoded, so a decompression bomb costs only its header.

Compressed DICOM frames are checked against their own headers before a decoder sees them: decoders size their
output by the codestream, not by the DICOM header, so a frame that declares more pixels than the limit is
TOO_LARGE and one whose size disagrees with Rows/Columns is CORRUPT_IMAGE (pydicom would refuse it after
decoding anyway), as is an RLE segment that expands far beyond its plane.

Reasons say what was wrong, never what the file contained: no header values, which may be patient data.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Literal, NoReturn

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.filereader import read_dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLETransferSyntaxes,
)

from streaming.errors import DecodeError, ErrorCode

Format = Literal["png", "jpeg", "dicom"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC = b"DICM"
_DICOM_MAGIC_OFFSET = 128

_PIL_FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG"}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
# Colour interpretations pydicom's decoders hand back as RGB (YBR_FULL* converted by pydicom, YBR_ICT/RCT by
# the JPEG 2000 decoder itself).
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
# Defined terms of (0028,0004); only these are echoed in reasons, anything else is reported as "unknown".
_KNOWN_INTERPRETATIONS = (
    _MONOCHROME
    | _COLOUR
    | frozenset({"PALETTE COLOR", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "HSV", "ARGB", "CMYK", "XYB"})
)
# Pillow's libjpeg-turbo decodes JPEG files outside DICOM; decoding JPEG inside DICOM with the same library
# keeps the two paths bit-identical (pylibjpeg-libjpeg differs by +-1 on ~3% of pixels).
_PILLOW_FIRST_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
_JPEG_FAMILY_SYNTAXES = frozenset({*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes})
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = b"\xff\xda"
# Markers whose segment is a frame header (P, Y, X, Nf, ...): SOF0-3, 5-7, 9-11, 13-15, DHP (hierarchical),
# and JPEG-LS SOF55. Everything else before the first scan is skipped by its length.
_JPEG_FRAME_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}) | {
    0xDE,
    0xF7,
}
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "  # the first 8 bytes, as pydicom tests them
_RLE_MAX_SEGMENTS = 15
_INFLATE_CHUNK = 1 << 20
# What a deflated DICOM may inflate to beyond its first frame's pixels (header, overlays, private data).
_INFLATE_HEADER_ALLOWANCE = 16 << 20
_INFLATE_BYTES_PER_PIXEL = 8


@dataclass(frozen=True)
class DecodeLimits:
    """Per-call decoding limits; `max_pixels` is width*height of the (first) frame."""

    max_pixels: int = 60_000_000
    #: Scans (SOS markers) in one JPEG. Each progressive scan is a pass over the whole image however few bytes
    #: it has, so thousands of tiny scans cost minutes of CPU; real encoders write about ten. 256 is the limit
    #: other decoders settled on for the same attack.
    max_jpeg_scans: int = 256

    def __post_init__(self) -> None:
        if self.max_pixels <= 0:
            raise ValueError("max_pixels must be positive")
        if self.max_jpeg_scans <= 0:
            raise ValueError("max_jpeg_scans must be positive")

    @property
    def max_inflated_bytes(self) -> int:
        """How far a deflated DICOM may inflate: one frame within `max_pixels` at 8 bytes a pixel, plus header."""
        return self.max_pixels * _INFLATE_BYTES_PER_PIXEL + _INFLATE_HEADER_ALLOWANCE


def sniff_format(data: bytes) -> Format:
    """Identify the container by its magic bytes, never by a file name (names lie, bytes do not)."""
    if not data:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The image is empty (zero bytes).")
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)] == _DICOM_MAGIC:
        return "dicom"
    raise DecodeError(ErrorCode.UNSUPPORTED_FORMAT, "The bytes are not a PNG, JPEG or DICOM Part 10 file.")


def decode_image(
    data: bytes, limits: DecodeLimits = DecodeLimits(), draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode PNG, JPEG or DICOM bytes to a loaded full-resolution 8-bit image of mode "L" or "RGB".

    `draft_size` (width, height) lets libjpeg decode a JPEG at a reduced DCT scale that is still at least
    that size; it changes pixels, so callers pass it only when the model's resampling makes that harmless
    (see `streaming.preprocess.draft_size_for`). It is ignored for PNG and DICOM.
    """
    fmt = sniff_format(data)
    if fmt == "dicom":
        return _decode_dicom(data, limits)
    return _decode_raster(data, fmt, limits, draft_size)


# --------------------------------------------------------------------------------------------- PNG / JPEG


def _check_pixels(width: int, height: int, limits: DecodeLimits, what: str = "image") -> None:
    """Refuse an image by its declared size, before its pixels cost any memory (the reason names the limit,
    not the declared size, which is header data)."""
    if width * height > limits.max_pixels:
        raise DecodeError(
            ErrorCode.TOO_LARGE, f"The {what} declares more pixels than the limit of {limits.max_pixels}."
        )


def _check_jpeg_scans(stream: bytes, limits: DecodeLimits, what: str) -> None:
    """Refuse a JPEG with more scans than the limit, before libjpeg spends a pass over the image on each.

    FF DA cannot occur inside entropy-coded data (byte stuffing), so counting it counts every scan; bytes that
    happen to match inside APPn payloads only make the count err on the safe side.
    """
    if stream.count(_JPEG_SOS) > limits.max_jpeg_scans:
        raise DecodeError(ErrorCode.TOO_LARGE, f"The {what} has more scans than the limit of {limits.max_jpeg_scans}.")


def _decode_raster(data: bytes, fmt: Format, limits: DecodeLimits, draft_size: tuple[int, int] | None) -> Image.Image:
    """Decode PNG/JPEG with Pillow, restricted to the sniffed format so Pillow cannot guess another one.

    Pillow's own bomb guard (global `Image.MAX_IMAGE_PIXELS`) is left untouched; its error (and its warning,
    should a caller turn warnings into errors) is reported as TOO_LARGE, and our per-call limit is checked
    on the header before `load()`.
    """
    kind = fmt.upper()
    try:
        img = Image.open(BytesIO(data), formats=[_PIL_FORMATS[fmt]])
        _check_pixels(img.width, img.height, limits)
        if fmt == "jpeg":
            _check_jpeg_scans(data, limits, "JPEG")
        if draft_size is not None and fmt == "jpeg":
            img.draft(img.mode, draft_size)
        img.load()
        return _to_canonical_mode(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(ErrorCode.TOO_LARGE, f"The {kind} declares more pixels than Pillow allows.") from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise DecodeError(
            ErrorCode.CORRUPT_IMAGE, f"The {kind} is truncated or corrupt ({type(exc).__name__})."
        ) from exc


def _to_canonical_mode(img: Image.Image) -> Image.Image:
    """Bring any Pillow mode to "L" or "RGB", keeping grayscale grayscale.

    16-bit grayscale keeps its top 8 bits (v >> 8), so a PNG written as v*257 from 8-bit pixels gives v back.
    Alpha is dropped, not composited, exactly as Keras' `load_img` (`convert("RGB")`) does.
    """
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(wide, 0, 0xFFFF) >> 8).astype(np.uint8))
    if mode in ("1", "LA", "La"):
        return img.convert("L")
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode the first frame of a DICOM Part 10 file to display-ready 8-bit pixels."""
    _check_inflated_size(data, limits)
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except MemoryError:
        raise
    except Exception as exc:
        raise DecodeError(
            ErrorCode.CORRUPT_IMAGE, f"The DICOM file could not be parsed ({type(exc).__name__})."
        ) from exc

    if "PixelData" not in ds:
        _raise_missing_pixel_data(ds)

    rows = _positive_int(ds, "Rows")
    columns = _positive_int(ds, "Columns")
    _check_pixels(columns, rows, limits)
    samples = _header(ds, "SamplesPerPixel", 1)
    interpretation = str(_header(ds, "PhotometricInterpretation", "") or "").strip().upper()
    if not ((samples == 1 and interpretation in _MONOCHROME) or (samples == 3 and interpretation in _COLOUR)):
        shown = interpretation if interpretation in _KNOWN_INTERPRETATIONS else "an unknown value"
        raise DecodeError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"DICOM photometric interpretation {shown} with {samples} samples per pixel is not supported.",
        )

    arr = _first_frame(ds, _Geometry(columns, rows, samples), limits)
    expected = (rows, columns) if samples == 1 else (rows, columns, 3)
    if arr.shape != expected:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The decoded DICOM frame does not match its declared size.")
    try:
        if samples == 1:
            u8 = _grayscale_to_uint8(arr, ds)
            if interpretation == "MONOCHROME1":
                u8 = 255 - u8
        else:
            u8 = _colour_to_uint8(arr, int(ds.get("BitsStored", 8)))
    except MemoryError:
        raise
    except Exception as exc:
        raise DecodeError(
            ErrorCode.CORRUPT_IMAGE,
            f"The DICOM grayscale transform (rescale/window/VOI LUT) is invalid ({type(exc).__name__}).",
        ) from exc
    return Image.fromarray(np.ascontiguousarray(u8))


@dataclass(frozen=True)
class _Geometry:
    """Width, height and samples (components) per pixel, as a header declares them."""

    width: int
    height: int
    samples: int


def _check_inflated_size(data: bytes, limits: DecodeLimits) -> None:
    """Refuse a deflated DICOM that inflates past `limits.max_inflated_bytes`.

    pydicom inflates the whole dataset in one call before reading any of it, so half a megabyte of deflated
    zeros would cost it half a gigabyte. This pass only counts, a chunk at a time. Anything it cannot read is
    left to pydicom, which reports it.
    """
    fp = BytesIO(data)
    fp.seek(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    try:
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_after_file_meta)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
    except MemoryError:
        raise
    except Exception:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = memoryview(data)[fp.tell() :]
    inflated = 0
    try:
        while pending:
            inflated += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if inflated > limits.max_inflated_bytes:
                raise DecodeError(
                    ErrorCode.TOO_LARGE,
                    f"The deflated DICOM inflates to more than the limit of {limits.max_inflated_bytes} bytes.",
                )
            pending = memoryview(inflater.unconsumed_tail)
    except zlib.error:
        return


def _after_file_meta(tag: Any, vr: Any, length: int) -> bool:
    """`read_dataset`'s stop condition: the file meta is group 0002."""
    return bool(tag.group != 2)


def _raise_missing_pixel_data(ds: Dataset) -> NoReturn:
    """No Pixel Data: a non-image object (UNSUPPORTED_FORMAT) or a truncated image (CORRUPT_IMAGE).

    pydicom silently stops at end of file, so a file cut before its pixel data parses as a dataset without
    them. If the header declares an image (image pixel elements, an "... Image Storage" SOP class, or not
    even a SOP class survived) we call it corrupt; otherwise it is e.g. a structured report.
    """
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise DecodeError(ErrorCode.UNSUPPORTED_FORMAT, "DICOM float pixel data is not supported.")
    sop_class = _header(ds, "SOPClassUID")
    declares_image = (
        not isinstance(sop_class, UID)
        or "Image Storage" in sop_class.name
        or any(k in ds for k in ("Rows", "Columns", "BitsAllocated"))
    )
    if declares_image:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM image has no pixel data (truncated file?).")
    raise DecodeError(ErrorCode.UNSUPPORTED_FORMAT, "The DICOM object has no pixel data (not an image).")


def _header(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """A header value, or CORRUPT_IMAGE naming the element (not its value).

    pydicom converts element values lazily, on first access, so a malformed element (an unknown VR, bytes its
    VR cannot hold) raises only when it is read, with whatever exception the conversion met.
    """
    try:
        return ds.get(keyword, default)
    except MemoryError:
        raise
    except Exception as exc:
        raise DecodeError(
            ErrorCode.CORRUPT_IMAGE, f"The DICOM {keyword} element cannot be read ({type(exc).__name__})."
        ) from exc


def _positive_int(ds: Dataset, keyword: str) -> int:
    """A required positive integer header value, or CORRUPT_IMAGE naming the element (not its value)."""
    value = _header(ds, keyword)
    if not isinstance(value, int) or value <= 0:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, f"The DICOM {keyword} element is missing or invalid.")
    return value


def _first_frame(ds: Dataset, geometry: _Geometry, limits: DecodeLimits) -> np.ndarray:
    """Decode only frame 0, preferring Pillow for 8-bit JPEG so DICOM-JPEG equals plain-JPEG decoding."""
    tsyntax = _header(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID")
    if not isinstance(tsyntax, str) or not tsyntax:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM file meta has no transfer syntax.")
    tsyntax = UID(tsyntax)
    name = tsyntax.name if tsyntax.is_transfer_syntax else "an unknown transfer syntax"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise DecodeError(ErrorCode.UNSUPPORTED_FORMAT, f"DICOM {name} is not supported.") from exc
    if not decoder.is_available:
        raise DecodeError(ErrorCode.UNSUPPORTED_FORMAT, f"No decoder is installed for DICOM {name}.")
    if tsyntax.is_encapsulated:
        _check_compressed_frame(_encapsulated_frame(ds), tsyntax, geometry, limits)

    plugins = [""]
    if tsyntax in _PILLOW_FIRST_SYNTAXES and "pillow" in decoder.available_plugins:
        plugins.insert(0, "pillow")
    failure: Exception | None = None
    for plugin in plugins:
        try:
            arr: np.ndarray = pixel_array(ds, index=0, decoding_plugin=plugin)
            return arr
        except MemoryError:
            raise
        except Exception as exc:
            failure = exc
    assert failure is not None
    raise DecodeError(
        ErrorCode.CORRUPT_IMAGE, f"The DICOM pixel data could not be decoded ({type(failure).__name__})."
    ) from failure


def _encapsulated_frame(ds: Dataset) -> bytes:
    """The bytes pydicom will decode as frame 0: same frame count and offset tables as its decoders use."""
    try:
        options = as_pixel_options(ds)
        return get_frame(
            ds.PixelData,
            0,
            number_of_frames=options["number_of_frames"],
            extended_offsets=options.get("extended_offsets"),
        )
    except MemoryError:
        raise
    except Exception as exc:
        raise DecodeError(
            ErrorCode.CORRUPT_IMAGE, f"The DICOM encapsulated pixel data is malformed ({type(exc).__name__})."
        ) from exc


def _check_compressed_frame(frame: bytes, tsyntax: UID, geometry: _Geometry, limits: DecodeLimits) -> None:
    """Check a compressed frame against its own headers before any decoder allocates what they declare."""
    if tsyntax in _JPEG_FAMILY_SYNTAXES:
        _check_jpeg_frame(frame, geometry, limits)
    elif tsyntax in JPEG2000TransferSyntaxes:
        _check_declared(_j2k_headers(frame), geometry, limits)
    elif tsyntax in RLETransferSyntaxes:
        _check_rle_frame(frame, geometry)


def _check_declared(declared: list[_Geometry], expected: _Geometry, limits: DecodeLimits) -> None:
    """Every size a codestream declares must be within the limit, and its frame header must match the DICOM
    header: decoders allocate by the codestream, and pydicom refuses a mismatch only after decoding it."""
    for header in declared:
        _check_pixels(header.width, header.height, limits, "compressed DICOM frame")
    if any(header != expected for header in declared):
        raise DecodeError(
            ErrorCode.CORRUPT_IMAGE, "The compressed DICOM frame's size or samples do not match its header."
        )


def _check_jpeg_frame(frame: bytes, geometry: _Geometry, limits: DecodeLimits) -> None:
    """Refuse a JPEG / JPEG-LS frame that was cut short, declares another size, or has too many scans.

    pylibjpeg-libjpeg decodes some truncated JPEGs without any error, filling the missing rows with
    garbage, so truncation is checked on the bytes, independently of the decoder. FF D9 cannot occur inside
    entropy-coded data (byte stuffing), so finding it in the frame's last bytes means the stream ended
    properly; a little slack allows the even-length padding and stray fill bytes some writers add.
    """
    if _JPEG_EOI not in frame[-16:]:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG frame is truncated (no end-of-image marker).")
    _check_declared(_jpeg_headers(frame), geometry, limits)
    _check_jpeg_scans(frame, limits, "DICOM JPEG frame")


def _jpeg_headers(stream: bytes) -> list[_Geometry]:
    """Every frame header (SOFn, DHP, JPEG-LS SOF55) before the first scan, walked as libjpeg walks markers.

    Bytes between segments are skipped up to the next FF, as libjpeg does (with a warning). A height of zero
    (left to a DNL marker) does not match any DICOM header, so such frames are refused. Pillow sizes its
    image by the last of several frame headers and libjpeg by the first, hence all of them.
    """
    if not stream.startswith(b"\xff\xd8"):
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG frame does not start with a JPEG marker.")
    headers: list[_Geometry] = []
    pos, end = 2, len(stream)
    while (pos := stream.find(b"\xff", pos)) >= 0 and pos + 1 < end:
        marker = stream[pos + 1]
        if marker == 0xFF or marker == 0x00 or marker in _JPEG_STANDALONE:
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS: no more frame headers
            break
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if marker in _JPEG_FRAME_MARKERS:
            segment = stream[pos + 4 : pos + 2 + length]
            if length < 8 or len(segment) < 6:
                raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG frame header is truncated.")
            height, width = struct.unpack(">HH", segment[1:5])
            headers.append(_Geometry(width, height, segment[5]))
        pos += 2 + max(length, 2)
    if not headers:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG frame has no frame header.")
    return headers


def _j2k_headers(frame: bytes) -> list[_Geometry]:
    """The sizes a JPEG 2000 frame declares: its codestream's SIZ and, in a JP2 wrapper, the image header.

    DICOM forbids the JP2 wrapper, but pydicom and Pillow accept it and Pillow sizes its image by the JP2
    image header, so both are checked. The boxes are walked the way pydicom walks them, which loops forever
    on a box of length 0; boxes shorter than their own header (0 and 1, the 64-bit form) are refused, so
    every reader of the wrapper finds the same codestream.
    """
    headers: list[_Geometry] = []
    start = 0
    if frame.startswith(_JP2_SIGNATURE):
        start = -1
        offset = len(_JP2_SIGNATURE) + 4
        while offset < len(frame):
            length = int.from_bytes(frame[offset : offset + 4], "big")
            kind = frame[offset + 4 : offset + 8]
            if kind == b"jp2c":
                start = offset + 8
                break
            if length < 8:
                raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG 2000 frame has a malformed JP2 box.")
            if kind == b"jp2h" and frame[offset + 12 : offset + 16] == b"ihdr":
                ihdr = frame[offset + 16 : offset + 26]
                if len(ihdr) < 10:
                    raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG 2000 image header is truncated.")
                height, width, components = struct.unpack(">IIH", ihdr)
                headers.append(_Geometry(width, height, components))
            offset += length
        if start < 0:
            raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG 2000 frame has no codestream box.")
    siz = frame[start : start + 42]
    if len(siz) < 42 or not siz.startswith(_J2K_SOC_SIZ):
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG 2000 frame has no codestream header.")
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", siz[8:24])
    (components,) = struct.unpack(">H", siz[40:42])
    if x0 >= xsiz or y0 >= ysiz:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG 2000 codestream declares an empty image.")
    headers.append(_Geometry(xsiz - x0, ysiz - y0, components))
    return headers


def _check_rle_frame(frame: bytes, geometry: _Geometry) -> None:
    """Refuse an RLE frame whose segments expand beyond twice their plane.

    pydicom's RLE decoder expands each segment completely before trimming it to Rows x Columns, and a
    replicate run turns 2 bytes into 128, so a small header over megabytes of runs costs gigabytes. This
    pass counts each segment's output without producing it and stops at the bound, so it costs no more than
    decoding a legitimate segment. Twice the plane leaves room for padding from sloppy encoders. A malformed
    RLE header is left to pydicom, which refuses it.
    """
    if len(frame) < 64:
        return
    count, *offsets = struct.unpack("<16L", frame[:64])
    if not 0 < count <= _RLE_MAX_SEGMENTS:
        return
    bounds = [*offsets[:count], len(frame)]
    allowed = 2 * geometry.width * geometry.height
    for begin, end in itertools.pairwise(bounds):
        if _rle_expanded_size(frame[begin:end], allowed) > allowed:
            raise DecodeError(ErrorCode.CORRUPT_IMAGE, "A DICOM RLE segment expands far beyond its image plane.")


def _rle_expanded_size(segment: bytes, stop_above: int) -> int:
    """Bytes a PackBits segment expands to (as pydicom decodes it), counted up to just past `stop_above`."""
    size = pos = 0
    end = len(segment)
    while pos < end and size <= stop_above:
        header = segment[pos]
        if header > 128:  # replicate the next byte 257 - header times
            size += 257 - header
            pos += 2
        elif header < 128:  # copy the next header + 1 bytes
            size += header + 1
            pos += header + 2
        else:
            pos += 1
    return size


def _grayscale_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, then a linear map of that stage's output range onto 0..255.

    The range is fixed by the header, never by the image's own min/max, so the same acquisition always gives
    the same pixels. With neither VOI LUT nor window it is the full stored bit depth after rescale (8-bit
    unsigned without rescale is therefore the identity). pydicom's `apply_windowing` maps the window onto
    that same range, so a window's edges land exactly on 0 and 255.
    """
    _drop_empty_rescale(ds)
    lo, hi = _modality_output_range(ds)
    values: Any = apply_modality_lut(arr, ds)
    if _has_voi_lut(ds):
        if np.issubdtype(values.dtype, np.floating):
            values = np.rint(values).astype(np.int64)  # LUT inputs are integers
        values, lo, hi = _apply_voi_lut(values, ds)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        values = apply_windowing(values, ds, index=0)
    return _linear_to_uint8(np.asarray(values, dtype=np.float64), lo, hi)


def _drop_empty_rescale(ds: Dataset) -> None:
    """Treat empty Rescale Slope/Intercept as absent, and let a Modality LUT win over them, as the standard
    says (pydicom would otherwise multiply by None, or disagree with itself about the output range)."""
    empty = any(k in ds and ds[k].value in (None, "") for k in ("RescaleSlope", "RescaleIntercept"))
    if empty or ds.get("ModalityLUTSequence"):
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if keyword in ds:
                del ds[keyword]


def _modality_output_range(ds: Dataset) -> tuple[float, float]:
    """The range pydicom 3's `apply_windowing` maps a window onto: the stored range after the modality step.

    Mirrors pydicom 3.0 exactly (Modality LUT bit depth, else Bits Stored and Pixel Representation, then
    Rescale Slope/Intercept); a negative slope gives lo > hi, which the linear map handles.
    """
    lo: float
    hi: float
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    else:
        bits = int(ds.BitsStored)
        if ds.get("PixelRepresentation", 0) == 0:
            lo, hi = 0, 2**bits - 1
        else:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return float(lo), float(hi)


def _has_voi_lut(ds: Dataset) -> bool:
    """Same test as pydicom's `apply_voi_lut`, which prefers a VOI LUT Sequence over a window."""
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _apply_voi_lut(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float]:
    """The first VOI LUT applied, and its output range 0..2**b-1.

    b is the bits the LUT's data actually needs, at most its descriptor's value: for conforming files that
    is the descriptor's bit depth, and it also corrects the common vendor error of a 16-bit descriptor over
    12-bit data (as DCMTK does), which would otherwise render almost black.

    pydicom 3.0.2's `apply_voi` indexes an 8-bit LUT through a uint8 array, so inputs above 255 wrap
    around; the entries are 16-bit words in the file either way, so we ask it for 16-bit entries and keep
    the declared depth for the range.
    """
    item = ds.VOILUTSequence[0]
    entries, first, declared = (int(v) for v in item.LUTDescriptor)
    if declared == 8:
        item.LUTDescriptor = [entries, first, 16]
    out = apply_voi(values, ds, index=0)
    table = apply_voi(np.arange(first, first + (entries or 2**16), dtype=np.int64), ds, index=0)
    bits = min(declared, max(int(np.max(table)).bit_length(), 8))
    return out, 0.0, float(2**bits - 1)


def _linear_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255, rounding half up and clipping."""
    if hi == lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - lo) / (hi - lo) * 255.0
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _colour_to_uint8(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """RGB samples (pydicom already converted YBR) to 8 bits by their stored bit depth."""
    if bits_stored <= 8:
        return np.clip(arr, 0, 255).astype(np.uint8)
    return _linear_to_uint8(arr.astype(np.float64), 0.0, float(2**bits_stored - 1))
