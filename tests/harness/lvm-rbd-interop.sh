#!/usr/bin/env bash
# lvm-rbd-interop.sh — the real `rbd import-diff` applies the diff streams kiln makes from LVM
# snapshots (thin and thick) onto an RBD image, byte for byte (issue 10).
#
# `kiln snapshot diff SNAP [--from OLDER] --output FILE` writes an `rbd diff v1` stream on
# every backend. LVM runs only inside a user-mode-Linux guest (the host kernel may have no
# device-mapper) and the guest cannot reach a Ceph cluster on the host, but a stream is just a
# file: the guest half makes the streams and raw images of the snapshots into a host
# directory it mounts read-write, and the host half applies the streams with the real `rbd`
# CLI on a throw-away cluster and compares. The pattern of tests/harness/bench-backup-lvm.sh
# (build on the host, run the LVM half of this script in the guest through
# tests/harness/uml-run.sh) and of tests/harness/rbd-suite.sh (ceph-start.sh / ceph-stop.sh).
#
# Usage: tests/harness/lvm-rbd-interop.sh
# Environment:
#   KILN_BIN              a kiln binary to use instead of building one (cargo build -p kiln
#                         --features rbd,failpoints, debug, honouring CARGO_TARGET_DIR)
#   KILN_UML_ARGS         uml-run.sh options (default "--mem 2G --timeout 900")
#   KILN_UML_RUNDIR       where uml-run.sh puts its run directory with the sparse scratch disk
#                         (default /tmp; the guest writes about 100 MiB to it)
#   TMPDIR                parent of the host's work directory (default /tmp): the streams,
#                         the four expected images and the exports, about 400 MiB at most,
#                         and the throw-away cluster (its memstore OSD keeps data in RAM)
#   INTEROP_SELF_CHECK=1  a self-check of the checker, not a test of kiln: flips one byte of
#                         the thin s2 image the guest read from LVM (at 20 MiB + 4660, data
#                         the stream carries) before the comparisons. The run must then print
#                         `FAIL thin s2: ...` and `FAIL booted thin volume ...` (the
#                         booted volume is compared with the same image), each naming that
#                         byte, and exit 1; everything else still passes.
#
# In the guest: a VG on the scratch disk (/dev/ubda) with a 1 GiB thin pool (zeroing on, as
# kiln's tests use), kiln with two backends on it, `thin` (type thin) and `thick` (type thick,
# COW snapshots of 100 %). On each backend: a 64 MiB volume gets random data (4 MiB at 0,
# 1 MiB at 20 MiB, 2 MiB at 40 MiB, 64 KiB at the end), snapshot s1; then 512 KiB rewritten
# at 1 MiB, 4 KiB written into a hole at 33 MiB + 12 KiB (neither grain- nor chunk-aligned),
# 256 KiB at 20 MiB + 256 KiB zeroed by writing zeros with dd, 1 MiB at 40 MiB + 512 KiB
# discarded (thin: `blkdiscard`, the pool unmaps it; thick: `blkdiscard -z`, zeros written),
# the last 4 KiB rewritten, snapshot s2. Then `kiln snapshot diff s1` (full) and `kiln
# snapshot diff s2 --from s1` (incremental) into the shared directory, and dd of both
# snapshot LVs (activated as bench-backup-lvm.sh does) as the expected images.
#
# Then an instance snapshot on LVM, exported with its data: an instance with the thin volume
# at /dev/vda (boot index 0) and the thick one at /dev/vdb (boot index 1), `kiln instance
# snapshot --quiesce off` (no agent in the guest), `kiln image export` into the shared
# directory (OUT/image).
#
# On the host, per backend: the streams' names (the full stream's `t` must be s1's id, the
# incremental's `f` s1's and `t` s2's: `kiln snapshot diff` names snapshots by id) and size;
# `rbd create --size 64M`, `rbd import-diff` of the full stream (which makes the RBD snapshot
# the stream's `t` names), `rbd export IMG@<t>` compared with s1's image; `rbd import-diff`
# of the incremental (rbd checks the image has the snapshot its `f` names), the export at its
# `t` compared with s2's image; both zeroed ranges held data at s1 and are zero in the s2
# export. Then the exported instance snapshot is booted from RBD: `kiln image import
# OUT/image --backend ceph` (a kiln on the same cluster), `kiln image restore` of the new
# image; each restored volume is on the RBD backend at its original device and boot index,
# and its `rbd export` equals the LVM volume it came from (s2's image). One `PASS ...` or
# `FAIL ...` line per check on stdout (a failure is one line);
# exits 1 if any check failed, 2 on bad usage or a missing tool.
# Everything it made is removed on exit, also on failure or Ctrl-C: the guest's VG on the
# guest's exit (uml-run.sh removes its run directory and disk), the cluster (ceph-stop.sh
# --purge) and the work directory on the host's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)

