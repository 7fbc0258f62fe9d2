"""BUTTER's views of a dataset: the numbers behind each figure, and their rendering.

Three views, all read from ``summaries`` (statistics over each experiment's repetitions):

- ``heatmap_data``: median test loss over parameter count x epoch for one dataset, shape and depth,
  normalized as BUTTER's Figure 1 did (see ``normalize_like_butter``);
- ``curves_data``: median test loss per epoch with its quartile band, one curve per size;
- ``best_data``: per shape and size, the epoch of the lowest median test loss and that loss, with the
  per-run best points the contract also carries (``test_loss_min_epoch_median``, ...).

Each returns a ``FigureData`` whose ``frame`` holds exactly the plotted numbers (written beside the figure
as CSV). ``draw`` and ``save`` render them with matplotlib's Agg backend; matplotlib is imported there only,
so that ``butter_pipeline.read`` and the data functions stay light.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from butter_pipeline.errors import FigureError
from butter_pipeline.read import ButterDataset
from butter_pipeline.tasks import TASK_FACTS

FORMATS = ("png", "svg")
NEAR_END = 0.9  # a best epoch past this fraction of the epochs trained is flagged: the minimum may lie later
# Experiment settings other than shape, depth and size: a figure shows one combination of them.
SETTINGS = (
    "learning_rate",
    "batch_size",
    "optimizer",
    "momentum",
    "label_noise",
    "kernel_regularizer",
    "kernel_regularizer_strength",
    "test_split",
)
_KEYS = ["experiment_id", "dataset", "shape", "depth", "size", "num_parameters", "num_runs", "epochs", *SETTINGS]
_LOSS_NAMES = {
    "categorical_crossentropy": "categorical cross-entropy",
    "binary_crossentropy": "binary cross-entropy",
    "mean_squared_error": "mean squared error",
}


@dataclass(frozen=True)
class FigureData:
    """The numbers of one figure (``frame``, one row per plotted point) and what they show."""

    kind: str  # "heatmap", "curves" or "best"
    dataset: str
    shapes: tuple[str, ...]
    depth: int
    frame: pd.DataFrame
    note: str  # the experiment settings shown, and what was left out

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.dataset}-{'+'.join(self.shapes)}-d{self.depth}"

    @property
    def loss_name(self) -> str:
        facts = TASK_FACTS.get(self.dataset)
        return _LOSS_NAMES.get(facts[4], facts[4]) if facts else "loss"


# ---------------------------------------------------------------------------------------------- reading


def _read(
    data: ButterDataset, dataset: str, shapes: Sequence[str] | None, depth: int, columns: list[str]
) -> pd.DataFrame:
    """Summary rows of one dataset and depth (and shapes), or a ``FigureError`` naming what is missing."""
    uri = data.store.uri
    if data.versions.get("summaries") is None:
        raise FigureError(
            f"store {uri} has no summaries at this version: publish runs, then run `butter summarize --store {uri}`"
        )
    where: dict[str, Any] = {"dataset": dataset, "depth": depth}
    if shapes is not None:
        where["shape"] = list(shapes)
    frame = data.summaries(columns=list(dict.fromkeys(_KEYS + columns)), where=where, to="pandas")
    if frame.empty:
        _explain_missing(data, dataset, shapes, depth)
    if shapes is not None:
        missing = sorted(set(shapes) - set(frame["shape"]))
        if missing:
            _explain_missing(data, dataset, missing, depth)
    return frame


def _explain_missing(data: ButterDataset, dataset: str, shapes: Sequence[str] | None, depth: int) -> None:
    uri = data.store.uri
    present = data.summaries(columns=["shape", "depth"], where={"dataset": dataset}, to="pandas").drop_duplicates()
    if present.empty:
        datasets = sorted(set(data.summaries(columns=["dataset"])["dataset"].to_pylist()))
        raise FigureError(
            f"dataset {dataset!r} has no summaries in {uri}; datasets there: {', '.join(datasets) or 'none'}"
        )
    depths = sorted(int(d) for d in present["depth"].unique())
    if depth not in depths:
        raise FigureError(f"dataset {dataset!r} has no depth {depth} in {uri}; depths there: {_join(depths)}")
    at_depth = sorted(present.loc[present["depth"] == depth, "shape"].unique())
    wanted = ", ".join(repr(s) for s in shapes or ())
    raise FigureError(
        f"dataset {dataset!r}, depth {depth} has no shape {wanted} in {uri}; shapes there: {_join(at_depth)}"
    )


def _join(values: Iterable[Any]) -> str:
    return ", ".join(str(v) for v in values) or "none"


def _settings_label(row: pd.Series) -> str:
    parts = [f"learning rate {row['learning_rate']:g}", f"batch size {int(row['batch_size'])}", str(row["optimizer"])]
    if row["momentum"]:
        parts[-1] += f" (momentum {row['momentum']:g})"
    if row["label_noise"]:
        parts.append(f"label noise {row['label_noise']:g}")
    if isinstance(row["kernel_regularizer"], str):
        parts.append(f"{row['kernel_regularizer']} {row['kernel_regularizer_strength']:g}")
    if row["test_split"] != 0.2:
        parts.append(f"test split {row['test_split']:g}")
    return ", ".join(parts)


def _select(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """One experiment per (shape, size): the settings with the most grid points, then the longest run.

    A store may hold several sweeps over the same sizes (learning rates, label noise, ...); mixing them
    would draw points of different experiments as one curve. The 30k-epoch and primary sweeps differ only
    in ``epochs``, which is a figure's axis, not a setting, so the longer experiment is kept.
    """
    experiments = frame.drop_duplicates("experiment_id").copy()
    experiments["settings"] = experiments.apply(_settings_label, axis=1)
    points = experiments.groupby("settings")[["shape", "size"]].apply(lambda g: len(g.drop_duplicates()))
    chosen = sorted(points.index, key=lambda label: (-points[label], label))[0]
    kept = experiments[experiments["settings"] == chosen].sort_values(
        ["shape", "size", "epochs", "num_runs", "experiment_id"], ascending=[True, True, False, False, True]
    )
    kept = kept.drop_duplicates(["shape", "size"])
    note = chosen
    others = len(points) - 1
    if others:
        note += f"; {others} other setting{'s' if others > 1 else ''} in the store not shown"
    duplicates = int((experiments["settings"] == chosen).sum()) - len(kept)
    if duplicates:
        note += f"; {duplicates} shorter or duplicate experiment{'s' if duplicates > 1 else ''} not shown"
    rows = frame[frame["experiment_id"].isin(kept["experiment_id"])].copy()
    missing = rows["num_parameters"].isna()
    rows.loc[missing, "num_parameters"] = rows.loc[missing, "size"]  # failed builds have no count; use the target
    rows["num_parameters"] = rows["num_parameters"].astype("int64")
    return rows.sort_values(["shape", "size", "epoch"]).reset_index(drop=True), note


def _best_epochs(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (shape, size): the epoch of the lowest finite median test loss (earliest on ties) and that loss."""
    finite = rows[np.isfinite(rows["test_loss_median"].astype("float64"))]
    order = finite.sort_values(["shape", "size", "test_loss_median", "epoch"])
    best = order.drop_duplicates(["shape", "size"])[["shape", "size", "epoch", "test_loss_median"]]
    last = rows.groupby(["shape", "size"], as_index=False)["epoch"].max().rename(columns={"epoch": "last_epoch"})
    best = best.rename(columns={"epoch": "best_epoch", "test_loss_median": "best_loss"})
    return last.merge(best, on=["shape", "size"], how="left")


