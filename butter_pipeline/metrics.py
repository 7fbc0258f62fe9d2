"""The loss and BUTTER's per-epoch metrics, with the definitions tf.keras 2.x used.

All functions take the output layer's pre-activation (``logits``) and the targets ``y`` [n, k]. The
output activation is sigmoid for ``regression`` and ``binary`` tasks, softmax for ``multiclass``; as in
Keras (which unwraps a Dense layer's sigmoid/softmax to logits inside its cross-entropies) the losses
are computed from logits. Metrics are computed on the activated outputs, per sample, and averaged over
samples; ``root_mean_squared_error`` is the square root of the epoch's mean squared error, as Keras's
``RootMeanSquaredError`` accumulates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from butter_pipeline.schemas import METRICS  # the metric names belong to the data contract

EPSILON = 1e-7  # keras.backend.epsilon()
# Metrics that are per-sample means (everything but the loss and RMSE), in the order ``sample_sums`` returns.
SAMPLE_METRICS: tuple[str, ...] = tuple(m for m in METRICS if m not in {"loss", "root_mean_squared_error"})


def activate(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if kind == "multiclass" else torch.sigmoid(logits)


def data_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over the samples (dim -2) of the per-sample loss (MSE, binary or categorical cross-entropy).

    ``logits`` and ``y`` are [n, k] (a scalar results) or [R, n, k] for R stacked models (shape [R]).
    """
    if kind == "regression":
        per_sample = (torch.sigmoid(logits) - y).square().mean(dim=-1)
    elif kind == "binary":
        per_sample = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=-1)
    else:
        per_sample = -(y * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    return per_sample.mean(dim=-1)


def kernel_penalty(kernels: list[torch.Tensor], regularizer: str | None, strength: float) -> torch.Tensor:
    """Keras's L1/L2 kernel regularization loss, summed over every layer (output layer included)."""
    if regularizer is None:
        return torch.zeros((), dtype=kernels[0].dtype, device=kernels[0].device)
    if regularizer == "l1":
        return strength * sum(k.abs().sum() for k in kernels)
    return strength * sum(k.square().sum() for k in kernels)


def sample_sums(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Sums over the samples (dim -2) of each metric in ``SAMPLE_METRICS``.

    float64 [len(SAMPLE_METRICS)] for [n, k] inputs, [len(SAMPLE_METRICS), R] for R stacked models.
    """
    p = activate(logits, kind)
    if p.shape[-1] == 1:  # Keras's 'accuracy' on one output is binary accuracy at threshold 0.5
        accuracy = ((p > 0.5).to(y.dtype) == y).to(p.dtype).mean(dim=-1)
    else:
        accuracy = (p.argmax(dim=-1) == y.argmax(dim=-1)).to(p.dtype)
    error = p - y
    mse = error.square().mean(dim=-1)
    mae = error.abs().mean(dim=-1)
    msle = (torch.log1p(p.clamp_min(EPSILON)) - torch.log1p(y.clamp_min(EPSILON))).square().mean(dim=-1)
    # Keras's hinge converts 0/1 labels to -1/+1 when every label in the batch is 0 or 1 (per model).
    all_01 = ((y == 0) | (y == 1)).flatten(start_dim=-2).all(dim=-1)
    signed = torch.where(all_01[..., None, None], 2.0 * y - 1.0, y)
    margin = (1.0 - signed * p).clamp_min(0.0)
    hinge = margin.mean(dim=-1)
    squared_hinge = margin.square().mean(dim=-1)
    cosine = (F.normalize(y, dim=-1, eps=1e-6) * F.normalize(p, dim=-1, eps=1e-6)).sum(dim=-1)
    y_c, p_c = y.clamp(EPSILON, 1.0), p.clamp(EPSILON, 1.0)
    kld = (y_c * torch.log(y_c / p_c)).sum(dim=-1)
    stacked = torch.stack([accuracy, mse, mae, msle, hinge, squared_hinge, cosine, kld])
    return stacked.sum(dim=-1, dtype=torch.float64)


def epoch_values(loss_sum: float, sums: torch.Tensor, count: int) -> dict[str, float]:
    """Turn an epoch's sums over ``count`` samples into the ten metric values."""
    means = (sums / count).tolist()
    values = dict(zip(SAMPLE_METRICS, means, strict=True))
    values["loss"] = loss_sum / count
    values["root_mean_squared_error"] = max(values["mean_squared_error"], 0.0) ** 0.5
    return {name: values[name] for name in METRICS}
