#!/usr/bin/env bash
# `kiln serve` driven by the real OpenStack clients (pinned in api-clients-requirements.txt,
# installed from PyPI into a venv under target/): openstackclient, cinderclient and
# openstacksdk against a server on 127.0.0.1 whose backend is raw+reflink on a real
# loop-mounted XFS, then the same server in `tokens` mode for project isolation. Every
# check prints PASS or FAIL; the script exits non-zero if any failed.
#
#   KILN_BIN=target/debug/kiln tests/harness/api-clients.sh
#
# Needs root (loop mount), python3-venv, xfsprogs, and PyPI (or an existing venv at
# KILN_API_VENV whose requirements match).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
KILN_BIN=$(realpath "${KILN_BIN:-target/debug/kiln}")
VENV=${KILN_API_VENV:-$root/target/api-clients-venv}
REQS=$root/tests/harness/api-clients-requirements.txt

if ! cmp -s "$REQS" "$VENV/requirements.txt" 2>/dev/null; then
  echo "api-clients: creating $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS"
  cp "$REQS" "$VENV/requirements.txt"
fi

work=$(mktemp -d /tmp/kiln-api.XXXXXX)
server=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then kill "$server"; wait "$server" || true; fi
  umount "$work/xfs" 2>/dev/null || umount -l "$work/xfs" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir "$work/xfs" "$work/cfg"
truncate -s 2G "$work/xfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
mount -o loop "$work/xfs.img" "$work/xfs"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
cat >"$work/kiln.toml" <<TOML
[backends.raw]
driver = "file"
path = "$work/xfs/vols"
format = "raw"
TOML
# The shipped etc/clouds.yaml, on this run's port.
sed "s/127.0.0.1:8776/127.0.0.1:$port/" etc/clouds.yaml >"$work/cfg/clouds.yaml"
export OS_CLIENT_CONFIG_FILE=$work/cfg/clouds.yaml