MIB=$((1 << 20))
SIZE=$((64 * MIB))
# The two ranges zeroed between s1 and s2: "offset length" (also used by the host checks).
ZERO_DD="$((20 * MIB + 256 * 1024)) $((256 * 1024))"
ZERO_DISCARD="$((40 * MIB + 512 * 1024)) $MIB"
BACKENDS="thin thick"

# ---------------------------------------------------------------------------------------
# The guest half: makes OUT/<backend>-{full,incr}.diff, OUT/<backend>-{s1,s2}.raw,
# OUT/<backend>.ids ("s1 <id>", "s2 <id>") and kiln's JSON summaries of the diffs.
if [ "${1:-}" = --in-guest ]; then
  [ $# -eq 3 ] || { echo "lvm-rbd-interop(guest): bad arguments" >&2; exit 2; }
  out=$2 kiln=$3
  read -r -a disks <<<"${KILN_UML_DISKS:-}"
  [ ${#disks[@]} -ge 1 ] && [ -b "${disks[0]}" ] ||
    { echo "lvm-rbd-interop(guest): needs one scratch disk, got '${KILN_UML_DISKS:-}'" >&2; exit 1; }
  pv=${disks[0]}
  vg=kiln-interop
  work=$(mktemp -d /tmp/kiln-interop.XXXXXX)
  made_vg=''
  cleanup() {
    set +e
    if [ -n "$made_vg" ]; then vgremove -q -f "$vg" >/dev/null 2>&1; fi
    rm -rf -- "$work"
  }
  trap cleanup EXIT
  log() { echo "lvm-rbd-interop(guest): $*" >&2; }
  # The device node libdm makes for vg/lv (no udev in the guest).
  mapper() { printf '/dev/mapper/%s-%s' "${1//-/--}" "${2//-/--}"; }
  # put DEV OFFSET LENGTH: LENGTH random bytes at OFFSET, on the device when dd returns.
  put() {
    dd if=/dev/urandom of="$1" bs="$3" count=1 seek="$2" iflag=fullblock oflag=seek_bytes \
      conv=notrunc,fsync status=none
  }

  vgcreate -q "$vg" "$pv" >/dev/null
  made_vg=1
  lvcreate -q --type thin-pool -Zy -L 1g -n pool "$vg" >/dev/null
  cfg=$work/kiln.toml
  printf 'default_backend = "thin"\n\n[backends.thin]\ndriver = "lvm"\nvolume_group = "%s"\ntype = "thin"\nthin_pool = "pool"\n' \
    "$vg" >"$cfg"
  printf '\n[backends.thick]\ndriver = "lvm"\nvolume_group = "%s"\ntype = "thick"\nthick_snapshot_percent = 100\n' \
    "$vg" >>"$cfg"
  K=("$kiln" --data-dir "$work/data" --config "$cfg" --format json)

  read -r zd_off zd_len <<<"$ZERO_DD"
  read -r zx_off zx_len <<<"$ZERO_DISCARD"
  # new_id ARGS...: the id kiln prints for a create; on failure kiln's message and exit 1 (the
  # callers assign the result, so set -e ends the guest half).
  new_id() {
    local o
    o=$("${K[@]}" "$@") || { log "kiln $* failed"; exit 1; }
    jq -er .id <<<"$o" || { log "kiln $* printed no id: $o"; exit 1; }
  }
  for b in $BACKENDS; do
    vid=$(new_id volume create --size "$SIZE" --backend "$b" --name "interop-$b")
    vdev=$(mapper "$vg" "volume-$vid")
    [ "$(blockdev --getsize64 "$vdev")" = "$SIZE" ] || { log "$b: volume device $vdev is not $SIZE bytes"; exit 1; }
    log "$b: volume $vid: writing the s1 data"
    put "$vdev" 0 $((4 * MIB))
    put "$vdev" $((20 * MIB)) "$MIB"
    put "$vdev" $((40 * MIB)) $((2 * MIB))
    put "$vdev" $((SIZE - 64 * 1024)) $((64 * 1024))
    s1=$(new_id snapshot create "$vid" --name s1)
    log "$b: snapshot s1 $s1; changing the volume"
    put "$vdev" "$MIB" $((512 * 1024))
    put "$vdev" $((33 * MIB + 12 * 1024)) 4096
    dd if=/dev/zero of="$vdev" bs="$zd_len" count=1 seek="$zd_off" oflag=seek_bytes \
      conv=notrunc,fsync status=none
    if [ "$b" = thin ]; then
      blkdiscard -o "$zx_off" -l "$zx_len" "$vdev"
    else
      blkdiscard -z -o "$zx_off" -l "$zx_len" "$vdev"
    fi
    put "$vdev" $((SIZE - 4096)) 4096
    s2=$(new_id snapshot create "$vid" --name s2)
    log "$b: snapshot s2 $s2; writing the streams"
    printf 's1 %s\ns2 %s\nvol %s\n' "$s1" "$s2" "$vid" >"$out/$b.ids"
    "${K[@]}" snapshot diff "$s1" --output "$out/$b-full.diff" >"$out/$b-full.json"
    "${K[@]}" snapshot diff "$s2" --from "$s1" --output "$out/$b-incr.diff" >"$out/$b-incr.json"
    # The expected images: the snapshot LVs themselves (thin snapshots skip activation:
    # -K; a thick snapshot is active while its origin is).
    for s in s1 s2; do
      sid=$([ $s = s1 ] && echo "$s1" || echo "$s2")
      sdev=$(mapper "$vg" "_snapshot-$sid")
      if ! [ -b "$sdev" ]; then
        if [ "$b" = thin ]; then lvchange -q -ay -K "$vg/_snapshot-$sid"; else lvchange -q -ay "$vg/volume-$vid"; fi
      fi
      [ "$(blockdev --getsize64 "$sdev")" = "$SIZE" ] || { log "$b: snapshot device $sdev is not $SIZE bytes"; exit 1; }
      dd if="$sdev" of="$out/$b-$s.raw" bs=4M iflag=direct status=none
    done
    # The volume itself is s2 too: a sanity check of the images read back.
    cmp -s "$vdev" "$out/$b-s2.raw" || { log "$b: the volume does not read as its snapshot s2"; exit 1; }
  done
  # An instance snapshot on LVM, exported with its data. The volumes still hold s2's data.
  iid=$(new_id instance create --name interop-vm)
  letters=(a b)
  idx=0
  for b in $BACKENDS; do
    vid=$(awk '$1 == "vol" { print $2 }' "$out/$b.ids")
    dev=/dev/vd${letters[$idx]}
    "${K[@]}" volume attach "$vid" --instance "$iid" --device "$dev" --boot-index "$idx" >/dev/null ||
      { log "attaching $b's volume at $dev failed"; exit 1; }
    printf '%s %s %s\n' "$dev" "$idx" "$b" >>"$out/devices"
    idx=$((idx + 1))
  done
  img=$(new_id instance snapshot "$iid" --name interop-snap --quiesce off)
  log "instance snapshot: image $img; exporting it"
  "${K[@]}" image export "$img" --output "$out/image" >"$out/image-export.json" ||
    { log "image export failed"; exit 1; }
  exit 0
fi

# ---------------------------------------------------------------------------------------
# The host half.
[ $# -eq 0 ] || { echo "usage: $0 (no arguments; see the header for the environment)" >&2; exit 2; }
PY=/usr/bin/python3
for c in "$PY" rbd jq cmp lvm blkdiscard; do
  command -v "$c" >/dev/null || { echo "lvm-rbd-interop: $c is missing (tests/install-deps.sh)" >&2; exit 2; }
done
read -r -a uml_args <<<"${KILN_UML_ARGS:---mem 2G --timeout 900}"
start=$(date +%s)

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-lvm-rbd-interop.XXXXXX")
out=$work/streams
ceph_dir=''
cleanup() {
  set +e
  if [ -n "$ceph_dir" ] && [ -d "$ceph_dir" ]; then "$here/ceph-stop.sh" "$ceph_dir" --purge >&2; fi
  rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
mkdir "$out"
log() { echo "lvm-rbd-interop: $*" >&2; }

if [ -n "${KILN_BIN:-}" ]; then
  kiln=$(realpath -e -- "$KILN_BIN")
else
  log "building kiln (debug, --features rbd,failpoints, as every suite builds it) on the host"
  (cd "$root" && cargo build -p kiln --features rbd,failpoints >&2)
  kiln=${CARGO_TARGET_DIR:-$root/target}/debug/kiln
fi
[ -x "$kiln" ] || { echo "lvm-rbd-interop: $kiln is not executable" >&2; exit 1; }

log "making the streams from LVM snapshots in a user-mode-Linux guest"
t0=$(date +%s)
set +e
"$here/uml-run.sh" "${uml_args[@]}" --disk 2G --rw "$out" -- \
  "$here/lvm-rbd-interop.sh" --in-guest "$out" "$kiln"
rc=$?
set -e
if [ $rc -ne 0 ]; then
  echo "FAIL guest: making the LVM snapshots, streams and images failed (exit $rc; its messages are above)"
  exit 1
fi
log "guest done in $(($(date +%s) - t0)) s"

if [ "${INTEROP_SELF_CHECK:-0}" = 1 ]; then
  log "INTEROP_SELF_CHECK=1: flipping the byte at $((20 * MIB + 4660)) of thin-s2.raw; thin s2 and the booted thin volume must FAIL"
  "$PY" - "$out/thin-s2.raw" $((20 * MIB + 4660)) <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2]))
    b = f.read(1)
    f.seek(int(sys.argv[2]))
    f.write(bytes([b[0] ^ 0x01]))
PY
fi

log "starting a throw-away Ceph cluster"
ceph_dir=$work/ceph
t0=$(date +%s)
if ! env_line=$("$here/ceph-start.sh" "$ceph_dir"); then
  echo "FAIL ceph: the throw-away cluster did not start (its messages are above)"
  exit 1
fi
case "$env_line" in
  "export CEPH_CONF="*) export CEPH_CONF="${env_line#export CEPH_CONF=}" ;;
  *) echo "FAIL ceph: unexpected output from ceph-start.sh: $env_line"; exit 1 ;;
