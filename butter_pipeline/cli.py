"""The ``butter`` command line: short adapters over the library.

Bad input (a malformed sweep, an unknown dataset, an unusable store) prints one line naming the input and
exits with status 2; it never shows a traceback.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from butter_pipeline.cli_common import StoreOpt, err, out
from butter_pipeline.cli_common import fail as _fail
from butter_pipeline.cli_figures import plot_app, report
from butter_pipeline.errors import ButterError, ExportError, StagingError, StoreError
from butter_pipeline.progress import format_duration
from butter_pipeline.store import DEFAULT_STORE, Store, check_reachable, open_store

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Generate and publish BUTTER-style datasets.",
)

SweepArg = Annotated[str, typer.Argument(help="A preset name (see `butter sweeps`) or a sweep .toml file.")]


def _print_table(table: Table) -> None:
    """Print ``table`` at its natural width even when piped (rich would squeeze it into 80 columns)."""
    natural = out.measure(table, options=out.options.update_width(1000)).maximum
    if out.is_terminal or natural <= out.width:
        out.print(table)
    else:  # Console.print caps its width at the console's own
        Console(file=out.file, width=natural, soft_wrap=True).print(table)


@app.command()
def sweeps() -> None:
    """List the sweep presets shipped with butter."""
    from butter_pipeline.sweep import expand, load_spec, preset_names

    table = Table("preset", "experiments", "runs", "description")
    for name in preset_names():
        spec = load_spec(name)
        experiments = sum(1 for _ in expand(spec))
        table.add_row(name, f"{experiments:,}", f"{experiments * spec.repetitions:,}", spec.description)
    _print_table(table)


@app.command()
def plan(
    sweep: SweepArg,
    store: Annotated[str | None, typer.Option("--store", help="Also count what this store holds.")] = None,
) -> None:
    """Print a sweep's experiments, runs and epochs, and an estimate of its cost. Runs nothing."""
    from butter_pipeline.plan import done_run_ids, make_plan
    from butter_pipeline.sweep import load_spec

    try:
        spec = load_spec(sweep)
        done = done_run_ids(_reachable(store, create=False)) if store else set()  # plan writes nothing
    except ButterError as exc:
        _fail(exc)
    result = make_plan(spec, done)
    out.print(
        f"sweep {spec.name}: {result.experiments:,} experiments, {result.runs:,} runs, {result.epochs:,} run-epochs"
    )
    if result.rejected_experiments:
        out.print(
            f"  of which {result.rejected_experiments:,} experiments have no network within 20 % of their size:"
            " their runs are recorded as rejected, not trained"
        )
    if store:
        out.print(f"already in {store}: {result.done:,} runs; to train: {result.todo_runs:,}")
    out.print(
        f"estimate: about {format_duration(result.todo_seconds)} of CPU-core time with the reference trainer "
        "(cost model in docs/performance.md)"
    )


def _reachable(uri: str, *, create: bool = True) -> Store:
    store = open_store(uri, create=create)
    check_reachable(store)
    return store


