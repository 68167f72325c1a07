"""Configuration: the one place that reads the environment.

Precedence, lowest to highest: built-in defaults (safe for the embedded demo), a TOML config file
(`CXR_CONFIG_FILE` or `--config`), `CXR_*` environment variables (what Kubernetes ConfigMaps set), then
command-line flags. Kafka client settings that cxr-stream does not model itself pass through unchanged from
`CXR_KAFKA__<SETTING>` or a `[kafka]` table, so TLS and SASL work the way Kafka users expect.

Executors never read the environment: the driver builds the small frozen objects they need
(`FetchPolicy`, `DecodeLimits`, ...) from these settings and ships them with the job.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
from collections.abc import Collection
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streaming.device import InferenceDevice
from streaming.jvm import DEFAULT_LIB_DIR

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
MODEL_PACKAGE = "pneumonia_model_package"
_config_file: ContextVar[Path | None] = ContextVar("cxr_config_file", default=None)


def model_package_dir() -> Path | None:
    """Folder of the installed demo model package, found without importing it (its import needs extras)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sample_images_dir() -> Path:
    """The sixteen real chest X-rays that ship with the demo model package."""
    pkg = model_package_dir()
    if pkg is None:
        raise RuntimeError(
            f"the demo model package is not installed: pip install --no-deps {MODEL_PACKAGE.replace('_', '-')}"
            "==0.3.0 (make install does this)"
        )
    return pkg / "datasets" / "pneumonia-data" / "val"


def default_bundle_dir() -> Path:
    return Path(__file__).parent / "bundles" / "pneumonia-xception"


def _default_allowed_roots() -> list[Path]:
    pkg = model_package_dir()
    return [sample_images_dir()] if pkg is not None else []


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def basic_authorization(username: str, password: str) -> str:
    """An HTTP basic `Authorization` value (RFC 7617)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _authorization(token: SecretStr | None, username: str | None, password: SecretStr | None) -> str | None:
    """A bearer token, else HTTP basic, else none: one rule for every server we send credentials to."""
    if token is not None:
        return f"Bearer {token.get_secret_value()}"
    if username is not None:
        return basic_authorization(username, password.get_secret_value() if password else "")
    return None


_JAAS_OPTION = re.compile(r'(\w+)\s*=\s*"((?:[^"\\]|\\.)*)"')
#: Java client settings whose kafka-python spelling is not just dots → underscores.
_RENAMED = {
    "ssl.truststore.location": "ssl_cafile",
    "ssl.keystore.location": "ssl_certfile",
    "ssl.key.password": "ssl_password",
}


def java_to_kafka_python(java: dict[str, str]) -> dict[str, Any]:
    """Translate Java Kafka client settings to kafka-python's.

    `sasl.jaas.config` (PLAIN or SCRAM login module) yields the username and password kafka-python takes;
    trust and key stores carry over when they are PEM files (kafka-python cannot read JKS or PKCS12).
    """
    conf: dict[str, Any] = {}
    pem = java.get("ssl.truststore.type", "").upper() == "PEM" or java.get("ssl.keystore.type", "").upper() == "PEM"
    for key, value in java.items():
        if key == "sasl.jaas.config":
            options = dict(_JAAS_OPTION.findall(value))
            if "username" in options:
                conf["sasl_plain_username"] = options["username"]
            if "password" in options:
                conf["sasl_plain_password"] = options["password"]
        elif key in _RENAMED:
            if pem or value.lower().endswith((".pem", ".crt")):
                conf[_RENAMED[key]] = value
        else:
            conf[key.replace(".", "_")] = _coerce(value)
    return conf


def _coerce(value: str) -> Any:
    """Environment values are text; kafka-python wants numbers and booleans as such."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


