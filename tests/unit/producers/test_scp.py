"""The C-STORE receiver without a network or Kafka: who may call, where an instance goes (hostile UIDs
included), atomic writes, and the status a modality hears when the disk or Kafka fails."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from fake_publisher import FakePublisher
from producers import publish, scp
from producers.pacs import ChestFilter, Instance
from producers.pacs import valid_uid as is_uid
from producers.publish import PublishError
from producers.scp import (
    CALLED_AE_TITLE_NOT_RECOGNISED,
    CALLING_AE_TITLE_NOT_RECOGNISED,
    CANNOT_UNDERSTAND,
    LOCAL_LIMIT_EXCEEDED,
    OUT_OF_RESOURCES,
    SUCCESS,
    Caller,
    InvalidInstance,
    Receiver,
    ScpConfigError,
    address_may_call,
    association_refusal,
    caller_allowed,
    event_id_for,
    instance_path,
    parse_caller,
    parse_callers,
    read_instance,
    storage_root,
    write_instance,
)
from streaming.contracts import parse_reference
from streaming.settings import Settings
from xray_files import PATIENT_ID, PATIENT_NAME, dicom_bytes, encapsulated, image_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"

# ------------------------------------------------------------------------------------------------ callers


def test_callers_are_an_ae_title_optionally_bound_to_an_address_or_network() -> None:
    assert parse_caller("MODALITY") == Caller("MODALITY")
    assert parse_caller(" MODALITY@127.0.0.1 ") == Caller("MODALITY", ipaddress.ip_network("127.0.0.1/32"))
    assert parse_caller("CT_ROOM_2@10.1.2.0/24") == Caller("CT_ROOM_2", ipaddress.ip_network("10.1.2.0/24"))
    assert parse_caller("DX1@fd00::7") == Caller("DX1", ipaddress.ip_network("fd00::7/128"))
    assert parse_caller("A@B@10.0.0.1").ae_title == "A@B"  # the address follows the last '@'
    assert str(parse_caller("MODALITY@127.0.0.1")) == "MODALITY@127.0.0.1"
    assert str(parse_caller("MODALITY@10.0.0.0/8")) == "MODALITY@10.0.0.0/8"
    assert parse_callers(["A", " ", "", "B@10.0.0.1"]) == (Caller("A"), parse_caller("B@10.0.0.1"))
    assert parse_callers([]) == ()


@pytest.mark.parametrize(
    "entry",
    [
        "@10.0.0.1",  # no AE title
        "SEVENTEEN_CHARS_X",  # AE titles have at most 16 characters
        "BAD\\AE",  # backslash is the value separator
        "TAB\tAE",
        "ÄRZTE",  # not ASCII
        "MODALITY@pacs.example.org",  # host names are not resolved: an address or a network
        "MODALITY@",
        "MODALITY@10.0.0.300",
    ],
)
def test_a_caller_entry_that_cannot_be_read_is_a_config_error(entry: str) -> None:
    with pytest.raises(ScpConfigError) as info:
        parse_caller(entry)
    assert isinstance(info.value, ValueError)
    assert "CXR_SCP_ALLOWED_CALLERS" in str(info.value)


def test_caller_matching_by_ae_title_and_address() -> None:
    callers = parse_callers(["ANY_ADDR", "MODALITY@127.0.0.1", "WARD@10.1.2.0/24", "V6@fd00::7"])
    assert caller_allowed(callers, "ANY_ADDR", "192.0.2.9")
    assert caller_allowed(callers, "MODALITY", "127.0.0.1")
    assert caller_allowed(callers, "MODALITY  ", "127.0.0.1")  # AE titles are space-padded on the wire
    assert caller_allowed(callers, "MODALITY", "::ffff:127.0.0.1")  # a dual-stack socket's view of IPv4
    assert not caller_allowed(callers, "MODALITY", "127.0.0.2")
    assert not caller_allowed(callers, "modality", "127.0.0.1")  # AE titles are case-sensitive
    assert caller_allowed(callers, "WARD", "10.1.2.200")
    assert not caller_allowed(callers, "WARD", "10.1.3.1")
    assert caller_allowed(callers, "V6", "fd00::7")
    assert not caller_allowed(callers, "V6", "127.0.0.1")
    assert not caller_allowed(callers, "STRANGER", "127.0.0.1")
    assert not caller_allowed(callers, "MODALITY", "not an address")
    assert not caller_allowed((), "MODALITY", "127.0.0.1")  # an empty list refuses everyone


def test_connections_from_addresses_no_caller_may_use_are_closed_before_any_dicom() -> None:
    """A stranger's idle TCP connections would hold association slots until the ACSE timeout."""
    bound = parse_callers(["MODALITY@127.0.0.1", "WARD@10.1.2.0/24"])
    assert address_may_call(bound, "127.0.0.1") and address_may_call(bound, "10.1.2.9")
    assert address_may_call(bound, "::ffff:10.1.2.9")
    assert not address_may_call(bound, "192.0.2.1")
    assert not address_may_call(parse_callers([]), "127.0.0.1")
    assert address_may_call(parse_callers(["ANY_ADDR", "MODALITY@127.0.0.1"]), "192.0.2.1")  # no address named


