"""The reference training loop: one run, one network, read top to bottom.

What a run does, in order: split the task 80/20 with the run's seed, add label noise to the training
split, size the network by BUTTER's width search (refusing one more than 20 % off its target), initialise
it like Keras, then train for ``epochs`` epochs with Keras's update rules, recording BUTTER's ten metrics
on the training split (running means over the epoch's minibatches, as Keras's ``fit`` reports them) and
on the test split (a full pass after each epoch). A run whose loss turns NaN or infinite is recorded, not
raised: it is data (status ``diverged``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import torch

from butter_pipeline.metrics import METRICS, data_loss, epoch_values, kernel_penalty, sample_sums
from butter_pipeline.nets import MLP, Layout, layout_for
from butter_pipeline.optim import KerasOptimizer
from butter_pipeline.sweep import Run
from butter_pipeline.tasks import Task, load_task

EVAL_BATCH_ROWS = 16384  # evaluation is chunked only to bound memory; any size gives the same sums


@dataclass
class RunResult:
    """What a run produced: its status, its network and one value per metric and epoch."""

    run: Run
    task: Task
    status: str
    layout: Layout | None = None
    error: str | None = None
    train_rows: int = 0
    test_rows: int = 0
    # "train_loss", "test_accuracy", ... -> float32 [epochs recorded]
    history: dict[str, np.ndarray] = field(default_factory=dict)
    first_diverged_epoch: int | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    device: str = "cpu"
    vector_width: int = 1  # runs trained together in one stacked model (1: alone)
    attempts: int = 1  # times the run was trained: more than 1 after a failure was retried

    @property
    def epochs_recorded(self) -> int:
        return len(self.history.get("train_loss", ()))


def split_indices(rows: int, test_split: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled, unstratified train/test split; the test part holds ceil(test_split * rows) rows."""
    order = rng.permutation(rows)
    n_test = math.ceil(test_split * rows)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def add_label_noise(y: np.ndarray, task: Task, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Label noise on the training targets, as BUTTER meant it (not its one-hot bug, see docs/fidelity.md).

    classification, one output: flip the 0/1 label of int(rows * noise) rows chosen without replacement;
    classification, one-hot: move those rows to a different class, uniformly among the other classes;
    regression: add N(0, (noise * std of the column)^2) to every target column.
    """
    if noise == 0.0:
        return y
    y = y.copy()
    if task.task_type == "regression":
        y += rng.normal(0.0, 1.0, size=y.shape).astype(np.float32) * (noise * y.std(axis=0))
        return y
    rows = rng.choice(len(y), size=int(len(y) * noise), replace=False)
    if task.n_out == 1:
        y[rows] = 1.0 - y[rows]
    else:
        classes = y[rows].argmax(axis=1)
        shifted = (classes + rng.integers(1, task.n_out, size=len(rows))) % task.n_out
        y[rows] = np.eye(task.n_out, dtype=y.dtype)[shifted]
    return y


@torch.no_grad()
def evaluate(model: MLP, x: torch.Tensor, y: torch.Tensor, kind: str, penalty: float) -> dict[str, float]:
    """The ten metrics over a whole split with the current weights (the loss includes the penalty)."""
    loss_sum, sums = 0.0, None
    for start in range(0, len(x), EVAL_BATCH_ROWS):
        xb, yb = x[start : start + EVAL_BATCH_ROWS], y[start : start + EVAL_BATCH_ROWS]
        logits = model(xb)
        loss_sum += float(data_loss(logits, yb, kind)) * len(xb)
        batch = sample_sums(logits, yb, kind)
        sums = batch if sums is None else sums + batch
    return epoch_values(loss_sum + penalty * len(x), sums, len(x))


def train_run(run: Run, task: Task | None = None, *, device: str = "cpu") -> RunResult:
    """Train one run and return its result; never raises for diverged or non-conformant networks."""
    spec = run.experiment
    task = task if task is not None else load_task(spec.dataset)
    result = RunResult(run=run, task=task, status="complete", device=device)

    # 1) the network: BUTTER's width search; refuse one more than 20 % off its target size
    layout = layout_for(spec.shape, spec.size, spec.depth, task.n_in, task.n_out)
    result.layout = layout
    if not layout.conformant:
        result.status = "rejected"
        result.error = (
            f"no conformant network: closest {spec.shape} of depth {spec.depth} has "
            f"{layout.num_parameters} parameters, {layout.relative_size_error:+.1%} off target {spec.size}"
        )
        result.finished_at = datetime.now(UTC)
        return result

    # 2) data: the run's own split and label noise, both drawn from the run's seed
    rng = np.random.default_rng(run.seed)
    train_idx, test_idx = split_indices(len(task.x), spec.test_split, rng)
    y_train = add_label_noise(task.y[train_idx], task, spec.label_noise, rng)
    x_train = torch.from_numpy(task.x[train_idx]).to(device)
    y_train = torch.from_numpy(y_train).to(device)
    x_test = torch.from_numpy(task.x[test_idx]).to(device)
    y_test = torch.from_numpy(np.ascontiguousarray(task.y[test_idx])).to(device)
    result.train_rows, result.test_rows = len(train_idx), len(test_idx)

    # 3) model and optimizer: Keras initialisation and update rules, seeded by the run
    generator = torch.Generator().manual_seed(run.seed)
    model = MLP(layout)
    model.reset_parameters(generator)
    model.to(device)
    optimizer = KerasOptimizer(list(model.parameters()), spec.optimizer, spec.learning_rate, spec.momentum)
    regularizer = spec.kernel_regularizer
    reg_type = None if regularizer is None else regularizer.type
    reg_strength = 0.0 if regularizer is None else regularizer.strength
    kind, batch_size, n_train = task.kind, spec.batch_size, len(train_idx)

    history: dict[str, list[float]] = {f"{side}_{m}": [] for side in ("train", "test") for m in METRICS}
    for epoch in range(1, spec.epochs + 1):
        # 4) one pass over the reshuffled training split; metrics are running means, as Keras reports
        tick = time.perf_counter()
        order = torch.randperm(n_train, generator=generator).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen_logits = []  # each minibatch's outputs under the weights of that step, as Keras averages them
        for start in range(0, n_train, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            logits = model(xb)
            loss = data_loss(logits, yb, kind)
            if reg_type is not None:
                loss = loss + kernel_penalty(model.kernels(), reg_type, reg_strength)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * len(idx)
            seen_logits.append(logits.detach())
        # per-sample metrics are additive, so one pass over the epoch's outputs gives the running means
        sums = sample_sums(torch.cat(seen_logits), y_train[order], kind)
        train = epoch_values(float(loss_sum), sums, n_train)
        tock = time.perf_counter()

        # 5) a full pass over the test split with the epoch's final weights
        with torch.no_grad():
            penalty = float(kernel_penalty(model.kernels(), reg_type, reg_strength))
        test = evaluate(model, x_test, y_test, kind, penalty)
        result.train_seconds += tock - tick
        result.eval_seconds += time.perf_counter() - tock
        for name in METRICS:
            history[f"train_{name}"].append(train[name])
            history[f"test_{name}"].append(test[name])

        # 6) divergence is data: mark it; once the weights are non-finite every later epoch is NaN too
        if not (math.isfinite(train["loss"]) and math.isfinite(test["loss"])):
            result.status = "diverged"
            result.first_diverged_epoch = result.first_diverged_epoch or epoch
        weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if not weights_finite:
            result.status = "diverged"
            result.first_diverged_epoch = result.first_diverged_epoch or epoch
            for values in history.values():
                values.extend([math.nan] * (spec.epochs - epoch))
            break

    result.history = {name: np.asarray(values, dtype=np.float32) for name, values in history.items()}
    result.finished_at = datetime.now(UTC)
    return result


def failed_result(run: Run, task: Task, error: BaseException, started_at: datetime) -> RunResult:
    """The record of a run that raised: status ``failed`` and the error, no epochs."""
    message = f"{type(error).__name__}: {error}".splitlines()[0][:2000]
    return RunResult(
        run=run,
        task=task,
        status="failed",
        error=message,
        started_at=started_at,
        finished_at=datetime.now(UTC),
    )
