"""Where exports go: SRs to a DICOMweb server (STOW-RS), a DICOM SCP (C-STORE) or a folder; bundles to a FHIR server.

Each call is one delivery attempt that either ends well or raises `ExportError`: `UNAVAILABLE` when trying again
later may help (the exporter waits and retries the same export, for as long as it takes), `REJECTED` when the
destination answered and refused this export (one export dead letter). The caller owns retries and waits; a
sink never retries by itself, so that one attempt stays one bounded unit of time.

Time. An attempt ends within `timeout_s` whatever the server does: one that accepts and never answers, one
that drips its answer a byte at a time, one that never reads what we send. `requests`' timeout bounds each
socket operation only, so every socket an HTTP attempt opens (or reuses) gets `streaming.fetch.Watchdog`,
armed right after the TCP connect (before any TLS handshake): at the end of the attempt it shuts the socket
down, which wakes whatever read or write is stuck. An attempt it ended is `UNAVAILABLE` whatever was read by
then, for http.client takes a connection shut in the middle of the headers for their end. Name resolution is
left to the system resolver. A C-STORE runs on a thread of its own that the caller stops waiting for at the
end of the attempt; the association is then aborted (the instance is sent again on the next try: every SR
has a deterministic SOP Instance UID, so a PACS keeps it once).

HTTP answers. 2xx is done (for STOW-RS, unless the answer's FailedSOPSequence names the instance); 408, 429 and
5xx are `UNAVAILABLE`. So are the answers that say the configuration is wrong rather than the export: 401,
403, 404, 405 and redirects: a wrong password or URL must hold the exports back until it is fixed (the
exporter shows it as retrying, and `/readyz` fails), never turn every report into a dead letter. Any other 4xx
is `REJECTED`. Redirects are never followed, for credentials and patient data go only where they were
configured to go (the project's rule elsewhere too: the fetch refuses redirects, the PACS feeds stop on them).
Answers are read up to `MAX_ANSWER_BYTES`.

What never leaves a sink. Credentials: an `Authorization` value lives only in the HTTP session's headers; it
is never in a repr, a reason or a log line, and a URL with userinfo is refused at construction (use the
settings' token or user name and password instead). Reasons carry a status code, a DICOM failure reason code,
and for FHIR the severity and code of each OperationOutcome issue (never its diagnostics or details, which may
echo patient data); never a response body, a URL or a DICOM header value. `destination` (for logs, metrics
labels and cursors) is printable and free of credentials.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from exporters.errors import ExportCode, ExportError
from producers.state import write_atomic
from streaming.fetch import Watchdog

#: The most of an answer that is read (a STOW-RS or FHIR answer about one export is a few kB).
MAX_ANSWER_BYTES = 1024 * 1024

_DICOMWEB_CREDENTIALS = "CXR_DICOMWEB_TOKEN, or CXR_DICOMWEB_USERNAME and CXR_DICOMWEB_PASSWORD"
_FHIR_CREDENTIALS = "CXR_FHIR_TOKEN, or CXR_FHIR_USERNAME and CXR_FHIR_PASSWORD"
#: A header value `requests` sends as is (otherwise it raises an error that quotes the value).
_HEADER_VALUE = re.compile(r"[\x21-\x7e][\x20-\x7e]*")
#: What a URL may hold before it is parsed: printable ASCII, no spaces (nothing for a server to misread).
_URL_TEXT = re.compile(r"[\x21-\x7e]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*(?=://)")
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_MAX = 64
#: An AE title (PS3.5 6.2): up to 16 characters of the default repertoire, no backslash, no control characters.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")

_OVERLOADED = frozenset({408, 429})
#: Answers about the configuration (credentials, the URL), not about the export: retried until it is fixed.
_CONFIGURATION = frozenset({401, 403, 404, 405})
#: OperationOutcome.issue.severity and .code (FHIR R4 value sets): only these words ever reach a reason.
_ISSUE_SEVERITIES = frozenset({"fatal", "error", "warning", "information"})
_ISSUE_CODES = frozenset(
    {
        "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
        "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches", "not-found",
        "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict",
        "transient", "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled", "informational",
    }
)  # fmt: skip
_MAX_ISSUES = 5
#: DICOM JSON tags of a STOW-RS answer (PS3.18 Table 10.5.3-1).
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
#: DIMSE warning statuses (PS3.7 C.4, C.5): the instance was stored, perhaps with coercions.
_DIMSE_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})


class SrSink(Protocol):
    """Where `cxr export sr` stores each report; one `store` is one bounded attempt."""

    #: printable, without credentials: "stow:http://orthanc:8042/dicom-web", "cstore:ORTHANC@host:4242", "folder:/x"
    destination: str

    def store(self, sr: pydicom.Dataset, data: bytes) -> None:
        """Store `sr` (`data`: the same SR as DICOM Part 10 bytes); `ExportError` when it was not stored."""

    def close(self) -> None:
        """Let go of connections and threads."""


# ------------------------------------------------------------------------------------------------- URLs


def redact_url(url: str) -> str:
    """The URL without userinfo, query or fragment: what logs, metrics labels and cursors may hold.

    A password with an unescaped `/`, `?` or `#` ends the authority early and would show as a host or a port;
    an authority whose port is not a number is therefore shown as "(redacted)" rather than guessed at."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        scheme = _SCHEME.match(url)
        return f"{scheme[0]}://(redacted)" if scheme else "(a URL that cannot be parsed)"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _http_url(url: str, what: str, credentials: str) -> str:
    """`url` without trailing slashes, if it is an http(s) URL naming a host; `ValueError` for the CLI otherwise.

    Messages never quote the URL: whatever it holds, it may hold a password."""
    if not _URL_TEXT.fullmatch(url):
        raise ValueError(f"the {what} URL must be printable ASCII without spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"the {what} URL cannot be parsed (is its port a number up to 65535?)") from None
    if "@" in parts.netloc:
        raise ValueError(
            f"credentials in the {what} URL are refused (they would end up in logs and process lists): "
            f"set {credentials}"
        )
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or port == 0:
        raise ValueError(f"the {what} URL must start with http:// or https:// and name a host (and a port above 0)")
    if parts.query or parts.fragment:
        raise ValueError(f"the {what} URL must not carry a query or a fragment")
    return url.rstrip("/")


def _check_authorization(authorization: str | None) -> None:
    if authorization is not None and not _HEADER_VALUE.fullmatch(authorization):
        raise ValueError("the Authorization value holds characters an HTTP header cannot carry")


def _check_timeout(timeout_s: float) -> None:
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError("the export timeout must be a number of seconds above 0")


# ---------------------------------------------------------------------------- HTTP: one bounded attempt


class _Attempt:
    """The time limit of one HTTP attempt on this thread: a watchdog on every socket the attempt uses."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s
        self._watchdogs: list[Watchdog] = []

    def arm(self, sock: socket.socket) -> None:
        self._watchdogs.append(Watchdog(sock, self.end))

    @property
    def fired(self) -> bool:
        return any(watchdog.fired.is_set() for watchdog in self._watchdogs)

    def close(self) -> None:
        for watchdog in self._watchdogs:
            watchdog.close()


_attempts = threading.local()


def _current_attempt() -> _Attempt | None:
    attempt: _Attempt | None = getattr(_attempts, "current", None)
    return attempt


@contextlib.contextmanager
def _attempt(timeout_s: float) -> Iterator[_Attempt]:
    """Bounds every request this thread sends inside the block to `timeout_s` in all."""
    attempt = _Attempt(timeout_s)
    _attempts.current = attempt
    try:
        yield attempt
    finally:
        _attempts.current = None
        attempt.close()


class _Bounded:
    """Arms the current attempt's watchdog on a new socket as soon as it is connected (so a TLS handshake and
    the request body are bounded too), and on a kept-alive socket before a request goes out on it."""

    sock: Any
    _armed_for: _Attempt | None = None

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        attempt = _current_attempt()
        if attempt is not None:
            attempt.arm(sock)
            self._armed_for = attempt
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        attempt = _current_attempt()
        if attempt is not None and self.sock is not None and self._armed_for is not attempt:
            attempt.arm(self.sock)
            self._armed_for = attempt
        super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Bounded, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Bounded, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _BoundedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def _session(authorization: str | None) -> requests.Session:
    """A session whose requests an `_attempt` bounds, with the credentials and nothing from the environment
    (no proxies, no `.netrc`, which would replace our Authorization header)."""
    session = requests.Session()
    session.trust_env = False
    for scheme in ("http://", "https://"):
        session.mount(scheme, _BoundedAdapter())
    if authorization is not None:
        session.headers["Authorization"] = authorization
    return session


def _read_answer(response: requests.Response) -> bytes | None:
    """The answer's body, or None when it is larger than `MAX_ANSWER_BYTES` (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