def refusal(**overrides: Any) -> Any:
    args: dict[str, Any] = {
        "called_ae_title": "CXR_STREAM",
        "calling_ae_title": "MODALITY",
        "address": "127.0.0.1",
        "our_ae_title": "CXR_STREAM",
        "callers": parse_callers(["MODALITY@127.0.0.1", "OTHER@10.1.2.3"]),
        "free_bytes": 10**9,
        "min_free_bytes": 10**6,
    }
    return association_refusal(**{**args, **overrides})


def test_association_refusals_carry_the_standard_reasons() -> None:
    assert refusal() is None
    assert refusal(called_ae_title="CXR_STREAM      ") is None
    assert refusal(called_ae_title="SOMEONE_ELSE") == CALLED_AE_TITLE_NOT_RECOGNISED
    assert refusal(calling_ae_title="STRANGER") == CALLING_AE_TITLE_NOT_RECOGNISED
    assert refusal(calling_ae_title="OTHER") == CALLING_AE_TITLE_NOT_RECOGNISED  # allowed, but from 10.1.2.3
    assert refusal(callers=()) == CALLING_AE_TITLE_NOT_RECOGNISED
    assert refusal(free_bytes=10**6 - 1) == LOCAL_LIMIT_EXCEEDED
    # permanent reasons first: a stranger is not told to come back when the disk has room
    assert refusal(calling_ae_title="STRANGER", free_bytes=0) == CALLING_AE_TITLE_NOT_RECOGNISED
    # (result, source, diagnostic) as PS3.8 9.3.4 spells them
    assert CALLED_AE_TITLE_NOT_RECOGNISED[:3] == (0x01, 0x01, 0x07)
    assert CALLING_AE_TITLE_NOT_RECOGNISED[:3] == (0x01, 0x01, 0x03)
    assert LOCAL_LIMIT_EXCEEDED[:3] == (0x02, 0x03, 0x02)  # transient: try again later


class FakeAssociation:
    def __init__(self, calling: str, called: str, address: str) -> None:
        self.requestor = SimpleNamespace(
            primitive=SimpleNamespace(calling_ae_title=calling, called_ae_title=called), address=address
        )
        self.rejected: tuple[int, int, int] | None = None
        self.killed = False
        self.acse = SimpleNamespace(send_reject=self._reject)

    def _reject(self, result: int, source: int, diagnostic: int) -> None:
        self.rejected = (result, source, diagnostic)

    def kill(self) -> None:
        self.killed = True


def test_the_requested_handler_rejects_before_negotiation(tmp_path: Path) -> None:
    receiver, _ = make_receiver(tmp_path, scp_allowed_callers=["MODALITY@127.0.0.1"])
    for calling, called, address, expected in [
        ("MODALITY", "CXR_STREAM", "127.0.0.1", None),
        ("MODALITY", "CXR_STREAM", "10.9.9.9", (0x01, 0x01, 0x03)),
        ("INTRUDER", "CXR_STREAM", "127.0.0.1", (0x01, 0x01, 0x03)),
        ("MODALITY", "ELSEWHERE", "127.0.0.1", (0x01, 0x01, 0x07)),
    ]:
        assoc = FakeAssociation(calling, called, address)
        receiver.handle_requested(SimpleNamespace(assoc=assoc))
        assert assoc.rejected == expected
        assert assoc.killed == (expected is not None)
    receiver.free_bytes = lambda _: 0
    receiver.settings = receiver.settings.model_copy(update={"scp_min_free_bytes": 1})
    assoc = FakeAssociation("MODALITY", "CXR_STREAM", "127.0.0.1")
    receiver.handle_requested(SimpleNamespace(assoc=assoc))
    assert assoc.rejected == (0x02, 0x03, 0x02)


