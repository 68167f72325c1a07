"""A real Orthanc PACS for the tests: Debian's `orthanc` and `orthanc-dicomweb`, on loopback ports.

`OrthancServer` starts `/usr/sbin/Orthanc` with a configuration of its own (HTTP basic authentication on,
the DICOMweb plugin loaded, remote access off) as an unprivileged process: when the tests run as root (CI),
it drops to `nobody` with `setpriv`. It can be stopped and started again on the same ports and storage, for
outage tests. `chest_xray_dicoms` turns the sixteen real sample X-rays into DICOM files, so that the same
instance can reach the scorer as a file, through Orthanc and DICOMweb, or through the C-STORE receiver.

Orthanc is part of the test set-up (`make install` installs it where it can); a missing Orthanc fails the tests
that need it, it never skips them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, generate_uid

from streaming.broker import free_ports
from xray_files import dicom_bytes, encapsulated, encoder_available, image_dataset

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
NOBODY = 65534
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def missing_orthanc() -> str | None:
    """Why Orthanc cannot run here, or None."""
    for path in (ORTHANC, DICOMWEB_PLUGIN):
        if not Path(path).exists():
            return f"{path} is missing: install Debian's orthanc and orthanc-dicomweb (make install does, as root)"
    return None


@dataclass
class OrthancServer:
    """One Orthanc process; `url` is its REST root, `dicomweb_root` its DICOMweb service root."""

    workdir: Path
    username: str = "cxr"
    password: str = "orthanc-test-secret"
    aet: str = "ORTHANC"
    http_port: int = 0
    dicom_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.http_port:
            self.http_port, self.dicom_port = free_ports(2)

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
        storage = self.workdir / "storage"
        return {
            "Name": "cxr-test-orthanc",
            "DicomAet": self.aet,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False,
            "HttpServerThreads": 8,
            "DicomModalities": {},
            "UnknownSopClassAccepted": True,
        }

    def start(self, timeout_s: float = 60.0) -> OrthancServer:
        why = missing_orthanc()
        if why:
            raise RuntimeError(why)
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=2))
        command: list[str] = [ORTHANC, str(config)]
        if os.geteuid() == 0:  # CI runs as root: Orthanc does not need to, so it does not
            for path in (self.workdir, *self.workdir.rglob("*")):
                os.chown(path, NOBODY, NOBODY)
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise RuntimeError("setpriv (util-linux) is needed to run Orthanc unprivileged")
            command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
        log = (self.workdir / "orthanc.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start ({self.process.returncode}): {self.log()[-2000:]}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s: {self.log()[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def log(self) -> str:
        path = self.workdir / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---------------------------------------------------------------------------------------------- REST

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        token = b64encode(f"{self.username}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
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

    def instance_count(self) -> int:
        return len(self.get("/instances"))

    def last_change(self) -> int:
        return int(self.get("/changes?last")["Last"])


# ------------------------------------------------------------------------------------------ test images


@dataclass(frozen=True)
class ChestDicom:
    """One sample X-ray as a DICOM file: its bytes, its UIDs and the transfer syntax it was written in."""

    name: str
    data: bytes
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def chest_xray_dicoms(jpegs: Sequence[Path], modality: str = "DX") -> list[ChestDicom]:
    """The sample JPEGs as DX (or CR) "PA" instances, each decoding to exactly the JPEG's pixels.

    They cycle through transfer syntaxes a modality would use: the JPEG itself encapsulated (JPEG baseline),
    explicit VR little endian (native pixels), and JPEG 2000 lossless where pydicom can encode it. Each gets
    a study of its own (with an accession number), so results are keyed per study.
    """
    syntaxes = ["jpeg-baseline", "native"]
    if encoder_available(JPEG2000Lossless):
        syntaxes.append("jpeg2000-lossless")
    files = []
    for index, path in enumerate(jpegs):
        jpeg = path.read_bytes()
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L"), dtype=np.uint8)
        syntax = syntaxes[index % len(syntaxes)]
        ds = image_dataset(pixels)
        if syntax == "jpeg-baseline":
            ds = encapsulated(ds, JPEGBaseline8Bit, [jpeg])
        elif syntax == "jpeg2000-lossless":
            ds.compress(JPEG2000Lossless, pixels)
        ds.SOPClassUID = CR_STORAGE if modality == "CR" else DX_FOR_PRESENTATION
        ds.Modality = modality
        ds.ViewPosition = "PA"
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.AccessionNumber = f"ACC{index:04d}"
        ds.StudyDate = time.strftime("%Y%m%d")
        ds.StudyTime = time.strftime("%H%M%S")
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        files.append(
            ChestDicom(
                name=path.stem,
                data=dicom_bytes(ds),
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            )
        )
    return files


def non_chest_dicom() -> bytes:
    """A small CT slice: a PACS feed must skip it (and count it), never publish it."""
    ds = image_dataset(np.zeros((16, 16), dtype=np.uint8))
    ds.SOPClassUID = CT_STORAGE
    ds.Modality = "CT"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = time.strftime("%Y%m%d")
    return dicom_bytes(ds)
