# syntax=docker/dockerfile:1
# Build: a locked release build in the full Rust image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The pages are compiled into the binary (rust-embed).
COPY static ./static
RUN cargo build --release --locked && strip target/release/agentcast

# Run: a slim image, state on a volume, the server as uid 10001. The image
# starts as root only for its entrypoint, which makes DATA_DIR uid 10001's
# (a root-owned bind mount or Kubernetes volume works too) and then drops to
# that user (setpriv, from util-linux, is part of debian-slim).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin agentcast \
 && mkdir -p /data && chown agentcast:agentcast /data
COPY --from=build /src/target/release/agentcast /usr/local/bin/agentcast
COPY scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV BIND=0.0.0.0 PORT=8080 DATA_DIR=/data LOG_FORMAT=json SHUTDOWN_TIMEOUT=10s
VOLUME ["/data"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${PORT:-8080}/health || exit 1"]
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["serve"]