class Settings(BaseSettings):
    """Every knob of cxr-stream, frozen once read."""

    model_config = SettingsConfigDict(
        env_prefix="CXR_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
        case_sensitive=False,
    )

    # Kafka
    kafka_bootstrap_servers: str = DEFAULT_BOOTSTRAP
    input_topic: str = "cxr.references"
    results_topic: str = "cxr.results"
    dead_letter_topic: str = "cxr.dead-letter"
    kafka: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="extra Kafka client settings, e.g. security_protocol, sasl_mechanism (CXR_KAFKA__<NAME>)",
    )

    # Model and input
    model_bundle: Path = Field(default_factory=default_bundle_dir)
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=_default_allowed_roots)
    dicomweb_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Credentials for DICOMweb and the PACS feeds: a bearer token, or HTTP basic (username and password).
    #: Secrets come from the environment or the config file, never from the command line.
    dicomweb_token: SecretStr | None = None
    dicomweb_username: str | None = None
    dicomweb_password: SecretStr | None = None
    #: Transient DICOMweb failures (connection refused or reset, HTTP 429/502/503/504) are retried this many
    #: times, with exponential backoff from `dicomweb_retry_backoff_s`, within the reference's deadline.
    dicomweb_retries: int = Field(default=3, ge=0, le=10)
    dicomweb_retry_backoff_s: float = Field(default=0.25, gt=0)
    max_image_bytes: int = Field(default=128 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=60_000_000, gt=0)
    #: The most one DICOMweb fetch may take in all: every attempt, retry and wait included.
    fetch_timeout_s: float = Field(default=30.0, gt=0)
    #: Fetch + decode of one reference must end within this; past it the reference is a `timeout` dead letter.
    reference_deadline_s: float = Field(default=30.0, gt=0)
    #: Threads per Python worker left running past their deadline (a read the kernel never returns); at the
    #: cap the worker answers `unavailable` instead of starting more reads, until some come back.
    max_stuck_threads: int = Field(default=8, gt=0)
    #: A dead letter carries at most this much of the original value (the rest is named, not copied), so a
    #: value near the broker's size limit still fits in its dead letter.
    dead_letter_payload_max_bytes: int = Field(default=256 * 1024, gt=0)
    #: Test-only: lets files named `cxr-fault-*` crash or hang the decoder (see `streaming/faults.py`).
    fault_injection: bool = False

    # Streaming query
    checkpoint_dir: Path = Path(".cxr/checkpoints/scoring")
    starting_offsets: str = "earliest"
    max_offsets_per_trigger: int | None = Field(default=512, gt=0)
    #: Spark tasks per micro-batch at least (the Kafka source splits partitions to reach it): unset, one per
    #: core of the cluster, so every core scores whatever the topic's partition count; 0: one per partition.
    min_partitions: int | None = Field(default=None, ge=0)
    fail_on_data_loss: bool = True
    #: How often an idle query looks for new references. Under load micro-batches run back to back whatever
    #: this is; idle, it bounds the wait before a new reference is picked up (0 would ask Kafka every 10 ms).
    trigger_interval: str = "250 milliseconds"

    # Scoring on the executors
    inference_batch_size: int = Field(default=16, gt=0)
    arrow_batch_size: int = Field(default=64, gt=0)
    decode_threads: int = Field(default=4, gt=0)
    #: TensorFlow intra-op threads per Python worker; unset: the cores per concurrent task; 0: TensorFlow's own.
    inference_threads: int | None = Field(default=None, ge=0)
    #: Where the model runs: "auto" (the GPU Spark assigned to the task, or a visible one; else the CPU), "cpu",
    #: or "gpu" (fail at start-up when there is none). A GPU assigned or asked for but missing is never silently
    #: replaced by the CPU (see `streaming/device.py`).
    inference_device: InferenceDevice = "auto"
    warmup: bool = True

    # Spark
    jvm_lib_dir: Path = DEFAULT_LIB_DIR
    #: None: local[*], unless spark-submit already chose a master (on Kubernetes it does).
    spark_master: str | None = None
    spark_driver_memory: str = "4g"
    spark_shuffle_partitions: int = Field(default=4, gt=0)
    spark_ui: bool = False
    spark_log_level: str = "WARN"
    spark_conf: dict[str, str] = Field(default_factory=dict)

    # Feeds and exporters: cursors and other durable state, one file or folder per feed and source
    state_dir: Path = Path(".cxr/state")
    #: What the PACS feeds publish: instances of these modalities and storage classes (CR, DX for
    #: presentation and for processing by default); anything else is skipped and counted.
    chest_modalities: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["CR", "DX"])
    chest_sop_classes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
            "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
            "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        ]
    )
    #: How long a caught-up feed sleeps before asking its PACS again, and how long one PACS request may take.
    feed_poll_interval_s: float = Field(default=1.0, gt=0)
    feed_request_timeout_s: float = Field(default=30.0, gt=0)
    #: `cxr produce orthanc`: the DICOMweb service root the references name; unset, the Orthanc URL + /dicom-web.
    orthanc_dicomweb_root: str | None = None
    #: `cxr produce dicomweb`: each poll looks this far back before the newest instance it has seen (QIDO-RS
    #: has no "received since" attribute), de-duplicating on SOP instance UID.
    dicomweb_poll_overlap_s: float = Field(default=24 * 3600.0, gt=0)
    #: `cxr produce orthanc|dicomweb|scp` serve /metrics, /healthz and /readyz on this port (on
    #: `metrics_host`) for Prometheus and the kubelet's probes; unset, none (so a feed started next to
    #: `cxr run` on one machine does not take the job's port). Its own setting, not `metrics_port`, for that.
    feed_metrics_port: int | None = Field(default=None, ge=0, le=65535)

    # DICOM C-STORE receiver (`cxr produce scp`)
    scp_ae_title: str = Field(default="CXR_STREAM", min_length=1, max_length=16)
    scp_port: int = Field(default=11112, ge=1, le=65535)
    scp_storage: Path = Path(".cxr/scp")
    #: Who may send: `AET` or `AET@address`, comma-separated; empty refuses every caller.
    scp_allowed_callers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: New associations are refused while the storage folder's file system has less free space than this.
    scp_min_free_bytes: int = Field(default=1024 * 1024 * 1024, ge=0)
    #: Publish references for instances that are not chest X-rays too (they are always stored).
    scp_publish_non_chest: bool = False

    # The triage worklist (`cxr worklist`)
    worklist_db: Path = Path(".cxr/worklist.db")
    #: Loopback by default: the page shows study identifiers, so exposing it is a deliberate choice.
    worklist_host: str = "127.0.0.1"
    worklist_port: int = Field(default=8080, ge=0, le=65535)
    #: The longest a study may wait in its class before it is escalated and shown overdue (a study that the
    #: AI could not score waits at most the URGENT figure: nobody knows yet that it is routine).
    worklist_max_wait_stat_s: float = Field(default=15 * 60.0, gt=0)
    worklist_max_wait_urgent_s: float = Field(default=60 * 60.0, gt=0)
    worklist_max_wait_routine_s: float = Field(default=4 * 3600.0, gt=0)
    #: A reference still without a result or dead letter after this long means scoring has stopped: the page
    #: says so, and what is unscored is read in arrival order.
    worklist_scoring_stale_after_s: float = Field(default=120.0, gt=0)
    #: Read and dismissed studies are forgotten this long after they were closed.
    worklist_retention_days: float = Field(default=30.0, gt=0)
    #: With a password, the page and the API ask for HTTP basic credentials (the probes and /metrics do not).
    worklist_username: str = "cxr"
    worklist_password: SecretStr | None = None
    #: The host names the page and the API answer to (the Host header, and X-Forwarded-Host behind a proxy),
    #: besides loopback names, so that another site cannot reach them through DNS rebinding. Unset: loopback
    #: names only while listening on loopback; any name (with a warning at start) when listening elsewhere.
    worklist_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Where a first start (a worklist file without offsets for the topics) begins: "earliest" puts what the
    #: topics still hold on the queue, "latest" only what arrives from now on (`cxr worklist --from-now`).
    #: Partitions added later, and every later start, read on from where the file says either way.
    worklist_start: Literal["earliest", "latest"] = "earliest"

    # Exporters (`cxr export fhir|sr`): consumers of the results topic
    #: FHIR R4 transaction bundles, one per result (`cxr export fhir`); replays carry the same resource ids.
    fhir_topic: str = "cxr.fhir"
    #: Results that cannot be exported, with their reason (not the scoring dead-letter topic: the image was scored).
    export_dead_letter_topic: str = "cxr.export-dead-letter"
    #: `cxr export fhir --server`: each bundle is also POSTed (a FHIR transaction) to this FHIR R4 base URL,
    #: with a bearer token or HTTP basic credentials.
    fhir_server_url: str | None = None
    fhir_token: SecretStr | None = None
    fhir_username: str | None = None
    fhir_password: SecretStr | None = None
    #: `cxr export sr`: where the reports go, any of: STOW-RS to a DICOMweb service root (`--stow`, credentials
    #: as for DICOMweb), C-STORE to `AET@host:port` (`--cstore`), files in a folder (`--out`).
    sr_stow_url: str | None = None
    sr_cstore: str | None = None
    sr_output_dir: Path | None = None
    sr_calling_ae_title: str = Field(default="CXR_STREAM", min_length=1, max_length=16)
    #: One delivery attempt (an HTTP request, a DICOM association, a Kafka acknowledgement) ends within this.
    export_timeout_s: float = Field(default=30.0, gt=0)
    #: A destination that is away is retried for as long as it takes, waiting at most this long between tries.
    export_retry_max_s: float = Field(default=60.0, gt=0)
    #: `/metrics`, `/healthz`, `/readyz` of an exporter (9110 in the Kubernetes manifests); unset, none, so that
    #: several exporters and the job can run on one machine.
    export_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: Where a first start (no cursor yet) begins: everything the results topic holds, or only new results.
    export_start: Literal["earliest", "latest"] = "earliest"

    # Observability
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    #: `/readyz` fails when the scoring query reported no progress, or a PACS feed had no answer from its
    #: server, for this long.
    ready_stale_after_s: float = Field(default=120.0, gt=0)

    @field_validator(
        "allowed_roots",
        "dicomweb_allowed_hosts",
        "chest_modalities",
        "chest_sop_classes",
        "scp_allowed_callers",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("worklist_allowed_hosts", mode="before")
    @classmethod
    def _worklist_hosts_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("worklist_allowed_hosts")
    @classmethod
    def _worklist_hosts(cls, hosts: list[str]) -> list[str]:
        return [h.strip().lower() for h in hosts if h.strip()]

    @field_validator("allowed_roots")
    @classmethod
    def _resolve_roots(cls, roots: list[Path]) -> list[Path]:
        return [Path(os.path.expanduser(r)).resolve() for r in roots]

    @field_validator("dicomweb_allowed_hosts")
    @classmethod
    def _lower_hosts(cls, hosts: list[str]) -> list[str]:
        return [h.lower() for h in hosts]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, file_secret_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | str | None = None, **overrides: Any) -> Settings:
        """Read defaults, config file, environment and flags (`overrides`; None values are ignored)."""
        path = config_file or os.environ.get("CXR_CONFIG_FILE")
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        token = _config_file.set(Path(path) if path else None)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _config_file.reset(token)

    # Views for the edges -------------------------------------------------------------------------

    def kafka_extra(self) -> dict[str, str]:
        """Pass-through client settings with their secrets revealed, keyed the Java way (`security.protocol`)."""
        return {k.lower().replace("_", "."): v.get_secret_value() for k, v in self.kafka.items()}

    def kafka_python_config(self, known: Collection[str] | None = None) -> dict[str, Any]:
        """Keyword arguments for a kafka-python client, from the same (Java-style) settings Spark gets.

        `known` is the client's accepted keys (e.g. `KafkaProducer.DEFAULT_CONFIG`): kafka-python refuses
        unknown settings, and the Java client's (`sasl.jaas.config`, JKS stores) are not all its own.
        """
        conf: dict[str, Any] = {"bootstrap_servers": self.kafka_bootstrap_servers.split(",")}
        conf.update(java_to_kafka_python(self.kafka_extra()))
        if known is not None:
            conf = {k: v for k, v in conf.items() if k in known}
        return conf

    def dicomweb_authorization(self) -> str | None:
        """The HTTP `Authorization` value for DICOMweb and PACS requests: the bearer token, else HTTP basic."""
        return _authorization(self.dicomweb_token, self.dicomweb_username, self.dicomweb_password)

    def fhir_authorization(self) -> str | None:
        """The `Authorization` header for the FHIR server: a bearer token, else HTTP basic, else none."""
        return _authorization(self.fhir_token, self.fhir_username, self.fhir_password)

    def worklist_authorization(self) -> str | None:
        """The `Authorization` value the worklist expects, when it is protected by a password."""
        if self.worklist_password is None:
            return None
        return basic_authorization(self.worklist_username, self.worklist_password.get_secret_value())

    def spark_kafka_options(self) -> dict[str, str]:
        """Options for Spark's Kafka source and sink (`kafka.`-prefixed client settings)."""
        options = {"kafka.bootstrap.servers": self.kafka_bootstrap_servers}
        options.update({f"kafka.{k}": v for k, v in self.kafka_extra().items()})
        return options

    def spark_kafka_sink_options(self) -> dict[str, str]:
        """Options for the Kafka sink that writes results and dead letters: `acks=all` (a record counts as
        written once every in-sync replica has it, so with `min.insync.replicas=2` losing a broker loses no
        answer) and idempotence (a send retried across a leader change is not written twice). Configured
        client settings win; idempotence is added only with acks=all, which the Java client requires of it."""
        options = self.spark_kafka_options()
        options.setdefault("kafka.acks", "all")
        if options["kafka.acks"] in ("all", "-1"):
            options.setdefault("kafka.enable.idempotence", "true")
        return options
