#!/usr/bin/env python3
"""A Dask cluster for butter on SLURM: one scheduler (in this process) plus CPU and GPU worker jobs.

    python infra/slurm/cluster.py start [options]     # runs until Ctrl-C, SIGTERM or `cluster.py stop`
    python infra/slurm/cluster.py start --dry-run     # print the CPU and GPU job scripts, submit nothing
    python infra/slurm/cluster.py stop                # stop a running launcher (it cancels its jobs)
    python infra/slurm/cluster.py status

CPU jobs run one single-threaded Dask worker per reserved core on the CPU partition. GPU jobs each hold one
GPU (``--gres=gpu:1``) and run one single-threaded worker that declares ``--resources GPU=1``: butter
submits its heavy chunks with ``dask.annotate(resources={"GPU": 1})``, so only those workers take them.
Job counts are fixed (``scale(jobs=N)``): Dask's adaptive scaling does not know about resources and would
start CPU jobs for GPU work.

Every option can also be set in the environment (``BUTTER_SLURM_<OPTION>``, e.g. BUTTER_SLURM_GPU_JOBS=4);
a flag wins over the environment. The scheduler's address goes to ``<state-dir>/scheduler-address``.
The jobs inherit the environment of the shell that starts this launcher (sbatch's default), so export
AWS_* and PREFECT_API_URL there; nothing secret is written into a job script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_STATE = Path("~/.butter-slurm")
ADDRESS_FILE = "scheduler-address"
PID_FILE = "launcher.pid"
JOBS_FILE = "jobs"
STATUS_EVERY_SECONDS = 15.0


class UsageError(Exception):
    """A bad option or a missing tool: reported on one line, exit status 2."""


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"BUTTER_SLURM_{name}", default)


def _env_list(name: str) -> list[str]:
    """A list option from the environment: one item per line (prologue lines, sbatch directives)."""
    value = _env(name)
    return [line for line in value.splitlines() if line.strip()] if value else []


def _count(text: str) -> int:
    """A whole number >= 0 (argparse also applies it to the defaults, which come from the environment)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster.py", description="butter's Dask cluster on SLURM: a scheduler plus CPU and GPU worker jobs."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def state_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir",
            default=_env("STATE", str(DEFAULT_STATE)),
            help="where the scheduler address, pid, job ids and job logs go (BUTTER_SLURM_STATE; default %(default)s)",
        )

    start = commands.add_parser("start", help="start the scheduler and submit the worker jobs; run until stopped")
    state_option(start)
    start.add_argument("--dry-run", action="store_true", help="print the CPU and GPU job scripts; submit nothing")
    start.add_argument("--account", default=_env("ACCOUNT"), help="sbatch --account (BUTTER_SLURM_ACCOUNT)")
    start.add_argument("--walltime", default=_env("WALLTIME", "24:00:00"), help="per job (default %(default)s)")
    start.add_argument("--job-name", default=_env("JOB_NAME", "butter"), help="prefix of job and worker names")

    cpu = start.add_argument_group("CPU worker jobs")
    cpu.add_argument("--cpu-partition", default=_env("CPU_PARTITION", "cpu"), help="default %(default)s")
    cpu.add_argument("--cpu-jobs", type=_count, default=_env("CPU_JOBS", "1"), help="default %(default)s")
    cpu.add_argument(
        "--cpu-cores",
        type=_count,
        default=_env("CPU_CORES", "8"),
        help="cores per CPU job = single-threaded worker processes per job (default %(default)s)",
    )
    cpu.add_argument("--cpu-memory", default=_env("CPU_MEMORY", "32GB"), help="per CPU job (default %(default)s)")
    cpu.add_argument(
        "--cpu-directive",
        action="append",
        default=_env_list("CPU_DIRECTIVES"),
        help="extra #SBATCH option for CPU jobs, e.g. --cpu-directive=--qos=normal (repeatable)",
    )

    gpu = start.add_argument_group("GPU worker jobs")
    gpu.add_argument("--gpu-partition", default=_env("GPU_PARTITION", "gpu"), help="default %(default)s")
    gpu.add_argument("--gpu-jobs", type=_count, default=_env("GPU_JOBS", "1"), help="one GPU each (default 1)")
    gpu.add_argument(
        "--gpu-cores",
        type=_count,
        default=_env("GPU_CORES", "4"),
        help="CPU cores reserved per GPU job; the worker still runs one thread (default %(default)s)",
    )
    gpu.add_argument("--gpu-memory", default=_env("GPU_MEMORY", "32GB"), help="per GPU job (default %(default)s)")
    gpu.add_argument(
        "--gpu-gres",
        default=_env("GPU_GRES", "gpu:1"),
        help="the job's generic resource; exactly one GPU, e.g. gpu:a100:1 (default %(default)s)",
    )
    gpu.add_argument(
        "--gpu-directive",
        action="append",
        default=_env_list("GPU_DIRECTIVES"),
        help="extra #SBATCH option for GPU jobs, e.g. --gpu-directive=--constraint=h100 (repeatable)",
    )

    job = start.add_argument_group("every job")
    job.add_argument(
        "--prologue",
        action="append",
        default=_env_list("PROLOGUE"),
        help="shell line run before the worker starts, e.g. 'module load cuda' (repeatable)",
    )
    job.add_argument(
        "--python",
        default=_env("PYTHON", sys.executable),
        help="the Python with butter installed, as the compute nodes see it (default: this one)",
    )
    job.add_argument("--local-directory", default=_env("LOCAL_DIRECTORY"), help="worker scratch, e.g. '$TMPDIR'")
    job.add_argument("--log-directory", default=_env("LOG_DIRECTORY"), help="job logs (default: <state-dir>/logs)")

    net = start.add_argument_group("scheduler")
    net.add_argument("--scheduler-host", default=_env("SCHEDULER_HOST"), help="address to listen on and advertise")
    net.add_argument("--scheduler-port", type=_count, default=_env("SCHEDULER_PORT", "8786"), help="0: any")
    net.add_argument("--interface", default=_env("INTERFACE"), help="network interface for all of it, e.g. ib0")
    net.add_argument(
        "--dashboard-address", default=_env("DASHBOARD_ADDRESS", ":8787"), help="'none' turns it off (needs bokeh)"
    )

    stop = commands.add_parser("stop", help="stop the running launcher; its jobs are cancelled")
    state_option(stop)
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it (default %(default)s)")

    status = commands.add_parser("status", help="say whether a launcher runs and print its scheduler address")
    state_option(status)
    return parser


