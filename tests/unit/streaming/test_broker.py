"""The embedded broker's and cluster's pure parts (their processes are tested in
tests/integration/test_kafka_spark.py, test_broker_restart.py and test_kafka_cluster.py)."""

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
    KafkaCluster,
    broker_properties,
    formatted_cluster_id,
    free_ports,
    new_cluster_id,
    parse_ports,
    parse_properties,
    plan_cluster_ports,
    plan_ports,
    quorum_voters,
    remember_ports,
    remembered_ports,
    replication,
    unfenced_brokers,
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


# --------------------------------------------------------------------------------------- a cluster of nodes


def test_replication_follows_the_number_of_nodes() -> None:
    assert replication(1) == (1, 1)
    assert replication(2) == (2, 1)  # two copies, but one broker down must not refuse writes
    assert replication(3) == (3, 2)
    assert replication(5) == (3, 2)


def test_quorum_voters_list_every_node_by_id() -> None:
    assert quorum_voters("127.0.0.1", {2: 40002, 1: 40001}) == "1@127.0.0.1:40001,2@127.0.0.1:40002"


def test_a_single_node_is_configured_as_it_always_was(tmp_path: Path) -> None:
    props = broker_properties(
        node_id=1, host="127.0.0.1", port=9092, controller_port=9093, voters="1@127.0.0.1:9093", data_dir=tmp_path
    )
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor", "min.insync.replicas"):
        assert props[key] == "1"
    assert props["auto.create.topics.enable"] == "false"


def test_a_node_of_three_replicates_everything_three_times(tmp_path: Path) -> None:
    voters = quorum_voters("127.0.0.1", {1: 40011, 2: 40012, 3: 40013})
    props = broker_properties(
        node_id=2, host="127.0.0.1", port=40002, controller_port=40012, voters=voters, data_dir=tmp_path, nodes=3
    )
    assert props["node.id"] == "2" and props["controller.quorum.voters"] == voters
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:40002,CONTROLLER://127.0.0.1:40012"
    assert props["log.dirs"] == str(tmp_path)
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "share.coordinator.state.topic.replication.factor",
    ):
        assert props[key] == "3", key
    for key in ("min.insync.replicas", "transaction.state.log.min.isr", "share.coordinator.state.topic.min.isr"):
        assert props[key] == "2", key
    assert props["unclean.leader.election.enable"] == "false"


def fake_free_many(count: int, exclude: tuple[int, ...]) -> list[int]:
    return [p for p in range(50001, 50100) if p not in exclude][:count]


def test_cluster_ports_are_all_distinct_and_planned_together() -> None:
    plan = plan_cluster_ports(3, None, [None, None, None], fake_free_many)
    assert plan == [(50001, 50002), (50003, 50004), (50005, 50006)]


def test_cluster_ports_fixed_gives_consecutive_listeners() -> None:
    plan = plan_cluster_ports(3, 9092, [None, None, None], fake_free_many)
    assert [listener for listener, _ in plan] == [9092, 9093, 9094]
    controllers = [controller for _, controller in plan]
    assert len(set(controllers)) == 3 and not set(controllers) & {9092, 9093, 9094}


def test_cluster_ports_remembered_are_kept_and_never_handed_out_again() -> None:
    plan = plan_cluster_ports(3, None, [(50001, 50002), None, (50005, 50006)], fake_free_many)
    assert plan == [(50001, 50002), (50003, 50004), (50005, 50006)]
    # --port given to a cluster that remembered controller ports: those are kept unless they collide
    plan = plan_cluster_ports(2, 9092, [(40001, 40002), (40003, 9092)], fake_free_many)
    assert plan == [(9092, 40002), (9093, 50001)]


def test_unfenced_brokers_from_a_describe_cluster_answer() -> None:
    answer = {
        "brokers": [
            {"broker_id": 1, "is_fenced": False},
            {"broker_id": 2, "is_fenced": True},
            {"broker_id": 3},  # an older answer, without the field
        ]
    }
    assert unfenced_brokers(answer) == {1, 3}
    assert unfenced_brokers({}) == set()


