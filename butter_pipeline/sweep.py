"""Sweep specs: a TOML file (or a shipped preset) -> a typed, checked model -> experiments -> runs.

A spec names a sweep and a grid of BUTTER's hyperparameters. Each grid axis takes one value or a list;
expansion is the Cartesian product of the axes, times ``repetitions`` runs per experiment. Axes the file
leaves out take BUTTER's core values (the defaults below); dataset and size are required.

Example::

    name = "mine"
    repetitions = 3
    [grid]
    dataset = ["529_pollen", "connect_4"]
    size = [1024, 4096]
    depth = 3
    epochs = 100
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from butter_pipeline.errors import SpecError
from butter_pipeline.ids import experiment_id, run_id, seed_of
from butter_pipeline.nets import SHAPES
from butter_pipeline.tasks import DATASETS

OPTIMIZERS = ("adam", "sgd", "rmsprop")


class KernelRegularizer(BaseModel):
    """An L1 or L2 penalty on every layer's kernel (weights, not biases), as Keras applied it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    type: Literal["l1", "l2"]
    strength: float = Field(gt=0, allow_inf_nan=False)


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _regularizer_or_none(value: Any) -> Any:
    # "none" in TOML (which has no null) means no penalty, as in BUTTER's core sweeps.
    return None if isinstance(value, str) and value.lower() == "none" else value


def _axis(item_type: Any) -> Any:
    return Annotated[list[item_type], BeforeValidator(_as_list), Field(min_length=1)]


PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Regularizer = Annotated[KernelRegularizer | None, BeforeValidator(_regularizer_or_none)]


class Grid(BaseModel):
    """The hyperparameter axes. Defaults are BUTTER's core values (reference §5.1).

    Strict types: ``epochs = true`` or ``learning_rate = "0.001"`` are errors, not silently converted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    dataset: _axis(str)
    size: _axis(Annotated[int, Field(ge=1, le=2**40)])
    shape: _axis(str) = ["rectangle"]
    depth: _axis(Annotated[int, Field(ge=2, le=64)]) = [3]
    learning_rate: _axis(PositiveFloat) = [0.0001]
    batch_size: _axis(Annotated[int, Field(ge=1, le=2**20)]) = [256]
    epochs: _axis(Annotated[int, Field(ge=1, le=1_000_000)]) = [3000]
    optimizer: _axis(Literal["adam", "sgd", "rmsprop"]) = ["adam"]
    momentum: _axis(Annotated[float, Field(ge=0, lt=1)]) = [0.0]
    label_noise: _axis(Annotated[float, Field(ge=0, lt=1)]) = [0.0]
    kernel_regularizer: _axis(Regularizer) = [None]
    test_split: _axis(Annotated[float, Field(gt=0, lt=1)]) = [0.2]

    @field_validator("dataset")
    @classmethod
    def _known_datasets(cls, values: list[str]) -> list[str]:
        for value in values:
            if value not in DATASETS:
                raise ValueError(f"unknown dataset {value!r}; allowed: {', '.join(sorted(DATASETS))}")
        return values

    @model_validator(mode="after")
    def _adam_has_a_momentum_free_point(self) -> Grid:
        # Adam takes no momentum: a grid whose momenta are all non-zero would silently drop its Adam points
        if "adam" in self.optimizer and 0.0 not in self.momentum:
            raise ValueError("optimizer 'adam' takes no momentum: add 0 to momentum, or drop adam from optimizer")
        return self

    @field_validator("shape")
    @classmethod
    def _known_shapes(cls, values: list[str]) -> list[str]:
        for value in values:
            if value not in SHAPES:
                raise ValueError(f"unknown shape {value!r}; allowed: {', '.join(SHAPES)}")
        return values


class SweepSpec(BaseModel):
    """A whole sweep: a name, one grid (``[grid]``) or a union of grids (``[[grid]]``), and repetitions."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str = ""
    repetitions: Annotated[int, Field(ge=1, le=10_000)] = 30
    grid: Annotated[list[Grid], Field(min_length=1)]