esac
log "cluster up in $(($(date +%s) - t0)) s"

failed=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
# rbdq WHAT ARGS...: runs rbd; on failure one FAIL line with rbd's last two messages (the
# reason, then rbd's summary), status 1.
rbdq() {
  local what=$1 rc=0
  shift
  timeout 300 rbd "$@" >"$work/rbd.out" 2>"$work/rbd.err" || rc=$?
  [ $rc -ne 0 ] || return 0
  fail "$what: rbd $(sed "s|$work/||g" <<<"$*") failed (exit $rc): $(grep -v '^[[:space:]]*$' "$work/rbd.err" | tail -n 2 | paste -sd ';' | sed 's/;/; /g')"
  return 1
}
# stream FILE: "from to size w_records w_bytes z_records z_bytes" of an rbd diff v1 stream
# ("-" for a missing name), or one line saying why it is not one.
stream() {
  "$PY" - "$1" <<'PY'
import struct, sys
f = open(sys.argv[1], "rb")
def need(n):
    b = f.read(n)
    if len(b) != n:
        sys.exit("truncated at byte %d" % f.tell())
    return b
if need(12) != b"rbd diff v1\n":
    sys.exit("no rbd diff v1 header")
names = {"f": "-", "t": "-"}
size = None
w = [0, 0]
z = [0, 0]
while True:
    tag = need(1).decode("latin-1")
    if tag in "ft":
        (n,) = struct.unpack("<I", need(4))
        names[tag] = need(n).decode()
    elif tag == "s":
        (size,) = struct.unpack("<Q", need(8))
    elif tag == "w":
        off, n = struct.unpack("<QQ", need(16))
        need(n)
        w[0] += 1
        w[1] += n
    elif tag == "z":
        off, n = struct.unpack("<QQ", need(16))
        z[0] += 1
        z[1] += n
    elif tag == "e":
        break
    else:
        sys.exit("unknown record %r at byte %d" % (tag, f.tell() - 1))
if f.read(1):
    sys.exit("bytes after the end record")
print(names["f"], names["t"], size, w[0], w[1], z[0], z[1])
PY
}
# firstdiff A B [OFFSET LENGTH]: where file A differs from file B (the whole files, or only
# LENGTH bytes at OFFSET of A against zeros when B is /dev/zero), as one line; status 1 when
# they differ.
firstdiff() {
  "$PY" - "$@" <<'PY'
import sys
a, b = sys.argv[1], sys.argv[2]
zeros = b == "/dev/zero"
fa = open(a, "rb")
if zeros:
    off, length = int(sys.argv[3]), int(sys.argv[4])
    fa.seek(off)
    fb = None
else:
    off, length = 0, None
    fb = open(b, "rb")
    import os
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    if sa != sb:
        print("%d bytes, want %d" % (sa, sb))
        sys.exit(1)
pos, left = off, length
while left is None or left > 0:
    n = 1 << 20 if left is None else min(1 << 20, left)
    x = fa.read(n)
    y = bytes(len(x)) if zeros else fb.read(n)
    if x != y:
        i = next(i for i in range(len(x)) if x[i] != y[i])
        d = sum(1 for p, q in zip(x, y) if p != q)
        print("first difference at byte offset %d (0x%02x, want 0x%02x); %d of the %d bytes from offset %d differ"
              % (pos + i, x[i], y[i], d, len(x), pos))
        sys.exit(1)
    if not x:
        break
    pos += len(x)
    if left is not None:
        left -= len(x)
PY
}
# same WHAT GOT WANT: one PASS/FAIL line comparing the export with the expected image.
same() {
  local why
  if why=$(firstdiff "$2" "$3" 2>&1); then
    pass "$1: rbd export equals the LVM snapshot image ($(stat -c %s -- "$2") bytes)"
  else
    fail "$1: rbd export differs from the LVM snapshot image: $why"
  fi
}

