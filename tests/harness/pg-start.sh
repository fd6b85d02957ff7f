#!/bin/bash
# tests/harness/pg-start.sh DIR [--durable]
#
# Starts a throw-away PostgreSQL server for kiln's multi-node tests and benchmarks, without
# systemd, with everything (data, log, socket, PID file) under DIR: `initdb` with trust
# authentication for the superuser `kiln`, the server on a free 127.0.0.1 port. Creates the
# database `kiln`, and prints exactly one line on stdout:
#
#     export KILN_STORE_URL=postgresql://kiln@127.0.0.1:PORT/kiln KILN_PG_DIR=DIR
#
# so callers can `eval "$(tests/harness/pg-start.sh DIR)"`. Without --durable, fsync and
# synchronous commit are off (tests never cut the power); benchmarks pass --durable, as a
# production server runs. Run as root, the server runs as the `postgres` system user
# (PostgreSQL refuses root). Stop with tests/harness/pg-stop.sh DIR [--purge]; restart in
# place with tests/harness/pg-stop.sh DIR && tests/harness/pg-start.sh DIR (same port).
#
# Needs (Debian): postgresql (tests/install-deps.sh).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 DIR [--durable]" >&2
    exit 2
fi
DIR=$(realpath -m "$1")
DURABLE=off
[ "${2:-}" = "--durable" ] && DURABLE=on

BIN=${KILN_PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$BIN/initdb" ] || { echo "pg-start: no PostgreSQL server binaries: apt-get install postgresql" >&2; exit 1; }

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown postgres: "$DIR"
chmod 700 "$DIR"
if [ ! -f "$DIR/data/PG_VERSION" ]; then
    as_owner "$BIN/initdb" --auth=trust --username=kiln --encoding=UTF8 --no-sync \
        --pgdata "$DIR/data" >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; exit 1; }
fi
if [ -f "$DIR/port" ]; then
    PORT=$(cat "$DIR/port")
else
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "$PORT" >"$DIR/port"
fi
as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start -o \
    "-h 127.0.0.1 -p $PORT -k $DIR -c fsync=$DURABLE -c synchronous_commit=$DURABLE -c full_page_writes=$DURABLE -c max_connections=400" >&2
URL="postgresql://kiln@127.0.0.1:$PORT"
if ! psql "$URL/postgres" -Atqc "SELECT 1 FROM pg_database WHERE datname = 'kiln'" | grep -q 1; then
    psql "$URL/postgres" -qc "CREATE DATABASE kiln" >&2
fi
echo "export KILN_STORE_URL=$URL/kiln KILN_PG_DIR=$DIR"