def _watch_staging(store: Store, total: int, stop: threading.Event) -> None:
    """Show training progress from the store itself: runs staged or quarantined since the start."""
    from butter_pipeline.stage import staged_run_count, units_in

    before = units_in(store)
    counted: dict[tuple[str, str], int] = {}
    with Progress(
        TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as progress:
        bar = progress.add_task("runs", total=total)
        while not stop.wait(1.0):
            try:
                for unit in units_in(store) - before - counted.keys():
                    counted[unit] = staged_run_count(store, *unit)
            except Exception:  # a read that raced the publisher's clean-up, or a store outage: poll again
                continue
            progress.update(bar, completed=min(sum(counted.values()), total))


@app.command()
def run(
    sweep: SweepArg,
    store: StoreOpt = DEFAULT_STORE,
    workers: Annotated[int | None, typer.Option(min=1, help="Local Dask workers (default: one per core).")] = None,
    dask_address: Annotated[str | None, typer.Option(help="Use this Dask scheduler instead.")] = None,
    max_runs: Annotated[int | None, typer.Option(min=1, help="Train at most this many new runs.")] = None,
    verbose: Annotated[bool, typer.Option(help="Show Prefect's and Dask's logs.")] = False,
) -> None:
    """Train the runs of SWEEP that the store lacks, and publish them as Delta tables."""
    from butter_pipeline.orchestrate import apply_prefect_defaults, check_scheduler, run_sweep_flow
    from butter_pipeline.plan import done_run_ids, make_plan
    from butter_pipeline.settings import check_settings
    from butter_pipeline.sweep import load_spec
    from butter_pipeline.tasks import verify_cached
    from butter_pipeline.vtrain import check_environment

    started = time.perf_counter()
    try:
        spec = load_spec(sweep)
        verify_cached(dataset for grid in spec.grid for dataset in grid.dataset)
        check_environment()
        check_settings()
        if dask_address:
            check_scheduler(dask_address)  # before anything is created in the store
        target = _reachable(store)
        planned = make_plan(spec, done_run_ids(target))  # counts only; the flow plans again
    except ButterError as exc:
        _fail(exc)
    to_train = planned.todo_runs if max_runs is None else min(planned.todo_runs, max_runs)
    err.print(
        f"{spec.name}: {planned.runs} runs, {planned.done} already in the store, training {to_train}",
        highlight=False,
    )
    apply_prefect_defaults(quiet=not verbose)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_staging, args=(target, to_train, stop), daemon=True)
    watcher.start()
    try:
        summary = run_sweep_flow(
            sweep=sweep, store=target.uri, workers=workers, dask_address=dask_address, max_runs=max_runs
        )
    except ButterError as exc:
        _fail(exc)
    finally:
        stop.set()
        watcher.join()
    report = summary["publish"]
    outcomes = summary["outcomes"]
    statuses = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(outcomes.items()) if k.startswith("status:"))
    quarantined = outcomes.get("quarantined", 0)
    out.print(
        f"published {report['runs_added']} runs ({report['epochs_added']} epoch rows"
        f"{'; ' + statuses if statuses else ''}) to {target.uri} "
        f"(runs table version {report['runs_version']}) in {time.perf_counter() - started:.0f} s"
        + (f"; {quarantined} quarantined in {target.uri}/quarantine" if quarantined else ""),
        highlight=False,
        soft_wrap=True,
    )


def _existing(uri: str) -> Store:
    """A store that must already exist: commands that read or maintain tables never create one."""
    store = _reachable(uri, create=False)
    if store.is_local and not os.path.isdir(store.root):
        raise StoreError(f"store {uri!r}: folder {store.root} does not exist")
    if not store.is_local and "/" in store.root and not store.fs.exists(store.root):  # a bucket's own root exists
        raise StoreError(f"store {uri!r} does not exist (nothing under that prefix); check the prefix")
    return store


@app.command("publish")
def publish_command(store: StoreOpt = DEFAULT_STORE) -> None:
    """Commit staged results into the store's Delta tables (safe to repeat)."""
    from butter_pipeline.publish import publish

    try:
        target = _existing(store)
        report = publish(target)
        set_aside = sorted(report.quarantined)
    except ButterError as exc:
        _fail(exc)
    out.print(
        f"published {report.runs_added} runs ({report.epochs_added} epoch rows) from {report.units} "
        f"staged units in {report.commits} commits; runs table version {report.runs_version}"
    )
    if set_aside:  # staged files that could not be published: the run succeeded, its input did not
        _fail(StagingError(_quarantine_line(target, set_aside)))


