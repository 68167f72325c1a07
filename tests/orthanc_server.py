"""A real Orthanc PACS for the tests: Debian's `orthanc` and `orthanc-dicomweb`, on loopback ports.

`OrthancServer` is the package's `EmbeddedOrthanc` (an unprivileged Orthanc with a configuration of its own,
HTTP basic authentication on, the DICOMweb plugin loaded, remote access off), with a fixed test password. It
can be stopped and started again on the same ports and storage, for outage tests. `chest_xray_dicoms` turns
the sixteen real sample X-rays into DICOM files, so that the same instance can reach the scorer as a file,
through Orthanc and DICOMweb, or through the C-STORE receiver.

Orthanc is part of the test set-up (`make install` installs it where it can); a missing Orthanc fails the tests
that need it, it never skips them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, generate_uid

from streaming.embedded_pacs import EmbeddedOrthanc, missing_orthanc
from xray_files import dicom_bytes, encapsulated, encoder_available, image_dataset

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class OrthancServer(EmbeddedOrthanc):
    """The package's embedded Orthanc with a fixed test password (so failures are easy to reproduce by hand)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, username="cxr", password="orthanc-test-secret")

    def start(self, timeout_s: float = 60.0) -> OrthancServer:
        super().start(timeout_s)
        return self


# ------------------------------------------------------------------------------------------ test images


@dataclass(frozen=True)
class ChestDicom:
    """One sample X-ray as a DICOM file: its bytes, its UIDs and the transfer syntax it was written in."""

    name: str
    data: bytes
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def chest_xray_dicoms(jpegs: Sequence[Path], modality: str = "DX") -> list[ChestDicom]:
    """The sample JPEGs as DX (or CR) "PA" instances, each decoding to exactly the JPEG's pixels.

    They cycle through transfer syntaxes a modality would use: the JPEG itself encapsulated (JPEG baseline),
    explicit VR little endian (native pixels), and JPEG 2000 lossless where pydicom can encode it. Each gets
    a study of its own (with an accession number), so results are keyed per study.
    """
    syntaxes = ["jpeg-baseline", "native"]
    if encoder_available(JPEG2000Lossless):
        syntaxes.append("jpeg2000-lossless")
    files = []
    for index, path in enumerate(jpegs):
        jpeg = path.read_bytes()
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L"), dtype=np.uint8)
        syntax = syntaxes[index % len(syntaxes)]
        ds = image_dataset(pixels)
        if syntax == "jpeg-baseline":
            ds = encapsulated(ds, JPEGBaseline8Bit, [jpeg])
        elif syntax == "jpeg2000-lossless":
            ds.compress(JPEG2000Lossless, pixels)
        ds.SOPClassUID = CR_STORAGE if modality == "CR" else DX_FOR_PRESENTATION
        ds.Modality = modality
        ds.ViewPosition = "PA"
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.AccessionNumber = f"ACC{index:04d}"
        ds.StudyDate = time.strftime("%Y%m%d")
        ds.StudyTime = time.strftime("%H%M%S")
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        files.append(
            ChestDicom(
                name=path.stem,
                data=dicom_bytes(ds),
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            )
        )
    return files


def non_chest_dicom() -> bytes:
    """A small CT slice: a PACS feed must skip it (and count it), never publish it."""
    ds = image_dataset(np.zeros((16, 16), dtype=np.uint8))
    ds.SOPClassUID = CT_STORAGE
    ds.Modality = "CT"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = time.strftime("%Y%m%d")
    return dicom_bytes(ds)


__all__ = ["ChestDicom", "OrthancServer", "chest_xray_dicoms", "missing_orthanc", "non_chest_dicom"]
