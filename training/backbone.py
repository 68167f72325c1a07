"""The backbone `cxr train` computes features with: what it is, how its input is prepared, and loading it.

Transfer learning here keeps a pretrained network frozen and trains only a classification head on its
features. The features must come from exactly the pixels the stream will later feed the finished model, so a
backbone carries a bundle's input rules (size, channels, resampling, scaling) and images go through the stream's
own `scoring.prepare_each`. Nothing can be downloaded here, so the default backbone is the demo bundle's own
trunk (its ImageNet Xception, frozen) with that bundle's preprocessing.

Two ways to name one: a bundle folder (`--backbone BUNDLE_DIR`): its model's first layer after the input, which
must be a sub-model (the frozen trunk of a transfer-learned classifier), with the bundle's input rules; or a
Keras file (`--backbone FILE.keras`): the whole model, with input rules from the command line. A 4-D output
(a feature map) gets global average pooling; a 2-D output is used as it is.

The driver packs the model file into a `BackboneArchive` (bytes, broadcast once); each Python worker unpacks
and loads it once, through the same code and cache as a scoring bundle (`streaming.bundle`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streaming.bundle import (
    BundleError,
    InputDescriptor,
    PreprocessingDescriptor,
    compiled_keras,
    load_keras,
    load_unpacked,
    model_bytes,
    read_descriptor,
    resolve_model_path,
    task_gpus,
    worker_cached,
)
from streaming.device import InferenceDevice
from streaming.preprocess import InputSpec, Resample, Scaling
from streaming.settings import default_bundle_dir

log = logging.getLogger(__name__)
#: The pooled feature layer's name in the feature model and in a trained bundle's model.
POOL_NAME = "features_pool"


@dataclass(frozen=True)
class Backbone:
    """A frozen feature extractor: a Keras model file, whether to take its trunk or all of it, and its input.

    Satisfies `scoring.InputRules`, so images are prepared for it exactly as for a bundle."""

    #: what the training record names, e.g. "pneumonia-xception 0.3.0 (trunk)"
    name: str
    model_path: Path
    #: True: the first layer after the input (a bundle's trunk); False: the whole model
    trunk: bool
    input: InputDescriptor
    preprocessing: PreprocessingDescriptor

    @property
    def input_spec(self) -> InputSpec:
        return self.input.spec

    @property
    def scaling(self) -> Scaling:
        return self.preprocessing.scaling

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.input.height, self.input.width, self.input.channels)


def from_bundle(bundle_dir: Path) -> Backbone:
    """The trunk of a bundle's Keras model, with the bundle's input rules."""
    descriptor = read_descriptor(bundle_dir)
    if descriptor.model.format != "keras":
        raise BundleError(
            f"bundle {descriptor.name}: a backbone must be a .keras model (the trained bundle embeds it in one "
            f"Keras model); this one is a {descriptor.model.format}"
        )
    return Backbone(
        name=f"{descriptor.name} {descriptor.version} (trunk)",
        model_path=resolve_model_path(descriptor, bundle_dir),
        trunk=True,
        input=descriptor.input,
        preprocessing=descriptor.preprocessing,
    )


def from_file(
    model_path: Path,
    scaling: str,
    input_size: tuple[int, int] | None = None,
    resample: str = Resample.NEAREST.value,
) -> Backbone:
    """A whole Keras model as the backbone. Its input size comes from the model when it is fixed (then a given
    `input_size` must agree); channels always come from the model. Scaling has no safe default: it is named."""
    if model_path.suffix != ".keras" or not model_path.is_file():
        raise BundleError(f"backbone {model_path}: expected a .keras file or a bundle folder")
    model = _load_on_driver(model_path)
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise BundleError(f"backbone {model_path.name}: expected an image input (height, width, 1 or 3), got {shape}")
    height, width, channels = shape
    if input_size is not None:
        for got, wanted, what in ((height, input_size[0], "height"), (width, input_size[1], "width")):
            if got is not None and got != wanted:
                raise BundleError(f"backbone {model_path.name}: its input {what} is {got}, not {wanted}")
        height, width = input_size
    if height is None or width is None:
        raise BundleError(f"backbone {model_path.name}: its input size is not fixed; give --backbone-input HxW")
    return Backbone(
        name=model_path.name,
        model_path=model_path.resolve(),
        trunk=False,
        input=InputDescriptor(height=height, width=width, channels=channels, resample=Resample(resample)),
        preprocessing=PreprocessingDescriptor(scheme=scaling),  # type: ignore[arg-type]  # validated by pydantic
    )


def resolve(
    source: Path | None,
    scaling: str | None = None,
    input_size: tuple[int, int] | None = None,
    resample: str | None = None,
) -> Backbone:
    """The backbone a command line names: a bundle folder (default: the demo bundle) or a Keras file."""
    path = source if source is not None else default_bundle_dir()
    if path.is_dir():
        if (scaling, input_size, resample) != (None, None, None):
            raise BundleError(
                "--backbone-input, --backbone-scaling and --backbone-resample apply to a .keras file; "
                "a bundle says its own"
            )
        return from_bundle(path)
    if scaling is None:
        raise BundleError(f"backbone {path.name}: say how its input is scaled (--backbone-scaling)")
    return from_file(path, scaling, input_size, resample or Resample.NEAREST.value)


# ------------------------------------------------------------------------------------------- Keras models


def feature_model(model: Any, backbone: Backbone) -> Any:
    """Image → feature vector: the backbone's trunk (or whole model), global-average-pooled when it yields a
    feature map. The same layers, by the same code, in the workers and in the trained bundle's model."""
    import keras

    body = _body(model, backbone)
    inputs = keras.Input(shape=backbone.input_shape, name="image")
    outputs = body(inputs)
    if isinstance(outputs, list | tuple):
        if len(outputs) != 1:
            raise BundleError(f"backbone {backbone.name}: expected one output, got {len(outputs)}")
        (outputs,) = outputs
    if len(outputs.shape) == 4:
        outputs = keras.layers.GlobalAveragePooling2D(name=POOL_NAME)(outputs)
    elif len(outputs.shape) != 2:
        raise BundleError(f"backbone {backbone.name}: expected a 2-D or 4-D output, got shape {outputs.shape}")
    return keras.Model(inputs, outputs, name="backbone")