# ---------------------------------------------------------------------------------------------- the views


def normalize_like_butter(median: pd.Series) -> pd.DataFrame:
    """BUTTER's Figure 1 colour scale (PLOTS ``paper_viz_figure_1``), over the cells given.

    The ratio of each median to the lowest one is capped at 2 and mapped by -log10(ratio - 0.9), then
    rescaled to [0, 1]: 1 is the lowest loss, 0 the highest (any cell at twice the lowest or more).
    BUTTER took the lowest per dataset over all shapes of its figure; here it is over the plotted grid.
    """
    values = median.astype("float64")
    lowest = values[np.isfinite(values)].min() if np.isfinite(values).any() else math.nan
    ratio = values / lowest
    z = -np.log10(np.minimum(2.0, ratio) - 0.9)
    span = z.max() - z.min()
    normalized = (z - z.min()) / span if span > 0 else z * 0.0 + 1.0
    return pd.DataFrame({"ratio_to_min": ratio, "normalized": normalized})


def heatmap_data(data: ButterDataset, dataset: str, *, shape: str = "rectangle", depth: int = 3) -> FigureData:
    """Median test loss for each (size, epoch) of one dataset, shape and depth, with BUTTER's normalization."""
    rows, note = _select(_read(data, dataset, [shape], depth, ["epoch", "test_loss_median"]))
    frame = rows[["dataset", "shape", "depth", "size", "num_parameters", "experiment_id", "num_runs", "epoch"]].copy()
    frame["test_loss_median"] = rows["test_loss_median"].astype("float64")
    frame = pd.concat([frame, normalize_like_butter(frame["test_loss_median"])], axis=1)
    best = _best_epochs(rows)[["size", "best_epoch"]]
    frame = frame.merge(best, on="size", how="left")
    frame["is_best_epoch"] = frame["epoch"] == frame["best_epoch"]
    return FigureData("heatmap", dataset, (shape,), depth, frame.drop(columns="best_epoch"), note)


