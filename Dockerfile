# envctl's image from a registry's base images (for users who build with Docker or Podman
# against a registry). Base images are pinned by digest, so a rebuild gets the same bases;
# update tag and digest together (Dependabot and Renovate do).
#   docker build -t REGISTRY/envctl:0.1.0 .
#
# CI builds the same image without a registry: `scripts/image` (buildah, from scratch; see
# the README's "Container image").
FROM docker.io/library/rust:1-bookworm@sha256:82150a52ec202c1b14d7817e14516c392bb7f5cfebd88f1ed531cb37ebd39922 AS build
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

FROM docker.io/library/debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251
# git2 links the system OpenSSL; ca-certificates for HTTPS Git remotes and ACME.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/envctl /usr/local/bin/envctl
# Non-root (the chart's securityContext runs it as 65532 too).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/envctl"]
CMD ["run"]
