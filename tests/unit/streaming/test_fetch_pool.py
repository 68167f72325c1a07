"""DICOMweb retrieval: kept-alive connections reused per process, transient failures retried within the deadline.

Servers are `hostile_servers.KeepAliveServer`s on 127.0.0.1 that answer request after request on a script and
record which TCP connection carried each one, so a test sees reuse and reconnection from the server's side.
Everything that could block runs under a bound (deadlines, `timeout_s`, the module's pytest timeout).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

import streaming.fetch as fetch_module
from hostile_servers import KeepAliveServer, Turn, http_answer, self_signed_certificate
from streaming.errors import ErrorCode, FetchError
from streaming.fetch import FetchPolicy, close_idle_connections, fetch, idle_connections

pytestmark = pytest.mark.timeout(60)

INSTANCE = "/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
DICOM = {"Content-Type": "application/dicom"}
BODY = bytes(range(256)) * 4
SECRET = "Basic Y3hyOnN1cGVyLXNlY3JldC1wYXNzd29yZA=="  # cxr:super-secret-password


@pytest.fixture(autouse=True)
def fresh_pool() -> Iterator[None]:
    close_idle_connections()
    yield
    close_idle_connections()


def ok(body: bytes = BODY, **turn: Any) -> Turn:
    return Turn(http_answer(200, body, DICOM), **turn)


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"{}", **turn: Any) -> Turn:
    return Turn(http_answer(code, body, headers), **turn)


def always(turn: Turn) -> Callable[[int, bytes], Turn]:
    return lambda _n, _head: turn


def in_turn(*turns: Turn) -> Callable[[int, bytes], Turn]:
    """The n-th request gets the n-th turn; the last one repeats."""
    return lambda n, _head: turns[min(n, len(turns) - 1)]


@pytest.fixture
def serve() -> Iterator[Callable[..., KeepAliveServer]]:
    servers: list[KeepAliveServer] = []

    def start(script: Callable[[int, bytes], Turn], tls: ssl.SSLContext | None = None) -> KeepAliveServer:
        servers.append(KeepAliveServer(script, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def policy_for(server: KeepAliveServer, **kwargs: Any) -> FetchPolicy:
    return FetchPolicy(dicomweb_hosts=(f"127.0.0.1:{server.port}",), timeout_s=5.0, **kwargs)


def fetch_failure(uri: str, policy: FetchPolicy, deadline: float | None = None) -> FetchError:
    with pytest.raises(FetchError) as caught:
        fetch(uri, policy, deadline=deadline)
    return caught.value


# ------------------------------------------------------------------------------------------- reuse


def test_one_connection_carries_many_requests(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(always(ok()))
    policy = policy_for(server)
    for _ in range(20):
        assert fetch(server.url(INSTANCE), policy) == BODY
    assert server.connections == 1
    assert server.connections_used() == [1] * 20
    assert idle_connections() == 1


def test_connection_close_is_honoured(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(always(Turn(http_answer(200, BODY, {**DICOM, "Connection": "close"}), close=True)))
    for _ in range(3):
        assert fetch(server.url(INSTANCE), policy_for(server)) == BODY
    assert server.connections_used() == [1, 2, 3]
    assert idle_connections() == 0


def test_a_truncated_body_costs_its_connection(serve: Callable[..., KeepAliveServer]) -> None:
    """10 of 100 promised bytes, the connection held open: a timeout, and the connection is never reused."""
    truncated = Turn(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"y" * 10, hold=True)
    server = serve(in_turn(truncated, ok()))
    policy = FetchPolicy(dicomweb_hosts=(f"127.0.0.1:{server.port}",), timeout_s=0.5)
    assert fetch_failure(server.url(INSTANCE), policy).code is ErrorCode.TIMEOUT
    assert idle_connections() == 0
    assert fetch(server.url(INSTANCE), policy_for(server)) == BODY
    assert server.connections_used() == [1, 2]


def test_an_answer_refused_as_too_large_costs_its_connection(serve: Callable[..., KeepAliveServer]) -> None:
    """Its body was never read, so the next request on that connection would read it as a status line."""
    server = serve(in_turn(ok(b"x" * 2048), ok()))
    assert fetch_failure(server.url(INSTANCE), policy_for(server, max_bytes=1024)).code is ErrorCode.TOO_LARGE
    assert fetch(server.url(INSTANCE), policy_for(server, max_bytes=1024)) == BODY
    assert server.connections_used() == [1, 2]


def test_small_error_answers_keep_their_connection(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(in_turn(status(404), status(503), status(403), ok()))
    policy = policy_for(server)
    assert fetch_failure(server.url(INSTANCE), policy).code is ErrorCode.NOT_FOUND
    assert fetch_failure(server.url(INSTANCE), policy).code is ErrorCode.UNAVAILABLE
    assert fetch_failure(server.url(INSTANCE), policy).code is ErrorCode.FORBIDDEN_URI
    assert fetch(server.url(INSTANCE), policy) == BODY
    assert server.connections_used() == [1, 1, 1, 1]


def test_a_large_error_answer_is_not_read_and_costs_its_connection(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(in_turn(status(404, body=b"e" * (fetch_module._DRAIN_MAX_BYTES + 1)), ok()))
    assert fetch_failure(server.url(INSTANCE), policy_for(server)).code is ErrorCode.NOT_FOUND
    assert fetch(server.url(INSTANCE), policy_for(server)) == BODY
    assert server.connections_used() == [1, 2]


def test_a_connection_the_server_closed_while_idle_is_not_used(serve: Callable[..., KeepAliveServer]) -> None:
    """Servers drop idle keep-alive connections (Orthanc after about a second): seen before sending."""
    server = serve(always(ok(close=True)))  # closes without saying so
    policy = policy_for(server)
    assert fetch(server.url(INSTANCE), policy) == BODY
    time.sleep(0.2)  # the FIN arrives
    assert fetch(server.url(INSTANCE), policy) == BODY
    assert server.connections_used() == [1, 2]


def test_a_connection_closed_after_the_liveness_check_is_replaced(
    serve: Callable[..., KeepAliveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server closes just after the pool's check: the request goes out again, on a new connection."""
    monkeypatch.setattr(fetch_module, "_dropped", lambda sock: False)
    server = serve(always(ok(close=True)))
    policy = policy_for(server, retries=0)
    assert fetch(server.url(INSTANCE), policy) == BODY
    time.sleep(0.2)
    assert fetch(server.url(INSTANCE), policy) == BODY
    assert server.connections_used() == [1, 2]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_pooled_connection_dropped_with_the_request_in_flight_is_replaced_without_counting_as_a_retry(
    serve: Callable[..., KeepAliveServer], how: str
) -> None:
    """The keep-alive race: the server takes the request up, then closes (or resets) without a byte of answer."""
    server = serve(in_turn(ok(), Turn(close=how == "close", reset=how == "reset"), ok()))
    policy = policy_for(server, retries=0)
    assert fetch(server.url(INSTANCE), policy) == BODY
    assert fetch(server.url(INSTANCE), policy) == BODY
    assert server.connections_used() == [1, 1, 2]


