"""The model-input step: a decoded image to the float32 array the model was trained on.

It reproduces Keras' ``keras.utils.load_img(path, target_size=(h, w))`` + ``img_to_array`` (convert the mode
first, then ``img.resize((w, h), resample)`` only when the size differs, then ``np.asarray(img, float32)``),
followed by the model's pixel scaling. Any divergence from that pipeline is a silent accuracy loss, so the
unit tests compare against Keras itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image


class Resample(StrEnum):
    """Pillow resampling filters, named as Keras' ``interpolation`` argument names them."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    BOX = "box"
    HAMMING = "hamming"


_PIL_RESAMPLE: dict[Resample, Image.Resampling] = {
    Resample.NEAREST: Image.Resampling.NEAREST,
    Resample.BILINEAR: Image.Resampling.BILINEAR,
    Resample.BICUBIC: Image.Resampling.BICUBIC,
    Resample.LANCZOS: Image.Resampling.LANCZOS,
    Resample.BOX: Image.Resampling.BOX,
    Resample.HAMMING: Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class InputSpec:
    """The model's input tensor (height, width, channels) and the resampling it was trained with."""

    height: int
    width: int
    channels: int  # 1 or 3
    resample: Resample = Resample.NEAREST

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError("height and width must be positive")
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        # Accept plain strings from configuration; an unknown name fails here, not at the first image.
        object.__setattr__(self, "resample", Resample(self.resample))


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_SCHEMES = frozenset({"none", "unit", "xception", "inception", "tf", "torch", "imagenet", "custom"})


@dataclass(frozen=True)
class Scaling:
    """Pixel scaling applied to raw 0..255 floats.

    * ``"xception"`` / ``"inception"`` / ``"tf"``: x / 127.5 - 1 (Keras ``preprocess_input`` mode "tf").
    * ``"torch"`` / ``"imagenet"``: x / 255, then (x - ImageNet mean) / ImageNet std per channel (3 channels).
    * ``"unit"``: x / 255.
    * ``"custom"``: x * scale + offset, then (x - mean) / std where given (one value, or one per channel).
    * ``"none"``: raw 0..255 floats.

    scale/offset/mean/std apply only to "custom"; setting them with another scheme is an error rather than
    silently ignored.
    """

    scheme: str = "none"
    scale: float = 1.0
    offset: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.scheme not in _SCHEMES:
            raise ValueError(f"unknown scaling scheme {self.scheme!r}; expected one of {sorted(_SCHEMES)}")
        customised = (self.scale, self.offset, self.mean, self.std) != (1.0, 0.0, None, None)
        if customised and self.scheme != "custom":
            raise ValueError("scale, offset, mean and std apply only to scheme 'custom'")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None:
                if len(values) == 0:
                    raise ValueError(f"{name} must have at least one value")
                object.__setattr__(self, name, tuple(float(v) for v in values))
        if self.std is not None and any(v == 0 for v in self.std):
            raise ValueError("std values must be non-zero")


def to_model_input(img: Image.Image, spec: InputSpec, scaling: Scaling) -> np.ndarray:
    """One image to a float32 array of shape (height, width, channels), exactly as Keras' ``load_img``.

    The mode is converted before resizing, as ``load_img`` does (``convert("RGB")``, or ``convert("L")`` for
    one channel), and the image is resized only if its size differs. Expects `decode_image` output ("L" or
    "RGB"); other modes go through Pillow's ``convert``.
    """
    mode = "RGB" if spec.channels == 3 else "L"
    if img.mode != mode:
        img = img.convert(mode)
    size = (spec.width, spec.height)
    if img.size != size:
        img = img.resize(size, _PIL_RESAMPLE[spec.resample])
    x = np.asarray(img, dtype=np.float32)
    if x.ndim == 2:
        x = x.reshape(x.shape[0], x.shape[1], 1)
    return scale_array(x, scaling)


def scale_array(x: np.ndarray, scaling: Scaling) -> np.ndarray:
    """Apply `scaling` to a float32 array whose last axis is channels (one image or a batch).

    Arithmetic stays in float32, in the same order as Keras' ``preprocess_input``, so results match it
    bit for bit. Returns a new array; `x` is not modified.
    """
    x = np.asarray(x, dtype=np.float32)
    scheme = scaling.scheme
    if scheme == "none":
        return x.copy()
    if scheme == "unit":
        return x / np.float32(255.0)
    if scheme in ("xception", "inception", "tf"):
        return x / np.float32(127.5) - np.float32(1.0)
    if scheme in ("torch", "imagenet"):
        return _normalise(x / np.float32(255.0), _IMAGENET_MEAN, _IMAGENET_STD)
    if scheme == "custom":
        y = x * np.float32(scaling.scale) + np.float32(scaling.offset)
        return _normalise(y, scaling.mean, scaling.std)
    raise ValueError(f"unknown scaling scheme {scheme!r}")


def _normalise(x: np.ndarray, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> np.ndarray:
    """(x - mean) / std per channel; one value broadcasts, otherwise the count must match the channels."""
    channels = x.shape[-1] if x.ndim else 1
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) not in (1, channels):
            raise ValueError(f"{name} has {len(values)} values but the input has {channels} channels")
    if mean is not None:
        x = x - np.asarray(mean, dtype=np.float32)
    if std is not None:
        x = x / np.asarray(std, dtype=np.float32)
    return x


def draft_size_for(spec: InputSpec) -> tuple[int, int] | None:
    """The (width, height) to pass as `decode_image`'s `draft_size`, or None when drafting would change the
    model input. Today that is always None, for every resample.

    JPEG drafting decodes with libjpeg's scaled IDCT (1/2, 1/4, 1/8). Those pixels are not what any Pillow
    filter computes from the full-resolution image, not even BOX (the IDCT's DC term is a block mean, but
    rounded and boundary-handled differently, and the remaining resize from the drafted size is a second,
    differently-weighted pass). On this project's chest X-rays, resizing to 150x150 after drafting differs
    from the undrafted resize by up to 75 grey levels with BOX, 25 with BILINEAR and 29 with LANCZOS, and
    NEAREST picks entirely different source pixels. Keras' ``load_img``, which the model was trained with,
    never drafts, so drafting would be a silent train/serve skew. The hook stays so that a model trained
    on drafted inputs (or one that declares itself tolerant) can opt in here.
    """
    del spec
    return None
