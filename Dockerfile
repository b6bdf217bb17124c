# envctl: multi-stage build to a small, non-root runtime image (the chart's default image).
#   docker build -t REGISTRY/envctl:0.1.0 .
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY schemas schemas
COPY examples examples
RUN cargo build --release --locked --bin envctl \
 && strip target/release/envctl

FROM debian:bookworm-slim
# git2 links the system OpenSSL; ca-certificates for HTTPS Git remotes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/envctl /usr/local/bin/envctl
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/envctl"]
CMD ["run"]
