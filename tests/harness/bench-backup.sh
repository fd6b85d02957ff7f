#!/bin/bash
# tests/harness/bench-backup.sh rbd|file [RUNS]
#
# kiln's backups against the backend's own bulk-copy primitive, same volume, same target
# filesystem, same run (docs/benchmarks.md, "Backups"):
#   setup  rbd:  a throw-away Ceph cluster (tests/harness/ceph-start.sh in a fresh temp dir,
#                as rbd-suite.sh and bench-rbd-process.sh do; its memstore OSD holds the
#                data in RAM: CEPH_MEMSTORE_BYTES, default three times the volume);
#          file: a loop-mounted XFS with reflink (as bench-file.sh does), raw format;
#          or an existing setup: BENCH_CONFIG=kiln.toml BENCH_BACKEND=NAME (for rbd,
#          CEPH_CONF names the cluster the rbd CLI talks to);
#   one volume of SIZE_GIB (default 4) GiB filled with incompressible data through the
#   backend's own tool (rbd: `rbd import-diff` of a stream of /dev/urandom-like bytes; file:
#   dd from /dev/urandom into the volume file) and one kiln snapshot of it, then, RUNS times
#   each (default 3; the two sides alternate which goes first), medians:
#   (a) full backup: `kiln --format json backup create VOL --target dir:T --snapshot SNAP`
#       vs. the primitive copying the same snapshot to a file in T and fsyncing it
#       (`rbd export IMG@SNAP T/f && sync T/f`; file: `dd if=SNAPFILE of=T/f bs=4M
#       conv=fsync`);
#   (b) restore: `kiln backup restore ID --backend B` (a new volume) vs. the primitive
#       writing that raw copy into a new image/file (`rbd import T/f POOL/IMG`; file: dd
#       with conv=fsync into the backend's filesystem);
#   (c) incremental: 1% of the volume rewritten in 4 KiB..1 MiB pieces spread evenly over
#       it (same tool as the fill), then `kiln backup create VOL --target dir:T
#       --incremental`: its stream.read_bytes / volume size, and its time (rbd: next to
#       `rbd export-diff --from-snap` of the same two snapshots to a file in T, fsynced).
# Prints the machine, then a table (seconds, MB/s = 10^6 bytes/s of the volume's data,
# kiln/primitive throughput ratio, every run's time; each also goes to stderr as it is
# measured). Everything it made (cluster, mount, files, volumes) is removed on exit, also
# on failure or Ctrl-C; it kills nothing it did not start.
# Knobs: SIZE_GIB, BENCH_DIR (parent of the work dir and the backup target; default
# /var/tmp), KILN_BIN (a kiln built with --features rbd; default: cargo build --release
# -p kiln --features rbd, honouring CARGO_TARGET_DIR), BENCH_STRACE=1 (adds one
# `strace -c -f` summary of a full backup and of a restore).
# Needs: root for the XFS mount (file), the Ceph packages of ceph-start.sh (rbd), python3.
set -euo pipefail

usage() { echo "usage: $0 rbd|file [RUNS]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
MODE=$1
RUNS=${2:-3}
case "$MODE" in rbd|file) ;; *) usage ;; esac
case "$RUNS" in ''|*[!0-9]*|0) usage ;; esac
SIZE_GIB=${SIZE_GIB:-4}
case "$SIZE_GIB" in ''|*[!0-9]*|0) echo "bench-backup: SIZE_GIB must be a whole number" >&2; exit 2 ;; esac
SIZE=$((SIZE_GIB << 30))

HERE=$(dirname "$(realpath "$0")")
ROOT=$(realpath "$HERE/../..")
PY=/usr/bin/python3
for c in "$PY" dd sync awk; do
    command -v "$c" >/dev/null || { echo "bench-backup: $c is missing" >&2; exit 2; }
done
if [ "$MODE" = rbd ]; then
    command -v rbd >/dev/null || { echo "bench-backup: rbd is missing" >&2; exit 2; }
