#!/usr/bin/env bash
# HTTP-level fuzz run over a live gateway: the release binary on its embedded defaults in
# front of the mock upstream, hostile requests to both surfaces and the management
# listener interleaved with good ones (see loadtest/src/fuzz.rs).
#
#   loadtest/fuzz.sh                              # 100,000 requests or 10 minutes
#   REQUESTS=20000 MINUTES=3 SEED=7 loadtest/fuzz.sh   # the short seeded run CI does
#
# Fails when any request failed its check, when the gateway's RSS grew more than
# MAX_RSS_GROWTH from the end of the first tenth to the end, or when its log shows a panic.
# The report (JSON) goes to REPORT_OUT, the gateway's log to LOG_OUT, when set.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQUESTS=${REQUESTS:-100000}
MINUTES=${MINUTES:-10}
SEED=${SEED:-1}
CONCURRENCY=${CONCURRENCY:-16}
MAX_RSS_GROWTH=${MAX_RSS_GROWTH:-0.10}
SKIP_BUILD=${SKIP_BUILD:-0}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-30}
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release
LOG_TAG=fuzz
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    stop_started
    if [ -n "${LOG_OUT:-}" ]; then cp "$TMP/gateway.log" "$LOG_OUT" || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

need curl || apt_install curl
need taskset || apt_install util-linux
if [ "$SKIP_BUILD" != 1 ]; then
    (cd "$ROOT" && cargo build --release -p modelux -p modelux-loadtest) || die "cargo build failed"
fi
for b in modelux mock-upstream fuzz-http; do [ -x "$BIN/$b" ] || die "missing $BIN/$b"; done

start_mock mock 0
MOCK_PORT=${MOCK_STARTED_ADDR##*:}
GW_PORT=$(free_port) || die "no free port"
GW_MANAGE_PORT=$(free_port) || die "no free port"
KEY=mlx_sk_fuzz_0123456789abcdef
ADMIN=mlx_mk_fuzz_0123456789abcdef
cat >"$TMP/gw.yaml" <<YAML
server:
  proxy_listen: "127.0.0.1:$GW_PORT"
  manage_listen: "127.0.0.1:$GW_MANAGE_PORT"
  data_dir: "$TMP/data"
  # Short deadlines, so the cases that leave a request unfinished are answered quickly.
  client_body_timeout_ms: 1000
  client_header_timeout_ms: 2000
providers:
  - { id: mock, kind: openai_compatible, base_url: "http://127.0.0.1:$MOCK_PORT/v1", api_key: "sk-mock" }
projects:
  - id: default
    keys:
      - { name: fuzz, key: "$KEY" }
management_keys:
  - { name: admin, key: "$ADMIN" }
rate_limits: { requests_per_minute: 0, management_requests_per_minute: 0 }
routing_configs:
  fast: { project: default, strategy: single, model: "mock/mock-model" }
YAML
RUST_LOG=${RUST_LOG:-warn} "$BIN/modelux" serve --config "$TMP/gw.yaml" >"$TMP/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_status "http://127.0.0.1:$GW_MANAGE_PORT/healthz" 200
log "gateway pid $GW_PID on 127.0.0.1:$GW_PORT (manage $GW_MANAGE_PORT); $REQUESTS requests or $MINUTES min, seed $SEED"

status=0
"$BIN/fuzz-http" --proxy "127.0.0.1:$GW_PORT" --manage "127.0.0.1:$GW_MANAGE_PORT" \
    --key "$KEY" --admin-key "$ADMIN" --model @fast --seed "$SEED" --requests "$REQUESTS" \
    --minutes "$MINUTES" --concurrency "$CONCURRENCY" --pid "$GW_PID" \
    --max-rss-growth "$MAX_RSS_GROWTH" >"$TMP/report.json" || status=$?
cat "$TMP/report.json"
[ -n "${REPORT_OUT:-}" ] && cp "$TMP/report.json" "$REPORT_OUT"
alive "$GW_PID" gateway
if grep -q "panicked" "$TMP/gateway.log"; then
    grep -m5 -A3 "panicked" "$TMP/gateway.log" >&2
    die "the gateway panicked"
fi
# Still serving after the run.
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "authorization: Bearer $KEY" \
    -H 'content-type: application/json' \
    -d '{"model":"@fast","messages":[{"role":"user","content":"hi"}]}' \
    "http://127.0.0.1:$GW_PORT/openai/v1/chat/completions")
[ "$code" = 200 ] || die "the gateway no longer serves a good request (got $code)"
[ "$status" = 0 ] || die "fuzz checks failed (exit $status); see the report above"
log "ok: $(grep -c '' "$TMP/gateway.log") gateway log lines, no panic"
