"""The vectorized trainer: R runs that share an architecture trained as one stacked model.

Weights are stacked ``[R, fan_in, fan_out]`` and every layer is one batched matrix product, so R small
networks cost little more per step than one. Each member keeps everything a run owns, drawn exactly as the
reference trainer (``train.train_run``) draws it: its split and label noise from its seed, its
initialisation and per-epoch shuffling from its own torch generator, its learning rate, penalty and
divergence. Its records match a run trained alone to float32 rounding (``tests/test_vtrain.py``).

Runs can share a model when they share the task, network (shape, size, depth), batch size, epochs,
optimizer, momentum and test split; learning rate, label noise and penalty may differ per member.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime

import numpy as np
import torch

from butter_pipeline.checkpoint import Checkpoints, checkpoint_key
from butter_pipeline.failpoints import failpoint
from butter_pipeline.metrics import METRICS, data_loss, epoch_values, sample_sums
from butter_pipeline.nets import Layout, layout_for
from butter_pipeline.optim import KerasOptimizer
from butter_pipeline.sweep import Run
from butter_pipeline.tasks import Task, load_task
from butter_pipeline.train import RunResult, add_label_noise, failed_result, split_indices, train_run

MAX_GROUP = 64  # members per stacked model; beyond this the per-step gain is small on CPU (docs/performance.md)
EVAL_ELEMENTS = 1 << 24  # rows x inputs x members gathered at once when evaluating (bounds memory)

log = logging.getLogger(__name__)


def group_key(run: Run) -> tuple:
    e = run.experiment
    return (e.dataset, e.shape, e.size, e.depth, e.batch_size, e.epochs, e.optimizer, e.momentum, e.test_split)


def group_runs(runs: Iterable[Run], *, max_members: int = MAX_GROUP) -> list[list[Run]]:
    """Runs grouped by ``group_key`` (in first-seen order), each group at most ``max_members`` runs."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    out = []
    for members in groups.values():
        out += [members[i : i + max_members] for i in range(0, len(members), max_members)]
    return out


def memory_bytes(layout: Layout, members: int, batch_size: int, train_rows: int) -> int:
    """Estimated peak bytes of training ``members`` stacked models (float32)."""
    params = layout.num_parameters
    activations = batch_size * (layout.n_in + 3 * sum(layout.widths))
    per_epoch = train_rows * layout.widths[-1] * 3 + train_rows * 3 * 2  # targets, outputs kept, index rows
    return 4 * members * (4 * params + 2 * activations + per_epoch) + 4 * EVAL_ELEMENTS * 2


def check_environment() -> None:
    """Refuse bad ``BUTTER_DEVICE`` / ``BUTTER_MEMORY_BUDGET`` values with one line, before any work."""
    from butter_pipeline.errors import ButterError

    chosen = os.environ.get("BUTTER_DEVICE")
    if chosen:
        try:
            device = torch.device(chosen)
        except RuntimeError:
            raise ButterError(f"BUTTER_DEVICE={chosen!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ButterError(f"BUTTER_DEVICE={chosen!r} but this machine has no usable CUDA device")
    budget = os.environ.get("BUTTER_MEMORY_BUDGET")
    if budget is not None:
        try:
            ok = float(budget) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ButterError(f"BUTTER_MEMORY_BUDGET={budget!r} must be a positive number of bytes")


def memory_budget(device: torch.device) -> int:
    """Bytes a worker may use for one stacked model: $BUTTER_MEMORY_BUDGET, else part of what is free."""
    if "BUTTER_MEMORY_BUDGET" in os.environ:
        return int(float(os.environ["BUTTER_MEMORY_BUDGET"]))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * 0.5 / max(os.cpu_count() or 1, 1))  # one worker per core shares the machine


