"""What every export sink promises: one bounded delivery attempt per call, and what a failed one says.

Where exports go: SRs to a DICOMweb server (STOW-RS, `exporters.stow`), a DICOM SCP (C-STORE, `exporters.cstore`)
or a folder (`exporters.folder`); bundles to a FHIR server (`exporters.fhir_server`); what the two HTTP sinks
share is `exporters.http`. This module holds the contract they keep: the `SrSink` protocol, the check of their
time limit, and the checks every SR sink makes on the SR it is given.

Each call is one delivery attempt that either ends well or raises `ExportError`: `UNAVAILABLE` when trying again
later may help (the exporter waits and retries the same export, for as long as it takes), `REJECTED` when the
destination answered and refused this export (one export dead letter). The caller owns retries and waits; a
sink never retries by itself, so that one attempt stays one bounded unit of time.

Time. An attempt ends within `timeout_s` whatever the server does: one that accepts and never answers, one
that drips its answer a byte at a time, one that never reads what we send (how: `exporters.http` for HTTP,
`exporters.cstore` for C-STORE).

What never leaves a sink. Credentials (see `exporters.http`). Reasons carry a status code, a DICOM failure
reason code, and for FHIR the severity and code of each OperationOutcome issue (never its diagnostics or
details, which may echo patient data); never a response body, a URL or a DICOM header value. `destination`
(for logs, metrics labels and cursors) is printable and free of credentials.
"""

from __future__ import annotations

import math
import re
from io import BytesIO
from typing import Protocol

import pydicom
from pydicom.errors import InvalidDicomError

from exporters.errors import ExportCode, ExportError

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_MAX = 64


class SrSink(Protocol):
    """Where `cxr export sr` stores each report; one `store` is one bounded attempt."""

    #: printable, without credentials: "stow:http://orthanc:8042/dicom-web", "cstore:ORTHANC@host:4242", "folder:/x"
    destination: str

    def store(self, sr: pydicom.Dataset, data: bytes) -> None:
        """Store `sr` (`data`: the same SR as DICOM Part 10 bytes); `ExportError` when it was not stored."""

    def close(self) -> None:
        """Let go of connections and threads."""


def check_timeout(timeout_s: float) -> None:
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError("the export timeout must be a number of seconds above 0")


def sop_instance_uid_of(sr: pydicom.Dataset) -> str:
    """The SR's SOP Instance UID, if it is one (it names files and is matched in answers)."""
    uid = str(sr.get("SOPInstanceUID", "") or "").strip(" \x00")
    if len(uid) > _UID_MAX or not _UID.fullmatch(uid):
        raise ExportError(ExportCode.INVALID_EXPORT, "the SR has no valid SOP Instance UID")
    return uid


def part10_dataset(data: bytes, sop_instance_uid: str) -> pydicom.FileDataset:
    """The SR as read back from its Part 10 bytes (what is sent is what the folder sink would write), checked to
    be the SR the caller named and to carry its storage class."""
    try:
        dataset = pydicom.dcmread(BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError):
        raise ExportError(ExportCode.INVALID_EXPORT, "the SR bytes are not a DICOM Part 10 file") from None
    if str(dataset.get("SOPInstanceUID", "")) != sop_instance_uid or not dataset.get("SOPClassUID"):
        raise ExportError(ExportCode.INVALID_EXPORT, "the SR bytes are not those of the SR (UID or class differ)")
    return dataset


#: "Duplicate SOP instance" (PS3.7 C.4.2): the PACS has this instance already. Every SR's SOP Instance UID is
#: derived from its result, so the instance it has is this report from an earlier delivery: stored.
DUPLICATE_SOP_INSTANCE = 0x0111
