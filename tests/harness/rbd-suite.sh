#!/bin/bash
# tests/harness/rbd-suite.sh [extra cargo test args...]
#
# Runs kiln's RBD tests against a real, throw-away single-node Ceph cluster:
#   1. tests/harness/ceph-start.sh in a fresh temp dir (mon + mgr + memstore osd, loopback),
#   2. CEPH_CONF=<dir>/ceph.conf cargo test -p kiln-driver-rbd [args] (CARGO_TARGET_DIR is
#      honoured if set),
#   3. ALWAYS stops the cluster and removes the dir (trap), even on failure or Ctrl-C.
# Exits with the tests' exit code (or the start script's, if the cluster never came up).
set -uo pipefail

HERE=$(dirname "$(realpath "$0")")
ROOT=$(realpath "$HERE/../..")
DIR=$(mktemp -d "${TMPDIR:-/tmp}/kiln-rbd-ceph.XXXXXX")

cleanup() {
    "$HERE/ceph-stop.sh" "$DIR" --purge
    # ceph-start.sh only purges dirs it marked; an empty/unmarked one is ours to remove.
    [ -d "$DIR" ] && rm -rf "${DIR:?}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

T0=$(date +%s)
if ! ENV_LINE=$("$HERE/ceph-start.sh" "$DIR"); then
    echo "rbd-suite: the Ceph cluster did not start (logs were in $DIR/log)" >&2
    for f in "$DIR"/log/*.log; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
fi
case "$ENV_LINE" in
    "export CEPH_CONF="*) export CEPH_CONF="${ENV_LINE#export CEPH_CONF=}" ;;
    *) echo "rbd-suite: unexpected output from ceph-start.sh: $ENV_LINE" >&2; exit 1 ;;
esac
echo "rbd-suite: cluster up in $(( $(date +%s) - T0 ))s, CEPH_CONF=$CEPH_CONF" >&2

cd "$ROOT" || exit 1
cargo test -p kiln-driver-rbd "$@"
rc=$?
echo "rbd-suite: tests exited $rc after $(( $(date +%s) - T0 ))s; stopping the cluster" >&2
exit $rc
