"""Contract-valid synthetic ``runs`` and ``epochs`` tables whose curves look like training curves.

For storage benchmarks and tests at sizes that real training cannot reach here (20,000 runs x 300 epochs).
The curves follow the shapes of real BUTTER runs: test loss falls to a minimum, then rises slowly as the
network overfits; larger networks reach their minimum earlier; train loss keeps falling; accuracy is a
count of correct rows over the split's rows; RMSE is the square root of MSE; every value carries
epoch-to-epoch noise of the size seen in real runs, so the low bits are as incompressible as real ones.
Real curves are compared with these in ``docs/performance.md``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow

from butter_pipeline.ids import experiment_id, run_id, seed_of
from butter_pipeline.schemas import EPOCHS_SCHEMA, METRIC_COLUMNS, RUNS_SCHEMA, SCHEMA_VERSION
from butter_pipeline.tasks import TASK_FACTS as TASKS

SHAPES = (
    "rectangle",
    "trapezoid",
    "exponential",
    "wide_first_2x",
    "wide_first_4x",
    "wide_first_8x",
    "wide_first_16x",
    "rectangle_residual",
)
DEPTHS = (2, 3, 4, 5, 6)
SIZES = tuple(2**k for k in range(5, 21))


def _noisy(rng: np.random.Generator, curve: np.ndarray, scale: float) -> np.ndarray:
    return (curve * np.exp(rng.normal(0.0, scale, curve.shape))).astype(np.float32)


def _curves(rng: np.random.Generator, size: int, epochs: int, task: tuple, test_rows: int, train_rows: int) -> dict:
    e = np.arange(1, epochs + 1, dtype=np.float64)
    classification = task[3] == "classification"
    start = float(rng.uniform(0.5, 2.5)) if classification else float(rng.uniform(0.02, 0.08))
    floor = start * float(rng.uniform(0.1, 0.5)) * (1.0 + 2.0 / np.log2(size))
    best_epoch = max(2.0, 3000.0 / size**0.45 * float(rng.uniform(0.6, 1.6)))
    fall = floor + (start - floor) * np.exp(-((e / best_epoch) ** 0.7) * 2.5)
    test_loss = fall * (1.0 + 0.08 * np.log1p(np.maximum(e - best_epoch, 0.0) / best_epoch))
    train_loss = fall * (1.0 - 0.5 * (1.0 - np.exp(-e / (4 * best_epoch))))
    out: dict[str, np.ndarray] = {}
    for side, loss, rows, noise in (("train", train_loss, train_rows, 0.004), ("test", test_loss, test_rows, 0.012)):
        loss = _noisy(rng, loss, noise)
        accuracy = np.clip(1.0 - loss / (start * 1.6), 0.0, 1.0) if classification else np.full(epochs, 0.02)
        correct = np.clip(np.round(accuracy * rows + rng.normal(0, 2, epochs)), 0, rows)
        mse = loss if not classification else _noisy(rng, loss * 0.09, noise)
        out[f"{side}_loss"] = loss
        out[f"{side}_accuracy"] = (correct / rows).astype(np.float32)
        out[f"{side}_mean_squared_error"] = mse.astype(np.float32)
        out[f"{side}_mean_absolute_error"] = _noisy(rng, np.sqrt(mse.astype(np.float64)) * 0.8, noise)
        out[f"{side}_root_mean_squared_error"] = np.sqrt(mse.astype(np.float64)).astype(np.float32)
        out[f"{side}_mean_squared_logarithmic_error"] = _noisy(rng, mse * 0.45, noise)
        out[f"{side}_hinge"] = _noisy(rng, 0.6 + 0.4 * loss / start, noise)
        out[f"{side}_squared_hinge"] = _noisy(rng, (0.6 + 0.4 * loss / start) ** 2, noise)
        out[f"{side}_cosine_similarity"] = _noisy(rng, 1.0 - 0.5 * loss / start / 1.6, noise / 4)
        out[f"{side}_kullback_leibler_divergence"] = _noisy(rng, loss * (0.98 if classification else 0.3), noise)
    return out


def synthetic_tables(
    runs: int,
    epochs: int,
    *,
    repetitions: int = 4,
    datasets: tuple[str, ...] = tuple(TASKS),
    diverged_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[pyarrow.Table, pyarrow.Table]:
    """(runs, epochs) tables for ``runs`` runs of ``epochs`` epochs, valid under the data contract."""
    rng = np.random.default_rng(seed)
    run_rows: list[dict] = []
    epoch_parts: list[pyarrow.Table] = []
    started = datetime(2026, 1, 1, tzinfo=UTC)
    for index in range((runs + repetitions - 1) // repetitions):
        dataset = datasets[index % len(datasets)]
        task = TASKS[dataset]
        config = {
            "dataset": dataset,
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
            "depth": int(rng.choice(DEPTHS)),
            "size": int(rng.choice(SIZES)),
            "learning_rate": 0.0001,
            "batch_size": 256,
            "epochs": epochs,
            "synthetic": f"{seed}-{index}",
        }
        experiment = experiment_id(config)
        test_rows = int(round(task[0] * 0.2))
        train_rows = task[0] - test_rows
        for repetition in range(min(repetitions, runs - index * repetitions)):
            run = run_id(experiment, repetition)
            curves = _curves(rng, config["size"], epochs, task, test_rows, train_rows)
            diverged = bool(rng.random() < diverged_fraction)
            first_diverged = None
            if diverged:
                first_diverged = int(rng.integers(1, epochs + 1))
                for name in curves:
                    curves[name][first_diverged - 1 :] = np.nan
            run_rows.append(
                _run_row(config, experiment, run, repetition, task, test_rows, train_rows, first_diverged, started)
            )
            columns = {
                "run_id": pyarrow.array([run] * epochs, pyarrow.string()),
                "experiment_id": pyarrow.array([experiment] * epochs, pyarrow.string()),
                "dataset": pyarrow.array([dataset] * epochs, pyarrow.string()),
                "shape": pyarrow.array([config["shape"]] * epochs, pyarrow.string()),
                "depth": pyarrow.array(np.full(epochs, config["depth"], np.int32)),
                "size": pyarrow.array(np.full(epochs, config["size"], np.int64)),
                "epoch": pyarrow.array(np.arange(1, epochs + 1, dtype=np.int32)),
                **{name: pyarrow.array(curves[name]) for name in METRIC_COLUMNS},
            }
            epoch_parts.append(pyarrow.table(columns, schema=EPOCHS_SCHEMA))
    return pyarrow.Table.from_pylist(run_rows, schema=RUNS_SCHEMA), pyarrow.concat_tables(epoch_parts)


def _run_row(
    config: dict,
    experiment: str,
    run: str,
    repetition: int,
    task: tuple,
    test_rows: int,
    train_rows: int,
    first_diverged: int | None,
    started: datetime,
) -> dict:
    return {
        "run_id": run,
        "experiment_id": experiment,
        "repetition": repetition,
        "seed": seed_of(run),
        "sweeps": ["synthetic"],
        "dataset": config["dataset"],
        "task_type": task[3],
        "shape": config["shape"],
        "size": config["size"],
        "depth": config["depth"],
        "learning_rate": config["learning_rate"],
        "batch_size": config["batch_size"],
        "epochs": config["epochs"],
        "optimizer": "adam",
        "momentum": 0.0,
        "label_noise": 0.0,
        "kernel_regularizer": None,
        "kernel_regularizer_strength": None,
        "test_split": 0.2,
        "config_json": json.dumps(config, sort_keys=True),
        "input_width": task[1],
        "output_width": task[2],
        "output_activation": "softmax" if task[2] > 1 and task[3] == "classification" else "sigmoid",
        "loss_function": task[4],
        "widths": [64] * (config["depth"] - 1) + [task[2]],
        "num_parameters": config["size"],
        "relative_size_error": 0.0,
        "train_rows": train_rows,
        "test_rows": test_rows,
        "status": "diverged" if first_diverged else "complete",
        "error": None,
        "first_diverged_epoch": first_diverged,
        "epochs_recorded": config["epochs"],
        "started_at": started,
        "finished_at": started + timedelta(seconds=60),
        "train_seconds": 50.0,
        "eval_seconds": 10.0,
        "device": "cpu",
        "vector_width": 1,
        "host": "synthetic",
        "worker": None,
        "attempts": 1,
        "butter_version": "synthetic",
        "torch_version": "none",
        "python_version": "3",
        "schema_version": SCHEMA_VERSION,
    }
