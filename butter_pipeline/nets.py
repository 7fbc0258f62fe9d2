"""Network shapes, BUTTER's width search, and the reference PyTorch MLP.

``depth`` counts Dense layers including the output layer; ``size`` is the target number of trainable
parameters, biases included (reference butter.md §3). A shape maps the first layer's width ``w0`` to every
layer's width; ``layout_for`` searches ``w0`` so that the parameter count comes closest to ``size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MAX_RELATIVE_SIZE_ERROR = 0.2  # BUTTER (since 2022-05-03) refused networks more than 20 % off target


def _rectangle(w0: int, depth: int, n_out: int) -> list[int]:
    return [w0] * (depth - 1) + [n_out]


def _trapezoid(w0: int, depth: int, n_out: int) -> list[int]:
    beta = (w0 - n_out) / (depth - 1)
    return [round(w0 - beta * k) for k in range(depth - 1)] + [n_out]


def _exponential(w0: int, depth: int, n_out: int) -> list[int]:
    beta = math.exp(math.log(n_out / w0) / (depth - 1))
    return [max(n_out, round(w0 * beta**k)) for k in range(depth - 1)] + [n_out]


def _wide_first(factor: int) -> Callable[[int, int, int], list[int]]:
    def widths(w0: int, depth: int, n_out: int) -> list[int]:
        if depth == 2:
            return [w0, n_out]
        return [w0] + [max(1, round(w0 / factor))] * (depth - 2) + [n_out]

    return widths


_WIDTHS: dict[str, Callable[[int, int, int], list[int]]] = {
    "rectangle": _rectangle,
    "trapezoid": _trapezoid,
    "exponential": _exponential,
    "wide_first_2x": _wide_first(2),
    "wide_first_4x": _wide_first(4),
    "wide_first_8x": _wide_first(8),
    "wide_first_16x": _wide_first(16),
    "rectangle_residual": _rectangle,
}
SHAPES: tuple[str, ...] = tuple(_WIDTHS)


def residual_layers(shape: str, depth: int) -> tuple[int, ...]:
    """Indices of the layers whose output gets the previous layer's output added (after the ReLU).

    BUTTER's ``residual_mode='full'``: every layer d with first < d < depth - 1, where first is 0 (or 1 for
    wide-first shapes); the first hidden layer and the output layer never get a skip connection.
    """
    if not shape.endswith("_residual"):
        return ()
    first = 1 if shape.startswith("wide_first") else 0
    return tuple(range(first + 1, depth - 1))


def widths_for(shape: str, w0: int, depth: int, n_out: int) -> list[int]:
    return _WIDTHS[shape](w0, depth, n_out)


def count_parameters(widths: list[int], n_in: int) -> int:
    """Trainable parameters of a Dense stack: sum of (inputs + 1) x width; residual adds are free."""
    total, fan_in = 0, n_in
    for width in widths:
        total += (fan_in + 1) * width
        fan_in = width
    return total


@dataclass(frozen=True)
class Layout:
    """The network a run trains: layer widths, parameter count and how far that is from the target."""

    shape: str
    depth: int
    n_in: int
    widths: tuple[int, ...]
    num_parameters: int
    target_size: int

    @property
    def relative_size_error(self) -> float:
        return (self.num_parameters - self.target_size) / self.target_size

    @property
    def conformant(self) -> bool:
        return abs(self.relative_size_error) <= MAX_RELATIVE_SIZE_ERROR

    @property
    def residual(self) -> tuple[int, ...]:
        return residual_layers(self.shape, self.depth)


def layout_for(shape: str, size: int, depth: int, n_in: int, n_out: int) -> Layout:
    """BUTTER's search: binary search on w0 in [1, 2^30]; keep the best |count - size| evaluated."""
    lo, hi = 1, 2**30
    best: tuple[int, int, list[int]] | None = None

    def consider(w0: int) -> int:
        nonlocal best
        widths = widths_for(shape, w0, depth, n_out)
        delta = count_parameters(widths, n_in) - size
        if best is None or abs(delta) < abs(best[0]):
            best = (delta, w0, widths)
        return delta

    while lo < hi:
        mid = (lo + hi) // 2
        delta = consider(mid)
        if delta < 0:
            lo = mid + 1
        elif delta > 0:
            hi = mid
        else:
            break
    else:
        consider(lo)
    assert best is not None
    widths = best[2]
    return Layout(shape, depth, n_in, tuple(widths), count_parameters(widths, n_in), size)


class MLP(nn.Module):
    """The reference network: Dense layers with ReLU between them, residual adds after the ReLU.

    ``forward`` returns the output layer's pre-activation (logits); the output activation (sigmoid or
    softmax) belongs to the loss and the metrics, where it is applied in a numerically stable way.
    """

    def __init__(self, layout: Layout):
        super().__init__()
        fan_ins = [layout.n_in, *layout.widths[:-1]]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(fan_ins, layout.widths, strict=True))
        self.residual = frozenset(layout.residual)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Keras Dense defaults: Glorot-uniform kernels, zero biases, drawn from ``generator``."""
        with torch.no_grad():
            for layer in self.layers:
                fan_out, fan_in = layer.weight.shape
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                layer.weight.uniform_(-limit, limit, generator=generator)
                layer.bias.zero_()

    def kernels(self) -> list[torch.Tensor]:
        return [layer.weight for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            out = layer(x)
            if index < last:
                out = torch.relu(out)
                if index in self.residual:
                    out = out + x
            x = out
        return x