def _body(model: Any, backbone: Backbone) -> Any:
    import keras

    if not backbone.trunk:
        return model
    layers = model.layers
    if len(layers) < 2 or not isinstance(layers[0], keras.layers.InputLayer) or not isinstance(layers[1], keras.Model):
        raise BundleError(
            f"backbone {backbone.name}: its model's first layer after the input is not a sub-model (a frozen "
            "trunk); give the feature extractor itself as --backbone FILE.keras"
        )
    trunk = layers[1]
    trunk.trainable = False
    return trunk


def _load_on_driver(model_path: Path) -> Any:
    try:
        model, _ = load_keras(model_path, device="cpu")
    except (OSError, ValueError) as exc:
        raise BundleError(f"backbone {model_path.name}: cannot be loaded as a Keras model ({exc})") from None
    return model


@dataclass(frozen=True)
class DriverBackbone:
    """The backbone loaded on the driver: checked, its feature width known, ready to carry a trained head."""

    backbone: Backbone
    model: Any
    features: Any

    @property
    def width(self) -> int:
        return int(self.features.output_shape[-1])


def load_on_driver(backbone: Backbone) -> DriverBackbone:
    """Load and check the backbone before any image is read, so a wrong one fails at once (exit 2)."""
    model = _load_on_driver(backbone.model_path)
    features = feature_model(model, backbone)
    return DriverBackbone(backbone, model, features)


# ----------------------------------------------------------------------------------------- the workers


@dataclass(frozen=True)
class BackboneArchive:
    """The backbone as bytes (broadcast once); `digest` identifies it in worker caches."""

    backbone: Backbone
    model_filename: str
    model_bytes: bytes
    digest: str


def pack(backbone: Backbone) -> BackboneArchive:
    data = model_bytes(backbone.model_path)
    digest = hashlib.sha256(repr(backbone).encode() + data).hexdigest()[:16]
    return BackboneArchive(backbone, backbone.model_path.name, data, digest)


class FeatureExtractor:
    """Features of prepared images, shape (n, width), float32; thread-safe, one per Python worker."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], width: int, device: str) -> None:
        self._forward = forward
        self.width = width
        self.device = device
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            out = self._forward(np.ascontiguousarray(batch, dtype=np.float32))
        return np.asarray(out, dtype=np.float32).reshape(len(batch), self.width)


def load_extractor(
    archive: BackboneArchive, threads: int | None = None, device: InferenceDevice = "auto"
) -> FeatureExtractor:
    """The archive's feature model, loaded once per Python worker and kept, on the device Spark assigned."""

    def build() -> FeatureExtractor:
        spark_gpus = task_gpus(device)

        def load(path: Path) -> FeatureExtractor:
            model, plan = load_keras(path, threads, device, spark_gpus)
            features = feature_model(model, archive.backbone)
            forward = compiled_keras(features, archive.backbone.input_shape, plan.tf_device)
            return FeatureExtractor(forward, int(features.output_shape[-1]), plan.label)

        extractor = load_unpacked("keras", archive.model_filename, archive.model_bytes, archive.digest, load)
        log.info("loaded backbone %s in worker %d on %s", archive.backbone.name, os.getpid(), extractor.device)
        return extractor

    return worker_cached(("backbone", archive.digest, device), build)