for b in $BACKENDS; do
  s1=$(awk '$1 == "s1" { print $2 }' "$out/$b.ids")
  s2=$(awk '$1 == "s2" { print $2 }' "$out/$b.ids")
  full=$out/$b-full.diff incr=$out/$b-incr.diff img=rbd/interop-$b
  # The streams' names: what the import needs the image to have and what it makes.
  if ! fs=$(stream "$full" 2>&1) || ! is=$(stream "$incr" 2>&1); then
    fail "$b streams: not a well-formed rbd diff v1 stream: ${fs:-} ${is:-}"
    continue
  fi
  read -r ff ft fsize fw fwb fz fzb <<<"$fs"
  read -r if_ it isize iw iwb iz izb <<<"$is"
  log "$b full stream: t=$ft size=$fsize, $fw w records ($fwb bytes), $fz z records ($fzb bytes); kiln read $(jq -r .read_bytes "$out/$b-full.json") bytes"
  log "$b incremental stream: f=$if_ t=$it size=$isize, $iw w records ($iwb bytes), $iz z records ($izb bytes); kiln read $(jq -r .read_bytes "$out/$b-incr.json") bytes"
  if [ "$ff $ft $fsize" = "- $s1 $SIZE" ] && [ "$if_ $it $isize" = "$s1 $s2 $SIZE" ]; then
    pass "$b streams: full from nothing to s1 ($s1), incremental from s1 to s2 ($s2), size $SIZE"
  else
    fail "$b streams: names/sizes are full f=$ff t=$ft s=$fsize, incremental f=$if_ t=$it s=$isize; want f=- t=$s1, f=$s1 t=$s2, s=$SIZE"
  fi

  rbdq "$b create" create --size 64M "$img" || continue
  rbdq "$b s1" import-diff --no-progress "$full" "$img" || continue
  rbdq "$b s1" export --no-progress "$img@$ft" "$work/$b-s1.rbd" || continue
  same "$b s1" "$work/$b-s1.rbd" "$out/$b-s1.raw"
  rbdq "$b s2" import-diff --no-progress "$incr" "$img" || continue
  rbdq "$b s2" export --no-progress "$img@$it" "$work/$b-s2.rbd" || continue
  same "$b s2" "$work/$b-s2.rbd" "$out/$b-s2.raw"
  for r in "dd:$ZERO_DD" "discard:$ZERO_DISCARD"; do
    how=${r%%:*}
    read -r off len <<<"${r#*:}"
    what="$b zeroed range [$off, +$len) ($( [ "$how" = dd ] && echo "dd of zeros" || { [ "$b" = thin ] && echo "blkdiscard" || echo "blkdiscard -z"; }))"
    if firstdiff "$work/$b-s1.rbd" /dev/zero "$off" "$len" >/dev/null 2>&1; then
      fail "$what: already zero in the s1 export, so the check proves nothing"
    elif ! why=$(firstdiff "$work/$b-s2.rbd" /dev/zero "$off" "$len" 2>&1); then
      fail "$what: not zero in the s2 export: $why"
    else
      pass "$what: data in the s1 export, zero in the s2 export"
    fi
  done
  rm -f -- "$work/$b-s1.rbd" "$work/$b-s2.rbd"
