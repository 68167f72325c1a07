"""DICOMweb retrieval in the running job, against a real PACS: Orthanc with HTTP basic auth, up and then down.

One in-process scoring job (the shared Spark session, the real broker and model) gets, in three rounds:
references that cannot be fetched for a reason of their own (a host not allowed, an instance Orthanc does not
have) next to a good one; then, with Orthanc stopped, a reference to it, and one to a server that accepts
and never answers; then, with Orthanc back, a good one, which must still be scored. Each reference ends as
one result or one dead letter, within the reference deadline plus a margin for the micro-batch around it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from kafka import KafkaProducer
from pydantic import SecretStr

from hostile_servers import MisbehavingServer, never_answers
from probes import read_records
from streaming.contracts import Reference, now_utc, parse_timestamp, rfc3339
from streaming.pipeline import ScoringJob

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEADLINE_S = 8.0
FETCH_TIMEOUT_S = 4.0
#: Between a reference's sending and its dead letter, besides the fetch: the wait for the next trigger, the
#: Kafka read, the task's start on a Python worker, the rest of its batch.
MARGIN_S = 5.0


@dataclass
class Run:
    sent: dict[str, Reference] = field(default_factory=dict)  # name → reference
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # event id → result
    dead: dict[str, dict[str, Any]] = field(default_factory=dict)  # event id → dead letter
    records: int = 0
    hanging_connections: int = 0
    basic_token: str = ""
    password: str = ""

    def outcome(self, name: str) -> dict[str, Any]:
        event_id = self.sent[name].event_id
        return self.results.get(event_id) or self.dead[event_id]

    def seconds_to_outcome(self, name: str) -> float:
        body = self.outcome(name)
        ended = body.get("failed_at") or body["scored_at"]
        sent_at = self.sent[name].sent_at
        assert sent_at is not None
        return (parse_timestamp(ended) - parse_timestamp(sent_at)).total_seconds()


@pytest.fixture(scope="module")
def run(spark, spark_settings, kafka_broker, orthanc, chest_dicoms, tmp_path_factory) -> Run:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("dicomweb-fetch")
    suffix = uuid.uuid4().hex[:8]
    topics = {k: f"wado.{k}.{suffix}" for k in ("input_topic", "results_topic", "dead_letter_topic")}
    kafka_broker.create_topics(topics.values(), partitions=2)
    first, second = chest_dicoms[0], chest_dicoms[1]
    for dicom in (first, second):
        orthanc.upload(dicom.data)

    def wado(dicom: Any) -> str:
        return orthanc.wado_url(dicom.study_uid, dicom.series_uid, dicom.sop_instance_uid)

    outcome = Run(password=orthanc.password)
    hanging = MisbehavingServer(never_answers)
    settings = spark_settings.model_copy(
        update={
            **topics,
            "checkpoint_dir": tmp / "checkpoint",
            "dicomweb_allowed_hosts": [orthanc.host_port, f"127.0.0.1:{hanging.port}"],
            "dicomweb_username": orthanc.username,
            "dicomweb_password": SecretStr(orthanc.password),
            "dicomweb_token": None,
            "reference_deadline_s": DEADLINE_S,
            "fetch_timeout_s": FETCH_TIMEOUT_S,
            "max_offsets_per_trigger": 100,
        }
    )
    authorization = settings.dicomweb_authorization()
    assert authorization is not None
    outcome.basic_token = authorization.split()[1]
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, acks="all")
    outputs = [topics["results_topic"], topics["dead_letter_topic"]]

    def send(**uris: str) -> None:
        for name, uri in uris.items():
            ref = Reference(event_id=str(uuid.uuid4()), uri=uri, sent_at=rfc3339(now_utc()))
            outcome.sent[name] = ref
            producer.send(topics["input_topic"], key=ref.key.encode(), value=ref.to_json().encode())
        producer.flush()

    def wait_for_all_sent() -> list[Any]:
        records = read_records(kafka_broker.bootstrap_servers, outputs, len(outcome.sent), timeout_s=90)
        assert len(records) >= len(outcome.sent), f"{len(records)} outputs for {len(outcome.sent)} references"
        return records

    job = ScoringJob.create(settings, spark)
    job.start()
    try:
        send(
            not_allowed=f"http://pacs.elsewhere.example:8042/dicom-web/studies/{first.study_uid}/series/"
            f"{first.series_uid}/instances/{first.sop_instance_uid}",
            unknown=orthanc.wado_url(
                "1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.2", "1.2.826.0.1.3680043.99.3"
            ),
            good=wado(first),
        )
        wait_for_all_sent()
        orthanc.stop()
        try:
            send(
                pacs_down=wado(first),
                hanging=f"http://127.0.0.1:{hanging.port}/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5",
            )
            wait_for_all_sent()
        finally:
            orthanc.start()
        send(after_outage=wado(second))
        records = wait_for_all_sent()
    finally:
        job.stop()
        producer.close()
        outcome.hanging_connections = hanging.connections
        hanging.close()
    outcome.records = len(records)
    for record in records:
        body = json.loads(record.value)
        (outcome.results if record.topic == topics["results_topic"] else outcome.dead)[body["event_id"]] = body
    return outcome


def test_every_reference_ends_as_exactly_one_outcome(run: Run) -> None:
    assert run.records == len(run.sent)
    assert {ref.event_id for ref in run.sent.values()} == set(run.results) | set(run.dead)


def test_a_host_not_allowed_is_forbidden(run: Run) -> None:
    letter = run.outcome("not_allowed")
    assert (letter["stage"], letter["error"]) == ("fetch", "forbidden_uri")
    assert letter["reason"] == "the DICOMweb host is not in the allowed hosts"


def test_an_instance_the_pacs_does_not_have_is_not_found(run: Run) -> None:
    letter = run.outcome("unknown")
    assert (letter["stage"], letter["error"]) == ("fetch", "not_found")


def test_an_instance_the_pacs_has_is_scored(run: Run) -> None:
    result = run.outcome("good")
    assert result["schema"] == "cxr.result/v1"
    assert result["uri"] == run.sent["good"].uri
    assert set(result["scores"]) == {"NORMAL", "PNEUMONIA"}


def test_a_pacs_that_is_down_is_unavailable_within_the_deadline(run: Run) -> None:
    letter = run.outcome("pacs_down")
    assert (letter["stage"], letter["error"]) == ("fetch", "unavailable"), letter["reason"]
    assert letter["reason"].endswith("attempts")  # retried (CXR_DICOMWEB_RETRIES), then given up in time
    assert run.seconds_to_outcome("pacs_down") < DEADLINE_S + MARGIN_S
    print(f"\n[dicomweb] PACS down: {run.seconds_to_outcome('pacs_down'):.1f} s to '{letter['reason']}'")


def test_a_server_that_never_answers_times_out_within_the_deadline(run: Run) -> None:
    letter = run.outcome("hanging")
    assert (letter["stage"], letter["error"]) == ("fetch", "timeout")
    assert letter["reason"] == f"the DICOMweb request took longer than {FETCH_TIMEOUT_S:g} s"
    assert FETCH_TIMEOUT_S <= run.seconds_to_outcome("hanging") < DEADLINE_S + MARGIN_S
    assert run.hanging_connections == 1  # a timeout is not retried
    print(f"\n[dicomweb] never answers: {run.seconds_to_outcome('hanging'):.1f} s to '{letter['reason']}'")


def test_the_stream_goes_on_after_the_outage(run: Run) -> None:
    result = run.outcome("after_outage")
    assert result["schema"] == "cxr.result/v1"
    assert result["uri"] == run.sent["after_outage"].uri


def test_credentials_stay_out_of_dead_letters(run: Run) -> None:
    for letter in run.dead.values():
        text = json.dumps(letter)
        assert run.password not in text
        assert run.basic_token not in text