def curves_data(data: ButterDataset, dataset: str, *, shape: str = "rectangle", depth: int = 3) -> FigureData:
    """Median test loss per epoch and its first and third quartiles over repetitions, for each size."""
    columns = ["epoch", "test_loss_q1", "test_loss_median", "test_loss_q3"]
    rows, note = _select(_read(data, dataset, [shape], depth, columns))
    keys = ["dataset", "shape", "depth", "size", "num_parameters", "experiment_id", "num_runs", "epoch"]
    frame = rows[keys].copy()
    for name in columns[1:]:
        frame[name] = rows[name].astype("float64")
    return FigureData("curves", dataset, (shape,), depth, frame, note)


def best_data(data: ButterDataset, dataset: str, *, shapes: Sequence[str] | None = None, depth: int = 3) -> FigureData:
    """Per shape and size: epoch of the lowest median test loss and that loss (``shapes=None``: every shape)."""
    per_run = ["test_loss_min_epoch_median", "test_loss_min_value_median"]
    rows, note = _select(_read(data, dataset, shapes, depth, ["epoch", "test_loss_median", *per_run]))
    experiments = rows.drop_duplicates(["shape", "size"])[
        ["dataset", "shape", "depth", "size", "num_parameters", "experiment_id", "num_runs", "epochs", *per_run]
    ]
    frame = experiments.merge(_best_epochs(rows), on=["shape", "size"], how="left")
    # A minimum this late may not be one: the curve can still be falling when training stops.
    frame["best_near_end"] = frame["best_epoch"] > NEAR_END * frame["last_epoch"]
    frame = frame.rename(columns={"test_loss_min_epoch_median": "run_best_epoch_median"})
    frame = frame.rename(columns={"test_loss_min_value_median": "run_best_loss_median"})
    for name in ("run_best_epoch_median", "run_best_loss_median", "best_loss"):
        frame[name] = frame[name].astype("float64")
    order = ["dataset", "shape", "depth", "size", "num_parameters", "experiment_id", "num_runs", "epochs"]
    order += ["last_epoch", "best_epoch", "best_loss", "best_near_end", "run_best_epoch_median"]
    order += ["run_best_loss_median"]
    frame = frame[order].sort_values(["shape", "size"]).reset_index(drop=True)
    return FigureData("best", dataset, tuple(sorted(frame["shape"].unique())), depth, frame, note)