def _quarantine_line(store: Store, units: list[str]) -> str:
    """One line for units the publisher moved to quarantine: which, where, and the first one's reason."""
    import json

    from butter_pipeline.stage import QUARANTINE, REPORT_FILE

    try:
        problems = json.loads(store.fs.cat_file(store.path(QUARANTINE, units[0], REPORT_FILE)))
        reason = f": {' '.join(str(problems[0]['detail']).split())}"
    except (OSError, ValueError, LookupError, TypeError):
        reason = ""
    shown = ", ".join(units[:3]) + (f" and {len(units) - 3} more" if len(units) > 3 else "")
    return (
        f"staged unit {shown} cannot be published and was moved to {store.uri}/{QUARANTINE}{reason}; "
        f"see its {REPORT_FILE} (its runs are trained again by the next run of their sweep)"
    )


@app.command()
def summarize(store: StoreOpt = DEFAULT_STORE) -> None:
    """Bring the summaries table up to date (only experiments whose runs changed are recomputed)."""
    from butter_pipeline.summarize import summarize_store

    try:
        report = summarize_store(_existing(store))
    except ButterError as exc:
        _fail(exc)
    out.print(
        f"summarized {report.experiments} experiments ({report.rows} rows, {report.commits} commits); "
        f"summaries reflect runs version {report.runs_version}"
    )


@app.command()
def maintain(
    store: StoreOpt = DEFAULT_STORE,
    zorder: Annotated[bool, typer.Option(help="Z-order by shape, depth, size instead of compacting.")] = False,
    retention_hours: Annotated[
        int, typer.Option(min=0, help="Vacuum files unused for this long (release files are always kept).")
    ] = 168,
) -> None:
    """Compact (or z-order), checkpoint and vacuum the store's tables."""
    from butter_pipeline.maintain import maintain as maintain_tables

    try:
        reports = maintain_tables(_existing(store), zorder=zorder, retention_hours=retention_hours)
    except ButterError as exc:
        _fail(exc)
    for r in reports:
        out.print(
            f"{r.table}: {r.files_removed} files rewritten into {r.files_added}, {r.files_vacuumed} vacuumed, "
            f"version {r.version}"
        )


@app.command()
def release(
    name: Annotated[str, typer.Argument(help="Release name: letters, digits, '.', '_', '-'.")],
    store: StoreOpt = DEFAULT_STORE,
    description: Annotated[str, typer.Option(help="One line saying what the release holds.")] = "",
) -> None:
    """Record the store's current tables as an immutable, named release."""
    from butter_pipeline.release import create_release

    try:
        manifest = create_release(_existing(store), name, description=description)
    except ButterError as exc:
        _fail(exc)
    versions = ", ".join(f"{t} v{v}" for t, v in manifest["versions"].items() if v is not None)
    out.print(
        f"release {name}: {sum(manifest['runs_by_status'].values())} runs, {manifest['rows']['epochs']} epoch rows, "
        f"{manifest['experiments']} experiments ({versions})",
        highlight=False,
    )


@app.command()
def releases(store: StoreOpt = DEFAULT_STORE) -> None:
    """List the store's releases."""
    from butter_pipeline.release import list_releases

    try:
        manifests = list_releases(_existing(store))
    except ButterError as exc:
        _fail(exc)
    table = Table("release", "created", "runs", "epoch rows", "sweeps", "versions (runs/epochs/summaries)")
    for m in manifests:
        v = m["versions"]
        table.add_row(
            m["name"],
            m["created_at"],
            f"{sum(m['runs_by_status'].values()):,}",
            f"{m['rows']['epochs']:,}",
            ", ".join(m["sweeps"]),
            f"{v['runs']}/{v['epochs']}/{v['summaries']}",
        )
    _print_table(table)