def test_a_cluster_knows_its_address_and_quorum_before_it_starts(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path / "lib", 3, workdir=tmp_path / "kafka")
    assert [n.node_id for n in cluster.nodes] == [1, 2, 3]
    assert [n.workdir for n in cluster.nodes] == [tmp_path / "kafka" / f"node-{i}" for i in (1, 2, 3)]
    assert cluster.bootstrap_servers == ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes)
    ports = [p for n in cluster.nodes for p in (n.port, n.controller_port)]
    assert len(set(ports)) == 6
    assert cluster.voters() == ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in cluster.nodes)
    assert all(n.quorum is cluster for n in cluster.nodes)
    assert len(cluster.cluster_id) == 22


def test_a_node_writes_the_clusters_configuration(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path / "lib", 3, workdir=tmp_path / "kafka")
    config = cluster.node(3)._write_config()
    props = parse_properties(config.read_text())
    assert props["node.id"] == "3" and props["controller.quorum.voters"] == cluster.voters()
    assert props["min.insync.replicas"] == "2"
    with pytest.raises(KeyError):
        cluster.node(4)


def test_a_cluster_on_a_used_folder_keeps_its_id_and_ports(tmp_path: Path) -> None:
    for i, (listener, controller) in enumerate([(40001, 40002), (40003, 40004), (40005, 40006)], start=1):
        node_dir = tmp_path / f"node-{i}"
        (node_dir / "data").mkdir(parents=True)
        (node_dir / "data" / "meta.properties").write_text(f"cluster.id=AAAAAAAAAAAAAAAAAAAAAA\nnode.id={i}\n")
        remember_ports(node_dir, listener, controller)
    again = KafkaCluster(tmp_path / "lib", 3, workdir=tmp_path)
    assert again.cluster_id == "AAAAAAAAAAAAAAAAAAAAAA"
    assert again.bootstrap_servers == "127.0.0.1:40001,127.0.0.1:40003,127.0.0.1:40005"
    assert again.voters() == "1@127.0.0.1:40002,2@127.0.0.1:40004,3@127.0.0.1:40006"


def test_nodes_of_different_clusters_are_refused(tmp_path: Path) -> None:
    for i, cluster_id in ((1, "AAAAAAAAAAAAAAAAAAAAAA"), (2, "BBBBBBBBBBBBBBBBBBBBBB")):
        (tmp_path / f"node-{i}" / "data").mkdir(parents=True)
        (tmp_path / f"node-{i}" / "data" / "meta.properties").write_text(f"cluster.id={cluster_id}\n")
    with pytest.raises(BrokerError, match="different Kafka clusters"):
        KafkaCluster(tmp_path / "lib", 3, workdir=tmp_path)


def test_a_cluster_needs_a_node(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        KafkaCluster(tmp_path / "lib", 0, workdir=tmp_path)


def test_cluster_nodes_start_quickly_and_a_lone_broker_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker, "jars", lambda lib_dir, group: [lib_dir / "kafka.jar"])
    monkeypatch.setattr(broker, "java_executable", lambda: "java")
    cluster = KafkaCluster(tmp_path / "lib", 3, workdir=tmp_path / "kafka", heap="256m")
    command = cluster.node(1)._java("kafka.Kafka", "server.properties")
    assert command[:2] == ["java", "-Xmx256m"] and "-XX:TieredStopAtLevel=1" in command
    assert command[-2:] == ["kafka.Kafka", "server.properties"]
    alone = EmbeddedBroker(tmp_path / "lib", workdir=tmp_path / "alone")._java("kafka.Kafka")
    assert "-Xmx512m" in alone and not any(option.startswith("-XX:TieredStopAtLevel") for option in alone)