# Job scripts ------------------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> None:
    if args.cpu_jobs + args.gpu_jobs == 0:
        raise UsageError("no jobs to start: give --cpu-jobs or --gpu-jobs")
    if args.cpu_jobs and args.cpu_cores < 1:
        raise UsageError("--cpu-cores must be at least 1")
    if args.gpu_jobs and args.gpu_cores < 1:
        raise UsageError("--gpu-cores must be at least 1")
    parts = args.gpu_gres.split(":")
    if parts[0] != "gpu" or len(parts) not in (2, 3) or parts[-1] != "1":
        raise UsageError(
            f"--gpu-gres {args.gpu_gres!r}: one worker process per GPU, so ask for exactly one: gpu:1 or gpu:TYPE:1"
        )


def _common(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    return {
        "account": args.account,
        "walltime": args.walltime,
        "python": args.python,
        "local_directory": args.local_directory,
        "log_directory": args.log_directory or str(state / "logs"),
        # what JobQueueCluster adds to every job's options; the GPU jobs are built from these options directly
        "config_name": "slurm",
        "interface": args.interface,
    }


def cpu_job_options(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """SLURMJob options of a CPU job: one single-threaded worker process per reserved core."""
    return {
        **_common(args, state),
        "queue": args.cpu_partition,
        "job_name": f"{args.job_name}-cpu",
        "cores": args.cpu_cores,
        "processes": args.cpu_cores,
        "memory": args.cpu_memory,
        "job_extra_directives": list(args.cpu_directive),
        "worker_extra_args": ["--nthreads", "1"],
        "job_script_prologue": ["export BUTTER_DEVICE=cpu", *args.prologue],
    }


def gpu_job_options(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """SLURMJob options of a GPU job: one GPU, one worker process with one thread that declares GPU=1."""
    return {
        **_common(args, state),
        "queue": args.gpu_partition,
        "job_name": f"{args.job_name}-gpu",
        "cores": args.gpu_cores,
        "processes": 1,
        "memory": args.gpu_memory,
        "job_extra_directives": [f"--gres={args.gpu_gres}", *args.gpu_directive],
        # one thread whatever --gpu-cores is: the extra cores are for torch and data loading, not for tasks
        "worker_extra_args": ["--resources", "GPU=1", "--nthreads", "1"],
        "job_script_prologue": ["export BUTTER_DEVICE=cuda", *args.prologue],
    }


def _import_jobqueue() -> tuple[Any, Any]:
    """(SLURMCluster, SLURMJob), imported only when needed so that --help works without dask-jobqueue."""
    try:
        from dask_jobqueue import SLURMCluster
        from dask_jobqueue.slurm import SLURMJob
    except ImportError:
        raise UsageError("dask_jobqueue not found: pip install 'dask-jobqueue>=0.9'") from None
    return SLURMCluster, SLURMJob


def dry_run(args: argparse.Namespace, state: Path) -> None:
    """Print the job scripts the launcher would submit (the SLURMJob scripts SLURMCluster.job_script() shows)."""
    _, slurm_job = _import_jobqueue()
    host = args.scheduler_host or socket.getfqdn()
    address = f"tcp://{host}:{args.scheduler_port or '<port>'}"
    for kind, count, options in (
        ("CPU", args.cpu_jobs, cpu_job_options(args, state)),
        ("GPU", args.gpu_jobs, gpu_job_options(args, state)),
    ):
        job = slurm_job(address, name=f"{options['job_name']}-N", **options)
        print(f"### {kind} job script ({count} job{'s' if count != 1 else ''}), scheduler {address}")
        print(job.job_script())


# Running ------------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_pid(state: Path) -> int | None:
    try:
        pid = int((state / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _last_line(exc: BaseException) -> str:
    """The telling line of a multi-line error (sbatch's own message comes last in dask-jobqueue's)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _worker_counts(cluster: Any) -> tuple[int, int]:
    workers = cluster.scheduler_info.get("workers", {}).values()
    gpu = sum(1 for w in workers if w.get("resources", {}).get("GPU", 0) > 0)
    return len(workers) - gpu, gpu


async def _run(args: argparse.Namespace, state: Path) -> None:
    slurm_cluster, slurm_job = _import_jobqueue()
    cpu_options = cpu_job_options(args, state)
    gpu_options = gpu_job_options(args, state)
    Path(cpu_options["log_directory"]).mkdir(parents=True, exist_ok=True)
    scheduler_options: dict[str, Any] = {"port": args.scheduler_port, "dashboard_address": args.dashboard_address}
    if args.dashboard_address.lower() == "none":  # no dashboard; its HTTP server (/health) takes any free port
        scheduler_options.update(dashboard=False, dashboard_address=":0")
    if args.scheduler_host:
        scheduler_options["host"] = args.scheduler_host  # else: all interfaces, or --interface's
    job_kwargs = {k: v for k, v in cpu_options.items() if k not in ("config_name", "interface")}
    try:
        cluster = await slurm_cluster(
            asynchronous=True,
            name=f"{args.job_name}-cpu",
            interface=args.interface,
            scheduler_options=scheduler_options,
            **job_kwargs,
        )
    except (OSError, RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot start the scheduler on port {args.scheduler_port}: {_last_line(exc)}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # One cluster, two kinds of job: the GPU jobs join the worker spec beside the CPU jobs that scale()
        # adds (scale counts every job in the spec). The counts stay fixed; nothing adapts.
        for i in range(args.gpu_jobs):
            cluster.worker_spec[f"{args.job_name}-gpu-{i}"] = {"cls": slurm_job, "options": gpu_options}
        cluster.scale(jobs=args.cpu_jobs + args.gpu_jobs)
        try:
            await cluster  # submits every job with sbatch; raises if a submission fails
        except RuntimeError as exc:
            raise UsageError(f"sbatch failed: {_last_line(exc)}") from None
        jobs = {name: job.job_id for name, job in sorted(cluster.workers.items())}
        _write(state / JOBS_FILE, "".join(f"{job_id} {name}\n" for name, job_id in jobs.items()))
        address = cluster.scheduler_address
        _write(state / ADDRESS_FILE, address + "\n")
        print(f"scheduler {address} (written to {state / ADDRESS_FILE})", flush=True)
        print(
            f"submitted {args.cpu_jobs} CPU job(s) of {args.cpu_cores} worker(s) to partition {args.cpu_partition} "
            f"and {args.gpu_jobs} GPU job(s) to partition {args.gpu_partition}: {' '.join(map(str, jobs.values()))}",
            flush=True,
        )
        print(f"use it with: butter run SWEEP --store s3://... --dask-address {address}", flush=True)
        seen: tuple[int, int] | None = None
        while not stop.is_set():
            counts = _worker_counts(cluster)
            if counts != seen:
                seen = counts
                print(f"workers connected: {counts[0]} CPU, {counts[1]} GPU", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATUS_EVERY_SECONDS)
        print("stopping: cancelling the jobs", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        (state / ADDRESS_FILE).unlink(missing_ok=True)
        await cluster.close()
        (state / JOBS_FILE).unlink(missing_ok=True)


def start(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).expanduser().resolve()
    _check(args)
    if args.dry_run:
        dry_run(args, state)
        return 0
    if not shutil.which("sbatch"):
        raise UsageError("sbatch not found: run this on a SLURM login node (or see --dry-run)")
    state.mkdir(parents=True, exist_ok=True)
    running = _running_pid(state)
    if running is not None:
        raise UsageError(f"a launcher already runs for {state} (pid {running}); stop it with: cluster.py stop")
    (state / ADDRESS_FILE).unlink(missing_ok=True)
    _write(state / PID_FILE, f"{os.getpid()}\n")
    try:
        asyncio.run(_run(args, state))
    finally:
        (state / PID_FILE).unlink(missing_ok=True)
    return 0


def stop(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).expanduser().resolve()
    pid = _running_pid(state)
    if pid is None:
        leftover = state / JOBS_FILE
        if leftover.is_file() and shutil.which("scancel"):
            # the launcher died without cleaning up: cancel what it submitted
            ids = [line.split()[0] for line in leftover.read_text().splitlines() if line.strip()]
            if ids:
                subprocess.run(["scancel", *ids], check=False)
                print(f"no launcher running; cancelled its leftover jobs {' '.join(ids)}")
            leftover.unlink()
            return 0
        print(f"no launcher running for {state}")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        raise UsageError(f"the launcher (pid {pid}) did not stop within {args.timeout:.0f} s")
    print(f"stopped the launcher (pid {pid}) and its jobs")
    return 0


def status(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).expanduser().resolve()
    pid = _running_pid(state)
    address_file = state / ADDRESS_FILE
    if pid is None:
        print(f"no launcher running for {state}")
        return 1
    address = address_file.read_text().strip() if address_file.is_file() else "(starting)"
    print(f"launcher pid {pid}, scheduler {address}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"start": start, "stop": stop, "status": status}[args.command](args)
    except UsageError as exc:
        print(f"cluster.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
