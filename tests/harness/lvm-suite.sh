#!/usr/bin/env bash
# lvm-suite.sh — builds kiln-driver-lvm's test binaries and the kiln CLI's LVM end-to-end test
# (tests/cli_lvm.rs, with the kiln binary it runs) on the host, then runs each one as root
# inside a user-mode-Linux guest with real device-mapper (tests/harness/uml-run.sh), one guest
# boot per binary, tests one at a time. Exits non-zero if any binary failed.
#
# Usage: tests/harness/lvm-suite.sh [LIBTEST ARGS...]   e.g. `thin_` or `--nocapture`
# LVM_SUITE_PARTS selects the runs: "driver cli" (default), "driver" or "cli".
# Honours CARGO_TARGET_DIR. Extra runner options via KILN_UML_ARGS (e.g. "--mem 3G").
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
cd "$root"

parts=${LVM_SUITE_PARTS:-driver cli}
for p in $parts; do
  case $p in driver | cli) ;; *) echo "lvm-suite: unknown part $p in LVM_SUITE_PARTS (use driver, cli)" >&2; exit 2 ;; esac
done
[ -n "$parts" ] || { echo "lvm-suite: LVM_SUITE_PARTS is empty (use driver, cli)" >&2; exit 2; }

# Cargo prints one JSON line per artifact; the test executables are the lines naming one.
executables() { sed -n 's/.*"executable":"\([^"]*\)".*/\1/p'; }
# Each run: "<cwd>|<binary>" (cargo runs integration tests with the package directory as cwd).
runs=()
for p in $parts; do
  case $p in
    driver)
      echo "lvm-suite: building kiln-driver-lvm's test binaries on the host" >&2
      mapfile -t bins < <(cargo test -p kiln-driver-lvm --no-run --message-format=json-render-diagnostics | executables)
      [ ${#bins[@]} -gt 0 ] || { echo "lvm-suite: cargo produced no kiln-driver-lvm test binaries" >&2; exit 1; }
      for b in "${bins[@]}"; do runs+=("$root/drivers/lvm|$b"); done
      ;;
    cli)
      # The same command builds the kiln binary that cli_lvm runs (CARGO_BIN_EXE_kiln).
      echo "lvm-suite: building the CLI test cli_lvm and the kiln binary on the host" >&2
      # Its artifacts include the kiln binary itself: keep only the cli_lvm test target's.
      mapfile -t bins < <(cargo test -p kiln --features rbd,failpoints --test cli_lvm --no-run --message-format=json-render-diagnostics |
        grep -F '"kind":["test"]' | grep -F '"name":"cli_lvm"' | executables)
      [ ${#bins[@]} -eq 1 ] || { echo "lvm-suite: expected one cli_lvm binary, got ${#bins[@]}" >&2; exit 1; }
      runs+=("$root|${bins[0]}")
      ;;
  esac
done

read -r -a uml_args <<<"${KILN_UML_ARGS:---mem 2G --timeout 900}"
status=0
for r in "${runs[@]}"; do
  dir=${r%%|*} bin=${r#*|}
  echo "lvm-suite: running $(basename "$bin") in the guest" >&2
  start=$(date +%s)
  if (cd "$dir" && "$here/uml-run.sh" "${uml_args[@]}" -- "$bin" --test-threads=1 "$@"); then
    echo "lvm-suite: $(basename "$bin") passed in $(($(date +%s) - start)) s" >&2
  else
    rc=$?
    echo "lvm-suite: $(basename "$bin") FAILED (exit $rc) after $(($(date +%s) - start)) s" >&2
    status=1
  fi
done
exit $status
