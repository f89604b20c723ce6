#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests, protocol tests, the root tests that build
# real network namespaces, and the real-runtime run (scripts/runtime-e2e.sh). As root (or with
# CI set) nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# A hung test must fail the run, not eat the CI budget.
timeout 1500 cargo test --all-targets --locked "$@"
# The real-runtime run (containerd + the image, through CRI): root only; under CI it must run.
if [[ $(id -u) -eq 0 ]]; then
  timeout 400 ./scripts/runtime-e2e.sh
elif [[ -n ${CI:-} ]]; then
  echo "test: the real-runtime run needs root, and CI is set" >&2; exit 1
else
  echo "SKIP real-runtime run: needs root (containerd, network namespaces)" >&2
fi
