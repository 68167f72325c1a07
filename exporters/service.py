"""The two exporters, wired: what each does with one result, and `run_export`, what `cxr export` runs.

- FHIR (`cxr export fhir`): the result as a transaction Bundle (`fhir.build_bundle`), published to
  `CXR_FHIR_TOPIC` keyed by the bundle's id (a compacted topic keeps the latest per result), then POSTed to the
  FHIR server when one is configured.
- SR (`cxr export sr`): for a result of a DICOM instance, the image's header is read back through the job's
  own fetch rules (allowed roots and hosts, size limit, deadline), the SR is built (`sr.build_sr`) and stored
  in every configured place. A result of a PNG or JPEG has no DICOM study to file a report into: skipped.
"""

from __future__ import annotations

import logging
import threading
import time

from exporters.cstore import CStoreSink
from exporters.errors import ExportCode, ExportError
from exporters.fhir import build_bundle, bundle_json
from exporters.fhir_server import FhirServerSink
from exporters.folder import FolderSink
from exporters.http import redact_url
from exporters.interpret import ModelRules
from exporters.metrics import export_health
from exporters.runner import Exporter, ExportRunner, KafkaOut
from exporters.sinks import SrSink
from exporters.sr import build_sr, read_source, sr_bytes
from exporters.stow import StowSink
from streaming.errors import ErrorCode, FetchError
from streaming.fetch import FetchPolicy, fetch
from streaming.logs import silence_header_quoters
from streaming.scoring import scoring_config
from streaming.settings import Settings
from worklist.events import ImageEvent

log = logging.getLogger("cxr.exporters")

#: Fetch failures worth waiting for: the image's server is away or slow.
_TRANSIENT_FETCH = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT})


class ExportConfigError(ValueError):
    """The exporter cannot start as configured (no destination, a malformed URL): exit code 2."""


class FhirExporter:
    name = "fhir"

    def __init__(self, out: KafkaOut, topic: str, server: FhirServerSink | None, rules: ModelRules | None) -> None:
        self.out, self.topic, self.server, self.rules = out, topic, server, rules
        self.topics: tuple[str, ...] = (topic,)
        #: the last bundle Kafka acknowledged (while the server is away, the same result is tried again)
        self._published: str | None = None
        self.destination = f"kafka:{topic}" + (f", {server.destination}" if server is not None else "")

    def export(self, result: ImageEvent) -> bool:
        bundle = build_bundle(result, self.rules)
        data = bundle_json(bundle)
        bundle_id = str(bundle["id"])
        if bundle_id != self._published:  # a retry for the server does not publish the same bundle again
            self.out.send(self.topic, bundle_id.encode("utf-8"), data)
            self._published = bundle_id
        if self.server is not None:
            self.server.post(data)
        return True

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class SrExporter:
    name = "sr"

    def __init__(self, sinks: list[SrSink], rules: ModelRules | None, policy: FetchPolicy, timeout_s: float) -> None:
        self.sinks, self.rules, self.policy, self.timeout_s = sinks, rules, policy, timeout_s
        self.topics: tuple[str, ...] = ()
        self.destination = ", ".join(sink.destination for sink in sinks)

    def export(self, result: ImageEvent) -> bool:
        if result.sop_instance_uid is None or result.study_uid is None or result.uri is None:
            return False
        try:
            data = fetch(result.uri, self.policy, deadline=time.monotonic() + self.timeout_s)
        except FetchError as exc:
            code = ExportCode.UNAVAILABLE if exc.code in _TRANSIENT_FETCH else ExportCode.SOURCE_UNREADABLE
            raise ExportError(code, f"the scored image cannot be read back ({exc.code.value}): {exc.reason}") from None
        source = read_source(data)
        sr = build_sr(result, source, self.rules)
        encoded = sr_bytes(sr)
        for sink in self.sinks:
            sink.store(sr, encoded)
        return True

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def sr_sinks(settings: Settings) -> list[SrSink]:
    """Every place the SRs go; `ExportConfigError` when there is none or one is malformed."""
    sinks: list[SrSink] = []
    try:
        if settings.sr_stow_url:
            sinks.append(
                StowSink(
                    settings.sr_stow_url,
                    authorization=settings.dicomweb_authorization(),
                    timeout_s=settings.export_timeout_s,
                )
            )
        if settings.sr_cstore:
            sinks.append(
                CStoreSink(
                    settings.sr_cstore,
                    calling_ae_title=settings.sr_calling_ae_title,
                    timeout_s=settings.export_timeout_s,
                )
            )
        if settings.sr_output_dir is not None:
            sinks.append(FolderSink(settings.sr_output_dir))
    except ValueError as exc:
        raise ExportConfigError(str(exc)) from None
    if not sinks:
        raise ExportConfigError(
            "cxr export sr needs somewhere to store the reports: --stow URL, --cstore AET@HOST:PORT or --out DIR"
            " (CXR_SR_STOW_URL, CXR_SR_CSTORE, CXR_SR_OUTPUT_DIR)"
        )
    return sinks


def make_exporter(kind: str, settings: Settings, out: KafkaOut) -> Exporter:
    rules = ModelRules.of_bundle(settings.model_bundle)
    if kind == "fhir":
        server = None
        if settings.fhir_server_url:
            try:
                server = FhirServerSink(
                    settings.fhir_server_url,
                    authorization=settings.fhir_authorization(),
                    timeout_s=settings.export_timeout_s,
                )
            except ValueError as exc:
                raise ExportConfigError(str(exc)) from None
        return FhirExporter(out, settings.fhir_topic, server, rules)
    if kind == "sr":
        return SrExporter(sr_sinks(settings), rules, scoring_config(settings).fetch, settings.export_timeout_s)
    raise ExportConfigError(f"no exporter named {kind!r}")


def run_export(kind: str, settings: Settings, stop: threading.Event) -> None:
    """Export the results topic until `stop` is set (what `cxr export fhir|sr` runs)."""
    silence_header_quoters()
    out = KafkaOut(settings)
    exporter = make_exporter(kind, settings, out)
    with export_health(settings, exporter.name) as metrics:
        runner = ExportRunner(settings, exporter, metrics, out)
        runner.run(stop)


__all__ = ["ExportConfigError", "FhirExporter", "SrExporter", "make_exporter", "redact_url", "run_export"]
