"""Fetching image bytes for a reference URI: every URI is hostile, and every fetch ends in bounded time.

Time. `deadline` is an absolute `time.monotonic()` value; past it a fetch raises `timeout`. A DICOMweb fetch
also ends within `policy.timeout_s` in all (resolving, connecting, TLS, headers, body, every retry and every
wait between them), with or without a deadline: a per-read socket timeout alone would let a server that sends
one byte every few seconds hold a read forever, so a watchdog shuts each request's connection down at the end.
Files are read in chunks with the deadline checked between them.

Files (`file://`):

- only inside the configured roots, judged after symlinks and `..` are resolved; a missing file is reported as
  `not_found` only after that check, so a reference cannot probe for files outside the roots;
- only regular files: the path is `lstat`ed first and anything else (directory, FIFO, socket, device) is
  refused as `unsupported_uri` without being opened (opening a FIFO blocks, a device may never end or act on
  being opened). It is then opened with O_NOFOLLOW|O_NONBLOCK, so that a FIFO swapped in after the `lstat`
  cannot block the open, and what was actually opened is checked again: `fstat` of the descriptor (a regular
  file) and its real path (inside a root);
- a size over `max_bytes` is refused before reading, and a file that grows past it while read is refused too.

DICOMweb (`http(s)://`), checked before any connection is made:

- the allow-list (`CXR_DICOMWEB_ALLOWED_HOSTS`) is the primary rule: `host` admits any port of that host,
  `host:port` just that port, compared case-insensitively;
- no userinfo (`user:password@`) in the URL;
- the host is a plain DNS name (ASCII letters, digits, `-` and `_`, non-empty labels, no trailing dot, no
  percent-encoding) or an IP literal in its one canonical spelling: IPv4 as four decimal octets without
  leading zeros, IPv6 in brackets in compressed form, without a zone id and not embedding an IPv4 address
  (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`). A host whose last label
  is a number (`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`) is an IPv4 address to resolvers, so it must
  be canonical too; other spellings would slip past an allow-list written in canonical form;
- the port, if any, is 1 to 65535 in plain digits without leading zeros;
- the path names a single WADO-RS instance (`…/studies/S/series/SE/instances/I`).

Then the host is resolved (bounded by the time left; an answer is reused for a few seconds but vetted anew
for every request) and refused if any address it resolves to is
link-local (169.254.0.0/16, fe80::/10), a cloud metadata address (169.254.169.254, fd00:ec2::254, …),
unspecified, multicast, broadcast or reserved, unless the allow-list names that very IP. Loopback and private
addresses are accepted for an allow-listed host: hospital PACS live on private networks. The connection goes
to the resolved addresses only (pinned, so DNS cannot answer differently between check and connect), while the
Host header, TLS SNI and certificate verification use the host name. Redirects are never followed.

Connections are kept alive and reused, per Python worker process (Spark reuses workers across micro-batches):
a module-level pool, shared by the decode threads, keyed by scheme, host name, port and the vetted address it
is connected to. A request takes a pooled connection only for an address that its own resolution just vetted
under its own policy, so pinning and the SSRF rules hold for every request, and only for the same host name,
so the Host header, SNI and the certificate check always match. A connection goes back to the pool only after
an answer was read to its end (a small error answer is read to its end for that), the server did not say
`Connection: close` and the watchdog did not fire; the pool keeps at most `POOL_MAX_IDLE_PER_KEY` per key,
none idle longer than `POOL_MAX_IDLE_S`, and drops one the server has closed meanwhile before using it. Should
a reused connection still turn out dead (reset, closed, or a bad status line before any answer), the request
goes out once more on a new connection, which is not counted as a retry. A name's resolution is reused for
`DNS_CACHE_S` and vetted again for each request. A forked child (PySpark forks its workers) starts with an
empty pool of its own and never touches its parent's connections.

Codes and retries. A server that is down or overloaded (connection refused, reset or closed without an answer,
host unreachable, a name lookup that fails for now (EAI_AGAIN), HTTP 429, 502, 503, 504) is `unavailable`, and
is tried again up to `policy.retries` times after an exponential backoff with jitter (from
`policy.retry_backoff_s`), or after its `Retry-After` when that is longer. A retry is made only if it can still
start before the deadline (or `timeout_s`): otherwise, and when `Retry-After` asks for more than
`MAX_RETRY_WAIT_S`, the fetch ends at once with that `unavailable` (its reason says how many attempts were
made). So a PACS that is down ends as `unavailable` within the deadline; `timeout` means a server (or a name
lookup) that did not answer in time, and is not retried. 404 is `not_found`, 401 and 403 are `forbidden_uri`,
a redirect is `forbidden_uri`, none of them retried; any other failure is `fetch_failed`. Reasons name the
status or the kind of failure, never a header, a credential or what the server said.
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import functools
import http.client
import ipaddress
import math
import os
import random
import re
import select
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from streaming.errors import ErrorCode, FetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_INSTANCE_PATH = re.compile(r"/studies/[^/]+/series/[^/]+/instances/[^/]+/?$")
_ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Read size for files and HTTP bodies; the deadline is checked between reads.
_CHUNK_BYTES = 1024 * 1024

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
)

_HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_REQUEST_TARGET = re.compile(r"/[\x21-\x7e]*")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]+")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
#: Cloud instance metadata services: AWS/GCP/Azure/OpenStack, AWS ECS, AWS over IPv6, Alibaba, Azure WireServer.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_OVERLOADED = frozenset({429, 502, 503, 504})
_UNREACHABLE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})


@dataclass(frozen=True)
class FetchPolicy:
    """What references may point at, and how hard to try; built on the driver from the settings
    (`scoring.scoring_config`) and shipped to the executors. Credentials never show in its repr."""

    allowed_roots: tuple[Path, ...] = ()
    #: `host` or `host:port` that DICOMweb references may name (`CXR_DICOMWEB_ALLOWED_HOSTS`)
    dicomweb_hosts: tuple[str, ...] = ()
    max_bytes: int = 128 * 1024 * 1024
    #: the most one DICOMweb fetch may take in all (every attempt and every wait between them), whatever
    #: the deadline (`CXR_FETCH_TIMEOUT_S`)
    timeout_s: float = 30.0
    #: a whole `Authorization` header value (`Settings.dicomweb_authorization`: bearer or HTTP basic). Sent only to
    #: the allow-listed host the reference names (redirects are never followed), never logged, never in a reason
    authorization: str | None = field(default=None, repr=False)
    #: further attempts after one that ends `unavailable` (`CXR_DICOMWEB_RETRIES`; 0 here: one attempt, for
    #: callers that build a policy themselves)
    retries: int = 0
    #: the first wait before a retry; it doubles each time, with jitter (`CXR_DICOMWEB_RETRY_BACKOFF_S`)
    retry_backoff_s: float = 0.25


def fetch(uri: str, policy: FetchPolicy, deadline: float | None = None) -> bytes:
    """The bytes a reference points at, or a `FetchError` saying why not.

    `deadline` is an absolute `time.monotonic()` value; None leaves only `policy.timeout_s` for DICOMweb.
    """
    scheme = _split(uri).scheme.lower()
    if scheme == "file":
        return read_file(resolve_file_uri(uri, policy), policy.max_bytes, policy.allowed_roots, deadline=deadline)
    if scheme in ("http", "https"):
        return fetch_dicomweb(uri, policy, deadline=deadline)
    raise FetchError(ErrorCode.UNSUPPORTED_URI, "only file:// and DICOMweb http(s):// URIs are supported")


def _split(uri: str) -> SplitResult:
    try:
        return urlsplit(uri)
    except ValueError:  # e.g. an unclosed or invalid bracketed host
        raise FetchError(ErrorCode.UNSUPPORTED_URI, "the URI cannot be parsed") from None


def _time_left(deadline: float | None, what: str) -> float:
    """Seconds until `deadline` (infinite for none); a `timeout` once it has passed."""
    if deadline is None:
        return math.inf
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(ErrorCode.TIMEOUT, f"{what} ran past the deadline")
    return left


# ------------------------------------------------------------------------------------------------- files


def resolve_file_uri(uri: str, policy: FetchPolicy) -> Path:
    """The real path of a `file://` URI, if and only if it lies inside an allowed root."""
    parts = _split(uri)
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


def _outside_roots() -> FetchError:
    return FetchError(ErrorCode.FORBIDDEN_URI, "the file is outside the allowed roots")


def _too_large(max_bytes: int) -> FetchError:
    return FetchError(ErrorCode.TOO_LARGE, f"the image is larger than the limit of {max_bytes} bytes")


_FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def special_file_refusal(mode: int) -> FetchError | None:
    """Why a file of this `st_mode` must not be read (anything but a regular file), or None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "a special file")
    return FetchError(ErrorCode.UNSUPPORTED_URI, f"the URI names {kind}, not a regular file")


