#!/usr/bin/env bash
# Start butter's full local stack on loopback and register its deployments:
#   a Prefect server, a SeaweedFS S3 server with a bucket, a Dask scheduler with CPU workers,
#   a process work pool with one Prefect worker, and the four deployments of prefect.yaml.
#
#   infra/local/up.sh            # then: source infra/local/.state/env
#   infra/local/smoke.sh         # runs the smoke sweep from the `sweep` deployment
#   infra/local/down.sh
#
# Settings (environment): BUTTER_DASK_WORKERS (default: one per core), BUTTER_PREFECT_PORT (4200),
# BUTTER_DASK_PORT (8786), BUTTER_S3_PORT (8333), BUTTER_LOCAL_STATE (infra/local/.state).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
state="${BUTTER_LOCAL_STATE:-$here/.state}"
prefect_port="${BUTTER_PREFECT_PORT:-4200}"
dask_port="${BUTTER_DASK_PORT:-8786}"
s3_port="${BUTTER_S3_PORT:-8333}"
workers="${BUTTER_DASK_WORKERS:-$(nproc)}"
pool="butter-local"
mkdir -p "$state"
for tool in prefect dask butter weed; do
  command -v "$tool" > /dev/null || { echo "up.sh: $tool not found: pip install -e '.[test]' first" >&2; exit 2; }
done
[ -f "$state/prefect.pid" ] && kill -0 "$(cat "$state/prefect.pid")" 2>/dev/null && {
  echo "up.sh: the stack is already up (infra/local/down.sh stops it)" >&2; exit 2; }

# Credentials for the local S3 server: made once, kept in the state folder (mode 600), never printed.
if [ ! -f "$state/credentials" ]; then
  umask 077
  printf 'AWS_ACCESS_KEY_ID=butter-local\nAWS_SECRET_ACCESS_KEY=%s\n' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    > "$state/credentials"
fi
set -a; . "$state/credentials"; set +a
cat > "$state/env" <<ENV
set -a
. "$state/credentials"
AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port
AWS_REGION=us-east-1
PREFECT_API_URL=http://127.0.0.1:$prefect_port/api
PREFECT_HOME=$state/prefect
PREFECT_SERVER_ANALYTICS_ENABLED=false
BUTTER_STORE=s3://butter/data
BUTTER_DASK_ADDRESS=tcp://127.0.0.1:$dask_port
BUTTER_WORK_POOL=$pool
BUTTER_PROJECT_DIR=$root
set +a
ENV
. "$state/env"

start() {  # start NAME COMMAND...: in the background, logging to the state folder
  local name="$1"; shift
  nohup "$@" > "$state/$name.log" 2>&1 &
  echo $! > "$state/$name.pid"
}
wait_for() {  # wait_for WHAT COMMAND...: retry for up to 120 s
  local what="$1"; shift
  for _ in $(seq 240); do "$@" > /dev/null 2>&1 && return 0; sleep 0.5; done
  echo "up.sh: $what did not come up; see $state/*.log" >&2; exit 1
}

start prefect prefect server start --host 127.0.0.1 --port "$prefect_port"
BUTTER_S3_DIR="$state/seaweedfs" BUTTER_S3_PORT="$s3_port" BUTTER_S3_BUCKET=butter "$here/s3-server.sh" start > /dev/null
start dask-scheduler dask scheduler --host 127.0.0.1 --port "$dask_port" --no-dashboard
wait_for "the Dask scheduler" python -c "import socket; socket.create_connection(('127.0.0.1', $dask_port), 1)"
start dask-workers dask worker "$BUTTER_DASK_ADDRESS" --host 127.0.0.1 --nworkers "$workers" --nthreads 1 \
  --name cpu --no-dashboard
wait_for "the Prefect server" python -c "import urllib.request; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)"
wait_for "the S3 server" python -c "from butter_pipeline.store import check_reachable, open_store
check_reachable(open_store('$BUTTER_STORE', create=False))"  # lists the bucket: fails until S3 answers

prefect --no-prompt work-pool create "$pool" --type process --overwrite > "$state/work-pool.log"
(cd "$root" && prefect --no-prompt deploy --all --prefect-file prefect.yaml) > "$state/deploy.log" 2>&1 || {
  echo "up.sh: prefect deploy failed; see $state/deploy.log" >&2; exit 1; }
start prefect-worker prefect worker start --pool "$pool" --limit 2

echo "butter's local stack is up: Prefect UI http://127.0.0.1:$prefect_port, Dask $BUTTER_DASK_ADDRESS ($workers CPU workers),"
echo "S3 $AWS_ENDPOINT_URL, store $BUTTER_STORE. Use it from a shell with: source $state/env"
