"""Loopback servers that misbehave on purpose, the adversaries of the fetch tests.

A `MisbehavingServer` listens on 127.0.0.1 and hands each accepted connection to a behaviour (a function of
the connection and a stop event) on a daemon thread of its own. It counts connections, so a test can prove
that a refused URL never reached it, and `close()` ends every behaviour within a second or so.
`KeepAliveServer` speaks HTTP/1.1 with keep-alive on a script, for the connection-pool and retry tests.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType

Behaviour = Callable[[socket.socket, threading.Event], None]


class MisbehavingServer:
    """A TCP listener on 127.0.0.1 that runs `behaviour` for every connection."""

    def __init__(self, behaviour: Behaviour) -> None:
        self._behaviour = behaviour
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="misbehaving-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            worker = threading.Thread(target=self._serve, args=(conn,), name="misbehaving-conn", daemon=True)
            self._threads.append(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._behaviour(conn, self._stop)

    def url(self, path: str, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(2)
        self._listener.close()
        for worker in self._threads:
            worker.join(2)

    def __enter__(self) -> MisbehavingServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def read_request_head(conn: socket.socket, limit: int = 65536) -> bytes:
    """The request line and headers, up to the blank line (a bounded wait: 5 s)."""
    conn.settimeout(5)
    head = b""
    while b"\r\n\r\n" not in head and len(head) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def never_answers(conn: socket.socket, stop: threading.Event) -> None:
    """Accepts, then says nothing at all until the server closes."""
    stop.wait()


def drips_body(interval_s: float) -> Behaviour:
    """Sends a well-formed head promising a 1 MB body, then one byte of it every `interval_s`."""

    def behaviour(conn: socket.socket, stop: threading.Event) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom\r\nContent-Length: 1000000\r\n\r\n")
        while not stop.wait(interval_s):
            conn.sendall(b"x")

    return behaviour


def drips_headers(interval_s: float) -> Behaviour:
    """Sends the status line, then one byte of an endless header every `interval_s`."""

    def behaviour(conn: socket.socket, stop: threading.Event) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Padding: ")
        while not stop.wait(interval_s):
            conn.sendall(b"a")

    return behaviour


def answers_over_tls(context: ssl.SSLContext, body: bytes, heads: list[bytes]) -> Behaviour:
    """A TLS server answering every request with `body`, recording each request head."""

    def behaviour(conn: socket.socket, stop: threading.Event) -> None:
        conn.settimeout(5)
        with context.wrap_socket(conn, server_side=True) as tls:
            heads.append(read_request_head(tls))
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )

    return behaviour


def self_signed_certificate(directory: Path, name: str) -> tuple[Path, Path] | None:
    """`(certificate, key)` for DNS name `name`, made by the openssl command; None where it is missing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
            "-addext", f"subjectAltName=DNS:{name}",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


# ------------------------------------------------------------------------------------ keep-alive HTTP/1.1


def http_answer(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """A well-formed HTTP/1.1 answer with a Content-Length (add `Connection: close` through `headers`)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(frozen=True)
class Turn:
    """What a `KeepAliveServer` does with one request: send `answer` (after `delay_s`), then go on reading
    the next request on the same connection, unless told to close it (`close`), reset it (`reset`: an RST
    instead of a FIN) or keep it open without reading anything more (`hold`, until the server closes)."""

    answer: bytes = b""
    delay_s: float = 0.0
    close: bool = False
    reset: bool = False
    hold: bool = False


@dataclass(frozen=True)
class Seen:
    """One request as a `KeepAliveServer` got it."""

    #: which TCP connection carried it: 1, 2, ... in the order the server took them up
    connection: int
    head: bytes
    #: `time.monotonic()` when its head was complete
    at: float


class KeepAliveServer(MisbehavingServer):
    """HTTP/1.1 with keep-alive, request after request on each connection (optionally over TLS).

    `script(n, head)` decides the n-th request's `Turn` (n counts from 0 over all connections); `seen`
    records every request with the connection that carried it, so a test can tell reuse from reconnection.
    """

    def __init__(self, script: Callable[[int, bytes], Turn], tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.seen: list[Seen] = []
        self.handshakes = 0
        self._lock = threading.Lock()
        self._opened = 0
        super().__init__(self._converse)

    def _converse(self, conn: socket.socket, stop: threading.Event) -> None:
        with self._lock:
            self._opened += 1
            number = self._opened
        if self.tls is not None:
            conn.settimeout(5)
            conn = self.tls.wrap_socket(conn, server_side=True)
            with self._lock:
                self.handshakes += 1
        with conn:
            self._serve_requests(conn, number, stop)

    def _serve_requests(self, conn: socket.socket, number: int, stop: threading.Event) -> None:
        conn.settimeout(0.05)
        buffer = b""
        while not stop.is_set():
            while b"\r\n\r\n" not in buffer:
                if stop.is_set():
                    return
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:  # the client closed the connection
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            with self._lock:
                index = len(self.seen)
                self.seen.append(Seen(number, head, time.monotonic()))
            turn = self.script(index, head)
            if turn.delay_s and stop.wait(turn.delay_s):
                return
            if turn.answer:
                conn.sendall(turn.answer)
            if turn.reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if turn.close:
                return
            if turn.hold:
                stop.wait()
                return

    def connections_used(self) -> list[int]:
        """The connection of every request, in order."""
        with self._lock:
            return [seen.connection for seen in self.seen]
