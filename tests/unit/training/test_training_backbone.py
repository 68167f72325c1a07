"""Which backbone a command line names, and the feature model built from it (tiny real Keras models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streaming.bundle import BundleError
from streaming.preprocess import Resample
from streaming.settings import default_bundle_dir
from training.backbone import feature_model, from_file, load_extractor, pack, resolve


def test_the_default_backbone_is_the_demo_bundles_trunk_with_its_preprocessing() -> None:
    backbone = resolve(None)
    assert backbone.trunk and backbone.name == "pneumonia-xception 0.3.0 (trunk)"
    assert backbone.input_shape == (150, 150, 3)
    assert backbone.input_spec.resample is Resample.NEAREST and backbone.scaling.scheme == "xception"
    assert backbone.model_path.name.endswith(".keras")


def test_a_bundle_says_its_own_input_rules(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"apply to a \.keras file"):
        resolve(default_bundle_dir(), scaling="unit")


def test_a_keras_file_needs_its_scaling_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="--backbone-scaling"):
        resolve(tmp_path / "features.keras")


def test_a_savedmodel_bundle_cannot_be_a_backbone(tmp_path: Path) -> None:
    descriptor = json.loads((default_bundle_dir() / "bundle.json").read_text())
    descriptor["model"] = {"path": "model", "format": "savedmodel"}
    (tmp_path / "model").mkdir()
    (tmp_path / "bundle.json").write_text(json.dumps(descriptor))
    with pytest.raises(BundleError, match=r"must be a \.keras model"):
        resolve(tmp_path)


def classifier(tmp_path: Path) -> Path:
    """input → trunk (a sub-model: conv → 4-D map) → pooling → dense(2): a transfer-learned classifier in small."""
    import keras

    trunk_in = keras.Input(shape=(8, 8, 3))
    trunk = keras.Model(trunk_in, keras.layers.Conv2D(5, 3, name="conv")(trunk_in), name="trunk")
    inputs = keras.Input(shape=(8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(trunk(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    path = tmp_path / "classifier.keras"
    model.save(path)
    return path


def flat_model(tmp_path: Path, shape: tuple[Any, ...] = (8, 8, 1)) -> Path:
    import keras

    inputs = keras.Input(shape=shape)
    model = keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(keras.layers.Conv2D(4, 3)(inputs)))
    path = tmp_path / "flat.keras"
    model.save(path)
    return path


def test_a_trunk_gets_global_average_pooling(tmp_path: Path) -> None:
    import keras

    path = classifier(tmp_path)
    backbone = resolve(None)
    backbone = type(backbone)(
        "tiny (trunk)", path, True, backbone.input.model_copy(update={"height": 8, "width": 8}), backbone.preprocessing
    )
    model = keras.models.load_model(path, compile=False)
    features = feature_model(model, backbone)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    expected = model.get_layer("trunk").predict(x, verbose=0).mean(axis=(1, 2))
    np.testing.assert_allclose(features.predict(x, verbose=0), expected, atol=1e-5)
    assert features.output_shape == (None, 5)


def test_a_model_without_a_trunk_is_refused_as_a_bundle_backbone(tmp_path: Path) -> None:
    import keras

    path = flat_model(tmp_path, (8, 8, 3))
    backbone = resolve(None)
    backbone = type(backbone)("flat (trunk)", path, True, backbone.input, backbone.preprocessing)
    with pytest.raises(BundleError, match="not a sub-model"):
        feature_model(keras.models.load_model(path, compile=False), backbone)


def test_a_keras_file_is_used_whole_with_the_input_rules_given(tmp_path: Path) -> None:
    backbone = from_file(flat_model(tmp_path), "unit", resample="bilinear")
    assert not backbone.trunk and backbone.input_shape == (8, 8, 1)
    assert backbone.input_spec.resample is Resample.BILINEAR and backbone.scaling.scheme == "unit"
    with pytest.raises(BundleError, match="input height is 8, not 16"):
        from_file(flat_model(tmp_path), "unit", input_size=(16, 8))


def test_a_flexible_input_needs_its_size(tmp_path: Path) -> None:
    path = flat_model(tmp_path, (None, None, 3))
    with pytest.raises(BundleError, match="--backbone-input"):
        from_file(path, "unit")
    assert from_file(path, "unit", input_size=(32, 24)).input_shape == (32, 24, 3)


def test_a_worker_loads_the_packed_backbone_once(tmp_path: Path) -> None:
    backbone = from_file(flat_model(tmp_path), "unit")
    archive = pack(backbone)
    extractor = load_extractor(archive, device="cpu")
    assert load_extractor(pack(backbone), device="cpu") is extractor
    out = extractor(np.zeros((3, 8, 8, 1), np.float32))
    assert out.shape == (3, 4) and out.dtype == np.float32
