#!/usr/bin/env bash
# Stop the launcher that infra/slurm/start.sh started: it cancels its worker jobs and the scheduler ends.
# Settings (environment): BUTTER_PYTHON (default python3), BUTTER_SLURM_STATE (default ~/.butter-slurm).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${BUTTER_PYTHON:-python3}"
state="${BUTTER_SLURM_STATE:-$HOME/.butter-slurm}"
command -v "$python" > /dev/null || { echo "stop.sh: $python not found: set BUTTER_PYTHON to butter's Python" >&2; exit 2; }
exec "$python" "$here/cluster.py" stop --state-dir "$state" "$@"
