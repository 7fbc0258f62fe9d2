"""Checks of infra/: the SLURM launcher, the Kubernetes manifests, the IAM policies and the Dockerfiles.

Offline and quick. What needs a real SLURM site, Kubernetes cluster, AWS account or Docker engine is out of
reach here; each part checks what can be checked without one (see the READMEs under infra/).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SLURM = INFRA / "slurm"
K8S = INFRA / "k8s"
IAM = INFRA / "iam"
DOCKER = INFRA / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

SHELL_SCRIPTS = sorted([*SLURM.glob("*.sh"), *K8S.glob("*.sh")])


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_shell_scripts_are_strict_and_parse(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


# SLURM ------------------------------------------------------------------------------------------------------

CLUSTER_PY = SLURM / "cluster.py"


def _cluster_py(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLUSTER_PY), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _slurm_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUTTER_SLURM_")}
    env.update(extra)
    return env


def _dry_run_scripts(output: str) -> dict[str, str]:
    """{"CPU": script, "GPU": script} from the output of `cluster.py start --dry-run`."""
    parts = re.split(r"^### (CPU|GPU) job script.*$", output, flags=re.M)
    assert parts[0].strip() == "", f"unexpected text before the first script: {parts[0]!r}"
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH ")]


def _worker_argv(script: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    return shlex.split(line)


def _last_value(argv: list[str], option: str) -> str | None:
    """The value of the last ``option`` in ``argv`` (click keeps the last of repeated options)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]
    return values[-1] if values else None


def test_slurm_dry_run_prints_cpu_and_gpu_job_scripts(tmp_path: Path) -> None:
    result = _cluster_py(
        "start", "--dry-run", "--state-dir", str(tmp_path), "--account", "acct-x", "--walltime", "02:00:00",
        "--cpu-partition", "cpu-part", "--cpu-jobs", "3", "--cpu-cores", "4", "--cpu-memory", "16GB",
        "--gpu-partition", "gpu-part", "--gpu-jobs", "2", "--gpu-cores", "6", "--gpu-directive=--constraint=h100",
        "--scheduler-host", "sched.example", "--prologue", "module load cuda",
        env=_slurm_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    scripts = _dry_run_scripts(result.stdout)
    assert set(scripts) == {"CPU", "GPU"}
    cpu, gpu = scripts["CPU"], scripts["GPU"]

    cpu_directives, cpu_argv = _directives(cpu), _worker_argv(cpu)
    assert {"-p cpu-part", "-A acct-x", "-t 02:00:00", "--cpus-per-task=4", "-J butter-cpu"} <= set(cpu_directives)
    assert not [d for d in cpu_directives if "gres" in d or "gpu" in d]
    assert cpu_argv[:3] == [sys.executable, "-m", "distributed.cli.dask_worker"]
    assert cpu_argv[3] == "tcp://sched.example:8786"
    assert _last_value(cpu_argv, "--nworkers") == "4"  # one worker process per core
    assert _last_value(cpu_argv, "--nthreads") == "1"
    assert "--resources" not in cpu_argv
    assert "export BUTTER_DEVICE=cpu" in cpu.splitlines()

    gpu_directives, gpu_argv = _directives(gpu), _worker_argv(gpu)
    assert {"-p gpu-part", "-A acct-x", "-t 02:00:00", "--gres=gpu:1", "--constraint=h100"} <= set(gpu_directives)
    assert "--cpus-per-task=6" in gpu_directives
    assert _last_value(gpu_argv, "--resources") == "GPU=1"
    assert _last_value(gpu_argv, "--nthreads") == "1"  # one thread although the job holds 6 cores
    assert "--nworkers" not in gpu_argv  # one worker process per GPU
    assert "export BUTTER_DEVICE=cuda" in gpu.splitlines()
    for script in (cpu, gpu):
        assert "module load cuda" in script.splitlines()
        assert "AWS_" not in script  # credentials travel in the job's environment, never in its script


def test_slurm_options_come_from_the_environment_and_flags_win(tmp_path: Path) -> None:
    env = _slurm_env(
        BUTTER_SLURM_CPU_PARTITION="env-cpu",
        BUTTER_SLURM_GPU_PARTITION="env-gpu",
        BUTTER_SLURM_GPU_GRES="gpu:a100:1",
        BUTTER_SLURM_PROLOGUE="module load cuda/12.4\nsource /opt/site/env.sh\n",
    )
    result = _cluster_py("start", "--dry-run", "--state-dir", str(tmp_path), "--cpu-partition", "flag-cpu", env=env)
    assert result.returncode == 0, result.stderr
    scripts = _dry_run_scripts(result.stdout)
    assert "-p flag-cpu" in _directives(scripts["CPU"])
    assert {"-p env-gpu", "--gres=gpu:a100:1"} <= set(_directives(scripts["GPU"]))
    for script in scripts.values():
        assert {"module load cuda/12.4", "source /opt/site/env.sh"} <= set(script.splitlines())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu-gres", "gpu:2"], "ask for exactly one"),
        (["--gpu-gres", "gpu:h100:4"], "ask for exactly one"),
        (["--cpu-jobs", "0", "--gpu-jobs", "0"], "no jobs to start"),
    ],
)
def test_slurm_refuses_bad_options_on_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = _cluster_py("start", "--dry-run", "--state-dir", str(tmp_path), *args, env=_slurm_env())
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("cluster.py: error: ") and message in result.stderr