def test_the_requested_handler_fails_closed(tmp_path: Path) -> None:
    receiver, _ = make_receiver(tmp_path, scp_allowed_callers=["MODALITY"])
    assoc = FakeAssociation("MODALITY", "CXR_STREAM", "127.0.0.1")
    del assoc.requestor.primitive  # something unexpected while deciding
    receiver.handle_requested(SimpleNamespace(assoc=assoc))
    assert assoc.rejected == (0x02, 0x01, 0x01) and assoc.killed


# ------------------------------------------------------------------------------------------------ storage


def test_uids_are_digits_and_dots() -> None:
    assert is_uid("1.2.840.10008.5.1.4.1.1.1.1")
    assert is_uid("0") and is_uid("1.2.0034")  # sloppy leading zeros are still safe as a name
    assert is_uid("1." + "2" * 62)
    for hostile in ["", ".", "..", "../../etc", "1.2/../3", "1..2", ".1", "1.", "1.2.3\x00", "1.2.3 ", "/1.2",
                    "1.2\\3", "1." + "2" * 63, "\u0661.\u0662", None, 12]:  # fmt: skip
        assert not is_uid(hostile), repr(hostile)


@pytest.mark.parametrize(
    "study,series,sop",
    [
        ("..", "1.2", "1.3"),
        ("1.2", "../../../../tmp", "1.3"),
        ("1.2", "1.3", "../../outside"),
        ("/etc", "1.2", "1.3"),
        ("1.2", "1.3", "1.4/../../x"),
        ("1.2", "1.3", ""),
        ("1.2", "1.3", "9" * 65),
    ],
)
def test_hostile_uids_cannot_name_a_path(tmp_path: Path, study: str, series: str, sop: str) -> None:
    with pytest.raises(InvalidInstance) as info:
        instance_path(tmp_path, study, series, sop)
    message = str(info.value)
    assert all(uid not in message for uid in (study, series, sop) if uid)  # hostile values are not quoted


def test_an_instance_is_stored_by_its_uids(tmp_path: Path) -> None:
    path = instance_path(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path == tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path: Path) -> None:
    path = instance_path(tmp_path, "1.2", "1.2.3", "1.2.3.4")
    write_instance(tmp_path, path, b"first")
    assert path.read_bytes() == b"first"
    write_instance(tmp_path, path, b"second version")  # a resend replaces it whole
    assert path.read_bytes() == b"second version"
    assert sorted(p.name for p in path.parent.iterdir()) == ["1.2.3.4.dcm"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = instance_path(tmp_path, "1.2", "1.2.3", "1.2.3.4")
    write_instance(tmp_path, path, b"old")
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_instance(tmp_path, path, b"new bytes that never became durable")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["1.2.3.4.dcm"]


def test_a_symlink_planted_in_the_storage_does_not_lead_writes_out(tmp_path: Path) -> None:
    storage, outside = tmp_path / "storage", tmp_path / "outside"
    storage.mkdir()
    outside.mkdir()
    (storage / "1.2").symlink_to(outside)
    with pytest.raises(InvalidInstance):
        write_instance(storage, instance_path(storage, "1.2", "1.2.3", "1.2.3.4"), b"data")
    assert list(outside.iterdir()) == []


def test_the_storage_must_lie_inside_the_allowed_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    inside = Settings.load(allowed_roots=[root], scp_storage=root / "scp" / "in")
    assert storage_root(inside) == (root / "scp" / "in").resolve()
    assert (root / "scp" / "in").is_dir()
    for storage in (tmp_path / "elsewhere", root / ".." / "escape"):
        outside = Settings.load(allowed_roots=[root], scp_storage=storage)
        with pytest.raises(ScpConfigError, match="not inside CXR_ALLOWED_ROOTS") as info:
            storage_root(outside)
        assert isinstance(info.value, ValueError)
        assert not storage.exists()  # refused before anything was created
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ScpConfigError):
        storage_root(Settings.load(allowed_roots=[root], scp_storage=root / "link"))


