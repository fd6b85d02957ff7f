#!/usr/bin/env bash
# kiln on PostgreSQL and on several nodes, measured on one machine in one run (RBD on a
# throw-away single-node Ceph, or the cluster of $CEPH_CONF; a throw-away PostgreSQL with
# fsync and synchronous commit ON, as in production):
#   1. the store's cost on one node, same pool, durable against durable:
#      a. `kiln bench snapshot` (in process: kiln's create/delete against the raw librbd
#         call, each store round trip included) on SQLite, then on PostgreSQL;
#      b. `kiln bench api` with 1 client on 1 volume through one `kiln serve` (whole HTTP
#         request: parse, locks, store, librbd, answer) on SQLite, then on PostgreSQL;
#   2. scaling: `kiln bench api` with CLIENTS clients on VOLUMES volumes for DURATION s,
#      through one node on SQLite, then with requests spread over 1, 2 and 3 `kiln serve`
#      nodes sharing that PostgreSQL request by request, then over 2 and 3 nodes volume by
#      volume (`--route volume`: each volume's requests to one node) (each run on a fresh
#      pool);
#      CPU seconds each component used during the run (where the time goes);
#   3. the raw primitive under the same load without kiln (tests/harness/rbd_snap_load.py:
#      rbd_snap_create + rbd_snap_remove from VOLUMES threads — kiln runs one operation per
#      volume at a time — and from CLIENTS threads, one process, one handle per image).
# Prints JSON reports and a summary.
#
#   KILN_BIN=target/release/kiln DURATION=30 tests/harness/bench-multinode.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=tests/harness
KILN_BIN=$(realpath "${KILN_BIN:-target/release/kiln}")
CLIENTS=${CLIENTS:-32} VOLUMES=${VOLUMES:-8} DURATION=${DURATION:-30} ITER=${ITER:-50}
work=$(mktemp -d /var/tmp/kiln-bench-mn.XXXXXX)
# The PostgreSQL server runs as `postgres`, which must reach its directory inside.
chmod 755 "$work"
servers=()
own_ceph=""
cleanup() {
  for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  "$HERE/pg-stop.sh" "$work/pg" --purge || true
  [ -n "$pool" ] && ceph -c "$CEPH_CONF" osd pool delete "$pool" "$pool" --yes-i-really-really-mean-it >/dev/null 2>&1 || true
  [ -n "$own_ceph" ] && "$HERE/ceph-stop.sh" "$own_ceph" --purge || true
  rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${CEPH_CONF:-}" ]; then
  own_ceph="$work/ceph"
  eval "$("$HERE/ceph-start.sh" "$own_ceph")"
fi
eval "$("$HERE/pg-start.sh" "$work/pg" --durable)"
pg_url=$KILN_STORE_URL
unset KILN_STORE_URL
# Every measurement gets a pool of its own, and the previous one is deleted and given time
# to go: a pool slows down as deleted snapshots pile up in it (the OSD trims them, the
# monitor tracks them), so runs in one pool would each start where the last left it.
pool=""
fresh_pool() {
  if [ -n "$pool" ]; then
    ceph -c "$CEPH_CONF" osd pool delete "$pool" "$pool" --yes-i-really-really-mean-it >/dev/null 2>&1 || true
    sleep 10
  fi
  pool="bench-mn-$$-$1"
  ceph -c "$CEPH_CONF" osd pool create "$pool" 8 >/dev/null 2>&1
  rbd -c "$CEPH_CONF" pool init "$pool"
}

config() {  # config NAME STORE_URL|"" PORT
  local f="$work/$1.toml"
  {
    if [ -n "$2" ]; then printf '[store]\nurl = "%s"\n\n' "$2"; fi
    printf '[api]\nlisten = "127.0.0.1:%s"\n\n' "$3"
    printf '[backends.ceph]\ndriver = "rbd"\nceph_conf = "%s"\npool = "%s"\n' "$CEPH_CONF" "$pool"
  } >"$f"
  echo "$f"
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
serve() {  # serve NAME CONFIG PORT: starts a node, waits for it
  KILN_NODE=$1 KILN_LOG=warn "$KILN_BIN" --config "$2" --data-dir "$work/$1" serve >/dev/null 2>"$work/$1.log" &
  servers+=($!)
  for _ in $(seq 1 200); do curl -fs "http://127.0.0.1:$3/healthcheck" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "node $1 did not start: $(cat "$work/$1.log")" >&2; exit 1
}
stop_all() {
  for p in "${servers[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  servers=()
}
cpu() {  # CPU seconds (user+system, reaped children included) per component, as JSON
  python3 - <<'PY'
import os, json
hz = os.sysconf("SC_CLK_TCK"); out = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat") as f: st = f.read()
    except OSError: continue
    comm = st[st.index("(")+1:st.rindex(")")]; f = st[st.rindex(")")+2:].split()
    name = {"ceph-osd":"ceph-osd","ceph-mon":"ceph-mon","ceph-mgr":"ceph-mgr","postgres":"postgres","kiln":"kiln"}.get(comm)
    if name is None and comm.startswith("kiln"): name = "kiln"
    if name is None: continue
    out[name] = out.get(name, 0) + (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / hz
print(json.dumps(out))
PY
}

echo "== machine: $(nproc) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); kiln $("$KILN_BIN" --version)"
echo "== 1a. kiln bench snapshot, $ITER iterations, in process: SQLite, then PostgreSQL (durable)"
fresh_pool 1a
sq=$(config sqlite "" "$(port)")
pgc=$(config pg "$pg_url" "$(port)")
KILN_NODE=n1 "$KILN_BIN" --config "$pgc" --data-dir "$work/n1" store migrate
"$KILN_BIN" --config "$sq" --data-dir "$work/sqlite" --format json bench snapshot --iterations "$ITER" --size 1G >"$work/1a-sqlite.json"
KILN_NODE=n1 "$KILN_BIN" --config "$pgc" --data-dir "$work/n1" --format json bench snapshot --iterations "$ITER" --size 1G >"$work/1a-pg.json"
cat "$work/1a-sqlite.json" "$work/1a-pg.json"

echo "== 1b. kiln bench api, 1 client, 1 volume, ${DURATION}s through one kiln serve: SQLite, then PostgreSQL"
fresh_pool 1b
p=$(port); sq=$(config sqlite "" "$p"); serve sqlite "$sq" "$p"
"$KILN_BIN" --format json bench api --url "http://127.0.0.1:$p" --clients 1 --volumes 1 --duration "$DURATION" >"$work/1b-sqlite.json"
stop_all
p=$(port); pgc=$(config n1 "$pg_url" "$p"); serve n1 "$pgc" "$p"
"$KILN_BIN" --format json bench api --url "http://127.0.0.1:$p" --clients 1 --volumes 1 --duration "$DURATION" >"$work/1b-pg.json"
stop_all
cat "$work/1b-sqlite.json" "$work/1b-pg.json"

raw() {  # raw THREADS TAG
  fresh_pool "raw-$1-$2"
  echo "== 3. raw librbd, $1 threads, $VOLUMES images, ${DURATION}s (fresh pool)"
  /usr/bin/python3 "$HERE/rbd_snap_load.py" "$CEPH_CONF" "$pool" "$VOLUMES" "$1" "$DURATION" | tee "$work/3-$1-$2.json"
}
# The primitive before and after the kiln runs shows how far the cluster itself drifts.
raw "$VOLUMES" before
fresh_pool sqlite
echo "== 2. one node on SQLite: $CLIENTS clients, $VOLUMES volumes, ${DURATION}s (fresh pool)"
p=$(port); sq=$(config sqlite2 "" "$p"); serve sqlite2 "$sq" "$p"
"$KILN_BIN" --format json bench api --url "http://127.0.0.1:$p" --clients "$CLIENTS" --volumes "$VOLUMES" --duration "$DURATION" >"$work/2-sqlite.json"
stop_all
cat "$work/2-sqlite.json"
nodes_run() {  # nodes_run N ROUTE: N nodes on that PostgreSQL, requests spread by ROUTE
  local n=$1 route=$2 tag="$1-$2"
  fresh_pool "nodes-$tag"
  echo "== 2. $n node(s): $CLIENTS clients, $VOLUMES volumes, ${DURATION}s, requests spread over the nodes by $route (fresh pool)"
  urls=()
  for i in $(seq 1 "$n"); do
    p=$(port); c=$(config "n$i" "$pg_url" "$p"); serve "n$i" "$c" "$p"; urls+=(--url "http://127.0.0.1:$p")
  done
  before=$(cpu)
  "$KILN_BIN" --format json bench api "${urls[@]}" --route "$route" --clients "$CLIENTS" --volumes "$VOLUMES" --duration "$DURATION" >"$work/2-$tag.json"
  after=$(cpu)
  stop_all
  cat "$work/2-$tag.json"
  python3 -c "
import json,sys
b,a=json.loads('''$before'''),json.loads('''$after''')
print('cpu seconds during the run:', {k: round(a[k]-b.get(k,0),1) for k in sorted(a)})"
}
# Request by request (a round-robin balancer): every node works on every volume. Volume
# by volume (a balancer hashing on the volume): each volume's requests go to one node.
for n in 1 2 3; do nodes_run "$n" request; done
for n in 2 3; do nodes_run "$n" volume; done

raw "$VOLUMES" after
raw "$CLIENTS" after

echo "== summary"
python3 - "$work" "$VOLUMES" "$CLIENTS" <<'PY'
import json, sys, os
w = sys.argv[1]
j = lambda f: json.load(open(os.path.join(w, f)))
s, p = j("1a-sqlite.json"), j("1a-pg.json")
for k in ("create_ms", "delete_ms", "primitive_ms", "primitive_delete_ms"):
    print(f"1a in process {k} median: sqlite {s[k]['median']:.2f}, postgresql {p[k]['median']:.2f}, ratio {p[k]['median']/s[k]['median']:.2f}")
s, p = j("1b-sqlite.json"), j("1b-pg.json")
print(f"1b one client through kiln serve: create p50 sqlite {s['create']['p50_ms']:.2f} ms, postgresql {p['create']['p50_ms']:.2f} ms, ratio {p['create']['p50_ms']/s['create']['p50_ms']:.2f}")
print(f"   delete p50 sqlite {s['delete']['p50_ms']:.2f} ms, postgresql {p['delete']['p50_ms']:.2f} ms")
r = j("2-sqlite.json")
print(f"2 1 node on SQLite: {r['ops_per_s']:.1f} ops/s, create p50 {r['create']['p50_ms']:.1f} ms p99 {r['create']['p99_ms']:.1f} ms, errors {r['errors']}, stuck {r['stuck']}")
for tag in ("1-request", "2-request", "3-request", "2-volume", "3-volume"):
    r = j(f"2-{tag}.json")
    print(f"2 {tag} node(s): {r['ops_per_s']:.1f} ops/s, create p50 {r['create']['p50_ms']:.1f} ms p99 {r['create']['p99_ms']:.1f} ms, errors {r['errors']}, stuck {r['stuck']}")
for f in sorted(x for x in os.listdir(w) if x.startswith("3-")):
    r = j(f)
    print(f"3 raw librbd ({f[2:-5]}), {r['threads']} threads: {r['ops_per_s']} ops/s, create p50 {r['create_p50_ms']} ms")
PY
