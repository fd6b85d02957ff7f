#!/usr/bin/env bash
# bench-lvm.sh — kiln's snapshot create/delete on LVM (thin and thick) against the bare
# `lvcreate --snapshot` + `lvremove -f` primitive, measured in the same run by
# `kiln bench snapshot`, inside a user-mode-Linux guest with real device-mapper.
#
# Usage: tests/harness/bench-lvm.sh [OUTDIR]
#   OUTDIR (default $CARGO_TARGET_DIR/bench-lvm or target/bench-lvm) receives one JSON report
#   per case (thin-1G.json, thin-16G.json, thick-1G.json, thick-16G.json), kernel.txt, and
#   summary.md (the table for docs/benchmarks.md, section LVM).
# Environment: BENCH_ITERATIONS (default 20), BENCH_CASES (default "thin:1G thin:16G thick:1G
#   thick:16G"), KILN_UML_ARGS (default "--mem 2G --timeout 5400").
#
# Builds `kiln` in release mode on the host. The guest gets one sparse 48 GiB scratch disk
# (only metadata is ever written, so it costs almost nothing on the host): a VG on it with an
# 8 GiB thin pool (thin volumes are not written, so the pool's size does not matter), and room
# for a 16 GiB thick origin plus a 100 % COW snapshot (16 GiB + 1/64).
# The thick backend runs with zero_deleted_thick_snapshots/volumes = false: with them on,
# every delete first writes zeros over the whole COW store (16 GiB per iteration at 16G),
# which measures the disk, not kiln's snapshot path. That cost is real and documented.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)

if [ "${1:-}" = --in-guest ]; then
  out=$2 kiln=$3 iterations=$4
  shift 4
  disk=${KILN_UML_DISKS%% *}
  [ -b "$disk" ] || { echo "bench-lvm(guest): no scratch disk" >&2; exit 1; }
  vg=kiln-bench
  uname -r >"$out/kernel.txt"
  nproc >"$out/guest-nproc.txt"
  vgcreate -q "$vg" "$disk"
  lvcreate -q --type thin-pool -Zy -L 8g -n pool "$vg"
  cfg=/tmp/kiln-bench.toml
  cat >"$cfg" <<EOF
default_backend = "thin"

[backends.thin]
driver = "lvm"
volume_group = "$vg"
type = "thin"
thin_pool = "pool"

[backends.thick]
driver = "lvm"
volume_group = "$vg"
type = "thick"
thick_snapshot_percent = 100
zero_deleted_thick_snapshots = false
zero_deleted_thick_volumes = false
EOF
  for c in "$@"; do
    backend=${c%%:*} size=${c#*:}
    echo "bench-lvm(guest): $backend $size, $iterations iterations" >&2
    start=$(date +%s)
    "$kiln" --data-dir /tmp/kiln-data --config "$cfg" --format json \
      bench snapshot --backend "$backend" --size "$size" --iterations "$iterations" \
      >"$out/$backend-$size.json"
    echo "bench-lvm(guest): $backend $size done in $(($(date +%s) - start)) s" >&2
  done
  lvs -a "$vg" >&2
  exit 0
fi

target=${CARGO_TARGET_DIR:-$root/target}
out=${1:-$target/bench-lvm}
mkdir -p "$out"
out=$(cd "$out" && pwd -P)
iterations=${BENCH_ITERATIONS:-20}
read -r -a cases <<<"${BENCH_CASES:-thin:1G thin:16G thick:1G thick:16G}"
read -r -a uml_args <<<"${KILN_UML_ARGS:---mem 2G --timeout 5400}"

echo "bench-lvm: building kiln (release) on the host" >&2
(cd "$root" && cargo build --release -p kiln)
kiln=$target/release/kiln
[ -x "$kiln" ] || { echo "bench-lvm: $kiln missing after the build" >&2; exit 1; }

{
  echo "host: $(uname -srm), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out/host.txt"
start=$(date +%s)
"$here/uml-run.sh" "${uml_args[@]}" --disk 48G --rw "$out" -- \
  "$here/bench-lvm.sh" --in-guest "$out" "$kiln" "$iterations" "${cases[@]}"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); guest run took $(($(date +%s) - start)) s" >>"$out/host.txt"

# Summary table: medians and p90 in ms, kiln/primitive ratios of the medians.
{
  cat "$out/host.txt"
  echo "guest kernel: $(cat "$out/kernel.txt") (UML, $(cat "$out/guest-nproc.txt") CPU)"
  echo
  echo "| backend | size | kiln create median / p90 | primitive create median / p90 | create ratio | kiln delete median / p90 | primitive delete median / p90 | delete ratio |"
  echo "|---|---|---|---|---|---|---|---|"
  for c in "${cases[@]}"; do
    f="$out/${c%%:*}-${c#*:}.json"
    jq -r --arg b "${c%%:*}" --arg s "${c#*:}" '
      def r: . * 10 | round / 10;
      "| \($b) | \($s) | \(.create_ms.median|r) / \(.create_ms.p90|r) | \(.primitive_ms.median|r) / \(.primitive_ms.p90|r) | \(.create_ms.median / .primitive_ms.median * 100 | round / 100) | \(.delete_ms.median|r) / \(.delete_ms.p90|r) | \(.primitive_delete_ms.median|r) / \(.primitive_delete_ms.p90|r) | \(.delete_ms.median / .primitive_delete_ms.median * 100 | round / 100) |"' "$f"
  done
} >"$out/summary.md"
cat "$out/summary.md"
