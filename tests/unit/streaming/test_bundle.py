"""Model bundles: descriptor validation, model path resolution, packing, and loading a tiny real Keras model.

The Keras model here is built in the test (8x8x1 in, 2 logits out) so loading and validation run through real
TensorFlow in seconds; Keras is imported once, by module-scoped fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from streaming.bundle import (
    DESCRIPTOR_NAME,
    Activation,
    BundleError,
    Descriptor,
    LoadedBundle,
    load,
    load_archive,
    pack,
    read_descriptor,
    resolve_model_path,
)
from streaming.preprocess import InputSpec, Resample, Scaling
from streaming.settings import default_bundle_dir, model_package_dir
from streaming.triage import Priority, priority

# Keras' own saving code trips numpy 2's copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# ------------------------------------------------------------------------------------------- descriptors


def default_json() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((default_bundle_dir() / DESCRIPTOR_NAME).read_text())
    return loaded


def write_bundle(folder: Path, descriptor: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DESCRIPTOR_NAME).write_text(json.dumps(descriptor))
    return folder


def test_default_descriptor_is_valid_and_says_how_the_model_was_trained() -> None:
    d = read_descriptor(default_bundle_dir())
    assert d.identity == {"name": "pneumonia-xception", "version": "0.3.0"}
    assert d.labels == ("NORMAL", "PNEUMONIA")
    assert d.normal_labels == ("NORMAL",)
    assert d.input_spec == InputSpec(150, 150, 3, Resample.NEAREST)
    assert d.scaling == Scaling("xception")
    assert d.output.activation is Activation.SOFTMAX
    assert d.model.format == "keras"
    assert priority({"PNEUMONIA": 0.9}, d.triage) is Priority.STAT
    assert priority({"PNEUMONIA": 0.5}, d.triage) is Priority.URGENT
    assert priority({"PNEUMONIA": 0.49}, d.triage) is Priority.ROUTINE


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"normal_labels": ["HEALTHY"]}, "HEALTHY"),
        ({"labels": ["NORMAL", "NORMAL"], "normal_labels": [], "triage": {}}, "unique"),
        ({"triage": {"thresholds": [{"label": "EFFUSION", "stat": 0.9}]}}, "EFFUSION"),
        ({"triage": {"thresholds": [{"label": "PNEUMONIA", "stat": 0.5, "urgent": 0.9}]}}, "urgent"),
        ({"labels": []}, "labels"),
        ({"input": {"height": 0, "width": 150}}, "height"),
        ({"input": {"height": 150, "width": 150, "channels": 2}}, "channels"),
        ({"input": {"height": 150, "width": 150, "resample": "cubic-ish"}}, "resample"),
        ({"preprocessing": {"scheme": "zscore"}}, "scheme"),
        ({"output": {"activation": "relu"}}, "activation"),
        ({"model": {"path": "m.keras", "format": "onnx"}}, "format"),
        ({"name": ""}, "name"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_descriptor_errors(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    broken = {**default_json(), **change}
    with pytest.raises(ValidationError, match=message):
        Descriptor.model_validate(broken)
    with pytest.raises(BundleError, match=message):
        read_descriptor(write_bundle(tmp_path / "bundle", broken))


def test_read_descriptor_missing_dir_or_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=DESCRIPTOR_NAME):
        read_descriptor(tmp_path / "nope")
    with pytest.raises(BundleError, match=DESCRIPTOR_NAME):
        read_descriptor(tmp_path)


def test_read_descriptor_bad_json(tmp_path: Path) -> None:
    (tmp_path / DESCRIPTOR_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="invalid"):
        read_descriptor(tmp_path)


# ------------------------------------------------------------------------------------------ model paths


def test_resolve_pkg_model_path() -> None:
    d = read_descriptor(default_bundle_dir())
    path = resolve_model_path(d, default_bundle_dir())
    package = model_package_dir()
    assert package is not None and path.is_relative_to(package)
    assert path.name == "pneumonia_xception_model_val-acc_0.861.keras" and path.is_file()


def test_resolve_relative_and_absolute_model_paths(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "m.keras"
    model.write_bytes(b"model")
    relative = Descriptor.model_validate({**default_json(), "model": {"path": "models/m.keras"}})
    assert resolve_model_path(relative, tmp_path) == tmp_path / "models" / "m.keras"
    absolute = Descriptor.model_validate({**default_json(), "model": {"path": str(model)}})
    assert resolve_model_path(absolute, tmp_path / "elsewhere") == model


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing.keras", "not found"),
        ("pkg:pneumonia_model_package/trained_models/missing.keras", "not found"),
        ("pkg:no_such_package_cxr/model.keras", "pip install"),
    ],
)
def test_resolve_missing_model_path(tmp_path: Path, path: str, message: str) -> None:
    d = Descriptor.model_validate({**default_json(), "model": {"path": path}})
    with pytest.raises(BundleError, match=message):
        resolve_model_path(d, tmp_path)


# ------------------------------------------------------------------------------ LoadedBundle, without TF


def descriptor_for(activation: str, labels: tuple[str, ...] = ("A", "B")) -> Descriptor:
    return Descriptor.model_validate(
        {
            "name": "toy",
            "version": "1",
            "model": {"path": "model.keras"},
            "labels": list(labels),
            "input": {"height": 2, "width": 2, "channels": 1},
            "output": {"activation": activation},
        }
    )


def test_activations() -> None:
    logits = np.array([[0.0, 0.0], [2.0, -1.0], [-3.0, 5.0]])
    batch = np.zeros((3, 2, 2, 1), np.float32)

    softmax = LoadedBundle(descriptor_for("softmax"), lambda x: logits).predict(batch, 8)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, expected)
    np.testing.assert_allclose(softmax.sum(axis=1), 1.0)

    sigmoid = LoadedBundle(descriptor_for("sigmoid"), lambda x: logits).predict(batch, 8)
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-logits)))

    none = LoadedBundle(descriptor_for("none"), lambda x: logits).predict(batch, 8)
    np.testing.assert_array_equal(none, np.clip(logits, 0, 1))


def test_softmax_is_stable_for_large_logits() -> None:
    bundle = LoadedBundle(descriptor_for("softmax"), lambda x: np.array([[1000.0, 0.0]]))
    np.testing.assert_allclose(bundle.predict(np.zeros((1, 2, 2, 1), np.float32), 4), [[1.0, 0.0]])


def test_predict_chunks_and_empty_batch() -> None:
    sizes: list[int] = []

    def infer(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        assert x.dtype == np.float32 and x.flags.c_contiguous
        return np.stack([x.sum(axis=(1, 2, 3)), -x.sum(axis=(1, 2, 3))], axis=1)

    bundle = LoadedBundle(descriptor_for("none"), infer)
    batch = np.arange(5 * 4, dtype=np.float64).reshape(5, 2, 2, 1) / 100.0
    out = bundle.predict(batch, 2)
    assert sizes == [2, 2, 1]
    np.testing.assert_allclose(out[:, 0], np.clip(batch.sum(axis=(1, 2, 3)), 0, 1), rtol=1e-6)
    empty = bundle.predict(np.zeros((0, 2, 2, 1), np.float32), 2)
    assert empty.shape == (0, 2)
    assert sizes == [2, 2, 1]
    bundle.warm_up(16)  # at the full batch shape the job will use
    assert sizes[-1] == 16


# ------------------------------------------------------------------------------- a tiny real Keras model


@pytest.fixture(scope="module")
def keras_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streaming.bundle import import_tensorflow

    import_tensorflow()
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(2),
        ]
    )
    path = tmp_path_factory.mktemp("keras") / "tiny.keras"
    model.save(path)
    return path


def tiny_descriptor(model_path: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "tiny",
        "version": "1.0",
        "model": {"path": model_path, "format": "keras"},
        "labels": ["NORMAL", "FINDING"],
        "normal_labels": ["NORMAL"],
        "input": {"height": 8, "width": 8, "channels": 1},
        "preprocessing": {"scheme": "unit"},
        "output": {"activation": "softmax"},
        "triage": {"thresholds": [{"label": "FINDING", "stat": 0.9, "urgent": 0.6}]},
    }
    body.update(changes)
    return body


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, keras_model_file: Path) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bundle")
    (folder / "tiny.keras").write_bytes(keras_model_file.read_bytes())
    return write_bundle(folder, tiny_descriptor("tiny.keras"))


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(3).random((5, 8, 8, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def keras_probabilities(keras_model_file: Path, inputs: np.ndarray) -> np.ndarray:
    """What Keras itself predicts, softmaxed by hand."""
    import keras

    logits = keras.ops.convert_to_numpy(
        keras.models.load_model(keras_model_file, compile=False)(inputs, training=False)
    )
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probabilities


def test_load_predicts_softmax_rows(tiny_bundle: Path, inputs: np.ndarray, keras_probabilities: np.ndarray) -> None:
    loaded = load(tiny_bundle)
    assert loaded.descriptor.identity == {"name": "tiny", "version": "1.0"}
    out = loaded.predict(inputs, 2)
    assert out.shape == (5, 2)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out, keras_probabilities, rtol=1e-5, atol=1e-6)
    assert len({round(float(p), 6) for p in out[:, 1]}) > 1  # the inputs are told apart


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": {"height": 9, "width": 8, "channels": 1}}, r"descriptor input \(9, 8, 1\) does not match"),
        ({"input": {"height": 8, "width": 8, "channels": 3}}, r"does not match the model's input \(8, 8, 1\)"),
        ({"labels": ["NORMAL", "FINDING", "OTHER"]}, "2 outputs but the descriptor names 3 labels"),
        ({"labels": ["FINDING"], "normal_labels": []}, "2 outputs but the descriptor names 1 labels"),
    ],
)
def test_descriptor_that_disagrees_with_the_model_is_refused(
    tmp_path: Path, keras_model_file: Path, change: dict[str, Any], message: str
) -> None:
    folder = write_bundle(tmp_path / "b", tiny_descriptor(str(keras_model_file), **change))
    with pytest.raises(BundleError, match=message):
        load(folder)


def test_pack_is_stable_and_tracks_descriptor_and_model(tiny_bundle: Path, tmp_path: Path) -> None:
    first, second = pack(tiny_bundle), pack(tiny_bundle)
    assert first.digest == second.digest and len(first.digest) == 16
    assert first.model_filename == "tiny.keras" and first.model_format == "keras"
    assert first.model_bytes == (tiny_bundle / "tiny.keras").read_bytes()
    assert first.descriptor == read_descriptor(tiny_bundle)

    other_version = write_bundle(tmp_path / "v2", tiny_descriptor(str(tiny_bundle / "tiny.keras"), version="2.0"))
    assert pack(other_version).digest != first.digest

    other_model = tmp_path / "v3"
    other_model.mkdir()
    (other_model / "tiny.keras").write_bytes(first.model_bytes + b"\0")
    write_bundle(other_model, tiny_descriptor("tiny.keras"))
    assert pack(other_model).digest != first.digest


def test_pack_missing_model_raises(tmp_path: Path) -> None:
    folder = write_bundle(tmp_path / "b", tiny_descriptor("absent.keras"))
    with pytest.raises(BundleError, match="not found"):
        pack(folder)


def test_load_archive_caches_by_digest(tiny_bundle: Path, inputs: np.ndarray, keras_probabilities: np.ndarray) -> None:
    archive = pack(tiny_bundle)
    first = load_archive(archive)
    assert load_archive(archive) is first
    assert load_archive(pack(tiny_bundle)) is first  # a fresh copy of the same bundle, as a broadcast gives
    np.testing.assert_allclose(first.predict(inputs, 16), keras_probabilities, rtol=1e-5, atol=1e-6)


def test_savedmodel_bundle_loads_and_travels_as_an_archive(
    tmp_path: Path,
    keras_model_file: Path,
    inputs: np.ndarray,
    keras_probabilities: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import keras

    folder = tmp_path / "saved"
    folder.mkdir()
    keras.models.load_model(keras_model_file, compile=False).export(str(folder / "model"), verbose=False)
    write_bundle(folder, tiny_descriptor("model", model={"path": "model", "format": "savedmodel"}))

    direct = load(folder)
    np.testing.assert_allclose(direct.predict(inputs, 4), keras_probabilities, rtol=1e-5, atol=1e-6)

    archive = pack(folder)
    assert archive.model_format == "savedmodel" and archive.model_filename == "model"
    local = tmp_path / "spark-local"
    local.mkdir()
    monkeypatch.setenv("SPARK_LOCAL_DIRS", str(local))
    unpacked = load_archive(archive)
    np.testing.assert_allclose(unpacked.predict(inputs, 4), keras_probabilities, rtol=1e-5, atol=1e-6)
    # Kept for the worker's life (assets may be read lazily), in the executor's folder that Spark deletes.
    assert [p.name.startswith(f"cxr-bundle-{archive.digest}-") for p in local.iterdir()] == [True]


def test_load_archive_leaves_no_copy_of_a_keras_model_behind(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inputs: np.ndarray
) -> None:
    """A Python worker killed by SIGKILL cleans nothing up; each one used to leave an 84 MB copy of the demo model
    in /tmp, until executors' disks were full. A .keras file is read whole, so its copy goes right after loading."""
    local = tmp_path / "spark-local"
    local.mkdir()
    monkeypatch.setenv("SPARK_LOCAL_DIRS", f"{local},{tmp_path / 'absent'}")
    from streaming import bundle as bundles

    given: list[Path] = []
    real = bundles.load_model_file
    monkeypatch.setattr(bundles, "load_model_file", lambda d, path, *a: given.append(path) or real(d, path, *a))
    fresh = write_bundle(tmp_path / "b", tiny_descriptor(str(tiny_bundle / "tiny.keras"), version="no-copy"))
    loaded = load_archive(pack(fresh))
    assert len(given) == 1 and given[0].parent.parent == local  # unpacked in the executor's folder...
    assert list(local.iterdir()) == []  # ...and gone once loaded
    assert loaded.predict(inputs, 4).shape == (5, 2)  # the model no longer needs the file


