#!/usr/bin/env bash
# Every test of agentcast: formatting, lints, unit and integration tests.
# Installs what it needs on a fresh machine, so CI and a newcomer run the same thing.
set -euo pipefail
cd "$(dirname "$0")/.."

# rustfmt and clippy come with the toolchain here; add them where they don't.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings

echo "== cargo test"
cargo test --locked --all-targets
