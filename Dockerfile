# syntax=docker/dockerfile:1
#
# tsrelay's container image: the static relay binary and a CA bundle, nothing
# else. `make image` builds it for linux/amd64, linux/arm64 and linux/arm/v7;
# .github/workflows/release.yml builds, pushes and signs it on a v* tag.
# image/ holds the tests that check what this file promises, without a
# container engine.

# The Go that builds the relay. The golang image sets GOTOOLCHAIN=local, so
# it must be at least the go line of go.mod (a test checks).
ARG GO_VERSION=1.26.8

# The build stage runs on the build machine's own platform and cross-compiles
# for the target: Go needs no emulator (QEMU) to build for ARM, so the ARM
# images take as long as the amd64 one.
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# Modules first, in a layer of their own, so that a source change does not
# download them again.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
# Set by buildx for each platform: linux, amd64|arm64|arm, and v7 for arm/v7.
ARG TARGETOS TARGETARCH TARGETVARIANT
ARG VERSION=dev
# The Makefile's build: static (no cgo, so no libc to bring along), no build
# machine paths in the binary (-trimpath), Tailscale features a relay never
# uses left out (cmd/relay/build-tags), stripped (-s -w), version stamped.
# GOARM is 7 for arm/v7; Go ignores it for other architectures.
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH GOARM=${TARGETVARIANT#v} \
    go build -trimpath -tags "$(cat cmd/relay/build-tags)" -ldflags "-s -w -X main.version=${VERSION}" -o /out/relay ./cmd/relay

# scratch rather than distroless/static: from a base image the relay needs
# only CA certificates (tsnet talks TLS to the control server and DERP). It
# looks up no users (USER below is numeric) and logs in UTC without zoneinfo;
# the container runtime supplies /proc, /etc/resolv.conf and /etc/hosts. An
# empty base has nothing else to scan, patch or explain, and no shell.
FROM scratch
ARG VERSION=dev
LABEL org.opencontainers.image.title="tsrelay" \
      org.opencontainers.image.description="A Tailscale peer relay for Kubernetes, in one small static binary" \
      org.opencontainers.image.source="https://github.com/tsrelay/tsrelay" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="BSD-3-Clause"
# Where Go's crypto/x509 looks first on Linux.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/relay /relay
# Numeric, so that Kubernetes can check runAsNonRoot without an /etc/passwd;
# 65532 is distroless's "nonroot" and the manifests' runAsUser. The image
# has no writable directory: the pod mounts an emptyDir at /tmp.
USER 65532:65532
# The relay's UDP port in the manifests, and /healthz, /readyz and /metrics.
EXPOSE 61441/udp 9002/tcp
ENTRYPOINT ["/relay"]
