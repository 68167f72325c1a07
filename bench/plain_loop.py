"""The ceiling without messaging: a plain Keras loop in one process, as a data scientist would write it.

`keras.utils.load_img` (the way the demo model was trained), the bundle's pixel scaling, a `tf.function`
predict in batches of 32, over the sample X-rays cycled for a fixed time. Prints one JSON line.

    python -m bench.plain_loop BUNDLE_DIR --seconds 60            images/s with TensorFlow's own threads
    python -m bench.plain_loop BUNDLE_DIR --single-thread         seconds per image for preprocessing and
                                                                  inference on one core (the compute ceiling)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from streaming.bundle import read_descriptor, resolve_model_path
from streaming.preprocess import scale_array
from streaming.settings import sample_images_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--single-thread", action="store_true")
    args = parser.parse_args()

    import tensorflow as tf

    if args.single_thread:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    descriptor = read_descriptor(args.bundle)
    model = keras.models.load_model(resolve_model_path(descriptor, args.bundle), compile=False)
    spec = descriptor.input
    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    paths = sorted(sample_images_dir().glob("*.jpeg"))

    def load(path: Path) -> np.ndarray:
        img = keras.utils.load_img(
            path,
            color_mode="grayscale" if spec.channels == 1 else "rgb",
            target_size=(spec.height, spec.width),
            interpolation=spec.resample.value,
        )
        return scale_array(keras.utils.img_to_array(img), descriptor.scaling)

    def run_batch(batch_paths: list[Path]) -> tuple[float, float]:
        started = time.perf_counter()
        x = np.stack([load(p) for p in batch_paths]).astype(np.float32)
        decoded = time.perf_counter()
        np.asarray(infer(tf.convert_to_tensor(x)))
        return decoded - started, time.perf_counter() - decoded

    source = itertools.cycle(paths)
    run_batch([next(source) for _ in range(args.batch)])  # trace and warm up
    images, pre_s, inf_s = 0, 0.0, 0.0
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        pre, inf = run_batch([next(source) for _ in range(args.batch)])
        images, pre_s, inf_s = images + args.batch, pre_s + pre, inf_s + inf
    elapsed = time.perf_counter() - started
    print(
        json.dumps(
            {
                "images": images,
                "seconds": elapsed,
                "images_per_s": images / elapsed,
                "preprocess_s_per_image": pre_s / images,
                "inference_s_per_image": inf_s / images,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
