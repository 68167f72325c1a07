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
* ``TOO_LARGE``: the declared pixel count exceeds `DecodeLimits.max_pixels` (checked before any pixel is
  decoded, so a decompression bomb costs only its header).

Reasons say what was wrong, never what the file contained: no header values, which may be patient data.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any, Literal, NoReturn

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

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


@dataclass(frozen=True)
class DecodeLimits:
    """Per-call decoding limits; `max_pixels` is width*height of the (first) frame."""

    max_pixels: int = 60_000_000

    def __post_init__(self) -> None:
        if self.max_pixels <= 0:
            raise ValueError("max_pixels must be positive")


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


def _check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    """Refuse an image by its declared size, before its pixels cost any memory."""
    if width * height > limits.max_pixels:
        raise DecodeError(
            ErrorCode.TOO_LARGE,
            f"The image declares {width * height} pixels, more than the limit of {limits.max_pixels}.",
        )


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
    samples = ds.get("SamplesPerPixel", 1)
    interpretation = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not ((samples == 1 and interpretation in _MONOCHROME) or (samples == 3 and interpretation in _COLOUR)):
        shown = interpretation if interpretation in _KNOWN_INTERPRETATIONS else "an unknown value"
        raise DecodeError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"DICOM photometric interpretation {shown} with {samples} samples per pixel is not supported.",
        )

    arr = _first_frame(ds)
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


def _raise_missing_pixel_data(ds: Dataset) -> NoReturn:
    """No Pixel Data: a non-image object (UNSUPPORTED_FORMAT) or a truncated image (CORRUPT_IMAGE).

    pydicom silently stops at end of file, so a file cut before its pixel data parses as a dataset without
    them. If the header declares an image (image pixel elements, an "... Image Storage" SOP class, or not
    even a SOP class survived) we call it corrupt; otherwise it is e.g. a structured report.
    """
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise DecodeError(ErrorCode.UNSUPPORTED_FORMAT, "DICOM float pixel data is not supported.")
    sop_class = ds.get("SOPClassUID")
    declares_image = (
        sop_class is None
        or "Image Storage" in sop_class.name
        or any(k in ds for k in ("Rows", "Columns", "BitsAllocated"))
    )
    if declares_image:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM image has no pixel data (truncated file?).")
    raise DecodeError(ErrorCode.UNSUPPORTED_FORMAT, "The DICOM object has no pixel data (not an image).")


def _positive_int(ds: Dataset, keyword: str) -> int:
    """A required positive integer header value, or CORRUPT_IMAGE naming the element (not its value)."""
    value = ds.get(keyword)
    if not isinstance(value, int) or value <= 0:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, f"The DICOM {keyword} element is missing or invalid.")
    return value


def _first_frame(ds: Dataset) -> np.ndarray:
    """Decode only frame 0, preferring Pillow for 8-bit JPEG so DICOM-JPEG equals plain-JPEG decoding."""
    tsyntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if tsyntax is None:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM file meta has no transfer syntax.")
    name = tsyntax.name if tsyntax.is_transfer_syntax else "an unknown transfer syntax"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise DecodeError(ErrorCode.UNSUPPORTED_FORMAT, f"DICOM {name} is not supported.") from exc
    if not decoder.is_available:
        raise DecodeError(ErrorCode.UNSUPPORTED_FORMAT, f"No decoder is installed for DICOM {name}.")
    if tsyntax in _JPEG_FAMILY_SYNTAXES:
        _check_jpeg_frame_complete(ds)

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


def _check_jpeg_frame_complete(ds: Dataset) -> None:
    """Refuse a JPEG / JPEG-LS frame without its end-of-image marker: it was cut short.

    pylibjpeg-libjpeg decodes some truncated JPEGs without any error, filling the missing rows with
    garbage, so truncation is checked on the bytes, independently of the decoder. FF D9 cannot occur inside
    entropy-coded data (byte stuffing), so finding it in the frame's last bytes means the stream ended
    properly; a little slack allows the even-length padding and stray fill bytes some writers add.
    """
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames") or 1))
    except MemoryError:
        raise
    except Exception as exc:
        raise DecodeError(
            ErrorCode.CORRUPT_IMAGE, f"The DICOM encapsulated pixel data is malformed ({type(exc).__name__})."
        ) from exc
    if _JPEG_EOI not in frame[-16:]:
        raise DecodeError(ErrorCode.CORRUPT_IMAGE, "The DICOM JPEG frame is truncated (no end-of-image marker).")


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
