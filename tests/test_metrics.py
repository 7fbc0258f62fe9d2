"""BUTTER's ten metrics and the losses against an independent NumPy transcription of Keras's definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from butter_pipeline.metrics import SAMPLE_METRICS, data_loss, epoch_values, sample_sums

EPS = 1e-7


def _activate(z: np.ndarray, kind: str) -> np.ndarray:
    if kind == "multiclass":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    with np.errstate(over="ignore"):  # exp(800): the sigmoid is exactly 0 there, as intended
        return 1.0 / (1.0 + np.exp(-z))


def keras_reference(z: np.ndarray, y: np.ndarray, kind: str) -> dict[str, float]:
    """tf.keras 2.x metric definitions, written out in NumPy (float64), averaged over rows."""
    p = _activate(z, kind)
    if p.shape[1] == 1:
        accuracy = (y == (p > 0.5)).mean(axis=1)
    else:
        accuracy = (p.argmax(axis=1) == y.argmax(axis=1)).astype(float)
    signed = 2 * y - 1 if np.isin(y, (0.0, 1.0)).all() else y
    hinge = np.maximum(1 - signed * p, 0)

    def unit(v):
        return v / np.sqrt(np.maximum((v * v).sum(axis=1, keepdims=True), 1e-12))

    yc, pc = np.clip(y, EPS, 1), np.clip(p, EPS, 1)
    per_row = {
        "accuracy": accuracy,
        "mean_squared_error": ((p - y) ** 2).mean(axis=1),
        "mean_absolute_error": np.abs(p - y).mean(axis=1),
        "mean_squared_logarithmic_error": ((np.log(np.maximum(p, EPS) + 1) - np.log(np.maximum(y, EPS) + 1)) ** 2).mean(
            axis=1
        ),
        "hinge": hinge.mean(axis=1),
        "squared_hinge": (hinge**2).mean(axis=1),
        "cosine_similarity": (unit(y) * unit(p)).sum(axis=1),
        "kullback_leibler_divergence": (yc * np.log(yc / pc)).sum(axis=1),
    }
    out = {name: float(values.mean()) for name, values in per_row.items()}
    out["root_mean_squared_error"] = float(np.sqrt(out["mean_squared_error"]))
    if kind == "regression":
        out["loss"] = out["mean_squared_error"]
    elif kind == "binary":  # sigmoid cross-entropy from logits, as Keras computes it from a sigmoid Dense layer
        out["loss"] = float((np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))).mean())
    else:
        log_softmax = z - z.max(axis=1, keepdims=True)
        log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
        out["loss"] = float(-(y * log_softmax).sum(axis=1).mean())
    return out


def _ours(z: np.ndarray, y: np.ndarray, kind: str) -> dict[str, float]:
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    loss = float(data_loss(zt, yt, kind)) * len(z)
    return epoch_values(loss, sample_sums(zt, yt, kind), len(z))


def _cases():
    rng = np.random.default_rng(7)
    n = 257
    yield "regression-1", rng.normal(0, 2, (n, 1)), rng.uniform(0, 1, (n, 1)), "regression"
    y_reg = rng.uniform(0, 1, (n, 1))
    y_reg[:20] = 0.0  # targets at 0
    yield "regression-targets-at-0", rng.normal(0, 2, (n, 1)), y_reg, "regression"
    yield "regression-one-hot", rng.normal(0, 2, (n, 6)), np.eye(6)[rng.integers(0, 6, n)], "regression"
    yield "binary", rng.normal(0, 3, (n, 1)), rng.integers(0, 2, (n, 1)).astype(float), "binary"
    z = rng.normal(0, 3, (n, 1))
    z[:10], z[10:20] = 800.0, -800.0  # probabilities of exactly 1 and 0
    yield "binary-saturated", z, rng.integers(0, 2, (n, 1)).astype(float), "binary"
    yield "multiclass", rng.normal(0, 2, (n, 7)), np.eye(7)[rng.integers(0, 7, n)], "multiclass"
    z = rng.normal(0, 2, (n, 3))
    z[:15, 0] = 900.0  # softmax of exactly (1, 0, 0)
    yield "multiclass-saturated", z, np.eye(3)[rng.integers(0, 3, n)], "multiclass"


@pytest.mark.parametrize(("case", "z", "y", "kind"), list(_cases()), ids=[c[0] for c in _cases()])
def test_metrics_match_keras_definitions(case, z, y, kind):
    expected = keras_reference(z, y, kind)
    actual = _ours(z, y, kind)
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert np.isfinite(actual[name]), (case, name)
        assert actual[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (case, name)


def test_float32_matches_to_single_precision():
    z, y = np.random.default_rng(1).normal(0, 2, (500, 5)), np.eye(5)[np.arange(500) % 5]
    expected = keras_reference(z, y, "multiclass")
    actual = _ours(z.astype(np.float32), y.astype(np.float32), "multiclass")
    for name in expected:
        assert actual[name] == pytest.approx(expected[name], rel=2e-5, abs=1e-6), name


def test_running_mean_over_batches_equals_the_mean_over_rows():
    rng = np.random.default_rng(3)
    z, y = rng.normal(0, 1, (300, 4)), np.eye(4)[rng.integers(0, 4, 300)]
    whole = sample_sums(torch.from_numpy(z), torch.from_numpy(y), "multiclass")
    parts = sum(
        sample_sums(torch.from_numpy(z[i : i + 64]), torch.from_numpy(y[i : i + 64]), "multiclass")
        for i in range(0, 300, 64)
    )
    assert torch.allclose(whole, parts)
    assert len(whole) == len(SAMPLE_METRICS)
