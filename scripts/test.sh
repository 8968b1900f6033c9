#!/usr/bin/env bash
# Every test of agentcast: formatting, lints, unit and integration tests, the
# HTTP API against its OpenAPI document (schemathesis), then the browser tests of
# the pages (Debian's chromium driven by playwright-core).
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

# The cluster tests start their own redis-server processes (free port, temp dir);
# the rediss:// test makes its certificates with openssl.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1 \
  || ! command -v openssl >/dev/null 2>&1; then
  echo "== installing redis-server, openssl"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools openssl >/dev/null
fi

# The alert rules: promtool comes with Debian's prometheus package. Its
# recommends (node-exporter) are skipped, and a prometheus daemon the package
# may have started (on a machine with systemd) is stopped and disabled: the
# tests need the tool, never a running server.
if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing prometheus (for promtool)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

echo "== promtool: the alert rules and their unit tests"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml

echo "== cargo test"
cargo test --locked --all-targets

# The single-node suites that are not about the SQLite store, again with each
# server a one-node cluster on a redis-server of its own (tests/api/helpers.rs);
# the views read Redis there (a restart would meet an empty Redis: skipped; the
# cluster suites test restarts with Redis's data).
echo "== cargo test (the same suites on the Redis engine)"
AGENTCAST_TEST_REDIS=1 cargo test --locked --test api -- \
  publish:: ws:: resume:: limits:: auth:: http:: hardening_ws:: views:: task_view:: accounts:: api_keys:: \
  channels:: \
  --skip views_survive_a_restart --skip a_restart_keeps_accounts_and_api_keys \
  --skip channels_survive_a_clean_restart

echo "== docker entrypoint (without Docker: root-owned folder, drop to uid 10001)"
scripts/test-entrypoint.sh

# ---- browser tests -------------------------------------------------------------
# A browser from the distribution (never a downloaded build): chromium from apt.
CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM_PATH" ]; then
  echo "== installing chromium"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
export CHROMIUM_PATH

# playwright-core only (it downloads no browser), pinned by the committed lock file.
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  echo "== npm ci (tests/e2e)"
  (cd tests/e2e && npm ci --no-audit --no-fund)
fi

echo "== cargo build (the binary schemathesis and the browser tests run)"
cargo build --locked

# The HTTP API against its own OpenAPI document (a pinned schemathesis in a venv).
echo "== schemathesis"
scripts/schemathesis.sh

echo "== browser tests"
# Every endpoint the pages use exists: a test that skips hides a gap, so it fails the run.
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
(cd tests/e2e && node --test --test-concurrency=1 --test-reporter=spec .) | tee "$report"
if ! grep -Eq '^ℹ skipped 0$' "$report" || ! grep -Eq '^ℹ todo 0$' "$report"; then
  echo "browser tests: a test was skipped or left as todo; none may be" >&2
  exit 1
fi
