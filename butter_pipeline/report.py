"""A dataset card: one self-contained HTML page saying what a store (or a release) holds.

Counts by sweep, dataset and shape, the schema of the three tables, the releases, the runs that failed,
diverged or were rejected, and BUTTER's three figures per dataset, embedded as base64 PNG so the file
needs nothing beside it. Every string that comes from the data goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from importlib import resources
from typing import Any

import pandas as pd
import pyarrow
import pyarrow.compute as pc

from butter_pipeline.errors import FigureError
from butter_pipeline.read import ButterDataset
from butter_pipeline.release import list_releases
from butter_pipeline.schemas import RUN_STATUSES, SCHEMA_VERSION
from butter_pipeline.tables import SUMMARIZER_APP_ID, TABLE_SCHEMAS

RUN_COLUMNS = ["run_id", "experiment_id", "sweeps", "dataset", "shape", "depth", "size", "status", "error"]
PROBLEM_STATUSES = ("failed", "diverged", "rejected")
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.85em; } code { font-size: 0.95em; }
details summary { cursor: pointer; font-weight: 600; margin: 0.5em 0; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "<td></td>"
    return f"<td>{escape(str(value))}</td>"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _markdown_inline(text: str) -> str:
    """Escape, then show `code` spans as <code> (the schema README's only markup in table cells)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text.replace("\\|", "|")))


def column_docs() -> dict[str, dict[str, tuple[str, str, str]]]:
    """table -> column -> (type, null?, meaning), from the contract's README in the package (empty if absent)."""
    try:
        text = resources.files("butter_pipeline.schemas").joinpath("README.md").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return {}
    meanings: dict[str, dict[str, tuple[str, str, str]]] = {}
    table = None
    for line in text.splitlines():
        heading = re.match(r"^## `(\w+)`", line)
        if heading:
            table = heading.group(1)
            meanings[table] = {}
            continue
        row = re.match(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \| (.*) \|$", line)
        if table and row:
            meanings[table][row.group(1)] = (row.group(2), row.group(3), row.group(4))
    return meanings


def _row_count(data: ButterDataset, name: str) -> int:
    """Rows of a table at the opened version, from the Delta log's per-file counts (reads no data)."""
    if data.versions.get(name) is None:
        return 0
    actions = pyarrow.table(data.table(name).get_add_actions(flatten=True))
    return int(pc.sum(actions["num_records"]).as_py() or 0)


def _status_counts(runs: pd.DataFrame, by: str) -> list[list[Any]]:
    counts = runs.groupby([by, "status"]).size().unstack(fill_value=0)
    experiments = runs.groupby(by)["experiment_id"].nunique()
    rows = []
    for key in sorted(counts.index):
        statuses = [int(counts.loc[key].get(s, 0)) for s in RUN_STATUSES]
        rows.append([key, int(experiments[key]), sum(statuses), *statuses])
    return rows


def _contents(runs: pd.DataFrame) -> str:
    by_sweep = runs.explode("sweeps").rename(columns={"sweeps": "sweep"})
    header_rest = ["experiments", "runs", *RUN_STATUSES]
    parts = [
        "<h3>By sweep</h3>",
        '<p class="note">A run counts under every BUTTER sweep its experiment belongs to.</p>',
        _table(["sweep", *header_rest], _status_counts(by_sweep, "sweep"), "by-sweep"),
        "<h3>By dataset</h3>",
        _table(["dataset", *header_rest], _status_counts(runs, "dataset"), "by-dataset"),
        "<h3>By shape</h3>",
        _table(["shape", *header_rest], _status_counts(runs, "shape"), "by-shape"),
    ]
    grid = runs.groupby(["dataset", "shape"])["experiment_id"].nunique().unstack(fill_value=0)
    rows = [[d, *(int(grid.loc[d, s]) for s in grid.columns)] for d in grid.index]
    parts += ["<h3>Experiments by dataset and shape</h3>", _table(["dataset", *grid.columns], rows, "by-dataset-shape")]
    depths = runs.groupby(["dataset", "depth"])["experiment_id"].nunique().unstack(fill_value=0)
    rows = [[d, *(int(depths.loc[d, k]) for k in depths.columns)] for d in depths.index]
    header = ["dataset", *(f"depth {int(k)}" for k in depths.columns)]
    parts += ["<h3>Experiments by dataset and depth</h3>", _table(header, rows, "by-dataset-depth")]
    return "\n".join(parts)


def _problems(runs: pd.DataFrame, limit: int) -> str:
    parts = []
    for status in PROBLEM_STATUSES:
        chosen = runs[runs["status"] == status].sort_values(["dataset", "shape", "depth", "size", "run_id"])
        parts.append(f"<h3>{status.capitalize()} runs: {len(chosen):,}</h3>")
        if chosen.empty:
            continue
        detail = "first diverged epoch" if status == "diverged" else "error"
        column = "first_diverged_epoch" if status == "diverged" else "error"
        rows = [
            [r.run_id, r.dataset, r.shape, int(r.depth), int(r.size), _optional_int(getattr(r, column))]
            for r in chosen.head(limit).itertuples()
        ]
        parts.append(_table(["run_id", "dataset", "shape", "depth", "size", detail], rows, f"{status}-runs"))
        if len(chosen) > limit:
            parts.append(f'<p class="note">and {len(chosen) - limit:,} more (query <code>runs</code> for all).</p>')
    return "\n".join(parts)


def _optional_int(value: Any) -> Any:
    if isinstance(value, float) and not pd.isna(value) and value.is_integer():
        return int(value)
    return value


def _releases(data: ButterDataset) -> str:
    manifests = list_releases(data.store)
    if not manifests:
        return '<p class="note">No releases yet (<code>butter release NAME</code> makes one).</p>'
    rows = []
    for m in manifests:
        v = m["versions"]
        runs = int(sum(m["runs_by_status"].values()))
        versions = f"{v.get('runs')}/{v.get('epochs')}/{v.get('summaries')}"
        rows.append([m["name"], m["created_at"], m.get("description", ""), runs, int(m["rows"]["epochs"]), versions])
    header = ["release", "created", "description", "runs", "epoch rows", "versions (runs/epochs/summaries)"]
    return _table(header, rows, "releases")


def _schema(data: ButterDataset) -> str:
    docs = column_docs()
    parts = [f'<p class="note">Data contract version {escape(SCHEMA_VERSION)} (<code>schemas/README.md</code>).</p>']
    for name in TABLE_SCHEMAS:
        schema = data.arrow_dataset(name).schema if data.versions.get(name) is not None else TABLE_SCHEMAS[name]
        rows = ""
        for f in schema:  # the stored columns; type and meaning as the contract words them
            kind, null, meaning = docs.get(name, {}).get(f.name, (str(f.type), "yes" if f.nullable else "no", ""))
            rows += (
                f"<tr><td><code>{escape(f.name)}</code></td><td>{escape(kind)}</td><td>{escape(null)}</td>"
                f"<td>{_markdown_inline(meaning)}</td></tr>"
            )
        parts.append(
            f"<details><summary><code>{escape(name)}</code>: {len(schema)} columns</summary><table><thead><tr>"
            f"<th>column</th><th>type</th><th>null?</th><th>meaning</th></tr></thead><tbody>{rows}</tbody></table>"
            "</details>"
        )
    return "\n".join(parts)


def _figure_slices(data: ButterDataset) -> list[tuple[str, str, int]]:
    """Per dataset, the (shape, depth) to draw: rectangle at depth 3 when present, else the fullest slice."""
    keys = data.summaries(columns=["dataset", "shape", "depth", "experiment_id"], to="pandas")
    counts = keys.drop_duplicates().groupby(["dataset", "shape", "depth"]).size().reset_index(name="experiments")
    chosen = []
    for dataset, group in counts.groupby("dataset", sort=True):
        preferred = (group["shape"] == "rectangle") & (group["depth"] == 3)
        row = group[preferred].iloc[0] if preferred.any() else group.sort_values("experiments").iloc[-1]
        chosen.append((str(dataset), str(row["shape"]), int(row["depth"])))
    return chosen


def _figures(data: ButterDataset) -> str:
    from butter_pipeline import figures

    if data.versions.get("summaries") is None:
        return '<p class="note">No summaries yet: run <code>butter summarize</code> for the figures.</p>'
    parts = []
    for dataset, shape, depth in _figure_slices(data):
        parts.append(f"<h3>{escape(dataset)} ({escape(shape)}, depth {depth})</h3>")
        for kind in ("heatmap", "curves", "best"):
            try:
                figure = figures.figure_data(
                    kind, data, dataset, shapes=None if kind == "best" else [shape], depth=depth
                )
            except FigureError as exc:
                parts.append(f'<p class="note">{escape(str(exc))}</p>')
                continue
            encoded = base64.b64encode(figures.png_bytes(figure)).decode("ascii")
            parts.append(
                f'<figure><img alt="{escape(figure.name)}" src="data:image/png;base64,{encoded}">'
                f"<figcaption>{escape(figure.name)}: {len(figure.frame):,} plotted values; "
                f"{escape(figure.note)}</figcaption></figure>"
            )
    return "\n".join(parts)


def _view(data: ButterDataset) -> str:
    if data.release is not None:
        return f"release {data.release['name']} (created {data.release['created_at']})"
    return "the latest published tables"


def build_report(data: ButterDataset, *, problem_rows: int = 100) -> str:
    """The dataset card of ``data`` as one HTML document."""
    uri = data.store.uri
    if data.versions.get("runs") is None:
        raise FigureError(f"store {uri} has no published runs: nothing to report")
    runs = data.runs(columns=RUN_COLUMNS + ["first_diverged_epoch"], to="pandas")
    if runs.empty:
        raise FigureError(f"store {uri} has no runs at this version: nothing to report")
    runs["sweeps"] = runs["sweeps"].apply(list)
    covered = None
    if data.versions.get("summaries") is not None:
        covered = data.table("summaries").transaction_version(SUMMARIZER_APP_ID)
    versions = ", ".join(f"{name} v{v}" for name, v in data.versions.items() if v is not None)
    overview = [
        ["runs", len(runs)],
        ["experiments", int(runs["experiment_id"].nunique())],
        ["epoch rows", _row_count(data, "epochs")],
        ["summary rows", _row_count(data, "summaries")],
        ["datasets", int(runs["dataset"].nunique())],
        ["shapes", int(runs["shape"].nunique())],
        ["sweeps", ", ".join(sorted(set(runs["sweeps"].explode().dropna())))],
        ["table versions", versions],
        ["summaries reflect runs version", "none yet" if covered is None else int(covered)],
    ]
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    body = [
        f"<h1>butter dataset card: {escape(uri)}</h1>",
        f'<p class="note">{escape(_view(data))}; generated {escape(generated)}.</p>',
        "<h2>Overview</h2>",
        _table(["", "count"], overview, "overview"),
        "<h2>Contents</h2>",
        _contents(runs),
        "<h2>Failed, diverged and rejected runs</h2>",
        '<p class="note">Failed: training raised on every attempt. Diverged: a loss became NaN or infinite (its '
        "epochs stay in the tables). Rejected: no network of the shape within 20 % of the size, not trained.</p>",
        _problems(runs, problem_rows),
        "<h2>Releases</h2>",
        _releases(data),
        "<h2>Figures</h2>",
        '<p class="note">From <code>summaries</code>; <code>butter plot</code> writes them with their CSV.</p>',
        _figures(data),
        "<h2>Schema</h2>",
        _schema(data),
    ]
    title = escape(f"butter dataset card: {uri}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
