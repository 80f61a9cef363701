#!/usr/bin/env bash
# The test command (README "run the tests"; .ci/run calls exactly this).
#   tests/run.sh
# Formatting and lints, the Rust unit + end-to-end tests, the release build, and the
# official OpenAI Python SDK against the release binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Installs Debian package $1 (as root, with apt-get), or says why it is needed ($2) and
# stops. A policy-rc.d for the duration keeps server packages from starting system-wide
# servers: the tests start their own on loopback ports and stop them by PID.
install_package() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing $1"
        apt-get update -qq
        local created_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            created_policy=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
        if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    else
        echo "$1 is required $2 (apt-get install $1)" >&2
        exit 1
    fi
}
# Pingora's zlib-ng build needs cmake; usearch (the semantic cache index) a C++ compiler.
command -v cmake >/dev/null 2>&1 || install_package cmake "to build pingora"
command -v c++ >/dev/null 2>&1 || install_package g++ "to build usearch"

# The trace tests run a real ClickHouse server (Debian's 18.16 package).
command -v clickhouse-server >/dev/null 2>&1 || install_package clickhouse-server "by the trace tests"
# The server, not just the client tools (a machine may have psql and pg_config alone).
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 &&
    ! { command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/postgres" ]; }; then
    install_package postgresql "by the state-store tests"
fi
# The shared-cache tests run a real Redis.
command -v redis-server >/dev/null 2>&1 || install_package redis-server "by the shared-cache and shared-counter tests"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== Rust tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi

echo "== release build"
cargo build --release -p modelux -p modelux-loadtest

echo "== HTTP fuzz run over the release binary (short, seeded; loadtest/fuzz.sh runs a long one)"
# RSS is held to 10% over the long run (100,000 requests); a short run is still warming up.
SKIP_BUILD=1 SEED=20 REQUESTS=8000 MINUTES=3 MAX_RSS_GROWTH=0.25 loadtest/fuzz.sh

echo "== official OpenAI and Anthropic Python SDKs against the release binary"
tests/sdk/run.sh
