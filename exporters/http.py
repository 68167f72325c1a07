"""One bounded HTTP attempt, what both HTTP sinks (`exporters.fhir_server`, `exporters.stow`) share: URL checks
and redaction, a session that holds the credentials, the watchdog over each attempt, reading answers, and what
an answer (or the lack of one) means.

Time. `requests`' timeout bounds each socket operation only, so every socket an HTTP attempt opens (or reuses)
gets `streaming.fetch.Watchdog`, armed right after the TCP connect (before any TLS handshake): at the end of the
attempt it shuts the socket down, which wakes whatever read or write is stuck. An attempt it ended is
`UNAVAILABLE` whatever was read by then, for http.client takes a connection shut in the middle of the headers
for their end. Name resolution is left to the system resolver.

HTTP answers. 2xx is done (for STOW-RS, unless the answer's FailedSOPSequence names the instance); 408, 429 and
5xx are `UNAVAILABLE`. So are the answers that say the configuration is wrong rather than the export: 401,
403, 404, 405 and redirects: a wrong password or URL must hold the exports back until it is fixed (the
exporter shows it as retrying, and `/readyz` fails), never turn every report into a dead letter. Any other 4xx
is `REJECTED`. Redirects are never followed, for credentials and patient data go only where they were
configured to go (the project's rule elsewhere too: the fetch refuses redirects, the PACS feeds stop on them).
Answers are read up to `MAX_ANSWER_BYTES`.

Credentials. An `Authorization` value lives only in the HTTP session's headers; it is never in a repr, a reason
or a log line, and a URL with userinfo is refused at construction (use the settings' token or user name and
password instead).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions

from exporters.errors import ExportCode, ExportError
from streaming.fetch import Watchdog

#: The most of an answer that is read (a STOW-RS or FHIR answer about one export is a few kB).
MAX_ANSWER_BYTES = 1024 * 1024

#: A header value `requests` sends as is (otherwise it raises an error that quotes the value).
_HEADER_VALUE = re.compile(r"[\x21-\x7e][\x20-\x7e]*")
#: What a URL may hold before it is parsed: printable ASCII, no spaces (nothing for a server to misread).
_URL_TEXT = re.compile(r"[\x21-\x7e]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*(?=://)")

_OVERLOADED = frozenset({408, 429})
#: Answers about the configuration (credentials, the URL), not about the export: retried until it is fixed.
_CONFIGURATION = frozenset({401, 403, 404, 405})


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


def checked_url(url: str, what: str, credentials: str) -> str:
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


def check_authorization(authorization: str | None) -> None:
    if authorization is not None and not _HEADER_VALUE.fullmatch(authorization):
        raise ValueError("the Authorization value holds characters an HTTP header cannot carry")


# ---------------------------------------------------------------------------- HTTP: one bounded attempt


class Attempt:
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


def _current_attempt() -> Attempt | None:
    attempt: Attempt | None = getattr(_attempts, "current", None)
    return attempt


@contextlib.contextmanager
def bounded_attempt(timeout_s: float) -> Iterator[Attempt]:
    """Bounds every request this thread sends inside the block to `timeout_s` in all."""
    attempt = Attempt(timeout_s)
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
    _armed_for: Attempt | None = None

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


def bounded_session(authorization: str | None) -> requests.Session:
    """A session whose requests a `bounded_attempt` bounds, with the credentials and nothing from the environment
    (no proxies, no `.netrc`, which would replace our Authorization header)."""
    session = requests.Session()
    session.trust_env = False
    for scheme in ("http://", "https://"):
        session.mount(scheme, _BoundedAdapter())
    if authorization is not None:
        session.headers["Authorization"] = authorization
    return session


def read_answer(response: requests.Response) -> bytes | None:
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
TRANSPORT_ERRORS = (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException)


def timed_out(attempt: Attempt) -> ExportError:
    """An attempt the watchdog ended. Whatever was read then is not trusted, even an answer that looks whole:
    http.client takes a connection closed in the middle of the headers as their end."""
    return ExportError(ExportCode.UNAVAILABLE, f"no complete answer within {attempt.timeout_s:g} s")


def transport_error(exc: BaseException, attempt: Attempt) -> ExportError:
    """`UNAVAILABLE` for a request that got no answer; the reason names the kind of failure, never its text
    (requests' messages quote the URL)."""
    if attempt.fired or isinstance(exc, requests.Timeout):
        return timed_out(attempt)
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


def status_error(status: int, detail: str = "") -> ExportError | None:
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


def decoded_json(body: bytes | None) -> Any:
    """The decoded JSON body, or None when there is none or it is not JSON."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