def default_device() -> torch.device:
    chosen = os.environ.get("BUTTER_DEVICE")
    if chosen:
        return torch.device(chosen)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class StackedMLP:
    """R networks of one layout as stacked tensors: weights [R, out, in], biases [R, out, 1].

    Activations flow feature-major ([R, features, rows]): with BUTTER's narrow layers, products whose
    long side is the batch run about 2.7x faster on CPU than row-major ones (docs/performance.md).
    """

    def __init__(self, layout: Layout, seeds: list[int], device: torch.device):
        fan_ins = [layout.n_in, *layout.widths[:-1]]
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        weights = [[] for _ in fan_ins]
        for generator in self.generators:
            # the draws of MLP.reset_parameters, in its order: Glorot-uniform [out, in] per layer
            for index, (fan_in, fan_out) in enumerate(zip(fan_ins, layout.widths, strict=True)):
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                weights[index].append(torch.empty(fan_out, fan_in).uniform_(-limit, limit, generator=generator))
        self.weights = [torch.stack(w).to(device).requires_grad_() for w in weights]
        self.biases = [torch.zeros(len(seeds), o, 1, device=device, requires_grad=True) for o in layout.widths]
        self.residual = frozenset(layout.residual)

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.weights, self.biases, strict=True) for t in pair]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs [R, rows, out] (logits) of inputs [R, rows, in]."""
        h = x.transpose(1, 2)
        last = len(self.weights) - 1
        for index, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out = torch.baddbmm(b, w, h)
            if index < last:
                out = torch.relu(out)
                if index in self.residual:
                    out = out + h
            h = out
        return h.transpose(1, 2).contiguous()  # losses and metrics reduce over the last dim: keep it dense

    def penalty(self, l1: torch.Tensor | None, l2: torch.Tensor | None) -> torch.Tensor | None:
        """Each member's kernel penalty [R] (Keras: summed over every layer), or None when there is none."""
        total = None
        for factors, norm in ((l1, torch.abs), (l2, torch.square)):  # weights only: Keras kernel penalties
            if factors is not None:
                term = factors * sum(norm(w).sum(dim=(1, 2)) for w in self.weights)
                total = term if total is None else total + term
        return total

    def finite(self) -> torch.Tensor:
        """[R] booleans: whether each member's parameters are all finite."""
        flags = [torch.isfinite(p.detach()).flatten(start_dim=1).all(dim=1) for p in self.parameters()]
        return torch.stack(flags).all(dim=0)


def _penalty_factors(runs: list[Run], kind: str, device: torch.device) -> torch.Tensor | None:
    values = [
        r.experiment.kernel_regularizer.strength
        if r.experiment.kernel_regularizer is not None and r.experiment.kernel_regularizer.type == kind
        else 0.0
        for r in runs
    ]
    return torch.tensor(values, device=device) if any(values) else None


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] for rows [R, b]: [R, b, features]; index_select is several times faster than indexing."""
    return x.index_select(0, rows.reshape(-1)).view(*rows.shape, x.shape[1])


@torch.no_grad()
def _evaluate(
    model: StackedMLP, x: torch.Tensor, rows: torch.Tensor, y: torch.Tensor, kind: str, penalty: torch.Tensor | None
) -> list[dict[str, float]]:
    """The ten metrics of each member over its own rows ``rows`` [R, n] (targets ``y`` [R, n, k])."""
    members, n = rows.shape
    chunk = max(256, EVAL_ELEMENTS // max(members * x.shape[1], 1))
    loss_sum = torch.zeros(members, dtype=torch.float64, device=x.device)
    sums = None
    for start in range(0, n, chunk):
        logits = model.forward(_gather_rows(x, rows[:, start : start + chunk]))
        yb = y[:, start : start + chunk]
        loss_sum += data_loss(logits, yb, kind).double() * yb.shape[1]
        batch = sample_sums(logits, yb, kind)
        sums = batch if sums is None else sums + batch
    if penalty is not None:
        loss_sum += penalty.double() * n
    losses = loss_sum.tolist()
    return [epoch_values(losses[r], sums[:, r], n) for r in range(members)]


def _training_state(model: StackedMLP, optimizer: KerasOptimizer, epoch: int, progress: dict) -> dict:
    """Everything later epochs depend on, as tensors and plain numbers (``Checkpoints`` saves it)."""
    return {
        "epoch": epoch,
        "parameters": [p.detach() for p in model.parameters()],
        "slot_1": optimizer.slot_1,
        "slot_2": optimizer.slot_2,
        "step_count": optimizer.step_count,
        "generators": [g.get_state() for g in model.generators],
        "history": [{name: torch.tensor(v, dtype=torch.float64) for name, v in h.items()} for h in progress["history"]],
        "diverged_at": [e or 0 for e in progress["diverged_at"]],
        "dead": list(progress["dead"]),
        "train_seconds": progress["train_seconds"],
        "eval_seconds": progress["eval_seconds"],
    }


def _restore(state: dict, model: StackedMLP, optimizer: KerasOptimizer) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer``; returns the recorded progress."""
    with torch.no_grad():
        for param, saved in zip(model.parameters(), state["parameters"], strict=True):
            param.copy_(saved)
    optimizer.slot_1 = [saved.clone() for saved in state["slot_1"]]
    optimizer.slot_2 = [saved.clone() for saved in state["slot_2"]]
    optimizer.step_count = state["step_count"]
    for generator, saved in zip(model.generators, state["generators"], strict=True):
        generator.set_state(saved.cpu())
    return {
        "history": [{name: v.tolist() for name, v in h.items()} for h in state["history"]],
        "diverged_at": [e or None for e in state["diverged_at"]],
        "dead": list(state["dead"]),
        "train_seconds": state["train_seconds"],
        "eval_seconds": state["eval_seconds"],
    }


