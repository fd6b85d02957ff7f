#!/usr/bin/env bash
# The whole kiln test suite on a fresh Debian 12 machine (as root): installs the system
# packages the tests need, checks formatting and lints, then runs three independent suites
# side by side — each on its own real components, so they do not interfere:
#   host  unit tests, the driver contract suite (in-memory + the file backend's three modes),
#         the file driver on a real loop-mounted XFS and real qemu-img, the CLI end to end,
#         crash recovery with fail points, kiln killed while its qemu-img children work,
#         instance snapshots and images with a real qemu-guest-agent freezing loop-mounted
#         guest filesystems on kiln volumes, snapshots of attached qcow2 volumes through a real
#         qemu-storage-daemon's QMP monitor while a guest writes through its NBD exports,
#         the REST API in process, and `kiln serve` driven by the real openstackclient,
#         cinderclient and openstacksdk (tests/harness/api-clients.sh, raw+reflink on XFS);
#         then the service tests and the CLI, crash and backup suites again on the
#         PostgreSQL store (KILN_TEST_STORE=postgres: each test on a fresh database of a
#         throw-away server the test process starts);
#   rbd   the RBD driver and CLI tests against a real single-node Ceph it starts and stops,
#         three `kiln serve` nodes on one PostgreSQL and that Ceph (load, a node SIGKILLed
#         mid-operation, PostgreSQL restarted under load: tests/multinode_rbd.rs),
#         then the interop of kiln's LVM streams with the real `rbd import-diff`
#         (tests/harness/lvm-rbd-interop.sh: streams made in a user-mode-Linux guest, applied
#         on a second throw-away cluster; it runs after the rbd tests, which end well before
#         the lvm suite, so it adds no time);
#         and `kiln serve` driven by the real openstackclient, cinderclient and openstacksdk
#         (tests/harness/api-clients.sh, on raw+reflink on a loop-mounted XFS);
#   lvm   the LVM driver and CLI tests on real device-mapper inside a user-mode-Linux guest.
# Each suite's output goes to its own log, printed when it ends. Exits non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
phase() { printf '\n=== %s (t+%ss)\n' "$1" "$(( $(date +%s) - start ))" >&2; }

phase "system packages"
tests/install-deps.sh

phase "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --features rbd,failpoints -- -D warnings

# Every build of the kiln binary uses these features, in every suite: the suites share the
# target directory, and a test runs the binary at target/debug/kiln (CARGO_BIN_EXE_kiln),
# which is one file whatever the features. Builds with different features running side by
# side would overwrite it under each other's tests (seen: cli_rbd running a kiln built
# without rbd). With one feature set, whichever suite builds it first, the others reuse it.
# (rbd-suite.sh and lvm-suite.sh build the binary with the same features.)
logs=$(mktemp -d /tmp/kiln-run-all.XXXXXX)
host_suite() {
  # The RBD and LVM tests need a cluster / a guest kernel: their suites run them.
  cargo test --workspace --exclude kiln --exclude kiln-driver-rbd --exclude kiln-driver-lvm
  cargo test -p kiln --features rbd,failpoints --bins --test cli --test backup --test crash --test crash_children --test instance --test online_qcow2
  # `kiln serve` driven by the real OpenStack clients (the binary the tests above built).
  KILN_BIN=target/debug/kiln tests/harness/api-clients.sh
  # The same service, CLI, crash and backup suites on the PostgreSQL store.
  KILN_TEST_STORE=postgres cargo test -p kiln-core --lib
  KILN_TEST_STORE=postgres cargo test -p kiln --features rbd,failpoints --test cli --test crash --test crash_children --test backup
}

rbd_suite() {
  local rc=0
  tests/harness/rbd-suite.sh || rc=1
  tests/harness/lvm-rbd-interop.sh || rc=1
  return $rc
}

phase "suites side by side: host, rbd, lvm (logs in $logs)"
declare -A pids
host_suite >"$logs/host.log" 2>&1 & pids[host]=$!
rbd_suite >"$logs/rbd.log" 2>&1 & pids[rbd]=$!
tests/harness/lvm-suite.sh >"$logs/lvm.log" 2>&1 & pids[lvm]=$!

failed=()
for suite in host rbd lvm; do
  if wait "${pids[$suite]}"; then status=passed; else status=FAILED; failed+=("$suite"); fi
  phase "$suite suite $status; its log follows"
  cat "$logs/$suite.log" >&2
done

if [ ${#failed[@]} -gt 0 ]; then
  phase "FAILED: ${failed[*]}"
  exit 1
fi
phase "all suites passed"
