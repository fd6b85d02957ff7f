#!/bin/bash
# tests/harness/ceph-stop.sh DIR [--purge]
#
# Stops exactly the daemons tests/harness/ceph-start.sh DIR started: the PIDs in
# DIR/run/*.pid, and only while /proc/PID/cmdline still shows a ceph-mon/mgr/osd started
# with DIR/ceph.conf (a recycled PID is never signalled). Order osd, mgr, mon; SIGTERM,
# then SIGKILL after CEPH_STOP_TIMEOUT seconds (default 10). --purge then removes DIR
# (only if ceph-start.sh made it). Always exits 0 unless called wrongly.
set -uo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ] || { [ $# -eq 2 ] && [ "$2" != "--purge" ]; }; then
    echo "usage: $0 DIR [--purge]" >&2
    exit 2
fi
DIR=$(realpath -m "$1")
CONF="$DIR/ceph.conf"
TIMEOUT=${CEPH_STOP_TIMEOUT:-10}

ours() {  # ours PID: true while PID is a ceph daemon started with our ceph.conf
    local cmd
    [ -r "/proc/$1/cmdline" ] || return 1
    cmd=$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null) || return 1
    case "$cmd" in
        *ceph-mon*" $CONF "*|*ceph-mgr*" $CONF "*|*ceph-osd*" $CONF "*) return 0 ;;
    esac
    return 1
}

stop_pidfile() {
    local pidf=$1 pid i
    [ -f "$pidf" ] || return 0
    pid=$(cat "$pidf" 2>/dev/null || true)
    case "$pid" in ''|*[!0-9]*) rm -f "$pidf"; return 0 ;; esac
    if ! ours "$pid"; then rm -f "$pidf"; return 0; fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        ours "$pid" || break
        sleep 0.1
    done
    if ours "$pid"; then
        echo "ceph-stop: pid $pid ($(basename "$pidf" .pid)) ignored SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do ours "$pid" || break; sleep 0.1; done
    fi
    rm -f "$pidf"
}

if [ -d "$DIR/run" ]; then
    for pidf in "$DIR"/run/osd.*.pid "$DIR"/run/mgr.*.pid "$DIR"/run/mon.*.pid "$DIR"/run/*.pid; do
        stop_pidfile "$pidf"
    done
fi

if [ "${2:-}" = "--purge" ] && [ -f "$DIR/.kiln-ceph" ]; then
    rm -rf "${DIR:?}"
fi
exit 0
