#!/usr/bin/env bash
# The whole kiln test suite on a fresh Debian 12 machine (as root): installs the system
# packages the tests need, checks formatting and lints, runs the unit and end-to-end tests
# (file backend on a real loop-mounted XFS and with the real qemu-img; crash tests with fail
# points), the RBD tests against a real single-node Ceph cluster it starts and stops, and the
# LVM tests on real device-mapper inside a user-mode-Linux guest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
phase() { printf '\n=== %s (t+%ss)\n' "$1" "$(( $(date +%s) - start ))" >&2; }

phase "system packages"
tests/install-deps.sh

phase "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --features rbd,failpoints -- -D warnings

phase "unit and end-to-end tests (core, file backend, CLI, crash recovery)"
# The RBD and LVM tests need a cluster / a guest kernel: their suites below run them
# (drivers/rbd, drivers/lvm, tests/cli_rbd.rs, tests/cli_lvm.rs).
cargo test --workspace --exclude kiln --exclude kiln-driver-rbd --exclude kiln-driver-lvm
cargo test -p kiln --features failpoints --bins --test cli --test crash

phase "RBD tests against a real single-node Ceph"
tests/harness/rbd-suite.sh

phase "LVM tests on real device-mapper in user-mode Linux"
tests/harness/lvm-suite.sh

phase "all suites passed"
