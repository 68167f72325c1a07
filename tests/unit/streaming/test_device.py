"""The inference device: every rule of `choose_device`, GPU visibility, Spark's task resources, the error's way
back to the driver, and the demo model loaded on the device chosen (the CPU here; a GPU that is asked for but
missing fails fast)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from streaming.device import (
    DeviceError,
    DevicePlan,
    choose_device,
    device_error_in,
    restrict_visible_gpus,
    task_gpu_addresses,
)

SPARK_SETTINGS = ("spark.executor.resource.gpu.amount", "spark.task.resource.gpu.amount")

# ------------------------------------------------------------------------------------------- choose_device


@pytest.mark.parametrize("assigned", [(), ("0",), ("1", "2")])
@pytest.mark.parametrize("visible", [0, 1, 2])
def test_cpu_is_the_cpu_whatever_is_assigned_or_visible(assigned: tuple[str, ...], visible: int) -> None:
    plan = choose_device("cpu", assigned, visible)
    assert plan == DevicePlan("cpu")
    assert (plan.label, plan.tf_device) == ("cpu", "/CPU:0")


def test_gpu_without_a_spark_assignment_uses_the_first_visible_gpu() -> None:
    plan = choose_device("gpu", [], 2)
    assert plan == DevicePlan("gpu")
    assert (plan.label, plan.tf_device) == ("gpu:0", "/GPU:0")


@pytest.mark.parametrize("wanted", ["gpu", "auto"])
def test_a_gpu_spark_assigned_is_used_and_named_by_its_spark_address(wanted: Any) -> None:
    plan = choose_device(wanted, ["3", "5"], 2)  # the worker sees only Spark's two: TensorFlow's 0 is address 3
    assert plan == DevicePlan("gpu", ("3", "5"))
    assert (plan.label, plan.tf_device) == ("gpu:3", "/GPU:0")


def test_gpu_wanted_but_none_visible_fails_fast_naming_the_spark_settings() -> None:
    with pytest.raises(DeviceError) as caught:
        choose_device("gpu", [], 0)
    message = str(caught.value)
    assert message.startswith("no GPU found")
    assert all(setting in message for setting in SPARK_SETTINGS)
    assert "spark.executor.resource.gpu.discoveryScript" in message
    assert "CXR_INFERENCE_DEVICE=cpu" in message
    assert "\n" not in message  # one line: it travels back to the driver inside a traceback


@pytest.mark.parametrize("wanted", ["gpu", "auto"])
def test_a_gpu_spark_assigned_but_not_found_fails_fast_also_on_auto(wanted: Any) -> None:
    with pytest.raises(DeviceError) as caught:
        choose_device(wanted, ["0"], 0)
    message = str(caught.value)
    assert message.startswith("no GPU found") and "Spark assigned GPU 0" in message
    assert all(setting in message for setting in SPARK_SETTINGS)
    assert "\n" not in message


def test_auto_without_a_spark_assignment_takes_a_visible_gpu_else_the_cpu() -> None:
    assert choose_device("auto", [], 1) == DevicePlan("gpu")  # local mode on a workstation with a GPU
    assert choose_device("auto", [], 0) == DevicePlan("cpu")  # the default on a CPU-only machine: no error


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(DeviceError, match="auto, cpu, gpu"):
        choose_device("tpu", [], 0)  # type: ignore[arg-type]


def test_the_setting_reads_cxr_inference_device_and_refuses_others(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from streaming.settings import Settings

    monkeypatch.delenv("CXR_INFERENCE_DEVICE", raising=False)
    assert Settings.load().inference_device == "auto"
    monkeypatch.setenv("CXR_INFERENCE_DEVICE", "gpu")
    assert Settings.load().inference_device == "gpu"
    monkeypatch.setenv("CXR_INFERENCE_DEVICE", "cuda")
    with pytest.raises(ValidationError, match="inference_device"):
        Settings.load()


# ------------------------------------------------------------------------------------------------ the edges


def test_restrict_visible_gpus_sets_cuda_visibility_and_order(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(name, raising=False)  # restored by monkeypatch after the test
    restrict_visible_gpus("auto", ["2", "0"])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,0"
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # nvidia-smi's numbering, as discovery scripts use


def test_restrict_visible_gpus_keeps_a_chosen_order_and_leaves_no_assignment_alone() -> None:
    env = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    for wanted in ("auto", "gpu"):
        restrict_visible_gpus(wanted, [], env)  # type: ignore[arg-type]
        assert env == {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    restrict_visible_gpus("gpu", ["GPU-8f1c"], env)  # discovery scripts may name GPUs by UUID; CUDA takes those
    assert env == {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "CUDA_VISIBLE_DEVICES": "GPU-8f1c"}


@pytest.mark.parametrize("assigned", [[], ["0"]])
def test_restrict_visible_gpus_hides_every_gpu_from_a_cpu_worker(assigned: list[str]) -> None:
    env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "0,1"}
    restrict_visible_gpus("cpu", assigned, env)
    assert env == {"CUDA_VISIBLE_DEVICES": ""}  # so it reserves no GPU memory at all


def test_task_gpu_addresses_outside_a_task_and_from_a_tasks_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyspark import TaskContext
    from pyspark.resource import ResourceInformation

    assert task_gpu_addresses() == []  # not in a Spark task

    class Task:
        def __init__(self, resources: dict[str, ResourceInformation]) -> None:
            self._resources = resources

        def resources(self) -> dict[str, ResourceInformation]:
            return self._resources

    monkeypatch.setattr(TaskContext, "get", classmethod(lambda cls: Task({"gpu": ResourceInformation("gpu", ["1"])})))
    assert task_gpu_addresses() == ["1"]
    monkeypatch.setattr(TaskContext, "get", classmethod(lambda cls: Task({"fpga": ResourceInformation("fpga", ["0"])})))
    assert task_gpu_addresses() == []


def test_a_device_error_raised_in_a_worker_is_found_in_the_spark_exception_text() -> None:
    message = "no GPU found: CXR_INFERENCE_DEVICE=gpu, but TensorFlow in this Python worker sees no GPU."
    text = (
        "An exception was thrown from the Python worker. Please see the stack trace below.\n"
        "Traceback (most recent call last):\n"
        '  File "/work/main/streaming/device.py", line 87, in choose_device\n'
        "    raise DeviceError(\n"
        f"streaming.device.DeviceError: {message}\n"
        " SQLSTATE: 38000\n"
        "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(...)\n"
    )
    found = device_error_in(text)
    assert isinstance(found, DeviceError) and str(found) == message
    assert device_error_in("ValueError: DeviceError is mentioned but was not raised") is None
    assert device_error_in("org.apache.spark.SparkException: Job aborted") is None


# ---------------------------------------------------------------------------- the demo model, on a device


def _visible_gpus() -> int:
    from streaming.bundle import import_tensorflow

    import_tensorflow()
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


@pytest.fixture(scope="module")
def demo_images() -> np.ndarray:
    from streaming.bundle import read_descriptor
    from streaming.settings import default_bundle_dir

    spec = read_descriptor(default_bundle_dir()).input
    return np.random.default_rng(5).uniform(-1, 1, (3, spec.height, spec.width, spec.channels)).astype(np.float32)


@pytest.mark.parametrize("wanted", ["cpu", "auto"])
def test_the_demo_model_loads_and_predicts_on_the_cpu(wanted: Any, demo_images: np.ndarray) -> None:
    from streaming.bundle import load
    from streaming.settings import default_bundle_dir

    if wanted == "auto" and _visible_gpus():
        pytest.skip("a GPU is visible: auto takes it")
    loaded = load(default_bundle_dir(), device=wanted)
    assert loaded.device == "cpu"
    probabilities = loaded.predict(demo_images, 2)
    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_the_demo_model_asked_onto_a_missing_gpu_fails_fast() -> None:
    """The fail-fast path: no CPU fallback, and a message that says which Spark settings give a worker a GPU."""
    from streaming.bundle import load
    from streaming.settings import default_bundle_dir

    if _visible_gpus():
        pytest.skip("a GPU is visible here")
    with pytest.raises(DeviceError) as caught:
        load(default_bundle_dir(), device="gpu")
    assert "no GPU found" in str(caught.value)
    assert all(setting in str(caught.value) for setting in SPARK_SETTINGS)


def test_the_demo_model_on_a_gpu_when_there_is_one(demo_images: np.ndarray) -> None:
    from streaming.bundle import load
    from streaming.settings import default_bundle_dir

    if not _visible_gpus():
        pytest.skip("no GPU visible to TensorFlow here (the CPU path and the fail-fast path are tested instead)")
    for wanted in ("gpu", "auto"):
        loaded = load(default_bundle_dir(), device=wanted)  # type: ignore[arg-type]
        assert loaded.device == "gpu:0"
        np.testing.assert_allclose(loaded.predict(demo_images, 2).sum(axis=1), 1.0, rtol=1e-5)
