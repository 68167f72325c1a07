"""`cxr produce scp`: a DICOM C-STORE receiver that stores what modalities send and announces the chest X-rays.

A modality (or a PACS forwarding rule) sends to this receiver's AE title and port. For each instance:

1. the dataset is written, exactly as it arrived (no decoding, no re-encoding: `event.encoded_dataset()`), as
   a DICOM Part 10 file with the file meta of the association, to
   `CXR_SCP_STORAGE/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`, atomically (temporary file in the same
   folder, fsync, rename, fsync of the folder; new folders are made durable too);
2. for a chest X-ray (SOP class in `CXR_CHEST_SOP_CLASSES` and modality in `CXR_CHEST_MODALITIES`, or any
   instance with `CXR_SCP_PUBLISH_NON_CHEST`) a `cxr.reference/v1` naming the stored file (`file://`) is
   published, and Kafka must acknowledge it;
3. only then does the modality hear "success" (0x0000). A write that fails, a storage whose free space would
   fall below `CXR_SCP_MIN_FREE_BYTES`, or Kafka that does not acknowledge within `PUBLISH_TIMEOUT_S`
   answers 0xA700 (out of resources), so the modality keeps the instance and sends it again later; a dataset
   whose header cannot be read, or whose UIDs are not UIDs (which could make a path leave the storage),
   answers 0xC000 (cannot understand: sending the same bytes again would not help). `PUBLISH_TIMEOUT_S` is
   one deadline per instance, for the send and the acknowledgement together, and only that instance's own
   acknowledgement is waited for: a failure on another association never fails this one.

Nothing the modality was told was stored is lost, even if the receiver is killed at any moment: the file is
durable before the reference is sent, the reference acknowledged before the answer. A crash in between makes
the modality send the instance again; its event id is a uuid5 of the SOP instance UID and a hash of the stored
bytes, so the repeated announcement carries the same event id (consumers de-duplicate on it).

What is accepted: Verification (C-ECHO) and every storage SOP class pynetdicom knows, in the transfer
syntaxes of `TRANSFER_SYNTAXES` (native little endian, JPEG baseline and lossless, JPEG-LS, JPEG 2000, RLE).
Instances that are not chest X-rays (a CT slice, a dose report sent with the images) are stored and not
announced: refusing their SOP class would make many modalities fail the whole send.

Who may send: callers named in `CXR_SCP_ALLOWED_CALLERS` (`AET`, or `AET@address`, where the address may be
a network such as `10.1.2.0/24`); an empty list refuses everyone. Associations are refused
(A-ASSOCIATE-RJ) when the called AE title is not ours, when the caller is not allowed, and, transiently, while
the storage file system has less than `CXR_SCP_MIN_FREE_BYTES` free. Timeouts, the number of associations
and the PDU size we announce are bounded; pynetdicom itself reads a PDU of whatever length the peer declares
and holds each dataset in memory, so keep the port on a network only modalities reach. Logs carry counts, AE
titles and addresses, never UIDs or other header values (pynetdicom's own INFO/DEBUG lines, which quote
UIDs, are silenced).

The pure parts (allow-list, refusal decision, storage path, chest decision, reference) are plain functions;
`Receiver` holds the I/O; `serve` wires it to pynetdicom.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from producers.folder import UnreadableHeader, read_header
from producers.pacs import ChestFilter, Instance, instance_reference, tag_text, valid_uid
from producers.publish import PublishError, WaitingPublisher
from producers.state import fsync_dir, write_atomic
from streaming.contracts import Reference
from streaming.errors import ErrorCode, FetchError
from streaming.fetch import FetchPolicy, resolve_file_uri
from streaming.settings import Settings

log = logging.getLogger(__name__)

#: uuid5 namespace of C-STORE event ids; fixed forever, or a resent instance would get a new id.
EVENT_NAMESPACE = uuid.UUID("6f0f3b0e-5d2c-4c7e-9a43-2a9e4f1d7c61")

#: Accepted transfer syntaxes, in the order of preference: when a modality offers several for one context the
#: first of these it offers is chosen. Lossless ones come first, so a modality holding native pixels is never
#: invited to compress them lossily on the way.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEG2000,
    JPEGLSNearLossless,
)

# C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
#: Refused, out of resources: the modality keeps the instance and sends it again (disk, Kafka).
OUT_OF_RESOURCES = 0xA700
#: Error, cannot understand: sending the same bytes again would not help (unreadable header, UIDs that are not).
CANNOT_UNDERSTAND = 0xC000

# Bounds of the DICOM side (the pynetdicom defaults are unbounded or very long for some of these).
ACSE_TIMEOUT_S = 10.0  # association negotiation and release (a modality asks at once)
DIMSE_TIMEOUT_S = 60.0  # waiting for a DIMSE message once associated
NETWORK_TIMEOUT_S = 60.0  # an idle association is aborted after this
MAX_ASSOCIATIONS = 8
MAX_PDU_BYTES = 256 * 1024  # what we announce; 0 would mean unlimited
#: The longest a C-STORE waits for Kafka (the send and its acknowledgement together) before answering "out of
#: resources": well inside the 30 to 60 s modalities usually wait for an answer. Also the producer's
#: `max_block_ms` unless one is configured (a longer one is warned about at start).
PUBLISH_TIMEOUT_S = 20.0
#: How long `serve` lets associations in progress finish after being asked to stop.
STOP_GRACE_S = 10.0
BIND_ADDRESS = "0.0.0.0"

#: Optional reference fields longer than this are left out (real ones are at most 16 characters).
_MAX_TEXT_CHARS = 64
_FREE_TEXT = ("accession", "modality", "view_position")


class ScpConfigError(ValueError):
    """The receiver's configuration cannot work (storage outside the allowed roots, a bad caller entry)."""


