"""``butter plot heatmap|curves|best`` and ``butter report``: figures and a dataset card from any store.

Registered in ``cli.py``; kept apart so that the figure code (matplotlib) loads only for these commands.
Bad input prints one line ``error: ...`` and exits with status 2, as every butter command does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from butter_pipeline.cli_common import StoreOpt, err, out
from butter_pipeline.cli_common import fail as _fail
from butter_pipeline.errors import ButterError, FigureError
from butter_pipeline.store import DEFAULT_STORE

if TYPE_CHECKING:
    from butter_pipeline.figures import FigureData
    from butter_pipeline.read import ButterDataset

plot_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Draw BUTTER's views of a store: heat map, loss curves, best epoch and loss by size.",
)

ReleaseOpt = Annotated[str | None, typer.Option(help="Read this release instead of the latest tables.")]
VersionOpt = Annotated[int | None, typer.Option(help="Read the tables as of this runs table version.")]
DatasetOpt = Annotated[
    list[str] | None, typer.Option("--dataset", help="Task to plot; repeat for several (default: every task).")
]
DepthOpt = Annotated[int, typer.Option(help="Network depth (Dense layers, output included).")]
OutOpt = Annotated[
    str,
    typer.Option(
        "--out", help="A folder (existing, or ending in '/') or a file stem; .csv and the images are written there."
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", help="png, svg or both.")]


def _formats(choice: str) -> tuple[str, ...]:
    formats = {"png": ("png",), "svg": ("svg",), "both": ("png", "svg")}
    if choice not in formats:
        raise FigureError(f"--format {choice!r}: choose png, svg or both")
    return formats[choice]


def _stems(out_arg: str, names: list[str], datasets: list[str]) -> list[Path]:
    """Where each figure goes: ``<folder>/<name>`` for a folder, else the stem (``-<dataset>`` if several)."""
    target = Path(out_arg)
    if out_arg.endswith(("/", "\\")) or target.is_dir():
        return [target / name for name in names]
    if target.suffix.lower() in (".png", ".svg", ".csv"):
        target = target.with_suffix("")
    if len(names) == 1:
        return [target]
    return [target.with_name(f"{target.name}-{dataset}") for dataset in datasets]


def _all_datasets(data: ButterDataset) -> list[str]:
    if data.versions.get("summaries") is None:
        uri = data.store.uri
        raise FigureError(f"store {uri} has no summaries: publish runs, then run `butter summarize --store {uri}`")
    found = sorted(set(data.summaries(columns=["dataset"])["dataset"].to_pylist()))
    if not found:
        raise FigureError(f"store {data.store.uri} has no summaries to plot")
    return found


def _build(
    kind: str, data: ButterDataset, chosen: list[str] | None, shapes: list[str] | None, depth: int
) -> list[FigureData]:
    """The figures of the datasets asked for; without ``--dataset``, every one that has the slice."""
    from butter_pipeline import figures

    if chosen:
        return [figures.figure_data(kind, data, name, shapes=shapes, depth=depth) for name in dict.fromkeys(chosen)]
    built, skipped = [], []
    for name in _all_datasets(data):
        try:
            built.append(figures.figure_data(kind, data, name, shapes=shapes, depth=depth))
        except FigureError as exc:
            skipped.append(exc)
    if not built:
        raise skipped[0]
    for exc in skipped:
        err.print(f"skipped: {escape(str(exc))}", highlight=False, soft_wrap=True)
    return built


def _plot(
    kind: str,
    store: str,
    release: str | None,
    version: int | None,
    datasets: list[str] | None,
    shapes: list[str] | None,
    depth: int,
    out_arg: str,
    fmt: str,
) -> None:
    from butter_pipeline import figures
    from butter_pipeline.read import open_dataset

    try:
        formats = _formats(fmt)
        data = open_dataset(store, release=release, version=version)
        built = _build(kind, data, datasets, shapes, depth)
        stems = _stems(out_arg, [f.name for f in built], [f.dataset for f in built])
        for figure, stem in zip(built, stems, strict=True):
            try:
                paths = figures.save(figure, stem, formats)
            except OSError as exc:
                raise FigureError(f"--out {out_arg}: cannot write {stem}: {exc.strerror or exc}") from None
            out.print(f"{figure.name}: " + ", ".join(str(p) for p in paths), highlight=False)
    except ButterError as exc:
        _fail(exc)


@plot_app.command()
def heatmap(
    store: StoreOpt = DEFAULT_STORE,
    release: ReleaseOpt = None,
    version: VersionOpt = None,
    dataset: DatasetOpt = None,
    shape: Annotated[str, typer.Option(help="Network shape.")] = "rectangle",
    depth: DepthOpt = 3,
    out_arg: OutOpt = "figures/",
    fmt: FormatOpt = "both",
) -> None:
    """Normalized median test loss over parameter count x epoch (log-log), BUTTER's Figure 1 view."""
    _plot("heatmap", store, release, version, dataset, [shape], depth, out_arg, fmt)


@plot_app.command()
def curves(
    store: StoreOpt = DEFAULT_STORE,
    release: ReleaseOpt = None,
    version: VersionOpt = None,
    dataset: DatasetOpt = None,
    shape: Annotated[str, typer.Option(help="Network shape.")] = "rectangle",
    depth: DepthOpt = 3,
    out_arg: OutOpt = "figures/",
    fmt: FormatOpt = "both",
) -> None:
    """Median test loss per epoch with the band between the quartiles, one colour per size."""
    _plot("curves", store, release, version, dataset, [shape], depth, out_arg, fmt)


@plot_app.command()
def best(
    store: StoreOpt = DEFAULT_STORE,
    release: ReleaseOpt = None,
    version: VersionOpt = None,
    dataset: DatasetOpt = None,
    shape: Annotated[
        list[str] | None, typer.Option("--shape", help="Shape to draw; repeat for several (default: every shape).")
    ] = None,
    depth: DepthOpt = 3,
    out_arg: OutOpt = "figures/",
    fmt: FormatOpt = "both",
) -> None:
    """Epoch of the lowest median test loss, and that loss, against size: one line per shape."""
    _plot("best", store, release, version, dataset, shape, depth, out_arg, fmt)


def report(
    store: StoreOpt = DEFAULT_STORE,
    release: ReleaseOpt = None,
    out_arg: Annotated[str, typer.Option("--out", help="The HTML file to write.")] = "butter-report.html",
) -> None:
    """Write a self-contained HTML dataset card: contents, schema, releases, problem runs and figures."""
    from butter_pipeline.read import open_dataset
    from butter_pipeline.report import build_report

    try:
        html = build_report(open_dataset(store, release=release))
        target = Path(out_arg)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(html, encoding="utf-8")
        except OSError as exc:
            raise FigureError(f"--out {out_arg}: cannot write it: {exc.strerror or exc}") from None
    except ButterError as exc:
        _fail(exc)
    out.print(f"wrote {target} ({len(html.encode()) / 1e6:.1f} MB)", highlight=False)
