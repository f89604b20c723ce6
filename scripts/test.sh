#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests, protocol tests and the root tests that build
# real network namespaces. As root (or with CI set) nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# A hung test must fail the run, not eat the CI budget.
timeout 1500 cargo test --all-targets --locked "$@"
