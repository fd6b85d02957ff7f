#!/usr/bin/env bash
# uml-run.sh — run one command as root inside a throw-away user-mode-Linux guest that has real
# device-mapper, so kiln's LVM driver can be tested on hosts whose kernel has none.
#
# Usage: tests/harness/uml-run.sh [options] [--] CMD [ARGS...]
#   --disk SIZE     attach a new sparse scratch file of SIZE (e.g. 2G) as /dev/ubda, /dev/ubdb, ...
#                   (repeatable; default: none — tests may use loop devices on the guest's /tmp)
#   --mem SIZE      guest RAM (default 2G; backed by a sparse host file, only touched pages count)
#   --rw DIR        mount host DIR read-write at the same path in the guest
#   --ro DIR        mount host DIR read-only at the same path (only needed under /tmp)
#   --timeout SECS  kill the guest after SECS (default 900) and exit 124
#   --keep          keep the run directory (console log, disks) and print its path
#
# The guest sees the host's root file system read-only (hostfs), fresh tmpfs on /tmp, /run and
# /dev/shm, the same cwd and the same environment (minus CARGO_TARGET_*_RUNNER, so it can be a
# cargo target runner without recursing), plus:
#   KILN_UML_GUEST=1             the marker tests check to know they run inside the guest
#   KILN_UML_DISKS="/dev/ubda …" the scratch disks
#   LVM_SYSTEM_DIR               a udev-free lvm.conf (also DM_DISABLE_UDEV=1)
# The cwd and CMD's directory are mounted read-only automatically when they lie under /tmp.
# CMD's stdout and stderr stream to ours, kept apart; its stdin is /dev/null.
# Exit status: CMD's; 124 on timeout; 125 when the guest or its setup failed (console tail shown).
#
# Use as a cargo runner (build on the host, run only the test binary in the guest):
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/tests/harness/uml-run.sh \
#     cargo test -p kiln-driver-lvm --test lvm
#
# Needs: user-mode-linux, lvm2, thin-provisioning-tools, kmod (tests/install-deps.sh).
set -euo pipefail

fail() { echo "uml-run: $*" >&2; exit 125; }

