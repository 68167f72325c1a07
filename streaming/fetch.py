"""Fetching image bytes for a reference URI, treating every URI as hostile.

`file://` URIs are served only from inside the configured roots, judged after symlinks and `..` are resolved,
and DICOMweb URLs only from configured hosts, without following redirects. Everything read is size-limited,
and a file that cannot be read is reported the same whether it is missing or forbidden only after the
allow-list check, so a reference cannot probe for files outside the roots.
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from streaming.errors import ErrorCode, FetchError

_INSTANCE_PATH = re.compile(r"/studies/[^/]+/series/[^/]+/instances/[^/]+/?$")
_ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass(frozen=True)
class FetchPolicy:
    """What references may point at; built on the driver from the settings and shipped to executors."""

    allowed_roots: tuple[Path, ...] = ()
    dicomweb_hosts: tuple[str, ...] = ()
    max_bytes: int = 128 * 1024 * 1024
    timeout_s: float = 30.0
    dicomweb_token: str | None = field(default=None, repr=False)


def fetch(uri: str, policy: FetchPolicy) -> bytes:
    """The bytes a reference points at, or a `FetchError` saying why not."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "file":
        return read_file(resolve_file_uri(uri, policy), policy.max_bytes, policy.allowed_roots)
    if scheme in ("http", "https"):
        return fetch_dicomweb(uri, policy)
    raise FetchError(ErrorCode.UNSUPPORTED_URI, "only file:// and DICOMweb http(s):// URIs are supported")


def resolve_file_uri(uri: str, policy: FetchPolicy) -> Path:
    """The real path of a `file://` URI, if and only if it lies inside an allowed root."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(ErrorCode.FORBIDDEN_URI, "file URIs must name a local path, not a remote host")
    if parts.query or parts.fragment:
        raise FetchError(ErrorCode.UNSUPPORTED_URI, "file URIs must not carry a query or fragment")
    raw = unquote(parts.path)
    if not raw.startswith("/") or "\x00" in raw:
        raise FetchError(ErrorCode.UNSUPPORTED_URI, "file URIs must carry an absolute path")
    real = Path(raw).resolve(strict=False)
    if not any(real.is_relative_to(root) for root in policy.allowed_roots):
        raise FetchError(ErrorCode.FORBIDDEN_URI, "the file is outside the allowed roots")
    return real


def _opened_path(fd: int) -> Path | None:
    """Where an open descriptor really points (Linux); None where the system cannot say."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def read_file(path: Path, max_bytes: int, allowed_roots: tuple[Path, ...] = ()) -> bytes:
    """Read a resolved path; with `allowed_roots`, check again what was actually opened.

    Between resolving a path and opening it, a component could be swapped for a symlink; opening without
    following a final symlink and checking the descriptor's real path closes that window.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as handle:
            opened = _opened_path(handle.fileno()) if allowed_roots else None
            if opened is not None and not any(opened.is_relative_to(root) for root in allowed_roots):
                raise FetchError(ErrorCode.FORBIDDEN_URI, "the file is outside the allowed roots")
            return _read_limited(handle, max_bytes)
    except FileNotFoundError:
        raise FetchError(ErrorCode.NOT_FOUND, "the file does not exist") from None
    except IsADirectoryError:
        raise FetchError(ErrorCode.NOT_FOUND, "the URI names a directory, not a file") from None
    except PermissionError:
        raise FetchError(ErrorCode.FETCH_FAILED, "the file is not readable by the scoring job") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the final component became a symlink after resolution
            raise FetchError(ErrorCode.FORBIDDEN_URI, "the file is outside the allowed roots") from None
        raise FetchError(
            ErrorCode.FETCH_FAILED, f"the file could not be read ({exc.strerror or 'I/O error'})"
        ) from None


def _read_limited(stream: IO[bytes], max_bytes: int) -> bytes:
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FetchError(ErrorCode.TOO_LARGE, f"the image is larger than the limit of {max_bytes} bytes")
    return data


def host_allowed(netloc: str, scheme: str, allowed: tuple[str, ...]) -> bool:
    """`host` in the allow-list admits any port of that host; `host:port` admits just that port."""
    host_port = netloc.rsplit("@", 1)[-1].lower()
    if host_port.startswith("["):  # an IPv6 literal: its colons are not a port separator
        host, _, rest = host_port.partition("]")
        host, port = host + "]", rest.removeprefix(":")
    else:
        host, _, port = host_port.partition(":")
    port = port or ("443" if scheme == "https" else "80")
    return any(entry in (host, f"{host}:{port}") for entry in allowed)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        raise FetchError(ErrorCode.FORBIDDEN_URI, "the DICOMweb server answered with a redirect, not followed")


_OPENER = urllib.request.build_opener(_NoRedirect())


def fetch_dicomweb(uri: str, policy: FetchPolicy) -> bytes:
    """One instance by WADO-RS, as Part 10 bytes."""
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise FetchError(ErrorCode.FORBIDDEN_URI, "DICOMweb URIs must not carry credentials")
    if not host_allowed(parts.netloc, parts.scheme.lower(), policy.dicomweb_hosts):
        raise FetchError(ErrorCode.FORBIDDEN_URI, "the DICOMweb host is not in the allowed hosts")
    if not _INSTANCE_PATH.search(parts.path):
        raise FetchError(
            ErrorCode.UNSUPPORTED_URI, "the URL is not a DICOMweb instance (…/studies/…/series/…/instances/…)"
        )
    request = urllib.request.Request(uri, headers={"Accept": _ACCEPT_DICOM})
    if policy.dicomweb_token:
        request.add_header("Authorization", f"Bearer {policy.dicomweb_token}")
    try:
        with _OPENER.open(request, timeout=policy.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError(ErrorCode.TOO_LARGE, f"the image is larger than the limit of {policy.max_bytes} bytes")
            body = _read_limited(response, policy.max_bytes)
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FetchError(ErrorCode.NOT_FOUND, "the DICOMweb server does not have this instance") from None
        if exc.code in (401, 403):
            raise FetchError(ErrorCode.FORBIDDEN_URI, f"the DICOMweb server refused access (HTTP {exc.code})") from None
        raise FetchError(ErrorCode.FETCH_FAILED, f"the DICOMweb server answered HTTP {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(
            ErrorCode.FETCH_FAILED, f"the DICOMweb server could not be reached ({type(reason).__name__})"
        ) from None
    except http.client.HTTPException as exc:  # a malformed or truncated answer (e.g. IncompleteRead)
        raise FetchError(
            ErrorCode.FETCH_FAILED, f"the DICOMweb answer was malformed or cut short ({type(exc).__name__})"
        ) from None
    return first_part(body, content_type)


def first_part(body: bytes, content_type: str) -> bytes:
    """The first body part of a multipart/related answer (or the body itself when it is not multipart)."""
    if not content_type.lower().startswith("multipart/"):
        return body
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and payload:
            return payload
    raise FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb answer carried no instance")
