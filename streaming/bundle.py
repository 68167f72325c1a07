"""Model bundles: a TensorFlow model plus the descriptor that says how to serve it.

A bundle is a directory holding `bundle.json` and the model (a `.keras` file or a SavedModel folder). The
descriptor names everything the model was trained with (input size, channels, resampling, scaling), its
output activation, its labels and the triage rules. Loading validates the descriptor against the model and
fails loudly when they disagree: serving a model with the wrong preprocessing is silent and dangerous.

The driver packs a bundle into a `BundleArchive` (plain bytes, broadcast once to the executors); each Python
worker unpacks and loads it once and keeps it across micro-batches, on the device `streaming.device` chooses.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streaming.device import DevicePlan, InferenceDevice, choose_device, restrict_visible_gpus, task_gpu_addresses
from streaming.preprocess import InputSpec, Resample, Scaling
from streaming.triage import TriageRules

DESCRIPTOR_NAME = "bundle.json"
log = logging.getLogger(__name__)
T = TypeVar("T")


class BundleError(RuntimeError):
    """A bundle that cannot be served as described."""


class Activation(StrEnum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    NONE = "none"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelRef(_Frozen):
    #: Relative to the bundle folder, absolute, or `pkg:<package>/<path>` inside an installed package.
    path: str
    format: Literal["keras", "savedmodel"] = "keras"


class InputDescriptor(_Frozen):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3] = 3
    resample: Resample = Resample.NEAREST

    @property
    def spec(self) -> InputSpec:
        return InputSpec(self.height, self.width, self.channels, self.resample)


class PreprocessingDescriptor(_Frozen):
    scheme: Literal["none", "unit", "xception", "inception", "tf", "torch", "imagenet", "custom"] = "none"
    scale: float = 1.0
    offset: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def scaling(self) -> Scaling:
        return Scaling(self.scheme, self.scale, self.offset, self.mean, self.std)


class OutputDescriptor(_Frozen):
    activation: Activation = Activation.NONE


class TrainingRecord(_Frozen):
    """Where a bundle made by `cxr train` came from: enough to tell two trainings apart and find the report.

    `data_fingerprint` changes with any image added, removed, changed or relabelled; it never holds patient data.
    """

    data_fingerprint: str = Field(min_length=1)
    data_source: str
    examples: dict[str, int]
    backbone: str
    head: str
    trained_at: str
    evaluation: str = "evaluation.json"


class Descriptor(_Frozen):
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str = ""
    model: ModelRef
    labels: tuple[str, ...] = Field(min_length=1)
    normal_labels: tuple[str, ...] = ()
    input: InputDescriptor
    preprocessing: PreprocessingDescriptor = PreprocessingDescriptor()
    output: OutputDescriptor = OutputDescriptor()
    triage: TriageRules = TriageRules()
    #: set by `cxr train`; absent for bundles written by hand
    training: TrainingRecord | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Descriptor:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        unknown = [lbl for lbl in self.normal_labels if lbl not in self.labels]
        unknown += [t.label for t in self.triage.thresholds if t.label not in self.labels]
        if unknown:
            raise ValueError(f"labels not among the model's labels: {unknown}")
        return self

    @property
    def input_spec(self) -> InputSpec:
        return self.input.spec

    @property
    def scaling(self) -> Scaling:
        return self.preprocessing.scaling

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


def read_descriptor(bundle_dir: Path) -> Descriptor:
    path = Path(bundle_dir) / DESCRIPTOR_NAME
    try:
        return Descriptor.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"no {DESCRIPTOR_NAME} in model bundle {bundle_dir}") from None
    except ValidationError as exc:
        raise BundleError(f"invalid {path}: {exc}") from None


def resolve_model_path(descriptor: Descriptor, bundle_dir: Path) -> Path:
    ref = descriptor.model.path
    if ref.startswith("pkg:"):
        package, _, inner = ref[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise BundleError(
                f"bundle {descriptor.name} needs the package {package!r}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        path = Path(ref) if os.path.isabs(ref) else Path(bundle_dir) / ref
    if not path.exists():
        raise BundleError(f"bundle {descriptor.name}: model file not found: {path}")
    return path


@dataclass(frozen=True)
class BundleArchive:
    """A bundle as bytes: what the driver broadcasts. `digest` identifies it in worker caches."""

    descriptor_json: str
    model_format: str
    model_filename: str
    model_bytes: bytes
    digest: str

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor.model_validate_json(self.descriptor_json)


def model_bytes(model_path: Path) -> bytes:
    """A model as bytes to broadcast: a `.keras` file as it is, a SavedModel folder as an uncompressed tar."""
    if model_path.is_dir():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(model_path, arcname=model_path.name)
        return buffer.getvalue()
    return model_path.read_bytes()


def pack(bundle_dir: Path) -> BundleArchive:
    descriptor = read_descriptor(bundle_dir)
    model_path = resolve_model_path(descriptor, bundle_dir)
    data = model_bytes(model_path)
    descriptor_json = descriptor.model_dump_json()
    digest = hashlib.sha256(descriptor_json.encode() + data).hexdigest()[:16]
    return BundleArchive(descriptor_json, descriptor.model.format, model_path.name, data, digest)


def _activate(logits: np.ndarray, activation: Activation) -> np.ndarray:
    x = logits.astype(np.float64)
    if activation is Activation.SOFTMAX:
        x = np.exp(x - x.max(axis=1, keepdims=True))
        return x / x.sum(axis=1, keepdims=True)
    if activation is Activation.SIGMOID:
        return 1.0 / (1.0 + np.exp(-x))
    return np.clip(x, 0.0, 1.0)


class LoadedBundle:
    """A model ready to predict, with its descriptor. Thread-safe `predict`; one per Python worker."""

    def __init__(self, descriptor: Descriptor, infer: Callable[[np.ndarray], np.ndarray], device: str = "cpu") -> None:
        self.descriptor = descriptor
        self._infer = infer
        #: where it predicts: "cpu" or "gpu:<address>" (`DevicePlan.label`)
        self.device = device
        self._lock = threading.Lock()

    def predict(self, batch: np.ndarray, batch_size: int) -> np.ndarray:
        """Probabilities, shape (n, labels), predicting in chunks of `batch_size` through the compiled graph."""
        outputs = []
        with self._lock:
            for start in range(0, len(batch), batch_size):
                chunk = np.ascontiguousarray(batch[start : start + batch_size], dtype=np.float32)
                outputs.append(np.asarray(self._infer(chunk)))
        logits = np.concatenate(outputs) if outputs else np.zeros((0, len(self.descriptor.labels)))
        return _activate(logits, self.descriptor.output.activation)

    def warm_up(self, batch_size: int) -> None:
        """One dummy prediction at the full batch shape, so tracing and kernel set-up are paid before the first
        real image."""
        spec = self.descriptor.input
        self.predict(np.zeros((batch_size, spec.height, spec.width, spec.channels), np.float32), batch_size)


def compiled_keras(model: Any, input_shape: tuple[int, int, int], device: str) -> Callable[[np.ndarray], np.ndarray]:
    """A Keras model's forward pass as one traced graph on `device`, for batches of `input_shape` images.

    Tracing once (`reduce_retracing`, any batch size) is what makes per-batch inference cheap; `model.predict`
    would rebuild its data pipeline on every call."""
    import tensorflow as tf

    signature = [tf.TensorSpec([None, *input_shape], tf.float32)]

    @tf.function(input_signature=signature, reduce_retracing=True)
    def infer(x: Any) -> Any:
        with tf.device(device):  # explicit: the trace must not take the device scope of whoever calls first
            return model(x, training=False)

    return lambda batch: infer(tf.convert_to_tensor(batch)).numpy()


def _validate(descriptor: Descriptor, input_shape: Any, output_shape: Any) -> None:
    spec = descriptor.input
    expected_in = (spec.height, spec.width, spec.channels)
    got_in = tuple(input_shape[1:]) if input_shape is not None else None
    if got_in is not None and any(g is not None and g != e for g, e in zip(got_in, expected_in, strict=False)):
        raise BundleError(
            f"bundle {descriptor.name}: descriptor input {expected_in} does not match the model's input {got_in}"
        )
    n_out = output_shape[-1] if output_shape is not None else None
    if n_out is not None and n_out != len(descriptor.labels):
        raise BundleError(
            f"bundle {descriptor.name}: the model has {n_out} outputs but the descriptor names "
            f"{len(descriptor.labels)} labels"
        )


@contextlib.contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """TensorFlow's C++ start-up banner goes straight to fd 2, past TF_CPP_MIN_LOG_LEVEL; hide just that.

    Python exceptions raised meanwhile still propagate with their messages.
    """
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow(threads: int | None = None) -> None:
    """Import TensorFlow quietly; `threads` caps its intra-op pool (only before its runtime starts).

    Spark runs one Python worker per concurrent task; each TensorFlow would otherwise size its pool to every
    core of the machine, and several of them oversubscribe the CPU.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _native_stderr_muted():
        import keras  # noqa: F401
        import tensorflow as tf
    if threads:
        with contextlib.suppress(RuntimeError):  # the runtime is already up in this process: keep it
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))