passed=0 failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
expect() { if [ "$3" = "$2" ]; then pass "$1"; else fail "$1: expected [$2], got [$3]"; fi; }
# Runs a command that must fail; its stderr must contain $2.
expect_fail() {
  local what=$1 needle=$2 out
  shift 2
  if out=$("$@" 2>&1); then fail "$what: succeeded: $out"
  elif grep -q -- "$needle" <<<"$out"; then pass "$what"
  else fail "$what: no [$needle] in: $out"; fi
}
os() { "$VENV/bin/openstack" --os-cloud kiln "$@"; }
# cinderclient's own noauth: token "admin:default", project in every URL (/v3/default/...).
cin() { "$VENV/bin/cinder" --os-auth-type noauth --os-user-id admin --os-project-id default --os-endpoint "$base/v3" "$@"; }
k() { "$KILN_BIN" --config "$work/kiln.toml" --data-dir "$work/data" --format json "$@"; }
jf() { python3 -c 'import json,sys; d=json.load(sys.stdin)
for k in sys.argv[1].split("."): d=d[int(k)] if isinstance(d, list) else d[k]
print(d if not isinstance(d,(dict,list)) else json.dumps(d, sort_keys=True))' "$1"; }
wait_status() { # kind name-or-id status
  local s=""
  for _ in $(seq 1 100); do
    s=$(os "$1" show "$2" -f value -c status 2>/dev/null || true)
    [ "$s" = "$3" ] && return 0
    sleep 0.1
  done
  echo "wait_status: $1 $2 is [$s], not $3" >&2
  return 1
}

start_server() { # config
  "$KILN_BIN" --config "$1" --data-dir "$work/data" --log-format json serve --listen "127.0.0.1:$port" \
    >>"$work/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do
    curl -fs "$base/healthcheck" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  cat "$work/serve.log"
  echo "kiln serve did not start" >&2
  exit 1
}
stop_server() {
  kill -TERM "$server"
  local rc=0
  wait "$server" || rc=$?
  server=""
  expect "kiln serve exits 0 on SIGTERM" 0 "$rc"
}

start_server "$work/kiln.toml"
instance=6f1c1a10-2a7e-4d07-9c1e-0d2a3b4c5d6e

# --- openstackclient: volumes -----------------------------------------------------------
os volume create --size 1 --description "first volume" --property tier=gold vol1 -f json >"$work/v1.json"
expect "openstack volume create: available at once" available "$(jf status <"$work/v1.json")"
expect "volume create: size in GiB" 1 "$(jf size <"$work/v1.json")"
v1=$(jf id <"$work/v1.json")
expect "volume list shows it" vol1 "$(os volume list -f value -c Name)"
os volume show vol1 -f json >"$work/v1s.json"
expect "volume show by name: description" "first volume" "$(jf description <"$work/v1s.json")"
expect "volume show: properties" '{"tier": "gold"}' "$(jf properties <"$work/v1s.json")"
expect "volume show: bootable is false" False "$(jf bootable <"$work/v1s.json")"
expect "volume show: no attachments" "[]" "$(jf attachments <"$work/v1s.json")"
expect "the CLI sees the API's volume" vol1 "$(k volume show "$v1" | jf name)"

# Attach through Cinder's os-attach (Nova's call), then snapshot while attached.
curl -fs -X POST "$base/v3/volumes/$v1/action" -H 'Content-Type: application/json' \
  -d "{\"os-attach\": {\"instance_uuid\": \"$instance\", \"mountpoint\": \"/dev/vdb\"}}"
expect "os-attach: in-use" in-use "$(os volume show vol1 -f value -c status)"
os volume snapshot create --volume vol1 --force --description "while attached" snap1 -f json >"$work/s1.json"
expect "openstack volume snapshot create --force on an in-use volume" available "$(jf status <"$work/s1.json")"
s1=$(jf id <"$work/s1.json")
expect "snapshot list" snap1 "$(os volume snapshot list -f value -c Name)"
os volume snapshot set --property kind=daily snap1
os volume snapshot show snap1 -f json >"$work/s1s.json"
expect "snapshot set --property, then show" '{"kind": "daily"}' "$(jf properties <"$work/s1s.json")"
# openstackclient hides the extended attributes; the API's own answer has them.
expect "snapshot detail: progress" 100% \
  "$(curl -fs "$base/v3/snapshots/$s1" | jf snapshot.os-extended-snapshot-attributes:progress)"
expect "snapshot show: description" "while attached" "$(jf description <"$work/s1s.json")"

cin snapshot-create --force --name snap2 "$v1" >/dev/null
expect "cinder snapshot-create --force on an in-use volume" available "$(os volume snapshot show snap2 -f value -c status)"
expect_fail "cinder snapshot-create without --force at 3.0 on an in-use volume" "in-use" \
  cin --os-volume-api-version 3.0 snapshot-create --name snap3 "$v1"
expect "the refused snapshot left nothing" "snap1 snap2" "$(os volume snapshot list -f value -c Name | sort | xargs)"

# openstacksdk: attach (a second device on another volume), force snapshot, wait_for_*.
os volume create --size 1 vol-sdk >/dev/null
sdk_out=$("$VENV/bin/python" tests/harness/api_sdk_check.py kiln vol-sdk 7d2c1a10-2a7e-4d07-9c1e-0d2a3b4c5d6e 2>&1) && sdk_rc=0 || sdk_rc=$?
echo "$sdk_out" | sed 's/^/  sdk: /'
expect "openstacksdk attach/create_snapshot(force)/wait_for_status/wait_for_delete/detach" 0 "$sdk_rc"

# Cinder's attachments API: a reservation, completed, deleted; one made with a connector.
os volume create --size 1 vol-att >/dev/null
att_v=$(os volume show vol-att -f value -c id)
att_srv=8e3c1a10-2a7e-4d07-9c1e-0d2a3b4c5d6e
field_of() { awk -F'|' -v k="$1" '{gsub(/^ +| +$/, "", $2); gsub(/^ +| +$/, "", $3)} $2 == k {print $3; exit}'; }
cin --os-volume-api-version 3.27 attachment-create "$att_v" "$att_srv" >"$work/att.txt"
att=$(field_of id <"$work/att.txt")
expect "attachment-create prints the attachment's id" 36 "${#att}"
expect "cinder attachment-create without a connector: reserved" reserved "$(field_of status <"$work/att.txt")"
expect "... and the volume is reserved" reserved "$(os volume show vol-att -f value -c status)"
expect "cinder attachment-list shows it" "$att" "$(cin --os-volume-api-version 3.27 attachment-list | awk -F'|' -v id="$att" 'index($2, id) {gsub(/ /, "", $2); print $2}')"
expect "cinder attachment-show" "$att_v" "$(cin --os-volume-api-version 3.27 attachment-show "$att" | field_of volume_id)"
cin --os-volume-api-version 3.44 attachment-complete "$att"
expect "cinder attachment-complete (3.44): attached" attached "$(cin --os-volume-api-version 3.27 attachment-show "$att" | field_of status)"
expect "... and the volume is in-use" in-use "$(os volume show vol-att -f value -c status)"
cin --os-volume-api-version 3.27 attachment-delete "$att"
expect "cinder attachment-delete: the volume is available" available "$(os volume show vol-att -f value -c status)"
expect "... and the attachment is gone" "" "$(cin --os-volume-api-version 3.27 attachment-list | awk -F'|' -v id="$att" 'index($2, id)')"
cin --os-volume-api-version 3.54 attachment-create --connect True --initiator iqn.test --ip 127.0.0.1 \
  --host host1 --mountpoint /dev/vdd --mode rw "$att_v" "$att_srv" >"$work/att2.txt"
expect "attachment-create with a connector: attaching" attaching "$(field_of status <"$work/att2.txt")"
expect "... its connection_info names the volume's file" file "$(field_of driver_volume_type <"$work/att2.txt")"
expect "... at the connector's mountpoint" /dev/vdd "$(k volume show "$att_v" | jf attachments.0.device)"
cin --os-volume-api-version 3.27 attachment-delete "$(field_of id <"$work/att2.txt")"
os volume delete vol-att

# Detach, then revert to the older snapshot (3.40).
curl -fs -X POST "$base/v3/volumes/$v1/action" -H 'Content-Type: application/json' -d '{"os-detach": {}}'
expect "os-detach: available" available "$(os volume show vol1 -f value -c status)"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$base/v3/volumes/$v1/action" \
  -H 'OpenStack-API-Version: volume 3.39' -d "{\"revert\": {\"snapshot_id\": \"$s1\"}}")
expect "revert at 3.39 is 404, as in Cinder" 404 "$code"
os --os-volume-api-version 3.40 volume revert snap1
wait_status volume vol1 available && pass "openstack --os-volume-api-version 3.40 volume revert (any snapshot)" \
  || fail "revert did not finish"

# cinderclient: a volume from a snapshot, reset-state (admin).
cin create --snapshot-id "$s1" --name clone1 >/dev/null
wait_status volume clone1 available && pass "cinder create --snapshot-id: available" || fail "clone did not finish"
expect "the clone records its snapshot" "$s1" "$(os volume show clone1 -f value -c snapshot_id)"
expect "the clone's size defaults to the snapshot's" 1 "$(os volume show clone1 -f value -c size)"
cin reset-state --state error clone1
expect "cinder reset-state --state error" error "$(os volume show clone1 -f value -c status)"
cin reset-state --state available clone1
expect "cinder reset-state --state available" available "$(os volume show clone1 -f value -c status)"
expect "reset-state is in the CLI's history" 2 "$(k volume history "$(os volume show clone1 -f value -c id)" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')"

# Nova's createImage on an instance kiln knows, with two attached volumes, then Glance.
srv=0a7e2c10-1b2c-4d3e-8f40-5a6b7c8d9e0f
k instance create --id "$srv" --name srv1 --root-device /dev/vda --property hw_disk_bus=virtio >/dev/null
root_v=$(os volume create --size 1 srv-root -f value -c id)
data_v=$(os volume create --size 1 srv-data -f value -c id)
for x in "$root_v /dev/vda" "$data_v /dev/vdb"; do
  set -- $x
  curl -fs -X POST "$base/v3/volumes/$1/action" -d "{\"os-attach\": {\"instance_uuid\": \"$srv\", \"mountpoint\": \"$2\"}}"
done
os server show srv1 -f json >"$work/srv.json"
expect "openstack server show (by name): ACTIVE" ACTIVE "$(jf status <"$work/srv.json")"
expect "server show: both volumes attached" 2 \
  "$(python3 -c 'import json,sys; print(len(json.load(sys.stdin)["volumes_attached"]))' <"$work/srv.json")"
os server image create --name img1 --property purpose=backup srv1 -f json >"$work/img.json"
expect "openstack server image create: the image exists at once" active "$(jf status <"$work/img.json")"
img=$(jf id <"$work/img.json")
os image show img1 -f json >"$work/imgs.json"
expect "openstack image show: size 0, raw/bare" "0 raw bare" \
  "$(jf size <"$work/imgs.json") $(jf disk_format <"$work/imgs.json") $(jf container_format <"$work/imgs.json")"
bdm=$(python3 -c 'import json,sys; p=json.load(sys.stdin)["properties"]; m=json.loads(p["block_device_mapping"])
print(" ".join(sorted(e["device_name"] + ":" + e["source_type"] for e in m)), p["root_device_name"], p["purpose"], p["hw_disk_bus"])' <"$work/imgs.json")
expect "image properties: block_device_mapping lists a snapshot per volume" \
  "/dev/vda:snapshot /dev/vdb:snapshot /dev/vda backup virtio" "$bdm"
snap_vols=$(for sid in $(k image show "$img" | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["snapshots"]))'); do
  k snapshot show "$sid" | jf volume_id
done | sort | xargs)
expect "the image lists one snapshot of each attached volume" "$(printf '%s\n' "$root_v" "$data_v" | sort | xargs)" "$snap_vols"
expect "openstack image list" img1 "$(os image list -f value -c Name)"
os image delete img1
for _ in $(seq 1 100); do os image show "$img" >/dev/null 2>&1 || break; sleep 0.1; done
expect_fail "a deleted image is 404" "No Image found\|Could not find\|404" os image show "$img"
expect "image delete removed its snapshots" "" "$(k snapshot list | python3 -c 'import json,sys; print(" ".join(s["id"] for s in json.load(sys.stdin) if s.get("image_id")))')"
for v in "$root_v" "$data_v"; do
  curl -fs -X POST "$base/v3/volumes/$v/action" -d '{"os-detach": {}}'
done
os volume delete srv-root srv-data

# Deletes: snapshots, a volume with snapshots needs --cascade.
os volume snapshot delete snap2
for _ in $(seq 1 50); do os volume snapshot show snap2 >/dev/null 2>&1 || break; sleep 0.1; done
expect_fail "a deleted snapshot is 404" "No Snapshot found for snap2" os volume snapshot show snap2
expect_fail "volume delete without --cascade refuses a volume with snapshots" "snapshot" os volume delete vol1
expect "the refused delete changed nothing" available "$(os volume show vol1 -f value -c status)"
os volume delete --cascade vol1
for _ in $(seq 1 100); do os volume show vol1 >/dev/null 2>&1 || break; sleep 0.1; done
expect_fail "volume delete --cascade: the volume is 404" "No Volume found for vol1" os volume show vol1
expect "... and its snapshots are gone" "" "$(os volume snapshot list -f value -c Name)"
os volume delete clone1 vol-sdk
for _ in $(seq 1 100); do [ -z "$(os volume list -f value -c ID)" ] && break; sleep 0.1; done
expect "every volume deleted" "" "$(os volume list -f value -c ID)"
expect "the store agrees" "[]" "$(k volume list)"
# A short load through the server and, at the same time, through the CLI on the same data
# directory (the store and the locks are shared): 8 + 4 clients creating and deleting
# snapshots for 3 s.
"$KILN_BIN" --format json bench api --url "$base" --clients 8 --volumes 2 --duration 3 >"$work/load.json" &
load_api=$!
k bench api --mode cli --clients 4 --volumes 2 --duration 3 >"$work/load-cli.json" && cli_rc=0 || cli_rc=$?
wait "$load_api" && api_rc=0 || api_rc=$?
expect "kiln bench api (server and CLI side by side): both exit 0" "0 0" "$api_rc $cli_rc"
for f in load load-cli; do
  expect "load ($f): no errors, no snapshot stuck or in error" "{} 0 0" \
    "$(jf errors <"$work/$f.json") $(jf stuck <"$work/$f.json") $(jf in_error <"$work/$f.json")"
  expect "load ($f): every create has its delete" "$(jf creates <"$work/$f.json")" "$(jf deletes <"$work/$f.json")"
done
expect "load: its volumes are gone" "[]" "$(k volume list)"
expect "the backend holds no volume file" "" "$(ls "$work/xfs/vols" | grep -v '^kiln-file-backend.json$' || true)"
stop_server

# --- tokens mode: project isolation -------------------------------------------------------
cat >"$work/tokens.toml" <<TOML
[[tokens]]
token = "alice-token-0123456789"
user = "alice"
project = "proj-a"
roles = ["member"]
[[tokens]]
token = "bob-token-0123456789ab"
user = "bob"
project = "proj-b"
roles = ["member"]
[[tokens]]
token = "root-token-0123456789a"
user = "root"
project = "admin"
roles = ["admin"]
TOML
cat >"$work/kiln-tokens.toml" <<TOML
[backends.raw]
driver = "file"
path = "$work/xfs/vols"
format = "raw"
[api]
auth = "tokens"
token_file = "tokens.toml"
[api.quotas]
volumes = 2
TOML
start_server "$work/kiln-tokens.toml"
{
  echo "clouds:"
  for u in alice:alice-token-0123456789 bob:bob-token-0123456789ab root:root-token-0123456789a \
    nobody:not-a-token-at-all; do
    cat <<YAML
  ${u%%:*}:
    auth_type: admin_token
    auth:
      endpoint: $base/v3
      token: ${u#*:}
    block_storage_endpoint_override: $base/v3
    block_storage_api_version: 3
    compute_endpoint_override: $base/compute/v2.1
YAML
  done
} >"$work/cfg/clouds.yaml"
as() { # cloud, then openstack arguments
  local c=$1
  shift
  "$VENV/bin/openstack" --os-cloud "$c" "$@" 2>&1
}
A=alice B=bob R=root
as $A volume create --size 1 a-vol -f value -c id >"$work/a.id" || { cat "$work/a.id"; exit 1; }
a=$(cat "$work/a.id")
as $A volume snapshot create --volume "$a" a-snap -f value -c id >"$work/as.id"
as_=$(cat "$work/as.id")
expect "alice lists her volume" a-vol "$(as $A volume list -f value -c Name)"
expect "bob lists nothing" "" "$(as $B volume list -f value -c Name)"
expect_fail "bob cannot show alice's volume (404)" "No Volume found" as $B volume show "$a"
expect_fail "bob cannot snapshot it (404)" "No Volume found" as $B volume snapshot create --volume "$a" b-snap
expect_fail "bob cannot see her snapshot (404)" "No Snapshot found" as $B volume snapshot show "$as_"
expect_fail "bob cannot revert it (404)" "No Snapshot found" as $B --os-volume-api-version 3.40 volume revert "$as_"
expect_fail "bob cannot delete it (404)" "No Volume found" as $B volume delete "$a"
expect "alice's volume is untouched" available "$(as $A volume show "$a" -f value -c status)"
expect_fail "a bad token is 401" "401\|authentication" as nobody volume list
code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Auth-Token: alice-token-0123456789" "$base/v3/proj-b/volumes")
expect "alice's token with proj-b in the URL is 400" 400 "$code"
expect "the admin sees every project with --all-projects" "a-vol" "$(as $R volume list --all-projects -f value -c Name)"
expect "the admin's own list is empty" "" "$(as $R volume list -f value -c Name)"
as $A volume create --size 1 a-vol2 >/dev/null
expect_fail "a third volume exceeds alice's quota (413)" "413\|quota\|Quota" as $A volume create --size 1 a-vol3
limits=$(curl -s -H "X-Auth-Token: alice-token-0123456789" "$base/v3/limits")
expect "limits: maxTotalVolumes" 2 "$(jf limits.absolute.maxTotalVolumes <<<"$limits")"
expect "limits: totalVolumesUsed" 2 "$(jf limits.absolute.totalVolumesUsed <<<"$limits")"
k instance create --id 1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b --name srv-a --project proj-a >/dev/null
expect "kiln instance create --project: alice sees her server" ACTIVE "$(as $A server show srv-a -f value -c status)"
expect_fail "bob does not see it (404)" "No Server found" as $B server show 1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b
expect_fail "kiln instance create --project refuses a bad project id" "invalid project" \
  k instance create --name bad --project "../x"
expect "bob's quota is his own" available "$(as $B volume create --size 1 b-vol -f value -c status)"
stop_server

# SIGTERM under load: requests in flight finish, background deletes finish or stay
# journaled — no snapshot is left in a transitional status without its journal entry.
start_server "$work/kiln.toml"
"$KILN_BIN" --format json bench api --url "$base" --clients 8 --volumes 2 \
  --duration 4 >"$work/load-term.json" 2>&1 &
load=$!
sleep 2
stop_server
wait "$load" || true
stranded=$(python3 - "$work/data/kiln.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
journaled = {r[0] for r in db.execute("SELECT snapshot_id FROM operations WHERE snapshot_id IS NOT NULL")}
print(sum(1 for (sid, st) in db.execute("SELECT id, status FROM snapshots")
          if st not in ("available", "error") and sid not in journaled))
PY
)
expect "SIGTERM mid-load: no snapshot in a transitional status without its journal entry" 0 "$stranded"
start_server "$work/kiln.toml"
expect "after a restart nothing is left in a transitional status" "" \
  "$(k snapshot list | python3 -c 'import json,sys; print(" ".join(s["status"] for s in json.load(sys.stdin) if s["status"] not in ("available", "error")))')"
stop_server

grep -q '"request_id":"req-' "$work/serve.log" && pass "access log: one JSON line per request with its request id" \
  || fail "no structured access log"
echo "api-clients: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
