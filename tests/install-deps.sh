#!/usr/bin/env bash
# Installs every system package kiln's test suite needs (Debian 12 / bookworm, as root).
# Idempotent: packages already present are skipped by apt.
#   xfsprogs            real XFS with reflink for the raw file backend tests
#   qemu-utils          qemu-img for the qcow2 file backend, and qemu-storage-daemon, the stand-in
#                       hypervisor of the online qcow2 snapshot tests (already on the rust
#                       machine image; NOT reinstalled from bookworm, which would downgrade the
#                       backports build)
#   ceph-*, lib*-dev    a real single-node Ceph cluster and the librados/librbd the RBD driver loads
#   user-mode-linux     a kernel with device-mapper modules, for the LVM tests
#   lvm2, thin-provisioning-tools, kmod   LVM itself, thin_check/thin_delta, modprobe
#   qemu-guest-agent    the real guest agent the instance-snapshot tests freeze through (run
#                       by the tests as their own process on a socket; no service is enabled)
#   e2fsprogs           mkfs.ext4 and debugfs for the guest filesystems of those tests
#   python3-venv, curl  the venv of the real OpenStack clients (openstackclient, cinderclient,
#                       openstacksdk; pinned, from PyPI) that drive `kiln serve`, and raw HTTP
#   postgresql          the shared store of several kiln nodes: the tests start throw-away
#                       servers of their own (initdb/postgres on a loopback port, as the
#                       `postgres` user); Debian's own cluster is not used
#   iproute2            `ip netns`/veth for the network-cut test of several nodes (its TCP
#                       relay, tests/harness/tcp_relay.py, runs on the machine's python3)
set -euo pipefail
packages=(
  python3-venv curl
  postgresql iproute2
  xfsprogs
  ceph-mon ceph-mgr ceph-osd ceph-common librados-dev librbd-dev
  user-mode-linux lvm2 thin-provisioning-tools kmod
  qemu-guest-agent e2fsprogs
)
{ command -v qemu-img && command -v qemu-storage-daemon; } >/dev/null || packages+=(qemu-utils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install-deps: all test dependencies present" >&2
