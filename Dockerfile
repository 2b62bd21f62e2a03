# Multi-stage build of Tollgate: the two services, the admin CLI and the wasm filter.
FROM rust:1.85-bookworm AS build
RUN rustup target add wasm32-wasip1
WORKDIR /src
COPY . .
RUN cargo build --release -p tollgate-authz -p tollgate-ratelimit \
 && cargo build --release -p tollgate-filter --target wasm32-wasip1

# Services: a small runtime image with just the binaries.
FROM debian:bookworm-slim AS services
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 tollgate \
 && mkdir -p /data && chown tollgate /data
COPY --from=build /src/target/release/tollgate-authz /src/target/release/tollgate-admin \
     /src/target/release/tollgate-ratelimit /usr/local/bin/
USER tollgate
WORKDIR /data

# Envoy with the filter baked in.
FROM envoyproxy/envoy:v1.40-latest AS envoy
COPY --from=build /src/target/wasm32-wasip1/release/tollgate_filter.wasm /etc/tollgate/tollgate_filter.wasm
COPY envoy/envoy.compose.yaml /etc/envoy/envoy.yaml
