#!/bin/bash
# tests/harness/pg-stop.sh DIR [--purge]
#
# Stops the throw-away PostgreSQL that tests/harness/pg-start.sh started in DIR (fast
# shutdown: clients are disconnected). --purge also removes DIR. Safe to call when it is
# not running.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 DIR [--purge]" >&2
    exit 2
fi
DIR=$(realpath -m "$1")
BIN=${KILN_PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
if [ -f "$DIR/data/postmaster.pid" ]; then
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >&2 || true
    else
        "$BIN/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >&2 || true
    fi
fi
if [ "${2:-}" = "--purge" ]; then
    rm -rf "$DIR"
fi