mem=2G timeout=900 keep=0
disks=() mounts=()
while [ $# -gt 0 ]; do
  case $1 in
    --disk) [ $# -ge 2 ] || fail "--disk needs a size"; disks+=("$2"); shift 2 ;;
    --mem) [ $# -ge 2 ] || fail "--mem needs a size"; mem=$2; shift 2 ;;
    --rw | --ro)
      [ $# -ge 2 ] || fail "$1 needs a directory"
      d=$(realpath -e -- "$2") || fail "no such directory: $2"
      mounts+=("${1#--} $d"); shift 2 ;;
    --timeout) [ $# -ge 2 ] || fail "--timeout needs seconds"; timeout=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) fail "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || fail "no command given (see --help)"
[[ $timeout =~ ^[0-9]+$ ]] && [ "$timeout" -gt 0 ] || fail "--timeout must be a positive integer"

uml=${KILN_UML_KERNEL:-/usr/bin/linux.uml}
moddir=${KILN_UML_MODULES:-/usr/lib/uml/modules}
[ -x "$uml" ] || fail "$uml not found: install user-mode-linux (tests/install-deps.sh)"
kver=$(ls -1 "$moddir" 2>/dev/null | sort -V | tail -n 1)
[ -n "$kver" ] || fail "no UML kernel modules under $moddir: install user-mode-linux"
command -v lvm >/dev/null || fail "lvm not found: install lvm2"
command -v modprobe >/dev/null || [ -x /sbin/modprobe ] || fail "modprobe not found: install kmod"

run=$(mktemp -d "${KILN_UML_RUNDIR:-/tmp}/kiln-uml.XXXXXX")
uml_pid='' uml_pgid='' timer_pid=''
cleanup() {
  # The kernel and its helper processes form one process group (setsid): kill all of it, also
  # when the kernel itself already ended and left helpers behind.
  if [ -n "$uml_pgid" ]; then kill -KILL -- "-$uml_pgid" 2>/dev/null || true; fi
  if [ -n "$uml_pid" ]; then wait "$uml_pid" 2>/dev/null || true; fi
  if [ -n "$timer_pid" ]; then kill "$timer_pid" 2>/dev/null || true; fi
  if [ "$keep" = 1 ]; then echo "uml-run: run directory kept: $run" >&2; else rm -rf -- "$run"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- what the guest runs, where, with which environment (files in the run dir, which the guest
# mounts over hostfs; argv and env are NUL-separated so no quoting or eval is involved)
cwd=$(pwd -P)
case $cwd in /tmp | /tmp/*) mounts+=("ro $cwd") ;; esac
prog=$(command -v -- "$1" || true)
case $prog in
  /tmp/*)
    d=$(dirname -- "$(realpath -- "$prog")")
    [ "$d" = "$cwd" ] || mounts+=("ro $d") ;;
esac
printf '%s\0' "$@" >"$run/argv"
printf '%s' "$cwd" >"$run/cwd"
printf '%s\n' "${mounts[@]}" >"$run/mounts"
env -0 >"$run/env"
ubd_args=() devs=() i=0
for size in "${disks[@]}"; do
  truncate -s "$size" "$run/disk$i.img" || fail "bad disk size $size"
  ubd_args+=("ubd$i=$run/disk$i.img")
  devs+=("/dev/ubd$(printf "\\x$(printf %x $((97 + i)))")")
  i=$((i + 1))
done
printf '%s' "${devs[*]}" >"$run/disks"
realpath -- "$moddir/$kver" >"$run/moddir"

cat >"$run/init" <<'GUEST_INIT'
#!/bin/bash
# PID 1 of the guest. The host run directory arrives as the kernel parameter kiln_uml_run=…
# (unknown key=value parameters end up in init's environment).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
R=/run/kiln-uml
H=$R/host
die() {
  echo "uml-run(guest): $*" >&2
  echo 125 >/proc/exitcode
  echo o >/proc/sysrq-trigger
  sleep 60
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts /dev/shm /run/lock "$H" "$R/etc" "$R/modroot/lib/modules"
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
[ -n "${kiln_uml_run:-}" ] || die "kiln_uml_run missing from the kernel command line"
mount -t hostfs -o "$kiln_uml_run" none "$H" || die "cannot mount the run directory $kiln_uml_run"
unset kiln_uml_run
while read -r mode dir; do
  [ -n "$dir" ] || continue
  mkdir -p "$dir" 2>/dev/null
  mount -t hostfs -o "$mode,$dir" none "$dir" || die "cannot mount $dir ($mode)"
done <"$H/mounts"
# The host has no /lib/modules for this kernel and the root is read-only: point modprobe at a
# private module root that links to the UML package's modules.
ln -s "$(cat "$H/moddir")" "$R/modroot/lib/modules/$(uname -r)"
modprobe -d "$R/modroot" -a dm-mod dm-snapshot dm-thin-pool dm-zero dm-mirror loop ||
  die "loading the device-mapper modules failed"
[ -e /dev/mapper/control ] || die "/dev/mapper/control missing after loading dm-mod"
# No udev in the guest: libdm creates the device nodes itself; no lvmpolld/dmeventd either.
# PVs can only be loop or ubd devices here; the filter spares lvm probing the guest's ~600
# other device nodes, which makes every lvm command about 4 times faster under UML.
# Backups stay on tmpfs so lvm neither warns about missing backups nor writes to /etc/lvm.
cat >"$R/etc/lvm.conf" <<'LVMCONF'
devices { obtain_device_list_from_udev=0 external_device_info_source="none" use_devicesfile=0
          global_filter=[ "a|^/dev/loop[0-9]+$|", "a|^/dev/ubd[a-z]+$|", "r|.*|" ] }
activation { udev_sync=0 udev_rules=0 monitoring=0 }
global { use_lvmpolld=0 event_activation=0 }
backup { backup=1 backup_dir="/run/kiln-uml/etc/backup" archive=1 archive_dir="/run/kiln-uml/etc/archive" }
LVMCONF
while IFS= read -r -d '' kv; do
  k=${kv%%=*}
  case $k in
    PWD | OLDPWD | SHLVL | _ | TMPDIR | TMP | TEMP | TERM | HOSTNAME | CARGO_TARGET_*_RUNNER) continue ;;
  esac
  [[ $k =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && export "$kv"
done <"$H/env"
export LVM_SYSTEM_DIR=$R/etc DM_DISABLE_UDEV=1 KILN_UML_GUEST=1 KILN_UML_DISKS="$(cat "$H/disks")"
export TMPDIR=/tmp TERM=dumb
mapfile -d '' argv <"$H/argv"
# tty1/tty2 are wired to the host's stdout/stderr; raw mode keeps bytes unchanged (no CRLF).
stty -F /dev/tty1 raw -echo
stty -F /dev/tty2 raw -echo
mkfifo "$R/out" "$R/err"
cat "$R/out" >/dev/tty1 &
p_out=$!
cat "$R/err" >/dev/tty2 &
p_err=$!
(
  cd "$(cat "$H/cwd")" || { echo "uml-run(guest): cwd $(cat "$H/cwd") not visible in the guest" >&2; exit 125; }
  exec "${argv[@]}"
) </dev/null >"$R/out" 2>"$R/err"
rc=$?
(sleep 10; kill "$p_out" "$p_err" 2>/dev/null) &
wait "$p_out" "$p_err" 2>/dev/null
echo "$rc" >"$H/rc"
sync
echo "$rc" >/proc/exitcode
echo o >/proc/sysrq-trigger
sleep 60
GUEST_INIT
chmod +x "$run/init"

# UML keeps guest RAM in a file under TMPDIR and maps it executable: it must not be noexec.
ramdir=/dev/shm
if ! [ -d "$ramdir" ] || ! [ -w "$ramdir" ] || findmnt -n -o OPTIONS -T "$ramdir" | grep -qw noexec; then
  ramdir=$run
fi

# fd 3 -> our stdout (guest tty1), fd 5 -> our stderr (guest tty2), fd 4 -> kernel console log.
set +e
TMPDIR=$ramdir setsid "$uml" mem="$mem" rootfstype=hostfs rootflags=/ ro \
  init="$run/init" kiln_uml_run="$run" "${ubd_args[@]}" \
  con0=null,fd:4 con1=null,fd:3 con2=null,fd:5 con=null ssl=null \
  uml_dir="$run/uml" umid=kiln quiet \
  3>&1 4>"$run/console.log" 5>&2 >"$run/uml.log" 2>&1 </dev/null &
uml_pid=$!
uml_pgid=$uml_pid
sleep "$timeout" </dev/null >/dev/null 2>&1 &
timer_pid=$!
wait -n -p finished "$uml_pid" "$timer_pid"
uml_status=$?
if [ "${finished:-}" = "$timer_pid" ]; then
  timer_pid=''
  kill -KILL -- "-$uml_pid" 2>/dev/null
  wait "$uml_pid" 2>/dev/null
  uml_pid=''
  echo "uml-run: timed out after ${timeout}s; kernel console tail:" >&2
  tail -n 20 "$run/console.log" >&2
  exit 124
fi
uml_pid=''
set -e
if [ -s "$run/rc" ]; then exit "$(cat "$run/rc")"; fi
echo "uml-run: the guest ended without a result (linux.uml status $uml_status); console tail:" >&2
tail -n 30 "$run/console.log" "$run/uml.log" >&2
exit 125
