#!/bin/bash
# tests/harness/rbd-suite.sh [extra cargo test args...]
#
# Runs kiln's RBD tests against a real, throw-away single-node Ceph cluster:
#   1. tests/harness/ceph-start.sh in a fresh temp dir (mon + mgr + memstore osd, loopback),
#   2. CEPH_CONF=<dir>/ceph.conf cargo test -p kiln-driver-rbd [args] (CARGO_TARGET_DIR is
#      honoured if set),
#   3. then, on the same cluster (also when step 2 failed, so one run reports both), the
#      end-to-end tests of the real binary: cargo test -p kiln --features rbd,failpoints --test cli_rbd,
#      and then (also when that failed) the instance snapshots across the file and RBD
#      backends with a real qemu-guest-agent: the same with --test instance_rbd,
#   4. ALWAYS stops the cluster and removes the dir (trap), even on failure or Ctrl-C.
# RBD_SUITE_PARTS selects the runs: "driver cli" (default), "driver" or "cli" (cli_rbd and
# instance_rbd). Extra arguments go to the driver run (e.g. `--test rbd_online`), or to the
# CLI runs when they are the only ones (e.g. `RBD_SUITE_PARTS=cli tests/harness/rbd-suite.sh
# rbd_lifecycle`: a test-name filter, applied to both CLI test files).
# Exits 0 only if every run passed, else with the first failing run's exit code (or 1 if
# the cluster never came up).
set -uo pipefail

PARTS=${RBD_SUITE_PARTS:-driver cli}
case " $PARTS " in
    *" driver "*|*" cli "*) ;;
    *) echo "rbd-suite: RBD_SUITE_PARTS=$PARTS: use \"driver cli\", \"driver\" or \"cli\"" >&2; exit 2 ;;
esac
for p in $PARTS; do
    case "$p" in driver|cli) ;; *) echo "rbd-suite: unknown part $p in RBD_SUITE_PARTS" >&2; exit 2 ;; esac
done

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
rc=0
record() {  # record NAME RC: keep the first failure's code
    echo "rbd-suite: $1 tests exited $2 after $(( $(date +%s) - T0 ))s" >&2
    [ "$rc" -eq 0 ] && rc=$2
}
case " $PARTS " in
    *" driver "*)
        cargo test -p kiln-driver-rbd "$@"
        record driver $?
        case " $PARTS " in
            *" cli "*)
                cargo test -p kiln --features rbd,failpoints --test cli_rbd --test backup_rbd; record CLI $?
                cargo test -p kiln --features rbd,failpoints --test instance_rbd; record instance $?
                cargo test -p kiln --features rbd,failpoints --test multinode_rbd; record multinode $?
                ;;
        esac
        ;;
    *)
        cargo test -p kiln --features rbd,failpoints --test cli_rbd --test backup_rbd "$@"
        record CLI $?
        cargo test -p kiln --features rbd,failpoints --test instance_rbd "$@"
        record instance $?
        cargo test -p kiln --features rbd,failpoints --test multinode_rbd "$@"
        record multinode $?
        ;;
esac
echo "rbd-suite: stopping the cluster" >&2
exit $rc
