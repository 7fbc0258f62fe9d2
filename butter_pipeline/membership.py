"""Which of BUTTER's eight published sweeps an experiment belongs to.

BUTTER computed sweep membership with SQL predicates over each experiment's parameters (reference
butter.md §5.2, ``extract_queries.sql`` at dec9137), not from the batch it was enqueued in; an experiment
can belong to several sweeps (a core primary point is in all of them). butter applies the same predicates
to the experiment config. Where BUTTER's predicate also tested the batch label, butter tests the
parameters alone; for the 300- and 30k-epoch sweeps, whose predicates named only the epoch count, butter
also requires the core values every run of those batches had (docs/fidelity.md).
"""

from __future__ import annotations

from collections.abc import Callable

from butter_pipeline.sweep import Experiment

CORE_DATASETS = frozenset({"529_pollen", "connect_4", "537_houses", "mnist", "201_pol", "sleep", "wine_quality_white"})
SECONDARY_DATASETS = frozenset({"nursery", "adult"})
CORE_SHAPES = frozenset({"rectangle", "trapezoid", "exponential", "wide_first_2x"})
SECONDARY_SHAPES = frozenset({"rectangle_residual", "wide_first_4x", "wide_first_8x", "wide_first_16x"})
CORE_DEPTHS = frozenset(range(2, 11))
SECONDARY_DEPTHS = frozenset({2, 3, 4, 5, 7, 8, 9, 10, 12, 14, 16, 18, 20})  # no 6, as in the SQL
REDUCED_CORE_DEPTHS = frozenset(range(2, 7))
CORE_SIZES = frozenset(2**k for k in range(5, 25))
LEARNING_RATES = (0.01, 0.001, 0.0001, 0.00001)
BATCH_SIZES = (32, 64, 128, 256, 512, 1024)
PENALTIES = (0.32, 0.16, 0.08, 0.04, 0.02, 0.01, 0.005, 0.0025, 0.00125, 0.000625, 0.0003125, 0.00015625, 7.8125e-05)


def _plain(e: Experiment) -> bool:
    """No penalty, no label noise, BUTTER's 80/20 split."""
    return e.kernel_regularizer is None and e.label_noise == 0.0 and e.test_split == 0.2


def _adam(e: Experiment, learning_rate: float = 0.0001, batch_size: int = 256) -> bool:
    return e.optimizer == "adam" and e.learning_rate == learning_rate and e.batch_size == batch_size


def _primary(e: Experiment) -> bool:
    return (
        e.shape in CORE_SHAPES | SECONDARY_SHAPES
        and e.depth in SECONDARY_DEPTHS
        and e.epochs == 3000
        and _plain(e)
        and _adam(e)
    )


def _epochs_300(e: Experiment) -> bool:
    return e.epochs == 300 and _plain(e) and _adam(e)


def _epochs_30k(e: Experiment) -> bool:
    return e.epochs == 30000 and _plain(e) and _adam(e)


def _core_grid(e: Experiment) -> bool:
    return (
        e.shape in CORE_SHAPES
        and e.dataset in CORE_DATASETS
        and e.depth in SECONDARY_DEPTHS
        and e.size in CORE_SIZES
        and e.epochs == 3000
    )


def _learning_rate(e: Experiment) -> bool:
    return (
        _core_grid(e)
        and _plain(e)
        and e.optimizer == "adam"
        and e.batch_size == 256
        and (e.learning_rate in LEARNING_RATES)
    )


def _label_noise(e: Experiment) -> bool:
    return (
        _core_grid(e)
        and e.kernel_regularizer is None
        and e.test_split == 0.2
        and e.optimizer == "adam"
        and e.batch_size == 256
        and e.learning_rate in (0.0001, 0.001)
    )


def _rectangle_core(e: Experiment) -> bool:
    return (
        e.shape == "rectangle"
        and e.dataset in CORE_DATASETS | SECONDARY_DATASETS
        and e.depth in CORE_DEPTHS
        and e.epochs == 3000
    )


def _batch_size(e: Experiment) -> bool:
    return (
        _rectangle_core(e)
        and e.size in CORE_SIZES
        and _plain(e)
        and e.optimizer == "adam"
        and e.learning_rate == 0.0001
        and e.batch_size in BATCH_SIZES
    )


def _regularization(e: Experiment) -> bool:
    return (
        _rectangle_core(e)
        and e.label_noise == 0.0
        and e.test_split == 0.2
        and _adam(e)
        and (e.kernel_regularizer is None or e.kernel_regularizer.strength in PENALTIES)
    )


def _optimizer(e: Experiment) -> bool:
    return (
        e.shape == "rectangle"
        and e.epochs == 3000
        and _plain(e)
        and e.depth in REDUCED_CORE_DEPTHS
        and e.size in CORE_SIZES
    )


PREDICATES: dict[str, Callable[[Experiment], bool]] = {
    "primary": _primary,
    "300_epoch": _epochs_300,
    "30k_epoch": _epochs_30k,
    "learning_rate": _learning_rate,
    "label_noise": _label_noise,
    "batch_size": _batch_size,
    "regularization": _regularization,
    "optimizer": _optimizer,
}


def butter_sweeps_of(experiment: Experiment) -> list[str]:
    """Names of BUTTER's sweeps whose predicate the experiment satisfies, in BUTTER's order."""
    return [name for name, predicate in PREDICATES.items() if predicate(experiment)]
