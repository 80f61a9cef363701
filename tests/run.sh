#!/usr/bin/env bash
# The test command (README "run the tests"; .ci/run calls exactly this).
#   tests/run.sh
# Formatting and lints, the Rust unit + end-to-end tests, the release build, and the
# official OpenAI Python SDK against the release binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Pingora's zlib-ng build needs cmake; install it on a fresh Debian machine.
if ! command -v cmake >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing cmake"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
    else
        echo "cmake is required to build pingora (apt-get install cmake)" >&2
        exit 1
    fi
fi

# The trace tests run a real ClickHouse server (Debian's 18.16 package; started and stopped
# by the tests themselves on loopback ports).
if ! command -v clickhouse-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing clickhouse-server"
        apt-get update -qq
        # policy-rc.d keeps the package from starting a system-wide server.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clickhouse-server >/dev/null
    else
        echo "clickhouse-server is required by the trace tests (apt-get install clickhouse-server)" >&2
        exit 1
    fi
fi

# The server, not just the client tools (a machine may have psql and pg_config alone).
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 &&
    ! { command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/postgres" ]; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing postgresql"
        apt-get update -qq
        # The tests start their own servers (initdb in a temp dir, stopped by PID); keep the
        # package from starting a system-wide one.
        created_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            created_policy=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    else
        echo "PostgreSQL is required by the state-store tests (apt-get install postgresql)" >&2
        exit 1
    fi
fi

# The shared-cache tests run a real Redis (Debian's redis-server, started and stopped by
# the tests themselves on loopback ports).
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing redis-server"
        apt-get update -qq
        created_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            created_policy=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    else
        echo "redis-server is required by the shared-cache tests (apt-get install redis-server)" >&2
        exit 1
    fi
fi

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

echo "== official OpenAI and Anthropic Python SDKs against the release binary"
tests/sdk/run.sh
