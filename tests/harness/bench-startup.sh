#!/usr/bin/env bash
# bench-startup.sh — what one whole `kiln` command costs on raw+reflink, start-up included.
#
# On a fresh loop-mounted XFS (reflink) it measures, in one run:
#   1. fsync-family calls of one whole `kiln snapshot create` process (strace -f -c);
#   2. whole processes with hyperfine: `kiln --version` (start-up alone), `kiln snapshot
#      create` alone, and a create+delete pair, against the durable primitive as a whole
#      process (examples/ficlone_durable.rs: FICLONE into a temp file + fsync + rename +
#      directory fsync; removal: unlink + directory fsync). Both sides of a pair run inside
#      `sh -c`, so both pay the same shell.
# Needs root (loop mount), xfsprogs, strace, hyperfine. Prints a summary; JSON in $OUT_DIR.
# Usage: tests/harness/bench-startup.sh [RUNS]   (default 50). Honours CARGO_TARGET_DIR.
set -euo pipefail
runs=${1:-50}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
cd "$root"
for c in mkfs.xfs strace hyperfine; do
  command -v "$c" >/dev/null || { echo "bench-startup: $c is missing (apt-get install xfsprogs strace hyperfine)" >&2; exit 2; }
done
cargo build --release --bin kiln --example ficlone_durable >&2
tdir=${CARGO_TARGET_DIR:-$root/target}
kiln_bin=$tdir/release/kiln
prim=$tdir/release/examples/ficlone_durable

work=$(mktemp -d /tmp/kiln-bench-startup.XXXXXX)
OUT_DIR=${OUT_DIR:-$work}
cleanup() { umount -l "$work/mnt" 2>/dev/null || true; rm -rf "$work/fs.img" "$work/data"; }
trap cleanup EXIT
truncate -s 4G "$work/fs.img"
mkfs.xfs -q -m reflink=1 "$work/fs.img"
mkdir -p "$work/mnt"
mount -o loop "$work/fs.img" "$work/mnt"
cat >"$work/kiln.toml" <<CFG
[backends.raw]
driver = "file"
path = "$work/mnt/vols"
format = "raw"
CFG
k() { "$kiln_bin" --data-dir "$work/data" --config "$work/kiln.toml" "$@"; }
vid=$(k --format json volume create --size 1G | sed -n 's/^  "id": "\(.*\)",$/\1/p')
src=$work/mnt/vols/volume-$vid
# Some data, so FICLONE has extents to share (as a used volume would).
dd if=/dev/urandom of="$src" bs=1M count=64 conv=notrunc,fsync status=none

echo "== fsyncs in one whole 'kiln snapshot create' process"
strace -f -c -o "$work/strace.txt" -e trace=fsync,fdatasync,sync_file_range,syncfs \
  "$kiln_bin" --data-dir "$work/data" --config "$work/kiln.toml" snapshot create "$vid" >/dev/null
cat "$work/strace.txt"

echo "== whole processes ($runs runs each)"
hyperfine -N --warmup 5 --runs "$runs" --export-json "$OUT_DIR/version.json" \
  "$kiln_bin --version"
n=0
hyperfine -N --warmup 3 --runs "$runs" --export-json "$OUT_DIR/create.json" \
  -n "kiln snapshot create" "$kiln_bin --data-dir $work/data --config $work/kiln.toml snapshot create $vid" \
  -n "durable FICLONE primitive" --prepare "rm -f $work/mnt/vols/prim-snap" "$prim $src $work/mnt/vols/prim-snap"
hyperfine --warmup 3 --runs "$runs" --export-json "$OUT_DIR/pair.json" \
  -n "kiln create+delete" "id=\$($kiln_bin --format json --data-dir $work/data --config $work/kiln.toml snapshot create $vid | sed -n 's/^  \"id\": \"\\(.*\\)\",\$/\\1/p'); $kiln_bin --data-dir $work/data --config $work/kiln.toml snapshot delete \$id >/dev/null" \
  -n "primitive create+remove" "$prim $src $work/mnt/vols/prim-snap && $prim --rm $work/mnt/vols/prim-snap"
echo "JSON results in $OUT_DIR"
