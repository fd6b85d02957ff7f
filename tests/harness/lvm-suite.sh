#!/usr/bin/env bash
# lvm-suite.sh — builds kiln-driver-lvm's test binaries on the host, then runs each one as root
# inside a user-mode-Linux guest with real device-mapper (tests/harness/uml-run.sh), one guest
# boot per binary, tests one at a time. Exits non-zero if any binary failed.
#
# Usage: tests/harness/lvm-suite.sh [LIBTEST ARGS...]   e.g. `thin_` or `--nocapture`
# Honours CARGO_TARGET_DIR. Extra runner options via KILN_UML_ARGS (e.g. "--mem 3G").
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
cd "$root"

echo "lvm-suite: building test binaries on the host" >&2
# Cargo prints one JSON line per artifact; the test executables are the lines naming one.
mapfile -t bins < <(
  cargo test -p kiln-driver-lvm --no-run --message-format=json-render-diagnostics |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p'
)
[ ${#bins[@]} -gt 0 ] || { echo "lvm-suite: cargo produced no test binaries" >&2; exit 1; }

read -r -a uml_args <<<"${KILN_UML_ARGS:---mem 2G --timeout 900}"
status=0
for bin in "${bins[@]}"; do
  echo "lvm-suite: running $(basename "$bin") in the guest" >&2
  start=$(date +%s)
  # Cargo runs integration tests with the package directory as cwd; do the same.
  if (cd "$root/drivers/lvm" && "$here/uml-run.sh" "${uml_args[@]}" -- "$bin" --test-threads=1 "$@"); then
    echo "lvm-suite: $(basename "$bin") passed in $(($(date +%s) - start)) s" >&2
  else
    rc=$?
    echo "lvm-suite: $(basename "$bin") FAILED (exit $rc) after $(($(date +%s) - start)) s" >&2
    status=1
  fi
done
exit $status