#: What a failed HTTP exchange can raise (requests' exceptions are OSErrors; the rest in case one slips out).
_TRANSPORT_ERRORS = (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException)


def _timed_out(attempt: _Attempt) -> ExportError:
    """An attempt the watchdog ended. Whatever was read then is not trusted, even an answer that looks whole:
    http.client takes a connection closed in the middle of the headers as their end."""
    return ExportError(ExportCode.UNAVAILABLE, f"no complete answer within {attempt.timeout_s:g} s")


def _transport_error(exc: BaseException, attempt: _Attempt) -> ExportError:
    """`UNAVAILABLE` for a request that got no answer; the reason names the kind of failure, never its text
    (requests' messages quote the URL)."""
    if attempt.fired or isinstance(exc, requests.Timeout):
        return _timed_out(attempt)
    return ExportError(ExportCode.UNAVAILABLE, f"the server could not be reached ({_failure_name(exc)})")


def _failure_name(exc: BaseException) -> str:
    """The errno name (ECONNREFUSED, ...) behind an exception, else its class name.

    requests wraps urllib3's error (its first argument), which wraps the socket's error (its cause)."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending and len(seen) < 20:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None and current.errno in errno.errorcode:
            return errno.errorcode[current.errno]
        linked = (current.__cause__, current.__context__, *current.args)
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return type(exc).__name__


def _status_error(status: int, detail: str = "") -> ExportError | None:
    """None for 2xx; otherwise how an answer with this status is treated (see the module's docstring)."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return ExportError(
            ExportCode.UNAVAILABLE,
            f"the server redirects (HTTP {status}); redirects are not followed: configure the URL it redirects to",
        )
    if status in _CONFIGURATION:
        return ExportError(ExportCode.UNAVAILABLE, f"HTTP {status}: check the configured URL and credentials")
    if status in _OVERLOADED or status >= 500:
        return ExportError(ExportCode.UNAVAILABLE, f"HTTP {status}{detail}")
    if 400 <= status < 500:
        return ExportError(ExportCode.REJECTED, f"HTTP {status}{detail}")
    return ExportError(ExportCode.UNAVAILABLE, f"an unexpected HTTP status ({status})")


