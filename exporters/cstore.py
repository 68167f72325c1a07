"""SRs to a DICOM SCP with C-STORE: `CStoreSink` (pynetdicom), its target (`parse_cstore_target`) and what the
SCP's status means (`cstore_status_error`).

Time. A C-STORE runs on a thread of its own that the caller stops waiting for at the end of the attempt; the
association is then aborted (the instance is sent again on the next try: every SR has a deterministic SOP
Instance UID, so a PACS keeps it once).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import threading
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from exporters.errors import ExportCode, ExportError
from exporters.sinks import DUPLICATE_SOP_INSTANCE, check_timeout, part10_dataset, sop_instance_uid_of

#: An AE title (PS3.5 6.2): up to 16 characters of the default repertoire, no backslash, no control characters.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
#: DIMSE warning statuses (PS3.7 C.4, C.5): the instance was stored, perhaps with coercions.
_DIMSE_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})


def _check_ae_title(title: str, what: str) -> str:
    """The title without its insignificant spaces; `ValueError` for one DICOM does not allow."""
    if not _AE_TITLE.fullmatch(title) or not title.strip():
        raise ValueError(f"{what} must be 1 to 16 printable ASCII characters, not all spaces, without a backslash")
    return title.strip()


def parse_cstore_target(target: str) -> tuple[str, str, int]:
    """`AET@host:port` → (AE title, host, port); an IPv6 host is written in brackets (`AET@[::1]:104`)."""
    aet, at, address = target.rpartition("@")
    host, colon, port_text = address.rpartition(":")
    if not at or not colon:
        raise ValueError("the C-STORE target must be AET@host:port")
    title = _check_ae_title(aet, "the C-STORE target's AE title")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError("the C-STORE target's port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("the C-STORE target's host in brackets must be an IPv6 address") from None
        host = host[1:-1]
    elif len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ValueError("the C-STORE target's host must be a DNS name, an IPv4 address or [an IPv6 address]")
    return title, host, int(port_text)


def cstore_status_error(status: int) -> ExportError | None:
    """None when a C-STORE status means stored (success, a warning, or our own earlier copy); otherwise how it
    is treated."""
    if status in (0x0000, DUPLICATE_SOP_INSTANCE) or status in _DIMSE_WARNINGS or status & 0xF000 == 0xB000:
        return None
    if status & 0xFF00 == 0xA700:
        return ExportError(ExportCode.UNAVAILABLE, f"the SCP is out of resources (C-STORE status 0x{status:04X})")
    return ExportError(ExportCode.REJECTED, f"the SCP refused the SR (C-STORE status 0x{status:04X})")


class _CStore:
    """One association and one C-STORE, on a thread of its own so that the caller can stop waiting for it."""

    def __init__(self, sink: CStoreSink, dataset: pydicom.Dataset) -> None:
        self.sink = sink
        self.dataset = dataset
        self.done = threading.Event()
        self.error: ExportError | None = None
        self._lock = threading.Lock()
        self._assoc: Any = None
        self._abandoned = False

    def run(self) -> None:
        from pynetdicom import evt

        assoc: Any = None
        try:
            assoc = self._application_entity().associate(
                self.sink.host,
                self.sink.port,
                ae_title=self.sink.called_ae_title,
                evt_handlers=[(evt.EVT_CONN_OPEN, self._connected)],
            )
            self._finish(self._store(assoc))
        except Exception as exc:  # anything pynetdicom raises must still end the wait
            self._finish(ExportError(ExportCode.UNAVAILABLE, f"the C-STORE failed ({type(exc).__name__})"))
        finally:
            if assoc is not None and assoc.is_established:
                with contextlib.suppress(Exception):
                    if self._abandoned:
                        assoc.abort()
                    else:
                        assoc.release()

    def _application_entity(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.sink.calling_ae_title)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.sink.timeout_s
        syntax = str(self.dataset.file_meta.TransferSyntaxUID)
        syntaxes = list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        ae.add_requested_context(str(self.dataset.SOPClassUID), syntaxes)
        return ae

    def _connected(self, event: Any) -> None:
        with self._lock:
            self._assoc = event.assoc

    def _store(self, assoc: Any) -> ExportError | None:
        if not assoc.is_established:
            if assoc.is_rejected:
                answer = assoc.acceptor.primitive
                return ExportError(
                    ExportCode.UNAVAILABLE,
                    f"the SCP rejected the association (result {answer.result}, source {answer.result_source}, "
                    f"reason {answer.diagnostic})",
                )
            if assoc.is_aborted:
                return ExportError(ExportCode.UNAVAILABLE, "the SCP aborted the association")
            return ExportError(
                ExportCode.UNAVAILABLE,
                f"no association: the SCP could not be reached or did not answer within {self.sink.timeout_s:g} s",
            )
        if self._abandoned:
            return ExportError(ExportCode.UNAVAILABLE, f"the C-STORE did not end within {self.sink.timeout_s:g} s")
        sop_class = str(self.dataset.SOPClassUID)
        if not any(context.abstract_syntax == sop_class for context in assoc.accepted_contexts):
            return ExportError(ExportCode.REJECTED, f"the SCP does not accept the SR's storage class ({sop_class})")
        try:
            answer = assoc.send_c_store(self.dataset)
        except ValueError:  # no accepted transfer syntax the SR can be sent in
            return ExportError(ExportCode.REJECTED, "the SR cannot be sent in a transfer syntax the SCP accepted")
        except RuntimeError:  # the association ended under us
            return ExportError(ExportCode.UNAVAILABLE, "the association ended before the C-STORE was answered")
        if "Status" not in answer:
            return ExportError(
                ExportCode.UNAVAILABLE, f"no C-STORE answer within {self.sink.timeout_s:g} s (or the association ended)"
            )
        return cstore_status_error(int(answer.Status))

    def _finish(self, error: ExportError | None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    def abandon(self) -> None:
        """The caller stopped waiting: abort the association, if there is one yet (on a thread of its own,
        for an abort waits for pynetdicom's threads), or as soon as `associate` returns."""
        with self._lock:
            self._abandoned = True
            assoc = self._assoc
        if assoc is not None:
            threading.Thread(target=_quietly_abort, args=(assoc,), name="cxr-cstore-abort", daemon=True).start()


def _quietly_abort(assoc: Any) -> None:
    with contextlib.suppress(Exception):
        assoc.abort()


class CStoreSink:
    """Stores SRs with a DICOM C-STORE to `AET@host:port`: one association per SR, within `timeout_s` in all.

    The association is rejected, aborted or not answered: `UNAVAILABLE` (a PACS that is away or not yet set up
    for us). Status 0xA7xx (out of resources): `UNAVAILABLE`. Warnings (0xBxxx and the general ones) count as
    stored. Other failures, and an SCP that takes no SR of this storage class: `REJECTED`."""

    def __init__(self, target: str, *, calling_ae_title: str, timeout_s: float) -> None:
        self.called_ae_title, self.host, self.port = parse_cstore_target(target)
        self.calling_ae_title = _check_ae_title(calling_ae_title, "the calling AE title")
        check_timeout(timeout_s)
        self.timeout_s = float(timeout_s)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.destination = f"cstore:{self.called_ae_title}@{shown}:{self.port}"
        # pynetdicom logs DIMSE messages (with SOP instance UIDs) at INFO and DEBUG: keep its warnings only.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    def store(self, sr: pydicom.Dataset, data: bytes) -> None:
        job = _CStore(self, part10_dataset(data, sop_instance_uid_of(sr)))
        threading.Thread(target=job.run, name="cxr-cstore", daemon=True).start()
        if not job.done.wait(self.timeout_s):
            job.abandon()
            raise ExportError(ExportCode.UNAVAILABLE, f"the C-STORE did not end within {self.timeout_s:g} s")
        if job.error is not None:
            raise job.error

    def close(self) -> None:
        """Nothing is held between stores (each has its own association)."""

    def __repr__(self) -> str:
        return f"CStoreSink({self.destination!r})"