# ----------------------------------------------------------------------------------------------- instances


def dataset_bytes(
    sop_class: str = DX,
    modality: str = "DX",
    study: str | None = None,
    sop: str | None = None,
    compressed: bool = False,
    **extra: Any,
) -> bytes:
    with warnings.catch_warnings():  # pydicom warns about the hostile UIDs some tests set, quoting them
        warnings.simplefilter("ignore")
        return _dataset_bytes(sop_class, modality, study, sop, compressed, **extra)


def _dataset_bytes(
    sop_class: str, modality: str, study: str | None, sop: str | None, compressed: bool, **extra: Any
) -> bytes:
    ds = image_dataset(np.arange(64, dtype=np.uint8).reshape(8, 8))
    if compressed:
        from PIL import Image

        from xray_files import jpeg_bytes

        ds = encapsulated(ds, JPEGBaseline8Bit, [jpeg_bytes(Image.new("L", (8, 8), 128))])
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if sop is not None:
        ds.SOPInstanceUID = sop
    ds.AccessionNumber = "ACC0042"
    ds.ViewPosition = "PA"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return dicom_bytes(ds)


def test_the_header_is_read_without_the_pixels() -> None:
    instance = read_instance(dataset_bytes(compressed=True))
    assert instance.sop_class_uid == DX and instance.modality == "DX"
    assert instance.accession == "ACC0042" and instance.view_position == "PA"
    assert is_uid(instance.study_uid) and is_uid(instance.series_uid) and is_uid(instance.sop_instance_uid)
    for garbage in [b"", b"not DICOM", b"\x00" * 128 + b"DICM" + b"\xff" * 40, dataset_bytes()[:150]]:
        with pytest.raises(InvalidInstance):
            read_instance(garbage)


def test_the_chest_decision_is_the_pacs_feeds_one(tmp_path: Path) -> None:
    chest = {"chest_modalities": ["CR", "DX"], "chest_sop_classes": ["1.2.840.10008.5.1.4.1.1.1", DX]}
    receiver, _ = make_receiver(tmp_path, **chest)
    assert receiver.chest == ChestFilter.from_settings(Settings.load(**chest))

    def decide(sop_class: str, modality: str | None) -> bool:
        return receiver.chest.admits(Instance(sop_class_uid=sop_class, modality=modality))

    assert decide(DX, "DX") and decide("1.2.840.10008.5.1.4.1.1.1", "CR") and decide(DX, "dx")
    assert not decide(CT, "CT")
    assert not decide(CT, "DX")  # a CT slice mislabelled DX is still a CT slice
    assert not decide(DX, "MG")
    assert not decide(DX, None)  # as producers.pacs decides: both must say chest


def test_event_ids_repeat_for_the_same_bytes_only() -> None:
    assert event_id_for("1.2.3", b"abc") == event_id_for("1.2.3", b"abc")
    assert event_id_for("1.2.3", b"abc") != event_id_for("1.2.3", b"abd")
    assert event_id_for("1.2.3", b"abc") != event_id_for("1.2.4", b"abc")


# ------------------------------------------------------------------------------------------------ receiver


def make_receiver(tmp_path: Path, publisher: FakePublisher | None = None, **overrides: Any) -> tuple[Receiver, Path]:
    root = tmp_path / "root"
    settings = Settings.load(
        **{
            "allowed_roots": [root],
            "scp_storage": root / "scp",
            "scp_allowed_callers": ["MODALITY@127.0.0.1"],
            "scp_min_free_bytes": 0,
            **overrides,
        }
    )
    storage = storage_root(settings)
    return Receiver(
        settings, storage, publisher or FakePublisher(), parse_callers(settings.scp_allowed_callers)
    ), storage


def stored_files(storage: Path) -> list[Path]:
    return sorted(p for p in storage.rglob("*") if p.is_file())


