"""Builders for image files in every container the scorer accepts: PNG, JPEG and DICOM Part 10.

Shared by the unit and integration tests (``pythonpath = ["tests"]``, so ``import xray_files``). Everything is
built in code from real decoded pixels, so "the same X-ray in another container" is exact where the encoding
is lossless. DICOM datasets carry fake patient data, so tests can check that no reason or message leaks it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042-SECRET"

#: Lossless compressed transfer syntaxes written by `dicom_variants`, when pydicom has an encoder for them.
LOSSLESS_SYNTAXES: dict[str, UID] = {
    "jpeg2000-lossless": JPEG2000Lossless,
    "jpeg-ls-lossless": JPEGLSLossless,
    "rle-lossless": RLELossless,
}


# --------------------------------------------------------------------------------------------- PNG / JPEG


def pillow_pixels(data: bytes) -> np.ndarray:
    """Pillow's decode of encoded image bytes, as an array (what Keras' `load_img` starts from)."""
    with Image.open(BytesIO(data)) as img:
        return np.asarray(img)


def png_bytes(img: Image.Image) -> bytes:
    buf = BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **options: Any) -> bytes:
    buf = BytesIO()
    img.save(buf, "JPEG", **options)
    return buf.getvalue()


def png_variants(pixels: np.ndarray) -> dict[str, bytes]:
    """8-bit grayscale pixels as PNG files that all decode back to exactly those pixels.

    "png-8bit-L" (grayscale), "png-8bit-RGB" (the gray value in all three channels) and "png-16bit"
    (16-bit grayscale holding v*257, whose top byte is v).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError("png_variants wants 8-bit grayscale pixels")
    gray = Image.fromarray(pixels)
    return {
        "png-8bit-L": png_bytes(gray),
        "png-8bit-RGB": png_bytes(gray.convert("RGB")),
        "png-16bit": png_bytes(Image.fromarray(pixels.astype(np.uint16) * 257)),
    }


# --------------------------------------------------------------------------------------------------- DICOM


def new_dataset(sop_class: str = DX_FOR_PRESENTATION) -> Dataset:
    """A minimal DX dataset carrying (fake) patient data, so reasons can be checked for leaks."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    return ds


def image_dataset(arr: np.ndarray, interpretation: str = "MONOCHROME2", bits_stored: int = 8) -> Dataset:
    """`new_dataset` with native (uncompressed) pixel data; the image pixel module follows from `arr`."""
    ds = new_dataset()
    ds.set_pixel_data(arr, interpretation, bits_stored)
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file (preamble, DICM, file meta filled in from the dataset)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encapsulated(ds: Dataset, tsyntax: str, frames: list[bytes]) -> Dataset:
    """Replace the dataset's pixel data by already-encoded frames under a compressed transfer syntax."""
    ds.file_meta.TransferSyntaxUID = UID(tsyntax)
    ds.PixelData = encapsulate(frames)
    return ds


def rescaled_windowed_12bit(pixels: np.ndarray) -> Dataset:
    """8-bit pixels stored as 12 bits (16v) with a rescale and a LINEAR window that map back onto exactly v.

    Modality values are 0.5 * 16v - 100 = 8v - 100; the modality output range is -100..1947.5 (all 12 stored
    bits rescaled). The window's edges (c - 0.5) -/+ (w - 1) / 2 are exactly -100 and 1940 (v = 0 and 255),
    mapped onto that output range, and the decoder maps that range linearly onto 0..255, which gives
    (8v / 2040) * 255 = v.
    """
    ds = image_dataset(pixels.astype(np.uint16) * 16, bits_stored=12)
    ds.RescaleSlope = "0.5"
    ds.RescaleIntercept = "-100"
    ds.WindowCenter = "920.5"
    ds.WindowWidth = "2041"
    return ds


def encoder_available(tsyntax: UID) -> bool:
    return bool(get_encoder(tsyntax).is_available)


def dicom_variants(pixels: np.ndarray, jpeg: bytes, uids: Mapping[str, str]) -> dict[str, bytes]:
    """The same 8-bit grayscale X-ray as Part 10 files of every flavour the scorer reads, by name.

    Each decodes (through `streaming.decode`) to exactly `pixels`: "mono2-8bit", "mono1-8bit" (stored 255 - v),
    "12bit-rescale-window" (see `rescaled_windowed_12bit`), "jpeg-baseline" (`jpeg`, which must be a baseline
    JPEG whose Pillow decode is `pixels`, encapsulated as is), and "jpeg2000-lossless", "jpeg-ls-lossless",
    "rle-lossless" for those pydicom can encode here. Every file is a DX "PA" image and carries the header
    attributes in `uids` (e.g. StudyInstanceUID, SeriesInstanceUID); each gets its own SOPInstanceUID unless
    `uids` names one.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError("dicom_variants wants 8-bit grayscale pixels")
    datasets: dict[str, Dataset] = {
        "mono2-8bit": image_dataset(pixels),
        "mono1-8bit": image_dataset(255 - pixels, "MONOCHROME1"),
        "12bit-rescale-window": rescaled_windowed_12bit(pixels),
        "jpeg-baseline": encapsulated(image_dataset(pixels), JPEGBaseline8Bit, [jpeg]),
    }
    for name, tsyntax in LOSSLESS_SYNTAXES.items():
        if encoder_available(tsyntax):
            ds = image_dataset(pixels)
            ds.compress(tsyntax, pixels)
            datasets[name] = ds
    files = {}
    for name, ds in datasets.items():
        ds.ViewPosition = "PA"
        for keyword, value in uids.items():
            setattr(ds, keyword, value)
        files[name] = dicom_bytes(ds)
    return files


def jp2_box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def jp2_wrapped(codestream: bytes, width: int, height: int) -> bytes:
    """The codestream in a JP2 file wrapper whose image header declares width x height (one component)."""
    ihdr = jp2_box(b"ihdr", struct.pack(">IIHBBBB", height, width, 1, 7, 7, 0, 0))
    colr = jp2_box(b"colr", b"\x01\x00\x00" + struct.pack(">I", 17))
    return (
        jp2_box(b"jP  ", b"\r\n\x87\n")
        + jp2_box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
        + jp2_box(b"jp2h", ihdr + colr)
        + jp2_box(b"jp2c", codestream)
    )