def _json(body: bytes | None) -> Any:
    """The decoded JSON body, or None when there is none or it is not JSON."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


# ------------------------------------------------------------------------------------------------ FHIR


def operation_outcome_issues(body: bytes | None) -> list[str]:
    """`severity/code` of each issue of an OperationOutcome answer (at most `_MAX_ISSUES`, each once), only
    words of FHIR's value sets: never the diagnostics or details, which may echo patient data."""
    outcome = _json(body)
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    issues = outcome.get("issue")
    found: list[str] = []
    for issue in issues if isinstance(issues, list) else []:
        if not isinstance(issue, dict):
            continue
        severity, code = issue.get("severity"), issue.get("code")
        if severity in _ISSUE_SEVERITIES and code in _ISSUE_CODES and f"{severity}/{code}" not in found:
            found.append(f"{severity}/{code}")
        if len(found) == _MAX_ISSUES:
            break
    return found


def fhir_outcome(status: int, body: bytes | None) -> ExportError | None:
    """None when a FHIR server took the transaction (2xx); otherwise the error, with the issues it named."""
    issues = operation_outcome_issues(body) if not 300 <= status < 400 else []
    return _status_error(status, f" (OperationOutcome: {', '.join(issues)})" if issues else "")


class FhirServerSink:
    """POSTs FHIR transaction Bundles to a FHIR server's base URL, one bounded attempt per call."""

    def __init__(self, url: str, *, authorization: str | None, timeout_s: float) -> None:
        self.url = _http_url(url, "FHIR server", _FHIR_CREDENTIALS)
        _check_authorization(authorization)
        _check_timeout(timeout_s)
        self.destination = f"fhir:{redact_url(self.url)}"
        self.timeout_s = float(timeout_s)
        self._session = _session(authorization)

    def post(self, bundle: bytes) -> None:
        """POST one transaction Bundle (`application/fhir+json`); returns when the server took all of it."""
        with _attempt(self.timeout_s) as attempt:
            try:
                response = self._session.post(
                    self.url,
                    data=bundle,
                    headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
                    timeout=self.timeout_s,
                    allow_redirects=False,
                    stream=True,
                )
                with response:
                    body = _read_answer(response) if not response.is_redirect else None
                error = fhir_outcome(response.status_code, body)
            except _TRANSPORT_ERRORS as exc:
                error = _transport_error(exc, attempt)
        if attempt.fired:
            raise _timed_out(attempt)
        if error is not None:
            raise error

    def close(self) -> None:
        self._session.close()

    def __repr__(self) -> str:
        return f"FhirServerSink({self.destination!r})"


