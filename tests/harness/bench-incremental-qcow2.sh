#!/bin/bash
# tests/harness/bench-incremental-qcow2.sh — how many bytes an incremental backup of a qcow2
# volume reads from the backend after 1 % of the volume was rewritten (issue 10's target:
# at most 3 %), the qcow2 counterpart of part (c) of tests/harness/bench-backup.sh.
#
#   a file backend (format qcow2) in a temp directory, one volume of SIZE_GIB (default 4)
#   GiB filled with incompressible data through kiln (`kiln volume import-diff` of an rbd
#   diff v1 stream of random bytes), a full `kiln backup create --target dir:T`, then the
#   pieces of tests/harness/rewrite_pieces.py (1 % of the volume in 4 KiB..1 MiB pieces,
#   the same places as bench-backup.sh) written through kiln the same way, and `kiln backup
#   create --incremental`: its stream.read_bytes against the volume's size, and its time.
#
# Usage: tests/harness/bench-incremental-qcow2.sh
# Environment: SIZE_GIB (default 4); KILN_BIN (a kiln binary; default: cargo build --release);
#   BENCH_DIR (default /var/tmp): where the temp directory goes (about 3 x SIZE_GIB GiB).
# Prints the figures; everything it made is removed on exit, also on failure or Ctrl-C.
set -euo pipefail

SIZE_GIB=${SIZE_GIB:-4}
case "$SIZE_GIB" in ''|*[!0-9]*|0) echo "bench-incremental-qcow2: SIZE_GIB must be a whole number" >&2; exit 2 ;; esac
SIZE=$((SIZE_GIB << 30))
HERE=$(dirname "$(realpath "$0")")
ROOT=$(realpath "$HERE/../..")
PY=/usr/bin/python3
for c in "$PY" qemu-img qemu-nbd jq; do
    command -v "$c" >/dev/null || { echo "bench-incremental-qcow2: $c is missing" >&2; exit 2; }
done
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/kiln-bench-inc-qcow2.XXXXXX")
K=()
cleanup() {
    set +e
    if [ ${#K[@]} -gt 0 ]; then
        for id in $("${K[@]}" volume list 2>/dev/null | jq -r '.[].id'); do
            "${K[@]}" volume delete "$id" --cascade >/dev/null 2>&1
        done
    fi
    rm -rf "${WORK:?}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
log() { echo "== $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }

if [ -n "${KILN_BIN:-}" ]; then
    kiln=$(realpath -e -- "$KILN_BIN")
else
    log "building kiln (release)"
    (cd "$ROOT" && cargo build --release -p kiln >&2)
    kiln=${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln
fi
printf 'default_backend = "qcow"\n\n[backends.qcow]\ndriver = "file"\npath = "%s"\nformat = "qcow2"\n' \
    "$WORK/vols" >"$WORK/kiln.toml"
mkdir "$WORK/target"
K=("$kiln" --data-dir "$WORK/data" --config "$WORK/kiln.toml" --format json)

# stream [PIECES_FILE]: an rbd diff v1 stream on stdout: random bytes in 4 MiB records over
# the whole volume, or in the given "offset length" pieces.
stream() {
    "$PY" - "$SIZE" "$@" <<'PY'
import os, struct, sys
size = int(sys.argv[1])
if len(sys.argv) > 2:
    pieces = [tuple(map(int, line.split())) for line in open(sys.argv[2])]
else:
    step = 4 << 20
    pieces = [(off, min(step, size - off)) for off in range(0, size, step)]
out = sys.stdout.buffer
out.write(b"rbd diff v1\n" + b"s" + struct.pack("<Q", size))
for off, n in pieces:
    out.write(b"w" + struct.pack("<QQ", off, n) + os.urandom(n))
out.write(b"e")
PY
}

echo "machine: $(nproc) CPUs, kernel $(uname -r); $(qemu-img --version | head -n 1); load $(cut -d' ' -f1-3 /proc/loadavg)"
VID=$("${K[@]}" volume create --size "${SIZE_GIB}G" --name bench-inc | jq -r .id)
log "volume $VID: filling $SIZE_GIB GiB through kiln"
t0=$(now)
stream | "${K[@]}" volume import-diff "$VID" --input - >/dev/null
echo "fill: $(since "$t0") s"
t0=$(now)
full=$("${K[@]}" backup create "$VID" --target "dir:$WORK/target")
echo "full backup: $(since "$t0") s, read_bytes $(jq .stream.read_bytes <<<"$full")"
REWRITE=$(((SIZE / 100 + 4095) / 4096 * 4096))
"$PY" "$HERE/rewrite_pieces.py" "$SIZE" "$REWRITE" >"$WORK/pieces"
log "rewriting $REWRITE bytes in $(wc -l <"$WORK/pieces") pieces through kiln"
stream "$WORK/pieces" | "${K[@]}" volume import-diff "$VID" --input - >/dev/null
t0=$(now)
inc=$("${K[@]}" backup create "$VID" --target "dir:$WORK/target" --incremental)
t=$(since "$t0")
[ "$(jq -r .parent_id <<<"$inc")" = "$(jq -r .id <<<"$full")" ] ||
    { echo "bench-incremental-qcow2: the incremental does not build on the full backup: $inc" >&2; exit 1; }
read -r rb db zb <<<"$(jq -r '"\(.stream.read_bytes) \(.stream.data_bytes) \(.stream.zero_bytes)"' <<<"$inc")"
"$PY" - "$SIZE" "$REWRITE" "$(wc -l <"$WORK/pieces")" "$t" "$rb" "$db" "$zb" <<'PY'
import sys
size, rewrite, pieces, t, rb, db, zb = sys.argv[1:]
size, rewrite, rb = int(size), int(rewrite), int(rb)
print(f"incremental after rewriting {rewrite} bytes ({rewrite / size:.2%}) in {pieces} pieces: {t} s, "
      f"read_bytes {rb} = {rb / size:.2%} of the volume (target <= 3%), data_bytes {db}, zero_bytes {zb}")
PY
