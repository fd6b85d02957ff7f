#!/usr/bin/env bash
# lvm-suite.sh — builds kiln-driver-lvm's test binaries and the kiln binary's LVM end-to-end
# tests (tests/cli_lvm.rs; tests/instance_lvm.rs: instance snapshots of thin + thick + file
# volumes with a real qemu-guest-agent in the guest) with the kiln binary they run, on the host,
# then runs each one as root inside a user-mode-Linux guest with real device-mapper
# (tests/harness/uml-run.sh), one guest boot per binary, tests one at a time. Exits non-zero if
# any binary failed.
#
# Usage: tests/harness/lvm-suite.sh [LIBTEST ARGS...]   e.g. `thin_` or `--nocapture`
# LVM_SUITE_PARTS selects the runs, any of "driver cli instance" (the default: all three).
# Honours CARGO_TARGET_DIR. Extra runner options via KILN_UML_ARGS (e.g. "--mem 3G").
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
cd "$root"

parts=${LVM_SUITE_PARTS:-driver cli instance}
for p in $parts; do
  case $p in driver | cli | instance) ;; *) echo "lvm-suite: unknown part $p in LVM_SUITE_PARTS (use driver, cli, instance)" >&2; exit 2 ;; esac
done
[ -n "$parts" ] || { echo "lvm-suite: LVM_SUITE_PARTS is empty (use driver, cli, instance)" >&2; exit 2; }

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
    cli | instance)
      # cli: cli_lvm; instance: instance_lvm (needs qemu-ga, e2fsprogs and xfsprogs, which the
      # guest sees through its hostfs root). The same command builds the kiln binary the test
      # runs (CARGO_BIN_EXE_kiln), with the features every suite uses.
      t=$([ "$p" = cli ] && echo cli_lvm || echo instance_lvm)
      echo "lvm-suite: building the end-to-end test $t and the kiln binary on the host" >&2
      # Its artifacts include the kiln binary itself: keep only the test target's.
      mapfile -t bins < <(cargo test -p kiln --features rbd,failpoints --test "$t" --no-run --message-format=json-render-diagnostics |
        grep -F '"kind":["test"]' | grep -F "\"name\":\"$t\"" | executables)
      [ ${#bins[@]} -eq 1 ] || { echo "lvm-suite: expected one $t binary, got ${#bins[@]}" >&2; exit 1; }
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
