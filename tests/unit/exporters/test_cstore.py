"""The C-STORE sink's rules, without a PACS: which targets and AE titles it takes, how it prints its
destination, and what each C-STORE status means (against a real Orthanc: tests/integration/test_export_sinks.py).
"""

from __future__ import annotations

import pytest

from exporters.cstore import CStoreSink, cstore_status_error, parse_cstore_target
from exporters.errors import ExportCode

TIMEOUT_S = 1.0


@pytest.mark.parametrize(
    ("target", "parsed"),
    [
        ("ORTHANC@127.0.0.1:4242", ("ORTHANC", "127.0.0.1", 4242)),
        ("PACS_1@pacs.hospital.example:104", ("PACS_1", "pacs.hospital.example", 104)),
        ("MY AE@host:11112", ("MY AE", "host", 11112)),
        ("A@B@host:104", ("A@B", "host", 104)),
        ("STORESCP@[::1]:104", ("STORESCP", "::1", 104)),
        ("SIXTEEN_CHARS_AE@h:65535", ("SIXTEEN_CHARS_AE", "h", 65535)),
    ],
)
def test_parse_cstore_target(target: str, parsed: tuple[str, str, int]) -> None:
    assert parse_cstore_target(target) == parsed


@pytest.mark.parametrize(
    "target",
    [
        "",
        "ORTHANC",
        "ORTHANC@host",
        "host:104",
        "@host:104",
        "   @host:104",
        "SEVENTEEN_CHARS_A@host:104",
        "BACK\\SLASH@host:104",
        "TAB\tAE@host:104",
        "AE@host:0",
        "AE@host:65536",
        "AE@host:0104",
        "AE@host:port",
        "AE@host:",
        "AE@:104",
        "AE@::1:104",
        "AE@[not-ipv6]:104",
        "AE@ho st:104",
        "AE@host/x:104",
    ],
)
def test_bad_cstore_targets_are_refused(target: str) -> None:
    with pytest.raises(ValueError):
        parse_cstore_target(target)


def test_cstore_sink_checks_its_titles_and_prints_its_destination() -> None:
    sink = CStoreSink("ORTHANC@[::1]:4242", calling_ae_title="CXR_STREAM", timeout_s=TIMEOUT_S)
    assert sink.destination == "cstore:ORTHANC@[::1]:4242"
    assert repr(sink) == "CStoreSink('cstore:ORTHANC@[::1]:4242')"
    with pytest.raises(ValueError):
        CStoreSink("ORTHANC@host:4242", calling_ae_title="A_CALLING_TITLE_TOO_LONG", timeout_s=TIMEOUT_S)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (0x0000, None),
        (0xB000, None),  # coercion of data elements: stored
        (0xB007, None),
        (0xB006, None),
        (0x0001, None),
        (0x0111, None),  # a duplicate SOP instance: our own earlier delivery of this very report
        (0xA700, ExportCode.UNAVAILABLE),  # out of resources: it may pass
        (0xA7FF, ExportCode.UNAVAILABLE),
        (0xA900, ExportCode.REJECTED),  # dataset does not match SOP class
        (0xC000, ExportCode.REJECTED),  # cannot understand
        (0xC123, ExportCode.REJECTED),
        (0x0122, ExportCode.REJECTED),  # SOP class not supported
        (0x0110, ExportCode.REJECTED),  # processing failure
    ],
)
def test_cstore_statuses(status: int, code: ExportCode | None) -> None:
    error = cstore_status_error(status)
    assert (error.code if error else None) == code
    if error is not None:
        assert f"0x{status:04X}" in error.reason