fi

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/kiln-bench-backup.XXXXXX")
TARGET=$WORK/target
CEPH_DIR=
MOUNTED=
K=()
RBD=()
PRIM_DST=
cleanup() {
    set +e
    # Every volume in this run's private store is the run's own (the filled one, a restore
    # interrupted part-way): removed, so a backend given with BENCH_CONFIG keeps nothing.
    if [ ${#K[@]} -gt 0 ] && [ -d "$WORK/data" ]; then
        "${K[@]}" volume list 2>/dev/null | "$PY" -c 'import json, sys
for v in json.load(sys.stdin):
    print(v["id"])' 2>/dev/null | while read -r id; do
            "${K[@]}" volume delete "$id" --cascade >/dev/null 2>&1
        done
    fi
    if [ -n "$PRIM_DST" ]; then
        if [ "$MODE" = rbd ]; then "${RBD[@]}" rm "$PRIM_DST" >/dev/null 2>&1; else rm -f "$PRIM_DST"; fi
    fi
    if [ -n "$MOUNTED" ]; then
        umount "$MOUNTED" 2>/dev/null || umount -l "$MOUNTED"
    fi
    if [ -n "$CEPH_DIR" ] && [ -d "$CEPH_DIR" ]; then
        "$HERE/ceph-stop.sh" "$CEPH_DIR" --purge >&2
    fi
    rm -rf "${WORK:?}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$TARGET"

log() { echo "== $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
# field JSON PATH: one value of a JSON document (PATH like stream.read_bytes).
field() {
    "$PY" -c 'import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2].split("."):
    v = v[k]
print(v)' "$1" "$2"
}

if [ -n "${KILN_BIN:-}" ]; then
    cp "$KILN_BIN" "$WORK/kiln"
else
    log "building kiln (release, --features rbd)"
    (cd "$ROOT" && cargo build --release -p kiln --features rbd >&2)
    cp "${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln" "$WORK/kiln"
fi

# --- the backend ---------------------------------------------------------------------
if [ -n "${BENCH_CONFIG:-}" ]; then
    CONFIG=$(realpath "$BENCH_CONFIG")
    BACKEND=${BENCH_BACKEND:?BENCH_BACKEND names the backend of BENCH_CONFIG}
    if [ "$MODE" = rbd ]; then
        : "${CEPH_CONF:?CEPH_CONF must name the cluster of BENCH_CONFIG}"
    fi
else
    CONFIG=$WORK/kiln.toml
    if [ "$MODE" = rbd ]; then
        BACKEND=ceph
        CEPH_DIR=$WORK/ceph
        mkdir -p "$CEPH_DIR"
        # Two copies of the volume (source and a restore) plus the rewrite's clones.
        export CEPH_MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-$((SIZE * 3))}
        log "starting a Ceph cluster in $CEPH_DIR (memstore $CEPH_MEMSTORE_BYTES bytes)"
        ENV_LINE=$("$HERE/ceph-start.sh" "$CEPH_DIR")
        case "$ENV_LINE" in
            "export CEPH_CONF="*) export CEPH_CONF="${ENV_LINE#export CEPH_CONF=}" ;;
            *) echo "bench-backup: unexpected output from ceph-start.sh: $ENV_LINE" >&2; exit 1 ;;
        esac
        printf 'default_backend = "ceph"\n\n[backends.ceph]\ndriver = "rbd"\nceph_conf = "%s"\npool = "rbd"\n' \
            "$CEPH_CONF" >"$CONFIG"
    else
        BACKEND=raw
        mkdir "$WORK/xfs"
        # Sparse: holds the volume, its snapshot's shared blocks, one restored copy.
        truncate -s $((SIZE * 4)) "$WORK/xfs.img"
        mkfs.xfs -q -m reflink=1 "$WORK/xfs.img"
        # discard: space freed in the XFS (deleted restores) is freed in its backing file too.
        mount -o loop,discard "$WORK/xfs.img" "$WORK/xfs"
        MOUNTED=$WORK/xfs
        printf 'default_backend = "raw"\n\n[backends.raw]\ndriver = "file"\npath = "%s"\nformat = "raw"\n' \
            "$WORK/xfs/vols" >"$CONFIG"
    fi
fi
K=("$WORK/kiln" --data-dir "$WORK/data" --config "$CONFIG" --format json)
RBD=(rbd --no-progress)
[ "$MODE" = rbd ] && RBD+=(--conf "$CEPH_CONF")

# The target holds a backup and the primitive's copy at once; a loop-mounted XFS on the
# same filesystem grows by the volume and one restored copy.
need=$((SIZE * 2 + (1 << 30)))
[ -n "$MOUNTED" ] && need=$((need + SIZE * 2))
avail=$(($(df --output=avail -B1 "$TARGET" | tail -n 1)))
if [ "$avail" -lt "$need" ]; then
    echo "bench-backup: $TARGET has $avail bytes free; this run needs about $need" >&2
    exit 1
fi

# --- the machine -----------------------------------------------------------------------
dev=$(df --output=source "$TARGET" | tail -n 1)
echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM, kernel $(uname -r)"
echo "target:  $TARGET on $dev ($(df --output=fstype "$TARGET" | tail -n 1); rotational=$(lsblk -dno ROTA "$dev" 2>/dev/null | tr -d ' ' || echo '?'))"
echo "backend: $BACKEND ($MODE), volume ${SIZE_GIB} GiB; load $(cut -d' ' -f1-3 /proc/loadavg)"

# --- the volume, filled ---------------------------------------------------------------
out=$("${K[@]}" volume create --size "${SIZE_GIB}G" --backend "$BACKEND" --name bench-backup)
VID=$(field "$out" id)
LOC=$(field "$out" provider_location)
if [ "$MODE" = file ] && { [ ! -f "$LOC" ] || [ "$(basename "$LOC")" != "volume-$VID" ]; }; then
    echo "bench-backup: $BACKEND is not a raw file backend (volume at $LOC)" >&2
    exit 1
fi
log "volume $VID at $LOC: filling $SIZE_GIB GiB"
t0=$(now)
if [ "$MODE" = rbd ]; then
    # An rbd diff v1 stream (header, w records of 4 MiB random bytes, end) on a pipe.
    "$PY" - "$SIZE" <<'PY' | "${RBD[@]}" import-diff - "$LOC"
import os, struct, sys
size, step = int(sys.argv[1]), 4 << 20
out = sys.stdout.buffer
out.write(b"rbd diff v1\n")
for off in range(0, size, step):
    n = min(step, size - off)
    out.write(b"w" + struct.pack("<QQ", off, n) + os.urandom(n))
out.write(b"e")
PY
else
    dd if=/dev/urandom of="$LOC" bs=4M count=$((SIZE >> 22)) conv=notrunc,fsync status=none
fi
echo "fill:    $(since "$t0") s"
out=$("${K[@]}" snapshot create "$VID" --name bench-base)
SID=$(field "$out" id)
SLOC=$(field "$out" provider_location)   # rbd: POOL/IMG@SNAP; file: the snapshot file
POOL=${LOC%%/*}

# --- (a) full backup vs. the primitive's copy ------------------------------------------
declare -a KA=() PA=() KB=() PB=()
BID=
PRIM=$TARGET/primitive.raw
kiln_full() {
    local t0 out
    [ -z "$BID" ] || "${K[@]}" backup delete "$BID" >/dev/null
    t0=$(now)
    out=$("${K[@]}" backup create "$VID" --target "dir:$TARGET" --snapshot "$SID")
    KA+=("$(since "$t0")")
    log "kiln backup create: ${KA[-1]} s"
    BID=$(field "$out" id)
    FULL_READ=$(field "$out" stream.read_bytes)
}
prim_full() {
    local t0
    rm -f "$PRIM"
    t0=$(now)
    if [ "$MODE" = rbd ]; then
        "${RBD[@]}" export "$SLOC" "$PRIM" >/dev/null
        sync "$PRIM"
    else
        dd if="$SLOC" of="$PRIM" bs=4M conv=fsync status=none
    fi
    PA+=("$(since "$t0")")
    log "primitive copy: ${PA[-1]} s"
}
for ((i = 1; i <= RUNS; i++)); do
    log "full backup, run $i/$RUNS"
    if ((i % 2)); then kiln_full; prim_full; else prim_full; kiln_full; fi
done

# --- (b) restore vs. the primitive's import -------------------------------------------
# After a delete, before the next run: on the loop-mounted XFS, syncfs finishes XFS's
# deferred inode frees and issues the discards that punch the freed blocks out of its
# backing file (else two 4 GiB copies pile up in the host filesystem).
settle() {
    if [ -n "$MOUNTED" ]; then sync -f "$MOUNTED"; fi
}
kiln_restore() {
    local t0 out
    t0=$(now)
    out=$("${K[@]}" backup restore "$BID" --backend "$BACKEND")
    KB+=("$(since "$t0")")
    log "kiln backup restore: ${KB[-1]} s"
    "${K[@]}" volume delete "$(field "$out" id)" >/dev/null
    settle
}
prim_restore() {
    local t0 dst
    if [ "$MODE" = rbd ]; then
        dst=$POOL/bench-import-$$
        PRIM_DST=$dst
        t0=$(now)
        "${RBD[@]}" import "$PRIM" "$dst" >/dev/null
        PB+=("$(since "$t0")")
        log "rbd import: ${PB[-1]} s"
        "${RBD[@]}" rm "$dst" >/dev/null 2>&1
    else
        dst=$(dirname "$LOC")/bench-import-$$.raw
        PRIM_DST=$dst
        t0=$(now)
        dd if="$PRIM" of="$dst" bs=4M conv=fsync status=none
        PB+=("$(since "$t0")")
        log "dd into the backend's filesystem: ${PB[-1]} s"
        rm -f "$dst"
        settle
    fi
}
for ((i = 1; i <= RUNS; i++)); do
    log "restore, run $i/$RUNS"
    if ((i % 2)); then kiln_restore; prim_restore; else prim_restore; kiln_restore; fi
done

if [ "${BENCH_STRACE:-0}" = 1 ] && command -v strace >/dev/null; then
    log "strace -c -f of one full backup and one restore (not timed)"
    "${K[@]}" backup delete "$BID" >/dev/null
    strace -c -f -o "$WORK/strace-backup.txt" "${K[@]}" backup create "$VID" --target "dir:$TARGET" --snapshot "$SID" >"$WORK/b.json"
    BID=$(field "$(cat "$WORK/b.json")" id)
    strace -c -f -o "$WORK/strace-restore.txt" "${K[@]}" backup restore "$BID" --backend "$BACKEND" >"$WORK/r.json"
    "${K[@]}" volume delete "$(field "$(cat "$WORK/r.json")" id)" >/dev/null
    settle
    for f in backup restore; do
        echo "--- strace -c -f: $f (top 12 by time)"
        head -n 14 "$WORK/strace-$f.txt"
    done
fi
rm -f "$PRIM"

# --- (c) incremental after a 1% rewrite -----------------------------------------------
REWRITE=$(((SIZE / 100 + 4095) / 4096 * 4096))
log "rewriting $REWRITE bytes in 4 KiB..1 MiB pieces spread over the volume"
# The pieces: tests/harness/rewrite_pieces.py (4 KiB..1 MiB each, spread evenly, fixed seed).
"$PY" "$HERE/rewrite_pieces.py" "$SIZE" "$REWRITE" >"$WORK/pieces"
"$PY" - "$MODE" "$LOC" "$WORK/rewrite.diff" "$WORK/pieces" <<'PY' >"$WORK/rewrite.out"
import os, struct, sys
mode, loc, diff = sys.argv[1], sys.argv[2], sys.argv[3]
pieces = [tuple(map(int, line.split())) for line in open(sys.argv[4])]
if mode == "rbd":
    with open(diff, "wb") as f:
        f.write(b"rbd diff v1\n")
        for off, n in pieces:
            f.write(b"w" + struct.pack("<QQ", off, n) + os.urandom(n))
        f.write(b"e")
else:
    fd = os.open(loc, os.O_WRONLY)
    for off, n in pieces:
        os.pwrite(fd, os.urandom(n), off)
    os.fsync(fd)
    os.close(fd)
print(len(pieces))
PY
if [ "$MODE" = rbd ]; then
    "${RBD[@]}" import-diff "$WORK/rewrite.diff" "$LOC"
    rm -f "$WORK/rewrite.diff"
fi
PIECES=$(cat "$WORK/rewrite.out")
t0=$(now)
out=$("${K[@]}" backup create "$VID" --target "dir:$TARGET" --incremental)
INC_T=$(since "$t0")
[ "$(field "$out" parent_id)" = "$BID" ] || { echo "bench-backup: the incremental does not build on $BID: $out" >&2; exit 1; }
INC_READ=$(field "$out" stream.read_bytes)
INC_DATA=$(field "$out" stream.data_bytes)
INC_STORED=$(field "$out" stored_bytes)
INC_SNAP=$(field "$out" snapshot_id)
ED_T=
if [ "$MODE" = rbd ]; then
    snap_loc=$(field "$("${K[@]}" snapshot show "$INC_SNAP")" provider_location)
    t0=$(now)
    "${RBD[@]}" export-diff --from-snap "${SLOC##*@}" "$snap_loc" "$TARGET/inc.diff" >/dev/null
    sync "$TARGET/inc.diff"
    ED_T=$(since "$t0")
    ED_BYTES=$(stat -c %s "$TARGET/inc.diff")
fi

# --- the table -------------------------------------------------------------------------
"$PY" - "$SIZE" "$MODE" "${KA[*]}" "${PA[*]}" "${KB[*]}" "${PB[*]}" "$FULL_READ" \
    "$REWRITE" "$PIECES" "$INC_T" "$INC_READ" "$INC_DATA" "$INC_STORED" "$ED_T" "${ED_BYTES:-}" <<'PY'
import statistics, sys
(size, mode, ka, pa, kb, pb, full_read, rewrite, pieces, inc_t, inc_read, inc_data,
 inc_stored, ed_t, ed_bytes) = sys.argv[1:]
size = int(size)
med = lambda s: statistics.median(float(x) for x in s.split())
mbs = lambda t: size / t / 1e6
prim = {"rbd": ("rbd export IMG@SNAP F && sync F", "rbd import F POOL/IMG"),
        "file": ("dd if=SNAP of=F bs=4M conv=fsync", "dd if=F of=XFS/IMG bs=4M conv=fsync")}[mode]
print()
print(f"{'operation':<22} {'kiln s':>8} {'kiln MB/s':>10} {'prim s':>8} {'prim MB/s':>10} {'kiln/prim':>10}  primitive (runs)")
for name, k, p, what in [("full backup", ka, pa, prim[0]), ("restore (new volume)", kb, pb, prim[1])]:
    mk, mp = med(k), med(p)
    print(f"{name:<22} {mk:>8.2f} {mbs(mk):>10.0f} {mp:>8.2f} {mbs(mp):>10.0f} {mp / mk:>10.2f}  {what} ({len(k.split())})")
    print(f"{'':<22} runs kiln {k}; primitive {p}")
print(f"full backup read {int(full_read)} bytes ({int(full_read) / size:.1%} of the volume)")
ir = int(inc_read)
print(f"incremental after rewriting {int(rewrite)} bytes ({int(rewrite) / size:.2%}) in {pieces} pieces: "
      f"{float(inc_t):.2f} s, read_bytes {ir} = {ir / size:.2%} of the volume (target <= 3%), "
      f"data_bytes {int(inc_data)}, stored {int(inc_stored)}")
if ed_t:
    print(f"  rbd export-diff --from-snap of the same snapshots: {float(ed_t):.2f} s, {int(ed_bytes)} bytes")
PY
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
