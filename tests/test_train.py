"""The reference training loop: seeds, splits, label noise, Keras update rules, divergence as data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from butter_pipeline.metrics import data_loss, sample_sums
from butter_pipeline.nets import MLP
from butter_pipeline.optim import KerasOptimizer
from butter_pipeline.sweep import parse_spec, plan_runs
from butter_pipeline.tasks import load_task
from butter_pipeline.train import add_label_noise, split_indices, train_run


def _runs(repetitions: int = 1, **grid):
    spec = parse_spec({"name": "t", "repetitions": repetitions, "grid": grid}, source="test")
    return list(plan_runs(spec))


def test_same_run_gives_identical_history_and_repetitions_differ():
    runs = _runs(2, dataset="wine_quality_white", size=512, epochs=3, learning_rate=1e-3)
    first, again, other = train_run(runs[0]), train_run(runs[0]), train_run(runs[1])
    assert first.status == "complete" and first.epochs_recorded == 3
    for name, values in first.history.items():
        assert np.array_equal(values, again.history[name]), name
    assert not np.array_equal(first.history["test_loss"], other.history["test_loss"])


def test_split_is_80_20_and_seeded():
    rng = np.random.default_rng(5)
    train, test = split_indices(101, 0.2, rng)
    assert len(test) == 21 and len(train) == 80
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(range(101))


def test_training_reduces_the_loss():
    run = _runs(dataset="adult", size=1024, epochs=4, learning_rate=1e-3)[0]
    result = train_run(run)
    assert result.history["test_loss"][-1] < result.history["test_loss"][0]
    assert result.history["test_accuracy"][-1] > 0.8


def test_train_metrics_are_running_means_over_the_epoch():
    # With one minibatch per epoch, the epoch's train loss is the loss of the weights before the step.
    run = _runs(dataset="529_pollen", size=256, epochs=2, batch_size=100_000, learning_rate=1e-2)[0]
    result = train_run(run)
    task = load_task("529_pollen")
    train_idx, _ = split_indices(len(task.x), 0.2, np.random.default_rng(run.seed))
    model = MLP(result.layout)
    model.reset_parameters(torch.Generator().manual_seed(run.seed))
    with torch.no_grad():
        initial = data_loss(
            model(torch.from_numpy(task.x[train_idx])), torch.from_numpy(task.y[train_idx]), "regression"
        )
    assert result.history["train_loss"][0] == pytest.approx(float(initial), rel=1e-5)


def test_diverging_learning_rate_is_recorded_not_raised():
    run = _runs(dataset="wine_quality_white", size=4096, epochs=6, optimizer="sgd", learning_rate=1e12)[0]
    result = train_run(run)
    assert result.status == "diverged" and result.first_diverged_epoch is not None
    assert result.epochs_recorded == 6
    assert not np.isfinite(result.history["train_loss"][-1])


def test_non_conformant_network_is_rejected_with_reason():
    run = _runs(dataset="mnist", size=1024, epochs=1)[0]
    result = train_run(run)
    assert result.status == "rejected" and "21.2% off target 1024" in result.error
    assert result.epochs_recorded == 0


def test_label_noise_flips_binary_labels():
    task = load_task("adult")
    y = task.y[:1000]
    noisy = add_label_noise(y, task, 0.1, np.random.default_rng(0))
    assert int((noisy != y).sum()) == 100 and set(np.unique(noisy)) <= {0.0, 1.0}


def test_label_noise_moves_one_hot_rows_to_another_class():
    task = load_task("wine_quality_white")
    y = task.y[:1000]
    noisy = add_label_noise(y, task, 0.2, np.random.default_rng(0))
    changed = (noisy != y).any(axis=1)
    assert changed.sum() == 200
    assert np.array_equal(noisy.sum(axis=1), np.ones(1000))  # still exactly one class per row (BUTTER's bug broke this)
    assert (noisy[changed].argmax(axis=1) != y[changed].argmax(axis=1)).all()


def test_label_noise_on_regression_scales_with_the_target_spread():
    task = load_task("537_houses")
    y = task.y[:5000]
    noisy = add_label_noise(y, task, 0.1, np.random.default_rng(0))
    assert np.std(noisy - y) == pytest.approx(0.1 * y.std(), rel=0.05)


def test_adam_follows_tensorflows_update_rule():
    param = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    optimizer = KerasOptimizer([param], "adam", 0.1)
    m = v = np.zeros(2)
    expected = np.array([1.0, -2.0])
    for t, grad in enumerate(([0.5, -1.0], [0.1, 0.3], [-2.0, 0.0]), start=1):
        param.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
        g = np.array(grad)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lr_t = 0.1 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        expected = expected - lr_t * m / (np.sqrt(v) + 1e-7)
        assert np.allclose(param.detach().numpy(), expected, rtol=1e-12)


def test_metrics_follow_keras_definitions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    p = torch.softmax(logits, dim=-1)
    sums = sample_sums(logits, y, "multiclass").tolist()
    accuracy, mse, mae, msle, hinge, sq_hinge, cosine, kld = sums
    assert accuracy == 1.0  # first row right, second wrong
    assert mse == pytest.approx(float(((p - y) ** 2).mean(dim=1).sum()), rel=1e-6)
    assert mae == pytest.approx(float((p - y).abs().mean(dim=1).sum()), rel=1e-6)
    assert hinge == pytest.approx(float((1 - (2 * y - 1) * p).clamp_min(0).mean(dim=1).sum()), rel=1e-6)
    assert sq_hinge == pytest.approx(float(((1 - (2 * y - 1) * p).clamp_min(0) ** 2).mean(dim=1).sum()), rel=1e-6)
    assert cosine == pytest.approx(float((p[:, 0] / p.norm(dim=1)).sum()), rel=1e-6)
    assert kld == pytest.approx(float(-torch.log(p[:, 0]).sum()), rel=1e-5)
    assert msle > 0


@pytest.mark.parametrize(
    ("dataset", "kind"), [("529_pollen", "regression"), ("adult", "binary"), ("wine_quality_white", "multiclass")]
)
def test_a_short_run_of_each_task_kind_learns(dataset, kind):
    run = _runs(dataset=dataset, size=2048, epochs=20, learning_rate=1e-3)[0]
    result = train_run(run)
    assert result.task.kind == kind and result.status == "complete"
    assert result.history["test_loss"][-1] < result.history["test_loss"][0]
