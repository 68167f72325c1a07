"""The embedded broker's pure parts (its process is tested in tests/integration/test_kafka_spark.py and
test_broker_restart.py)."""

from __future__ import annotations

import base64
import socket
import uuid
from pathlib import Path

import pytest

from streaming import broker
from streaming.broker import (
    BrokerError,
    EmbeddedBroker,
    formatted_cluster_id,
    free_ports,
    new_cluster_id,
    parse_ports,
    parse_properties,
    plan_ports,
    remember_ports,
    remembered_ports,
)


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


# --------------------------------------------------------------------------- a work folder used before


def test_parse_properties_as_kafka_writes_them() -> None:
    text = "#\n#Tue Nov 25 16:05:16 UTC 2026\ncluster.id=eVShk2AGQBWedfeGy1RD7g\nnode.id = 1\n\nversion=1\n"
    assert parse_properties(text) == {"cluster.id": "eVShk2AGQBWedfeGy1RD7g", "node.id": "1", "version": "1"}


def test_formatted_cluster_id_reads_meta_properties(tmp_path: Path) -> None:
    assert formatted_cluster_id(tmp_path) is None  # never formatted: format it
    (tmp_path / "meta.properties").write_text("#\ncluster.id=abcDEF_-123\nnode.id=1\nversion=1\n")
    assert formatted_cluster_id(tmp_path) == "abcDEF_-123"


def test_a_meta_properties_without_cluster_id_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "meta.properties").write_text("node.id=1\n")
    with pytest.raises(BrokerError, match=r"cluster\.id"):
        formatted_cluster_id(tmp_path)


def test_ports_are_remembered_in_the_workdir(tmp_path: Path) -> None:
    assert remembered_ports(tmp_path) is None
    remember_ports(tmp_path, 40001, 40002)
    assert remembered_ports(tmp_path) == (40001, 40002)
    assert [p.name for p in tmp_path.iterdir()] == ["ports.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"listener": 1}',
        '{"listener": "x", "controller": 2}',
        '{"listener": 0, "controller": 2}',
        '{"listener": 5, "controller": 5}',
        '{"listener": 70000, "controller": 2}',
    ],
)
def test_unusable_ports_files_are_ignored(tmp_path: Path, text: str) -> None:
    assert parse_ports(text) is None
    (tmp_path / "ports.json").write_text(text)
    assert remembered_ports(tmp_path) is None


def fake_free(count: int, exclude: tuple[int, ...]) -> list[int]:
    return [p for p in (50001, 50002, 50003) if p not in exclude][:count]


def test_plan_ports_fixed_wins_then_remembered_then_free() -> None:
    assert plan_ports(None, None, fake_free) == (50001, 50002)
    assert plan_ports(None, (40001, 40002), fake_free) == (40001, 40002)
    assert plan_ports(9092, (40001, 40002), fake_free) == (9092, 40002)  # --port wins; the controller is kept
    assert plan_ports(9092, None, fake_free) == (9092, 50001)
    assert plan_ports(50001, (40001, 50001), fake_free) == (50001, 50002)  # never both on one port


def test_a_new_broker_on_a_used_workdir_takes_its_address(tmp_path: Path) -> None:
    remember_ports(tmp_path, 40001, 40002)
    again = EmbeddedBroker(tmp_path / "lib", workdir=tmp_path)
    assert again.bootstrap_servers == "127.0.0.1:40001" and again.controller_port == 40002
    assert EmbeddedBroker(tmp_path / "lib", workdir=tmp_path, port=9999).bootstrap_servers == "127.0.0.1:9999"


def test_stop_never_deletes_a_workdir_it_was_given(tmp_path: Path) -> None:
    given = EmbeddedBroker(tmp_path / "lib", workdir=tmp_path / "kafka")
    (tmp_path / "kafka").mkdir()
    given.stop()
    assert (tmp_path / "kafka").is_dir()
    own = EmbeddedBroker(tmp_path / "lib")
    own.stop(keep_workdir=True)
    assert own.workdir.is_dir()
    own.stop()
    assert not own.workdir.exists()