def test_spark_local_dir_is_the_first_existing_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streaming.bundle import spark_local_dir

    monkeypatch.delenv("SPARK_LOCAL_DIRS", raising=False)
    assert spark_local_dir() is None
    monkeypatch.setenv("SPARK_LOCAL_DIRS", f"{tmp_path / 'absent'},{tmp_path}")
    assert spark_local_dir() == str(tmp_path)


def test_a_bundle_error_raised_in_a_python_worker_is_found_in_sparks_text() -> None:
    """`cxr run` warms its workers up first: a model that does not match its descriptor must stop it as the
    configuration error it is (exit 2), not as an opaque task failure."""
    from streaming.bundle import bundle_error_in

    text = (
        "An exception was thrown from the Python worker. Please see the stack trace below.\n"
        "Traceback (most recent call last):\n"
        '  File "/work/streaming/bundle.py", line 252, in _validate\n'
        "streaming.bundle.BundleError: bundle site: the model has 2 outputs but the descriptor names 3 labels\n"
        "\tat org.apache.spark.api.python.BasePythonRunner...\n"
    )
    error = bundle_error_in(text)
    assert isinstance(error, BundleError)
    assert str(error) == "bundle site: the model has 2 outputs but the descriptor names 3 labels"
    assert bundle_error_in("Python worker exited unexpectedly (crashed)") is None