def _file_error(exc: OSError) -> FetchError:
    """The dead-letter code for an OS error met while opening or reading a file."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return FetchError(ErrorCode.NOT_FOUND, "the file does not exist")
    if exc.errno == errno.ELOOP:  # the final component became a symlink after resolution
        return _outside_roots()
    if exc.errno == errno.ENXIO:  # a socket file (or a device without a driver) opened anyway
        return FetchError(ErrorCode.UNSUPPORTED_URI, "the URI names a socket or a device, not a regular file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FetchError(ErrorCode.FETCH_FAILED, "the file is not readable by the scoring job")
    return FetchError(ErrorCode.FETCH_FAILED, f"the file could not be read ({exc.strerror or 'I/O error'})")


def read_file(
    path: Path, max_bytes: int, allowed_roots: tuple[Path, ...] = (), *, deadline: float | None = None
) -> bytes:
    """Read a resolved path that must be a regular file; with `allowed_roots`, check what was actually opened.

    Between resolving a path and opening it, a component could be swapped for a symlink or the file for a
    FIFO; opening without following a final symlink and without blocking, then checking the descriptor's type
    and real path, closes that window.
    """
    _time_left(deadline, "reading the file")
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise _outside_roots()
        refusal = special_file_refusal(mode)
        if refusal is not None:
            raise refusal
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _file_error(exc) from None
    try:
        info = os.fstat(fd)
        refusal = special_file_refusal(info.st_mode)
        if refusal is not None:
            raise refusal
        opened = _opened_path(fd) if allowed_roots else None
        if opened is not None and not any(opened.is_relative_to(root) for root in allowed_roots):
            raise _outside_roots()
        if info.st_size > max_bytes:
            raise _too_large(max_bytes)
        return _read_limited(
            functools.partial(os.read, fd), max_bytes, functools.partial(_time_left, deadline, "reading the file")
        )
    except OSError as exc:
        raise _file_error(exc) from None
    finally:
        os.close(fd)


def _read_limited(read: Callable[[int], bytes], max_bytes: int, before_each: Callable[[], object]) -> bytes:
    """At most `max_bytes` from `read`, a chunk at a time; `before_each` runs before every read (the deadline
    check), so no single read can carry the whole fetch past it. More than `max_bytes` is `too_large`."""
    chunks: list[bytes] = []
    total = 0
    while True:
        before_each()
        chunk = read(min(_CHUNK_BYTES, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:  # a file that grew after fstat, a body longer than announced
            raise _too_large(max_bytes)
        chunks.append(chunk)


# ---------------------------------------------------------------------------------------- DICOMweb: checks


def _split_host_port(netloc: str) -> tuple[str, bool, str | None]:
    """`(host, bracketed, port)` of a lower-cased authority without userinfo; port None when absent."""
    if netloc.startswith("["):  # an IPv6 literal: its colons are not a port separator
        inner, bracket, rest = netloc[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise FetchError(ErrorCode.FORBIDDEN_URI, "the URL's host is malformed")
        return inner, True, rest[1:] if rest else None
    host, colon, port = netloc.partition(":")
    return host, False, port if colon else None


def host_allowed(netloc: str, scheme: str, allowed: tuple[str, ...]) -> bool:
    """`host` in the allow-list admits any port of that host; `host:port` admits just that port."""
    try:
        host, bracketed, port = _split_host_port(netloc.rsplit("@", 1)[-1].lower())
    except FetchError:
        return False
    host = f"[{host}]" if bracketed else host
    port = port or ("443" if scheme == "https" else "80")
    return any(entry.strip().lower() in (host, f"{host}:{port}") for entry in allowed)


def _canonical_ip_host(host: str, bracketed: bool) -> IPAddress | None:
    """The IP a URL host names (None for a DNS name); `forbidden_uri` for any spelling but the canonical one."""
    if not host:
        raise FetchError(ErrorCode.UNSUPPORTED_URI, "the URL names no host")
    if "%" in host:
        raise FetchError(ErrorCode.FORBIDDEN_URI, "the URL's host is percent-encoded or carries an IPv6 zone id")
    if bracketed:
        try:
            ip6 = ipaddress.IPv6Address(host)
        except ValueError:
            raise FetchError(ErrorCode.FORBIDDEN_URI, "the URL's bracketed host is not an IPv6 address") from None
        if _embedded_ipv4(ip6) is not None:
            raise FetchError(ErrorCode.FORBIDDEN_URI, "the URL's IPv6 host embeds an IPv4 address")
        if str(ip6) != host:
            raise FetchError(ErrorCode.FORBIDDEN_URI, "the URL's IPv6 host is not in canonical (compressed) form")
        return ip6
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise FetchError(ErrorCode.FORBIDDEN_URI, "the URL's host is not a plain DNS name or IP address")
    if not _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        return None
    try:  # resolvers read a name ending in a number as an IPv4 address, in any of inet_aton's spellings
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        ip4 = None
    if ip4 is None or str(ip4) != host:
        raise FetchError(
            ErrorCode.FORBIDDEN_URI, "IPv4 hosts must be written as four decimal numbers without leading zeros"
        )
    return ip4


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible or NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    packed = address.packed
    if packed[:12] == bytes(12) and int(address) > 1:  # IPv4-compatible; not :: or ::1
        return ipaddress.IPv4Address(packed[12:])
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(packed[12:])
    return None


def _port(text: str | None, scheme: str) -> int:
    if text is None:
        return 443 if scheme == "https" else 80
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise FetchError(ErrorCode.FORBIDDEN_URI, "the URL's port must be a number from 1 to 65535")
    return int(text)


@dataclass(frozen=True)
class DicomwebTarget:
    """A DICOMweb URL that passed every check needing no network: whom to ask, and for what."""

    tls: bool
    #: lower-case DNS name, or the canonical IP without brackets
    host: str
    port: int
    #: the authority as the Host header carries it
    netloc: str
    #: path and query
    request_target: str
    #: the IP when the URL names one literally
    literal: IPAddress | None


def dicomweb_target(uri: str, allowed_hosts: tuple[str, ...]) -> DicomwebTarget:
    """Check a DICOMweb URL against the allow-list and the spelling rules; pure, no network."""
    parts = _split(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(ErrorCode.UNSUPPORTED_URI, "DICOMweb URIs must be http:// or https://")
    if "@" in parts.netloc:
        raise FetchError(ErrorCode.FORBIDDEN_URI, "DICOMweb URIs must not carry credentials")
    netloc = parts.netloc.lower()
    host, bracketed, port_text = _split_host_port(netloc)
    literal = _canonical_ip_host(host, bracketed)
    port = _port(port_text, scheme)
    if not host_allowed(netloc, scheme, allowed_hosts):
        raise FetchError(ErrorCode.FORBIDDEN_URI, "the DICOMweb host is not in the allowed hosts")
    if not _INSTANCE_PATH.search(parts.path):
        raise FetchError(
            ErrorCode.UNSUPPORTED_URI, "the URL is not a DICOMweb instance (…/studies/…/series/…/instances/…)"
        )
    request_target = parts.path + (f"?{parts.query}" if parts.query else "")
    if not _REQUEST_TARGET.fullmatch(request_target):
        raise FetchError(ErrorCode.UNSUPPORTED_URI, "the URL carries characters that must be percent-encoded")
    return DicomwebTarget(scheme == "https", host, port, netloc, request_target, literal)


def _allow_list_names(address: IPAddress, port: int, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether the allow-list names this very IP (bare, or with this port)."""
    for entry in allowed_hosts:
        try:
            host, _, entry_port = _split_host_port(entry.strip().lower())
            named = ipaddress.ip_address(host)
        except (FetchError, ValueError):
            continue
        if named == address and entry_port in (None, str(port)):
            return True
    return False


