# lrtune service image. Everything is fetched at build time (crates) and baked in; the
# running container needs no network: the builtin data sets ship in the binary and data/.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lrtune --bin lrtune && mkdir -p static

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/lrtune --create-home lrtune \
    && apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/lrtune /usr/local/bin/lrtune
COPY --from=build /src/static /opt/lrtune/static
USER lrtune
WORKDIR /var/lib/lrtune
ENV LRTUNE_ADDR=0.0.0.0:8080 \
    LRTUNE_DB=/var/lib/lrtune/lrtune.db \
    LRTUNE_STATIC_DIR=/opt/lrtune/static \
    LRTUNE_LOG=info
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["lrtune", "serve"]
