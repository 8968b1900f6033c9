# syntax=docker/dockerfile:1
# Build: a locked release build in the full Rust image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The pages are compiled into the binary (rust-embed).
COPY static ./static
RUN cargo build --release --locked && strip target/release/agentcast

# Run: a slim image, a non-root user, state on a volume.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin agentcast \
 && mkdir -p /data && chown agentcast:agentcast /data
COPY --from=build /src/target/release/agentcast /usr/local/bin/agentcast
USER agentcast
ENV BIND=0.0.0.0 PORT=8080 DATA_DIR=/data LOG_FORMAT=json SHUTDOWN_TIMEOUT=10s
VOLUME ["/data"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["/usr/local/bin/agentcast"]
CMD ["serve"]