def train_group(
    runs: list[Run],
    task: Task | None = None,
    *,
    device: torch.device | None = None,
    checkpoints: Checkpoints | None = None,
) -> list[RunResult]:
    """Train ``runs`` (one ``group_key``) as one stacked model; one result per run, in order.

    With ``checkpoints``, the training state is saved every ``checkpoints.every`` epochs and a saved state
    of the same runs is resumed from: the records are those of an uninterrupted run.
    """
    device = device or default_device()
    spec = runs[0].experiment
    assert all(group_key(r) == group_key(runs[0]) for r in runs), "runs of one group share their group_key"
    task = task if task is not None else load_task(spec.dataset)
    layout = layout_for(spec.shape, spec.size, spec.depth, task.n_in, task.n_out)
    if not layout.conformant:
        return [train_run(run, task, device=str(device)) for run in runs]  # recorded as rejected
    started = datetime.now(UTC)
    members, kind, batch_size = len(runs), task.kind, spec.batch_size

    # 1) data: each member's own split and label noise, drawn exactly as train_run draws them
    train_rows, test_rows, noisy = [], [], []
    for run in runs:
        rng = np.random.default_rng(run.seed)
        train_idx, test_idx = split_indices(len(task.x), spec.test_split, rng)
        noisy.append(add_label_noise(task.y[train_idx], task, run.experiment.label_noise, rng))
        train_rows.append(train_idx)
        test_rows.append(test_idx)
    x_all = torch.from_numpy(task.x.copy()).to(device)  # torch wants writable memory; one copy per group
    y_all = torch.from_numpy(task.y.copy()).to(device)
    train_rows_t = torch.from_numpy(np.stack(train_rows)).to(device)
    test_rows_t = torch.from_numpy(np.stack(test_rows)).to(device)
    y_train = torch.from_numpy(np.stack(noisy)).to(device)
    y_test = y_all[test_rows_t]
    n_train, k = train_rows_t.shape[1], task.n_out

    # 2) models and optimizer: every member seeded as if alone
    model = StackedMLP(layout, [run.seed for run in runs], device)
    rates = torch.tensor([run.experiment.learning_rate for run in runs], device=device)
    optimizer = KerasOptimizer(model.parameters(), spec.optimizer, rates, spec.momentum)
    l1, l2 = _penalty_factors(runs, "l1", device), _penalty_factors(runs, "l2", device)

    progress = {
        "history": [{f"{side}_{m}": [] for side in ("train", "test") for m in METRICS} for _ in runs],
        "diverged_at": [None] * members,
        "dead": [False] * members,  # weights non-finite: later epochs are NaN, as in train_run
        "train_seconds": 0.0,
        "eval_seconds": 0.0,
    }
    key = checkpoint_key([run.run_id for run in runs])
    first_epoch = 1
    saved = checkpoints.load(key, device) if checkpoints is not None else None
    checkpointed = saved is not None  # then there is a checkpoint to remove at the end
    if saved is not None:
        progress = _restore(saved, model, optimizer)
        first_epoch = saved["epoch"] + 1
        log.info("resuming %d runs of %s from epoch %d (checkpoint %s)", members, spec.dataset, saved["epoch"], key)
    history, diverged_at, dead = progress["history"], progress["diverged_at"], progress["dead"]
    for epoch in range(first_epoch, spec.epochs + 1):
        # 3) one pass: each member's own shuffle, one batched step for all members
        tick = time.perf_counter()
        orders = torch.stack([torch.randperm(n_train, generator=g) for g in model.generators]).to(device)
        rows = torch.gather(train_rows_t, 1, orders)
        y_ordered = torch.gather(y_train, 1, orders[..., None].expand(-1, -1, k))
        loss_sum = torch.zeros(members, dtype=torch.float64, device=device)
        seen = []
        for start in range(0, n_train, batch_size):
            xb = _gather_rows(x_all, rows[:, start : start + batch_size])
            yb = y_ordered[:, start : start + batch_size]
            logits = model.forward(xb)
            losses = data_loss(logits, yb, kind)
            penalty = model.penalty(l1, l2)
            if penalty is not None:
                losses = losses + penalty
            optimizer.zero_grad()
            losses.sum().backward()  # members are independent: each gets the gradient of its own loss
            optimizer.step()
            loss_sum.add_(losses.detach(), alpha=yb.shape[1])
            seen.append(logits.detach())
        sums = sample_sums(torch.cat(seen, dim=1), y_ordered, kind)
        train_losses = loss_sum.tolist()
        tock = time.perf_counter()

        # 4) evaluation of each member's test split with the epoch's final weights
        with torch.no_grad():
            penalty = model.penalty(l1, l2)
        test = _evaluate(model, x_all, test_rows_t, y_test, kind, penalty)
        progress["train_seconds"] += tock - tick
        progress["eval_seconds"] += time.perf_counter() - tock

        # 5) record; divergence per member, exactly as train_run decides it
        finite = model.finite().tolist()
        for r in range(members):
            if dead[r]:
                values = dict.fromkeys(METRICS, math.nan)
                train = test_r = values
            else:
                train, test_r = epoch_values(train_losses[r], sums[:, r], n_train), test[r]
            for name in METRICS:
                history[r][f"train_{name}"].append(train[name])
                history[r][f"test_{name}"].append(test_r[name])
            if not dead[r]:
                if not (math.isfinite(train["loss"]) and math.isfinite(test_r["loss"])):
                    diverged_at[r] = diverged_at[r] or epoch
                if not finite[r]:
                    diverged_at[r] = diverged_at[r] or epoch
                    dead[r] = True
        if checkpoints is not None and checkpoints.due(epoch, spec.epochs):
            checkpoints.save(key, _training_state(model, optimizer, epoch, progress))
            checkpointed = True
            failpoint("train:checkpoint-saved")

    if checkpointed:
        checkpoints.remove(key)  # staging follows at once; a crash in between retrains from the start
    finished = datetime.now(UTC)
    results = []
    for r, run in enumerate(runs):
        results.append(
            RunResult(
                run=run,
                task=task,
                status="diverged" if diverged_at[r] else "complete",
                layout=layout,
                train_rows=n_train,
                test_rows=test_rows_t.shape[1],
                history={name: np.asarray(v, dtype=np.float32) for name, v in history[r].items()},
                first_diverged_epoch=diverged_at[r],
                started_at=started,
                finished_at=finished,
                train_seconds=progress["train_seconds"] / members,
                eval_seconds=progress["eval_seconds"] / members,
                device=str(device),
                vector_width=members,
            )
        )
    return results


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def train_runs(
    runs: list[Run], *, device: torch.device | None = None, checkpoints: Checkpoints | None = None
) -> list[RunResult]:
    """Train any runs through stacked models sized to fit memory; failures are recorded, not raised.

    Groups are split before training when their estimated memory exceeds the budget, and halved again if
    an out-of-memory error still happens; a single run that cannot train is recorded as ``failed``.
    """
    device = device or default_device()
    budget = memory_budget(device)
    results: list[RunResult] = []
    for group in group_runs(runs):
        spec = group[0].experiment
        task = load_task(spec.dataset)  # a missing dataset is the user's to fix: raise
        layout = layout_for(spec.shape, spec.size, spec.depth, task.n_in, task.n_out)
        n_train = len(task.x) - math.ceil(spec.test_split * len(task.x))
        per_member = memory_bytes(layout, 1, spec.batch_size, n_train)
        width = max(1, min(len(group), budget // max(per_member, 1)))
        pending = [group[i : i + width] for i in range(0, len(group), width)]
        while pending:
            part = pending.pop(0)
            started = datetime.now(UTC)
            try:
                results += train_group(part, task, device=device, checkpoints=checkpoints)
            except (RuntimeError, ValueError, ArithmeticError, MemoryError) as exc:
                if _is_out_of_memory(exc) and len(part) > 1:
                    half = len(part) // 2
                    pending[:0] = [part[:half], part[half:]]
                    continue
                results += [failed_result(run, task, exc, started) for run in part]
    return results