def test_slurm_start_without_sbatch_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = _cluster_py("start", "--state-dir", str(tmp_path / "state"), env=_slurm_env(PATH=str(empty)))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "cluster.py: error: sbatch not found: run this on a SLURM login node (or see --dry-run)"
    )


# Stand-ins for sbatch and scancel: sbatch keeps a copy of the job script and runs it on this machine in a
# session of its own; scancel ends that session. That is enough for the real launcher, dask-jobqueue and
# the Dask workers to run end to end.
FAKE_SBATCH = """\
import os, pathlib, subprocess, sys
jobs = pathlib.Path(os.environ["FAKE_SLURM_DIR"])
job_id = 1000 + len(list(jobs.glob("*.sh")))
script = jobs / f"{job_id}.sh"
script.write_text(pathlib.Path(sys.argv[-1]).read_text())
with open(jobs / f"{job_id}.log", "w") as log:
    proc = subprocess.Popen(["bash", str(script)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
(jobs / f"{job_id}.pid").write_text(str(proc.pid))
print(f"Submitted batch job {job_id}")
"""
FAKE_SCANCEL = """\
import os, pathlib, signal, sys
jobs = pathlib.Path(os.environ["FAKE_SLURM_DIR"])
for job_id in sys.argv[1:]:
    with open(jobs / "cancelled", "a") as out:
        out.write(job_id + "\\n")
    try:
        os.killpg(int((jobs / f"{job_id}.pid").read_text()), signal.SIGTERM)
    except ProcessLookupError:
        pass
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def fake_slurm(tmp_path: Path) -> Iterator[dict[str, Any]]:
    bin_dir, jobs, state = tmp_path / "bin", tmp_path / "jobs", tmp_path / "state"
    for folder in (bin_dir, jobs):
        folder.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\n{body}")
        tool.chmod(0o755)
    env = _slurm_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_SLURM_DIR=str(jobs),
        BUTTER_PYTHON=sys.executable,
        BUTTER_SLURM_STATE=str(state),
    )
    yield {"env": env, "jobs": jobs, "state": state}
    # Whatever the test left running: the launcher, then the job sessions (each started by the stand-in)
    launcher = state / "launcher.pid"
    if launcher.is_file() and _alive(pid := int(launcher.read_text())):
        os.kill(pid, signal.SIGKILL)
    for pidfile in jobs.glob("*.pid"):
        pgid = int(pidfile.read_text())
        if _alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


SMALL_CLUSTER = [
    "--cpu-jobs", "1", "--cpu-cores", "1", "--cpu-memory", "1GB",
    "--gpu-jobs", "1", "--gpu-cores", "1", "--gpu-memory", "1GB",
    "--scheduler-host", "127.0.0.1", "--dashboard-address", "none",
]  # fmt: skip


def test_slurm_start_and_stop_route_gpu_work_to_the_gpu_job(fake_slurm: dict[str, Any]) -> None:
    from distributed import Client

    from butter_pipeline.orchestrate import cluster_workers

    env, jobs, state = fake_slurm["env"], fake_slurm["jobs"], fake_slurm["state"]
    started = subprocess.run(
        ["bash", str(SLURM / "start.sh"), *SMALL_CLUSTER, "--scheduler-port", "0"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    address = started.stdout.strip()
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", address)
    assert (state / "scheduler-address").read_text().strip() == address
    job_ids = sorted(p.stem for p in jobs.glob("*.sh"))
    assert len(job_ids) == 2
    assert sorted(line.split()[0] for line in (state / "jobs").read_text().splitlines()) == job_ids

    # A second start for the same state folder is refused while the first runs
    again = subprocess.run(["bash", str(SLURM / "start.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 2 and "already runs" in again.stderr

    with Client(address, timeout="30s", set_as_default=False) as client:
        client.wait_for_workers(2, timeout=90)
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted((w["name"], w["nthreads"], w["resources"]) for w in workers) == [
            ("butter-cpu-0", 1, {}),
            ("butter-gpu-0", 1, {"GPU": 1.0}),
        ]
        # what the sweep flow sees, and where a task annotated as butter annotates heavy chunks runs
        seen = cluster_workers(address)
        assert len(seen.gpu) == 1 and len(seen.cpu) == 1
        pids = client.run(os.getpid)  # builtins only: the workers cannot import this test module
        ran_in = client.submit(os.getpid, resources={"GPU": 1}, pure=False).result(timeout=30)
        assert ran_in == pids[seen.gpu[0]] != pids[seen.cpu[0]]
        assert client.run(os.getenv, "BUTTER_DEVICE") == {seen.gpu[0]: "cuda", seen.cpu[0]: "cpu"}

    # The scripts submitted are the dry run's, but for the scheduler's port and the worker's name
    dry = _cluster_py("start", "--dry-run", *SMALL_CLUSTER, "--scheduler-port", "0", "--state-dir", str(state), env=env)
    assert dry.returncode == 0, dry.stderr
    port = address.rsplit(":", 1)[1]
    submitted = {}
    for job_id in job_ids:
        script = (jobs / f"{job_id}.sh").read_text()
        kind = "GPU" if "--gres=gpu:1" in script else "CPU"
        submitted[kind] = re.sub(r"--name \S+", "--name NAME", script).replace(f":{port} ", ":PORT ")
    expected = {
        kind: re.sub(r"--name \S+", "--name NAME", script.strip() + "\n").replace(":<port> ", ":PORT ")
        for kind, script in _dry_run_scripts(dry.stdout).items()
    }
    assert {k: v.strip() for k, v in submitted.items()} == {k: v.strip() for k, v in expected.items()}

    stopped = subprocess.run(["bash", str(SLURM / "stop.sh")], capture_output=True, text=True, env=env, timeout=90)
    assert stopped.returncode == 0, stopped.stderr
    assert sorted((jobs / "cancelled").read_text().split()) == job_ids
    assert not (state / "scheduler-address").exists() and not (state / "launcher.pid").exists()
    deadline = time.monotonic() + 20
    pgids = [int((jobs / f"{job_id}.pid").read_text()) for job_id in job_ids]
    while any(_alive(p) for p in pgids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pgids), "cancelled jobs are still running"


# Kubernetes -------------------------------------------------------------------------------------------------

KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
SECRET_TEMPLATE = K8S / "secret.example.yaml"
DASK_GROUP = "kubernetes.dask.org"
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _render() -> list[dict[str, Any]]:
    """What `kubectl kustomize` makes of this kustomization: its resources with the namespace and the images
    set (the only transformations it uses)."""
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in KUSTOMIZATION.get("images", [])}
    out = []
    for name in KUSTOMIZATION["resources"]:
        for doc in _documents(K8S / name):
            doc = copy.deepcopy(doc)
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = KUSTOMIZATION["namespace"]
            for container in _containers(doc):
                container["image"] = images.get(container["image"], container["image"])
            out.append(doc)
    return out


MANIFESTS = [doc for name in KUSTOMIZATION["resources"] for doc in _documents(K8S / name)]


def _one(kind: str, name: str | None = None, docs: list[dict[str, Any]] = MANIFESTS) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_specs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod specs inside a manifest, by role."""
    spec = doc.get("spec", {})
    if doc["kind"] == "DaskCluster":
        return {"scheduler": spec["scheduler"]["spec"], "worker": spec["worker"]["spec"]}
    if doc["kind"] == "DaskWorkerGroup":
        return {"worker": spec["worker"]["spec"]}
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return {"pod": spec["template"]["spec"]}
    return {}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in _pod_specs(doc).values() for c in [*pod.get("initContainers", []), *pod["containers"]]]


