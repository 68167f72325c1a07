"""Settings: safe defaults, CXR_ environment variables, a TOML file and flags, in rising precedence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

import streaming.settings as settings_module
from streaming.settings import DEFAULT_BOOTSTRAP, Settings, default_bundle_dir, sample_images_dir


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CXR_ variable of the calling shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("CXR_"):
            monkeypatch.delenv(name)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- defaults


def test_defaults_are_the_embedded_demo() -> None:
    s = Settings.load()
    assert (s.input_topic, s.results_topic, s.dead_letter_topic) == (
        "cxr.references",
        "cxr.results",
        "cxr.dead-letter",
    )
    assert s.kafka_bootstrap_servers == DEFAULT_BOOTSTRAP == "127.0.0.1:9092"
    assert s.metrics_port == 9108
    assert s.model_bundle == default_bundle_dir()
    assert (s.model_bundle / "bundle.json").is_file()
    assert s.allowed_roots == [sample_images_dir().resolve()]
    assert s.dicomweb_allowed_hosts == []
    assert s.dicomweb_token is None
    assert s.kafka == {}
    assert s.checkpoint_dir == Path(".cxr/checkpoints/scoring")


def test_default_root_is_resolved_like_the_uris_it_is_compared_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """fetch compares fully resolved file paths with the roots, so a default root reached through a symlink
    (a symlinked home or virtual environment) must be resolved as well, or every sample is forbidden."""
    real_pkg = tmp_path / "real" / "pkg"
    (real_pkg / "datasets" / "pneumonia-data" / "val").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.setattr(settings_module, "model_package_dir", lambda: link / "pkg")
    assert Settings.load().allowed_roots == [real_pkg / "datasets" / "pneumonia-data" / "val"]


def test_no_model_package_means_no_default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "model_package_dir", lambda: None)
    assert Settings.load().allowed_roots == []


def test_default_views_for_kafka_clients() -> None:
    s = Settings.load()
    assert s.kafka_python_config() == {"bootstrap_servers": ["127.0.0.1:9092"]}
    assert s.spark_kafka_options() == {"kafka.bootstrap.servers": "127.0.0.1:9092"}


# ---------------------------------------------------------------------------------------------- environment


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXR_KAFKA_BOOTSTRAP_SERVERS", "k1:9093,k2:9093")
    monkeypatch.setenv("CXR_INPUT_TOPIC", "in")
    monkeypatch.setenv("CXR_RESULTS_TOPIC", "out")
    monkeypatch.setenv("CXR_DEAD_LETTER_TOPIC", "dlq")
    monkeypatch.setenv("CXR_MODEL_BUNDLE", str(tmp_path / "bundle"))
    monkeypatch.setenv("CXR_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("CXR_METRICS_PORT", "9200")
    monkeypatch.setenv("cxr_inference_batch_size", "4")  # case-insensitive
    s = Settings.load()
    assert s.kafka_bootstrap_servers == "k1:9093,k2:9093"
    assert (s.input_topic, s.results_topic, s.dead_letter_topic) == ("in", "out", "dlq")
    assert s.model_bundle == tmp_path / "bundle"
    assert s.checkpoint_dir == tmp_path / "ckpt"
    assert s.metrics_port == 9200
    assert s.inference_batch_size == 4
    assert s.kafka_python_config()["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    assert s.spark_kafka_options()["kafka.bootstrap.servers"] == "k1:9093,k2:9093"


def test_comma_separated_roots_and_hosts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("CXR_ALLOWED_ROOTS", f"{tmp_path}/a, {tmp_path}/b/../b ,,")
    monkeypatch.setenv("CXR_DICOMWEB_ALLOWED_HOSTS", "PACS.local:8042, orthanc ,")
    s = Settings.load()
    assert s.allowed_roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert s.dicomweb_allowed_hosts == ["pacs.local:8042", "orthanc"]


def test_empty_roots_variable_allows_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_ALLOWED_ROOTS", "")
    assert Settings.load().allowed_roots == []


def test_roots_expand_the_home_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CXR_ALLOWED_ROOTS", "~/xrays")
    assert Settings.load().allowed_roots == [(tmp_path / "xrays").resolve()]


def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_METRICS_PORT", "70000")
    with pytest.raises(ValidationError):
        Settings.load()
    monkeypatch.setenv("CXR_METRICS_PORT", "9108")
    monkeypatch.setenv("CXR_INFERENCE_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings.load()


def test_kafka_client_settings_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CXR_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("CXR_KAFKA__SASL_PLAIN_PASSWORD", "hunter2")
    s = Settings.load()
    assert s.kafka_extra() == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.plain.password": "hunter2",
    }
    python = s.kafka_python_config()
    assert python["security_protocol"] == "SASL_SSL"
    assert python["sasl_mechanism"] == "SCRAM-SHA-512"
    assert python["sasl_plain_password"] == "hunter2"
    assert python["bootstrap_servers"] == ["127.0.0.1:9092"]
    spark = s.spark_kafka_options()
    assert spark["kafka.security.protocol"] == "SASL_SSL"
    assert spark["kafka.sasl.mechanism"] == "SCRAM-SHA-512"
    assert spark["kafka.bootstrap.servers"] == "127.0.0.1:9092"
    # The pass-through map does not swallow the modelled bootstrap setting, nor the other way round.
    assert "bootstrap_servers" not in s.kafka


def test_secrets_are_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_KAFKA__SASL_PLAIN_PASSWORD", "hunter2")
    monkeypatch.setenv("CXR_DICOMWEB_TOKEN", "tok-s3cret")
    s = Settings.load()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    assert "tok-s3cret" not in repr(s) and "tok-s3cret" not in str(s)
    assert "hunter2" not in s.model_dump_json() and "tok-s3cret" not in s.model_dump_json()
    assert s.dicomweb_token is not None and s.dicomweb_token.get_secret_value() == "tok-s3cret"


# ----------------------------------------------------------------------------------- file, env and flags


def test_config_file(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "cxr.toml",
        f"""
