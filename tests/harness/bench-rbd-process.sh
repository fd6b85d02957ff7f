#!/bin/bash
# tests/harness/bench-rbd-process.sh [RUNS]
#
# Whole processes against whole processes, on a real throw-away Ceph cluster, same image,
# same run (docs/benchmarks.md, "RBD: whole processes"):
#   1. builds kiln in release mode twice: without and with `--features rbd` (the second is
#      the one that talks to Ceph); both binaries are copied aside;
#   2. starts a cluster with tests/harness/ceph-start.sh in a fresh temp dir (as
#      rbd-suite.sh does) and makes one kiln volume (1 GiB image `rbd/volume-<uuid>`);
#   3. hyperfine, RUNS runs each (default 30, 3 warm-ups), medians:
#        kiln pair = `kiln snapshot create VOL` then `kiln snapshot delete SNAP`
#        rbd pair  = `rbd snap create rbd/volume-<uuid>@cli` then `rbd snap rm` of it
#        rbd pair with `snap create --skip-quiesce` (what kiln's plain create does)
#      each pair one `sh -c` (hyperfine subtracts the shell's own start), so both sides pay
#      the same shell; every process starts cold (own connect, own image open), and both
#      act on the same image. Two rounds, the second in the opposite order, so drift in the
#      machine's load does not favour one side;
#   4. `perf stat -e task-clock` of `kiln --version` (RUNS × 2 repeats) for both builds:
#      the start-up every command pays, with and without librbd/librados linked in (and
#      of `rbd --version`, which links the same libraries, for reference);
#   5. ALWAYS stops the cluster and removes its dir (trap), even on failure or Ctrl-C.
# Prints the load average before and after, and a summary; hyperfine JSON and perf output
# stay in OUT_DIR (default: a temp dir, printed). Honours CARGO_TARGET_DIR.
# Needs: hyperfine, perf, the Ceph packages of ceph-start.sh.
set -uo pipefail

RUNS=${1:-30}
HERE=$(dirname "$(realpath "$0")")
ROOT=$(realpath "$HERE/../..")
for c in hyperfine perf rbd; do
    command -v "$c" >/dev/null || { echo "bench-rbd-process: $c is missing" >&2; exit 2; }
done
cd "$ROOT" || exit 1
TDIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-bench-rbd.XXXXXX")
OUT_DIR=${OUT_DIR:-$WORK/out}
mkdir -p "$OUT_DIR"
DIR=$WORK/ceph

cleanup() {
    [ -d "$DIR" ] && "$HERE/ceph-stop.sh" "$DIR" --purge
    rm -rf "${WORK:?}/data" "$WORK/ceph" "$WORK/kiln-plain" "$WORK/kiln-rbd"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== building (release): without and with --features rbd" >&2
cargo build --release -p kiln >&2 || exit 1
cp "$TDIR/release/kiln" "$WORK/kiln-plain"
cargo build --release -p kiln --features rbd >&2 || exit 1
cp "$TDIR/release/kiln" "$WORK/kiln-rbd"
KILN=$WORK/kiln-rbd

mkdir -p "$DIR"
if ! ENV_LINE=$("$HERE/ceph-start.sh" "$DIR"); then
    echo "bench-rbd-process: the Ceph cluster did not start" >&2
    exit 1
fi
case "$ENV_LINE" in
    "export CEPH_CONF="*) export CEPH_CONF="${ENV_LINE#export CEPH_CONF=}" ;;
    *) echo "bench-rbd-process: unexpected output from ceph-start.sh: $ENV_LINE" >&2; exit 1 ;;
esac

printf 'default_backend = "ceph"\n\n[backends.ceph]\ndriver = "rbd"\nceph_conf = "%s"\npool = "rbd"\n' \
    "$CEPH_CONF" >"$WORK/kiln.toml"
