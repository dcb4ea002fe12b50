# lazylayer. `make demo` and `make test` are all a new machine needs (root,
# Debian 12): both install their tools first (script/setup.sh).
SHELL := /bin/bash
GO ?= go
TOOLS ?= $(CURDIR)/.tools
export TOOLS
export PATH := $(TOOLS)/bin:$(CURDIR)/bin:$(PATH)

BINARIES := bin/lazylayer-snapshotter bin/lazylayer bin/mkimage

.PHONY: all build setup demo demo-stop test unit e2e lint bench bench-quick clean fuzz

all: build

setup:
	@bash script/setup.sh

build:
	$(GO) build -o bin/ ./cmd/... ./script/mkimage

demo: setup build
	@bash script/demo.sh

demo-stop:
	@bash script/demo-stop.sh

test: setup lint unit e2e

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	cd script/bench && $(GO) vet ./...

# script/bench is a module of its own (the peers and the plotting library stay
# out of the product's dependencies): its unit tests run here too.
unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /script/e2e)
	cd script/bench && $(GO) test -race -count=1 ./...

e2e: build
	$(GO) test -count=1 -timeout 40m -v ./script/e2e/ 2>&1 | tee .tools/e2e.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|_test.go:'; exit $${PIPESTATUS[0]}

bench: setup build
	@bash script/bench.sh

bench-quick: setup build
	@bash script/bench.sh --quick

# Every go test -fuzz target for FUZZTIME each (default 10m); not part of test.
fuzz:
	@bash script/fuzz.sh

clean: demo-stop
	rm -rf bin .run
