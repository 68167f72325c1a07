"""The embedded broker's pure parts (its process is tested in tests/integration/test_kafka_spark.py)."""

from __future__ import annotations

import base64
import socket
import uuid

import pytest

from streaming import broker
from streaming.broker import free_ports, new_cluster_id


def test_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # A uuid whose base64 starts with '-' (0xf8... encodes to '-' first), then an ordinary one.
    dashed = uuid.UUID(bytes=b"\xf8" + bytes(15))
    assert base64.urlsafe_b64encode(dashed.bytes).startswith(b"-")
    ordinary = uuid.UUID(bytes=bytes(16))
    draws = iter([dashed, ordinary])
    monkeypatch.setattr(broker.uuid, "uuid4", lambda: next(draws))
    assert new_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"


def test_cluster_ids_are_22_url_safe_characters() -> None:
    for _ in range(200):
        cluster_id = new_cluster_id()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert uuid.UUID(bytes=base64.urlsafe_b64decode(cluster_id + "=="))


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