class InvalidInstance(ValueError):
    """A received dataset that cannot be stored as is; the message never quotes header values."""


# ------------------------------------------------------------------------------------------------- callers

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Caller:
    """One allow-list entry: an AE title, from anywhere (`network` None) or from one address or network."""

    ae_title: str
    network: Network | None = None

    def __str__(self) -> str:
        if self.network is None:
            return self.ae_title
        single = self.network.prefixlen == self.network.max_prefixlen
        return f"{self.ae_title}@{self.network.network_address if single else self.network}"


def _valid_ae_title(title: str) -> bool:
    return 0 < len(title) <= 16 and "\\" not in title and all(32 <= ord(c) < 127 for c in title)


def parse_caller(entry: str) -> Caller:
    """`AET` or `AET@address` (an IPv4/IPv6 address or network); `ScpConfigError` for anything else."""
    text = entry.strip()
    title, at, address = text.rpartition("@")
    if not at:
        title, address = text, ""
    title = title.strip()
    if not _valid_ae_title(title):
        raise ScpConfigError(
            f"CXR_SCP_ALLOWED_CALLERS: {entry!r} does not start with an AE title (1 to 16 printable ASCII characters, "
            "no backslash)"
        )
    if not at:
        return Caller(title)
    try:
        network = ipaddress.ip_network(address.strip(), strict=False)
    except ValueError:
        raise ScpConfigError(
            f"CXR_SCP_ALLOWED_CALLERS: {entry!r}: after '@' comes an IP address or network (e.g. 10.1.2.3 or "
            "10.1.2.0/24), not a host name"
        ) from None
    return Caller(title, network)


def parse_callers(entries: Iterable[str]) -> tuple[Caller, ...]:
    return tuple(parse_caller(entry) for entry in entries if entry.strip())


