#!/usr/bin/env bash
# Delete everything up.sh applied: the namespace butter and all in it, the Secret butter-s3 and the Prefect
# database volume included (the dataset in S3 stays). The Dask operator itself stays installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
command -v kubectl > /dev/null || { echo "down.sh: kubectl not found: install it and point it at your cluster" >&2; exit 2; }
kubectl delete -k "$here" --ignore-not-found
echo "butter is down: namespace butter deleted (recreate the Secret butter-s3 before the next up.sh)"