@app.command()
def export(
    out_uri: Annotated[str, typer.Argument(metavar="OUT", help="An empty folder or s3://bucket/prefix.")],
    store: StoreOpt = DEFAULT_STORE,
    format: Annotated[str, typer.Option("--format", help="Layout to write; `butter` is BUTTER's.")] = "butter",
    release: Annotated[str | None, typer.Option(help="Export this release instead of the latest tables.")] = None,
) -> None:
    """Export the store in BUTTER's published layout (one row per run, metric lists, Hive partitions)."""
    from butter_pipeline.export import export_butter
    from butter_pipeline.read import open_dataset

    try:
        if format != "butter":
            raise ExportError(f"--format {format!r}: the only format is 'butter'")
        data = open_dataset(_existing(store).uri, release=release)
        target = _reachable(out_uri)
        report = export_butter(data, target)
    except ButterError as exc:
        _fail(exc)
    out.print(f"exported {report.runs} runs in {report.files} files to {report.path}")


@app.command()
def status(
    sweep: Annotated[str | None, typer.Argument(help="Only this sweep (a preset name or a sweep .toml file).")] = None,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Show each sweep's progress in the store: done, failed, remaining, pace and time left."""
    from rich.progress_bar import ProgressBar

    from butter_pipeline.plan import make_plan
    from butter_pipeline.progress import STATUSES, sweep_progress
    from butter_pipeline.sweep import load_spec, preset_names

    try:
        target = _existing(store)
        planned: dict[str, int] = {}
        if sweep is not None:
            spec = load_spec(sweep)
            planned[spec.name] = make_plan(spec, set()).runs
        rows = sweep_progress(target, planned)
        if sweep is not None:
            rows = [p for p in rows if p.sweep == spec.name]
        for p in rows:  # sweeps named after a preset: their size is known here
            if p.planned is None and p.sweep in preset_names():
                p.planned = make_plan(load_spec(p.sweep), set()).runs
    except ButterError as exc:
        _fail(exc)
    table = Table("sweep", "progress", "done", *STATUSES, "staged", "remaining", "runs/hour", "time left")
    for p in rows:
        bar = ProgressBar(total=p.planned or 1, completed=p.done if p.planned else 0, width=24)
        table.add_row(
            p.sweep,
            bar if p.planned else "(spec unknown)",
            f"{p.done:,}" + ("" if p.fraction is None else f" ({p.fraction:.0%})"),
            *(f"{p.by_status.get(s, 0):,}" for s in STATUSES),
            f"{p.staged:,}",
            "?" if p.remaining is None else f"{p.remaining:,}",
            "-" if p.runs_per_hour is None else f"{p.runs_per_hour:,.0f}",
            "-" if p.seconds_left is None else format_duration(p.seconds_left),
        )
    if not rows:
        out.print(f"no runs in {target.uri} yet" + (f" for sweep {sweep}" if sweep else ""))
        return
    _print_table(table)


@app.command()
def serve(
    store: StoreOpt = DEFAULT_STORE,
    verbose: Annotated[bool, typer.Option(help="Show Prefect's logs.")] = False,
) -> None:
    """Serve the sweep, publish, summarize and maintain deployments from this process (Ctrl-C stops).

    Needs a Prefect server (PREFECT_API_URL): start one with `prefect server start` or infra/local.
    """
    from butter_pipeline.orchestrate import apply_prefect_defaults, serve_deployments

    apply_prefect_defaults(quiet=not verbose)
    try:
        _reachable(store)
        serve_deployments(store)
    except ButterError as exc:
        _fail(exc)


app.add_typer(plot_app, name="plot")
app.command()(report)

_INTERRUPTED = "interrupted; staged results are kept and published by the next run or `butter publish`"


def main() -> None:
    from typer.exceptions import TyperException  # typer's own click: its usage errors derive from this

    try:
        code = app(standalone_mode=False)  # click-level errors come here, to be printed as one line too
    except KeyboardInterrupt:
        code = 130
    except TyperException as exc:  # a bad command line: an unknown option, a value out of range, ...
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(2)  # typer has printed the help
        ctx = getattr(exc, "ctx", None)
        hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        message = " ".join(exc.format_message().split()).rstrip(".")  # one line, however click wrapped it
        err.print(f"[bold red]error:[/] {escape(message + hint)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted", highlight=False)
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C into exit status 130
        err.print(_INTERRUPTED, highlight=False)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
