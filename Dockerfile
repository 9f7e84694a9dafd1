# ragpool in a container: build with `docker build -t ragpool .`, run the whole stack with
# `docker compose -f deploy/compose.yaml up`. (Docker cannot run on the project's CI machines,
# so this file is kept valid by review, not by a build.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/ragpool --create-home --shell /usr/sbin/nologin ragpool
COPY --from=build /src/target/release/ragpool /usr/local/bin/ragpool
COPY --from=build /src/docs /usr/share/ragpool/docs
COPY deploy/docker/workers.toml /etc/ragpool/workers.toml
USER ragpool
WORKDIR /var/lib/ragpool
EXPOSE 8000
# /health answers 200 while degraded (LLM down) and 503 only when the store is unusable.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# TERM drains in-flight answers (graceful_timeout); give it time: docker stop -t 40.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ragpool", "serve", "--config", "/etc/ragpool/workers.toml"]