def test_an_instance_is_stored_byte_for_byte_then_announced(tmp_path: Path) -> None:
    publisher = FakePublisher()
    receiver, storage = make_receiver(tmp_path, publisher)
    data = dataset_bytes(compressed=True)
    instance = read_instance(data)
    assert receiver.store(data, affected_sop_instance_uid=instance.sop_instance_uid) == SUCCESS
    path = storage / str(instance.study_uid) / str(instance.series_uid) / f"{instance.sop_instance_uid}.dcm"
    assert stored_files(storage) == [path]
    assert path.read_bytes() == data
    [ref] = publisher.sent
    assert parse_reference(ref.to_json()) == ref
    assert ref.uri == path.as_uri()
    assert (ref.study_uid, ref.series_uid, ref.sop_instance_uid) == (
        instance.study_uid,
        instance.series_uid,
        instance.sop_instance_uid,
    )
    assert (ref.accession, ref.modality, ref.view_position) == ("ACC0042", "DX", "PA")
    assert ref.event_id == event_id_for(str(instance.sop_instance_uid), data) and ref.sent_at
    # one deadline, for this reference's own acknowledgement only: the modality is waiting
    assert publisher.wait_timeouts == [scp.PUBLISH_TIMEOUT_S] and publisher.flushes == 0
    assert receiver.published == 1
    # the modality sends it again (it never heard our answer): same file, same event id
    assert receiver.store(data) == SUCCESS
    assert publisher.sent[1].event_id == ref.event_id and stored_files(storage) == [path]


@pytest.mark.parametrize(
    "publisher",
    [
        FakePublisher(wait_error=PublishError("Kafka did not acknowledge the reference within 20 s")),
        FakePublisher(ack_only=0),  # Kafka answered, with an error for this very reference
        FakePublisher(send_error=PublishError("Kafka took no reference in time")),
        FakePublisher(send_error=RuntimeError("something unforeseen")),
    ],
    ids=["times-out", "not-acknowledged", "send-fails", "unexpected"],
)
def test_kafka_failures_answer_out_of_resources_and_count_nothing(tmp_path: Path, publisher: FakePublisher) -> None:
    receiver, storage = make_receiver(tmp_path, publisher)
    assert receiver.store(dataset_bytes()) == OUT_OF_RESOURCES
    assert receiver.published == 0 and receiver.counts.refused == 1
    assert len(stored_files(storage)) == 1  # kept: the modality's resend replaces it, under the same event id


