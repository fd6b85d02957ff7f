#!/usr/bin/env bash
# Benchmarks the file backend in both modes with `kiln bench snapshot` (release build):
# raw+reflink on a real loop-mounted XFS and qcow2 on a plain directory, each on empty
# sparse volumes of 1 GiB and 16 GiB and on a 1 GiB / 16 GiB volume holding data.
# Prints one JSON document per run on stdout (labelled on stderr). Needs root, xfsprogs,
# qemu-utils. Usage: tests/harness/bench-file.sh [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/../.."
iterations=${1:-30}
cargo build --release --quiet
kiln=$PWD/target/release/kiln
work=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
cleanup() { umount -l "$work/xfs" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir "$work/xfs"
truncate -s 40G "$work/xfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
mount -o loop "$work/xfs.img" "$work/xfs"
cat >"$work/kiln.toml" <<TOML
default_backend = "raw"
[backends.raw]
driver = "file"
path = "$work/xfs/vols"
format = "raw"
[backends.qcow]
driver = "file"
path = "$work/qcow"
format = "qcow2"
TOML
k() { "$kiln" --data-dir "$work/data" --config "$work/kiln.toml" --format json "$@"; }
field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# Fills a volume with data: 64 MiB every 256 MiB, so the image has many extents.
fill() {
  local backend=$1 id=$2 size_mib=$3 loc active
  loc=$(k volume show "$id" | field provider_location)
  for ((off = 0; off < size_mib; off += 256)); do
    if [ "$backend" = raw ]; then
      dd if=/dev/urandom of="$loc" bs=1M count=64 seek="$off" conv=notrunc status=none
    else
      active=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["active"])' "$loc")
      qemu-io -f qcow2 -c "write -P 0x5a ${off}M 64M" "$(dirname "$loc")/$active" >/dev/null
    fi
  done
}

for backend in raw qcow; do
  for size in 1G 16G; do
    echo "== $backend empty $size" >&2
    k bench snapshot --backend "$backend" --size "$size" --iterations "$iterations"
  done
  for size_mib in 1024 16384; do
    echo "== $backend with data ${size_mib}M" >&2
    id=$(k volume create --backend "$backend" --size "${size_mib}M" | field id)
    fill "$backend" "$id" "$size_mib"
    k bench snapshot --volume "$id" --iterations "$iterations"
    k volume delete "$id" --cascade >/dev/null
  done
done
