"""The heads' common form, a Dense layer: class weights, MLlib's model and a standardized fit as kernel + bias."""

from __future__ import annotations

import numpy as np
import pytest

from training.heads import (
    DenseHead,
    class_weights,
    fold_standardization,
    from_mllib,
    label_indices,
    softmax,
    standardization,
)

RNG = np.random.default_rng(0)


def test_class_weights_balance_the_classes_and_keep_the_total() -> None:
    y = np.array([0] * 30 + [1] * 10 + [2] * 20)
    weights = class_weights(y, 3)
    np.testing.assert_allclose(weights, [60 / 90, 60 / 30, 60 / 60])
    per_class_total = [weights[c] * np.sum(y == c) for c in range(3)]
    np.testing.assert_allclose(per_class_total, [20, 20, 20])
    assert weights[y].sum() == pytest.approx(len(y))


def test_class_weights_need_every_class() -> None:
    with pytest.raises(ValueError, match="every label needs training examples"):
        class_weights(np.array([0, 0, 2]), 3)


def test_mllib_coefficients_become_the_dense_kernel() -> None:
    """MLlib: P(k | x) = softmax(coefficientMatrix @ x + interceptVector)_k; Dense: softmax(x @ W + b)."""
    coefficients, intercepts = RNG.normal(size=(3, 8)), RNG.normal(size=3)
    x = RNG.normal(size=(5, 8))
    head = from_mllib(coefficients, intercepts)
    assert head.kernel.shape == (8, 3) and head.bias.shape == (3,)
    margins = np.stack([coefficients @ row + intercepts for row in x])
    expected = np.exp(margins) / np.exp(margins).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(head.probabilities(x), expected, atol=1e-12)


def test_a_head_fitted_on_standardized_features_folds_into_one_on_raw_features() -> None:
    x = RNG.normal(loc=3.0, scale=[0.1, 2.0, 5.0, 1.0], size=(20, 4))
    x[:, 3] = 7.0  # a constant feature: its std is taken as 1
    mean, std = standardization(x)
    assert std[3] == 1.0
    trained = DenseHead(RNG.normal(size=(4, 2)), RNG.normal(size=2))
    folded = fold_standardization(trained, mean, std)
    np.testing.assert_allclose(folded.logits(x), trained.logits((x - mean) / std), atol=1e-10)


def test_probabilities_are_a_stable_softmax() -> None:
    p = softmax(np.array([[1000.0, 1000.0], [0.0, -1000.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5], [1.0, 0.0]])


def test_a_dense_head_needs_matching_shapes() -> None:
    with pytest.raises(ValueError, match="do not make a Dense layer"):
        DenseHead(np.zeros((4, 2)), np.zeros(3))


def test_label_indices_follow_the_label_order() -> None:
    assert label_indices(["b", "a", "b"], ["a", "b"]).tolist() == [1, 0, 1]


def test_the_keras_head_is_deterministic_and_near_the_regularized_optimum() -> None:
    """Zero-initialised Adam on the same objective as MLlib's (standardized, class-weighted, L2 reg/2 ||W||^2)."""
    from training.heads import fit_keras

    x = RNG.normal(size=(40, 6)) * [1, 2, 3, 4, 5, 6] + 10
    y = (x[:, 0] - 10 + 0.5 * RNG.normal(size=40) > 0).astype(int)
    first = fit_keras(x, y, 2, reg=0.1, epochs=400, seed=1)
    second = fit_keras(x, y, 2, reg=0.1, epochs=400, seed=1)
    np.testing.assert_array_equal(first.kernel, second.kernel)
    accuracy = np.mean(first.probabilities(x).argmax(axis=1) == y)
    assert accuracy >= 0.85
    # At the optimum the gradient of the objective vanishes: check it is small in the standardized space.
    mean, std = standardization(x)
    z = (x - mean) / std
    kernel_std, bias_std = first.kernel * std[:, None], first.bias + mean @ first.kernel  # the head as trained
    p = softmax(z @ kernel_std + bias_std)
    w = class_weights(y, 2)[y]
    onehot = np.eye(2)[y]
    gradient = z.T @ ((p - onehot) * w[:, None]) / len(y) + 0.1 * kernel_std
    assert np.abs(gradient).max() < 1e-2


def test_with_head_puts_the_head_on_the_features_as_logits() -> None:
    import keras

    inputs = keras.Input(shape=(4,))
    features = keras.Model(inputs, keras.layers.Dense(3, name="f")(inputs))
    head = DenseHead(RNG.normal(size=(3, 2)), RNG.normal(size=2))
    from training.heads import HEAD_NAME, with_head

    model = with_head(features, head)
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    f = features.predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), head.logits(f), atol=1e-5)
    assert model.layers[-1].name == HEAD_NAME