# -------------------------------------------------------------------------------------------- STOW-RS


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
        body = None if response.is_redirect else _read_answer(response)
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
    failure reason 0xA7xx (out of resources) is `UNAVAILABLE`, as for C-STORE; other reasons are `REJECTED`."""
    answer = _json(body) if not 300 <= status < 400 else None
    failure = stow_failure(answer, sop_instance_uid)
    plain = _status_error(status)
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


def _sop_instance_uid(sr: pydicom.Dataset) -> str:
    """The SR's SOP Instance UID, if it is one (it names files and is matched in answers)."""
    uid = str(sr.get("SOPInstanceUID", "") or "").strip(" \x00")
    if len(uid) > _UID_MAX or not _UID.fullmatch(uid):
        raise ExportError(ExportCode.INVALID_EXPORT, "the SR has no valid SOP Instance UID")
    return uid


def _part10(data: bytes, sop_instance_uid: str) -> pydicom.FileDataset:
    """The SR as read back from its Part 10 bytes (what is sent is what the folder sink would write), checked to
    be the SR the caller named and to carry its storage class."""
    try:
        dataset = pydicom.dcmread(BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError):
        raise ExportError(ExportCode.INVALID_EXPORT, "the SR bytes are not a DICOM Part 10 file") from None
    if str(dataset.get("SOPInstanceUID", "")) != sop_instance_uid or not dataset.get("SOPClassUID"):
        raise ExportError(ExportCode.INVALID_EXPORT, "the SR bytes are not those of the SR (UID or class differ)")
    return dataset


class StowSink:
    """Stores SRs with STOW-RS (`POST {root}/studies`) through dicomweb-client, one bounded attempt per SR.

    dicomweb-client builds the multipart request; the session under it bounds the attempt, adds the
    credentials and the Accept header (DICOM JSON answers), and takes the answer before dicomweb-client
    would handle it (see `_Answer`). Its own retries are off: the exporter retries. Note that dicomweb-client
    sends `Host` without the port."""

    def __init__(self, url: str, *, authorization: str | None, timeout_s: float) -> None:
        from dicomweb_client import DICOMwebClient

        self.url = _http_url(url, "STOW-RS", _DICOMWEB_CREDENTIALS)
        _check_authorization(authorization)
        _check_timeout(timeout_s)
        self.destination = f"stow:{redact_url(self.url)}"
        self.timeout_s = float(timeout_s)
        self._session = _session(authorization)
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
        uid = _sop_instance_uid(sr)
        dataset = _part10(data, uid)
        error: ExportError | None
        with _attempt(self.timeout_s) as attempt:
            try:
                self._client.store_instances([dataset])
            except _Answer as answer:
                error = stow_outcome(answer.status, answer.body, uid)
            except _TRANSPORT_ERRORS as exc:
                error = _transport_error(exc, attempt)
            else:  # the hook answers every request; dicomweb-client returning means it sent none
                error = ExportError(ExportCode.UNAVAILABLE, "dicomweb-client sent no request")
        if attempt.fired:
            raise _timed_out(attempt)
        if error is not None:
            raise error

    def close(self) -> None:
        self._session.close()

    def __repr__(self) -> str:
        return f"StowSink({self.destination!r})"


