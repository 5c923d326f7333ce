# syntax=docker/dockerfile:1
#
# seckill — one image for every role: `serve` (default), `worker`, `migrate`, `all`.
#   docker build -t seckill .
#   docker run --rm -e SECKILL_DEV=1 -e SECKILL_REDIS_URL=... -e SECKILL_DATABASE_URL=... \
#     -e SECKILL_AMQP_URL=... -p 8080:8080 -p 8081:8081 seckill serve
# See docker-compose.yml for a complete stack (Redis, RabbitMQ, Postgres).

############################ build ############################
FROM rust:1.95-bookworm AS builder
WORKDIR /app

# 1. The dependencies alone, in a layer of their own: the manifests plus a stub of every target
#    Cargo.toml names. This slow layer (every crate of Cargo.lock) is rebuilt only when
#    Cargo.toml or Cargo.lock change, with the layer cache of any builder (no cache mounts, so it
#    also works with --cache-from on a CI runner). The stub's own artifacts are removed, so the
#    real crate is always compiled in step 2, whatever the sources' timestamps.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for bench in $(awk '/^\[\[bench\]\]/ {b = 1; next} /^\[/ {b = 0} b && /^name *=/ {gsub(/^name *= *"|"$/, ""); print}' Cargo.toml); do \
           echo 'fn main() {}' > "benches/$bench.rs"; \
       done \
    && cargo build --release --locked --bin seckill \
    && cargo clean --release --package seckill \
    && rm -rf src

# 2. The crate itself. The build context has no .git (.dockerignore), so build.rs records the
#    commit from this argument, else "unknown":
#      docker build --build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t seckill .
ARG GIT_COMMIT=
COPY build.rs ./
COPY lua lua
COPY migrations migrations
COPY src src
COPY web web
# What the unit tests hold the code to: docs/api.md's error table (src/http/problem.rs) and the
# README's configuration table (src/config/vars.rs). The release build does not read them.
COPY docs docs
COPY README.md ./
RUN cargo build --release --locked --bin seckill

########################### runtime ###########################
FROM debian:bookworm-slim

# curl is only for container health checks (GET /healthz, see docker-compose.yml).
# Versions come from the pinned Debian release; pinning exact ones breaks on point releases.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 seckill \
    && useradd --system --uid 10001 --gid seckill --home-dir /nonexistent \
       --no-create-home --shell /usr/sbin/nologin seckill

COPY --from=builder /app/target/release/seckill /usr/local/bin/seckill

# Inside a container the listeners must not be bound to loopback.
ENV SECKILL_HTTP_ADDR=0.0.0.0:8080 \
    SECKILL_ADMIN_ADDR=0.0.0.0:8081 \
    SECKILL_WORKER_ADDR=0.0.0.0:8082 \
    RUST_LOG=info

USER 10001:10001
EXPOSE 8080 8081 8082
STOPSIGNAL SIGTERM
ENTRYPOINT ["seckill"]
CMD ["serve"]
