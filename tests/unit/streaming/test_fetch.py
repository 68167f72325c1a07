"""fetch: file:// only inside the allowed roots, DICOMweb only from allowed hosts, everything size-limited.

DICOMweb answers come from a real `http.server` on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from streaming.errors import ErrorCode, FetchError, Stage
from streaming.fetch import FetchPolicy, fetch, first_part, host_allowed, read_file, resolve_file_uri

BINARY = bytes(range(256)) * 3 + b"\r\n--not-a-boundary\r\n" + b"\x00\xff" * 10


def fetch_error(uri: str, policy: FetchPolicy) -> ErrorCode:
    with pytest.raises(FetchError) as caught:
        fetch(uri, policy)
    assert caught.value.stage is Stage.FETCH
    assert caught.value.reason
    return caught.value.code


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


def test_directory_is_not_found(root: Path, policy: FetchPolicy) -> None:
    assert fetch_error((root / "sub").as_uri(), policy) is ErrorCode.NOT_FOUND
    assert fetch_error(root.as_uri(), policy) is ErrorCode.NOT_FOUND


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


@dataclass
class FakePacs:
    """A loopback HTTP server answering each path with a canned reply, recording the requests it got."""

    server: ThreadingHTTPServer
    replies: dict[str, Reply] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

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

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
    fetch(pacs.url(INSTANCE), web_policy(pacs, dicomweb_token="s3cret-token"))
    assert pacs.requests[0][1]["authorization"] == "Bearer s3cret-token"


def test_token_is_not_in_the_policy_repr() -> None:
    assert "s3cret" not in repr(FetchPolicy(dicomweb_token="s3cret"))


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (404, ErrorCode.NOT_FOUND),
        (403, ErrorCode.FORBIDDEN_URI),
        (401, ErrorCode.FORBIDDEN_URI),
        (500, ErrorCode.FETCH_FAILED),
        (503, ErrorCode.FETCH_FAILED),
        (400, ErrorCode.FETCH_FAILED),
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


def test_slow_server_times_out_as_fetch_failed(pacs: FakePacs) -> None:
    pacs.replies[INSTANCE] = Reply(body=b"late", delay_s=1.0)
    policy = FetchPolicy(dicomweb_hosts=(pacs.host,), timeout_s=0.2)
    assert fetch_error(pacs.url(INSTANCE), policy) is ErrorCode.FETCH_FAILED


def test_unreachable_server_is_fetch_failed() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    policy = FetchPolicy(dicomweb_hosts=("127.0.0.1",), timeout_s=5.0)
    assert fetch_error(f"http://127.0.0.1:{port}{INSTANCE}", policy) is ErrorCode.FETCH_FAILED


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
