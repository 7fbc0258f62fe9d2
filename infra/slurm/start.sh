#!/usr/bin/env bash
# Start butter's SLURM launcher (cluster.py start) in the background, wait until its jobs are submitted and
# print the scheduler address on stdout (progress and errors go to stderr).
#
#   address="$(infra/slurm/start.sh --account myproj --cpu-jobs 4 --gpu-jobs 8)"
#   butter run primary --store s3://bucket/prefix --dask-address "$address"
#   infra/slurm/stop.sh
#
# Settings (environment): BUTTER_PYTHON (default python3: the Python with butter and dask-jobqueue),
# BUTTER_SLURM_STATE (default ~/.butter-slurm), and the BUTTER_SLURM_* options of cluster.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${BUTTER_PYTHON:-python3}"
state="${BUTTER_SLURM_STATE:-$HOME/.butter-slurm}"
command -v "$python" > /dev/null || { echo "start.sh: $python not found: set BUTTER_PYTHON to butter's Python" >&2; exit 2; }
for arg in "$@"; do  # a dry run prints the job scripts and submits nothing: run it in the foreground
  [ "$arg" = "--dry-run" ] && exec "$python" "$here/cluster.py" start --state-dir "$state" "$@"
done
command -v sbatch > /dev/null || { echo "start.sh: sbatch not found: run this on a SLURM login node" >&2; exit 2; }
if "$python" "$here/cluster.py" status --state-dir "$state" > /dev/null 2>&1; then
  echo "start.sh: a launcher already runs for $state: $("$python" "$here/cluster.py" status --state-dir "$state")" >&2
  exit 2
fi
mkdir -p "$state"
rm -f "$state/scheduler-address"
nohup "$python" "$here/cluster.py" start --state-dir "$state" "$@" > "$state/launcher.log" 2>&1 &
pid=$!
for _ in $(seq 240); do
  if [ -s "$state/scheduler-address" ]; then
    echo "start.sh: jobs submitted; launcher pid $pid, log $state/launcher.log" >&2
    cat "$state/scheduler-address"
    exit 0
  fi
  kill -0 "$pid" 2> /dev/null || { echo "start.sh: the launcher stopped: $(tail -n 1 "$state/launcher.log")" >&2; exit 1; }
  sleep 0.5
done
echo "start.sh: no scheduler address after 120 s; see $state/launcher.log" >&2
exit 1