def plan_device(wanted: InferenceDevice, spark_gpus: Sequence[str] = ()) -> DevicePlan:
    """Check TensorFlow's GPUs against the setting and Spark's assignment, and prepare them.

    Raises `DeviceError` before any model is read when a GPU is wanted or assigned but missing. Visible GPUs
    get memory growth, so the Python workers sharing one (`spark.task.resource.gpu.amount` below 1) each take
    what they use rather than all of it. That is only possible before TensorFlow's runtime starts; later (a
    second load in the same process) the runtime keeps what it has, and placement still follows the plan.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    plan = choose_device(wanted, spark_gpus, len(gpus))
    with contextlib.suppress(RuntimeError):
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    return plan


def load_keras(
    model_path: Path, threads: int | None = None, device: InferenceDevice = "auto", spark_gpus: Sequence[str] = ()
) -> tuple[Any, DevicePlan]:
    """A `.keras` model as Keras objects (not compiled for training), placed on the device the plan chose.

    Raises `DeviceError` for a GPU wanted or assigned but not found."""
    import_tensorflow(threads)
    plan = plan_device(device, spark_gpus)
    import keras
    import tensorflow as tf

    with tf.device(plan.tf_device):
        return keras.models.load_model(model_path, compile=False), plan


def load_model_file(
    descriptor: Descriptor,
    model_path: Path,
    threads: int | None = None,
    device: InferenceDevice = "auto",
    spark_gpus: Sequence[str] = (),
) -> LoadedBundle:
    """Load and validate the TensorFlow model behind a descriptor, on the device `device` and `spark_gpus` (the
    task's GPU addresses) call for. Raises `DeviceError` for a GPU wanted or assigned but not found."""
    if descriptor.model.format == "keras":
        model, plan = load_keras(model_path, threads, device, spark_gpus)
        _validate(descriptor, model.input_shape, model.output_shape)
        spec = descriptor.input
        forward = compiled_keras(model, (spec.height, spec.width, spec.channels), plan.tf_device)
        return LoadedBundle(descriptor, forward, plan.label)

    import_tensorflow(threads)
    plan = plan_device(device, spark_gpus)
    import tensorflow as tf

    with tf.device(plan.tf_device):
        loaded = tf.saved_model.load(str(model_path))
    fn = loaded.signatures["serving_default"]
    (in_spec,) = fn.structured_input_signature[1].values()
    (out_spec,) = fn.structured_outputs.values()
    _validate(descriptor, in_spec.shape.as_list(), out_spec.shape.as_list())
    input_name = next(iter(fn.structured_input_signature[1]))

    def infer(batch: np.ndarray) -> np.ndarray:
        with tf.device(plan.tf_device):
            (out,) = fn(**{input_name: tf.convert_to_tensor(batch)}).values()
        return out.numpy()

    return LoadedBundle(descriptor, infer, plan.label)


def load(bundle_dir: Path, device: InferenceDevice = "auto") -> LoadedBundle:
    """Load a bundle directory in this process (outside Spark: no GPU assignment to honour)."""
    descriptor = read_descriptor(bundle_dir)
    return load_model_file(descriptor, resolve_model_path(descriptor, bundle_dir), device=device)


_worker_cache: dict[Hashable, Any] = {}
_worker_lock = threading.Lock()


def spark_local_dir() -> str | None:
    """The first of the executor's local folders, which Spark gives every Python worker (`SPARK_LOCAL_DIRS`) and
    deletes itself when the executor goes; None outside Spark (the system's temporary folder)."""
    dirs = [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d and os.path.isdir(d)]
    return dirs[0] if dirs else None


def worker_cached(key: Hashable, build: Callable[[], T]) -> T:
    """What `build` returns, built once per process and kept (Spark reuses Python workers across batches and
    tasks). One lock for all keys: two models are never loaded at once, so a worker's peak memory is one load."""
    with _worker_lock:
        if key not in _worker_cache:
            _worker_cache[key] = build()
        cached: T = _worker_cache[key]
        return cached


def task_gpus(device: InferenceDevice) -> list[str]:
    """The GPUs Spark assigned to this task, with the process limited to them before TensorFlow starts (on
    "cpu": to none)."""
    spark_gpus = task_gpu_addresses()
    if device == "cpu" and spark_gpus:
        log.warning(
            "Spark assigned GPU %s to this task but CXR_INFERENCE_DEVICE=cpu: scoring on the CPU", ",".join(spark_gpus)
        )
    restrict_visible_gpus(device, spark_gpus)
    return spark_gpus


def load_unpacked(model_format: str, model_filename: str, data: bytes, digest: str, load: Callable[[Path], T]) -> T:
    """`load` applied to a broadcast model written back to disk, where Spark deletes it with the executor.

    A Python worker may end by SIGKILL (Spark's daemon, the OOM killer), which no clean-up survives: the copy
    goes under the executor's local folder, and a `.keras` copy is deleted once loaded. A SavedModel may read
    its assets lazily, so a loaded one is kept for the life of the worker.
    """
    tmp = tempfile.mkdtemp(prefix=f"cxr-bundle-{digest}-", dir=spark_local_dir())
    keep = model_format == "savedmodel"
    try:
        if model_format == "savedmodel":
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                tar.extractall(tmp, filter="data")
        else:
            (Path(tmp) / model_filename).write_bytes(data)
        return load(Path(tmp) / model_filename)
    except BaseException:  # a worker that fails (no GPU, a bad model) may be retried: leave no copy behind
        keep = False
        raise
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def load_archive(archive: BundleArchive, threads: int | None = None, device: InferenceDevice = "auto") -> LoadedBundle:
    """The archive's model, loaded once per process and kept (Spark reuses Python workers across batches).

    In a Spark task that was assigned GPUs, the process is first limited to those (before TensorFlow starts),
    and the model stays on the first of them for the life of the worker; on "cpu" it sees no GPU at all.
    """

    def build() -> LoadedBundle:
        spark_gpus = task_gpus(device)
        descriptor = archive.descriptor
        loaded = load_unpacked(
            archive.model_format,
            archive.model_filename,
            archive.model_bytes,
            archive.digest,
            lambda path: load_model_file(descriptor, path, threads, device, spark_gpus),
        )
        log.info(
            "loaded model bundle %s %s in worker %d on %s",
            descriptor.name,
            descriptor.version,
            os.getpid(),
            loaded.device,
        )
        return loaded

    return worker_cached(("bundle", archive.digest, device), build)


_RAISED_IN_WORKER = re.compile(rf"{re.escape(f'{BundleError.__module__}.{BundleError.__qualname__}')}: ([^\n]+)")


def bundle_error_in(text: str) -> BundleError | None:
    """The `BundleError` a Python worker raised (a descriptor that does not match its model), found in the text
    of the Spark exception that carried it to the driver; None if it holds none."""
    match = _RAISED_IN_WORKER.search(text)
    return BundleError(match.group(1).strip()) if match else None
