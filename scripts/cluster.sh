#!/usr/bin/env bash
# Three agentcast nodes on one machine, sharing a local redis-server: for
# trying cluster mode (README "Running several nodes"), not for production.
#
#   scripts/cluster.sh            # builds once (cargo build --release), then runs
#
# Redis listens on 127.0.0.1:6379, or the next free port when 6379 is taken;
# the nodes on http://127.0.0.1:8081-8083 with one generated JWT_SECRET and
# admin password, distinct NODE_IDs and their own DATA_DIR. Everything lives
# in one temporary folder (logs included) that Ctrl-C removes after stopping
# every process this script started.
#
# AGENTCAST_BIN=path/to/agentcast skips the build and runs that binary.

set -euo pipefail

NODE_PORTS=(8081 8082 8083)
READY_TIMEOUT_S=30

say() { printf 'cluster.sh: %s\n' "$*" >&2; }
fail() { say "$*"; exit 1; }

command -v redis-server >/dev/null 2>&1 \
  || fail "redis-server not found: install it (apt-get install -y redis-server) and run again"

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for port in "${NODE_PORTS[@]}"; do
  if port_in_use "$port"; then
    fail "port $port is already in use: stop what listens there (ss -ltnp 'sport = :$port')"
  fi
done

cd "$(dirname "$0")/.."
if [[ -n "${AGENTCAST_BIN:-}" ]]; then
  bin=$AGENTCAST_BIN
else
  say "building (cargo build --release)…"
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/agentcast"
fi
[[ -x "$bin" ]] || fail "no agentcast binary at $bin"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/agentcast-cluster.XXXXXX")
pids=()

# Stops what this script started (TERM, then KILL after 5 s) and removes the folder.
cleanup() {
  trap - INT TERM EXIT
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
      alive=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  rm -rf "$tmp"
  say "stopped; removed $tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits until $1 (a command) succeeds, while process $2 lives, at most READY_TIMEOUT_S.
wait_for() {
  local check=$1 pid=$2 what=$3 log=$4
  for _ in $(seq $((READY_TIMEOUT_S * 10))); do
    if eval "$check"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      say "$what exited during start; the end of its log:"
      tail -n 20 "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  say "$what not ready after ${READY_TIMEOUT_S}s; the end of its log:"
  tail -n 20 "$log" >&2
  exit 1
}

redis_port=6379
while port_in_use "$redis_port"; do
  redis_port=$((redis_port + 1))
  ((redis_port < 6479)) || fail "no free port for redis-server in 6379-6478"
done
mkdir -p "$tmp/redis"
redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$tmp/redis" \
  --save "" --appendonly no --logfile "$tmp/redis.log" &
pids+=($!)
wait_for "port_in_use $redis_port" "${pids[-1]}" "redis-server" "$tmp/redis.log"

random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
jwt_secret=$(random_hex 32)
admin_password=$(random_hex 12)
# For `agentcast bench --data-dir` and `agentcast token --data-dir`: the
# secret is kept in a file (0600) instead of being printed.
(umask 077 && printf '%s\n' "$jwt_secret" >"$tmp/jwt_secret")

urls=()
for i in "${!NODE_PORTS[@]}"; do
  n=$((i + 1))
  port=${NODE_PORTS[$i]}
  mkdir -p "$tmp/node$n"
  env BIND=127.0.0.1 PORT="$port" NODE_ID="node$n" DATA_DIR="$tmp/node$n" \
    REDIS_URL="redis://127.0.0.1:$redis_port" JWT_SECRET="$jwt_secret" \
    ADMIN_PASSWORD="$admin_password" SHUTDOWN_TIMEOUT=2s \
    "$bin" serve >"$tmp/node$n.log" 2>&1 &
  pids+=($!)
  urls+=("http://127.0.0.1:$port")
done
for i in "${!NODE_PORTS[@]}"; do
  n=$((i + 1))
  wait_for "curl -fsS -o /dev/null ${urls[$i]}/health" "${pids[$((i + 1))]}" \
    "node$n" "$tmp/node$n.log"
done

all_urls=$(IFS=,; echo "${urls[*]}")
cat <<EOF

agentcast cluster: 3 nodes on one redis-server (redis://127.0.0.1:$redis_port)
  node1  ${urls[0]}
  node2  ${urls[1]}
  node3  ${urls[2]}
  admin login: admin / $admin_password (on any node)
  logs:  $tmp/node{1,2,3}.log, $tmp/redis.log

Try it:
  $bin bench --data-dir $tmp --url $all_urls --scenario fanout --conns 300
  $bin token --data-dir $tmp --sub alice

Ctrl-C stops every node and redis-server and removes $tmp.
EOF

# Runs until Ctrl-C, or until one of the processes exits by itself.
set +e
wait -n "${pids[@]}"
status=$?
say "a process exited by itself (status $status); stopping the rest"
exit 1