def address_refusal(address: IPAddress, port: int, allowed_hosts: tuple[str, ...]) -> str | None:
    """Why a resolved address must not be connected to (a phrase), or None when it may be."""
    if _allow_list_names(address, port, allowed_hosts):
        return None
    reached: IPAddress = address
    if isinstance(address, ipaddress.IPv6Address):
        reached = _embedded_ipv4(address) or address
    if reached in _METADATA:
        return "a cloud metadata address"
    if reached.is_loopback:
        return None
    if reached.is_link_local:
        return "a link-local address"
    if reached.is_unspecified:
        return "an unspecified address"
    if reached.is_multicast:
        return "a multicast address"
    if reached == _BROADCAST:
        return "a broadcast address"
    if reached.is_reserved:
        return "a reserved address"
    return None


def status_error(status: int) -> FetchError:
    """The dead-letter code for a DICOMweb answer that is not a success."""
    if status in _REDIRECTS:
        return FetchError(ErrorCode.FORBIDDEN_URI, "the DICOMweb server answered with a redirect, not followed")
    if status == 404:
        return FetchError(ErrorCode.NOT_FOUND, "the DICOMweb server does not have this instance")
    if status in (401, 403):
        return FetchError(ErrorCode.FORBIDDEN_URI, f"the DICOMweb server refused access (HTTP {status})")
    if status in _OVERLOADED:
        return FetchError(ErrorCode.UNAVAILABLE, f"the DICOMweb server is down or overloaded (HTTP {status})")
    return FetchError(ErrorCode.FETCH_FAILED, f"the DICOMweb server answered HTTP {status}")


