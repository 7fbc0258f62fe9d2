"""Orchestration at scale: GPU routing on a real multi-process Dask cluster, resume after a killed sweep,
bounded run retries, bounded planning memory, and the deployments the Prefect UI shows."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from butter_pipeline import execute, vtrain
from butter_pipeline import plan as planning
from butter_pipeline.read import open_dataset
from butter_pipeline.stage import staged_run_ids, staged_units
from butter_pipeline.store import open_store
from butter_pipeline.sweep import expand, load_spec, plan_runs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROUTING_SWEEP = """\
name = "routing"
repetitions = 2

[grid]
dataset = "529_pollen"
shape = "rectangle"
size = [128, 2048]
depth = 3
learning_rate = 0.001
batch_size = 256
epochs = 2
"""
# parameters x training rows x epochs of the two sizes above: 128 x 3078 x 2 = 0.79e6 and 2048 x 3078 x 2 =
# 12.6e6; a threshold between them makes the larger experiment "heavy"
ROUTING_GPU_MIN_WORK = 5e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dask_scheduler_with_a_gpu_worker(tmp_path: Path, prefect_api_url: str) -> Iterator[str]:
    """A Dask scheduler and two workers, each a separate process: `gpu` declares GPU=1, `cpu` nothing."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "BUTTER_DEVICE": "cpu"}
    common = ["--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard", "--no-nanny"]
    procs = [
        subprocess.Popen(
            [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "scheduler.log", "w"),  # noqa: SIM115 - closed with the process
        )
    ]
    try:
        for name, extra in (("gpu", ["--resources", "GPU=1"]), ("cpu", [])):
            procs.append(
                subprocess.Popen(
                    [BIN / "dask", "worker", address, "--name", name, *common, *extra],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp_path / f"worker-{name}.log", "w"),  # noqa: SIM115
                )
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout="5s", set_as_default=False) as client:
                    client.wait_for_workers(2, timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.integration
def test_heavy_work_runs_only_on_the_gpu_worker_and_light_work_elsewhere(
    tmp_path, dask_scheduler_with_a_gpu_worker, prefect_api_url
):
    from butter_pipeline.flows.sweep import sweep_flow

    spec_path = tmp_path / "routing.toml"
    spec_path.write_text(ROUTING_SWEEP)
    store = tmp_path / "store"
    summary = sweep_flow(
        sweep=str(spec_path),
        store=str(store),
        dask_address=dask_scheduler_with_a_gpu_worker,
        gpu_min_work=ROUTING_GPU_MIN_WORK,
    )
    assert summary["outcomes"]["gpu-chunks"] >= 1 and summary["publish"]["runs_added"] == 4

    runs = open_dataset(str(store)).runs(columns=["size", "worker", "status"], to="pandas")
    assert set(runs["status"]) == {"complete"} and len(runs) == 4
    placed = {int(size): set(group["worker"]) for size, group in runs.groupby("size")}
    heavy = {e.size for e in expand(load_spec(str(spec_path))) if planning.work_of(e) >= ROUTING_GPU_MIN_WORK}
    assert heavy and all(placed[size] == {"gpu"} for size in heavy), placed
    assert all(placed[size] == {"cpu"} for size in set(placed) - heavy), placed


@pytest.mark.integration
def test_a_killed_sweep_resumed_trains_only_the_missing_runs(tmp_path, prefect_api_url):
    """The sweep's processes (CLI, flow, Dask workers) are killed with SIGKILL once some work is staged;
    the second run trains exactly the runs that were neither published nor staged."""
    store = tmp_path / "store"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    first = subprocess.Popen(
        [BIN / "butter", "run", "smoke", "--store", str(store), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the Dask workers die with it
    )
    target = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if (store / "staging").is_dir() and (target := open_store(str(store), create=False)) and staged_units(target):
            break
        time.sleep(0.2)
    assert first.poll() is None, "the first sweep ended before anything was staged"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert target is not None
    survived = {rid for unit in staged_units(target) for rid in staged_run_ids(target, unit)}
    assert 0 < len(survived) < 12

    second = subprocess.run(
        [BIN / "butter", "run", "smoke", "--store", str(store), "--workers", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(survived)} already in the store, training {12 - len(survived)}" in second.stderr
    runs = open_dataset(str(store)).runs(columns=["run_id", "finished_at"])
    assert runs.num_rows == 12 and len(set(runs["run_id"].to_pylist())) == 12  # each run exactly once
    planned = {run.run_id for run in plan_runs(load_spec("smoke"))}
    assert set(runs["run_id"].to_pylist()) == planned


def test_a_failing_run_is_retried_then_recorded_failed_and_the_chunk_goes_on(tmp_path, monkeypatch):
    """One run fails once (transient: retried, then complete); another fails every time (recorded as
    failed with its error and the number of attempts); the rest of the chunk trains normally."""
    runs = list(plan_runs(load_spec("smoke")))[:4]  # 529_pollen, sizes 1024 and 4096, 2 repetitions each
    flaky, broken = runs[0].run_id, runs[2].run_id
    calls: dict[str, int] = {}
    real_train_group = vtrain.train_group

    def train_group(part, task, **options):
        for run in part:
            calls[run.run_id] = calls.get(run.run_id, 0) + 1
            if run.run_id == broken or (run.run_id == flaky and calls[flaky] == 1):
                raise RuntimeError(f"injected failure of {run.run_id[:8]}")
        return real_train_group(part, task, **options)

    monkeypatch.setattr(vtrain, "train_group", train_group)
    monkeypatch.setenv("BUTTER_RUN_ATTEMPTS", "3")
    store = open_store(tmp_path / "store")
    counts = execute.run_chunk(store.uri, runs)
    assert counts["status:complete"] == 3 and counts["status:failed"] == 1

    from butter_pipeline.publish import publish

    publish(store)
    table = open_dataset(store.uri).runs(columns=["run_id", "status", "error", "attempts"], to="pandas")
    by_run = table.set_index("run_id")
    assert by_run.loc[broken, "status"] == "failed" and by_run.loc[broken, "attempts"] == 3
    assert "injected failure" in by_run.loc[broken, "error"]
    assert calls[broken] == 3
    assert by_run.loc[flaky, "status"] == "complete" and by_run.loc[flaky, "attempts"] == 2
    # their stacked-model mates failed with them once, then trained alone
    mates = [r.run_id for r in runs if r.run_id not in (flaky, broken)]
    assert (by_run.loc[mates, "attempts"] == 2).all() and (by_run.loc[mates, "status"] == "complete").all()


PLANNING_PEAK_BYTES = 64 * 2**20


def test_planning_the_primary_sweep_is_streamed_in_bounded_memory():
    """BUTTER's primary sweep (851,760 runs): counted and cut into chunks without holding it in memory."""
    spec = load_spec("primary")
    tracemalloc.start()
    try:
        counts = planning.make_plan(spec, set())
        target = planning.chunk_seconds(counts.todo_seconds, workers=64)
        runs = chunks = heavy = largest = 0
        for chunk in planning.stream_chunks(spec, set(), target_seconds=target):
            runs += len(chunk.runs)
            chunks += 1
            heavy += chunk.gpu
            largest = max(largest, len(chunk.runs))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts.runs == runs == 851_760
    assert peak < PLANNING_PEAK_BYTES, f"planning peaked at {peak / 2**20:.0f} MiB"
    assert chunks <= planning.MAX_CHUNKS and 0 < heavy < chunks
    assert largest <= planning.MAX_RUNS_PER_STREAMED_CHUNK + spec.repetitions


def test_chunks_skip_done_runs_and_keep_groups_whole():
    spec = load_spec("smoke")
    every = list(plan_runs(spec))
    done = {every[0].run_id, every[5].run_id}
    chunks = list(planning.stream_chunks(spec, done, target_seconds=1e-9))
    streamed = [run.run_id for chunk in chunks for run in chunk.runs]
    assert sorted(streamed) == sorted(r.run_id for r in every if r.run_id not in done)
    for chunk in chunks:  # one experiment's remaining repetitions share a chunk (they train as one model)
        assert len({run.experiment_id for run in chunk.runs}) == 1


def _prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_prefect_yaml_and_butter_serve_define_the_same_deployments():
    from butter_pipeline.flows.deployments import DEPLOYMENTS

    declared = {d["name"]: d for d in _prefect_yaml()["deployments"]}
    assert sorted(declared) == sorted(d.name for d in DEPLOYMENTS) == ["maintain", "publish", "summarize", "sweep"]
    for d in DEPLOYMENTS:
        entry = declared[d.name]
        assert entry["entrypoint"] == f"flows/deployments.py:{d.flow.fn.__name__}"
        crons = [s["cron"] for s in entry.get("schedules", [])]
        assert crons == ([d.cron] if d.cron else [])
        assert entry["parameters"].keys() <= set(d.flow.parameters.properties)


@pytest.mark.integration
def test_deployments_register_with_parameter_forms_for_the_ui(tmp_path, prefect_api_url):
    """`prefect deploy --all` against a real Prefect API: every deployment registers, with the parameter
    schema the UI renders as a form (types, defaults, descriptions), and the schedules of prefect.yaml."""
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api_url,
        "BUTTER_WORK_POOL": "butter-test",
        "BUTTER_STORE": str(tmp_path / "store"),
        "BUTTER_PROJECT_DIR": str(REPO),
    }
    prefect = [str(BIN / "prefect"), "--no-prompt"]
    pool = subprocess.run(
        [*prefect, "work-pool", "create", "butter-test", "--type", "process", "--overwrite"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = subprocess.run(
        [*prefect, "deploy", "--all", "--prefect-file", "prefect.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments() if d.work_pool_name == "butter-test"}
    assert sorted(deployments) == ["maintain", "publish", "summarize", "sweep"]
    sweep = deployments["sweep"]
    form = sweep.parameter_openapi_schema["properties"]
    assert form["sweep"]["type"] == "string" and form["sweep"]["default"] == "smoke"
    assert "preset" in form["sweep"]["description"]
    assert {t["type"] for t in form["max_runs"]["anyOf"]} == {"integer", "null"}
    assert {t["type"] for t in form["dask_address"]["anyOf"]} == {"string", "null"}
    assert form["gpu_min_work"]["type"] == "number"
    assert all(form[name].get("description") for name in form), "every field of the form says what it is"
    assert sweep.parameters["store"] == str(tmp_path / "store")
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deployments.items()}
    assert crons == {"sweep": [], "publish": ["*/10 * * * *"], "summarize": ["0 * * * *"], "maintain": ["30 3 * * *"]}
    assert deployments["maintain"].parameter_openapi_schema["properties"]["retention_hours"]["type"] == "integer"


def test_status_shows_each_sweeps_progress_from_the_tables_and_staging(tmp_path):
    """`butter status` counts published and staged runs of a sweep against its planned size."""
    import pyarrow

    from butter_pipeline.progress import as_markdown, sweep_progress
    from butter_pipeline.publish import publish
    from butter_pipeline.stage import stage_result
    from butter_pipeline.synthetic import synthetic_tables

    store = open_store(tmp_path / "store")
    runs, epochs = synthetic_tables(10, 3, datasets=("529_pollen",), seed=3)
    runs = runs.set_column(
        runs.schema.get_field_index("sweeps"),
        runs.schema.field("sweeps"),
        pyarrow.array([["smoke"]] * 10, runs.schema.field("sweeps").type),
    )
    ids = runs["run_id"]
    for unit, chosen in (("published", ids[:6]), ("staged", ids[6:])):
        keep = pc.is_in(runs["run_id"], value_set=chosen.combine_chunks())
        stage_result(
            store, unit, runs.filter(keep), epochs.filter(pc.is_in(epochs["run_id"], value_set=chosen.combine_chunks()))
        )
        if unit == "published":
            publish(store)
    [smoke] = sweep_progress(store, {"smoke": 12})
    assert (smoke.done, smoke.staged, smoke.remaining, smoke.by_status["complete"]) == (10, 4, 2, 6)
    assert "| smoke | 12 | 10 (83%) | 6 |" in as_markdown([smoke], store.uri)

    result = subprocess.run(
        [BIN / "butter", "status", "smoke", "--store", store.uri], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "smoke" in line)
    assert "10 (83%)" in line and " 4 " in line and " 2 " in line, result.stdout


@pytest.mark.integration
def test_butter_serve_runs_a_deployment_started_from_prefect(tmp_path, prefect_api_url):
    """`butter serve` registers the deployments and runs a flow run started elsewhere (here: the CLI)."""
    from butter_pipeline.stage import stage_result
    from butter_pipeline.synthetic import synthetic_tables

    store = open_store(tmp_path / "store")
    runs, epochs = synthetic_tables(8, 4, datasets=("adult",), seed=5)
    stage_result(store, "u1", runs, epochs)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    serve = subprocess.Popen(
        [BIN / "butter", "serve", "--store", store.uri],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert "serving butter's deployments" in serve.stdout.readline()
        from prefect.client.orchestration import get_client

        # registered once serve() is running; a deployment of the same name made by `prefect deploy` (another
        # test) belongs to a work pool until serve takes it over
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                try:
                    if client.read_deployment_by_name("butter-publish/publish").work_pool_name is None:
                        break
                except Exception:  # not registered yet
                    pass
                time.sleep(0.5)
        ran = subprocess.run(
            [BIN / "prefect", "--no-prompt", "deployment", "run", "butter-publish/publish", "--watch"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ran.returncode == 0 and "finished successfully" in ran.stdout, ran.stdout[-2000:] + ran.stderr
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    assert open_dataset(store.uri).runs(columns=["run_id"]).num_rows == 8
    assert staged_units(store) == []


@pytest.mark.parametrize("threshold", ["65536", None])
def test_a_worker_started_with_a_fixed_malloc_trim_threshold_undoes_it(threshold):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker (training 1.6x slower here); the
    worker's first chunk raises glibc's thresholds again. A process without the setting is left alone."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    if threshold:
        env["MALLOC_TRIM_THRESHOLD_"] = threshold
    code = "from butter_pipeline.execute import keep_buffers_mapped; print(keep_buffers_mapped())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == ("True" if threshold else "False"), result.stderr


def test_dask_nannies_really_set_the_threshold_the_workers_undo():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c,
        Client(c) as client,
    ):
        [value] = client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()
    assert value == "65536"  # if Dask stops doing this, keep_buffers_mapped can go
