"""`butter plot` and `butter report`: each figure renders, its CSV holds the plotted numbers (checked against
the tables read with plain Delta readers), the card holds the counts, and bad input is one line, exit 2."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow
import pytest
import typer
from typer.testing import CliRunner

import butter_pipeline.synthetic as synthetic
from butter_pipeline.cli_figures import plot_app, report
from butter_pipeline.publish import publish
from butter_pipeline.release import create_release
from butter_pipeline.stage import stage_result
from butter_pipeline.store import Store, open_store
from butter_pipeline.summarize import update_summaries
from butter_pipeline.tables import arrow_dataset, open_table

# As cli.py registers them.
app = typer.Typer()
app.add_typer(plot_app, name="plot")
app.command()(report)
runner = CliRunner()

GRID = {"rectangle": (1024, 4096, 16384), "trapezoid": (1024, 4096)}
EPOCHS, REPETITIONS = 30, 3


def _tables(mp: pytest.MonkeyPatch, dataset: str, shape: str, depth: int, size: int, seed: int, **kwargs):
    """Synthetic runs of one grid point (the generator draws shape, depth and size from these constants)."""
    mp.setattr(synthetic, "SHAPES", (shape,))
    mp.setattr(synthetic, "DEPTHS", (depth,))
    mp.setattr(synthetic, "SIZES", (size,))
    reps = kwargs.pop("repetitions", REPETITIONS)
    return synthetic.synthetic_tables(reps, EPOCHS, repetitions=reps, datasets=(dataset,), seed=seed, **kwargs)


def _fill(store: Store) -> None:
    """Two datasets over two shapes at depth 3, and at depth 4 a dataset with diverged runs and a failed run."""
    seed = 0
    with pytest.MonkeyPatch.context() as mp:
        for dataset in ("529_pollen", "connect_4"):
            for shape, sizes in GRID.items():
                for size in sizes:
                    seed += 1
                    assert (
                        stage_result(store, f"u{seed}", *_tables(mp, dataset, shape, 3, size, seed)).status == "staged"
                    )
        runs, epochs = _tables(mp, "adult", "rectangle", 4, 2048, 99, repetitions=4, diverged_fraction=0.5)
        assert stage_result(store, "u99", runs, epochs).status == "staged"
        runs, epochs = _tables(mp, "adult", "rectangle", 4, 8192, 100, repetitions=1)
    failed = runs.to_pylist()[0] | {
        "status": "failed",
        "error": "RuntimeError: <boom> & more",
        "epochs_recorded": 0,
        "widths": None,
        "num_parameters": None,
        "relative_size_error": None,
        "train_rows": 0,
        "test_rows": 0,
    }
    failed_runs = pyarrow.Table.from_pylist([failed], schema=runs.schema)
    assert stage_result(store, "u100", failed_runs, epochs.slice(0, 0)).status == "staged"
    publish(store)
    update_summaries(store)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    store = open_store(tmp_path_factory.mktemp("figures") / "store")
    _fill(store)
    create_release(store, "r1")
    return store.uri


def _table(uri: str, name: str) -> pd.DataFrame:
    """A whole table through deltalake and pyarrow (not butter's read API, which the figures use)."""
    store = open_store(uri, create=False)
    return arrow_dataset(store, open_table(store, name), name).to_table().to_pandas()


def _epochs(uri: str) -> pd.DataFrame:
    return _table(uri, "epochs")


def _runs(uri: str) -> pd.DataFrame:
    return _table(uri, "runs")


def _plot(*args: str) -> pd.DataFrame:
    result = runner.invoke(app, ["plot", *args])
    assert result.exit_code == 0, result.output
    csv = Path(re.search(r"(\S+\.csv)", result.stdout).group(1))
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml")):
        assert csv.with_suffix(suffix).read_bytes().startswith(magic)
    return pd.read_csv(csv)


def _slice(uri: str, dataset: str, shape: str) -> pd.DataFrame:
    epochs = _epochs(uri)
    return epochs[(epochs["dataset"] == dataset) & (epochs["shape"] == shape) & (epochs["depth"] == 3)]


def test_heatmap_csv_holds_the_median_of_every_size_and_epoch(store_uri, tmp_path):
    frame = _plot("heatmap", "--store", store_uri, "--dataset", "connect_4", "--out", str(tmp_path / "heat"))
    expected = _slice(store_uri, "connect_4", "rectangle").groupby(["size", "epoch"])["test_loss"].median()
    got = frame.set_index(["size", "epoch"])["test_loss_median"].sort_index()
    assert len(got) == len(GRID["rectangle"]) * EPOCHS
    np.testing.assert_allclose(got.to_numpy(), expected.sort_index().to_numpy(), rtol=1e-6)
    # BUTTER's scale: ratio to the grid's lowest median, capped at 2, -log10(r - 0.9), rescaled to [0, 1]
    z = -np.log10(np.minimum(2.0, got / got.min()) - 0.9)
    np.testing.assert_allclose(
        frame.set_index(["size", "epoch"]).sort_index()["normalized"],
        (z - z.min()) / (z.max() - z.min()),
        atol=1e-8,  # the CSV keeps 9 significant digits
    )
    assert frame.loc[frame["test_loss_median"].idxmin(), "normalized"] == 1.0


def test_curves_csv_holds_the_quartiles_over_repetitions(store_uri, tmp_path):
    frame = _plot(
        "curves", "--store", store_uri, "--dataset", "529_pollen", "--shape", "trapezoid", "--out", f"{tmp_path}/"
    )
    loss = _slice(store_uri, "529_pollen", "trapezoid").groupby(["size", "epoch"])["test_loss"]
    got = frame.set_index(["size", "epoch"]).sort_index()
    for column, q in (("test_loss_q1", 0.25), ("test_loss_median", 0.5), ("test_loss_q3", 0.75)):
        np.testing.assert_allclose(got[column], loss.quantile(q).sort_index(), rtol=1e-6)  # linear, as percentile_cont
    assert sorted(frame["size"].unique()) == list(GRID["trapezoid"])
    assert (frame["num_runs"] == REPETITIONS).all()


def test_best_csv_holds_each_shapes_best_epoch_and_loss(store_uri, tmp_path):
    frame = _plot(
        "best", "--store", store_uri, "--dataset", "connect_4", "--format", "both", "--out", str(tmp_path / "b.png")
    )
    assert set(frame["shape"]) == set(GRID)
    epochs = _epochs(store_uri)
    for row in frame.itertuples():
        rows = epochs[
            (epochs["dataset"] == "connect_4") & (epochs["shape"] == row.shape) & (epochs["size"] == row.size)
        ]
        median = rows.groupby("epoch")["test_loss"].median()
        assert row.best_epoch == median.idxmin() and row.best_loss == pytest.approx(median.min(), rel=1e-6)
        per_run = rows.sort_values(["run_id", "test_loss", "epoch"]).drop_duplicates("run_id")
        assert row.run_best_epoch_median == pytest.approx(per_run["epoch"].median())
        assert row.run_best_loss_median == pytest.approx(per_run["test_loss"].median(), rel=1e-6)
        assert row.best_near_end == (row.best_epoch > 0.9 * EPOCHS)


def test_plots_read_a_release_and_a_version(store_uri, tmp_path):
    for option in (["--release", "r1"], ["--version", "1"]):
        frame = _plot("best", "--store", store_uri, *option, "--dataset", "529_pollen", "--out", f"{tmp_path}/")
        assert len(frame) == sum(len(s) for s in GRID.values())


def test_without_a_dataset_every_dataset_with_the_slice_is_drawn(store_uri, tmp_path):
    result = runner.invoke(app, ["plot", "curves", "--store", store_uri, "--out", f"{tmp_path}/", "--format", "png"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"curves-{d}-rectangle-d3.{s}" for d in ("529_pollen", "connect_4") for s in ("csv", "png")
    ]
    assert "adult" in result.stderr  # skipped: it has no depth 3


def _counts_in(html: str, runs: pd.DataFrame) -> None:
    for dataset, group in runs.groupby("dataset"):
        statuses = [int((group["status"] == s).sum()) for s in ("complete", "diverged", "rejected", "failed")]
        cells = [dataset, f"{group['experiment_id'].nunique():,}", f"{len(group):,}", *(f"{n:,}" for n in statuses)]
        expected = "<tr><td>" + '</td><td class="n">'.join(cells) + "</td></tr>"
        assert expected in html
    assert f'<td>runs</td><td class="n">{len(runs):,}</td>' in html


def test_report_holds_the_counts_problems_and_figures(store_uri, tmp_path):
    result = runner.invoke(app, ["report", "--store", store_uri, "--out", str(tmp_path / "card.html")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "card.html").read_text()
    runs = _runs(store_uri)
    _counts_in(html, runs)
    epoch_rows = len(_epochs(store_uri))
    assert f'<td>epoch rows</td><td class="n">{epoch_rows:,}</td>' in html
    assert "RuntimeError: &lt;boom&gt; &amp; more" in html and "<boom>" not in html
    assert f"<h3>Diverged runs: {int((runs['status'] == 'diverged').sum())}</h3>" in html
    assert "<td>r1</td>" in html  # the release
    assert html.count("data:image/png;base64,") == 9  # three figures for each of three datasets
    assert not re.search(r'(src|href)="(?!data:)', html)  # self-contained
    assert "<code>test_loss_min_epoch_median</code>" in html  # the schema


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["plot", "heatmap", "--dataset", "mnist"], "dataset 'mnist'"),
        (["plot", "curves", "--dataset", "connect_4", "--depth", "7"], "no depth 7"),
        (["plot", "heatmap", "--dataset", "connect_4", "--shape", "exponential"], "no shape 'exponential'"),
        (
            ["plot", "best", "--dataset", "connect_4", "--shape", "rectangle", "--shape", "wide_first_2x"],
            "wide_first_2x",
        ),
        (["plot", "best", "--release", "nope"], "release 'nope'"),
        (["plot", "best", "--format", "pdf"], "--format 'pdf'"),
        (["report", "--release", "nope"], "release 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(store_uri, tmp_path, args, words):
    result = runner.invoke(app, [*args, "--store", store_uri, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["plot", "heatmap"], ["plot", "best"], ["report"]])
def test_an_empty_or_missing_store_is_one_line_and_exit_2(tmp_path, command):
    (tmp_path / "empty").mkdir()
    for store in (tmp_path / "empty", tmp_path / "missing"):
        result = runner.invoke(app, [*command, "--store", str(store), "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and str(store) in lines[0], result.stderr


@pytest.mark.s3
def test_plot_and_report_on_s3(s3_env, tmp_path):
    store = open_store(f"s3://{s3_env.bucket}/figures-{os.urandom(4).hex()}")
    _fill(store)
    frame = _plot("best", "--store", store.uri, "--dataset", "connect_4", "--out", str(tmp_path / "best"))
    assert len(frame) == sum(len(s) for s in GRID.values())
    result = runner.invoke(app, ["report", "--store", store.uri, "--out", str(tmp_path / "card.html")])
    assert result.exit_code == 0, result.output
    _counts_in((tmp_path / "card.html").read_text(), _runs(store.uri))