K="$KILN --data-dir $WORK/data --config $WORK/kiln.toml"
out=$($K --format json volume create --size 1G) || exit 1
VID=$(printf '%s\n' "$out" | sed -n 's/^  "id": "\(.*\)",$/\1/p')
[ -n "$VID" ] || { echo "bench-rbd-process: no volume id in: $out" >&2; exit 1; }
IMG=rbd/volume-$VID
rbd --conf "$CEPH_CONF" info "$IMG" >/dev/null || exit 1
RBD="rbd --conf $CEPH_CONF --no-progress"

# Both pairs parse nothing with extra processes: the snapshot id comes out of kiln's JSON
# with the shell's own parameter expansion.
KILN_PAIR="out=\$($K --format json snapshot create $VID) && id=\${out#*'\"id\": \"'} && id=\${id%%'\"'*} && $K snapshot delete \$id >/dev/null"
RBD_PAIR="$RBD snap create $IMG@cli && $RBD snap rm $IMG@cli"
# kiln's plain (not forced) create skips librbd's quiesce round (docs/rbd-backend.md); the
# CLI's default does not, so the CLI is also timed with --skip-quiesce: like with like.
RBD_SKIPQ_PAIR="$RBD snap create --skip-quiesce $IMG@cli && $RBD snap rm $IMG@cli"

echo "== load before: $(cat /proc/loadavg)"
hyperfine --warmup 3 --runs "$RUNS" --export-json "$OUT_DIR/pair-1.json" \
    -n "kiln create+delete" "$KILN_PAIR" \
    -n "rbd snap create+rm" "$RBD_PAIR" \
    -n "rbd snap create --skip-quiesce+rm" "$RBD_SKIPQ_PAIR" || exit 1
hyperfine --warmup 3 --runs "$RUNS" --export-json "$OUT_DIR/pair-2.json" \
    -n "rbd snap create --skip-quiesce+rm" "$RBD_SKIPQ_PAIR" \
    -n "rbd snap create+rm" "$RBD_PAIR" \
    -n "kiln create+delete" "$KILN_PAIR" || exit 1
echo "== load after the pairs: $(cat /proc/loadavg)"

# The image must hold no snapshot afterwards: every pair cleaned up after itself.
left=$(rbd --conf "$CEPH_CONF" snap ls "$IMG")
[ -z "$left" ] || { echo "bench-rbd-process: snapshots left on $IMG: $left" >&2; exit 1; }

echo "== kiln --version task-clock (perf stat, $((RUNS * 2)) repeats)"
for b in plain rbd; do
    perf stat -r $((RUNS * 2)) -e task-clock -o "$OUT_DIR/version-$b.perf" \
        "$WORK/kiln-$b" --version >/dev/null || exit 1
    printf '%-6s %s\n' "$b" "$(grep -E 'task-clock|elapsed' "$OUT_DIR/version-$b.perf" | tr -s ' ' | tr '\n' ' ')"
done
# The rbd CLI links the same libraries: its start-up, for reference.
perf stat -r $((RUNS * 2)) -e task-clock -o "$OUT_DIR/version-rbd-cli.perf" rbd --version >/dev/null || exit 1
printf '%-6s %s\n' "rbd-cli" "$(grep -E 'task-clock|elapsed' "$OUT_DIR/version-rbd-cli.perf" | tr -s ' ' | tr '\n' ' ')"
echo "== load at the end: $(cat /proc/loadavg)"

echo "== medians (ms)"
for f in "$OUT_DIR"/pair-1.json "$OUT_DIR"/pair-2.json; do
    /usr/bin/python3 - "$f" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
k = r["kiln create+delete"]
line = f"{sys.argv[1].rsplit('/', 1)[-1]}: kiln pair median {k['median']*1e3:.1f} (user {k['user']*1e3:.1f}, sys {k['system']*1e3:.1f})"
for name in ("rbd snap create+rm", "rbd snap create --skip-quiesce+rm"):
    c = r[name]
    line += (f"; {name} median {c['median']*1e3:.1f} (user {c['user']*1e3:.1f}, sys "
             f"{c['system']*1e3:.1f}), kiln/it = {k['median']/c['median']:.2f}")
print(line)
PY
done
echo "JSON and perf output in $OUT_DIR"
