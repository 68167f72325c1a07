"""No patient data in logs: `cxr run` end to end, then everything it printed is scanned for what it was sent.

Logs travel further than results (to collectors, tickets, screenshots), so the job logs counts and codes, never
URIs, UIDs, accession numbers or header values. This test sends DICOM files that carry unique fake patient data
(valid ones, and broken ones that make pydicom warn or fail), PNG/JPEG files whose names carry a token, and
hostile messages that carry tokens wherever a message can (invalid JSON, bytes that are not UTF-8, a forbidden
path, a missing file, a DICOMweb URL on a host that is not allowed). Once every message is answered, the job's
stdout and stderr (in local mode they include Spark's log4j output and the Python workers' stderr) must hold
none of the tokens, while the outputs, which may carry them, do: the tokens did travel through the job.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, JPEGBaseline8Bit

from streaming.contracts import Reference
from streams import JobProcess, Tally, job_env, wait_until_answered
from xray_files import dicom_bytes, encapsulated, image_dataset, jpeg_bytes, png_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The dead letter's (stage, error) a message must end as, or None for a result.
Expected = tuple[str, str] | None


@dataclass
class Corpus:
    """The messages to send, what each must end as, and every token that must stay out of the logs."""

    messages: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # (value, key)
    expected: dict[str, Expected] = field(default_factory=dict)  # by event id
    unkeyed: int = 0  # dead letters whose event id cannot be read
    tokens: set[str] = field(default_factory=set)

    def secret(self, prefix: str) -> str:
        """A random token that nothing else in a log could contain by chance."""
        value = f"{prefix}{secrets.token_hex(8)}"
        self.tokens.add(value)
        return value

    def uid(self) -> str:
        """A random token that is also a valid UID (the 2.25 root takes a UUID as one integer)."""
        value = f"2.25.{uuid.uuid4().int}"
        self.tokens.add(value)
        return value

    def reference(self, uri: str, expected: Expected) -> Reference:
        """A reference to `uri` whose UIDs and accession number are all tokens (its key is the study UID)."""
        ref = Reference(
            event_id=str(uuid.uuid4()),
            uri=uri,
            study_uid=self.uid(),
            series_uid=self.uid(),
            sop_instance_uid=self.uid(),
            accession=self.secret("ACC"),
            modality="DX",
            view_position="PA",
        )
        self.raw(ref.to_json().encode(), ref.key, event_id=ref.event_id, expected=expected)
        return ref

    def raw(self, value: bytes, key: str | None, *, event_id: str | None = None, expected: Expected = None) -> None:
        self.messages.append((value, key.encode() if key else None))
        if event_id is None:
            self.unkeyed += 1
        else:
            self.expected[event_id] = expected


def patient_header(corpus: Corpus, *, valid: bool) -> dict[str, str]:
    """Header attributes made of tokens: well-formed, or values pydicom warns about (and quotes) when it reads
    them: letters in UIDs, values longer than their VR allows."""
    if valid:
        return {
            "StudyInstanceUID": corpus.uid(),
            "SeriesInstanceUID": corpus.uid(),
            "SOPInstanceUID": corpus.uid(),
            "AccessionNumber": corpus.secret("AN"),
            "PatientID": corpus.secret("PID"),
            "PatientName": f"{corpus.secret('PN')}^{corpus.secret('PN')}",
        }
    return {
        "StudyInstanceUID": f"1.2.{corpus.secret('st')}",
        "SeriesInstanceUID": f"1.2.{corpus.secret('se')}",
        "SOPInstanceUID": f"1.2.{corpus.secret('so')}_!",
        "AccessionNumber": corpus.secret("ACCESSION-NUMBER-TOO-LONG-"),
        "PatientID": corpus.secret("PATIENT-ID-") * 5,
        "PatientName": f"{corpus.secret('PN')}^{corpus.secret('PN')}" * 5,
    }


def with_patient(ds: Dataset, corpus: Corpus, *, valid: bool = True) -> Dataset:
    """`ds` with a (fake) patient, the instance UID repeated in the file meta as Part 10 does."""
    for keyword, value in patient_header(corpus, valid=valid).items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom warns as it writes the invalid values, and logs each warning too: not this test's news."""
    logger = logging.getLogger("pydicom")
    disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def dicom_files(corpus: Corpus, pixels: np.ndarray, jpeg: bytes) -> dict[str, tuple[bytes, Expected]]:
    """Part 10 files with tokens in their headers: decodable ones, and ones broken in pydicom's sore spots."""
    files: dict[str, tuple[bytes, Expected]] = {}
    with quiet_pydicom():
        files["valid-native"] = (dicom_bytes(with_patient(image_dataset(pixels), corpus)), None)
        jpeg_ds = encapsulated(image_dataset(pixels), JPEGBaseline8Bit, [jpeg])
        files["valid-jpeg-baseline"] = (dicom_bytes(with_patient(jpeg_ds, corpus)), None)
        # Invalid UIDs and over-long values everywhere: still a picture; pydicom warns about (and quotes) any of
        # these values it converts, should the decoder ever read one.
        files["invalid-values"] = (dicom_bytes(with_patient(image_dataset(pixels), corpus, valid=False)), None)
        # A window that is not numbers, written raw (pydicom refuses to set it): the decoder reads and refuses it.
        windowed = with_patient(image_dataset(pixels), corpus, valid=False)
        for tag, prefix in ((0x00281050, "C"), (0x00281051, "W")):
            value = f"{prefix}{secrets.token_hex(7)} ".encode()  # 16 characters, the most DS allows
            corpus.tokens.add(value.decode().strip())
            windowed[tag] = RawDataElement(Tag(tag), "DS", len(value), value, 0, False, True)
        files["invalid-window"] = (dicom_bytes(windowed), ("decode", "corrupt_image"))
        # A transfer syntax whose UID is itself a token: unknown, and malformed (which pydicom warns about, quoting
        # it, each time the file meta is read).
        for name, syntax in (("unknown-syntax", corpus.uid()), ("malformed-syntax", f"1.2.{corpus.secret('ts')}")):
            ds = with_patient(image_dataset(pixels), corpus, valid=False)
            ds.file_meta.TransferSyntaxUID = UID(syntax)
            buf = BytesIO()  # pydicom cannot tell the encoding of a syntax it does not know: the native one
            ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=True)
            files[name] = (buf.getvalue(), ("decode", "unsupported_format"))
        # Pixel data cut short, and a corrupt JPEG frame inside a DICOM.
        whole = dicom_bytes(with_patient(image_dataset(pixels), corpus, valid=False))
        files["truncated-pixels"] = (whole[: len(whole) - pixels.size // 2], ("decode", "corrupt_image"))
        broken_ds = encapsulated(image_dataset(pixels), JPEGBaseline8Bit, [jpeg[: len(jpeg) // 2]])
        files["corrupt-jpeg"] = (dicom_bytes(with_patient(broken_ds, corpus, valid=False)), ("decode", "corrupt_image"))
    return files


def picture_files(pixels: np.ndarray, jpeg: bytes) -> dict[str, tuple[bytes, Expected]]:
    """PNG and JPEG files, good and bad (their names will carry the tokens)."""
    return {
        "png": (png_bytes(Image.fromarray(pixels)), None),
        "jpeg": (jpeg, None),
        "jpeg-truncated": (jpeg[: len(jpeg) // 3], ("decode", "corrupt_image")),
        "png-not-an-image": (b"Patient notes, not a picture.\n" * 20, ("decode", "unsupported_format")),
    }


def build_corpus(folder: Path, outside: Path, sample_jpeg: Path) -> Corpus:
    """Write the files into `folder` (an allowed root) and `outside` (not one); return what to send."""
    corpus = Corpus()
    with Image.open(sample_jpeg) as img:
        gray = img.convert("L").resize((256, 256))
    pixels = np.asarray(gray)
    jpeg = jpeg_bytes(gray, quality=90)
    for name, (data, expected) in dicom_files(corpus, pixels, jpeg).items():
        path = folder / f"{name}-{corpus.secret('dcm')}.dcm"
        path.write_bytes(data)
        corpus.reference(path.as_uri(), expected)
    for name, (data, expected) in picture_files(pixels, jpeg).items():
        path = folder / f"xray-{corpus.secret('img')}.{name.split('-')[0]}"
        path.write_bytes(data)
        corpus.reference(path.as_uri(), expected)

    # References that carry tokens wherever a message can.
    forbidden = outside / f"{corpus.secret('outside')}.dcm"
    forbidden.write_bytes(b"exists, but outside the allowed roots")
    corpus.reference(forbidden.as_uri(), ("fetch", "forbidden_uri"))
    corpus.reference(f"{folder.as_uri()}/../{corpus.secret('escape')}.dcm", ("fetch", "forbidden_uri"))
    corpus.reference((folder / f"missing-{corpus.secret('missing')}.dcm").as_uri(), ("fetch", "not_found"))
    dicomweb = f"http://{corpus.secret('pacs')}.example.org/dicom-web"
    corpus.reference(
        f"{dicomweb}/studies/{corpus.uid()}/series/{corpus.uid()}/instances/{corpus.uid()}", ("fetch", "forbidden_uri")
    )
    # JSON with a field of the wrong type: the event id is salvaged for the dead letter.
    event_id = str(uuid.uuid4())
    bad_field = {"schema": "cxr.reference/v1", "event_id": event_id, "uri": 42, "accession": corpus.secret("AC")}
    corpus.raw(json.dumps(bad_field).encode(), event_id, event_id=event_id, expected=("parse", "invalid_field"))
    # Not JSON, and not UTF-8: no event id can be read.
    cut = f'{{"schema": "cxr.reference/v1", "study_uid": "{corpus.uid()}", "uri": "file:///{corpus.secret("json")}'
    corpus.raw(cut.encode(), None)
    corpus.raw(b'{"event_id": "\xff\xfe' + corpus.secret("bytes").encode() + b'\x80", "uri": "file:///\xc3"}', None)
    return corpus


def send(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes | None]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for value, key in messages:
            producer.send(topic, value=value, key=key)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=30)


def leaks(log: str, tokens: set[str]) -> dict[str, list[str]]:
    """Each token found in the log, with the lines that carry it (case-insensitively: a logger may shout)."""
    lines = [(line, line.lower()) for line in log.splitlines()]
    found: dict[str, list[str]] = {}
    for tok in tokens:
        hits = [line for line, lowered in lines if tok.lower() in lowered]
        if hits:
            found[tok] = hits[:3]
    return found


def test_no_patient_data_in_the_job_logs(
    kafka_broker: Any, topics: dict[str, str], sample_jpegs: list[Path], tmp_path: Path
) -> None:
    """At DEBUG, what an operator turns on in an incident, and a superset of the default INFO: `--log-level`
    sets only the driver's Python loggers (Spark's log4j stays at WARN, the Python workers log nothing of
    their own), and a lower level only adds records. So this one run covers INFO too."""
    log_level = "DEBUG"
    folder, outside = tmp_path / "incoming", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    corpus = build_corpus(folder.resolve(), outside.resolve(), sample_jpegs[0])
    bootstrap = kafka_broker.bootstrap_servers
    env = job_env(bootstrap, topics, [folder.resolve()], tmp_path / "checkpoint")
    job = JobProcess(env, tmp_path / "job.log", ("--log-level", log_level)).start()
    started = time.monotonic()
    try:
        send(bootstrap, topics["input_topic"], corpus.messages)
        tally = wait_until_answered(bootstrap, topics, list(corpus.expected), timeout_s=300)
        deadline = time.monotonic() + 60
        while tally.unkeyed_dead_letters < corpus.unkeyed and time.monotonic() < deadline:
            time.sleep(0.5)
            tally = Tally.read(bootstrap, topics["results_topic"], topics["dead_letter_topic"])
        assert job.running, job.log()[-3000:]
    finally:
        code = job.stop()
    log = job.log()
    print(
        f"\n[no-patient-data] {log_level}: {tally.summary(list(corpus.expected))}, {len(corpus.tokens)} tokens, "
        f"{len(log.splitlines())} log lines, {time.monotonic() - started:.0f} s"
    )

    # The outputs arrived, each as it should (else a clean log would prove nothing).
    assert not tally.lost(list(corpus.expected)), log[-3000:]
    assert tally.unkeyed_dead_letters == corpus.unkeyed
    outcomes = {event_id: (letter["stage"], letter["error"]) for event_id, letter in tally.dead_letters.items()} | {
        event_id: None for event_id in tally.results
    }
    assert outcomes == corpus.expected
    assert code == 0, log[-3000:]
    assert "scoring " in log, "the job's own log lines should be in the file scanned"
    # The tokens travelled through the job: each dead letter quotes its message, as the contract says.
    assert all(leaks(letter["payload"], corpus.tokens) for letter in tally.dead_letters.values())
    # ... yet no reason (free text, read by people) carries one.
    assert not leaks("\n".join(letter["reason"] for letter in tally.dead_letters.values()), corpus.tokens)

    found = leaks(log, corpus.tokens)
    assert not found, f"{len(found)} token(s) leaked into the job's log, e.g.:\n" + "\n".join(
        line for lines in list(found.values())[:5] for line in lines
    )
