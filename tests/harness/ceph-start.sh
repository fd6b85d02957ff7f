#!/bin/bash
# tests/harness/ceph-start.sh DIR
#
# Starts a throw-away single-node Ceph cluster (mon.a, mgr.x, one memstore osd.0) for kiln's
# RBD tests, without systemd, with everything (config, data, logs, sockets, PID files) under
# DIR. Every daemon listens on 127.0.0.1 only. Creates and initialises pool "rbd", waits for
# HEALTH_OK (bounded), and prints exactly one line on stdout:
#
#     export CEPH_CONF=DIR/ceph.conf
#
# so callers can `eval "$(tests/harness/ceph-start.sh DIR)"`. Progress goes to stderr.
# Stop with tests/harness/ceph-stop.sh DIR [--purge]. If start-up fails, everything this
# script started is stopped again (logs stay in DIR/log).
#
# Needs (Debian): ceph-mon ceph-mgr ceph-osd ceph-common (tests/install-deps.sh).
# Knobs: CEPH_READY_TIMEOUT (seconds, default 120), CEPH_MEMSTORE_BYTES (reported OSD
# capacity, default 4 GiB; data lives in the OSD's RAM).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi

HERE=$(dirname "$(realpath "$0")")
DIR=$(realpath -m "$1")
CONF="$DIR/ceph.conf"
READY_TIMEOUT=${CEPH_READY_TIMEOUT:-120}
MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-4294967296}
# Debian's interpreter carries the `rados` module; a pyenv/venv `python3` first on PATH does not.
PY=/usr/bin/python3
T0=$(date +%s.%N)

log() { printf '[ceph-start %5ss] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%.2f", a-b}')" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# The ceph CLI waits 300 s for an unreachable mon by default; never let that hang a test run.
cephc() { timeout 60 ceph -c "$CONF" --connect-timeout 15 "$@"; }
quiet() { local out; out=$("$@" 2>&1) || { echo "$out" >&2; return 1; }; }

for b in ceph ceph-mon ceph-mgr ceph-osd monmaptool rbd uuidgen timeout awk "$PY"; do
    command -v "$b" >/dev/null || die "missing $b (install ceph-mon ceph-mgr ceph-osd ceph-common: tests/install-deps.sh)"
done
"$PY" -c 'import rados' 2>/dev/null || die "$PY has no 'rados' module (install python3-rados / ceph-common)"

