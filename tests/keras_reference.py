"""What plain Keras predicts for image files, loaded the way the default model was trained (`load_img` with
nearest-neighbour resizing to the bundle's input size, then the bundle's scaling): the reference every
serving path (stream, batch, evaluate, a trained bundle) must reproduce."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def keras_probabilities(bundle_dir: Path, images: Sequence[Path]) -> np.ndarray:
    """Probabilities (rows in the bundle's label order) of the bundle's model on `images`, without cxr-stream's
    fetch, decode or preprocessing code."""
    import keras

    from streaming.bundle import read_descriptor, resolve_model_path

    descriptor = read_descriptor(bundle_dir)
    model = keras.models.load_model(resolve_model_path(descriptor, bundle_dir), compile=False)
    size = (descriptor.input.height, descriptor.input.width)
    mode = "rgb" if descriptor.input.channels == 3 else "grayscale"
    batch = np.stack(
        [
            keras.utils.img_to_array(
                keras.utils.load_img(path, color_mode=mode, target_size=size, interpolation=descriptor.input.resample)
            )
            for path in images
        ]
    )
    assert descriptor.preprocessing.scheme in ("xception", "tf", "inception"), "add this bundle's scaling here"
    logits = model.predict(keras.applications.xception.preprocess_input(batch), verbose=0)
    activation = descriptor.output.activation.value
    assert activation == "softmax", "add this bundle's activation here"
    return np.asarray(keras.ops.softmax(logits, axis=1), dtype=np.float64)