def figure_data(
    kind: str, data: ButterDataset, dataset: str, *, shapes: Sequence[str] | None, depth: int
) -> FigureData:
    """One of the three views by name (``shapes``: one shape for heatmap and curves, any for best)."""
    if kind == "best":
        return best_data(data, dataset, shapes=shapes, depth=depth)
    shape = shapes[0] if shapes else "rectangle"
    if kind == "heatmap":
        return heatmap_data(data, dataset, shape=shape, depth=depth)
    if kind == "curves":
        return curves_data(data, dataset, shape=shape, depth=depth)
    raise FigureError(f"figure {kind!r}: choose heatmap, curves or best")


# ---------------------------------------------------------------------------------------------- rendering


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges on a log axis: geometric midpoints between centres, half a step beyond the ends."""
    logs = np.log10(centres.astype("float64"))
    if len(logs) == 1:
        return 10 ** np.array([logs[0] - 0.15, logs[0] + 0.15])
    middle = (logs[1:] + logs[:-1]) / 2
    return 10 ** np.concatenate([[2 * logs[0] - middle[0]], middle, [2 * logs[-1] - middle[-1]]])


def _size_label(size: int, params: int) -> str:
    exponent = math.log2(size)
    target = f"2^{int(exponent)}" if exponent.is_integer() else f"{size:,}"
    return f"{target} ({params:,} params)"


def _plain_log(axis: Any) -> None:
    """Log-axis ticks as plain numbers (0.4, 30, not 4 x 10^-1), at 1-2-5 steps when the axis is short."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = axis.get_view_interval()
    span = high / low if low > 0 else math.inf
    if span < 1000:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:.2g}") if span < 4 else NullFormatter())


def _title(ax: Any, figure: FigureData, what: str) -> None:
    shapes = ", ".join(figure.shapes)
    ax.set_title(f"{figure.dataset}: {what}\n{shapes}, depth {figure.depth}; {figure.note}", fontsize=9, loc="left")


def _draw_heatmap(figure: FigureData) -> Any:
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    frame = figure.frame
    grid = frame.pivot(index="size", columns="epoch", values="normalized").sort_index()
    params = frame.drop_duplicates("size").set_index("size")["num_parameters"].reindex(grid.index).to_numpy()
    epochs = grid.columns.to_numpy()
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    order = np.argsort(params, kind="stable")  # rows by actual parameter count, as BUTTER's axis
    mesh = ax.pcolormesh(
        np.concatenate([[0.5], epochs + 0.5]),
        _edges(params[order]),
        np.ma.masked_invalid(grid.to_numpy()[order]),
        cmap="viridis",
        norm=Normalize(0.0, 1.0),
        rasterized=True,  # one image in the SVG instead of a path per cell
    )
    best = frame[frame["is_best_epoch"]]
    ax.plot(best["epoch"], best["num_parameters"], "o", ms=4, mfc="white", mec="black")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (log scale)")
    _plain_log(ax.xaxis)
    ax.set_ylabel("trainable parameters (num_parameters, log scale)")
    bar = fig.colorbar(mesh, ax=ax)
    bar.set_label(
        f"normalized median test loss ({figure.loss_name})\n"
        "1 = lowest on this grid, 0 = highest or ≥ 2× lowest (BUTTER Fig. 1 scale)",
        fontsize=8,
    )
    _title(ax, figure, "normalized median test loss (dots: epoch of the lowest median, per size)")
    return fig


