#!/usr/bin/env bash
# Stop everything infra/local/up.sh started. The data (S3 bucket, Prefect database) stays in the state
# folder for the next start; delete that folder to start afresh.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${BUTTER_LOCAL_STATE:-$here/.state}"
for name in prefect-worker dask-workers dask-scheduler prefect; do
  pidfile="$state/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
done
BUTTER_S3_DIR="$state/seaweedfs" "$here/s3-server.sh" stop
echo "butter's local stack is down (data kept in $state)"