# -------------------------------------------------------------------------------------------- C-STORE


def _check_ae_title(title: str, what: str) -> str:
    """The title without its insignificant spaces; `ValueError` for one DICOM does not allow."""
    if not _AE_TITLE.fullmatch(title) or not title.strip():
        raise ValueError(f"{what} must be 1 to 16 printable ASCII characters, not all spaces, without a backslash")
    return title.strip()


def parse_cstore_target(target: str) -> tuple[str, str, int]:
    """`AET@host:port` → (AE title, host, port); an IPv6 host is written in brackets (`AET@[::1]:104`)."""
    aet, at, address = target.rpartition("@")
    host, colon, port_text = address.rpartition(":")
    if not at or not colon:
        raise ValueError("the C-STORE target must be AET@host:port")
    title = _check_ae_title(aet, "the C-STORE target's AE title")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError("the C-STORE target's port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("the C-STORE target's host in brackets must be an IPv6 address") from None
        host = host[1:-1]
    elif len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ValueError("the C-STORE target's host must be a DNS name, an IPv4 address or [an IPv6 address]")
    return title, host, int(port_text)


def cstore_status_error(status: int) -> ExportError | None:
    """None when a C-STORE status means stored (success or a warning); otherwise how it is treated."""
    if status == 0x0000 or status in _DIMSE_WARNINGS or status & 0xF000 == 0xB000:
        return None
    if status & 0xFF00 == 0xA700:
        return ExportError(ExportCode.UNAVAILABLE, f"the SCP is out of resources (C-STORE status 0x{status:04X})")
    return ExportError(ExportCode.REJECTED, f"the SCP refused the SR (C-STORE status 0x{status:04X})")


class _CStore:
    """One association and one C-STORE, on a thread of its own so that the caller can stop waiting for it."""

    def __init__(self, sink: CStoreSink, dataset: pydicom.Dataset) -> None:
        self.sink = sink
        self.dataset = dataset
        self.done = threading.Event()
        self.error: ExportError | None = None
        self._lock = threading.Lock()
        self._assoc: Any = None
        self._abandoned = False

    def run(self) -> None:
        from pynetdicom import evt

        assoc: Any = None
        try:
            assoc = self._application_entity().associate(
                self.sink.host,
                self.sink.port,
                ae_title=self.sink.called_ae_title,
                evt_handlers=[(evt.EVT_CONN_OPEN, self._connected)],
            )
            self._finish(self._store(assoc))
        except Exception as exc:  # anything pynetdicom raises must still end the wait
            self._finish(ExportError(ExportCode.UNAVAILABLE, f"the C-STORE failed ({type(exc).__name__})"))
        finally:
            if assoc is not None and assoc.is_established:
                with contextlib.suppress(Exception):
                    if self._abandoned:
                        assoc.abort()
                    else:
                        assoc.release()

    def _application_entity(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.sink.calling_ae_title)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.sink.timeout_s
        syntax = str(self.dataset.file_meta.TransferSyntaxUID)
        syntaxes = list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        ae.add_requested_context(str(self.dataset.SOPClassUID), syntaxes)
        return ae

    def _connected(self, event: Any) -> None:
        with self._lock:
            self._assoc = event.assoc

    def _store(self, assoc: Any) -> ExportError | None:
        if not assoc.is_established:
            if assoc.is_rejected:
                answer = assoc.acceptor.primitive
                return ExportError(
                    ExportCode.UNAVAILABLE,
                    f"the SCP rejected the association (result {answer.result}, source {answer.result_source}, "
                    f"reason {answer.diagnostic})",
                )
            if assoc.is_aborted:
                return ExportError(ExportCode.UNAVAILABLE, "the SCP aborted the association")
            return ExportError(
                ExportCode.UNAVAILABLE,
                f"no association: the SCP could not be reached or did not answer within {self.sink.timeout_s:g} s",
            )
        if self._abandoned:
            return ExportError(ExportCode.UNAVAILABLE, f"the C-STORE did not end within {self.sink.timeout_s:g} s")
        sop_class = str(self.dataset.SOPClassUID)
        if not any(context.abstract_syntax == sop_class for context in assoc.accepted_contexts):
            return ExportError(ExportCode.REJECTED, f"the SCP does not accept the SR's storage class ({sop_class})")
        try:
            answer = assoc.send_c_store(self.dataset)
        except ValueError:  # no accepted transfer syntax the SR can be sent in
            return ExportError(ExportCode.REJECTED, "the SR cannot be sent in a transfer syntax the SCP accepted")
        except RuntimeError:  # the association ended under us
            return ExportError(ExportCode.UNAVAILABLE, "the association ended before the C-STORE was answered")
        if "Status" not in answer:
            return ExportError(
                ExportCode.UNAVAILABLE, f"no C-STORE answer within {self.sink.timeout_s:g} s (or the association ended)"
            )
        return cstore_status_error(int(answer.Status))

    def _finish(self, error: ExportError | None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    def abandon(self) -> None:
        """The caller stopped waiting: abort the association, if there is one yet (on a thread of its own,
        for an abort waits for pynetdicom's threads), or as soon as `associate` returns."""
        with self._lock:
            self._abandoned = True
            assoc = self._assoc
        if assoc is not None:
            threading.Thread(target=_quietly_abort, args=(assoc,), name="cxr-cstore-abort", daemon=True).start()


def _quietly_abort(assoc: Any) -> None:
    with contextlib.suppress(Exception):
        assoc.abort()


class CStoreSink:
    """Stores SRs with a DICOM C-STORE to `AET@host:port`: one association per SR, within `timeout_s` in all.

    The association is rejected, aborted or not answered: `UNAVAILABLE` (a PACS that is away or not yet set up
    for us). Status 0xA7xx (out of resources): `UNAVAILABLE`. Warnings (0xBxxx and the general ones) count as
    stored. Other failures, and an SCP that takes no SR of this storage class: `REJECTED`."""

    def __init__(self, target: str, *, calling_ae_title: str, timeout_s: float) -> None:
        self.called_ae_title, self.host, self.port = parse_cstore_target(target)
        self.calling_ae_title = _check_ae_title(calling_ae_title, "the calling AE title")
        _check_timeout(timeout_s)
        self.timeout_s = float(timeout_s)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.destination = f"cstore:{self.called_ae_title}@{shown}:{self.port}"
        # pynetdicom logs DIMSE messages (with SOP instance UIDs) at INFO and DEBUG: keep its warnings only.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    def store(self, sr: pydicom.Dataset, data: bytes) -> None:
        job = _CStore(self, _part10(data, _sop_instance_uid(sr)))
        threading.Thread(target=job.run, name="cxr-cstore", daemon=True).start()
        if not job.done.wait(self.timeout_s):
            job.abandon()
            raise ExportError(ExportCode.UNAVAILABLE, f"the C-STORE did not end within {self.timeout_s:g} s")
        if job.error is not None:
            raise job.error

    def close(self) -> None:
        """Nothing is held between stores (each has its own association)."""

    def __repr__(self) -> str:
        return f"CStoreSink({self.destination!r})"


# --------------------------------------------------------------------------------------------- folder


class FolderSink:
    """Writes each SR to `<folder>/<SOPInstanceUID>.dcm`, atomically: a reader sees the whole file or none, and a
    replay overwrites the same file.

    Any OS error is `UNAVAILABLE`, retried until it passes: a full disk or an I/O error may pass, and a folder we
    may not write (EACCES, EROFS, a file in the way) is a configuration problem that the operator fixes while
    the exporter waits; dead-lettering every report meanwhile would help no one."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(os.path.abspath(folder))
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError("the SR output folder exists and is not a folder")
        self.destination = f"folder:{self.folder}"

    def store(self, sr: pydicom.Dataset, data: bytes) -> None:
        uid = _sop_instance_uid(sr)
        try:
            write_atomic(self.folder / f"{uid}.dcm", data)
        except OSError as exc:  # its text names the file, which is named by a UID: not kept
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            why = os.strerror(exc.errno) if exc.errno else "an OS error"
            raise ExportError(
                ExportCode.UNAVAILABLE, f"the SR could not be written to the folder ({name}: {why})"
            ) from None

    def close(self) -> None:
        """Nothing is held between stores."""

    def __repr__(self) -> str:
        return f"FolderSink({self.destination!r})"
