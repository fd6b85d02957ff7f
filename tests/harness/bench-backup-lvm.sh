#!/usr/bin/env bash
# bench-backup-lvm.sh — kiln's backups of an LVM thin volume against dd, same snapshot, same
# target filesystem, same run, inside a user-mode-Linux guest with real device-mapper (the
# pattern of tests/harness/bench-lvm.sh: build on the host, run the measuring half of this
# script in the guest through tests/harness/uml-run.sh).
#
# Usage: tests/harness/bench-backup-lvm.sh [OUTDIR]
#   OUTDIR (default $CARGO_TARGET_DIR/bench-backup-lvm or target/bench-backup-lvm) receives
#   the raw timings (raw.txt, one "key value..." line each), the guest's facts (guest.txt),
#   the optional strace summaries, and summary.txt (the table, also printed).
# Environment:
#   SIZE_GIB (default 4)   the thin volume's size, filled with incompressible data
#                          (/dev/urandom) before the runs
#   RUNS (default 3)       runs per side; medians are reported; the sides alternate which
#                          goes first
#   BENCH_STRACE=1         adds one untimed `strace -c -w -f` (wall-clock time per syscall,
#                          all threads) of a full backup and of a restore
#   KILN_BIN               a kiln binary to use instead of building one (cargo build --release
#                          -p kiln, honouring CARGO_TARGET_DIR)
#   KILN_UML_ARGS          uml-run.sh options (default "--mem 2G --timeout 5400")
#   KILN_UML_RUNDIR        where uml-run.sh puts its run directory, which holds the two
#                          sparse scratch disks (default /tmp); it needs about 4 x SIZE_GIB
#                          GiB free (checked before the guest boots)
#
# In the guest: a VG on scratch disk 1 (/dev/ubda) with a thin pool of 2 x SIZE + 1 GiB
# (the volume and one restored copy; pool zeroing on, as kiln's tests use), an XFS on scratch
# disk 2 (/dev/ubdb) as the backup target, kiln with one backend `thin`. Both disks are sparse
# files on the host; freed space is handed back with fstrim and blkdiscard (UML's ubd punches
# holes in its backing file), so the host holds about one volume and one restore on disk 1
# and two copies on disk 2 at a time. The volume's snapshot is activated once and stays
# active for both sides (kiln does not activate or deactivate an active snapshot). Before
# every timed command the guest's page cache is dropped (sync; drop_caches): neither side
# reads the other's cached data in the guest (the host's page cache of the disk files is
# shared by both and left alone).
#   (a) full backup: `kiln --format json backup create VOL --target dir:T --snapshot SNAP`
#       vs `dd if=SNAPDEV of=T/dd.raw bs=4M conv=fsync`;
#   (b) restore: `kiln --format json backup restore ID --backend thin` (a new thin volume)
#       vs `dd if=T/dd.raw of=NEWLV bs=4M conv=fsync` into a thin LV made by lvcreate just
#       before (lvcreate not timed with dd; its time is shown: kiln's figure includes its
#       own lvcreate);
#   (c) 1% of the volume rewritten in 64 KiB pieces at 4 KiB-aligned random places, one per
#       equal slot of the volume (fixed seed), then `kiln backup create VOL --target dir:T
#       --incremental`: stream.read_bytes / size (target <= 3%) and its time.
# Everything it made is removed: the guest's VG, mount and files on exit of the guest part;
# on the host only OUTDIR's files remain (uml-run.sh removes its run directory and disks).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)

