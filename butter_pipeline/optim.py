"""Optimizers with TensorFlow 2 / Keras update rules and default constants (what BUTTER trained with).

torch's Adam and RMSprop place epsilon differently from TensorFlow's, which changes early steps; these
follow TensorFlow exactly (Keras ``optimizer_v2``), using torch's fused ``_foreach`` kernels.
"""

from __future__ import annotations

import math

import torch

ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7
RMSPROP_RHO, RMSPROP_EPSILON = 0.9, 1e-7


class KerasOptimizer:
    """Adam, SGD or RMSprop (with optional momentum) over a list of parameters, Keras style."""

    def __init__(self, params: list[torch.Tensor], name: str, learning_rate: float, momentum: float = 0.0):
        if name not in {"adam", "sgd", "rmsprop"}:
            raise ValueError(f"unknown optimizer {name!r}")
        self.params, self.name = list(params), name
        self.lr, self.momentum = float(learning_rate), float(momentum)
        self.step_count = 0
        zeros = [torch.zeros_like(p) for p in self.params]
        self.slot_1 = zeros  # Adam m, SGD velocity, RMSprop mean square
        self.slot_2 = [torch.zeros_like(p) for p in self.params]  # Adam v, RMSprop momentum

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        self.step_count += 1
        if self.name == "adam":
            t = self.step_count
            # ResourceApplyAdam: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); var -= lr_t * m / (sqrt(v) + eps)
            lr_t = self.lr * math.sqrt(1 - ADAM_BETA_2**t) / (1 - ADAM_BETA_1**t)
            torch._foreach_lerp_(self.slot_1, grads, 1 - ADAM_BETA_1)
            torch._foreach_mul_(self.slot_2, ADAM_BETA_2)
            torch._foreach_addcmul_(self.slot_2, grads, grads, value=1 - ADAM_BETA_2)
            denom = torch._foreach_sqrt(self.slot_2)
            torch._foreach_add_(denom, ADAM_EPSILON)
            torch._foreach_addcdiv_(self.params, self.slot_1, denom, value=-lr_t)
        elif self.name == "sgd":
            if self.momentum:
                # velocity = momentum * velocity - lr * grad; var += velocity
                torch._foreach_mul_(self.slot_1, self.momentum)
                torch._foreach_add_(self.slot_1, grads, alpha=-self.lr)
                torch._foreach_add_(self.params, self.slot_1)
            else:
                torch._foreach_add_(self.params, grads, alpha=-self.lr)
        else:
            torch._foreach_mul_(self.slot_1, RMSPROP_RHO)
            torch._foreach_addcmul_(self.slot_1, grads, grads, value=1 - RMSPROP_RHO)
            if self.momentum:
                # ResourceApplyRMSProp: mom = momentum * mom + lr * g / sqrt(ms + eps); var -= mom
                denom = torch._foreach_add(self.slot_1, RMSPROP_EPSILON)
                torch._foreach_sqrt_(denom)
                torch._foreach_mul_(self.slot_2, self.momentum)
                torch._foreach_addcdiv_(self.slot_2, grads, denom, value=self.lr)
                torch._foreach_sub_(self.params, self.slot_2)
            else:
                # var -= lr * g / (sqrt(ms) + eps)
                denom = torch._foreach_sqrt(self.slot_1)
                torch._foreach_add_(denom, RMSPROP_EPSILON)
                torch._foreach_addcdiv_(self.params, grads, denom, value=-self.lr)