def test_a_dead_pooled_connection_is_replaced_only_once(
    serve: Callable[..., KeepAliveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_module, "_dropped", lambda sock: False)
    server = serve(in_turn(ok(close=True), Turn(close=True)))  # then: every connection closed unanswered
    policy = policy_for(server, retries=0)
    assert fetch(server.url(INSTANCE), policy) == BODY
    time.sleep(0.2)
    assert fetch_failure(server.url(INSTANCE), policy).code is ErrorCode.UNAVAILABLE
    assert server.connections == 2


def test_a_watchdog_on_a_reused_connection_ends_a_drip_and_the_connection(
    serve: Callable[..., KeepAliveServer],
) -> None:
    drip = Turn(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z", hold=True)
    server = serve(in_turn(ok(), drip, ok()))
    policy = policy_for(server)
    assert fetch(server.url(INSTANCE), policy) == BODY
    started = time.monotonic()
    error = fetch_failure(server.url(INSTANCE), policy, deadline=started + 0.5)
    assert error.code is ErrorCode.TIMEOUT
    assert time.monotonic() - started < 1.5
    assert idle_connections() == 0
    assert fetch(server.url(INSTANCE), policy) == BODY
    assert server.connections_used() == [1, 1, 2]


def test_idle_connections_expire(serve: Callable[..., KeepAliveServer], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_module, "POOL_MAX_IDLE_S", 0.2)
    server = serve(always(ok()))
    assert fetch(server.url(INSTANCE), policy_for(server)) == BODY
    time.sleep(0.3)
    assert fetch(server.url(INSTANCE), policy_for(server)) == BODY
    assert server.connections_used() == [1, 2]


def run_in_threads(count: int, call: Callable[[], bytes]) -> list[bytes | BaseException]:
    outcomes: list[bytes | BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        try:
            outcome: bytes | BaseException = call()
        except BaseException as exc:
            outcome = exc
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == count
    return outcomes


def test_parallel_fetches_share_the_pool_safely(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(always(ok(delay_s=0.005)))
    policy = policy_for(server)

    def ten() -> bytes:
        for _ in range(10):
            assert fetch(server.url(INSTANCE), policy) == BODY
        return BODY

    assert run_in_threads(8, ten) == [BODY] * 8
    assert len(server.seen) == 80
    assert server.connections <= 8
    assert idle_connections() == server.connections


def test_the_pool_keeps_a_bounded_number_per_key(
    serve: Callable[..., KeepAliveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_module, "POOL_MAX_IDLE_PER_KEY", 2)
    server = serve(always(ok(delay_s=0.3)))  # six at once: six connections
    assert run_in_threads(6, lambda: fetch(server.url(INSTANCE), policy_for(server))) == [BODY] * 6
    assert server.connections == 6
    assert idle_connections() == 2


# ------------------------------------------------------------------------------------- pinning, names, pids


class FakeDns:
    """A patched `socket.getaddrinfo` for `*.test` names; `failures` are raised first, one per lookup."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.records: dict[str, list[str]] = {}
        self.failures: list[int] = []
        self.lookups: list[str] = []
        real = socket.getaddrinfo

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
            if not str(host).endswith(".test"):
                return real(host, port, *args, **kwargs)
            self.lookups.append(host)
            if self.failures:
                raise socket.gaierror(self.failures.pop(0), "fake resolver failure")
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
                for address in self.records[host]
            ]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    return FakeDns(monkeypatch)


def test_connections_are_per_host_name(serve: Callable[..., KeepAliveServer], dns: FakeDns) -> None:
    """Two names for one address never share a connection: Host, SNI and certificate belong to one name."""
    server = serve(always(ok()))
    dns.records = {"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]}
    policy = FetchPolicy(dicomweb_hosts=("a.test", "b.test"), timeout_s=5.0)
    for name in ("a.test", "b.test", "a.test", "b.test"):
        assert fetch(server.url(INSTANCE, host=name), policy) == BODY
    assert server.connections_used() == [1, 2, 1, 2]
    hosts = [seen.head.split(b"\r\nHost: ", 1)[1].split(b"\r\n", 1)[0] for seen in server.seen]
    assert hosts == [f"{name}:{server.port}".encode() for name in ("a.test", "b.test", "a.test", "b.test")]


def test_a_pooled_connection_is_used_only_for_an_address_vetted_now(
    serve: Callable[..., KeepAliveServer], dns: FakeDns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the name moves, the connection to its old address is not taken (the new one refuses here)."""
    monkeypatch.setattr(fetch_module, "DNS_CACHE_S", 0.0)
    server = serve(always(ok()))
    policy = FetchPolicy(dicomweb_hosts=("pacs.test",), timeout_s=5.0)
    dns.records["pacs.test"] = ["127.0.0.1"]
    assert fetch(server.url(INSTANCE, host="pacs.test"), policy) == BODY
    dns.records["pacs.test"] = ["127.0.0.2"]  # nothing listens there on this port
    assert fetch_failure(server.url(INSTANCE, host="pacs.test"), policy).code is ErrorCode.UNAVAILABLE
    assert server.connections_used() == [1]
    assert dns.lookups == ["pacs.test", "pacs.test"]


def test_a_cached_lookup_is_vetted_again_for_every_request(serve: Callable[..., KeepAliveServer], dns: FakeDns) -> None:
    server = serve(always(ok()))
    dns.records["pacs.test"] = ["127.0.0.1", "169.254.169.254"]
    admits_metadata = FetchPolicy(dicomweb_hosts=("pacs.test", "169.254.169.254"), timeout_s=5.0)
    assert fetch(server.url(INSTANCE, host="pacs.test"), admits_metadata) == BODY
    plain = FetchPolicy(dicomweb_hosts=("pacs.test",), timeout_s=5.0)
    error = fetch_failure(server.url(INSTANCE, host="pacs.test"), plain)
    assert error.code is ErrorCode.FORBIDDEN_URI
    assert error.reason == "the DICOMweb host resolves to a cloud metadata address"
    assert dns.lookups == ["pacs.test"]  # the second answer came from the cache, and was refused all the same
    assert server.connections_used() == [1]


def test_the_pool_belongs_to_one_process(
    serve: Callable[..., KeepAliveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool seen from another pid is left alone: a fresh, empty one takes its place."""
    server = serve(always(ok()))
    assert fetch(server.url(INSTANCE), policy_for(server)) == BODY
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)
    assert idle_connections() == 0
    assert fetch(server.url(INSTANCE), policy_for(server)) == BODY
    assert server.connections_used() == [1, 2]


def test_a_forked_child_never_uses_its_parents_connections(serve: Callable[..., KeepAliveServer]) -> None:
    """PySpark forks its Python workers: the child starts with an empty pool; the parent's stays usable."""
    server = serve(always(ok()))
    policy = policy_for(server)
    assert fetch(server.url(INSTANCE), policy) == BODY
    assert idle_connections() == 1
    child = os.fork()
    if child == 0:  # the child: report through the exit status only, never return into pytest
        code = 1
        try:
            empty = idle_connections() == 0
            fetched = fetch(server.url(INSTANCE), policy) == BODY
            code = 0 if empty and fetched and idle_connections() == 1 else 2
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert fetch(server.url(INSTANCE), policy) == BODY
    assert server.connections_used() == [1, 2, 1]


# -------------------------------------------------------------------------------------------------- TLS


def test_tls_connections_are_reused_after_one_handshake(
    serve: Callable[..., KeepAliveServer], dns: FakeDns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = self_signed_certificate(tmp_path, "pacs.test")
    assert made is not None, "the openssl command is needed for the TLS tests (Debian: openssl)"
    cert, key = made
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setattr(fetch_module, "_tls_context", lambda: ssl.create_default_context(cafile=str(cert)))
    server = serve(always(ok()), tls=context)
    dns.records["pacs.test"] = ["127.0.0.1"]
    policy = FetchPolicy(dicomweb_hosts=("pacs.test",), timeout_s=5.0)
    for _ in range(3):
        assert fetch(server.url(INSTANCE, scheme="https", host="pacs.test"), policy) == BODY
    assert server.handshakes == 1
    assert server.connections_used() == [1, 1, 1]


# ------------------------------------------------------------------------------------------------ retries


def test_503_is_retried_until_it_succeeds(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(in_turn(status(503), status(503), ok()))
    assert fetch(server.url(INSTANCE), policy_for(server, retries=3, retry_backoff_s=0.02)) == BODY
    assert server.connections_used() == [1, 1, 1]  # the small 503 answers kept the connection


@pytest.mark.parametrize("code", [429, 502, 504])
def test_other_overload_answers_are_retried(serve: Callable[..., KeepAliveServer], code: int) -> None:
    server = serve(in_turn(status(code), ok()))
    assert fetch(server.url(INSTANCE), policy_for(server, retries=1, retry_backoff_s=0.02)) == BODY
    assert len(server.seen) == 2


def test_a_reset_connection_is_retried(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(in_turn(Turn(reset=True), ok()))
    assert fetch(server.url(INSTANCE), policy_for(server, retries=1, retry_backoff_s=0.02)) == BODY
    assert server.connections_used() == [1, 2]


def test_retries_are_bounded_and_counted_in_the_reason(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(always(status(503)))
    error = fetch_failure(server.url(INSTANCE), policy_for(server, retries=2, retry_backoff_s=0.02))
    assert error.code is ErrorCode.UNAVAILABLE
    assert error.reason == "the DICOMweb server is down or overloaded (HTTP 503), after 3 attempts"
    assert len(server.seen) == 3


def test_backoff_grows_exponentially_with_jitter(
    serve: Callable[..., KeepAliveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(fetch_module.time, "sleep", waits.append)
    server = serve(always(status(503)))
    fetch_failure(server.url(INSTANCE), policy_for(server, retries=4, retry_backoff_s=0.1))
    assert len(waits) == 4
    for n, wait in enumerate(waits):
        assert 0.1 * 2**n <= wait <= 0.1 * 2**n * 1.5


def test_retry_after_is_honoured(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(in_turn(status(503, {"Retry-After": "1"}), ok()))
    assert fetch(server.url(INSTANCE), policy_for(server, retries=1, retry_backoff_s=0.01)) == BODY
    assert 1.0 <= server.seen[1].at - server.seen[0].at < 2.0


def test_a_retry_after_past_the_cap_ends_the_fetch_at_once(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(always(status(429, {"Retry-After": "3600"})))
    started = time.monotonic()
    error = fetch_failure(server.url(INSTANCE), policy_for(server, retries=3, retry_backoff_s=0.01))
    assert time.monotonic() - started < 0.5
    assert error.code is ErrorCode.UNAVAILABLE
    assert "retry after 3600 s" in error.reason
    assert len(server.seen) == 1


def test_a_retry_after_past_the_deadline_ends_the_fetch_at_once(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(always(status(503, {"Retry-After": "5"})))
    started = time.monotonic()
    error = fetch_failure(server.url(INSTANCE), policy_for(server, retries=3), deadline=started + 2.0)
    assert time.monotonic() - started < 0.5
    assert error.code is ErrorCode.UNAVAILABLE
    assert len(server.seen) == 1


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("\u0663", None),  # an Arabic-Indic three: digits are ASCII
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date gone by: retry at once
    ],
)
def test_retry_after_values(header: str | None, seconds: float | None) -> None:
    assert fetch_module._retry_after(header) == seconds


def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    waited = fetch_module._retry_after(when)
    assert waited is not None and 28 <= waited <= 30


def test_retries_stop_before_the_deadline_as_unavailable(serve: Callable[..., KeepAliveServer]) -> None:
    """A PACS that stays down ends `unavailable` before the deadline: not `timeout`, and not later."""
    server = serve(always(status(503)))
    started = time.monotonic()
    policy = policy_for(server, retries=10, retry_backoff_s=0.2)
    error = fetch_failure(server.url(INSTANCE), policy, deadline=started + 1.5)
    assert time.monotonic() - started < 1.5
    assert error.code is ErrorCode.UNAVAILABLE
    assert error.reason.endswith(f"after {len(server.seen)} attempts")
    assert len(server.seen) >= 3


def test_retries_stop_within_timeout_s_without_a_deadline(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(always(status(503)))
    policy = FetchPolicy(dicomweb_hosts=(f"127.0.0.1:{server.port}",), timeout_s=1.0, retries=10, retry_backoff_s=0.1)
    started = time.monotonic()
    assert fetch_failure(server.url(INSTANCE), policy).code is ErrorCode.UNAVAILABLE
    assert time.monotonic() - started < 1.0


def test_a_refusing_server_is_unavailable_within_the_deadline() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    policy = FetchPolicy(dicomweb_hosts=(f"127.0.0.1:{port}",), timeout_s=30.0, retries=10, retry_backoff_s=0.1)
    started = time.monotonic()
    error = fetch_failure(f"http://127.0.0.1:{port}{INSTANCE}", policy, deadline=started + 1.0)
    assert time.monotonic() - started < 1.0
    assert error.code is ErrorCode.UNAVAILABLE
    assert "after" in error.reason and "attempts" in error.reason


def test_a_name_that_cannot_be_resolved_for_now_is_retried(serve: Callable[..., KeepAliveServer], dns: FakeDns) -> None:
    server = serve(always(ok()))
    dns.records["pacs.test"] = ["127.0.0.1"]
    dns.failures = [socket.EAI_AGAIN]
    policy = FetchPolicy(dicomweb_hosts=("pacs.test",), timeout_s=5.0, retries=1, retry_backoff_s=0.02)
    assert fetch(server.url(INSTANCE, host="pacs.test"), policy) == BODY
    assert dns.lookups == ["pacs.test", "pacs.test"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (404, ErrorCode.NOT_FOUND),
        (401, ErrorCode.FORBIDDEN_URI),
        (403, ErrorCode.FORBIDDEN_URI),
        (302, ErrorCode.FORBIDDEN_URI),
        (500, ErrorCode.FETCH_FAILED),
        (400, ErrorCode.FETCH_FAILED),
    ],
)
def test_answers_that_retrying_cannot_change_are_not_retried(
    serve: Callable[..., KeepAliveServer], code: int, expected: ErrorCode
) -> None:
    server = serve(always(status(code, {"Location": f"http://127.0.0.1:{1}{INSTANCE}"} if code == 302 else None)))
    error = fetch_failure(server.url(INSTANCE), policy_for(server, retries=3, retry_backoff_s=0.01))
    assert error.code is expected
    assert "attempts" not in error.reason
    assert len(server.seen) == 1


def test_a_timeout_is_not_retried(serve: Callable[..., KeepAliveServer]) -> None:
    server = serve(always(Turn(hold=True)))  # reads the request, never answers
    policy = FetchPolicy(dicomweb_hosts=(f"127.0.0.1:{server.port}",), timeout_s=0.5, retries=3)
    started = time.monotonic()
    error = fetch_failure(server.url(INSTANCE), policy)
    assert error.code is ErrorCode.TIMEOUT
    assert error.reason == "the DICOMweb request took longer than 0.5 s"
    assert time.monotonic() - started < 1.5
    assert server.connections == 1


# -------------------------------------------------------------------------------------------- credentials


def test_credentials_go_with_every_request_and_nowhere_else(
    serve: Callable[..., KeepAliveServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = serve(in_turn(ok(), status(503), status(503), status(401), status(503)))
    policy = policy_for(server, authorization=SECRET, retries=1, retry_backoff_s=0.01)
    assert fetch(server.url(INSTANCE), policy) == BODY
    errors = [fetch_failure(server.url(INSTANCE), policy) for _ in range(2)]
    assert [e.code for e in errors] == [ErrorCode.UNAVAILABLE, ErrorCode.FORBIDDEN_URI]
    assert all(f"\r\nAuthorization: {SECRET}".encode() in seen.head for seen in server.seen)
    password = "super-secret-password"
    for error in errors:
        for text in (error.reason, repr(error), str(error)):
            assert SECRET not in text and password not in text and SECRET.split()[1] not in text
    assert SECRET.split()[1] not in repr(policy)
    assert SECRET.split()[1] not in caplog.text


def test_credentials_that_are_not_a_valid_header_are_refused_without_quoting_them(
    serve: Callable[..., KeepAliveServer],
) -> None:
    server = serve(always(ok()))
    broken = "Basic c2VjcmV0\r\nX-Injected: yes"
    error = fetch_failure(server.url(INSTANCE), policy_for(server, authorization=broken))
    assert error.code is ErrorCode.FETCH_FAILED
    assert "c2VjcmV0" not in error.reason and "Injected" not in error.reason
    assert server.connections == 0


def test_scoring_config_carries_the_retry_settings() -> None:
    from streaming.scoring import scoring_config
    from streaming.settings import Settings

    settings = Settings.load(
        dicomweb_retries=5, dicomweb_retry_backoff_s=0.5, dicomweb_username="cxr", dicomweb_password="pw"
    )
    policy = scoring_config(settings).fetch
    assert (policy.retries, policy.retry_backoff_s) == (5, 0.5)
    assert policy.authorization == "Basic Y3hyOnB3"
    assert "Y3hyOnB3" not in repr(policy)
