# syntax=docker/dockerfile:1
# holdfast in a container: built in a Rust image, run from a distroless one (glibc, no shell,
# no package manager) as a non-root user.
#
#   docker build -t holdfast .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9900:9900 holdfast \
#       --listen 0.0.0.0:8080 --backend 10.0.0.1:80 --backend 10.0.0.2:80 \
#       --admin 0.0.0.0:9900 --log-format json
#
# Everything after the image name is holdfast's flags (ENTRYPOINT is the binary). `docker stop`
# sends SIGTERM: holdfast drains; give it --drain-timeout + --close-spread + 2 s
# (`docker stop -t 45`, or `stop_grace_period` in compose).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The registry cache survives between builds (BuildKit, the default builder since Docker 23).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked --bin holdfast \
    && ./target/release/holdfast --version

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/holdfast /usr/local/bin/holdfast
# distroless's nonroot user (65532); ports below 1024 need no capability inside a container
# on Docker 20.10 and later (net.ipv4.ip_unprivileged_port_start=0 in its network namespace).
USER nonroot:nonroot
EXPOSE 8080 9900
ENTRYPOINT ["/usr/local/bin/holdfast"]
CMD ["--help"]
