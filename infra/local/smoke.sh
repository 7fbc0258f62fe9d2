#!/usr/bin/env bash
# Run a sweep (default: smoke) from the `sweep` deployment on the local stack's Dask cluster, wait for it,
# then show the store's progress table.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${BUTTER_LOCAL_STATE:-$here/.state}"
[ -f "$state/env" ] || { echo "smoke.sh: start the stack first: infra/local/up.sh" >&2; exit 2; }
. "$state/env"
sweep="${1:-smoke}"
prefect --no-prompt deployment run butter-sweep/sweep --param sweep="$sweep" --param store="$BUTTER_STORE" \
  --param dask_address="$BUTTER_DASK_ADDRESS" --watch --watch-timeout 1800
butter status --store "$BUTTER_STORE" "$sweep"