def _network_error(exc: Exception) -> FetchError:
    """The dead-letter code for a failure while talking to a DICOMweb server."""
    if isinstance(exc, TimeoutError):  # a socket timeout: the time left ran out
        return FetchError(ErrorCode.TIMEOUT, "the DICOMweb request ran out of time")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb server's TLS certificate did not verify")
    if isinstance(exc, ssl.SSLError):
        return FetchError(ErrorCode.FETCH_FAILED, "the TLS handshake with the DICOMweb server failed")
    if isinstance(exc, ConnectionError) or (isinstance(exc, OSError) and exc.errno in _UNREACHABLE):
        return FetchError(ErrorCode.UNAVAILABLE, f"the DICOMweb server could not be reached ({type(exc).__name__})")
    if isinstance(exc, http.client.HTTPException):  # a malformed or truncated answer (e.g. IncompleteRead)
        return FetchError(
            ErrorCode.FETCH_FAILED, f"the DICOMweb answer was malformed or cut short ({type(exc).__name__})"
        )
    return FetchError(ErrorCode.FETCH_FAILED, f"the DICOMweb request failed ({type(exc).__name__})")


# ------------------------------------------------------------------------------------------ DICOMweb: I/O

_SockAddr = tuple[Any, ...]
#: `(scheme, host, port, vetted socket address)`: a connection serves only requests for the very host name
#: (Host header, SNI, the certificate it was verified against) and address it was opened for.
_PoolKey = tuple[str, str, int, _SockAddr]

#: Idle keep-alive connections kept per pool key, and for how long (servers drop idle ones on their own:
#: Orthanc after about a second, Apache after 5 s, nginx after 75 s).
POOL_MAX_IDLE_PER_KEY = 8
POOL_MAX_IDLE_S = 15.0
#: A name's addresses are reused this long (vetted again for every request, under that request's policy).
DNS_CACHE_S = 5.0
_DNS_CACHE_MAX = 256
#: The longest single wait between attempts; a `Retry-After` asking for more ends the fetch at once.
MAX_RETRY_WAIT_S = 10.0
#: Exponential backoff is stretched by a random factor from 1 to 1 + this (jitter).
_JITTER = 0.5
#: A retry is made only if, after its wait, at least this much time is left before the deadline.
_MIN_ATTEMPT_S = 0.1
#: An error answer (404, 503, ...) is read to its end so that its connection can be reused, if it is this
#: small and arrives within this time; otherwise the connection is closed.
_DRAIN_MAX_BYTES = 64 * 1024
_DRAIN_S = 1.0


def _resolve(target: DicomwebTarget, allowed_hosts: tuple[str, ...], end: float) -> list[tuple[int, _SockAddr]]:
    """The vetted `(family, sockaddr)` pairs to connect to, vetted under this request's allow-list."""
    if target.literal is not None:
        if target.literal.version == 6:
            return [(socket.AF_INET6, (target.host, target.port, 0, 0))]
        return [(socket.AF_INET, (target.host, target.port))]
    infos = _lookup(target.host, target.port, end)
    addresses: list[tuple[int, _SockAddr]] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        except ValueError:
            raise FetchError(ErrorCode.FORBIDDEN_URI, "the DICOMweb host resolves to an unreadable address") from None
        refusal = address_refusal(address, target.port, allowed_hosts)
        if refusal is not None:
            raise FetchError(ErrorCode.FORBIDDEN_URI, f"the DICOMweb host resolves to {refusal}")
        vetted = (family, tuple(sockaddr))
        if vetted not in addresses:
            addresses.append(vetted)
    if not addresses:
        raise FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb host name resolves to no IP address")
    return addresses


def _lookup(host: str, port: int, end: float) -> list[Any]:
    """`getaddrinfo` answers, from the per-process cache while they are fresh; failures are not cached."""
    state = _state()
    now = time.monotonic()
    with state.lock:
        cached = state.dns.get((host, port))
    if cached is not None and cached[0] > now:
        return cached[1]
    infos = _getaddrinfo(host, port, end)
    with state.lock:
        if len(state.dns) >= _DNS_CACHE_MAX:
            state.dns.clear()
        state.dns[(host, port)] = (now + DNS_CACHE_S, infos)
    return infos


def _getaddrinfo(host: str, port: int, end: float) -> list[Any]:
    """`getaddrinfo` bounded by `end`: it cannot be interrupted, so it runs on a daemon thread left behind
    on timeout (the resolver's own timeouts end it later)."""
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
        except OSError as exc:
            outcome.append(exc)

    resolver = threading.Thread(target=lookup, name="cxr-resolve", daemon=True)
    resolver.start()
    resolver.join(_time_left(end, "resolving the DICOMweb host"))
    if not outcome:
        raise FetchError(ErrorCode.TIMEOUT, "resolving the DICOMweb host ran past the deadline")
    result = outcome[0]
    if isinstance(result, socket.gaierror) and result.errno == socket.EAI_AGAIN:
        raise FetchError(ErrorCode.UNAVAILABLE, "the DICOMweb host name could not be resolved for now")
    if isinstance(result, OSError):
        raise FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb host name does not resolve")
    return list(result)


def _connect(addresses: list[tuple[int, _SockAddr]], end: float) -> tuple[socket.socket, _SockAddr]:
    """A TCP connection to the first vetted address that accepts, within the time left, and that address."""
    last: OSError | None = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_time_left(end, "connecting to the DICOMweb server"))
            sock.connect(sockaddr)
            return sock, sockaddr
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or ConnectionError("no address to connect to")


