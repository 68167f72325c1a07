"""The three models the bench serves: the demo bundle, a CheXNet-sized DenseNet-121, and a tiny CNN.

DenseNet-121 (224x224, 14 sigmoid labels as in CheXNet) and the tiny CNN get random weights: timing does not
depend on what the weights are, and nothing can be downloaded here. Both are written as ordinary bundles, so
every peer loads them exactly as cxr-stream would load a site's own model.
"""

from __future__ import annotations

import json
from pathlib import Path

from streaming.settings import default_bundle_dir

CHEXNET_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
MODELS = ("demo", "densenet121", "tiny")


def bundle_dir(name: str, cache: Path) -> Path:
    """The bundle folder for `name`, built into `cache` on first use."""
    if name == "demo":
        return default_bundle_dir()
    target = cache / name
    if (target / "bundle.json").exists():
        return target
    import keras

    target.mkdir(parents=True, exist_ok=True)
    if name == "densenet121":
        model = keras.applications.DenseNet121(
            weights=None, input_shape=(224, 224, 3), classes=len(CHEXNET_LABELS), classifier_activation=None
        )
        descriptor = {
            "name": "densenet121-chexnet-size",
            "version": "bench",
            "description": "DenseNet-121 at 224x224 with random weights: CheXNet's size, for timing only",
            "labels": list(CHEXNET_LABELS),
            "input": {"height": 224, "width": 224, "channels": 3, "resample": "bilinear"},
            "preprocessing": {"scheme": "imagenet"},
            "output": {"activation": "sigmoid"},
        }
    elif name == "tiny":
        model = keras.Sequential(
            [
                keras.Input((64, 64, 1)),
                keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
                keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(2),
            ]
        )
        descriptor = {
            "name": "tiny-cnn",
            "version": "bench",
            "description": "a two-layer CNN at 64x64 grayscale: decoding and per-batch overhead dominate",
            "labels": ["NORMAL", "ABNORMAL"],
            "normal_labels": ["NORMAL"],
            "input": {"height": 64, "width": 64, "channels": 1, "resample": "bilinear"},
            "preprocessing": {"scheme": "unit"},
            "output": {"activation": "softmax"},
        }
    else:
        raise ValueError(f"unknown bench model {name!r}: one of {', '.join(MODELS)}")
    model.save(target / "model.keras")
    descriptor["model"] = {"path": "model.keras", "format": "keras"}
    (target / "bundle.json").write_text(json.dumps(descriptor, indent=2))
    return target