def normalise_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP address; an IPv4-mapped IPv6 address (a dual-stack socket) as the IPv4 address it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _calls_from(caller: Caller, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    if caller.network is None:
        return True
    return ip is not None and ip.version == caller.network.version and ip in caller.network


def caller_allowed(callers: Sequence[Caller], ae_title: str, address: str) -> bool:
    """Whether a calling AE title (case-sensitive, surrounding spaces ignored) may call from `address`."""
    title = ae_title.strip()
    ip = normalise_address(address)
    return any(caller.ae_title == title and _calls_from(caller, ip) for caller in callers)


def address_may_call(callers: Sequence[Caller], address: str) -> bool:
    """Whether any allowed caller may call from `address`. Checked when the TCP connection is accepted, before
    any DICOM is read: a stranger's idle connections would otherwise hold association slots until the ACSE
    timeout, keeping the modalities out."""
    ip = normalise_address(address)
    return any(_calls_from(caller, ip) for caller in callers)


class Refusal(NamedTuple):
    """An A-ASSOCIATE-RJ: result, source, diagnostic (PS3.8 9.3.4), and why, for the log."""

    result: int
    source: int
    diagnostic: int
    why: str


CALLED_AE_TITLE_NOT_RECOGNISED = Refusal(0x01, 0x01, 0x07, "called AE title not recognised")
CALLING_AE_TITLE_NOT_RECOGNISED = Refusal(0x01, 0x01, 0x03, "calling AE title not recognised")
LOCAL_LIMIT_EXCEEDED = Refusal(0x02, 0x03, 0x02, "local limit exceeded: the storage is low on free space")
#: Fail closed: something went wrong while deciding (transient, no reason given).
NO_REASON = Refusal(0x02, 0x01, 0x01, "the receiver could not decide (see the log)")


def association_refusal(
    *,
    called_ae_title: str,
    calling_ae_title: str,
    address: str,
    our_ae_title: str,
    callers: Sequence[Caller],
    free_bytes: int,
    min_free_bytes: int,
) -> Refusal | None:
    """Why an association request must be refused, or None to accept it. Permanent reasons come first."""
    if called_ae_title.strip() != our_ae_title.strip():
        return CALLED_AE_TITLE_NOT_RECOGNISED
    if not caller_allowed(callers, calling_ae_title, address):
        return CALLING_AE_TITLE_NOT_RECOGNISED
    if free_bytes < min_free_bytes:
        return LOCAL_LIMIT_EXCEEDED
    return None


# ------------------------------------------------------------------------------------------------- storage


def storage_root(settings: Settings) -> Path:
    """`scp_storage`, created and resolved; `ScpConfigError` unless it lies inside `allowed_roots`.

    The scorer reads `file://` references only from the allowed roots, so storage elsewhere would make every
    announcement a `forbidden_uri` dead letter: refuse to start instead."""
    storage = Path(os.path.expanduser(settings.scp_storage)).absolute()
    # The scorer's own test (`Settings` resolved the roots already), on the URI the references will carry.
    policy = FetchPolicy(allowed_roots=tuple(settings.allowed_roots))

    def check() -> Path:
        try:
            return resolve_file_uri(storage.as_uri(), policy)
        except FetchError as exc:
            if exc.code is not ErrorCode.FORBIDDEN_URI:
                raise ScpConfigError(f"the storage folder {storage} (CXR_SCP_STORAGE, --storage): {exc}") from None
            raise ScpConfigError(
                f"the storage folder {storage.resolve()} (CXR_SCP_STORAGE, --storage) is not inside "
                f"CXR_ALLOWED_ROOTS ({', '.join(map(str, policy.allowed_roots)) or 'none'}): the scorer could not "
                "read what the receiver stores"
            ) from None

    check()  # before creating anything
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScpConfigError(f"cannot create the storage folder {storage}: {exc.strerror}") from None
    return check()  # again, now that it exists (a symbolic link followed)


def instance_path(storage: Path, study_uid: str | None, series_uid: str | None, sop_instance_uid: str | None) -> Path:
    """`storage/<study>/<series>/<sop>.dcm`; `InvalidInstance` unless all three are UID-shaped."""
    for what, uid in (("study", study_uid), ("series", series_uid), ("SOP instance", sop_instance_uid)):
        if not valid_uid(uid):
            raise InvalidInstance(f"the {what} UID is missing or not a UID (digits and dots, at most 64)")
    return storage / str(study_uid) / str(series_uid) / f"{sop_instance_uid}.dcm"


def _make_dirs(storage: Path, folder: Path) -> None:
    """Create the folders between `storage` and `folder`, each made durable in its parent; never leaves storage."""
    current = storage
    for part in folder.relative_to(storage).parts:
        parent, current = current, current / part
        try:
            os.mkdir(current, 0o750)
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():  # planted there: never follow it out
                raise InvalidInstance("the instance's folder in the storage is not a plain folder") from None
        else:
            fsync_dir(parent)


def write_instance(storage: Path, path: Path, data: bytes) -> None:
    """Write `data` to `path` (inside `storage`) so that it is there whole after a crash, or not at all."""
    _make_dirs(storage, path.parent)
    write_atomic(path, data)


# ----------------------------------------------------------------------------------------------- instances


def read_instance(data: bytes) -> Instance:
    """The header of a Part 10 file (pixel data is not read; `producers.folder.read_header`), as the PACS
    feeds see an instance; `InvalidInstance` when it cannot be read or names no valid SOP class."""
    try:
        values = read_header(data)
    except UnreadableHeader:
        raise InvalidInstance("the dataset's header cannot be read") from None
    if not valid_uid(values["sop_class_uid"]):
        raise InvalidInstance("the SOP class UID is missing or not a UID")
    for name in _FREE_TEXT:  # real ones are short; a hostile one must not make the reference unparseable
        value = values[name]
        if value is not None and len(value) > _MAX_TEXT_CHARS:
            values[name] = None
    return Instance(**values)


def event_id_for(sop_instance_uid: str, data: bytes) -> str:
    """The same instance stored with the same bytes always has the same event id, whoever announces it."""
    digest = hashlib.sha256(data).hexdigest()
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{sop_instance_uid}\n{digest}"))


def reference_for(instance: Instance, path: Path, data: bytes) -> Reference:
    """The reference announcing a stored instance by its `file://` URI (`path` absolute, as stored; `data` its
    bytes). The PACS feeds' `producers.pacs.reference_for` names a WADO-RS URL instead."""
    return instance_reference(instance, path.as_uri(), event_id_for(str(instance.sop_instance_uid), data))


# ---------------------------------------------------------------------------------------------- the receiver


def free_bytes_of(folder: Path) -> int:
    """Bytes an unprivileged writer may still use on `folder`'s file system."""
    return shutil.disk_usage(folder).free


def _os_error(exc: OSError) -> str:
    """An OSError without its file name (which holds UIDs)."""
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name} {exc.strerror or type(exc).__name__}".strip()


