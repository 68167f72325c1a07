"""fetch: file:// only inside the allowed roots, DICOMweb only from allowed hosts, everything size-limited,
and every fetch ends in bounded time whatever the URI points at.

DICOMweb answers come from a real `http.server` on 127.0.0.1 in a thread; servers that misbehave on purpose
(drip, never answer, TLS) from `hostile_servers`. Anything that could block runs under a bound: a thread join
timeout, a deadline, and the module's pytest timeout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

import streaming.fetch as fetch_module
from hostile_servers import (
    MisbehavingServer,
    answers_over_tls,
    drips_body,
    drips_headers,
    never_answers,
    self_signed_certificate,
)
from streaming.errors import ErrorCode, FetchError, Stage
from streaming.fetch import (
    FetchPolicy,
    address_refusal,
    dicomweb_target,
    fetch,
    first_part,
    host_allowed,
    read_file,
    resolve_file_uri,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def fresh_connections() -> Iterator[None]:
    """Each test starts without pooled connections or cached name lookups, and leaves none behind."""
    fetch_module.close_idle_connections()
    yield
    fetch_module.close_idle_connections()


BINARY = bytes(range(256)) * 3 + b"\r\n--not-a-boundary\r\n" + b"\x00\xff" * 10
T = TypeVar("T")


def caught_error(call: Callable[[], object]) -> FetchError:
    with pytest.raises(FetchError) as caught:
        call()
    assert caught.value.stage is Stage.FETCH
    assert caught.value.reason
    return caught.value


def fetch_error(uri: str, policy: FetchPolicy, deadline: float | None = None) -> ErrorCode:
    return caught_error(lambda: fetch(uri, policy, deadline=deadline)).code


def run_bounded(call: Callable[[], T], timeout_s: float) -> T | BaseException:
    """`call()`'s result or exception, on a thread that must end within `timeout_s`."""
    outcome: list[T | BaseException] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout_s)
    assert not worker.is_alive(), f"the fetch was still running after {timeout_s} s"
    return outcome[0]


# -------------------------------------------------------------------------------------------- file:// URIs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An allowed root holding one image, next to a folder that is not allowed."""
    allowed = (tmp_path / "allowed").resolve()
    allowed.mkdir()
    (allowed / "sub").mkdir()
    (allowed / "sub" / "image.jpeg").write_bytes(b"\xff\xd8\xff" + b"x" * 97)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpeg").write_bytes(b"secret")
    return allowed


@pytest.fixture
def policy(root: Path) -> FetchPolicy:
    return FetchPolicy(allowed_roots=(root,))


def test_reads_a_file_inside_a_root(root: Path, policy: FetchPolicy) -> None:
    path = root / "sub" / "image.jpeg"
    assert fetch(path.as_uri(), policy) == path.read_bytes()


def test_localhost_and_single_slash_forms_are_local(root: Path, policy: FetchPolicy) -> None:
    path = root / "sub" / "image.jpeg"
    assert fetch(f"file://localhost{path}", policy) == path.read_bytes()
    assert fetch(f"file:{path}", policy) == path.read_bytes()
    assert fetch(f"FILE://{path}", policy) == path.read_bytes()


def test_percent_encoded_names_are_decoded(root: Path, policy: FetchPolicy) -> None:
    path = root / "with space ü.jpeg"
    path.write_bytes(b"spaced")
    assert fetch(path.as_uri(), policy) == b"spaced"


def test_reads_real_sample_jpeg(sample_jpeg: Path) -> None:
    policy = FetchPolicy(allowed_roots=(sample_jpeg.parent.resolve(),))
    assert fetch(sample_jpeg.resolve().as_uri(), policy) == sample_jpeg.read_bytes()


@pytest.mark.parametrize(
    "suffix",
    ["/../outside/secret.jpeg", "/sub/../../outside/secret.jpeg", "/%2e%2e/outside/secret.jpeg"],
)
def test_dot_dot_cannot_escape_the_root(root: Path, policy: FetchPolicy, suffix: str) -> None:
    assert fetch_error(f"file://{root}{suffix}", policy) is ErrorCode.FORBIDDEN_URI


def test_root_prefix_is_not_a_parent(root: Path, policy: FetchPolicy) -> None:
    """/x/allowed-evil is not inside /x/allowed."""
    sibling = root.parent / (root.name + "-evil")
    sibling.mkdir()
    (sibling / "a.jpeg").write_bytes(b"x")
    assert fetch_error((sibling / "a.jpeg").as_uri(), policy) is ErrorCode.FORBIDDEN_URI


def test_symlink_out_of_the_root_is_forbidden(root: Path, policy: FetchPolicy) -> None:
    link = root / "link.jpeg"
    link.symlink_to(root.parent / "outside" / "secret.jpeg")
    assert fetch_error(link.as_uri(), policy) is ErrorCode.FORBIDDEN_URI
    dir_link = root / "dirlink"
    dir_link.symlink_to(root.parent / "outside", target_is_directory=True)
    assert fetch_error((dir_link / "secret.jpeg").as_uri(), policy) is ErrorCode.FORBIDDEN_URI


def test_symlink_within_the_root_is_followed(root: Path, policy: FetchPolicy) -> None:
    link = root / "alias.jpeg"
    link.symlink_to(root / "sub" / "image.jpeg")
    assert fetch(link.as_uri(), policy) == (root / "sub" / "image.jpeg").read_bytes()


def test_absolute_path_elsewhere_is_forbidden(policy: FetchPolicy) -> None:
    assert fetch_error("file:///etc/passwd", policy) is ErrorCode.FORBIDDEN_URI


def test_no_roots_forbids_everything(root: Path) -> None:
    assert fetch_error((root / "sub" / "image.jpeg").as_uri(), FetchPolicy()) is ErrorCode.FORBIDDEN_URI