# ---------------------------------------------------------------------------------------
# The guest half.
if [ "${1:-}" = --in-guest ]; then
  [ $# -eq 5 ] || { echo "bench-backup-lvm(guest): bad arguments" >&2; exit 2; }
  out=$2 kiln=$3 size_gib=$4 runs=$5
  size=$((size_gib << 30))
  read -r -a disks <<<"${KILN_UML_DISKS:-}"
  [ ${#disks[@]} -ge 2 ] && [ -b "${disks[0]}" ] && [ -b "${disks[1]}" ] ||
    { echo "bench-backup-lvm(guest): needs two scratch disks, got '${KILN_UML_DISKS:-}'" >&2; exit 1; }
  pv=${disks[0]} tdisk=${disks[1]}
  vg=kiln-bbench
  work=$(mktemp -d /tmp/kiln-bbench.XXXXXX)
  tgt=$work/target
  made_vg='' mounted=''
  cleanup() {
    set +e
    if [ -n "$mounted" ]; then umount "$mounted"; fi
    if [ -n "$made_vg" ]; then vgremove -q -f "$vg" >/dev/null 2>&1; fi
    rm -rf -- "$work"
  }
  trap cleanup EXIT
  log() { echo "bench-backup-lvm(guest): $*" >&2; }
  now() { date +%s.%N; }
  since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
  dropcache() { sync; echo 3 >/proc/sys/vm/drop_caches; }
  # The device node libdm makes for vg/lv (no udev in the guest).
  mapper() { printf '/dev/mapper/%s-%s' "${1//-/--}" "${2//-/--}"; }
  raw() { echo "$*" >>"$out/raw.txt"; }
  # Hands the target's free space back to its disk (and the host file), if the disk can.
  trim() { fstrim "$tgt" 2>/dev/null || log "fstrim $tgt failed: freed space stays allocated"; }

  : >"$out/raw.txt"
  {
    echo "kernel $(uname -r) (user-mode Linux)"
    echo "cpus $(nproc)"
    echo "memory $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    for d in "$pv" "$tdisk"; do
      b=$(basename "$d")
      echo "disk $d $(($(cat "/sys/block/$b/size") * 512 >> 30)) GiB, discard_max_bytes $(cat "/sys/block/$b/queue/discard_max_bytes")"
    done
  } >"$out/guest.txt"

  vgcreate -q "$vg" "$pv" >/dev/null
  made_vg=1
  lvcreate -q --type thin-pool -Zy -L $((2 * size_gib + 1))g -n pool "$vg" >/dev/null
  chunk=$(lvs --noheadings --units b --nosuffix -o chunk_size "$vg/pool" | tr -d ' ')
  echo "thin pool $((2 * size_gib + 1)) GiB on $pv, chunk $chunk bytes, zeroing on, discards $(lvs --noheadings -o discards "$vg/pool" | tr -d ' ')" >>"$out/guest.txt"
  mkdir "$tgt"
  mkfs.xfs -q -f "$tdisk"
  mount "$tdisk" "$tgt"
  mounted=$tgt
  echo "target XFS on $tdisk at $tgt" >>"$out/guest.txt"
  cfg=$work/kiln.toml
  printf 'default_backend = "thin"\n\n[backends.thin]\ndriver = "lvm"\nvolume_group = "%s"\ntype = "thin"\nthin_pool = "pool"\n' \
    "$vg" >"$cfg"
  K=("$kiln" --data-dir "$work/data" --config "$cfg" --format json)

  v=$("${K[@]}" volume create --size "${size_gib}G" --backend thin --name bench-backup)
  vid=$(jq -r .id <<<"$v")
  vdev=$(mapper "$vg" "volume-$vid")
  log "filling $size_gib GiB of volume $vid from /dev/urandom"
  t0=$(now)
  dd if=/dev/urandom of="$vdev" bs=4M count=$((size >> 22)) conv=fsync status=none
  raw fill "$(since "$t0")"
  sid=$(jq -r .id <<<"$("${K[@]}" snapshot create "$vid" --name bench-base)")
  lvchange -q -ay -K "$vg/_snapshot-$sid"
  sdev=$(mapper "$vg" "_snapshot-$sid")
  [ "$(blockdev --getsize64 "$sdev")" = "$size" ] || { log "snapshot device is not $size bytes"; exit 1; }

  # kiln's fixed costs: a command that opens the store and the backend and reads nothing,
  # and a backup and a restore of a 4 MiB volume (the lvm commands around the data path).
  small=$(jq -r .id <<<"$("${K[@]}" volume create --size 4M --backend thin --name bench-small)")
  small_sid=$(jq -r .id <<<"$("${K[@]}" snapshot create "$small")")
  # Active like the big snapshot, so neither figure includes kiln activating it.
  lvchange -q -ay -K "$vg/_snapshot-$small_sid"
  for ((i = 1; i <= runs; i++)); do
    t0=$(now)
    "${K[@]}" volume show "$vid" >/dev/null
    raw startup "$(since "$t0")"
    t0=$(now)
    o=$("${K[@]}" backup create "$small" --target "dir:$tgt" --snapshot "$small_sid")
    raw small_backup "$(since "$t0")"
    t0=$(now)
    o=$("${K[@]}" backup restore "$(jq -r .id <<<"$o")" --backend thin)
    raw small_restore "$(since "$t0")"
    "${K[@]}" volume delete "$(jq -r .id <<<"$o")" >/dev/null
  done
  for b in $("${K[@]}" backup list --volume "$small" | jq -r '.[].id'); do
    "${K[@]}" backup delete "$b" >/dev/null
  done
  "${K[@]}" volume delete "$small" --cascade >/dev/null

  # --- (a) full backup vs dd of the same snapshot into the same filesystem
  bid=''
  kiln_full() {
    local t0 o
    if [ -n "$bid" ]; then "${K[@]}" backup delete "$bid" >/dev/null; trim; fi
    dropcache
    t0=$(now)
    o=$("${K[@]}" backup create "$vid" --target "dir:$tgt" --snapshot "$sid")
    raw kiln_full "$(since "$t0")"
    bid=$(jq -r .id <<<"$o")
    raw full_stream "$(jq -r '"\(.stream.read_bytes) \(.stream.data_bytes) \(.stored_bytes)"' <<<"$o")"
  }
  dd_full() {
    local t0
    if [ -e "$tgt/dd.raw" ]; then rm -f -- "$tgt/dd.raw"; trim; fi
    dropcache
    t0=$(now)
    dd if="$sdev" of="$tgt/dd.raw" bs=4M conv=fsync status=none
    raw dd_full "$(since "$t0")"
  }
  for ((i = 1; i <= runs; i++)); do
    log "full backup, run $i/$runs"
    if ((i % 2)); then kiln_full; dd_full; else dd_full; kiln_full; fi
  done

  # --- (b) restore into a new thin volume vs dd into a new thin LV
  kiln_restore() {
    local t0 o nid
    dropcache
    t0=$(now)
    o=$("${K[@]}" backup restore "$bid" --backend thin)
    raw kiln_restore "$(since "$t0")"
    nid=$(jq -r .id <<<"$o")
    # Hand the pool chunks back to the disk (and the host file) before the LV goes.
    blkdiscard "$(mapper "$vg" "volume-$nid")"
    "${K[@]}" volume delete "$nid" >/dev/null
  }
  dd_restore() {
    local t0 lv=bench-dd-restore
    t0=$(now)
    # Over-provisioned (volume, snapshot and this LV exceed the pool): lvm warns on stderr.
    lvcreate -q --yes -T "$vg/pool" -V "${size}b" -n "$lv" >/dev/null 2>"$work/lvcreate.err" ||
      { cat "$work/lvcreate.err" >&2; exit 1; }
    raw lvcreate "$(since "$t0")"
    dropcache
    t0=$(now)
    dd if="$tgt/dd.raw" of="$(mapper "$vg" "$lv")" bs=4M conv=fsync status=none
    raw dd_restore "$(since "$t0")"
    blkdiscard "$(mapper "$vg" "$lv")"
    lvremove -q -f "$vg/$lv" >/dev/null
  }
  for ((i = 1; i <= runs; i++)); do
    log "restore, run $i/$runs"
    if ((i % 2)); then kiln_restore; dd_restore; else dd_restore; kiln_restore; fi
  done

  if [ "${BENCH_STRACE:-0}" = 1 ]; then
    log "strace -c -w -f of one full backup and one restore (not timed)"
    "${K[@]}" backup delete "$bid" >/dev/null
    trim
    dropcache
    strace -c -w -f -o "$out/strace-backup.txt" "${K[@]}" backup create "$vid" --target "dir:$tgt" --snapshot "$sid" >"$work/b.json"
    bid=$(jq -r .id "$work/b.json")
    dropcache
    strace -c -w -f -o "$out/strace-restore.txt" "${K[@]}" backup restore "$bid" --backend thin >"$work/r.json"
    nid=$(jq -r .id "$work/r.json")
    blkdiscard "$(mapper "$vg" "volume-$nid")"
    "${K[@]}" volume delete "$nid" >/dev/null
  fi
  rm -f -- "$tgt/dd.raw"
  trim

  # --- (c) 1% rewritten in 64 KiB pieces, then an incremental
  rewrite=$(((size / 100 + 65535) / 65536 * 65536))
  log "rewriting $rewrite bytes in 64 KiB pieces spread over the volume"
  pieces=$(/usr/bin/python3 - "$vdev" "$size" "$rewrite" <<'PY'
import os, random, sys
dev, size, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
piece = 64 << 10
n = total // piece
slot = size // n // 4096 * 4096
rng = random.Random(20241127)
fd = os.open(dev, os.O_WRONLY)
for i in range(n):
    off = i * slot + rng.randrange(0, (slot - piece) // 4096 + 1) * 4096
    os.pwrite(fd, os.urandom(piece), off)
os.fsync(fd)
os.close(fd)
print(n)
PY
)
  dropcache
  t0=$(now)
  o=$("${K[@]}" backup create "$vid" --target "dir:$tgt" --incremental)
  raw kiln_incremental "$(since "$t0")"
  [ "$(jq -r .parent_id <<<"$o")" = "$bid" ] || { log "the incremental does not build on $bid: $o"; exit 1; }
  raw incremental "$rewrite $pieces $(jq -r '"\(.stream.read_bytes) \(.stream.data_bytes) \(.stream.zero_bytes) \(.stored_bytes)"' <<<"$o")"
  raw size "$size"
  raw chunk "$chunk"
  exit 0
fi

# ---------------------------------------------------------------------------------------
# The host half.
[ $# -le 1 ] || { echo "usage: $0 [OUTDIR]" >&2; exit 2; }
size_gib=${SIZE_GIB:-4}
runs=${RUNS:-3}
[[ $size_gib =~ ^[1-9][0-9]*$ ]] || { echo "bench-backup-lvm: SIZE_GIB must be a whole number of GiB" >&2; exit 2; }
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench-backup-lvm: RUNS must be a positive number" >&2; exit 2; }
for c in jq /usr/bin/python3 blkdiscard fstrim mkfs.xfs lvm; do
  command -v "$c" >/dev/null || { echo "bench-backup-lvm: $c is missing" >&2; exit 2; }
done
if [ "${BENCH_STRACE:-0}" = 1 ]; then
  command -v strace >/dev/null || { echo "bench-backup-lvm: strace is missing" >&2; exit 2; }
fi

target=${CARGO_TARGET_DIR:-$root/target}
out=${1:-$target/bench-backup-lvm}
mkdir -p -- "$out"
out=$(cd -- "$out" && pwd -P)
rm -f -- "$out/raw.txt" "$out/guest.txt" "$out/summary.txt" "$out/strace-backup.txt" "$out/strace-restore.txt"
read -r -a uml_args <<<"${KILN_UML_ARGS:---mem 2G --timeout 5400}"

# The scratch disks are sparse files in uml-run's run directory: about one volume plus one
# restore on disk 1 and two copies on disk 2 at a time.
rundir=${KILN_UML_RUNDIR:-/tmp}
need=$((4 * size_gib + 2))
free=$(df -B1G --output=avail -- "$rundir" | tail -n 1 | tr -d ' ')
if [ "$free" -lt "$need" ]; then
  echo "bench-backup-lvm: $rundir has $free GiB free, the scratch disks need about $need GiB for SIZE_GIB=$size_gib (set KILN_UML_RUNDIR or a smaller SIZE_GIB)" >&2
  exit 2
fi

if [ -n "${KILN_BIN:-}" ]; then
  kiln=$(realpath -e -- "$KILN_BIN")
else
  echo "bench-backup-lvm: building kiln (release) on the host" >&2
  (cd "$root" && cargo build --release -p kiln >&2)
  kiln=$target/release/kiln
fi
[ -x "$kiln" ] || { echo "bench-backup-lvm: $kiln is not executable" >&2; exit 1; }

{
  echo "host: $(uname -srm), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM"
  echo "scratch disks: sparse files in $rundir on $(df --output=source -- "$rundir" | tail -n 1) ($(df --output=fstype -- "$rundir" | tail -n 1))"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out/host.txt"
disk=$((2 * size_gib + 2))G
start=$(date +%s)
"$here/uml-run.sh" "${uml_args[@]}" --disk "$disk" --disk "$disk" --rw "$out" -- \
  "$here/bench-backup-lvm.sh" --in-guest "$out" "$kiln" "$size_gib" "$runs"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); guest run took $(($(date +%s) - start)) s" >>"$out/host.txt"

/usr/bin/python3 - "$out" <<'PY' | tee "$out/summary.txt"
import statistics, sys
out = sys.argv[1]
raw = {}
for line in open(f"{out}/raw.txt"):
    k, *v = line.split()
    raw.setdefault(k, []).append(v)
size = int(raw["size"][0][0])
chunk = int(raw["chunk"][0][0])
times = lambda k: [float(v[0]) for v in raw.get(k, [])]
med = lambda k: statistics.median(times(k))
mbs = lambda t: size / t / 1e6
runs = lambda k: " ".join(f"{t:.2f}" for t in times(k))
print(open(f"{out}/host.txt").read().rstrip())
print("guest: " + "; ".join(l.strip() for l in open(f"{out}/guest.txt")))
print(f"volume: {size >> 30} GiB thin, filled from /dev/urandom in {med('fill'):.1f} s")
print(f"kiln fixed costs (medians): start-up (volume show) {med('startup'):.2f} s; backup create "
      f"of a 4 MiB volume {med('small_backup'):.2f} s; restore of it {med('small_restore'):.2f} s")
print()
print(f"{'operation':<22} {'kiln s':>8} {'kiln MB/s':>10} {'dd s':>8} {'dd MB/s':>10} {'kiln/dd':>8}  runs (s)")
for name, k, p in [("full backup", "kiln_full", "dd_full"), ("restore (new volume)", "kiln_restore", "dd_restore")]:
    mk, mp = med(k), med(p)
    print(f"{name:<22} {mk:>8.2f} {mbs(mk):>10.0f} {mp:>8.2f} {mbs(mp):>10.0f} {mp / mk:>8.2f}  kiln {runs(k)}; dd {runs(p)}")
for name, k, small in [("full backup", "kiln_full", "small_backup"), ("restore", "kiln_restore", "small_restore")]:
    print(f"{name}: kiln's data path without its fixed cost: {mbs(med(k) - med(small)):.0f} MB/s")
lc = med("lvcreate")
print(f"restore: dd's lvcreate of its new LV took {lc:.2f} s (median, not in dd's time); "
      f"kiln/(lvcreate+dd) = {(med('dd_restore') + lc) / med('kiln_restore'):.2f}")
read, data, stored = (int(x) for x in raw["full_stream"][-1])
print(f"full backup: read_bytes {read} ({read / size:.1%} of the volume), data_bytes {data}, stored {stored}")
rw, pieces, ir, idata, izero, istored = (int(x) for x in raw["incremental"][0])
print(f"incremental after rewriting {rw} bytes ({rw / size:.2%}) in {pieces} pieces of 64 KiB "
      f"(pool chunk {chunk >> 10} KiB): {med('kiln_incremental'):.2f} s, read_bytes {ir} = "
      f"{ir / size:.2%} of the volume (target <= 3%), data_bytes {idata}, zero_bytes {izero}, stored {istored}")
PY
for f in backup restore; do
  if [ -s "$out/strace-$f.txt" ]; then
    echo "--- strace -c -w -f of one $f (wall time per syscall, all threads; top 14)"
    head -n 16 "$out/strace-$f.txt"
  fi
done
