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

# The context has no .git: `seckill --version` names this commit when given
# (`docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) .`), else `unknown` (build.rs).
ARG GIT_COMMIT

COPY . .

# The cargo registry and the target dir live in BuildKit cache mounts, so a
# rebuild after a source change recompiles only this crate, not its dependencies.
# The cache mount vanishes after the RUN, so the binary is copied out of it.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/cache/target,sharing=locked \
    CARGO_TARGET_DIR=/cache/target cargo build --release --locked --bin seckill \
    && mkdir -p /app/target/release \
    && cp /cache/target/release/seckill /app/target/release/seckill

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