kafka_bootstrap_servers = "file-broker:9092"
input_topic = "file.in"
allowed_roots = ["{tmp_path}"]
dicomweb_allowed_hosts = ["Orthanc:8042"]
metrics_port = 9300

[kafka]
security_protocol = "SSL"
"ssl.truststore.location" = "/etc/kafka/trust.jks"
""",
    )
    s = Settings.load(config_file=config)
    assert s.kafka_bootstrap_servers == "file-broker:9092"
    assert s.input_topic == "file.in"
    assert s.results_topic == "cxr.results"  # untouched settings keep their defaults
    assert s.allowed_roots == [tmp_path.resolve()]
    assert s.dicomweb_allowed_hosts == ["orthanc:8042"]
    assert s.metrics_port == 9300
    assert s.spark_kafka_options()["kafka.security.protocol"] == "SSL"
    assert s.spark_kafka_options()["kafka.ssl.truststore.location"] == "/etc/kafka/trust.jks"
    assert "ssl_cafile" not in s.kafka_python_config()  # a JKS store is for the Java client only


def test_config_file_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = write_toml(tmp_path / "cxr.toml", 'results_topic = "from.file"\n')
    monkeypatch.setenv("CXR_CONFIG_FILE", str(config))
    assert Settings.load().results_topic == "from.file"


def test_explicit_config_file_beats_the_environment_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = write_toml(tmp_path / "env.toml", 'results_topic = "env.file"\n')
    flag_file = write_toml(tmp_path / "flag.toml", 'results_topic = "flag.file"\n')
    monkeypatch.setenv("CXR_CONFIG_FILE", str(env_file))
    assert Settings.load(config_file=flag_file).results_topic == "flag.file"


def test_precedence_file_then_env_then_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "cxr.toml",
        'input_topic = "file"\nresults_topic = "file"\ndead_letter_topic = "file"\n'
        '[kafka]\nsecurity_protocol = "SSL"\n',
    )
    monkeypatch.setenv("CXR_RESULTS_TOPIC", "env")
    monkeypatch.setenv("CXR_DEAD_LETTER_TOPIC", "env")
    monkeypatch.setenv("CXR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    s = Settings.load(config_file=config, dead_letter_topic="flag", input_topic=None)
    assert s.input_topic == "file"  # a None flag means "not given"
    assert s.results_topic == "env"
    assert s.dead_letter_topic == "flag"
    assert s.kafka_extra()["security.protocol"] == "SASL_SSL"


def test_flags_accept_comma_separated_roots(tmp_path: Path) -> None:
    """`--allowed-roots a,b` arrives as one string."""
    s = Settings.load(allowed_roots=f"{tmp_path}/x,{tmp_path}/y")
    assert s.allowed_roots == [(tmp_path / "x").resolve(), (tmp_path / "y").resolve()]


def test_config_file_does_not_leak_into_later_loads(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "cxr.toml", 'input_topic = "file"\n')
    assert Settings.load(config_file=config).input_topic == "file"
    assert Settings.load().input_topic == "cxr.references"


def test_missing_config_file_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        Settings.load(config_file=tmp_path / "nope.toml")
    monkeypatch.setenv("CXR_CONFIG_FILE", str(tmp_path / "also-nope.toml"))
    with pytest.raises(FileNotFoundError, match=r"also-nope\.toml"):
        Settings.load()


def test_settings_are_frozen() -> None:
    s = Settings.load()
    with pytest.raises(ValidationError):
        s.input_topic = "other"  # type: ignore[misc]


def test_java_client_settings_translate_for_kafka_python(monkeypatch: pytest.MonkeyPatch) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    monkeypatch.setenv("CXR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CXR_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv(
        "CXR_KAFKA__SASL_JAAS_CONFIG",
        'org.apache.kafka.common.security.scram.ScramLoginModule required username="cxr" password="s3 \\"cret";',
    )
    monkeypatch.setenv("CXR_KAFKA__SSL_TRUSTSTORE_TYPE", "PEM")
    monkeypatch.setenv("CXR_KAFKA__SSL_TRUSTSTORE_LOCATION", "/etc/kafka/ca.pem")
    monkeypatch.setenv("CXR_KAFKA__LINGER_MS", "20")  # a producer setting
    s = Settings.load()
    # Spark (the Java client) gets the settings as written...
    assert s.spark_kafka_options()["kafka.sasl.jaas.config"].startswith("org.apache.kafka")
    # ...kafka-python gets its own spelling, and only what the client accepts.
    producer = s.kafka_python_config(KafkaProducer.DEFAULT_CONFIG)
    assert producer["sasl_plain_username"] == "cxr"
    assert producer["sasl_plain_password"] == 's3 \\"cret'
    assert producer["ssl_cafile"] == "/etc/kafka/ca.pem"
    assert producer["linger_ms"] == 20
    assert "sasl_jaas_config" not in producer and "ssl_truststore_type" not in producer
    consumer = s.kafka_python_config(KafkaConsumer.DEFAULT_CONFIG)
    assert "linger_ms" not in consumer and consumer["security_protocol"] == "SASL_SSL"


def test_jks_stores_are_not_handed_to_kafka_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_KAFKA__SSL_TRUSTSTORE_LOCATION", "/etc/kafka/truststore.jks")
    s = Settings.load()
    assert "ssl_cafile" not in s.kafka_python_config()
    assert s.spark_kafka_options()["kafka.ssl.truststore.location"] == "/etc/kafka/truststore.jks"


# ----------------------------------------------------------------------------------------------- PACS


def test_pacs_credentials_become_one_authorization_header_and_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.load().dicomweb_authorization() is None
    monkeypatch.setenv("CXR_DICOMWEB_USERNAME", "cxr")
    monkeypatch.setenv("CXR_DICOMWEB_PASSWORD", "pacs-s3cret")
    s = Settings.load()
    assert s.dicomweb_authorization() == "Basic Y3hyOnBhY3MtczNjcmV0"  # base64("cxr:pacs-s3cret")
    assert "pacs-s3cret" not in repr(s) and "pacs-s3cret" not in s.model_dump_json()
    # A bearer token wins over HTTP basic (a cloud healthcare API behind an identity proxy).
    monkeypatch.setenv("CXR_DICOMWEB_TOKEN", "tok")
    assert Settings.load().dicomweb_authorization() == "Bearer tok"


def test_pacs_lists_are_comma_separated_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings.load()
    assert s.chest_modalities == ["CR", "DX"]
    assert "1.2.840.10008.5.1.4.1.1.1.1" in s.chest_sop_classes
    assert s.scp_allowed_callers == []  # nobody may send until the site says who
    monkeypatch.setenv("CXR_SCP_ALLOWED_CALLERS", "MODALITY@10.0.0.7, CR_ROOM_2")
    monkeypatch.setenv("CXR_CHEST_MODALITIES", "DX")
    s = Settings.load()
    assert s.scp_allowed_callers == ["MODALITY@10.0.0.7", "CR_ROOM_2"]
    assert s.chest_modalities == ["DX"]


def test_an_ae_title_longer_than_dicom_allows_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings.load(scp_ae_title="A" * 17)
