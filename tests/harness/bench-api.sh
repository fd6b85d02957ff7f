#!/usr/bin/env bash
# The REST API under load, against the same workload through the CLI, same machine, same
# backend (raw+reflink on a loop-mounted XFS), same run:
#   CLIENTS clients creating and deleting snapshots on VOLUMES volumes for DURATION seconds
#   1. through one `kiln serve` (HTTP; a prober times GET /healthcheck meanwhile);
#   2. through the CLI, one whole `kiln` process per operation, on the same data directory.
# Prints both reports (JSON); `kiln bench api` exits non-zero if a snapshot was left in a
# transitional status or in error.
#
#   KILN_BIN=target/release/kiln DURATION=60 tests/harness/bench-api.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
KILN_BIN=$(realpath "${KILN_BIN:-target/release/kiln}")
CLIENTS=${CLIENTS:-32} VOLUMES=${VOLUMES:-8} DURATION=${DURATION:-60}
work=$(mktemp -d /var/tmp/kiln-bench-api.XXXXXX)
server=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then kill "$server"; wait "$server" || true; fi
  umount "$work/xfs" 2>/dev/null || umount -l "$work/xfs" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/xfs"
truncate -s 4G "$work/xfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
mount -o loop "$work/xfs.img" "$work/xfs"
cat >"$work/kiln.toml" <<TOML
[backends.raw]
driver = "file"
path = "$work/xfs/vols"
format = "raw"
TOML
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
k() { "$KILN_BIN" --config "$work/kiln.toml" --data-dir "$work/data" "$@"; }

echo "== machine: $(nproc) CPUs, $(uname -r); kiln $("$KILN_BIN" --version)"
KILN_LOG=warn "$KILN_BIN" --config "$work/kiln.toml" --data-dir "$work/data" serve \
  --listen "127.0.0.1:$port" >/dev/null 2>"$work/serve.log" &
server=$!
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/healthcheck" >/dev/null 2>&1 && break; sleep 0.1; done
echo "== api: $CLIENTS clients, $VOLUMES volumes, ${DURATION}s through kiln serve"
k --format json bench api --mode api --url "http://127.0.0.1:$port" \
  --clients "$CLIENTS" --volumes "$VOLUMES" --duration "$DURATION"
kill -TERM "$server"
wait "$server"
server=""
echo "== kiln serve exited 0 on SIGTERM"
echo "== cli: $CLIENTS clients, $VOLUMES volumes, ${DURATION}s, one kiln process per operation"
k --format json bench api --mode cli --clients "$CLIENTS" --volumes "$VOLUMES" --duration "$DURATION"
