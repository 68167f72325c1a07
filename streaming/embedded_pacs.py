"""An embedded PACS for `cxr demo --pacs` and the tests: Debian's Orthanc with its DICOMweb plugin, on loopback.

Like the embedded Kafka broker, it is for trying cxr-stream on one machine, not for production. Orthanc runs
with a configuration of its own (HTTP basic authentication on, remote access off, the DICOMweb plugin loaded)
as an unprivileged process: started as root, it drops to `nobody` with `setpriv`. `stop()` then `start()`
brings it back on the same ports and storage (outage tests). `sample_instance` wraps a sample JPEG as a DX
instance without re-encoding it (JPEG baseline transfer syntax), so the PACS path scores the very pixels the
file path does.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path
from typing import Any

from streaming.broker import free_ports, spawn_tied
from streaming.settings import basic_authorization

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
NOBODY = 65534
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


class PacsSetupError(RuntimeError):
    """Orthanc is not installed or does not start: the operator must fix the machine (exit 2)."""


def missing_orthanc() -> str | None:
    """Why Orthanc cannot run here, or None."""
    for path in (ORTHANC, DICOMWEB_PLUGIN):
        if not path.exists():
            return (
                f"{path} is missing: install Debian's orthanc and orthanc-dicomweb packages "
                "(make install does, when run as root)"
            )
    return None


class EmbeddedOrthanc:
    """One Orthanc process; `url` is its REST root, `dicomweb_root` its DICOMweb service root."""

    def __init__(
        self, workdir: Path, *, username: str = "cxr", password: str | None = None, aet: str = "ORTHANC"
    ) -> None:
        self.workdir = workdir
        self.username = username
        self.password = password or secrets.token_urlsafe(16)
        self.aet = aet
        self.http_port, self.dicom_port = free_ports(2)
        self._process: subprocess.Popen[bytes] | None = None
        #: Where Orthanc's files live: `workdir`, unless Orthanc's user cannot reach it (see `start`).
        self.home = workdir

    @property
    def host_port(self) -> str:
        """What `CXR_DICOMWEB_ALLOWED_HOSTS` must name for references to this server."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    @property
    def dicomweb_root(self) -> str:
        return f"{self.url}/dicom-web"

    def env(self) -> dict[str, str]:
        """The settings a scorer or a feed needs to reach this server."""
        return {
            "CXR_DICOMWEB_ALLOWED_HOSTS": self.host_port,
            "CXR_DICOMWEB_USERNAME": self.username,
            "CXR_DICOMWEB_PASSWORD": self.password,
        }

    def wado_url(self, study: str, series: str, sop: str) -> str:
        return f"{self.dicomweb_root}/studies/{study}/series/{series}/instances/{sop}"

    # ------------------------------------------------------------------------------------------- lifecycle

    def _config(self) -> dict[str, Any]:
        storage = self.home / "storage"
        return {
            "Name": "cxr-embedded-orthanc",
            "DicomAet": self.aet,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False,
            "HttpServerThreads": 8,
            "DicomModalities": {},
        }

    def start(self, timeout_s: float = 60.0) -> EmbeddedOrthanc:
        why = missing_orthanc()
        if why:
            raise PacsSetupError(why)
        root = os.geteuid() == 0
        if root and self.home == self.workdir and not _reachable_by_others(self.workdir):
            # Orthanc runs as nobody, who cannot pass a private parent (pytest's and mkdtemp's are 0700):
            # it gets a folder of its own in the system's temporary folder, kept across stop and start.
            self.home = Path(tempfile.mkdtemp(prefix="cxr-orthanc-"))
        (self.home / "storage").mkdir(parents=True, exist_ok=True)
        config = self.home / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=2))
        config.chmod(0o600)  # it holds the password
        command: list[str] = [str(ORTHANC), str(config)]
        if root:  # Orthanc does not need root, so it does not get it
            for path in (self.home, *self.home.rglob("*")):
                os.chown(path, NOBODY, NOBODY)
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise PacsSetupError("setpriv (util-linux) is needed to run Orthanc unprivileged")
            # Changing the user clears the parent-death signal `spawn_tied` set, so setpriv sets it again.
            command = [
                setpriv,
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "--pdeathsig=KILL",
                *command,
            ]
        with (self.home / "orthanc.log").open("ab") as log:
            self._process = spawn_tied(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.home)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PacsSetupError(f"Orthanc exited at start ({self._process.returncode}): {self.log()[-2000:]}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise PacsSetupError(f"Orthanc did not answer within {timeout_s:.0f} s: {self.log()[-2000:]}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        self._process = None

    def close(self) -> None:
        """Stop for good: a home this instance made itself (it holds the password) goes too."""
        self.stop()
        if self.home != self.workdir:
            shutil.rmtree(self.home, ignore_errors=True)

    def log(self) -> str:
        path = self.home / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---------------------------------------------------------------------------------------------- REST

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        request.add_header("Authorization", basic_authorization(self.username, self.password))
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def upload(self, data: bytes) -> str:
        """Store one Part 10 file through the REST API (as a modality's gateway would); its Orthanc id."""
        answer = json.loads(self._request("POST", "/instances", data, "application/dicom"))
        return str(answer["ID"])

    def clear(self) -> None:
        """Delete every patient (the change feed's sequence numbers go on growing)."""
        for patient in self.get("/patients"):
            try:
                self._request("DELETE", f"/patients/{patient}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise

    def last_change(self) -> int:
        return int(self.get("/changes?last")["Last"])


def _reachable_by_others(folder: Path) -> bool:
    """Whether every folder above `folder` lets other users through (o+x)."""
    return all(os.stat(parent).st_mode & stat.S_IXOTH for parent in folder.resolve().parents)


def sample_instance(jpeg: Path, index: int = 0) -> bytes:
    """A sample chest X-ray JPEG as a DX "PA" instance of a study of its own, its JPEG stream kept as is.

    The demo's patient is a placeholder; the pixels are the JPEG's (encapsulated, not re-encoded)."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    data = jpeg.read_bytes()
    with Image.open(BytesIO(data)) as img:
        if img.format != "JPEG" or img.mode != "L":
            raise ValueError(f"{jpeg.name} is not an 8-bit grayscale JPEG")
        columns, rows = img.size
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "DEMO^PATIENT"
    ds.PatientID = f"DEMO{index:04d}"
    ds.AccessionNumber = f"DEMO{index:04d}"
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.StudyDate = time.strftime("%Y%m%d")
    ds.StudyTime = time.strftime("%H%M%S")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([data])
    ds["PixelData"].VR = "OB"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