def test_a_disk_failure_answers_out_of_resources_and_announces_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = FakePublisher()
    receiver, _ = make_receiver(tmp_path, publisher)

    def full(storage: Path, path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(scp, "write_instance", full)
    assert receiver.store(dataset_bytes()) == OUT_OF_RESOURCES
    assert publisher.sent == [] and receiver.published == 0


def test_low_free_space_refuses_the_instance_before_writing(tmp_path: Path) -> None:
    publisher = FakePublisher()
    receiver, storage = make_receiver(tmp_path, publisher, scp_min_free_bytes=10**6)
    receiver.free_bytes = lambda _: 10**6 + 10  # less than the instance would leave
    assert receiver.store(dataset_bytes()) == OUT_OF_RESOURCES
    assert stored_files(storage) == [] and publisher.sent == []


@pytest.mark.parametrize(
    "data",
    [
        b"not DICOM at all",
        dataset_bytes(study="../../../../tmp/evil"),
        dataset_bytes(sop="1.2.3/../../x"),
        dataset_bytes(study=".."),
    ],
    ids=["garbage", "study-escape", "sop-escape", "dot-dot"],
)
def test_datasets_that_cannot_be_stored_as_they_are_are_not_understood(tmp_path: Path, data: bytes) -> None:
    publisher = FakePublisher()
    receiver, storage = make_receiver(tmp_path, publisher)
    assert receiver.store(data) == CANNOT_UNDERSTAND
    assert stored_files(storage) == [] and publisher.sent == []
    assert [p for p in (tmp_path).rglob("*") if p.is_file()] == []


def test_a_dataset_that_is_not_the_instance_the_request_announced_is_refused(tmp_path: Path) -> None:
    receiver, storage = make_receiver(tmp_path)
    assert receiver.store(dataset_bytes(), affected_sop_instance_uid="1.2.3.4") == CANNOT_UNDERSTAND
    assert stored_files(storage) == []


def test_instances_that_are_not_chest_x_rays_are_stored_but_not_announced(tmp_path: Path) -> None:
    publisher = FakePublisher()
    receiver, storage = make_receiver(tmp_path, publisher)
    assert receiver.store(dataset_bytes(sop_class=CT, modality="CT")) == SUCCESS
    assert len(stored_files(storage)) == 1 and publisher.sent == []
    assert receiver.counts.stored_only == 1 and receiver.published == 0

    publisher = FakePublisher()
    receiver, storage = make_receiver(tmp_path / "all", publisher, scp_publish_non_chest=True)
    assert receiver.store(dataset_bytes(sop_class=CT, modality="CT")) == SUCCESS
    assert [ref.modality for ref in publisher.sent] == ["CT"]


def test_the_store_handler_passes_the_encoded_dataset(tmp_path: Path) -> None:
    publisher = FakePublisher()
    receiver, _ = make_receiver(tmp_path, publisher)
    data = dataset_bytes()
    sop = read_instance(data).sop_instance_uid
    event = SimpleNamespace(
        encoded_dataset=lambda include_meta=True: data, request=SimpleNamespace(AffectedSOPInstanceUID=sop)
    )
    assert receiver.handle_store(event) == SUCCESS
    broken = SimpleNamespace(request=None)  # no encoded_dataset: not a C-STORE after all
    assert receiver.handle_store(broken) == CANNOT_UNDERSTAND


def test_no_patient_data_reaches_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets: list[str] = [PATIENT_NAME, PATIENT_ID, "ACC0042"]
    for publisher, data in [
        (FakePublisher(), dataset_bytes()),
        (FakePublisher(wait_error=PublishError("Kafka did not acknowledge")), dataset_bytes()),
        (FakePublisher(), dataset_bytes(study="../../x")),
        (FakePublisher(), dataset_bytes(sop_class=CT, modality="CT")),
    ]:
        instance = read_instance(data) if b"../" not in data else None
        if instance is not None:
            secrets += [str(uid) for uid in (instance.study_uid, instance.series_uid, instance.sop_instance_uid)]
        receiver, _ = make_receiver(tmp_path / str(len(secrets)), publisher)
        receiver.store(data)
    assert caplog.records, "the receiver says what it did"
    for secret in secrets:
        assert secret not in caplog.text


# ----------------------------------------------------------------------------------------------------- serve


class ClosingPublisher(FakePublisher):
    def __init__(self) -> None:
        super().__init__()
        self.closed: list[float | None] = []

    def close(self, timeout_s: float | None = None) -> None:
        self.closed.append(timeout_s)


def test_a_port_in_use_is_a_config_error_and_the_producer_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = ClosingPublisher()
    monkeypatch.setattr(scp, "_make_publisher", lambda settings: publisher)
    with socket.socket() as taken:
        taken.bind((scp.BIND_ADDRESS, 0))
        taken.listen()
        port = taken.getsockname()[1]
        root = tmp_path / "root"
        settings = Settings.load(allowed_roots=[root], scp_storage=root / "scp", scp_port=port)
        with pytest.raises(ScpConfigError, match=f"cannot listen on port {port} .*in use") as info:
            scp.serve(settings, stop=lambda: pytest.fail("it never listened"))
    assert isinstance(info.value, ValueError)  # the command exits 2, as for any configuration to fix
    assert publisher.closed == [scp.PUBLISH_TIMEOUT_S]


def test_the_receivers_producer_blocks_no_longer_than_a_c_store_waits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    configs: list[dict[str, Any]] = []
    monkeypatch.setattr(publish, "connect", lambda config, timeout_s: configs.append(dict(config)))
    scp._make_publisher(Settings.load())
    assert configs[-1]["max_block_ms"] == scp.PUBLISH_TIMEOUT_S * 1000  # a send blocks no longer than the deadline
    assert configs[-1]["acks"] == "all"  # the other reliable defaults stay
    with caplog.at_level(logging.WARNING, logger="producers.scp"):
        scp._make_publisher(Settings.load(kafka={"max_block_ms": "60000"}))
    assert configs[-1]["max_block_ms"] == 60_000  # what is configured wins, and is warned about
    assert "longer than the 20 s a C-STORE waits for Kafka" in caplog.text