done

# The instance snapshot taken on LVM, imported onto RBD and booted (image restore).
printf 'default_backend = "ceph"\n\n[backends.ceph]\ndriver = "rbd"\npool = "rbd"\nceph_conf = "%s"\n' \
  "$CEPH_CONF" >"$work/kiln.toml"
HK=("$kiln" --data-dir "$work/kiln-data" --config "$work/kiln.toml" --format json)
boot() {
  local imported new booted n
  if ! imported=$("${HK[@]}" image import "$out/image" --backend ceph 2>"$work/kiln.err"); then
    fail "image import onto RBD: $(tail -n 1 "$work/kiln.err")"
    return
  fi
  new=$(jq -r .id <<<"$imported")
  if ! booted=$("${HK[@]}" image restore "$new" --name booted 2>"$work/kiln.err"); then
    fail "image restore of the imported image: $(tail -n 1 "$work/kiln.err")"
    return
  fi
  n=$(jq '.volumes | length' <<<"$booted")
  [ "$n" = "$(wc -l <"$out/devices")" ] || { fail "booted instance has $n volumes, want $(wc -l <"$out/devices")"; return; }
  while read -r dev idx b; do
    local v vid where
    v=$(jq -c --arg d "$dev" '.volumes[] | select(.attachments[0].device == $d)' <<<"$booted")
    if [ -z "$v" ]; then
      fail "booted $b volume: no volume at $dev"
      continue
    fi
    vid=$(jq -r .id <<<"$v")
    where="backend $(jq -r .backend <<<"$v"), boot index $(jq -r '.attachments[0].boot_index' <<<"$v")"
    if [ "$where" != "backend ceph, boot index $idx" ]; then
      fail "booted $b volume at $dev: $where, want backend ceph, boot index $idx"
      continue
    fi
    rbdq "booted $b volume" export --no-progress "rbd/volume-$vid" "$work/booted-$b.rbd" || continue
    local why
    if why=$(firstdiff "$work/booted-$b.rbd" "$out/$b-s2.raw" 2>&1); then
      pass "booted $b volume at $dev (boot index $idx) on RBD: rbd export equals the LVM volume at the instance snapshot"
    else
      fail "booted $b volume at $dev on RBD differs from the LVM volume: $why"
    fi
    rm -f -- "$work/booted-$b.rbd"
  done <"$out/devices"
}
boot

log "took $(($(date +%s) - start)) s"
if [ "$failed" -gt 0 ]; then
  echo "lvm-rbd-interop: $failed check(s) FAILED"
  exit 1
fi
echo "lvm-rbd-interop: all checks passed"
