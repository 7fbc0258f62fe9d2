"""The baseline the benchmarks compare against: a plain per-run PyTorch loop.

``nn.Linear`` layers with ReLU, ``torch.optim.Adam``, one run at a time, loss only during training, and a
test-split evaluation (loss and accuracy) after each epoch so that it does the same kind of work per
epoch as butter's trainers.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from butter_pipeline.metrics import data_loss
from butter_pipeline.tasks import Task


def plain_model(n_in: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers, fan_in = [], n_in
    for index, width in enumerate(widths):
        layers.append(nn.Linear(fan_in, width))
        if index < len(widths) - 1:
            layers.append(nn.ReLU())
        fan_in = width
    return nn.Sequential(*layers)


def plain_epoch_seconds(task: Task, widths: tuple[int, ...], batch_size: int, epochs: int = 2) -> tuple[float, float]:
    """(seconds per training pass, seconds per test evaluation) of the plain loop, averaged over ``epochs``."""
    model = plain_model(task.n_in, widths)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)
    n_test = math.ceil(0.2 * len(task.x))
    x, y = torch.from_numpy(task.x.copy()), torch.from_numpy(task.y.copy())
    x_train, y_train, x_test, y_test = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    train = evaluate = 0.0
    for _ in range(epochs):
        tick = time.perf_counter()
        order = torch.randperm(len(x_train))
        for begin in range(0, len(x_train), batch_size):
            idx = order[begin : begin + batch_size]
            loss = data_loss(model(x_train[idx]), y_train[idx], task.kind)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        tock = time.perf_counter()
        with torch.no_grad():
            logits = model(x_test)
            data_loss(logits, y_test, task.kind).item()
            (logits.argmax(dim=1) == y_test.argmax(dim=1)).float().mean().item()
        train += tock - tick
        evaluate += time.perf_counter() - tock
    return train / epochs, evaluate / epochs
