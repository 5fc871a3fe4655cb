# syntax=docker/dockerfile:1
#
# asp node image: build with the Rust toolchain, run on Debian slim as a non-root user.
#
#   docker build -t asp:0.1.0 .
#   docker run -d --name asp -p 7700:7700 -p 7800:7800 -v asp-data:/var/lib/asp \
#       --stop-timeout 60 asp:0.1.0
#
# Arguments after the image name are appended to `asp serve ...` (e.g. --peer HOST:7800,
# --cluster-id ID, --config FILE, --auth required). docs/DEPLOY.md has the details.

FROM rust:1-bookworm AS build
WORKDIR /src
# The workspace as a whole (.dockerignore keeps target/ and .git out). librdkafka is
# built from its sources by rdkafka-sys with the C toolchain the rust image carries.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p asp \
 && install -m 0755 target/release/asp /usr/local/bin/asp

FROM debian:bookworm-slim
# ca-certificates: connectors (webhooks over https) trust the system's CA store.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 asp \
 && useradd --system --uid 10001 --gid asp --home-dir /var/lib/asp --no-create-home \
        --shell /usr/sbin/nologin asp \
 && install -d -o asp -g asp -m 0750 /var/lib/asp
COPY --from=build /usr/local/bin/asp /usr/local/bin/asp

# Numeric, so that Kubernetes' runAsNonRoot can check it (uid/gid 10001 = asp).
USER 10001:10001
WORKDIR /var/lib/asp
VOLUME /var/lib/asp
# 7700: HTTP API (HTTPS with TLS), 7800: peer links.
EXPOSE 7700 7800

# asp answers SIGTERM by finishing requests in flight, closing peer links and fsyncing
# (a second SIGTERM exits at once): give it time with `docker stop -t 60` / --stop-timeout.
STOPSIGNAL SIGTERM

# /healthz is open even with --auth required; it is 503 when the store failed or the
# disk is full. The image has no curl: bash's /dev/tcp speaks plain HTTP, so this check
# only works without TLS. With TLS (HTTPS API) override it, for example with
# `asp status --node https://127.0.0.1:7700 --ca /etc/asp/tls/ca.pem` (which needs
# ASP_TOKEN when tokens are required) or turn it off with --no-healthcheck.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7700 && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["asp", "serve", "--api", "0.0.0.0:7700", "--listen", "0.0.0.0:7800", "--data-dir", "/var/lib/asp"]
CMD []