class Watchdog:
    """Shuts a connection down when its time is up, waking a read that a dripping server keeps alive.

    The socket timeout bounds each read; this bounds them all, including those inside `http.client`
    (status line, headers, chunk sizes) and the TLS handshake. It works on a duplicate descriptor so that
    it never touches the (possibly TLS) socket object that the reading thread uses. One per request, also
    on a reused connection; a connection it fired on is never reused.
    """

    def __init__(self, sock: socket.socket, end: float) -> None:
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._peer: socket.socket | None = socket.socket(fileno=os.dup(sock.fileno()))
        self._timer = threading.Timer(max(0.0, end - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._peer is None:
                return
            self.fired.set()
            with contextlib.suppress(OSError):
                self._peer.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            if self._peer is not None:
                self._peer.close()
                self._peer = None


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP connection over a socket already connected to a vetted address; it never dials by name."""

    def __init__(self, host: str, port: int, sock: socket.socket, key: _PoolKey) -> None:
        super().__init__(host, port)
        self.sock = sock
        self.key = key

    def connect(self) -> None:
        raise http.client.NotConnected("the pinned connection was closed")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The system's trust store with hostname checking; built once per process."""
    return ssl.create_default_context()


# ------------------------------------------------------------------------------ DICOMweb: connection pool


def _dropped(sock: socket.socket | None) -> bool:
    """Whether an idle connection can no longer carry a request: closed, reset, or holding unread bytes
    (an idle connection has nothing to read; anything there is an EOF, an error, or stray data)."""
    if sock is None:
        return True
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class _Pool:
    """Idle keep-alive connections of one process, by `_PoolKey`; safe for the decode threads to share.

    Most recently used first; at most `POOL_MAX_IDLE_PER_KEY` per key (the oldest goes), none idle for longer
    than `POOL_MAX_IDLE_S`, none that `_dropped` says the server has closed. Sockets are closed outside the
    lock. Connections enter only through `put`, and only after a complete answer (see `_exchange`).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.idle: dict[_PoolKey, list[tuple[float, _PinnedConnection]]] = {}
        self.dns: dict[tuple[str, int], tuple[float, list[Any]]] = {}

    def take(self, keys: list[_PoolKey]) -> _PinnedConnection | None:
        """An idle connection for one of `keys` (in their order of preference) that still looks alive."""
        while True:
            found: _PinnedConnection | None = None
            expired: list[_PinnedConnection] = []
            now = time.monotonic()
            with self.lock:
                for key in keys:
                    idle = self.idle.get(key, [])
                    while idle and found is None:
                        since, connection = idle.pop()
                        if now - since > POOL_MAX_IDLE_S:
                            expired.append(connection)
                        else:
                            found = connection
                    if not idle:
                        self.idle.pop(key, None)
                    if found is not None:
                        break
            _close_all(expired)
            if found is None or not _dropped(found.sock):
                return found
            found.close()

    def put(self, connection: _PinnedConnection) -> None:
        now = time.monotonic()
        closing: list[_PinnedConnection] = []
        with self.lock:
            for key in list(self.idle):  # few keys: the allow-listed hosts' addresses
                fresh = [entry for entry in self.idle[key] if now - entry[0] <= POOL_MAX_IDLE_S]
                closing += [connection for since, connection in self.idle[key] if now - since > POOL_MAX_IDLE_S]
                if fresh:
                    self.idle[key] = fresh
                else:
                    del self.idle[key]
            idle = self.idle.setdefault(connection.key, [])
            idle.append((now, connection))
            while len(idle) > POOL_MAX_IDLE_PER_KEY:
                closing.append(idle.pop(0)[1])
            if not idle:
                del self.idle[connection.key]
        _close_all(closing)

    def count(self) -> int:
        """Idle connections held now (for tests and diagnostics)."""
        with self.lock:
            return sum(len(idle) for idle in self.idle.values())

    def drain(self) -> list[_PinnedConnection]:
        """Empty the pool; the caller closes what it returns."""
        with self.lock:
            connections = [connection for idle in self.idle.values() for _, connection in idle]
            self.idle.clear()
            self.dns.clear()
        return connections


def _close_all(connections: list[_PinnedConnection]) -> None:
    for connection in connections:
        with contextlib.suppress(OSError):
            connection.close()


_POOL = _Pool()


def _state() -> _Pool:
    """This process's pool (with its DNS cache); a forked child starts with an empty one of its own."""
    pool = _POOL
    if pool.pid != os.getpid():
        pool = _forget_inherited()
    return pool


def _forget_inherited() -> _Pool:
    """After a fork: a fresh pool and lock (the parent's lock may have been held by a thread that is gone).

    The inherited sockets are the parent's connections: the child never uses them, only closes its copies
    of their descriptors, which leaves the parent's connections (and TLS sessions) untouched.
    """
    global _POOL
    inherited, _POOL = _POOL, _Pool()
    for idle in list(inherited.idle.values()):
        for _, connection in list(idle):
            if connection.sock is not None:
                with contextlib.suppress(OSError):
                    connection.sock.close()
    return _POOL


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)


def close_idle_connections() -> int:
    """Close this process's idle DICOMweb connections and forget cached name lookups; how many were closed."""
    connections = _state().drain()
    _close_all(connections)
    return len(connections)


def idle_connections() -> int:
    """How many idle DICOMweb connections this process holds."""
    return _state().count()


# ---------------------------------------------------------------------------------- DICOMweb: one request


class _Stale(Exception):
    """A reused connection failed before any answer arrived: the server closed it while it sat idle."""


#: What a kept-alive connection closed by its server looks like when the next request is sent on it.
_STALE_ERRORS = (
    ConnectionResetError,  # includes http.client.RemoteDisconnected: closed without a status line
    BrokenPipeError,
    ConnectionAbortedError,
    http.client.BadStatusLine,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


@dataclass
class _Answer:
    """A complete answer: the body of a success, or just the status (and Retry-After) of anything else."""

    status: int
    body: bytes = b""
    content_type: str = ""
    retry_after: float | None = None
    #: the connection may carry another request: the answer was read to its end and the server keeps it open
    reusable: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _request_headers(target: DicomwebTarget, policy: FetchPolicy) -> dict[str, str]:
    headers = {"Host": target.netloc, "Accept": _ACCEPT_DICOM}
    authorization = policy.authorization
    if authorization:
        if not _HEADER_VALUE.fullmatch(authorization):  # http.client would quote the value in its error
            raise FetchError(ErrorCode.FETCH_FAILED, "the configured DICOMweb credentials are not a valid header")
        headers["Authorization"] = authorization
    return headers


def _request(target: DicomwebTarget, policy: FetchPolicy, end: float) -> tuple[bytes, str]:
    """The answer's body and Content-Type, retrying what is `unavailable`, all by `end`.

    An attempt that ends `unavailable` (refused, reset, HTTP 429/502/503/504, EAI_AGAIN) is made again, up
    to `policy.retries` times, after `retry_backoff_s * 2**n` stretched by jitter, or after the server's
    `Retry-After` when that is longer. Whenever the wait would leave less than `_MIN_ATTEMPT_S` before `end`,
    or the server asks for more than `MAX_RETRY_WAIT_S`, the fetch ends at once with that `unavailable`:
    a server that is down is reported as down, in time, never as a `timeout`.
    """
    headers = _request_headers(target, policy)
    retries = 0
    while True:
        error: FetchError
        retry_after: float | None = None
        try:
            answer = _attempt(target, policy, headers, end)
            if answer.ok:
                return answer.body, answer.content_type
            error, retry_after = status_error(answer.status), answer.retry_after
        except FetchError as exc:
            error = exc
        if error.code is not ErrorCode.UNAVAILABLE or retries >= policy.retries:
            raise _after_attempts(error, retries + 1)
        if retry_after is not None and retry_after > MAX_RETRY_WAIT_S:
            raise FetchError(
                ErrorCode.UNAVAILABLE,
                f"{error.reason}; it asked to retry after {retry_after:g} s, longer than cxr-stream waits",
            )
        wait = min(policy.retry_backoff_s * 2**retries, MAX_RETRY_WAIT_S) * (1 + _JITTER * random.random())
        wait = max(wait, retry_after or 0.0)
        if time.monotonic() + wait + _MIN_ATTEMPT_S > end:
            raise _after_attempts(error, retries + 1)
        time.sleep(wait)
        retries += 1


def _after_attempts(error: FetchError, attempts: int) -> FetchError:
    if attempts == 1:
        return error
    return FetchError(error.code, f"{error.reason}, after {attempts} attempts")


def _attempt(target: DicomwebTarget, policy: FetchPolicy, headers: dict[str, str], end: float) -> _Answer:
    """One try: resolve, then a pooled connection to a vetted address, else a new one; every failure is a
    `FetchError`. A pooled connection found dead is replaced by a new one, once, within the same try."""
    _time_left(end, "the DICOMweb request")
    addresses = _resolve(target, policy.dicomweb_hosts, end)
    scheme = "https" if target.tls else "http"
    pooled = _state().take([(scheme, target.host, target.port, sockaddr) for _, sockaddr in addresses])
    if pooled is not None:
        try:
            return _exchange(target, policy, headers, end, pooled)
        except _Stale:
            pass
    try:
        sock, sockaddr = _connect(addresses, end)
    except OSError as exc:
        raise _network_error(exc) from None
    return _exchange(target, policy, headers, end, sock, (scheme, target.host, target.port, sockaddr))


def _exchange(
    target: DicomwebTarget,
    policy: FetchPolicy,
    headers: dict[str, str],
    end: float,
    via: _PinnedConnection | socket.socket,
    key: _PoolKey | None = None,
) -> _Answer:
    """One request on a pooled connection, or on a new socket (TLS handshake first); under a watchdog.

    The connection goes back to the pool only when the answer was complete, the server keeps it open and
    the watchdog did not fire; otherwise it is closed. `_Stale` (from a pooled connection only) says try anew.
    """
    reused = isinstance(via, _PinnedConnection)
    raw = via.sock if isinstance(via, _PinnedConnection) else via
    connection = via if isinstance(via, _PinnedConnection) else None
    watchdog: Watchdog | None = None
    answer: _Answer | None = None
    try:
        watchdog = Watchdog(raw, end)
        if connection is None:
            assert key is not None and isinstance(raw, socket.socket)
            raw.settimeout(_time_left(end, "the TLS handshake"))
            sock = _tls_context().wrap_socket(raw, server_hostname=target.host) if target.tls else raw
            connection = _PinnedConnection(target.host, target.port, sock, key)
        answer = _converse(connection, target, policy, headers, end, reused=reused)
    except (_Stale, FetchError, OSError, http.client.HTTPException, ValueError) as exc:
        if watchdog is not None and watchdog.fired.is_set():  # a shut-down socket also looks stale
            raise FetchError(ErrorCode.TIMEOUT, "the DICOMweb request ran out of time") from None
        if isinstance(exc, _Stale | FetchError):
            raise
        raise _network_error(exc) from None
    finally:
        if watchdog is not None:
            watchdog.close()
        fired = watchdog is None or watchdog.fired.is_set()
        if connection is not None and answer is not None and answer.reusable and not fired:
            _state().put(connection)
        elif connection is not None:
            connection.close()
        else:
            raw.close()
    assert answer is not None
    if fired and answer.ok:  # a read cut off by the watchdog can look like a complete body
        raise FetchError(ErrorCode.TIMEOUT, "the DICOMweb request ran out of time")
    return answer


def _converse(
    connection: _PinnedConnection,
    target: DicomwebTarget,
    policy: FetchPolicy,
    headers: dict[str, str],
    end: float,
    *,
    reused: bool,
) -> _Answer:
    """Send the WADO-RS request and read the answer: the body (size-limited) of a success, the status of
    anything else."""
    sock = connection.sock
    assert sock is not None
    try:
        sock.settimeout(_time_left(end, "the DICOMweb request"))
        connection.request("GET", target.request_target, headers=headers)
        response = connection.getresponse()
    except _STALE_ERRORS as exc:
        if reused:
            raise _Stale from exc
        raise
    try:
        if not 200 <= response.status < 300:
            retry_after = _retry_after(response.getheader("Retry-After")) if response.status in _OVERLOADED else None
            return _Answer(response.status, retry_after=retry_after, reusable=_drain(connection, response, end))
        declared = response.length  # None when chunked or not given
        if declared is not None and declared > policy.max_bytes:
            raise _too_large(policy.max_bytes)
        body = _read_limited(
            response.read1,
            policy.max_bytes,
            lambda: sock.settimeout(_time_left(end, "reading the DICOMweb answer")),
        )
        if declared is not None and len(body) < declared:
            raise FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb answer was cut short")
        content_type = response.getheader("Content-Type", "") or ""
        return _Answer(response.status, body, content_type, reusable=_complete(connection, response))
    except BaseException:
        response.close()
        raise


def _complete(connection: _PinnedConnection, response: http.client.HTTPResponse) -> bool:
    """Whether the answer was read to its very end and the connection stays open for another request; if
    so, the response is closed (`read1` leaves a finished Content-Length answer open, which would block
    the connection's next request)."""
    finished = response.isclosed() or (not response.chunked and response.length == 0)
    if not finished or response.will_close or connection.sock is None:
        return False
    response.close()
    return True


def _drain(connection: _PinnedConnection, response: http.client.HTTPResponse, end: float) -> bool:
    """Read a small error answer to its end (within `_DRAIN_S`) so its connection can be reused; never
    raises: an answer that is large, slow or broken only costs its connection."""
    if response.will_close or response.length is None or response.length > _DRAIN_MAX_BYTES:
        return False
    sock = connection.sock
    drained_by = min(end, time.monotonic() + _DRAIN_S)
    try:
        _read_limited(
            response.read1,
            _DRAIN_MAX_BYTES,
            lambda: sock.settimeout(_time_left(drained_by, "reading the error answer")) if sock else None,
        )
    except (FetchError, OSError, http.client.HTTPException, ValueError):
        return False
    return _complete(connection, response)


def _retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (delay-seconds or an HTTP date), or None if absent/unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def fetch_dicomweb(uri: str, policy: FetchPolicy, *, deadline: float | None = None) -> bytes:
    """One instance by WADO-RS, as Part 10 bytes, within `policy.timeout_s` and the deadline."""
    target = dicomweb_target(uri, policy.dicomweb_hosts)
    budget_end = time.monotonic() + policy.timeout_s
    end = budget_end if deadline is None else min(deadline, budget_end)
    try:
        body, content_type = _request(target, policy, end)
    except FetchError as exc:
        if exc.code is not ErrorCode.TIMEOUT:
            raise
        reason = (
            f"the DICOMweb request took longer than {policy.timeout_s:g} s"
            if end == budget_end
            else "the DICOMweb request ran past the deadline"
        )
        raise FetchError(ErrorCode.TIMEOUT, reason) from None
    return first_part(body, content_type)


# ------------------------------------------------------------------------------ DICOMweb: multipart/related

#: RFC 2046 §5.1.1: a boundary is 1 to 70 characters. Any printable ASCII is taken (a superset of its `bchars`:
#: matching is byte-exact, so no character can do harm), but not a space at the end.
_MULTIPART_BOUNDARY = re.compile(r"[\x20-\x7e]{0,69}[\x21-\x7e]")
#: One `; name=value` parameter of a Content-Type, the value a quoted-string or a bare run up to `;` or space.
_CONTENT_TYPE_PARAMETER = re.compile(r'\s*;\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s"]*)')
#: Where a header value's bare token ends: its parameters or an RFC 822 comment.
_PARAMETERS_OR_COMMENT = re.compile(r"[;(]")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
#: Transport padding: the spaces and tabs a sender may put after a boundary on its delimiter line.
_TRANSPORT_PADDING = re.compile(rb"[ \t]*")
#: What follows `CRLF--boundary` on a delimiter line (`_delimiter_line` in a regular expression): transport
#: padding then CRLF, or `--` and transport padding at the end of the body or before CRLF (the closing one).
_DELIMITER_LINE_END = rb"(?:(?P<closing>--)[ \t]*(?=\r\n|\Z)|[ \t]*\r\n)"
#: A header field line (`name: value`) or a folded continuation line of a body part's header block.
_PART_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+:[^\r\n]*|[ \t][^\r\n]*")
#: The most a body part's header block may take; a WADO-RS part carries a few short headers.
MAX_PART_HEADER_BYTES = 16 * 1024
#: Content-Transfer-Encodings whose body is the octets themselves (absent means 7bit).
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
#: The most body parts looked at for an instance: parts that carry none are skipped, but not without end.
MAX_MULTIPART_PARTS = 1000


def first_part(body: bytes, content_type: str) -> bytes:
    """The first non-empty body part of a multipart answer (or the body itself when it is not multipart).

    A byte-level splitter per RFC 2046 §5.1 (DICOM PS3.18 §8.7.3): the boundary comes from the Content-Type
    (quoted or not; 1 to 70 characters, else `fetch_failed`). A delimiter is `--boundary` at the start of the
    body or right after CRLF, then transport padding (spaces, tabs) and CRLF, or `--` for the closing one; so
    whatever comes before the first delimiter (a preamble) or after the closing one (an epilogue) is ignored,
    and a line that merely begins with `--boundary` followed by anything else is part of the payload (as
    is `--boundary` anywhere but at a line start). Only CRLF ends a line, as RFC 2046 and PS3.18 require: a
    bare LF before `--boundary` is payload (the email parser this replaces cut the instance short there).

    Each part's headers must end within `MAX_PART_HEADER_BYTES` and be well-formed header lines. Its payload
    is what the email parser's `get_payload(decode=True)` gave for it: the octets up to the CRLF before the
    next delimiter for Content-Transfer-Encoding 7bit, 8bit, binary or none; decoded for base64 and
    quoted-printable; any other encoding is refused rather than handed on undecoded. A part that is empty, or
    is itself multipart/* or message/*, carries no instance and is skipped, as before.

    Unlike the email parser, a part that no delimiter ends is `fetch_failed` "cut short" rather than taken
    as it stands: a connection that closed early must not pass a truncated instance on. Parts after the one
    returned are not looked at. Reasons never quote the body or the boundary.
    """
    if not content_type.lower().startswith("multipart/"):
        return body
    boundary = _multipart_boundary(content_type)
    delimiter = _Delimiter(b"\r\n--" + boundary)
    opening = _delimiter_line(body, len(boundary) + 2) if body.startswith(b"--" + boundary) else None
    if opening is None:
        found = delimiter.next(body, 0)
        if found is None:
            raise FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb answer is multipart but has no delimiter")
        opening = found[1:]
    start, closing = opening
    looked_at = 0
    while not closing:
        if looked_at == MAX_MULTIPART_PARTS:
            raise FetchError(
                ErrorCode.FETCH_FAILED, f"the DICOMweb answer carried no instance in its first {looked_at} parts"
            )
        looked_at += 1
        # The CRLF that ends this delimiter line may also begin the next delimiter: an empty part.
        following = delimiter.next(body, start - 2)
        if following is None:
            raise FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb answer was cut short (a part is not closed)")
        end, after, closing = following
        payload = _part_payload(body, start, end)
        if payload:
            return payload
        start = after
    raise FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb answer carried no instance")


def _multipart_boundary(content_type: str) -> bytes:
    """The `boundary` parameter of a multipart Content-Type (the first, if it is given twice)."""
    semicolon = content_type.find(";")
    position = len(content_type) if semicolon < 0 else semicolon
    while (parameter := _CONTENT_TYPE_PARAMETER.match(content_type, position)) is not None:
        position = parameter.end()
        if parameter[1].lower() != "boundary":
            continue
        value = parameter[2]
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        if not _MULTIPART_BOUNDARY.fullmatch(value):
            raise FetchError(
                ErrorCode.FETCH_FAILED,
                "the DICOMweb answer's multipart boundary is not 1 to 70 printable ASCII characters (RFC 2046)",
            )
        return value.encode("ascii")
    raise FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb answer is multipart without a boundary")


def _delimiter_line(body: bytes, end: int) -> tuple[int, bool] | None:
    """Whether `--boundary`, ending at `end`, makes a delimiter line: `(where the next part starts, closing)`.

    Closing is `--`, transport padding, then CRLF (an epilogue follows) or the end of the body; any other is
    transport padding then CRLF. Anything else (`--boundaryX`, a line cut off) is not a delimiter.
    """
    if body.startswith(b"--", end):
        padded = _TRANSPORT_PADDING.match(body, end + 2)
        assert padded is not None  # `*` matches the empty string
        if padded.end() == len(body) or body.startswith(b"\r\n", padded.end()):
            return padded.end(), True
        return None
    padded = _TRANSPORT_PADDING.match(body, end)
    assert padded is not None
    if body.startswith(b"\r\n", padded.end()):
        return padded.end() + 2, False
    return None


class _Delimiter:
    """Finds `CRLF--boundary` delimiter lines in a body, at C speed whatever the body holds."""

    def __init__(self, delimiter: bytes) -> None:
        self.delimiter = delimiter
        self.pattern: re.Pattern[bytes] | None = None

    def next(self, body: bytes, start: int) -> tuple[int, int, bool] | None:
        """The first delimiter at or after `start`: `(where its CRLF is, where the next part starts, closing)`;
        None when there is none.

        `bytes.find` gets the first candidate; one that only looks like a delimiter (`--boundaryX`: payload,
        or a line cut off) hands the rest of the search to a regular expression, so that a body full of
        look-alikes costs no Python per look-alike.
        """
        at = body.find(self.delimiter, start)
        if at < 0:
            return None
        line = _delimiter_line(body, at + len(self.delimiter))
        if line is not None:
            return at, line[0], line[1]
        if self.pattern is None:
            self.pattern = re.compile(re.escape(self.delimiter) + _DELIMITER_LINE_END)
        match = self.pattern.search(body, at + 2)  # a CRLF cannot start at `at + 1`
        if match is None:
            return None
        return match.start(), match.end(), match["closing"] is not None


def _part_payload(body: bytes, start: int, end: int) -> bytes:
    """The decoded payload of the body part `body[start:end]` (headers, blank line, content); b"" when it
    carries no instance."""
    if end <= start:
        return b""
    if body.startswith(b"\r\n", start):  # no headers at all
        headers, content = b"", start + 2
    else:
        blank = body.find(b"\r\n\r\n", start, min(end, start + MAX_PART_HEADER_BYTES + 4))
        if blank < 0 and end - start > MAX_PART_HEADER_BYTES + 2:
            raise FetchError(
                ErrorCode.FETCH_FAILED,
                f"a part of the DICOMweb answer has no end to its headers within {MAX_PART_HEADER_BYTES} bytes",
            )
        if blank < 0:  # headers only, ended by the delimiter's CRLF: no content
            headers, content = body[start:end].removesuffix(b"\r\n"), end
        else:
            headers, content = body[start:blank], blank + 4
    content_type, encoding = _part_headers(headers)
    if content_type.startswith(("multipart/", "message/")) or content >= end:
        return b""
    if encoding in _IDENTITY_ENCODINGS:
        return body[content:end]
    try:
        if encoding == "base64":
            return binascii.a2b_base64(memoryview(body)[content:end])
        if encoding == "quoted-printable":
            return binascii.a2b_qp(memoryview(body)[content:end])
    except binascii.Error:
        raise FetchError(ErrorCode.FETCH_FAILED, f"a part of the DICOMweb answer is not valid {encoding}") from None
    raise FetchError(
        ErrorCode.FETCH_FAILED, "a part of the DICOMweb answer has a Content-Transfer-Encoding cxr-stream cannot read"
    )


def _part_headers(block: bytes) -> tuple[str, str]:
    """A part's media type and Content-Transfer-Encoding (each lower-case, without parameters or comments,
    "" when absent; the first when given twice), from its header block without the blank line."""
    fields: list[list[bytes]] = []
    for line in block.split(b"\r\n") if block else ():
        if not _PART_HEADER_LINE.fullmatch(line) or (line[:1] in (b" ", b"\t") and not fields):
            raise FetchError(ErrorCode.FETCH_FAILED, "a part of the DICOMweb answer has malformed headers")
        if line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    found: dict[bytes, str] = {}
    for lines in fields:
        name, _, value = b" ".join(lines).partition(b":")
        name = name.lower()
        if name in (b"content-type", b"content-transfer-encoding") and name not in found:
            found[name] = _PARAMETERS_OR_COMMENT.split(value.decode("latin-1"), maxsplit=1)[0].strip().lower()
    return found.get(b"content-type", ""), found.get(b"content-transfer-encoding", "")
