"""SRs to a DICOMweb server with STOW-RS: `StowSink`, one bounded HTTP attempt (`exporters.http`) per SR through
dicomweb-client, and what the server's answer means (`stow_outcome`).

2xx stores the instance unless the answer's FailedSOPSequence names it; the status and the failure reason given
for the instance decide, over the HTTP rules of `exporters.http` (see `stow_outcome`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pydicom
import requests

from exporters import http
from exporters.errors import ExportCode, ExportError
from exporters.sinks import DUPLICATE_SOP_INSTANCE, check_timeout, part10_dataset, sop_instance_uid_of

_DICOMWEB_CREDENTIALS = "CXR_DICOMWEB_TOKEN, or CXR_DICOMWEB_USERNAME and CXR_DICOMWEB_PASSWORD"
#: DICOM JSON tags of a STOW-RS answer (PS3.18 Table 10.5.3-1).
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


class _Answer(Exception):
    """Carries a STOW-RS answer out of dicomweb-client, past its own handling of answers (which follows
    redirects, trusts Content-Type, reads bodies of any size and raises errors that quote the URL)."""

    def __init__(self, status: int, body: bytes | None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _take_answer(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    """A response hook: runs before requests would follow a redirect or read the body, and hands the answer
    (its body read within `MAX_ANSWER_BYTES`) to `StowSink.store`."""
    with response:
        body = None if response.is_redirect else http.read_answer(response)
    raise _Answer(response.status_code, body)


@dataclass(frozen=True)
class StowFailure:
    """An entry of FailedSOPSequence that names the instance (or names none: we sent only this one)."""

    #: Failure Reason (0008,1197), when the server gave one
    reason: int | None


def stow_failure(answer: Any, sop_instance_uid: str) -> StowFailure | None:
    """The failure a STOW-RS answer (DICOM JSON, already decoded) reports for this instance, or None."""
    if isinstance(answer, list) and answer:  # a server that answers with an array of one dataset
        answer = answer[0]
    if not isinstance(answer, dict):
        return None
    for item in _items(answer, _FAILED_SOP_SEQUENCE):
        named = _first_value(item, _REFERENCED_SOP_INSTANCE_UID)
        if named is None or named == sop_instance_uid:
            reason = _first_value(item, _FAILURE_REASON)
            valid = isinstance(reason, int) and not isinstance(reason, bool) and 0 <= reason <= 0xFFFF
            return StowFailure(reason if valid else None)
    return None


def _element(dataset: dict[str, Any], tag: str) -> Any:
    element = dataset.get(tag, dataset.get(tag.lower()))
    return element.get("Value") if isinstance(element, dict) else None


def _items(dataset: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    values = _element(dataset, tag)
    return [item for item in values if isinstance(item, dict)] if isinstance(values, list) else []


def _first_value(dataset: dict[str, Any], tag: str) -> Any:
    values = _element(dataset, tag)
    return values[0] if isinstance(values, list) and values else None


def stow_outcome(status: int, body: bytes | None, sop_instance_uid: str) -> ExportError | None:
    """None when the server stored the instance; otherwise why not.

    2xx stores it unless FailedSOPSequence names it. A 202 ("some stored, with warnings or failures") whose
    answer cannot be read is `REJECTED`: it cannot tell which, and asking again would get the same answer. A
    failure reason 0xA7xx (out of resources) is `UNAVAILABLE`, as for C-STORE; 0x0111 (a duplicate: this very
    report, delivered before) counts as stored; other reasons are `REJECTED`."""
    answer = http.decoded_json(body) if not 300 <= status < 400 else None
    failure = stow_failure(answer, sop_instance_uid)
    if failure is not None and failure.reason == DUPLICATE_SOP_INSTANCE:
        return None
    plain = http.status_error(status)
    if failure is not None and (plain is None or plain.code is ExportCode.REJECTED):
        return _stow_failure_error(status, failure)
    if status == 202 and not isinstance(answer, dict | list):
        return ExportError(
            ExportCode.REJECTED,
            "HTTP 202 (stored with warnings or failures) with an answer that cannot be read as DICOM JSON",
        )
    return plain


def _stow_failure_error(status: int, failure: StowFailure) -> ExportError:
    if failure.reason is None:
        return ExportError(ExportCode.REJECTED, f"HTTP {status}, the instance failed (no failure reason given)")
    code = f"0x{failure.reason:04X}"
    if failure.reason & 0xFF00 == 0xA700:
        return ExportError(ExportCode.UNAVAILABLE, f"HTTP {status}, the server is out of resources ({code})")
    return ExportError(ExportCode.REJECTED, f"HTTP {status}, the instance failed with failure reason {code}")


class StowSink:
    """Stores SRs with STOW-RS (`POST {root}/studies`) through dicomweb-client, one bounded attempt per SR.

    dicomweb-client builds the multipart request; the session under it bounds the attempt, adds the
    credentials and the Accept header (DICOM JSON answers), and takes the answer before dicomweb-client
    would handle it (see `_Answer`). Its own retries are off: the exporter retries. Note that dicomweb-client
    sends `Host` without the port."""

    def __init__(self, url: str, *, authorization: str | None, timeout_s: float) -> None:
        from dicomweb_client import DICOMwebClient

        self.url = http.checked_url(url, "STOW-RS", _DICOMWEB_CREDENTIALS)
        http.check_authorization(authorization)
        check_timeout(timeout_s)
        self.destination = f"stow:{http.redact_url(self.url)}"
        self.timeout_s = float(timeout_s)
        self._session = http.bounded_session(authorization)
        self._session.headers["Accept"] = "application/dicom+json"
        self._session.hooks["response"] = [_take_answer]
        # It logs URLs and study UIDs at INFO and DEBUG.
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
        try:
            self._client = DICOMwebClient(self.url, session=self._session, timeout=self.timeout_s)
        except ValueError:  # its message quotes the URL
            raise ValueError("the STOW-RS URL is not one dicomweb-client can use") from None
        self._client.set_http_retry_params(retry=False)

    def store(self, sr: pydicom.Dataset, data: bytes) -> None:
        uid = sop_instance_uid_of(sr)
        dataset = part10_dataset(data, uid)
        error: ExportError | None
        with http.bounded_attempt(self.timeout_s) as attempt:
            try:
                self._client.store_instances([dataset])
            except _Answer as answer:
                error = stow_outcome(answer.status, answer.body, uid)
            except http.TRANSPORT_ERRORS as exc:
                error = http.transport_error(exc, attempt)
            else:  # the hook answers every request; dicomweb-client returning means it sent none
                error = ExportError(ExportCode.UNAVAILABLE, "dicomweb-client sent no request")
        if attempt.fired:
            raise http.timed_out(attempt)
        if error is not None:
            raise error

    def close(self) -> None:
        self._session.close()

    def __repr__(self) -> str:
        return f"StowSink({self.destination!r})"