@dataclass(frozen=True)
class Experiment:
    """One grid point: everything that defines what is trained, nothing about a particular run."""

    dataset: str
    shape: str
    size: int
    depth: int
    learning_rate: float
    batch_size: int
    epochs: int
    optimizer: str
    momentum: float
    label_noise: float
    kernel_regularizer: KernelRegularizer | None
    test_split: float

    def config(self) -> dict[str, Any]:
        """The canonical config that ``experiment_id`` hashes. Keys and types are frozen forever."""
        regularizer = self.kernel_regularizer
        return {
            "batch_size": int(self.batch_size),
            "dataset": self.dataset,
            "depth": int(self.depth),
            "epochs": int(self.epochs),
            "kernel_regularizer": None
            if regularizer is None
            else {"strength": float(regularizer.strength), "type": regularizer.type},
            "label_noise": float(self.label_noise),
            "learning_rate": float(self.learning_rate),
            "momentum": float(self.momentum),
            "optimizer": self.optimizer,
            "shape": self.shape,
            "size": int(self.size),
            "test_split": float(self.test_split),
        }

    @cached_property
    def experiment_id(self) -> str:
        return experiment_id(self.config())


@dataclass(frozen=True)
class Run:
    """One training run: an experiment, a repetition index, and the ids and seed derived from them."""

    experiment: Experiment
    experiment_id: str
    repetition: int
    run_id: str
    seed: int
    sweep: str


_AXES = tuple(Grid.model_fields)  # expansion order; ids never depend on it


def expand(spec: SweepSpec) -> Iterator[Experiment]:
    """Yield the experiments of the sweep's grids (each the Cartesian product of its axes), each once."""
    seen: set[str] = set()
    for grid in spec.grid:
        for values in itertools.product(*(getattr(grid, name) for name in _AXES)):
            experiment = Experiment(**dict(zip(_AXES, values, strict=True)))
            if experiment.optimizer == "adam" and experiment.momentum != 0.0:
                continue  # Adam has no momentum parameter: such points would duplicate the momentum-0 one
            key = experiment.experiment_id
            if key not in seen:
                seen.add(key)
                yield experiment


def plan_runs(spec: SweepSpec) -> Iterator[Run]:
    """Yield every run of the sweep: each experiment times ``spec.repetitions``."""
    for experiment in expand(spec):
        exp_id = experiment.experiment_id
        for repetition in range(spec.repetitions):
            rid = run_id(exp_id, repetition)
            yield Run(experiment, exp_id, repetition, rid, seed_of(rid), spec.name)


def preset_names() -> list[str]:
    """Names of the sweeps shipped inside the package."""
    folder = resources.files("butter_pipeline.presets")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _format_location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in {"list[...]", "function-before[...]"} or "[" in str(item):
            continue  # pydantic's internal validator names, not the user's keys
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def parse_spec(data: dict[str, Any], *, source: str) -> SweepSpec:
    """Check a decoded TOML document against the model; errors name ``source``, the key and the rule."""
    single_grid = isinstance(data.get("grid"), dict)
    if single_grid:
        data = {**data, "grid": [data["grid"]]}
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = error["loc"]
            if single_grid and loc[:2] == ("grid", 0):
                loc = ("grid", *loc[2:])  # a [grid] table: no index to show
            where = _format_location(loc)
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                if "kernel_regularizer" in loc:
                    model = KernelRegularizer
                else:
                    model = Grid if loc[0] == "grid" and len(loc) > 1 else SweepSpec
                message = f"unknown key; allowed: {', '.join(model.model_fields)}"
            elif (loc == ("grid",) and error["type"] == "list_type") or error["type"] == "model_type":
                if loc == ("grid",):
                    message = "must be a [grid] table or [[grid]] tables"
                elif "kernel_regularizer" in loc:
                    message = 'must be "none" or a table like { type = "l2", strength = 0.01 }'
                else:
                    message = "must be a table"
                message += f" (got {error.get('input')!r})"
            elif error["type"] not in {"value_error", "missing"}:
                message += f" (got {error.get('input')!r})"
            problems.append(f"{where}: {message}")
        raise SpecError(f"{source}: " + "; ".join(problems)) from None


def load_spec(name_or_path: str) -> SweepSpec:
    """Load a preset by name, or a sweep TOML file by path."""
    path = Path(name_or_path)
    if name_or_path in preset_names():
        text = (resources.files("butter_pipeline.presets") / f"{name_or_path}.toml").read_text()
        source = f"preset {name_or_path!r}"
    elif path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpecError(f"{path}: no such sweep file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"{path}: cannot read sweep file ({exc})") from None
        source = str(path)
    else:
        raise SpecError(f"{name_or_path!r} is neither a preset ({', '.join(preset_names())}) nor a .toml sweep file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML ({exc})") from None
    return parse_spec(data, source=source)
