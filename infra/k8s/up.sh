#!/usr/bin/env bash
# Deploy butter to the current kubectl context: the kustomization of this folder (namespace butter), then
# register the Prefect deployments of prefect.yaml from inside the worker pod. Needs, first (README.md):
# the Dask Kubernetes operator, the Secret butter-s3, BUTTER_STORE in config.yaml and the images in
# kustomization.yaml.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ns=butter  # as in kustomization.yaml
command -v kubectl > /dev/null || { echo "up.sh: kubectl not found: install it and point it at your cluster" >&2; exit 2; }
if ! kubectl get crd daskclusters.kubernetes.dask.org > /dev/null 2>&1; then
  echo "up.sh: the Dask Kubernetes operator is not installed (no CRD daskclusters.kubernetes.dask.org); see infra/k8s/README.md" >&2
  exit 2
fi
if grep -q 's3://BUCKET/PREFIX' "$here/config.yaml"; then
  echo "up.sh: set BUTTER_STORE in infra/k8s/config.yaml (it is still the placeholder s3://BUCKET/PREFIX)" >&2
  exit 2
fi
if grep -q 'registry.example.com' "$here/kustomization.yaml"; then
  echo "up.sh: point the images in infra/k8s/kustomization.yaml at your registry (still registry.example.com)" >&2
  exit 2
fi
if ! kubectl -n "$ns" get secret butter-s3 > /dev/null 2>&1; then
  echo "up.sh: no Secret butter-s3 in namespace $ns: create it first (infra/k8s/README.md)" >&2
  exit 2
fi

kubectl apply -k "$here"
kubectl -n "$ns" rollout status deploy/butter-prefect-server --timeout=600s
kubectl -n "$ns" rollout status deploy/butter-prefect-worker --timeout=600s
for attempt in 1 2 3 4 5; do
  if kubectl -n "$ns" exec deploy/butter-prefect-worker -- prefect --no-prompt deploy --all --prefect-file prefect.yaml \
    > /dev/null; then
    break
  fi
  [ "$attempt" -lt 5 ] || { echo "up.sh: prefect deploy failed in the worker pod (see the output above)" >&2; exit 1; }
  sleep 10
done
echo "butter is up in namespace $ns. Train a sweep on the Dask cluster with:"
echo "  kubectl -n $ns exec deploy/butter-prefect-worker -- sh -c \\"
echo "    'prefect deployment run butter-sweep/sweep --param sweep=smoke --param dask_address=\"\$BUTTER_DASK_ADDRESS\"'"
echo "Prefect UI: kubectl -n $ns port-forward svc/butter-prefect-server 4200  (then http://127.0.0.1:4200)"
