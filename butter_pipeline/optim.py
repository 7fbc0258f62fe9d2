"""Optimizers with TensorFlow 2 / Keras update rules and default constants (what BUTTER trained with).

torch's Adam and RMSprop place epsilon differently from TensorFlow's, which changes early steps; these
follow TensorFlow exactly (Keras ``optimizer_v2``). The learning rate is a float, or a tensor [R] for R
stacked models (parameters [R, ...]) that each have their own learning rate.
"""

from __future__ import annotations

import math

import torch

ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7
RMSPROP_RHO, RMSPROP_EPSILON = 0.9, 1e-7


class KerasOptimizer:
    """Adam, SGD or RMSprop (with optional momentum) over a list of parameters, Keras style."""

    def __init__(
        self, params: list[torch.Tensor], name: str, learning_rate: float | torch.Tensor, momentum: float = 0.0
    ):
        if name not in {"adam", "sgd", "rmsprop"}:
            raise ValueError(f"unknown optimizer {name!r}")
        self.params, self.name, self.momentum = list(params), name, float(momentum)
        if isinstance(learning_rate, torch.Tensor) and bool((learning_rate == learning_rate[0]).all()):
            learning_rate = float(learning_rate[0])  # one rate for every model: the fused path
        self.lr = learning_rate if isinstance(learning_rate, torch.Tensor) else float(learning_rate)
        self.step_count = 0
        self.slot_1 = [torch.zeros_like(p) for p in self.params]  # Adam m, SGD velocity, RMSprop mean square
        self.slot_2 = [torch.zeros_like(p) for p in self.params]  # Adam v, RMSprop momentum

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _rates(self, scale: float) -> list[float] | list[torch.Tensor]:
        """The learning rate times ``scale``, shaped to broadcast against each parameter."""
        if isinstance(self.lr, float):
            return [self.lr * scale] * len(self.params)
        return [(self.lr * scale).view(-1, *([1] * (p.dim() - 1))) for p in self.params]

    @staticmethod
    def _apply(params: list[torch.Tensor], updates: list[torch.Tensor], rates: list, sign: float) -> None:
        """params += sign * rate * update, for a float rate or a per-model rate tensor."""
        if isinstance(rates[0], float):
            torch._foreach_add_(params, updates, alpha=sign * rates[0])
        else:
            for p, u, r in zip(params, updates, rates, strict=True):
                p.addcmul_(u, r, value=sign)

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        self.step_count += 1
        if self.name == "adam":
            t = self.step_count
            # ResourceApplyAdam: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); var -= lr_t * m / (sqrt(v) + eps)
            torch._foreach_lerp_(self.slot_1, grads, 1 - ADAM_BETA_1)
            torch._foreach_mul_(self.slot_2, ADAM_BETA_2)
            torch._foreach_addcmul_(self.slot_2, grads, grads, value=1 - ADAM_BETA_2)
            denom = torch._foreach_sqrt(self.slot_2)
            torch._foreach_add_(denom, ADAM_EPSILON)
            rates = self._rates(math.sqrt(1 - ADAM_BETA_2**t) / (1 - ADAM_BETA_1**t))
            if isinstance(rates[0], float):
                torch._foreach_addcdiv_(self.params, self.slot_1, denom, value=-rates[0])
            else:
                self._apply(self.params, torch._foreach_div(self.slot_1, denom), rates, -1.0)
        elif self.name == "sgd":
            rates = self._rates(1.0)
            if self.momentum:
                # velocity = momentum * velocity - lr * grad; var += velocity
                torch._foreach_mul_(self.slot_1, self.momentum)
                self._apply(self.slot_1, grads, rates, -1.0)
                torch._foreach_add_(self.params, self.slot_1)
            else:
                self._apply(self.params, grads, rates, -1.0)
        else:
            rates = self._rates(1.0)
            torch._foreach_mul_(self.slot_1, RMSPROP_RHO)
            torch._foreach_addcmul_(self.slot_1, grads, grads, value=1 - RMSPROP_RHO)
            if self.momentum:
                # ResourceApplyRMSProp: mom = momentum * mom + lr * g / sqrt(ms + eps); var -= mom
                denom = torch._foreach_add(self.slot_1, RMSPROP_EPSILON)
                torch._foreach_sqrt_(denom)
                torch._foreach_mul_(self.slot_2, self.momentum)
                self._apply(self.slot_2, torch._foreach_div(grads, denom), rates, 1.0)
                torch._foreach_sub_(self.params, self.slot_2)
            else:
                # var -= lr * g / (sqrt(ms) + eps)
                denom = torch._foreach_sqrt(self.slot_1)
                torch._foreach_add_(denom, RMSPROP_EPSILON)
                self._apply(self.params, torch._foreach_div(grads, denom), rates, -1.0)
