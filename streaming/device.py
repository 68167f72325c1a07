"""Choosing and checking the device a Python worker runs the model on: the CPU or one GPU.

Spark's resource scheduling decides which GPU a task may use (`spark.executor.resource.gpu.amount`,
`spark.task.resource.gpu.amount`, a discovery script); the task learns the addresses from its `TaskContext`.
TensorFlow must be told before its GPU runtime starts, or it takes every GPU it can see. The rules themselves
are a pure function (`choose_device`), so each is unit-tested without Spark, TensorFlow or a GPU.

A GPU that was asked for but is not there is a configuration error, raised as `DeviceError`: never a silent
fall back to the CPU, which would serve at a fraction of the expected throughput while every dashboard
looked healthy.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

#: The `CXR_INFERENCE_DEVICE` setting: "auto" (a GPU when Spark assigned one or one is visible, else the CPU),
#: "cpu" (always the CPU, GPUs ignored), "gpu" (a GPU or fail).
InferenceDevice = Literal["auto", "cpu", "gpu"]
INFERENCE_DEVICES: tuple[str, ...] = get_args(InferenceDevice)

_SPARK_GPU_SETTINGS = (
    "ask Spark for one GPU per executor and a share of it per task (spark.executor.resource.gpu.amount=1, "
    "spark.task.resource.gpu.amount=1 or a fraction such as 0.5, and a discovery script in "
    "spark.executor.resource.gpu.discoveryScript), install the `tensorflow` wheel with CUDA (not "
    "`tensorflow-cpu`) on the executors, or set CXR_INFERENCE_DEVICE=cpu"
)


class DeviceError(RuntimeError):
    """The configured inference device cannot be used: the operator must fix the configuration."""


@dataclass(frozen=True)
class DevicePlan:
    """Where one Python worker runs its model, and which GPU addresses Spark gave its task."""

    kind: Literal["cpu", "gpu"]
    #: what Spark assigned to the task (the first one is used); empty outside resource scheduling
    spark_addresses: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """For logs and the `cxr_inference_device_info` metric: "cpu", or "gpu:<address Spark assigned>"
        (TensorFlow's index 0 when Spark assigned none)."""
        if self.kind == "cpu":
            return "cpu"
        return f"gpu:{self.spark_addresses[0] if self.spark_addresses else 0}"

    @property
    def tf_device(self) -> str:
        """TensorFlow's name for it. With Spark's addresses the worker sees only those GPUs, so index 0 is the
        first address."""
        return "/GPU:0" if self.kind == "gpu" else "/CPU:0"


def choose_device(wanted: InferenceDevice, spark_gpu_addresses: Sequence[str], visible_gpus: int) -> DevicePlan:
    """The device for one Python worker, from the setting, Spark's assignment to the task, and how many GPUs
    TensorFlow sees. Raises `DeviceError` when a GPU is wanted or assigned but TensorFlow sees none.

    - "cpu": the CPU, whatever is assigned or visible.
    - "gpu": the first GPU (Spark's first address when it assigned some); none visible is an error.
    - "auto" with GPUs assigned by Spark: those, and none visible is an error too (configured but not found).
    - "auto" with no assignment: GPU 0 if TensorFlow sees one (local mode on a workstation), else the CPU.
    """
    if wanted not in INFERENCE_DEVICES:
        raise DeviceError(f"unknown inference device {wanted!r}: choose one of {', '.join(INFERENCE_DEVICES)}")
    addresses = tuple(spark_gpu_addresses)
    if wanted == "cpu":
        return DevicePlan("cpu")
    if visible_gpus > 0:
        return DevicePlan("gpu", addresses)
    if addresses:
        raise DeviceError(
            f"no GPU found: Spark assigned GPU {','.join(addresses)} to this task, but TensorFlow in its Python "
            f"worker sees no GPU (the CPU-only `tensorflow-cpu` wheel, no CUDA driver in the image, or a "
            f"discovery script naming GPUs the container does not have). Fix the executors, or stop asking "
            f"Spark for GPUs (spark.executor.resource.gpu.amount, spark.task.resource.gpu.amount) and set "
            f"CXR_INFERENCE_DEVICE=cpu"
        )
    if wanted == "gpu":
        raise DeviceError(
            f"no GPU found: CXR_INFERENCE_DEVICE=gpu, but TensorFlow in this Python worker sees no GPU and Spark "
            f"assigned none to its task. To use one, {_SPARK_GPU_SETTINGS}"
        )
    return DevicePlan("cpu")


def restrict_visible_gpus(
    wanted: InferenceDevice, addresses: Sequence[str], environ: MutableMapping[str, str] | None = None
) -> None:
    """Let this process see only the GPUs Spark assigned to its task, or none on "cpu" (`CUDA_VISIBLE_DEVICES`).

    Takes effect only before TensorFlow starts its GPU runtime in the process, so a Python worker calls it before
    its first model load. Without it every worker would see, and allocate memory on, every GPU of the host. With
    no assignment and a GPU wanted or allowed, visibility is left as the environment set it. Spark's discovery
    scripts number GPUs as `nvidia-smi` does (PCI bus order), so CUDA is told to number them the same way unless
    the environment already chose.
    """
    env = os.environ if environ is None else environ
    if wanted == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif addresses:
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(addresses)


def task_gpu_addresses() -> list[str]:
    """The GPU addresses Spark assigned to the running task; [] outside a Spark task or when it assigned none."""
    try:
        from pyspark import TaskContext
    except ImportError:
        return []
    context = TaskContext.get()
    if context is None:
        return []
    info = context.resources().get("gpu")
    return list(info.addresses) if info is not None else []


_RAISED_IN_WORKER = re.compile(rf"{re.escape(f'{DeviceError.__module__}.{DeviceError.__qualname__}')}: ([^\n]+)")


def device_error_in(text: str) -> DeviceError | None:
    """The `DeviceError` a Python worker raised, found in the text of the Spark exception that carried it to the
    driver (its traceback ends with the qualified name and the message); None if it holds none."""
    match = _RAISED_IN_WORKER.search(text)
    return DeviceError(match.group(1).strip()) if match else None
