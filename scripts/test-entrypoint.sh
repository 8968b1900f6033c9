#!/usr/bin/env bash
# Tests scripts/docker-entrypoint.sh without Docker, with the debug binary:
#  1. run as root on a root-owned empty data folder: the folder becomes uid
#     10001's, the server runs as uid 10001 and answers /health;
#  2. run as uid 10001 on a root-owned 0755 folder: the server stops with the
#     one-line "cannot write data folder" error.
# Needs root (to chown and to drop privileges); creates user 10001 if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "!! SKIPPED: the entrypoint test needs root (it chowns and drops to uid 10001)" >&2
  exit 0
fi
UID_RUN=10001
if ! getent passwd "$UID_RUN" >/dev/null; then
  useradd --system --uid "$UID_RUN" --no-create-home --shell /usr/sbin/nologin agentcast
fi

bin="${CARGO_TARGET_DIR:-target}/debug/agentcast"
[ -x "$bin" ] || cargo build --locked
work="$(mktemp -d)"
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
chmod 755 "$work"
# uid 10001 must be able to run the binary wherever the checkout lives.
cp "$bin" "$work/agentcast"
fail() { echo "entrypoint test FAILED: $*" >&2; exit 1; }

# 1. root, root-owned empty folder.
mkdir "$work/data"
DATA_DIR="$work/data" BIND=127.0.0.1 PORT=0 AGENTCAST_BIN="$work/agentcast" \
  sh scripts/docker-entrypoint.sh serve >"$work/log" 2>&1 &
server=$!
addr=""
for _ in $(seq 1 100); do
  addr="$(grep -o 'ready on http://[0-9.:]*' "$work/log" | head -n1 | sed 's|ready on http://||' || true)"
  [ -n "$addr" ] && break
  kill -0 "$server" 2>/dev/null || { cat "$work/log" >&2; fail "the server exited"; }
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/log" >&2; fail "no ready line within 10 s"; }
[ "$(stat -c %u "$work/data")" = "$UID_RUN" ] || fail "data folder not owned by $UID_RUN"
[ "$(stat -c %u "$work/data/jwt_secret")" = "$UID_RUN" ] || fail "jwt_secret not written by $UID_RUN"
# The entrypoint exec'd: the pid it started as is the server's.
[ "$(awk '/^Uid:/ {print $2}' "/proc/$server/status")" = "$UID_RUN" ] || fail "server not running as $UID_RUN"
curl -fsS --max-time 5 "http://$addr/health" >/dev/null || fail "/health did not answer"
kill -TERM "$server"
wait "$server" || fail "the server did not stop cleanly"
server=""
echo "entrypoint as root: folder chowned to $UID_RUN, server ran as $UID_RUN, /health ok"

# 2. uid 10001, root-owned 0755 folder: one line naming the folder and the user.
mkdir -m 0755 "$work/ro"
status=0
timeout 20 setpriv --reuid="$UID_RUN" --regid="$UID_RUN" --clear-groups -- \
  env DATA_DIR="$work/ro" BIND=127.0.0.1 PORT=0 AGENTCAST_BIN="$work/agentcast" NO_COLOR=1 \
  sh scripts/docker-entrypoint.sh serve >"$work/ro.log" 2>&1 || status=$?
[ "$status" -ne 0 ] || fail "the server started on a folder it cannot write"
[ "$status" -ne 124 ] || fail "the server hung instead of failing"
[ "$(wc -l <"$work/ro.log")" -eq 1 ] || { cat "$work/ro.log" >&2; fail "not exactly one line"; }
grep -q "cannot write data folder $work/ro as uid $UID_RUN" "$work/ro.log" \
  || { cat "$work/ro.log" >&2; fail "the line does not name the folder and the user"; }
echo "entrypoint as $UID_RUN on a root-owned folder: $(cat "$work/ro.log")"
