"""The embedded PACS's demo content: a sample JPEG wrapped as DICOM must reach the model as the same pixels."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from streaming.decode import decode_image
from streaming.embedded_pacs import EmbeddedOrthanc, missing_orthanc, sample_instance


def test_a_sample_as_dicom_decodes_to_the_jpegs_own_pixels(sample_jpegs: list[Path]) -> None:
    path = sample_jpegs[0]
    data = sample_instance(path, 3)
    ds = pydicom.dcmread(BytesIO(data))
    assert ds.Modality == "DX" and ds.ViewPosition == "PA" and ds.AccessionNumber == "DEMO0003"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    with Image.open(path) as img:
        expected = np.asarray(img.convert("L"))
    assert np.array_equal(np.asarray(decode_image(data).convert("L")), expected)
    # Each call is a new instance of a new study: uploading twice is two studies, not one overwritten.
    again = pydicom.dcmread(BytesIO(sample_instance(path, 3)))
    assert again.SOPInstanceUID != ds.SOPInstanceUID and again.StudyInstanceUID != ds.StudyInstanceUID


def test_something_other_than_a_grayscale_jpeg_is_refused(tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(png)
    with pytest.raises(ValueError, match="not an 8-bit grayscale JPEG"):
        sample_instance(png)


def test_the_orthanc_configuration_keeps_it_on_loopback_with_a_password(tmp_path: Path) -> None:
    server = EmbeddedOrthanc(tmp_path)
    config = server._config()
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {server.username: server.password} and len(server.password) >= 16
    assert server.env()["CXR_DICOMWEB_ALLOWED_HOSTS"] == f"127.0.0.1:{server.http_port}"
    assert server.wado_url("1.2", "1.3", "1.4").endswith("/dicom-web/studies/1.2/series/1.3/instances/1.4")


def test_orthanc_is_installed_by_the_test_set_up() -> None:
    """`make install` installs Debian's orthanc and orthanc-dicomweb; the PACS tests must not silently skip."""
    assert missing_orthanc() is None