def test_missing_file_outside_the_roots_is_forbidden_not_not_found(root: Path, policy: FetchPolicy) -> None:
    """Otherwise a reference could probe which files exist outside the roots."""
    assert fetch_error("file:///no/such/dir/x.jpeg", policy) is ErrorCode.FORBIDDEN_URI
    assert fetch_error(f"file://{root.parent}/outside/missing.jpeg", policy) is ErrorCode.FORBIDDEN_URI


def test_missing_file_inside_a_root_is_not_found(root: Path, policy: FetchPolicy) -> None:
    assert fetch_error((root / "sub" / "missing.jpeg").as_uri(), policy) is ErrorCode.NOT_FOUND


def test_directory_is_unsupported(root: Path, policy: FetchPolicy) -> None:
    error = caught_error(lambda: fetch((root / "sub").as_uri(), policy))
    assert error.code is ErrorCode.UNSUPPORTED_URI
    assert "directory" in error.reason
    assert fetch_error(root.as_uri(), policy) is ErrorCode.UNSUPPORTED_URI


def test_a_file_used_as_a_directory_is_not_found(root: Path, policy: FetchPolicy) -> None:
    assert fetch_error((root / "sub" / "image.jpeg" / "x.jpeg").as_uri(), policy) is ErrorCode.NOT_FOUND


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_fetch_failed(root: Path, policy: FetchPolicy) -> None:
    path = root / "locked.jpeg"
    path.write_bytes(b"x")
    path.chmod(0)
    try:
        assert fetch_error(path.as_uri(), policy) is ErrorCode.FETCH_FAILED
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    "uri",
    ["file://otherhost/etc/passwd", "file://evil.example.com/data/x.jpeg", "file://127.0.0.1/data/x.jpeg"],
)
def test_file_uri_naming_a_remote_host_is_forbidden(uri: str, policy: FetchPolicy) -> None:
    assert fetch_error(uri, policy) is ErrorCode.FORBIDDEN_URI


def test_query_or_fragment_is_unsupported(root: Path, policy: FetchPolicy) -> None:
    uri = (root / "sub" / "image.jpeg").as_uri()
    assert fetch_error(uri + "?version=2", policy) is ErrorCode.UNSUPPORTED_URI
    assert fetch_error(uri + "#frame1", policy) is ErrorCode.UNSUPPORTED_URI


@pytest.mark.parametrize("uri", ["file:relative/x.jpeg", "file:", "file://", "file://localhost", "file:///a%00b"])
def test_relative_or_odd_file_uris_are_unsupported(uri: str, policy: FetchPolicy) -> None:
    assert fetch_error(uri, policy) is ErrorCode.UNSUPPORTED_URI


@pytest.mark.parametrize(
    "uri",
    ["ftp://host/x.dcm", "s3://bucket/x.jpeg", "gs://b/x", "data:image/png;base64,AAAA", "/abs/path.jpeg", "x.jpeg"],
)
def test_other_schemes_are_unsupported(uri: str, policy: FetchPolicy) -> None:
    assert fetch_error(uri, policy) is ErrorCode.UNSUPPORTED_URI


def test_size_limit_is_inclusive(root: Path) -> None:
    path = root / "sized.bin"
    path.write_bytes(b"a" * 1000)
    assert fetch(path.as_uri(), FetchPolicy(allowed_roots=(root,), max_bytes=1000)) == b"a" * 1000
    too_small = FetchPolicy(allowed_roots=(root,), max_bytes=999)
    assert fetch_error(path.as_uri(), too_small) is ErrorCode.TOO_LARGE


def test_resolve_file_uri_returns_the_real_path(root: Path, policy: FetchPolicy) -> None:
    assert resolve_file_uri(f"file://{root}/sub/./x/../image.jpeg", policy) == root / "sub" / "image.jpeg"


# ------------------------------------------------------------------------------ special files, size, deadline


@pytest.fixture
def opened_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path `os.open` is called with from now on (the calls still go through)."""
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return opened


def lstat_says_regular(monkeypatch: pytest.MonkeyPatch, target: Path, regular: Path) -> None:
    """Make `os.lstat(target)` report a regular file, as if `target` was swapped after the check."""
    real_lstat = os.lstat
    regular_stat = real_lstat(regular)

    def fake(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return regular_stat if os.fspath(path) == str(target) else real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", fake)


def test_a_fifo_is_refused_promptly_without_being_opened(
    root: Path, policy: FetchPolicy, opened_paths: list[str]
) -> None:
    """Opening a FIFO without a writer blocks forever; it is never opened."""
    fifo = root / "pipe.jpeg"
    os.mkfifo(fifo)
    try:
        outcome = run_bounded(lambda: fetch(fifo.as_uri(), policy), timeout_s=5)
        opened_by_fetch = list(opened_paths)
    finally:  # should the fetch be blocked in open(), a writer releases it
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(outcome, FetchError)
    assert outcome.code is ErrorCode.UNSUPPORTED_URI
    assert outcome.reason == "the URI names a FIFO, not a regular file"
    assert str(fifo) not in opened_by_fetch


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_special_file_that_passes_lstat_is_caught_by_fstat(
    root: Path, policy: FetchPolicy, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The race: a regular file at lstat, a FIFO (or directory) at open. The open must not block."""
    target = root / "swapped.jpeg"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    lstat_says_regular(monkeypatch, target, root / "sub" / "image.jpeg")
    try:
        outcome = run_bounded(lambda: fetch(target.as_uri(), policy), timeout_s=5)
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(outcome, FetchError)
    assert outcome.code is ErrorCode.UNSUPPORTED_URI
    assert kind.upper() in outcome.reason.upper()


