"""The classification heads `cxr train` fits on backbone features, and their common form: one Dense layer.

Two heads, one objective: a multinomial logistic regression on standardized features, each class weighted by
the inverse of its frequency, with an L2 penalty `reg / 2 * ||W||^2` on the standardized coefficients.

- `logistic`: Spark MLlib's `LogisticRegression` (L-BFGS to convergence, class weights through `weightCol`),
  fitted where the features are, on Spark.
- `keras`: a Dense layer trained by Adam on the driver (`class_weight`, `L2(reg / 2)`), from zero weights, its
  rows shuffled by a seeded `tf.data` pipeline.

Either way the result is a `DenseHead` (kernel, bias on the raw features): the logits of a Keras Dense layer on
top of the backbone, so a trained bundle is one `.keras` model that the stream serves unchanged (softmax on
those logits, as the bundle's output activation says). The conversions are plain numpy and unit-tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

HeadKind = Literal["logistic", "keras"]
HEADS: tuple[HeadKind, ...] = ("logistic", "keras")
#: bench/heads.py (see its docstring and bench/results/heads.md): the same held-out quality as the Keras head,
#: the exact optimum of the shared objective, and faster from about 20,000 training images.
DEFAULT_HEAD: HeadKind = "logistic"
#: The Dense layer's name in a trained bundle's model.
HEAD_NAME = "head"


@dataclass(frozen=True)
class DenseHead:
    """logits = features @ kernel + bias; kernel (features, labels), bias (labels,)."""

    kernel: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        if self.kernel.ndim != 2 or self.bias.shape != (self.kernel.shape[1],):
            raise ValueError(f"kernel {self.kernel.shape} and bias {self.bias.shape} do not make a Dense layer")

    @property
    def labels(self) -> int:
        return int(self.kernel.shape[1])

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.kernel.astype(np.float64) + self.bias.astype(np.float64)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return softmax(self.logits(features))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(z / z.sum(axis=1, keepdims=True))


def class_weights(y: np.ndarray, labels: int) -> np.ndarray:
    """Per class, n / (labels * n_class): every class weighs the same in the loss, and the weights of all rows
    still sum to n (so a weighted mean loss is on the scale of an unweighted one)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=labels)
    if counts.shape[0] != labels or np.any(counts == 0):
        raise ValueError(f"every label needs training examples; counts per label: {counts.tolist()}")
    return np.asarray(len(y) / (labels * counts), dtype=np.float64)


def standardization(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per feature; a constant feature gets 1 (its standardized value is 0)."""
    x = np.asarray(features, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def fold_standardization(head: DenseHead, mean: np.ndarray, std: np.ndarray) -> DenseHead:
    """A head trained on (x - mean) / std, as a head on x: W' = W / std, b' = b - (mean / std) @ W."""
    kernel = head.kernel / std[:, None]
    return DenseHead(kernel, head.bias - (mean / std) @ head.kernel)


def from_mllib(coefficients: np.ndarray, intercepts: np.ndarray) -> DenseHead:
    """MLlib's multinomial model (coefficientMatrix (labels, features), interceptVector) as a Dense layer: its
    probabilities are softmax(coefficients @ x + intercepts), the Dense layer's softmax(x @ kernel + bias)."""
    coefficients = np.asarray(coefficients, dtype=np.float64)
    return DenseHead(coefficients.T.copy(), np.asarray(intercepts, dtype=np.float64).reshape(-1))


# ------------------------------------------------------------------------------------------ the two fits


def fit_logistic(train: DataFrame, labels: int, *, reg: float, max_iter: int = 200) -> tuple[DenseHead, Any]:
    """MLlib multinomial logistic regression on a frame of (features array<float>, label_index int,
    weight double); returns the head and MLlib's model (to check the head against)."""
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    # One partition per core at most: each L-BFGS iteration is a Spark job over these rows, and on small data
    # the per-task overhead is what it costs.
    slots = train.sparkSession.sparkContext.defaultParallelism
    frame = train.select(
        array_to_vector(F.col("features")).alias("vector"), F.col("label_index").cast("double"), F.col("weight")
    ).coalesce(slots)
    estimator = LogisticRegression(
        featuresCol="vector",
        labelCol="label_index",
        weightCol="weight",
        family="multinomial",
        regParam=reg,
        elasticNetParam=0.0,
        standardization=True,
        maxIter=max_iter,
        tol=1e-6,
    )
    model = estimator.fit(frame)
    head = from_mllib(model.coefficientMatrix.toArray(), model.interceptVector.toArray())
    if head.labels != labels:
        raise RuntimeError(f"MLlib fitted {head.labels} classes for {labels} labels")
    return head, model


def mllib_probabilities(model: Any, frame: DataFrame) -> tuple[list[str], np.ndarray]:
    """(uris, MLlib's probabilities) for a frame of (uri, features): what the Dense head must reproduce."""
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    vectors = frame.select("uri", array_to_vector(F.col("features")).alias("vector"))
    rows = model.transform(vectors).select("uri", vector_to_array(F.col("probability")).alias("p")).collect()
    return [row["uri"] for row in rows], np.asarray([row["p"] for row in rows], dtype=np.float64)


def fit_keras(
    features: np.ndarray,
    y: np.ndarray,
    labels: int,
    *,
    reg: float,
    epochs: int = 300,
    learning_rate: float = 0.01,
    batch_size: int = 1024,
    seed: int = 0,
) -> DenseHead:
    """A Dense layer trained by Adam on standardized features, from zero weights, rows reshuffled every epoch
    in a seeded order (two runs give the same head), folded back into a head on the raw features.

    All epochs run as one pass over a repeated `tf.data` pipeline: Keras' per-epoch set-up costs about 50 ms,
    which made a 300-epoch fit of a few dozen rows take 15 s instead of 1."""
    import keras
    import tensorflow as tf

    mean, std = standardization(features)
    x = ((np.asarray(features, dtype=np.float64) - mean) / std).astype(np.float32)
    weights = class_weights(y, labels)
    rows = tf.data.Dataset.from_tensor_slices((x, np.asarray(y, dtype=np.int64)))
    batches = rows.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(min(batch_size, len(x)))
    dense = keras.layers.Dense(
        labels,
        kernel_initializer="zeros",
        bias_initializer="zeros",
        kernel_regularizer=keras.regularizers.L2(reg / 2) if reg > 0 else None,
    )
    model = keras.Sequential([keras.Input(shape=(x.shape[1],)), dense])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(
        batches.repeat(epochs),
        epochs=1,
        shuffle=False,
        class_weight={i: float(w) for i, w in enumerate(weights)},
        verbose=0,
    )
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in dense.get_weights())
    return fold_standardization(DenseHead(kernel, bias), mean, std)


def with_head(features: Any, head: DenseHead) -> Any:
    """The bundle's model: the backbone's feature model with the head as a Dense layer giving logits (the
    bundle's output activation, softmax, turns them into the probabilities the head computes)."""
    import keras

    dense = keras.layers.Dense(head.labels, name=HEAD_NAME)
    model = keras.Model(features.input, dense(features.output), name="cxr_trained")
    dense.set_weights([head.kernel.astype(np.float32), head.bias.astype(np.float32)])
    return model


def label_indices(y_true: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return np.asarray([index[label] for label in y_true], dtype=np.int64)
