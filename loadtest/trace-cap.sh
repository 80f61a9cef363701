#!/usr/bin/env bash
# The embedded trace store under sustained load: the gateway (one core) at full rate with a
# small traces.max_records, so the run crosses the cap many times. Prints the records and
# file size at the end (and the largest file and WAL seen while it ran) and the gateway's
# CPU per request, beside the same run with a cap it never reaches.
#
#   loadtest/trace-cap.sh                       # cap 100,000, 60 s per run
#   CAP=20000 DURATION_S=20 loadtest/trace-cap.sh
#
# Fails when the records at the end exceed the cap by more than a twentieth plus a batch.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CAP=${CAP:-100000}
DURATION_S=${DURATION_S:-60}
SKIP_BUILD=${SKIP_BUILD:-0}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-30}
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release
KEY=mlx_sk_loadtest_0123456789abcdef
LOG_TAG=trace-cap
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    stop_started
    rm -rf "$TMP"
}
trap cleanup EXIT

need curl || apt_install curl
need taskset || apt_install util-linux
need sqlite3 || apt_install sqlite3
if [ "$SKIP_BUILD" != 1 ]; then
    (cd "$ROOT" && cargo build --release -p modelux -p modelux-loadtest) || die "cargo build failed"
fi
for b in modelux mock-upstream loadgen; do [ -x "$BIN/$b" ] || die "missing $BIN/$b"; done

start_mock mock 1
printf '%s' '{"model":"mock/mock-model","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}' >"$TMP/body.json"

# run CAP: one gateway with traces.max_records CAP, loaded for DURATION_S.
run() {
    local cap=$1 dir=$TMP/run-$1 port manage pid t0 t1 n rows db maxdb=0 maxwal=0 size wal
    port=$(free_port) || die "no free port"
    manage=$(free_port) || die "no free port"
    mkdir -p "$dir"
    cat >"$dir/gw.yaml" <<YAML
server: { proxy_listen: "127.0.0.1:$port", manage_listen: "127.0.0.1:$manage", threads: 1, data_dir: "$dir/data" }
traces: { max_records: $cap }
providers:
  - { id: mock, kind: openai_compatible, base_url: "http://$MOCK_STARTED_ADDR/v1", api_key: "sk-mock" }
projects:
  - id: default
    keys:
      - { name: load, key: "$KEY", requests_per_minute: 0 }
YAML
    RUST_LOG=warn taskset -c 0 "$BIN/modelux" serve --config "$dir/gw.yaml" >"$dir/gateway.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_status "http://127.0.0.1:$manage/healthz" 200
    taskset -c 1 "$BIN/loadgen" --target "127.0.0.1:$port" --connections 32 --duration-s 3 --warmup-s 0 \
        --header "authorization: Bearer $KEY" --body-file "$TMP/body.json" >/dev/null
    t0=$(cpu_ticks "$pid")
    taskset -c 1 "$BIN/loadgen" --target "127.0.0.1:$port" --connections 32 --duration-s "$DURATION_S" \
        --warmup-s 0 --header "authorization: Bearer $KEY" --body-file "$TMP/body.json" --json \
        >"$dir/load.json" &
    local lp=$!
    while kill -0 "$lp" 2>/dev/null; do
        size=$(stat -c %s "$dir/data/traces.db" 2>/dev/null || echo 0)
        wal=$(stat -c %s "$dir/data/traces.db-wal" 2>/dev/null || echo 0)
        [ "$size" -gt "$maxdb" ] && maxdb=$size
        [ "$wal" -gt "$maxwal" ] && maxwal=$wal
        sleep 1
    done
    wait "$lp"
    t1=$(cpu_ticks "$pid")
    sleep 3 # the last batch
    n=$(jnum "$dir/load.json" requests)
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    rows=$(sqlite3 "$dir/data/traces.db" 'SELECT count(*) FROM requests')
    db=$(stat -c %s "$dir/data/traces.db")
    printf '| %s | %s | %s | %s | %.0f | %.0f | %.0f | %.1f |\n' "$cap" "$n" "$((n / DURATION_S))" "$rows" \
        "$(echo "$db / 1048576" | bc -l)" "$(echo "$maxdb / 1048576" | bc -l)" \
        "$(echo "$maxwal / 1048576" | bc -l)" "$(echo "($t1 - $t0) * 10000 / $n" | bc -l)"
    LAST_ROWS=$rows
}

need bc || apt_install bc
echo "| max_records | requests | req/s | records at end | file MiB | largest file MiB | largest WAL MiB | CPU µs/req |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
run "$CAP"
capped=$LAST_ROWS
run 100000000
limit=$((CAP + CAP / 20 + 1000))
[ "$capped" -le "$limit" ] || die "$capped records kept against a cap of $CAP (limit $limit)"
log "ok: $capped records kept against a cap of $CAP"