# Never clobber a directory we did not make, nor one whose daemons still run.
if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    [ -f "$DIR/.kiln-ceph" ] || die "$DIR is not empty and was not made by $0"
    for pidf in "$DIR"/run/*.pid; do
        [ -f "$pidf" ] || continue
        if kill -0 "$(cat "$pidf")" 2>/dev/null; then die "$pidf: daemon still running; run ceph-stop.sh $DIR first"; fi
    done
    rm -rf "${DIR:?}"/* "$DIR/.kiln-ceph"
fi
mkdir -p "$DIR"/{mon,mgr,osd,run,log,crash}
touch "$DIR/.kiln-ceph"

# From here on, a failure stops whatever was started.
on_exit() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        log "start failed (rc=$rc); stopping what was started; logs in $DIR/log"
        "$HERE/ceph-stop.sh" "$DIR" >&2 || true
    fi
}
trap on_exit EXIT

# A free loopback port for the mon, chosen by the kernel, so parallel clusters do not collide.
MON_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
FSID=$(uuidgen)

cat > "$CONF" <<EOF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
# loopback only, messenger v2 only
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr1 = false
ms bind msgr2 = true
# no cephx: a client needs only this file
auth cluster required = none
auth service required = none
auth client required = none
# everything under DIR
run dir = $DIR/run
crash dir = $DIR/crash
log file = $DIR/log/\$cluster-\$name.log
# one OSD: size-1 pools, CRUSH picks OSDs rather than hosts (must precede mon mkfs)
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
# keep HEALTH_OK on a test box: size-1 pools, a fullish disk, and (even with auth none)
# AUTH_INSECURE_GLOBAL_ID_RECLAIM_ALLOWED would otherwise keep the cluster in HEALTH_WARN
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mgr initial modules = iostat
# PG stats reach the mon in ~1 s instead of 5 s: HEALTH_OK sooner
mgr stats period = 1
mon mgr digest period = 1
# Every RBD snapshot create/remove is an osdmap (paxos) update; the default 1 s batching
# makes rbd_snap_create take ~1 s. This brings it to ~10 ms.
paxos propose interval = 0.001
paxos min wait = 0.001

[mon]
mon data = $DIR/mon/\$cluster-\$id
mon cluster log file = $DIR/log/\$cluster.log
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$cluster-\$name.asok

[mgr]
mgr data = $DIR/mgr/\$cluster-\$id
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$cluster-\$name.asok

[osd]
osd data = $DIR/osd/\$cluster-\$id
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$cluster-\$name.asok
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd class load list = *
osd class default list = *
osd crush update on start = false
# memstore reports itself rotational ("hdd"); the hdd defaults sleep between snap-trim
# steps, so removed snapshots' clones would linger for minutes
osd snap trim sleep hdd = 0
osd delete sleep hdd = 0
osd recovery sleep hdd = 0
EOF

# Poll with one librados connection instead of spawning the slow `ceph` CLI in a loop.
wait_for() {  # wait_for mon|osd|clean TIMEOUT_SECONDS
    CEPH_CONF="$CONF" "$PY" - "$1" "$2" <<'PYEOF'
import json, sys, time, rados
what, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.time() + timeout
c = rados.Rados(conffile='')
c.conf_set('client_mount_timeout', '5')
while True:
    try:
        c.connect(timeout=5)
        break
    except Exception as e:
        if time.time() > deadline:
            sys.exit("mon never answered: %s" % e)
        time.sleep(0.2)
last = None
while time.time() < deadline:
    ret, out, _ = c.mon_command(json.dumps({"prefix": "status", "format": "json"}), b'')
    if ret == 0:
        s = json.loads(out)
        om, pm = s["osdmap"], s["pgmap"]
        health = s["health"]["status"]
        mgr_ok = s.get("mgrmap", {}).get("available", False)
        npg = pm.get("num_pgs", 0)
        clean = sum(x["count"] for x in pm.get("pgs_by_state", []) if x["state_name"].startswith("active+clean"))
        osd_ok = om.get("num_up_osds", 0) >= 1 and om.get("num_in_osds", 0) >= 1
        last = "health=%s mgr=%s osd_up_in=%s pgs=%d clean=%d checks=%s" % (
            health, mgr_ok, osd_ok, npg, clean, ",".join(s["health"].get("checks", {}).keys()))
        if what == "mon" or (what == "osd" and osd_ok) or \
           (what == "clean" and health == "HEALTH_OK" and mgr_ok and osd_ok and npg == clean):
            c.shutdown()
            sys.exit(0)
    time.sleep(0.2)
sys.exit("timeout waiting for %s; last status: %s" % (what, last))
PYEOF
}

log "mon.a on 127.0.0.1:$MON_PORT, dir $DIR"
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring /dev/null
touch "$DIR/mon/ceph-a/keyring"
ceph-mon -c "$CONF" -i a                      # daemonizes; PID in run/mon.a.pid
wait_for mon 30 || die "mon did not come up (see $DIR/log/ceph-mon.a.log)"
log "mon up"

# The always-on devicehealth module would create its own pool a few seconds after the mgr
# starts, maybe after we said "ready". --force: the mon does not know mgr options yet.
quiet cephc config set mgr mgr/devicehealth/enable_monitoring false --force
mkdir -p "$DIR/mgr/ceph-x"
ceph-mgr -c "$CONF" -i x                      # daemonizes; PID in run/mgr.x.pid
log "mgr started"

OSD_UUID=$(uuidgen)
OSD_ID=$(cephc osd new "$OSD_UUID")
mkdir -p "$DIR/osd/ceph-$OSD_ID"
ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/osd-mkfs.log" 2>&1 \
    || { cat "$DIR/log/osd-mkfs.log" >&2; die "ceph-osd --mkfs failed"; }
# An unknown objectstore name silently becomes bluestore: check what was really made.
[ "$(cat "$DIR/osd/ceph-$OSD_ID/type")" = memstore ] || die "osd was created as $(cat "$DIR/osd/ceph-$OSD_ID/type"), not memstore"
quiet cephc osd crush add "osd.$OSD_ID" 1.0 root=default
ceph-osd -c "$CONF" -i "$OSD_ID" 2>>"$DIR/log/osd-start.log"   # daemonizes; PID in run/osd.N.pid
wait_for osd 60 || die "osd.$OSD_ID did not come up (see $DIR/log/ceph-osd.$OSD_ID.log)"
log "osd.$OSD_ID up"

quiet cephc osd pool create rbd 8 8 replicated
timeout 120 rbd -c "$CONF" pool init rbd
log "pool rbd created"
# A second pool for rbd:POOL backup targets (tests/backup_rbd.rs).
quiet cephc osd pool create kiln-backups 8 8 replicated
timeout 120 rbd -c "$CONF" pool init kiln-backups
log "pool kiln-backups created"

wait_for clean "$READY_TIMEOUT" || { cephc -s >&2 || true; die "cluster not HEALTH_OK within ${READY_TIMEOUT}s"; }
log "cluster ready (HEALTH_OK)"
echo "export CEPH_CONF=$CONF"