@dataclass
class Counts:
    published: int = 0
    stored_only: int = 0
    refused: int = 0


class Receiver:
    """Stores and announces instances; the pynetdicom handlers are thin wrappers around `store`.

    `callers` is the parsed `settings.scp_allowed_callers` (`parse_callers`); a chest X-ray is decided by the
    PACS feeds' rule (`producers.pacs.ChestFilter`, `self.chest`)."""

    def __init__(
        self,
        settings: Settings,
        storage: Path,
        publisher: WaitingPublisher,
        callers: Sequence[Caller],
        *,
        free_bytes: Callable[[Path], int] = free_bytes_of,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.publisher = publisher
        self.callers = tuple(callers)
        self.chest = ChestFilter.from_settings(settings)
        self.free_bytes = free_bytes
        self.publish_timeout_s = publish_timeout_s
        self.counts = Counts()
        self._lock = threading.Lock()

    @property
    def published(self) -> int:
        with self._lock:
            return self.counts.published

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self.counts, what, getattr(self.counts, what) + 1)

    # ------------------------------------------------------------------------------------ associations

    def refusal(self, called_ae_title: str, calling_ae_title: str, address: str) -> Refusal | None:
        try:
            free = self.free_bytes(self.storage)
        except OSError as exc:
            log.error("cannot tell the storage's free space (%s): refusing associations", _os_error(exc))
            return LOCAL_LIMIT_EXCEEDED
        return association_refusal(
            called_ae_title=called_ae_title,
            calling_ae_title=calling_ae_title,
            address=address,
            our_ae_title=self.settings.scp_ae_title,
            callers=self.callers,
            free_bytes=free,
            min_free_bytes=self.settings.scp_min_free_bytes,
        )

    def handle_requested(self, event: Any) -> None:
        """EVT_REQUESTED: refuse (A-ASSOCIATE-RJ) before pynetdicom negotiates, or let it go on."""
        assoc = event.assoc
        calling, address = "?", "?"
        try:
            request = assoc.requestor.primitive
            calling = str(request.calling_ae_title).strip()
            address = str(assoc.requestor.address)
            refusal = self.refusal(str(request.called_ae_title), calling, address)
        except Exception as exc:  # fail closed
            log.error("could not check an association request (%s): refusing it", type(exc).__name__)
            refusal = NO_REASON
        if refusal is None:
            log.info("association from %s@%s accepted", calling, address)
            return
        log.warning("association from %s@%s refused: %s", calling, address, refusal.why)
        assoc.acse.send_reject(refusal.result, refusal.source, refusal.diagnostic)
        assoc.kill()  # as pynetdicom does for its own refusals: waits until the peer has read the answer

    # ----------------------------------------------------------------------------------------- C-STORE

    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE: the status for the modality. Never raises (pynetdicom would log the traceback)."""
        try:
            data = event.encoded_dataset(include_meta=True)
            affected = tag_text(getattr(event.request, "AffectedSOPInstanceUID", None))
        except Exception as exc:
            log.error("could not read a received dataset (%s)", type(exc).__name__)
            self._count("refused")
            return CANNOT_UNDERSTAND
        return self.store(data, affected_sop_instance_uid=affected)

    def store(self, data: bytes, *, affected_sop_instance_uid: str | None = None) -> int:
        """Store one Part 10 file and announce it; the C-STORE status to answer."""
        try:
            return self._store(data, affected_sop_instance_uid)
        except Exception as exc:  # anything unforeseen: keep the instance at the modality
            log.error("could not store an instance (%s): answered out of resources", type(exc).__name__)
            self._count("refused")
            return OUT_OF_RESOURCES

    def _store(self, data: bytes, affected: str | None) -> int:
        try:
            instance = read_instance(data)
            if affected is not None and instance.sop_instance_uid != affected:
                raise InvalidInstance("the dataset's SOP instance UID is not the one the request announced")
            path = instance_path(self.storage, instance.study_uid, instance.series_uid, instance.sop_instance_uid)
        except InvalidInstance as exc:
            log.warning("refused an instance: %s", exc)
            self._count("refused")
            return CANNOT_UNDERSTAND

        try:
            free = self.free_bytes(self.storage)
            if free - len(data) < self.settings.scp_min_free_bytes:
                log.warning("refused an instance: the storage is low on free space (%d bytes left)", free)
                self._count("refused")
                return OUT_OF_RESOURCES
            write_instance(self.storage, path, data)
        except InvalidInstance as exc:
            log.warning("refused an instance: %s", exc)
            self._count("refused")
            return CANNOT_UNDERSTAND
        except OSError as exc:
            log.error("could not store an instance (%s): answered out of resources", _os_error(exc))
            self._count("refused")
            return OUT_OF_RESOURCES

        if not self.chest.admits(instance) and not self.settings.scp_publish_non_chest:
            self._count("stored_only")
            log.info("stored an instance that is not a chest X-ray (not announced)")
            return SUCCESS

        reference = reference_for(instance, path, data)
        try:  # one deadline for the send and the acknowledgement; only this reference's own is waited for
            self.publisher.send_and_wait(reference, timeout_s=self.publish_timeout_s)
        except PublishError as exc:
            log.error("Kafka did not acknowledge a reference (%s): answered out of resources", exc)
            self._count("refused")
            return OUT_OF_RESOURCES
        except Exception as exc:
            log.error("could not publish a reference (%s): answered out of resources", type(exc).__name__)
            self._count("refused")
            return OUT_OF_RESOURCES
        self._count("published")
        return SUCCESS


# --------------------------------------------------------------------------------------------- pynetdicom


def application_entity(settings: Settings) -> Any:
    """The AE: our title, bounded timeouts, associations and PDU size; C-ECHO and every storage class."""
    from pynetdicom import AE, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=settings.scp_ae_title)
    ae.acse_timeout = ACSE_TIMEOUT_S
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    ae.network_timeout = NETWORK_TIMEOUT_S
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.require_called_aet = True  # also checked, first, by `Receiver.handle_requested`
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
    return ae


def _quiet_pynetdicom() -> None:
    """pynetdicom logs DIMSE messages (with SOP instance UIDs) at INFO and DEBUG: keep its warnings only."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _make_publisher(settings: Settings) -> Any:
    from producers.publish import ReferencePublisher

    # A send must not block a C-STORE past its deadline when Kafka is away (a configured value still wins).
    publisher = ReferencePublisher.for_settings(
        settings, client_defaults={"max_block_ms": int(PUBLISH_TIMEOUT_S * 1000)}
    )
    if publisher.max_block_s > PUBLISH_TIMEOUT_S:
        log.warning(
            "the configured Kafka max.block.ms (%.0f s) is longer than the %.0f s a C-STORE waits for Kafka: while "
            "Kafka is away a modality may wait that long for its answer",
            publisher.max_block_s,
            PUBLISH_TIMEOUT_S,
        )
    return publisher


