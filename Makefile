# tsrelay: run `make help` for the targets.

SHELL := /usr/bin/env bash
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GO ?= go
LDFLAGS := -s -w -X main.version=$(VERSION)
export CGO_ENABLED := 0
export GOTOOLCHAIN := local

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show the targets.
	@awk -F':.*## ' '/^[a-z-]+:.*## / { printf "  make %-8s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build the static relay binary into bin/relay.
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/relay ./cmd/relay

.PHONY: demo
demo: ## Run a relay between two laptops on a private loopback tailnet and show the traffic moving onto it.
	$(GO) run ./internal/demo

.PHONY: lint
lint: ## Check formatting (gofmt) and run go vet.
	@out=$$(gofmt -l $$(git ls-files --cached --others --exclude-standard '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

.PHONY: test
test: lint ## Run every test, the end-to-end relay proof included.
	$(GO) test -count=1 -timeout 20m ./...

.PHONY: clean
clean: ## Remove build output.
	rm -rf bin
