#!/bin/sh
# Entrypoint of the agentcast image: start on any data folder, as uid 10001.
#
# Started as root (the image's default), it creates DATA_DIR, hands it to the
# unprivileged user when it belongs to someone else (a root-owned bind mount
# or Kubernetes volume, where the first start could not create jwt_secret or
# the database), then re-executes agentcast as that user. Started as any other
# user (`docker run --user …`, fly's volumes), it runs agentcast as is; if that
# user cannot write the folder, agentcast itself stops with one line naming
# the folder and the user.
set -eu

AGENTCAST_BIN="${AGENTCAST_BIN:-/usr/local/bin/agentcast}"
AGENTCAST_UID="${AGENTCAST_UID:-10001}"
DATA_DIR="${DATA_DIR:-/data}"

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$DATA_DIR"
  # Only when needed: a large store is not walked on every start.
  if [ "$(stat -c %u "$DATA_DIR")" != "$AGENTCAST_UID" ]; then
    chown -R "$AGENTCAST_UID:$AGENTCAST_UID" "$DATA_DIR"
  fi
  exec setpriv --reuid="$AGENTCAST_UID" --regid="$AGENTCAST_UID" --clear-groups \
    -- "$AGENTCAST_BIN" "$@"
fi
exec "$AGENTCAST_BIN" "$@"