def test_k8s_every_manifest_parses_and_the_kustomization_lists_them() -> None:
    files = {p.name for p in K8S.glob("*.yaml")}
    listed = KUSTOMIZATION["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == files - {"kustomization.yaml", SECRET_TEMPLATE.name}
    assert KUSTOMIZATION["namespace"] == _one("Namespace")["metadata"]["name"]
    for name in files - {"kustomization.yaml"}:
        for doc in _documents(K8S / name):
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), name
    kinds = {d["kind"] for d in MANIFESTS}
    assert {"DaskCluster", "DaskWorkerGroup", "Deployment", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    assert "Secret" not in kinds, "a Secret in the kustomization would overwrite the real one with placeholders"


def _builtin(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if not d["apiVersion"].startswith(DASK_GROUP + "/")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_builtin_kinds_validate_against_the_kubernetes_schemas(version: str) -> None:
    docs = _builtin(_render()) + _documents(SECRET_TEMPLATE)
    assert len(docs) >= 8
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields are errors too
    # the check does catch mistakes
    broken = copy.deepcopy(_one("Deployment", "butter-prefect-worker", docs))
    broken["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMap"] = {"name": "x"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


@functools.cache
def _crd_schema(plural: str) -> dict[str, Any]:
    spec = importlib.util.find_spec("dask_kubernetes")
    assert spec is not None and spec.submodule_search_locations, "dask-kubernetes is not installed"
    root = Path(next(iter(spec.submodule_search_locations)))
    crd = yaml.safe_load(
        (root / "operator/deployment/helm/dask-kubernetes-operator/crds" / f"{plural}.yaml").read_text()
    )
    assert crd["spec"]["group"] == DASK_GROUP
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    return {"version": f"{DASK_GROUP}/{version['name']}", "schema": version["schema"]["openAPIV3Schema"]}


def _pruned(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would silently drop: those a structural schema does not declare."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        out = []
        for key, item in value.items():
            if key in props:
                out += _pruned(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += _pruned(item, extra, f"{path}.{key}")
            elif not extra:
                out.append(f"{path}.{key}")
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [p for i, item in enumerate(value) for p in _pruned(item, schema["items"], f"{path}[{i}]")]
    return []


def _crd_errors(doc: dict[str, Any], plural: str) -> list[str]:
    crd = _crd_schema(plural)
    assert doc["apiVersion"] == crd["version"]
    validator = jsonschema.Draft7Validator(crd["schema"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    return errors + [f"unknown field {p}" for p in _pruned(body, crd["schema"])]


def test_k8s_dask_resources_validate_against_the_operator_crds() -> None:
    cluster, group = _one("DaskCluster"), _one("DaskWorkerGroup")
    assert _crd_errors(cluster, "daskcluster") == []
    assert _crd_errors(group, "daskworkergroup") == []
    # the pod specs inside them against today's PodSpec too (the CRDs embed an older one)
    for doc in (cluster, group):
        for role, pod in _pod_specs(doc).items():
            wrapped = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role}, "spec": pod}
            kubernetes_validate.validate(wrapped, K8S_VERSIONS[-1], strict=True)
    # and the checks fail where they should
    typo = copy.deepcopy(group)
    typo["spec"]["worker"]["spec"]["containers"][0]["resource"] = typo["spec"]["worker"]["spec"]["containers"][0].pop(
        "resources"
    )
    assert _crd_errors(typo, "daskworkergroup") == ["unknown field .spec.worker.spec.containers[0].resource"]
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["worker"]["replicas"] = "four"
    assert any("replicas" in e for e in _crd_errors(wrong_type, "daskcluster"))
    no_cluster = copy.deepcopy(group)
    del no_cluster["spec"]["cluster"]
    assert any("'cluster' is a required property" in e for e in _crd_errors(no_cluster, "daskworkergroup"))


def _args(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _gpu_quantities(container: dict[str, Any]) -> dict[str, str]:
    resources = container.get("resources", {})
    return {
        f"{part}/{key}": str(value)
        for part in ("requests", "limits")
        for key, value in resources.get(part, {}).items()
        if "gpu" in key
    }


def test_k8s_gpu_workers_declare_and_request_a_gpu_and_cpu_workers_do_not() -> None:
    cluster, group = _one("DaskCluster"), _one("DaskWorkerGroup")
    assert group["spec"]["cluster"] == cluster["metadata"]["name"]

    (gpu,) = group["spec"]["worker"]["spec"]["containers"]
    argv = _args(gpu)
    assert argv[:2] == ["dask", "worker"]
    assert _last_value(argv, "--resources") == "GPU=1"
    assert _last_value(argv, "--nthreads") == "1"
    assert "--nworkers" not in argv
    assert _gpu_quantities(gpu) == {"requests/nvidia.com/gpu": "1", "limits/nvidia.com/gpu": "1"}
    assert _env(gpu)["BUTTER_DEVICE"]["value"] == "cuda"
    assert gpu["image"] == "butter-cuda"

    (cpu,) = cluster["spec"]["worker"]["spec"]["containers"]
    argv = _args(cpu)
    assert argv[:2] == ["dask", "worker"]
    assert "--resources" not in argv and not any(a.startswith("--resources=") for a in argv)
    assert _last_value(argv, "--nthreads") == "1"
    assert _gpu_quantities(cpu) == {}
    assert str(cpu["resources"]["requests"]["cpu"]) == "1"  # one core for one single-threaded worker
    assert _env(cpu)["BUTTER_DEVICE"]["value"] == "cpu"
    assert cpu["image"] == "butter-cpu"

    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert _args(scheduler)[:2] == ["dask", "scheduler"]
    assert _gpu_quantities(scheduler) == {}
    # nothing else in the kustomization asks for a GPU or declares GPU=1
    for doc in MANIFESTS:
        if doc is not group:
            for container in _containers(doc):
                assert _gpu_quantities(container) == {} and "GPU=1" not in _args(container), doc["metadata"]["name"]


def _config() -> dict[str, str]:
    return _one("ConfigMap", "butter-config")["data"]


def _service_for(labels: dict[str, str]) -> dict[str, Any]:
    (service,) = [d for d in MANIFESTS if d["kind"] == "Service" and d["spec"]["selector"].items() <= labels.items()]
    return service


def test_k8s_dask_address_is_the_operators_scheduler_service() -> None:
    cluster = _one("DaskCluster")
    name = cluster["metadata"]["name"]
    service = cluster["spec"]["scheduler"]["service"]
    # the operator creates the Service as <name>-scheduler and labels the scheduler's pod like this
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    (comm,) = [p for p in service["ports"] if p["port"] == 8786]
    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in scheduler["ports"]}
    assert ports[comm["targetPort"]] == 8786
    assert _last_value(_args(scheduler), "--port") == "8786"
    assert _config()["BUTTER_DASK_ADDRESS"] == f"tcp://{name}-scheduler:8786"


def test_k8s_prefect_api_url_reaches_the_prefect_server() -> None:
    server = _one("Deployment", "butter-prefect-server")
    template = server["spec"]["template"]
    assert server["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    service = _service_for(template["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    (container,) = template["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert str(container_ports[port["targetPort"]]) == _last_value(_args(container), "--port")
    assert _config()["PREFECT_API_URL"] == f"http://{service['metadata']['name']}:{port['port']}/api"
    volume_claims = {v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]}
    assert volume_claims == {_one("PersistentVolumeClaim")["metadata"]["name"]}


def test_k8s_every_butter_process_gets_the_s3_secret_and_the_config() -> None:
    (secret,) = _documents(SECRET_TEMPLATE)
    secret_name, secret_keys = secret["metadata"]["name"], set(secret["stringData"])
    config_name = _one("ConfigMap", "butter-config")["metadata"]["name"]
    targets = {
        "cpu workers": _one("DaskCluster")["spec"]["worker"]["spec"]["containers"],
        "gpu workers": _one("DaskWorkerGroup")["spec"]["worker"]["spec"]["containers"],
        "prefect worker": _one("Deployment", "butter-prefect-worker")["spec"]["template"]["spec"]["containers"],
    }
    for what, (container,) in targets.items():
        env = _env(container)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"):
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret_name, key), what
            assert ref.get("optional", False) == (key in ("AWS_REGION", "AWS_ENDPOINT_URL")), (what, key)
        assert {"configMapRef": {"name": config_name}} in container["envFrom"], what
    for doc in MANIFESTS:
        for container in _containers(doc):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or (ref["name"] == secret_name and ref["key"] in secret_keys), entry
            assert not any("value" in e and e["name"].startswith("AWS_") for e in container.get("env", []))
    required = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"}
    assert secret_keys == required


def test_k8s_secret_template_holds_placeholders_only() -> None:
    (secret,) = _documents(SECRET_TEMPLATE)
    assert secret["kind"] == "Secret" and "data" not in secret
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    text = "\n".join(p.read_text() for p in K8S.glob("*"))
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "something like an AWS access key id is committed"
    assert "kubectl -n butter create secret generic butter-s3" in SECRET_TEMPLATE.read_text()


def test_k8s_prefect_worker_polls_the_configured_pool_with_read_only_rbac() -> None:
    worker = _one("Deployment", "butter-prefect-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = _args(container)
    assert argv[:1] == ["prefect"] and "worker" in argv and "start" in argv
    assert _last_value(argv, "--pool") == _config()["BUTTER_WORK_POOL"]
    assert _last_value(argv, "--type") == "process"
    assert container["workingDir"] == _config()["BUTTER_PROJECT_DIR"]

    account = _one("ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    role, binding = _one("Role"), _one("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": KUSTOMIZATION["namespace"]}]
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs <= {"get", "list", "watch"}, f"the worker's Role may write: {verbs}"
    assert not any("*" in x for rule in role["rules"] for x in (*rule["verbs"], *rule["resources"], *rule["apiGroups"]))


def _dockerfile_uid() -> str:
    (uid,) = set(re.findall(r"useradd --uid (\d+)", (DOCKER / "Dockerfile.cpu").read_text()))
    return uid


def test_k8s_pods_run_as_the_images_non_root_user_and_images_are_mapped() -> None:
    uid = int(_dockerfile_uid())
    mapped = {i["name"] for i in KUSTOMIZATION["images"]}
    for doc in MANIFESTS:
        for role, pod in _pod_specs(doc).items():
            security = pod["securityContext"]
            assert security["runAsNonRoot"] is True and security["runAsUser"] == uid, (doc["metadata"]["name"], role)
            for container in pod["containers"]:
                assert container["image"] in mapped, container["image"]
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
    rendered = {c["image"] for doc in _render() for c in _containers(doc)}
    assert rendered == {f"{i['newName']}:{i['newTag']}" for i in KUSTOMIZATION["images"]}


def _tools_only(tmp_path: Path) -> str:
    """A PATH with the few tools the scripts use, and no kubectl (this machine may well have one)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("bash", "dirname", "grep", "cat", "tail", "sleep", "seq"):
        (tools / name).symlink_to(shutil.which(name))
    return str(tools)


def _stub_kubectl(tmp_path: Path, *, fail_on: str = "") -> dict[str, str]:
    """A stand-in kubectl that logs its arguments and fails when they contain ``fail_on``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "kubectl"
    log = shlex.quote(str(tmp_path / "kubectl.log"))
    fail = f'case "$*" in *{shlex.quote(fail_on)}*) exit 1;; esac' if fail_on else ""
    stub.write_text(f'#!{shutil.which("bash")}\necho "$*" >> {log}\n{fail}\nexit 0\n')
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{_tools_only(tmp_path)}"}


def test_k8s_scripts_check_their_prerequisites(tmp_path: Path) -> None:
    bare = {**os.environ, "PATH": _tools_only(tmp_path)}
    for script in ("up.sh", "down.sh"):
        result = subprocess.run(["bash", str(K8S / script)], capture_output=True, text=True, env=bare, timeout=30)
        assert result.returncode == 2
        assert result.stderr.strip() == f"{script}: kubectl not found: install it and point it at your cluster"

    no_operator = tmp_path / "no-operator"
    no_operator.mkdir()
    env = _stub_kubectl(no_operator, fail_on="get crd")
    result = subprocess.run(["bash", str(K8S / "up.sh")], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2 and "Dask Kubernetes operator is not installed" in result.stderr

    # every tool there, but config.yaml still holds the store placeholder: up.sh stops before applying
    ready = tmp_path / "ready"
    ready.mkdir()
    env = _stub_kubectl(ready)
    result = subprocess.run(["bash", str(K8S / "up.sh")], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2 and "set BUTTER_STORE" in result.stderr
    assert "apply" not in (ready / "kubectl.log").read_text()

    result = subprocess.run(["bash", str(K8S / "down.sh")], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"delete -k {K8S} --ignore-not-found" in (ready / "kubectl.log").read_text()
    assert 'kubectl apply -k "$here"' in (K8S / "up.sh").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_k8s_kubectl_kustomize_renders_what_the_tests_check() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60)
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]

    def key(doc: dict[str, Any]) -> tuple[str, str, str]:
        return doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace", "")

    ours = _render()
    assert sorted(map(key, rendered)) == sorted(map(key, ours))
    images = {key(d): sorted(c["image"] for c in _containers(d)) for d in rendered}
    assert images == {key(d): sorted(c["image"] for c in _containers(d)) for d in ours}


# IAM --------------------------------------------------------------------------------------------------------

POLICIES = {name: json.loads((IAM / f"{name}.json").read_text()) for name in ("writer", "reader")}
BUCKET_ARN, ROOT_ARN, OBJECTS_ARN = "arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/PREFIX", "arn:aws:s3:::BUCKET/PREFIX/*"
S3_OBJECT_WRITES = re.compile(r"^s3:(Put|Delete|Abort|Restore|Replicate|Create|Update|Bypass)", re.I)
KNOWN_S3_ACTIONS = {
    "s3:ListBucket",
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
    "s3:ListBucketMultipartUploads",
    "s3:GetBucketLocation",
}


def _listify(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _iam_match(pattern: str, value: str, *, case: bool = True) -> bool:
    """IAM's wildcards: * any run of characters (slashes included), ? one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=0 if case else re.I) is not None


def _allowed(policy: dict[str, Any], action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """Whether an identity policy of Allow statements allows a request (no Deny, no NotAction here)."""
    context = context or {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
        if not any(_iam_match(a, action, case=False) for a in _listify(statement["Action"])):
            continue
        if not any(_iam_match(r, resource) for r in _listify(statement["Resource"])):
            continue
        ok = True
        for operator, conditions in statement.get("Condition", {}).items():
            assert operator in ("StringEquals", "StringLike"), operator
            for key, values in conditions.items():
                if key not in context:
                    ok = False
                elif operator == "StringEquals":
                    ok &= context[key] in _listify(values)
                else:
                    ok &= any(_iam_match(v, context[key]) for v in _listify(values))
        if ok:
            return True
    return False


@pytest.mark.parametrize("name", POLICIES)
def test_iam_policies_are_versioned_and_use_no_broad_wildcards(name: str) -> None:
    policy = POLICIES[name]
    assert policy["Version"] == "2012-10-17"
    assert policy["Statement"]
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and statement.get("Sid")
        actions, resources = _listify(statement["Action"]), _listify(statement["Resource"])
        assert not [a for a in actions if "*" in a or "?" in a], f"{name}: wildcard action"
        assert set(actions) <= KNOWN_S3_ACTIONS, f"{name}: unknown action {set(actions) - KNOWN_S3_ACTIONS}"
        assert "*" not in resources and set(resources) <= {BUCKET_ARN, ROOT_ARN, OBJECTS_ARN}, f"{name}: {resources}"
        if BUCKET_ARN in resources:  # on the bucket: its region, and listings under a prefix condition only
            assert set(actions) <= {"s3:ListBucket", "s3:GetBucketLocation"}
        if "s3:ListBucket" in actions:
            assert "s3:prefix" in statement["Condition"].get("StringLike", statement["Condition"].get("StringEquals"))
        if ROOT_ARN in resources:  # the key named like the store: a HEAD to see whether the store exists
            assert actions == ["s3:GetObject"]


def test_iam_reader_has_no_write_or_delete_action() -> None:
    actions = {a for s in POLICIES["reader"]["Statement"] for a in _listify(s["Action"])}
    assert actions == {"s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject"}
    assert not [a for a in actions if S3_OBJECT_WRITES.match(a)]
    writer = {a for s in POLICIES["writer"]["Statement"] for a in _listify(s["Action"])}
    assert {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"} <= writer


OBJ = "arn:aws:s3:::BUCKET/PREFIX"
IAM_CASES = [
    # action, resource, context, writer allowed, reader allowed
    ("s3:GetObject", f"{OBJ}/runs/_delta_log/00000000000000000003.json", {}, True, True),
    ("s3:PutObject", f"{OBJ}/runs/_delta_log/00000000000000000004.json", {}, True, False),
    ("s3:PutObject", f"{OBJ}/staging/u1/epochs.parquet", {}, True, False),
    ("s3:DeleteObject", f"{OBJ}/_publish/lock.json", {}, True, False),
    ("s3:AbortMultipartUpload", f"{OBJ}/epochs/part-0.parquet", {}, True, False),
    ("s3:ListMultipartUploadParts", f"{OBJ}/epochs/part-0.parquet", {}, True, False),
    ("s3:PutObject", "arn:aws:s3:::BUCKET/elsewhere/x", {}, False, False),
    ("s3:PutObject", "arn:aws:s3:::BUCKET/PREFIXES/x", {}, False, False),  # a sibling sharing the stem
    ("s3:GetObject", ROOT_ARN, {}, True, True),  # s3fs's exists() on the store: HEAD, then a listing
    ("s3:PutObject", ROOT_ARN, {}, False, False),
    ("s3:DeleteObject", ROOT_ARN, {}, False, False),
    ("s3:GetBucketLocation", BUCKET_ARN, {}, True, True),  # s3fs's probe that the bucket exists
    ("s3:CreateBucket", BUCKET_ARN, {}, False, False),
    ("s3:GetObject", "arn:aws:s3:::OTHER/PREFIX/x", {}, False, False),
    ("s3:PutBucketPolicy", BUCKET_ARN, {}, False, False),
    ("s3:DeleteBucket", BUCKET_ARN, {}, False, False),
    ("s3:ListBucket", BUCKET_ARN, {"s3:prefix": "PREFIX/runs/_delta_log/"}, True, True),
    ("s3:ListBucket", BUCKET_ARN, {"s3:prefix": "PREFIX/", "s3:delimiter": "/"}, True, True),
    ("s3:ListBucket", BUCKET_ARN, {"s3:prefix": "PREFIX"}, True, True),
    ("s3:ListBucket", BUCKET_ARN, {"s3:prefix": "", "s3:delimiter": "/"}, True, True),  # butter's reachability check
    ("s3:ListBucket", BUCKET_ARN, {"s3:prefix": ""}, False, False),  # the whole bucket, recursively
    ("s3:ListBucket", BUCKET_ARN, {}, False, False),
    ("s3:ListBucket", BUCKET_ARN, {"s3:prefix": "elsewhere/"}, False, False),
    ("s3:ListBucket", BUCKET_ARN, {"s3:prefix": "PREFIXES/"}, False, False),
]


@pytest.mark.parametrize(("action", "resource", "context", "writer", "reader"), IAM_CASES)
def test_iam_policies_allow_exactly_the_stores_requests(
    action: str, resource: str, context: dict[str, str], writer: bool, reader: bool
) -> None:
    assert _allowed(POLICIES["writer"], action, resource, context) is writer
    assert _allowed(POLICIES["reader"], action, resource, context) is reader


def test_iam_placeholders_fill_in_as_the_readme_says() -> None:
    readme = (IAM / "README.md").read_text()
    assert 'sed -e "s|BUCKET|$bucket|g" -e "s|PREFIX|$prefix|g"' in readme
    for name in POLICIES:
        text = (IAM / f"{name}.json").read_text()
        filled = json.loads(text.replace("BUCKET", "my-bucket").replace("PREFIX", "butter/v1"))
        assert "BUCKET" not in json.dumps(filled) and "PREFIX" not in json.dumps(filled)
        for statement in filled["Statement"]:
            for arn in _listify(statement["Resource"]):
                assert re.fullmatch(r"arn:aws:s3:::my-bucket(/butter/v1(/\*)?)?", arn), arn
        assert _allowed(filled, "s3:GetObject", "arn:aws:s3:::my-bucket/butter/v1/runs/part-0.parquet")
        assert _allowed(filled, "s3:ListBucket", "arn:aws:s3:::my-bucket", {"s3:prefix": "butter/v1/runs/"})
        assert not _allowed(filled, "s3:GetObject", "arn:aws:s3:::my-bucket/butter/v2/runs/part-0.parquet")


# Docker -----------------------------------------------------------------------------------------------------

DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines, joined = [], ""
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("#") and not joined:
            continue
        joined += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            if joined.strip():
                lines.append(joined.strip())
            joined = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _torch_requirement() -> str:
    (torch,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d)]
    return torch.replace(" ", "")


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfiles_pin_the_base_install_the_project_and_drop_root(flavour: str) -> None:
    steps = _instructions(DOCKERFILES[flavour])
    kinds = [k for k, _ in steps]
    froms = [args.split()[0] for k, args in steps if k == "FROM"]
    assert froms and all(re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*|[\w./-]+@sha256:[0-9a-f]{64}", f) for f in froms)
    assert froms[0].startswith("python:3.11")

    runs = [args for k, args in steps if k == "RUN"]
    (torch_run,) = [r for r in runs if "torch" in r]
    assert f'"{_torch_requirement()}"' in torch_run, "torch's range differs from pyproject.toml's"
    index = re.search(r"--index-url\s+(\S+)", torch_run).group(1).strip('"')
    if flavour == "cpu":
        assert index == "https://download.pytorch.org/whl/cpu"
    else:
        assert index == "${TORCH_INDEX_URL}"
        (arg,) = [a for k, a in steps if k == "ARG" and a.startswith("TORCH_INDEX_URL=")]
        assert re.fullmatch(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", arg)
    (install,) = [i for i, (k, a) in enumerate(steps) if k == "RUN" and re.search(r"pip install \.(\s|$)", a)]
    torch_step = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "torch" in a)
    assert torch_step < install  # torch first, so that installing butter does not fetch another build
    assert "dask worker --help" in steps[install][1]

    copied = {src for k, a in steps[:install] if k == "COPY" for src in a.split()[:-1]}
    packages = {Path(p).parts[0] for p in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"], "prefect.yaml", *packages} <= copied

    users = [a for k, a in steps if k == "USER"]
    assert users and kinds.index("USER") > install
    # numeric, so that Kubernetes can tell it is not root (runAsNonRoot), and the uid the image creates
    assert users[-1] == f"{_dockerfile_uid()}:{_dockerfile_uid()}" and users[-1].split(":")[0] != "0"
    assert f"--uid {_dockerfile_uid()}" in " ".join(runs)
    (workdir,) = [a for k, a in steps if k == "WORKDIR"]
    assert workdir == _config()["BUTTER_PROJECT_DIR"]


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule for a top-level path: the last matching pattern wins; '!' re-includes."""
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!")
        if _iam_match(body.replace("**/", ""), path) or _iam_match(body, path):
            verdict = not negate
    return verdict


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_docker_ignore_files_send_what_the_dockerfile_copies_and_nothing_big(flavour: str) -> None:
    ignore = DOCKERFILES[flavour].with_name(DOCKERFILES[flavour].name + ".dockerignore")
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    copied = {src for k, a in _instructions(DOCKERFILES[flavour]) if k == "COPY" for src in a.split()[:-1]}
    for src in copied:
        assert (REPO / src).exists(), src
        assert not _ignored(patterns, src), f"{src} is copied but the ignore file leaves it out"
    for big in (".venv", "tests", "butter-data", ".git", "benchmarks"):
        assert _ignored(patterns, big), big