def _bind_error(port: int, exc: OSError) -> ScpConfigError:
    if exc.errno == errno.EADDRINUSE:
        why = "the port is in use (another receiver, or another program, listens on it)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied (ports below 1024 need privileges)"
    else:
        why = _os_error(exc)
    return ScpConfigError(f"cannot listen on port {port} (CXR_SCP_PORT, --port): {why}")


def serve(
    settings: Settings,
    *,
    stop: Callable[[], bool],
    publisher: WaitingPublisher | None = None,
    watch: Callable[[Receiver], None] | None = None,
) -> int:
    """Receive until `stop()` is true; the number of references published (acknowledged by Kafka). `watch` gets
    the receiver once it listens (its `/readyz` and `/metrics`, `producers.health`).

    Raises `ScpConfigError` (a configuration to fix) when the storage is outside the allowed roots or a caller
    entry cannot be read (before Kafka is contacted), or when the port cannot be bound (in use, privileged);
    `PublishError` when Kafka cannot be reached at start. The producer made here is closed however it ends."""
    from pynetdicom import evt

    from streaming.logs import silence_header_quoters

    silence_header_quoters()
    _quiet_pynetdicom()
    storage = storage_root(settings)
    callers = parse_callers(settings.scp_allowed_callers)  # a bad entry stops us before Kafka is contacted
    if not callers:
        log.warning("CXR_SCP_ALLOWED_CALLERS is empty: every association will be refused")
    own_publisher = publisher is None
    active_publisher: Any = _make_publisher(settings) if publisher is None else publisher
    receiver = Receiver(settings, storage, active_publisher, callers)  # plain assignments: cannot fail
    ae: Any = None
    server: Any = None
    try:
        ae = application_entity(settings)
        handlers = [
            (evt.EVT_REQUESTED, receiver.handle_requested),
            (evt.EVT_C_STORE, receiver.handle_store),
        ]
        try:
            server = ae.start_server((BIND_ADDRESS, settings.scp_port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise _bind_error(settings.scp_port, exc) from None
        # socketserver closes a connection this refuses at once; an AE title without an address allows any.
        server.verify_request = lambda request, client: address_may_call(callers, client[0])
        log.info(
            "C-STORE receiver %s listening on port %d; storing in %s; %d caller(s) allowed: %s",
            settings.scp_ae_title,
            settings.scp_port,
            storage,
            len(callers),
            ", ".join(map(str, callers)) or "none",
        )
        if watch is not None:
            watch(receiver)
        while not stop():
            time.sleep(0.2)
    finally:
        if server is not None:
            server.shutdown()  # no new associations
            deadline = time.monotonic() + STOP_GRACE_S
            while ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.1)
        if ae is not None:
            ae.shutdown()  # aborts what is left: the modality sends those instances again
        if own_publisher:
            try:
                active_publisher.close(timeout_s=PUBLISH_TIMEOUT_S)
            except PublishError as exc:  # every answered instance was acknowledged already; just say so
                log.warning("closing the Kafka producer: %s", exc)
        counts = receiver.counts
        log.info(
            "receiver stopped: %d published, %d stored but not announced (not chest X-rays), %d refused",
            counts.published,
            counts.stored_only,
            counts.refused,
        )
    return receiver.published