def _size_colours(params: np.ndarray) -> list[Any]:
    from matplotlib import colormaps

    logs = np.log10(params.astype("float64"))
    span = logs.max() - logs.min()
    positions = (logs - logs.min()) / span if span > 0 else np.zeros_like(logs)
    return [colormaps["viridis"](0.05 + 0.85 * p) for p in positions]


def _draw_curves(figure: FigureData) -> Any:
    from matplotlib.figure import Figure

    frame = figure.frame
    sizes = frame.drop_duplicates("size").sort_values("size")
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for (_, size), colour in zip(sizes.iterrows(), _size_colours(sizes["num_parameters"].to_numpy()), strict=True):
        curve = frame[frame["size"] == size["size"]]
        label = f"{_size_label(int(size['size']), int(size['num_parameters']))}, {int(size['num_runs'])} runs"
        ax.fill_between(curve["epoch"], curve["test_loss_q1"], curve["test_loss_q3"], color=colour, alpha=0.2, lw=0)
        ax.plot(curve["epoch"], curve["test_loss_median"], color=colour, lw=1.4, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (log scale)")
    _plain_log(ax.xaxis)
    ax.set_ylabel(f"test loss ({figure.loss_name}, log scale)")
    _plain_log(ax.yaxis)
    ax.legend(title="size: median, band = quartiles 1-3", fontsize=7, title_fontsize=8, loc="best")
    _title(ax, figure, "test loss over repetitions")
    return fig


def _draw_best(figure: FigureData) -> Any:
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    frame = figure.frame
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True)
    colours = colormaps["tab10"]
    for index, (shape, line) in enumerate(frame.groupby("shape", sort=True)):
        colour = colours(index % 10)
        x = line["num_parameters"]
        left.plot(x, line["best_epoch"], "-o", color=colour, ms=4, label=shape)
        left.plot(x, line["run_best_epoch_median"], "--", color=colour, lw=0.8, alpha=0.7)
        right.plot(x, line["best_loss"], "-o", color=colour, ms=4, label=shape)
        right.plot(x, line["run_best_loss_median"], "--", color=colour, lw=0.8, alpha=0.7)
        censored = line[line["best_near_end"]]
        left.plot(censored["num_parameters"], censored["best_epoch"], "^", ms=9, mfc="none", mec=colour)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (num_parameters, log scale)")
        ax.grid(True, which="major", alpha=0.3)
    left.set_yscale("log")
    _plain_log(left.yaxis)
    left.set_ylabel("epoch of lowest median test loss (log scale)")
    right.set_ylabel(f"lowest median test loss ({figure.loss_name})")
    handles, _ = left.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="grey", ls="--", lw=0.8, label="median over runs of each run's best"),
        Line2D(
            [],
            [],
            color="grey",
            ls="none",
            marker="^",
            mfc="none",
            label="in the last 10 % of epochs: may still be falling",
        ),
    ]
    left.legend(handles=handles, fontsize=7, loc="best")
    shapes = ", ".join(figure.shapes)
    fig.suptitle(
        f"{figure.dataset}: best epoch and best test loss by size\n{shapes}, depth {figure.depth}; {figure.note}",
        x=0.01,
        ha="left",
        fontsize=9,
    )
    return fig


def draw(figure: FigureData) -> Any:
    """The figure as a ``matplotlib.figure.Figure`` on an Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    drawers = {"heatmap": _draw_heatmap, "curves": _draw_curves, "best": _draw_best}
    fig = drawers[figure.kind](figure)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(figure: FigureData, *, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    draw(figure).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save(figure: FigureData, stem: Path, formats: Sequence[str] = FORMATS, *, dpi: int = 150) -> list[Path]:
    """Write ``stem.csv`` (the plotted numbers) and ``stem.<format>`` for each format; returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_name(f"{stem.name}.csv")]
    figure.frame.to_csv(written[0], index=False, float_format="%.9g")  # float32 values round-trip exactly
    fig = draw(figure)
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
        written.append(path)
    return written