@pytest.fixture
def unix_socket_file(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A listening Unix socket inside the root (bound by a relative name: socket paths are short)."""
    monkeypatch.chdir(root)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind("scan.sock")
        server.listen()
        yield root / "scan.sock"


def test_a_unix_socket_file_is_unsupported(
    unix_socket_file: Path, policy: FetchPolicy, opened_paths: list[str]
) -> None:
    error = caught_error(lambda: fetch(unix_socket_file.as_uri(), policy))
    assert error.code is ErrorCode.UNSUPPORTED_URI
    assert error.reason == "the URI names a socket, not a regular file"
    assert str(unix_socket_file) not in opened_paths


def test_a_unix_socket_that_passes_lstat_fails_to_open_as_unsupported(
    unix_socket_file: Path, root: Path, policy: FetchPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open() of a socket file gives ENXIO."""
    lstat_says_regular(monkeypatch, unix_socket_file, root / "sub" / "image.jpeg")
    assert fetch_error(unix_socket_file.as_uri(), policy) is ErrorCode.UNSUPPORTED_URI


@pytest.mark.parametrize(
    ("kind", "mode", "device", "name"),
    [
        ("char", stat.S_IFCHR, os.makedev(1, 5), "a character device"),  # what /dev/zero is: never ends
        ("block", stat.S_IFBLK, os.makedev(7, 0), "a block device"),  # a loop device
    ],
)
def test_a_device_file_is_unsupported_without_being_opened(
    root: Path, policy: FetchPolicy, opened_paths: list[str], kind: str, mode: int, device: int, name: str
) -> None:
    node = root / f"{kind}.jpeg"
    os.mknod(node, mode | 0o600, device)  # the tests run as root; a PermissionError here is a failure
    error = caught_error(lambda: fetch(node.as_uri(), policy))
    assert error.code is ErrorCode.UNSUPPORTED_URI
    assert error.reason == f"the URI names {name}, not a regular file"
    assert str(node) not in opened_paths


@pytest.fixture
def read_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes asked of `os.read` from now on (the calls still go through)."""
    calls: list[int] = []
    real_read = os.read

    def spy(fd: int, size: int) -> bytes:
        calls.append(size)
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", spy)
    return calls


def test_a_file_over_the_limit_is_refused_without_being_read(root: Path, read_calls: list[int]) -> None:
    huge = root / "huge.dcm"
    with huge.open("wb") as handle:
        handle.truncate(8 * 1024**3)  # sparse: 8 GiB that take no disk and would take long to read
    started = time.monotonic()
    assert fetch_error(huge.as_uri(), FetchPolicy(allowed_roots=(root,))) is ErrorCode.TOO_LARGE
    assert time.monotonic() - started < 1
    assert read_calls == []


def test_a_file_that_grows_past_the_limit_while_read_is_too_large(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = root / "growing.dcm"
    path.write_bytes(b"g" * 5000)
    real_fstat = os.fstat

    def stale_fstat(fd: int) -> os.stat_result:  # the size as it was before the file grew
        values = list(real_fstat(fd))
        values[stat.ST_SIZE] = 10
        return os.stat_result(values)

    monkeypatch.setattr(os, "fstat", stale_fstat)
    assert fetch_error(path.as_uri(), FetchPolicy(allowed_roots=(root,), max_bytes=1000)) is ErrorCode.TOO_LARGE


def test_a_large_file_is_read_in_chunks(root: Path, read_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_module, "_CHUNK_BYTES", 1000)
    path = root / "chunked.dcm"
    path.write_bytes(BINARY * 4)
    assert fetch(path.as_uri(), FetchPolicy(allowed_roots=(root,))) == BINARY * 4
    assert len(read_calls) > 3
    assert max(read_calls) <= 1000


def test_the_deadline_is_checked_between_chunks(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_module, "_CHUNK_BYTES", 16)
    real_read = os.read
    calls: list[int] = []

    def slow_read(fd: int, size: int) -> bytes:  # a slow disk: 50 ms a chunk
        calls.append(size)
        time.sleep(0.05)
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", slow_read)
    path = root / "slow.dcm"
    path.write_bytes(b"s" * 1600)  # 100 chunks: 5 s at that pace
    started = time.monotonic()
    assert fetch_error(path.as_uri(), FetchPolicy(allowed_roots=(root,)), deadline=started + 0.3) is (ErrorCode.TIMEOUT)
    assert time.monotonic() - started < 1
    assert len(calls) < 15


def test_a_deadline_already_past_is_a_timeout_for_files(root: Path, policy: FetchPolicy) -> None:
    path = root / "sub" / "image.jpeg"
    assert fetch_error(path.as_uri(), policy, deadline=time.monotonic() - 1) is ErrorCode.TIMEOUT
    assert fetch(path.as_uri(), policy, deadline=time.monotonic() + 10) == path.read_bytes()


# ---------------------------------------------------------------------------------------------- host_allowed


@pytest.mark.parametrize(
    ("netloc", "scheme", "allowed", "expected"),
    [
        ("pacs.local:8042", "http", ("pacs.local",), True),
        ("pacs.local", "http", ("pacs.local",), True),
        ("pacs.local:8042", "http", ("pacs.local:8042",), True),
        ("pacs.local:8043", "http", ("pacs.local:8042",), False),
        ("pacs.local", "http", ("pacs.local:8042",), False),
        ("pacs.local", "http", ("pacs.local:80",), True),
        ("pacs.local", "https", ("pacs.local:443",), True),
        ("pacs.local", "https", ("pacs.local:80",), False),
        ("pacs.local", "http", ("pacs.local:443",), False),
        ("pacs.local:80", "http", ("pacs.local:80",), True),
        ("PACS.Local:8042", "http", ("pacs.local",), True),
        ("other.local:8042", "http", ("pacs.local",), False),
        ("pacs.local.evil.com", "http", ("pacs.local",), False),
        ("evilpacs.local", "http", ("pacs.local",), False),
        ("127.0.0.1:8042", "http", ("127.0.0.1:8042", "pacs.local"), True),
        ("[::1]:8042", "http", ("[::1]",), True),
        ("[::1]:8042", "http", ("[::1]:8042",), True),
        ("[::1]", "http", ("[::1]:80",), True),
        ("pacs.local", "http", (), False),
    ],
)
def test_host_allowed(netloc: str, scheme: str, allowed: tuple[str, ...], expected: bool) -> None:
    assert host_allowed(netloc, scheme, allowed) is expected


# --------------------------------------------------------------------------------------------- DICOMweb


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: Sent verbatim instead of a well-formed answer, then the connection is closed.
    raw: bytes | None = None


class CountingServer(ThreadingHTTPServer):
    """Counts the TCP connections it accepts, so a test can prove a URL never reached it."""

    connections = 0

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1
        return True


@dataclass
class FakePacs:
    """A loopback HTTP server answering each path with a canned reply, recording the requests it got."""

    server: CountingServer
    replies: dict[str, Reply] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return self.server.connections

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"


INSTANCE = "/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"


@pytest.fixture(scope="module")
def pacs_server() -> Iterator[FakePacs]:
    state: dict[str, FakePacs] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake = state["pacs"]
            fake.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            reply = fake.replies.get(self.path, Reply(404, b"no such instance"))
            if reply.delay_s:
                time.sleep(reply.delay_s)
            if reply.raw is not None:
                self.wfile.write(reply.raw)
                self.close_connection = True
                return
            self.send_response(reply.status)
            headers = {"Content-Length": str(len(reply.body)), **reply.headers}
            for name, value in headers.items():
                if value:
                    self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(reply.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = CountingServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state["pacs"] = FakePacs(server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state["pacs"]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def pacs(pacs_server: FakePacs) -> FakePacs:
    pacs_server.replies.clear()
    pacs_server.requests.clear()
    pacs_server.server.connections = 0
    return pacs_server


def web_policy(pacs: FakePacs, **kwargs: object) -> FetchPolicy:
    return FetchPolicy(dicomweb_hosts=(pacs.host,), timeout_s=5.0, **kwargs)  # type: ignore[arg-type]


def multipart(*parts: bytes, boundary: str = "cxr-b0undary") -> tuple[bytes, str]:
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_multipart_answer_gives_the_first_part(pacs: FakePacs) -> None:
    body, content_type = multipart(BINARY, b"second part")
    pacs.replies[INSTANCE] = Reply(body=body, headers={"Content-Type": content_type})
    assert fetch(pacs.url(INSTANCE), web_policy(pacs)) == BINARY
    path, headers = pacs.requests[0]
    assert path == INSTANCE
    assert headers["accept"].startswith("multipart/related")
    assert "application/dicom" in headers["accept"]
    assert "authorization" not in headers


def test_plain_dicom_answer_gives_the_body(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(body=BINARY, headers={"Content-Type": "application/dicom"})
    assert fetch(pacs.url(INSTANCE), web_policy(pacs)) == BINARY


def test_trailing_slash_instance_path_is_accepted(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE + "/"] = Reply(body=b"abc", headers={"Content-Type": "application/dicom"})
    assert fetch(pacs.url(INSTANCE + "/"), web_policy(pacs)) == b"abc"


def test_bearer_token_is_sent_when_configured(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(body=b"abc", headers={"Content-Type": "application/dicom"})
    fetch(pacs.url(INSTANCE), web_policy(pacs, authorization="Bearer s3cret-token"))
    assert pacs.requests[0][1]["authorization"] == "Bearer s3cret-token"


def test_token_is_not_in_the_policy_repr() -> None:
    assert "s3cret" not in repr(FetchPolicy(authorization="Bearer s3cret"))


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (404, ErrorCode.NOT_FOUND),
        (403, ErrorCode.FORBIDDEN_URI),
        (401, ErrorCode.FORBIDDEN_URI),
        (410, ErrorCode.FETCH_FAILED),
        (500, ErrorCode.FETCH_FAILED),
        (501, ErrorCode.FETCH_FAILED),
        (400, ErrorCode.FETCH_FAILED),
        (300, ErrorCode.FETCH_FAILED),
        (429, ErrorCode.UNAVAILABLE),
        (502, ErrorCode.UNAVAILABLE),
        (503, ErrorCode.UNAVAILABLE),
        (504, ErrorCode.UNAVAILABLE),
    ],
)
def test_http_errors_map_to_codes(pacs: FakePacs, status: int, code: ErrorCode) -> None:
    pacs.replies[INSTANCE] = Reply(status=status, body=b"nope")
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs)) is code


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed(pacs: FakePacs, status: int) -> None:
    target = "/dicom-web/studies/9/series/9/instances/9"
    pacs.replies[target] = Reply(body=b"should never be read", headers={"Content-Type": "application/dicom"})
    pacs.replies[INSTANCE] = Reply(status=status, headers={"Location": f"http://evil.example.com{target}"})
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs)) is ErrorCode.FORBIDDEN_URI
    # Not even a redirect back to the same, allowed server is followed.
    pacs.replies[INSTANCE] = Reply(status=status, headers={"Location": pacs.url(target)})
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs)) is ErrorCode.FORBIDDEN_URI
    assert [path for path, _ in pacs.requests] == [INSTANCE, INSTANCE]


def test_declared_content_length_over_the_limit_is_too_large(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(body=b"x" * 2048, headers={"Content-Type": "application/dicom"})
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs, max_bytes=1024)) is ErrorCode.TOO_LARGE
    assert fetch(pacs.url(INSTANCE), web_policy(pacs, max_bytes=2048)) == b"x" * 2048


def test_body_over_the_limit_without_content_length_is_too_large(pacs: FakePacs) -> None:
    # A lying Content-Length would make http.client stop early, so send none and close the connection.
    pacs.replies[INSTANCE] = Reply(
        body=b"x" * 4096, headers={"Content-Type": "application/dicom", "Content-Length": "", "Connection": "close"}
    )
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs, max_bytes=1024)) is ErrorCode.TOO_LARGE


def test_slow_server_times_out(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(body=b"late", delay_s=1.0)
    policy = FetchPolicy(dicomweb_hosts=(pacs.host,), timeout_s=0.2)
    error = caught_error(lambda: fetch(pacs.url(INSTANCE), policy))
    assert error.code is ErrorCode.TIMEOUT
    assert error.reason == "the DICOMweb request took longer than 0.2 s"


def test_refused_connection_is_unavailable() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    policy = FetchPolicy(dicomweb_hosts=("127.0.0.1",), timeout_s=5.0)
    assert fetch_error(f"http://127.0.0.1:{port}{INSTANCE}", policy) is ErrorCode.UNAVAILABLE


def test_body_shorter_than_its_content_length_is_fetch_failed(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"y" * 10)
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs)) is ErrorCode.FETCH_FAILED


def test_a_server_closing_without_an_answer_is_unavailable(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(raw=b"")
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs)) is ErrorCode.UNAVAILABLE


# ------------------------------------------------------------------------------------- DICOMweb: time bounds


def test_a_slow_drip_ends_at_the_deadline() -> None:
    """Headers, then one byte every 0.5 s forever: each read is quick, the whole never ends by itself."""
    with MisbehavingServer(drips_body(0.5)) as server:
        policy = FetchPolicy(dicomweb_hosts=(f"127.0.0.1:{server.port}",), timeout_s=30.0)
        started = time.monotonic()
        error = caught_error(lambda: fetch(server.url(INSTANCE), policy, deadline=started + 2.0))
        elapsed = time.monotonic() - started
    assert error.code is ErrorCode.TIMEOUT
    assert error.reason == "the DICOMweb request ran past the deadline"
    assert 1.9 <= elapsed < 3.0


def test_a_slow_drip_ends_within_timeout_s_without_a_deadline() -> None:
    with MisbehavingServer(drips_body(0.2)) as server:
        policy = FetchPolicy(dicomweb_hosts=(f"127.0.0.1:{server.port}",), timeout_s=1.0)
        started = time.monotonic()
        assert fetch_error(server.url(INSTANCE), policy) is ErrorCode.TIMEOUT
        assert time.monotonic() - started < 2.0


def test_headers_dripping_forever_end_at_the_deadline() -> None:
    """A drip inside the status line or headers is read by http.client, line by line: the watchdog ends it."""
    with MisbehavingServer(drips_headers(0.1)) as server:
        policy = FetchPolicy(dicomweb_hosts=(f"127.0.0.1:{server.port}",), timeout_s=30.0)
        started = time.monotonic()
        assert fetch_error(server.url(INSTANCE), policy, deadline=started + 1.0) is ErrorCode.TIMEOUT
        assert time.monotonic() - started < 2.0


def test_a_server_that_never_answers_times_out_within_the_budget() -> None:
    with MisbehavingServer(never_answers) as server:
        policy = FetchPolicy(dicomweb_hosts=(f"127.0.0.1:{server.port}",), timeout_s=0.5)
        started = time.monotonic()
        assert fetch_error(server.url(INSTANCE), policy) is ErrorCode.TIMEOUT
        assert time.monotonic() - started < 1.5
        assert server.connections == 1


def test_a_deadline_already_past_is_a_timeout_without_connecting(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(body=b"abc", headers={"Content-Type": "application/dicom"})
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs), deadline=time.monotonic() - 1) is ErrorCode.TIMEOUT
    assert pacs.connections == 0
    assert fetch(pacs.url(INSTANCE), web_policy(pacs), deadline=time.monotonic() + 10) == b"abc"


def test_https_to_a_plain_http_server_fails_quickly(pacs: FakePacs) -> None:
    started = time.monotonic()
    assert fetch_error(f"https://{pacs.host}{INSTANCE}", web_policy(pacs)) is ErrorCode.FETCH_FAILED
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n" + b"x" * 20,
        b"SPEAKING NOT HTTP\r\n\r\n",
    ],
    ids=["truncated-chunked-body", "bad-status-line"],
)
def test_malformed_answers_are_fetch_failed(pacs: FakePacs, raw: bytes) -> None:
    pacs.replies[INSTANCE] = Reply(raw=raw)
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs)) is ErrorCode.FETCH_FAILED


def test_multipart_without_parts_is_fetch_failed(pacs: FakePacs) -> None:
    body, content_type = multipart()
    pacs.replies[INSTANCE] = Reply(body=body, headers={"Content-Type": content_type})
    assert fetch_error(pacs.url(INSTANCE), web_policy(pacs)) is ErrorCode.FETCH_FAILED


@pytest.mark.parametrize("userinfo", ["user:pass@", "user@", ":token@"])
def test_credentials_in_the_url_are_forbidden(pacs: FakePacs, userinfo: str) -> None:
    pacs.replies[INSTANCE] = Reply(body=b"abc", headers={"Content-Type": "application/dicom"})
    uri = f"http://{userinfo}{pacs.host}{INSTANCE}"
    assert fetch_error(uri, web_policy(pacs)) is ErrorCode.FORBIDDEN_URI
    assert pacs.requests == []


@pytest.mark.parametrize(
    "path",
    [
        "/dicom-web/studies/1.2.3",
        "/dicom-web/studies/1.2.3/series/1.2.3.4",
        "/dicom-web/studies/1.2.3/series/1.2.3.4/instances",
        INSTANCE + "/frames/1",
        INSTANCE + "/rendered",
        "/image.jpeg",
    ],
)
def test_non_instance_paths_are_unsupported(pacs: FakePacs, path: str) -> None:
    assert fetch_error(pacs.url(path), web_policy(pacs)) is ErrorCode.UNSUPPORTED_URI
    assert pacs.requests == []


def test_host_not_in_the_allow_list_is_forbidden(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(body=b"abc", headers={"Content-Type": "application/dicom"})
    assert fetch_error(pacs.url(INSTANCE), FetchPolicy()) is ErrorCode.FORBIDDEN_URI
    other_port = FetchPolicy(dicomweb_hosts=("127.0.0.1:1",))
    assert fetch_error(pacs.url(INSTANCE), other_port) is ErrorCode.FORBIDDEN_URI
    assert fetch_error(f"http://localhost:{pacs.server.server_address[1]}{INSTANCE}", web_policy(pacs)) is (
        ErrorCode.FORBIDDEN_URI
    )
    assert pacs.requests == []
    # The bare host admits any port.
    assert fetch(pacs.url(INSTANCE), FetchPolicy(dicomweb_hosts=("127.0.0.1",))) == b"abc"


def test_the_allow_list_is_case_insensitive(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(body=b"abc", headers={"Content-Type": "application/dicom"})
    policy = FetchPolicy(dicomweb_hosts=(" PACS.Test ",))
    assert host_allowed("pacs.test:8042", "http", policy.dicomweb_hosts)
    assert host_allowed("Pacs.TEST", "https", policy.dicomweb_hosts)


# ------------------------------------------------------------------------------------------ DICOMweb: SSRF

FORBIDDEN, UNSUPPORTED = ErrorCode.FORBIDDEN_URI, ErrorCode.UNSUPPORTED_URI

#: Each names the loopback server that IS allow-listed (as 127.0.0.1:{port}), or a place it must never reach,
#: in a spelling the allow-list does not literally name.
HOSTILE_URLS: list[tuple[str, str, ErrorCode]] = [
    ("decimal", "http://2130706433:{port}{path}", FORBIDDEN),
    ("hex", "http://0x7f000001:{port}{path}", FORBIDDEN),
    ("hex-upper", "http://0X7F000001:{port}{path}", FORBIDDEN),
    ("hex-dotted", "http://0x7f.0.0.1:{port}{path}", FORBIDDEN),
    ("octal", "http://0177.0.0.1:{port}{path}", FORBIDDEN),
    ("leading-zeros", "http://127.000.000.001:{port}{path}", FORBIDDEN),
    ("short-two", "http://127.1:{port}{path}", FORBIDDEN),
    ("short-three", "http://127.0.1:{port}{path}", FORBIDDEN),
    ("five-parts", "http://127.0.0.0.1:{port}{path}", FORBIDDEN),
    ("zero", "http://0:{port}{path}", FORBIDDEN),
    ("trailing-dot", "http://127.0.0.1.:{port}{path}", FORBIDDEN),
    ("percent-encoded", "http://%31%32%37.0.0.1:{port}{path}", FORBIDDEN),
    ("percent-encoded-dot", "http://127%2E0.0.1:{port}{path}", FORBIDDEN),
    ("fullwidth-digits", "http://\uff11\uff12\uff17.0.0.1:{port}{path}", FORBIDDEN),
    ("ipv4-mapped", "http://[::ffff:127.0.0.1]:{port}{path}", FORBIDDEN),
    ("ipv4-mapped-hex", "http://[::ffff:7f00:1]:{port}{path}", FORBIDDEN),
    ("ipv4-mapped-upper", "http://[::FFFF:7F00:1]:{port}{path}", FORBIDDEN),
    ("ipv4-mapped-long", "http://[0:0:0:0:0:ffff:7f00:1]:{port}{path}", FORBIDDEN),
    ("ipv4-compatible", "http://[::127.0.0.1]:{port}{path}", FORBIDDEN),
    ("ipv4-compatible-hex", "http://[::7f00:1]:{port}{path}", FORBIDDEN),
    ("nat64", "http://[64:ff9b::7f00:1]:{port}{path}", FORBIDDEN),
    ("zone-id", "http://[fe80::1%25lo]:{port}{path}", FORBIDDEN),
    ("zone-id-loopback", "http://[::1%25lo]:{port}{path}", FORBIDDEN),
    ("ipv6-loopback", "http://[::1]:{port}{path}", FORBIDDEN),
    ("ipv6-loopback-long", "http://[0:0:0:0:0:0:0:1]:{port}{path}", FORBIDDEN),
    ("ipv6-unspecified", "http://[::]:{port}{path}", FORBIDDEN),
    ("ipvfuture", "http://[v1.x]:{port}{path}", FORBIDDEN),
    ("localhost", "http://localhost:{port}{path}", FORBIDDEN),
    ("localhost-dot", "http://localhost.:{port}{path}", FORBIDDEN),
    ("unspecified", "http://0.0.0.0:{port}{path}", FORBIDDEN),
    ("metadata", "http://169.254.169.254{path}", FORBIDDEN),
    ("metadata-on-port", "http://169.254.169.254:{port}{path}", FORBIDDEN),
    ("metadata-decimal", "http://2852039166{path}", FORBIDDEN),
    ("metadata-ipv6", "http://[fd00:ec2::254]{path}", FORBIDDEN),
    ("metadata-name", "http://metadata.google.internal{path}", FORBIDDEN),
    ("credentials", "http://user:pass@127.0.0.1:{port}{path}", FORBIDDEN),
    ("user-only", "http://user@127.0.0.1:{port}{path}", FORBIDDEN),
    ("empty-userinfo", "http://@127.0.0.1:{port}{path}", FORBIDDEN),
    ("allowed-host-as-userinfo", "http://127.0.0.1:{port}@evil.example{path}", FORBIDDEN),
    ("backslash-userinfo", "http://127.0.0.1:{port}\\@evil.example{path}", FORBIDDEN),
    ("other-port", "http://127.0.0.1:{other_port}{path}", FORBIDDEN),
    ("https-other-scheme-port", "https://127.0.0.1{path}", FORBIDDEN),
    ("port-zero", "http://127.0.0.1:0{path}", FORBIDDEN),
    ("port-too-big", "http://127.0.0.1:65536{path}", FORBIDDEN),
    ("port-huge", "http://127.0.0.1:{port}00000{path}", FORBIDDEN),
    ("port-leading-zero", "http://127.0.0.1:0{port}{path}", FORBIDDEN),
    ("port-plus", "http://127.0.0.1:+{port}{path}", FORBIDDEN),
    ("port-negative", "http://127.0.0.1:-1{path}", FORBIDDEN),
    ("port-empty", "http://127.0.0.1:{path}", FORBIDDEN),
    ("port-twice", "http://127.0.0.1:{port}:{port}{path}", FORBIDDEN),
    ("port-space", "http://127.0.0.1: {port}{path}", FORBIDDEN),
    ("port-arabic-digits", "http://127.0.0.1:\u0668\u0660{path}", FORBIDDEN),
    ("port-hex", "http://127.0.0.1:0x50{path}", FORBIDDEN),
    ("bracketed-ipv4", "http://[127.0.0.1]:{port}{path}", UNSUPPORTED),
    ("unclosed-bracket", "http://[::1:{port}{path}", UNSUPPORTED),
    ("no-host", "http://:{port}{path}", UNSUPPORTED),
    ("empty-authority", "http://{path}", UNSUPPORTED),
    ("not-an-instance", "http://127.0.0.1:{port}/dicom-web/studies/1.2.3", UNSUPPORTED),
    ("raw-space-in-path", "http://127.0.0.1:{port}/dicom-web/studies/1 2/series/3/instances/4", UNSUPPORTED),
    ("non-ascii-path", "http://127.0.0.1:{port}/dicom-web/studies/\u00fc/series/3/instances/4", UNSUPPORTED),
]


@pytest.mark.parametrize(
    ("template", "code"), [(t, c) for _, t, c in HOSTILE_URLS], ids=[n for n, _, _ in HOSTILE_URLS]
)
def test_hostile_dicomweb_urls_never_reach_a_server(pacs: FakePacs, template: str, code: ErrorCode) -> None:
    pacs.replies[INSTANCE] = Reply(body=b"abc", headers={"Content-Type": "application/dicom"})
    uri = template.format(port=pacs.port, other_port=pacs.port + 1 if pacs.port < 65535 else 1, path=INSTANCE)
    error = caught_error(lambda: fetch(uri, web_policy(pacs)))
    assert error.code is code, error.reason
    assert pacs.connections == 0
    assert pacs.requests == []


@pytest.mark.parametrize(
    "host",
    ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "127.0.0.1.", "[::ffff:127.0.0.1]", "[::7f00:1]", "0"],
)
def test_a_non_canonical_spelling_is_refused_even_when_the_allow_list_names_it(pacs: FakePacs, host: str) -> None:
    """The spelling rules hold on their own: an allow-list entry cannot admit what a resolver reads differently."""
    policy = FetchPolicy(dicomweb_hosts=(host, f"{host}:{pacs.port}"), timeout_s=5.0)
    assert fetch_error(f"http://{host}:{pacs.port}{INSTANCE}", policy) is ErrorCode.FORBIDDEN_URI
    assert pacs.connections == 0


def test_the_canonical_url_of_the_same_server_is_fetched(pacs: FakePacs) -> None:
    """The control for the table above: the allow-listed server does answer."""
    pacs.replies[INSTANCE] = Reply(body=b"abc", headers={"Content-Type": "application/dicom"})
    assert fetch(f"HTTP://127.0.0.1:{pacs.port}{INSTANCE}", web_policy(pacs)) == b"abc"
    assert pacs.connections == 1


@dataclass
class FakeDns:
    """Name → addresses, answered by a patched `socket.getaddrinfo`; other names go to the real resolver."""

    records: dict[str, list[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    #: names whose lookup blocks until `release` is set
    hanging: set[str] = field(default_factory=set)
    failing: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDns]:
    fake = FakeDns()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host in fake.hanging:
            fake.release.wait(10)
        if host in fake.failing:
            raise socket.gaierror(fake.failing[host], "fake resolver failure")
        if host not in fake.records:
            return real(host, port, *args, **kwargs)
        fake.lookups.append(host)
        answers: list[Any] = []
        for address in fake.records[host]:
            if ":" in address:
                answers.append((socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port, 0, 0)))
            else:
                answers.append((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port)))
        return answers

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield fake
    fake.release.set()


def test_a_name_is_resolved_once_and_its_address_pinned(pacs: FakePacs, dns: FakeDns) -> None:
    """The connection goes to the vetted address; the Host header keeps the name."""
    pacs.replies[INSTANCE] = Reply(body=b"abc", headers={"Content-Type": "application/dicom"})
    dns.records["pacs.test"] = ["127.0.0.1"]
    policy = FetchPolicy(dicomweb_hosts=("pacs.test",), timeout_s=5.0)
    assert fetch(f"http://PACS.test:{pacs.port}{INSTANCE}", policy) == b"abc"
    assert dns.lookups == ["pacs.test"]
    assert pacs.requests[0][1]["host"] == f"pacs.test:{pacs.port}"


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.170.2",
        "169.254.1.1",
        "fd00:ec2::254",
        "100.100.100.200",
        "fe80::1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "240.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
    ],
)
def test_a_name_resolving_to_a_dangerous_address_is_forbidden(pacs: FakePacs, dns: FakeDns, address: str) -> None:
    """Any one bad address among the answers is enough: DNS answers can rotate."""
    dns.records["pacs.test"] = ["127.0.0.1", address]
    policy = FetchPolicy(dicomweb_hosts=("pacs.test",), timeout_s=5.0)
    error = caught_error(lambda: fetch(f"http://pacs.test:{pacs.port}{INSTANCE}", policy))
    assert error.code is ErrorCode.FORBIDDEN_URI
    assert error.reason.startswith("the DICOMweb host resolves to ")
    assert pacs.connections == 0


def test_a_hanging_name_lookup_ends_at_the_deadline(pacs: FakePacs, dns: FakeDns) -> None:
    dns.hanging.add("slow-dns.test")
    policy = FetchPolicy(dicomweb_hosts=("slow-dns.test",), timeout_s=30.0)
    started = time.monotonic()
    uri = f"http://slow-dns.test:{pacs.port}{INSTANCE}"
    assert fetch_error(uri, policy, deadline=started + 0.5) is ErrorCode.TIMEOUT
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("failure", "code"), [(socket.EAI_NONAME, ErrorCode.FETCH_FAILED), (socket.EAI_AGAIN, ErrorCode.UNAVAILABLE)]
)
def test_name_lookup_failures(dns: FakeDns, failure: int, code: ErrorCode) -> None:
    dns.failing["gone.test"] = failure
    policy = FetchPolicy(dicomweb_hosts=("gone.test",), timeout_s=5.0)
    assert fetch_error(f"http://gone.test{INSTANCE}", policy) is code


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.5", "192.168.1.10", "fd12:3456::1", "8.8.8.8"],
)
def test_loopback_private_and_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address), 8042, ("pacs.test",)) is None


def test_an_address_the_allow_list_names_literally_is_allowed() -> None:
    metadata = ipaddress.ip_address("169.254.169.254")
    assert address_refusal(metadata, 80, ("pacs.test",)) == "a cloud metadata address"
    assert address_refusal(metadata, 80, ("169.254.169.254",)) is None
    assert address_refusal(metadata, 80, ("169.254.169.254:80",)) is None
    assert address_refusal(metadata, 81, ("169.254.169.254:80",)) is not None
    link_local6 = ipaddress.ip_address("fe80::5")
    assert address_refusal(link_local6, 80, ("[fe80::5]",)) is None
    assert address_refusal(link_local6, 80, ("[fe80::6]",)) == "a link-local address"


def test_dicomweb_target_keeps_what_the_request_needs() -> None:
    target = dicomweb_target(f"https://[fd12::1]:8443{INSTANCE}?x=1#frag", ("[fd12::1]",))
    assert (target.tls, target.host, target.port, target.netloc) == (True, "fd12::1", 8443, "[fd12::1]:8443")
    assert target.request_target == f"{INSTANCE}?x=1"
    assert target.literal == ipaddress.ip_address("fd12::1")
    named = dicomweb_target(f"http://Pacs.Test{INSTANCE}", ("pacs.test",))
    assert (named.host, named.port, named.netloc, named.literal) == ("pacs.test", 80, "pacs.test", None)


# ------------------------------------------------------------------------------------------- DICOMweb: TLS


@pytest.fixture
def trusted_tls(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[MisbehavingServer, list[str], list[bytes]]]:
    made = self_signed_certificate(tmp_path_factory.mktemp("tls"), "pacs.test")
    assert made is not None, "the openssl command is needed for the TLS tests (Debian: openssl)"
    cert, key = made
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    server_names: list[str] = []

    def record_server_name(_tls: Any, name: str, _context: ssl.SSLContext) -> None:
        server_names.append(name)

    server_context.sni_callback = record_server_name
    heads: list[bytes] = []
    monkeypatch.setattr(fetch_module, "_tls_context", lambda: ssl.create_default_context(cafile=str(cert)))
    with MisbehavingServer(answers_over_tls(server_context, BINARY, heads)) as server:
        yield server, server_names, heads


def test_https_is_pinned_and_verified_against_the_host_name(
    trusted_tls: tuple[MisbehavingServer, list[str], list[bytes]], dns: FakeDns
) -> None:
    server, server_names, heads = trusted_tls
    dns.records["pacs.test"] = ["127.0.0.1"]
    policy = FetchPolicy(dicomweb_hosts=("pacs.test",), timeout_s=5.0)
    assert fetch(server.url(INSTANCE, scheme="https", host="pacs.test"), policy) == BINARY
    assert server_names == ["pacs.test"]
    assert f"\r\nHost: pacs.test:{server.port}\r\n".encode() in heads[0]
    assert dns.lookups == ["pacs.test"]


def test_https_with_a_certificate_for_another_name_fails(
    trusted_tls: tuple[MisbehavingServer, list[str], list[bytes]], dns: FakeDns
) -> None:
    server, _, heads = trusted_tls
    dns.records["other.test"] = ["127.0.0.1"]
    policy = FetchPolicy(dicomweb_hosts=("other.test",), timeout_s=5.0)
    error = caught_error(lambda: fetch(server.url(INSTANCE, scheme="https", host="other.test"), policy))
    assert error.code is ErrorCode.FETCH_FAILED
    assert "certificate" in error.reason
    assert heads == []


# ------------------------------------------------------------------------------------------------ first_part


def test_first_part_of_a_non_multipart_body_is_the_body() -> None:
    assert first_part(b"raw", "application/dicom") == b"raw"
    assert first_part(b"raw", "") == b"raw"


def test_first_part_skips_empty_parts_and_keeps_binary_exact() -> None:
    body, content_type = multipart(b"", BINARY)
    assert first_part(body, content_type) == BINARY


def test_first_part_with_quoted_boundary_and_upper_case_type() -> None:
    body, _ = multipart(b"payload", boundary="a:b=c")
    assert first_part(body, 'Multipart/Related; boundary="a:b=c"; type="application/dicom"') == b"payload"


def test_a_symlink_swapped_in_after_resolution_is_refused(tmp_path: Path) -> None:
    """The race: the path was checked while it was a plain file, then replaced by a symlink out."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"\x89PNG secret")
    swapped = root / "scan.png"
    swapped.symlink_to(outside / "secret.png")
    with pytest.raises(FetchError) as caught:
        read_file(swapped, 1024, (root.resolve(),))
    assert caught.value.code is ErrorCode.FORBIDDEN_URI


def test_a_directory_swapped_for_a_symlink_is_caught_by_the_descriptor_check(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "x.png").write_bytes(b"\x89PNG x")
    (root / "sub").symlink_to(outside)  # an intermediate component that now leads out
    with pytest.raises(FetchError) as caught:
        read_file(root / "sub" / "x.png", 1024, (root.resolve(),))
    assert caught.value.code is ErrorCode.FORBIDDEN_URI
