#!/usr/bin/env bash
# Several gateway nodes, one policy: starts Redis, PostgreSQL and ClickHouse (Debian's
# packages, installed when missing, loopback only, stopped by PID), a mock upstream and
# gateways, then measures a budgeted, rate-limited route:
#
#   1. one node with in-process counters (the baseline),
#   2. the same node config with the counters on Redis (spend.counters: redis),
#   3. three nodes on the same Redis, PostgreSQL and ClickHouse, loaded at once.
#
# It prints req/s, CPU µs per request (gateway process), p50/p99 at 32 paced connections
# (in-process and Redis counters alternating, PACED_ROUNDS rounds each, and their medians),
# Redis round trips and Redis CPU per request, and the ratios. Every phase is bounded.
#
#   loadtest/nodes.sh                 # 10 s per phase
#   DURATION_S=20 loadtest/nodes.sh
#   SKIP_BUILD=1 loadtest/nodes.sh    # reuse target/release
#   PACED_ROUNDS=5 loadtest/nodes.sh  # paced rounds per gateway, alternating (default 3)
#
# Cores (this is written for a 2-core machine): the gateways share core $PROXY_CPU; load
# generators, the mock, Redis ($REDIS_CPU), PostgreSQL and ClickHouse share core $LOAD_CPU.
# With one core per node, give each node its own with NODE_CPUS="0 2 3".
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION_S=${DURATION_S:-10}
WARMUP_S=${WARMUP_S:-2}
CONNECTIONS=${CONNECTIONS:-64}
PACED_CONNECTIONS=${PACED_CONNECTIONS:-32}
PACED_ROUNDS=${PACED_ROUNDS:-3}
RATE=${RATE:-2000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
NODE_CPUS=${NODE_CPUS:-"$PROXY_CPU $PROXY_CPU $PROXY_CPU"}
# Redis's core: with the load generators by default; REDIS_CPU=0 puts it beside the
# gateways (a Redis on a busy core adds its scheduling delay to every round trip).
REDIS_CPU=${REDIS_CPU:-$LOAD_CPU}
SKIP_BUILD=${SKIP_BUILD:-0}
BUILD_TIMEOUT_S=${BUILD_TIMEOUT_S:-3600}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-60}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
REPORT_OUT=${REPORT_OUT:-}

GW_KEY=mlx_sk_loadtest_0123456789abcdef
MANAGE_KEY=mlx_mk_loadtest_0123456789abcdef
CLK_TCK=$(getconf CLK_TCK)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/modelux-nodes.XXXXXX")
PGDIR=
PIDS=()

cleanup() {
    local rc=$?
    stop_started
    if [ "$rc" != 0 ]; then
        log "failed; logs kept in $TMP"
        for f in "$TMP"/*.log "$PGDIR"/postgres.log; do
            [ -s "$f" ] && { log "--- $f (tail)"; tail -n 20 "$f" >&2; }
        done
    else
        rm -rf "$TMP"
    fi
    [ -n "$PGDIR" ] && [ "$rc" = 0 ] && rm -rf "$PGDIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LOG_TAG=nodes.sh
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

need curl || apt_install curl
need taskset || apt_install util-linux
need redis-server || apt_install redis-server
if ! need pg_config && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    apt_install postgresql
fi
PG_BIN=$(pg_config --bindir 2>/dev/null || true)
[ -x "$PG_BIN/initdb" ] || PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
[ -x "$PG_BIN/initdb" ] || die "no initdb in $PG_BIN"

if [ "$SKIP_BUILD" != 1 ]; then
    log "building release binaries"
    (cd "$ROOT" && timeout "$BUILD_TIMEOUT_S" cargo build --release -p modelux -p modelux-loadtest) ||
        die "cargo build failed"
fi
for b in modelux mock-upstream loadgen; do [ -x "$BIN/$b" ] || die "missing $BIN/$b"; done
BUSY=$(busy_pct)
[ "$BUSY" -gt 10 ] && log "warning: the machine is already ${BUSY}% busy; results will be noisy"

# ---------------------------------------------------------------- shared services
REDIS_PORT=$(free_port) || die "no free port"
mkdir -p "$TMP/redis"
taskset -c "$REDIS_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$TMP/redis" >"$TMP/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")

# PostgreSQL refuses to run as root: as the postgres user when root, in a directory it owns.
PGDIR=$(mktemp -d /tmp/modelux-nodes-pg.XXXXXX)
PG_PORT=$(free_port) || die "no free port"
as_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$PGDIR"
    as_pg=(runuser -u postgres --)
fi
"${as_pg[@]}" "$PG_BIN/initdb" -D "$PGDIR/data" -A trust -U modelux --no-sync -E UTF8 >"$TMP/initdb.log" 2>&1 ||
    die "initdb failed: $(tail -n 5 "$TMP/initdb.log")"
"${as_pg[@]}" taskset -c "$LOAD_CPU" "$PG_BIN/postgres" -D "$PGDIR/data" -p "$PG_PORT" -k "$PGDIR" \
    -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100 >"$PGDIR/postgres.log" 2>&1 &
PG_PID=$!
PIDS+=("$PG_PID")
for _ in $(seq 1 $((READY_TIMEOUT_S * 10))); do
    "$PG_BIN/pg_isready" -h 127.0.0.1 -p "$PG_PORT" -q && break
    alive "$PG_PID" postgres
    sleep 0.1
done
"$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U modelux modelux || die "createdb failed"
PG_URL="postgres://modelux@127.0.0.1:$PG_PORT/modelux"
log "postgres on 127.0.0.1:$PG_PORT, pid $PG_PID; redis on 127.0.0.1:$REDIS_PORT, pid $REDIS_PID"
start_clickhouse "$LOAD_CPU"

start_mock mock "$LOAD_CPU"
MOCK_ADDR=$MOCK_STARTED_ADDR

BODY=$TMP/body.json
printf '%s' '{"model":"@capped","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}' >"$BODY"

# ---------------------------------------------------------------- gateways
# start_gateway NAME CPU COUNTERS(local|redis): sets GW_PORT_<NAME>, GW_MANAGE_<NAME>, GW_PID_<NAME>.
start_gateway() {
    local name=$1 cpu=$2 counters=$3 port manage shared=
    port=$(free_port) || die "no free port"
    manage=$(free_port) || die "no free port"
    if [ "$counters" = redis ]; then
        shared="redis: { url: \"redis://127.0.0.1:$REDIS_PORT/\" }
spend: { counters: redis, on_counter_error: fail_closed }"
    fi
    cat >"$TMP/$name.yaml" <<YAML
server:
  proxy_listen: "127.0.0.1:$port"
  manage_listen: "127.0.0.1:$manage"
  threads: 1
  data_dir: "$TMP/data-$name"
providers:
  - { id: mock, kind: openai_compatible, base_url: "http://$MOCK_ADDR/v1", api_key: "sk-mock" }
projects:
  - id: default
    keys:
      # Far above what a run sends: the limiter runs on every request but never refuses.
      - { name: load, key: "$GW_KEY", requests_per_minute: 1000000000 }
management_keys:
  - { name: admin, key: "$MANAGE_KEY" }
rate_limits: { management_requests_per_minute: 0 }
state: { backend: postgres, url: "$PG_URL" }
traces: { clickhouse: { url: "http://127.0.0.1:$CH_HTTP" }, flush_interval_ms: 500 }
prices:
  mock-model: { input_per_mtok: 1, output_per_mtok: 2 }
routing_configs:
  capped: { project: default, strategy: single, model: "mock/mock-model" }
budgets:
  # Never reached: every request reserves, is checked against it and settles.
  - { name: load, scope: routing_config, routing_config: "@capped", period: daily, cap_usd: 1000000000, action: block }
$shared
YAML
    "$BIN/modelux" check --config "$TMP/$name.yaml" >"$TMP/$name-check.log" 2>&1 ||
        die "$name: config rejected: $(cat "$TMP/$name-check.log")"
    RUST_LOG=${RUST_LOG:-warn} taskset -c "$cpu" "$BIN/modelux" serve --config "$TMP/$name.yaml" \
        >"$TMP/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_status "http://127.0.0.1:$manage/healthz" 200
    alive "$pid" "gateway $name"
    printf -v "GW_PORT_$name" '%s' "$port"
    printf -v "GW_MANAGE_$name" '%s' "$manage"
    printf -v "GW_PID_$name" '%s' "$pid"
    log "gateway $name ($counters counters) on 127.0.0.1:$port, pid $pid"
}

stop_gateway() {
    local pid_var="GW_PID_$1"
    kill -TERM "${!pid_var}" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "${!pid_var}" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "${!pid_var}" 2>/dev/null || true
}

# Redis script calls a gateway has sent so far (all operations).
round_trips() {
    local manage_var="GW_MANAGE_$1"
    curl -s "http://127.0.0.1:${!manage_var}/metrics" |
        awk '/^modelux_counters_round_trips_total/ { s += $NF } END { printf "%d", s }'
}

# The counters-wait histogram's cumulative buckets, one "le count" line each.
wait_buckets() {
    local manage_var="GW_MANAGE_$1"
    curl -s "http://127.0.0.1:${!manage_var}/metrics" |
        sed -nE 's/^modelux_counters_wait_seconds_bucket\{le="([^"]+)"\} ([0-9]+)$/\1 \2/p'
}

# wait_quantile NAME Q: the smallest bucket bound (µs) that holds fraction Q of the waits
# on Redis during phase NAME ("-" when there were none).
wait_quantile() {
    paste -d ' ' "$TMP/$1.wait0" "$TMP/$1.wait1" | awk -v q="$2" '{ le[NR] = $1; n[NR] = $4 - $2 } END {
        if (NR == 0 || n[NR] == 0) { print "-"; exit }
        for (i = 1; i <= NR; i++) if (n[i] >= q * n[NR]) { if (le[i] == "+Inf") print "+Inf"; else printf "%d", le[i] * 1e6; exit }
    }'
}

# phase NAME GATEWAY [loadgen args…]: one loadgen against GATEWAY; records its JSON, the
# gateway's CPU ticks, Redis's CPU ticks and the Redis round trips of the phase.
phase() {
    local name=$1 gw=$2
    shift 2
    local port_var="GW_PORT_$gw" pid_var="GW_PID_$gw"
    local common=(--target "127.0.0.1:${!port_var}" --path /openai/v1/chat/completions --body-file "$BODY"
        --threads 1 --json --header "Authorization: Bearer $GW_KEY")
    timeout 30 "$BIN/loadgen" "${common[@]}" --connections 1 --max-requests 1 --warmup-s 0 --duration-s 10 \
        >"$TMP/$name.check.json" || die "$name: sanity request failed"
    [ "$(jnum "$TMP/$name.check.json" ok)" = 1 ] || die "$name: sanity request failed: $(cat "$TMP/$name.check.json")"
    local t0 r0 rt0
    t0=$(cpu_ticks "${!pid_var}")
    r0=$(cpu_ticks "$REDIS_PID")
    rt0=$(round_trips "$gw")
    wait_buckets "$gw" >"$TMP/$name.wait0"
    log "phase $name"
    timeout $((DURATION_S + WARMUP_S + 60)) taskset -c "$LOAD_CPU" "$BIN/loadgen" "${common[@]}" \
        --warmup-s "$WARMUP_S" --duration-s "$DURATION_S" "$@" >"$TMP/$name.json" || die "$name: loadgen failed"
    echo "$(($(cpu_ticks "${!pid_var}") - t0))" >"$TMP/$name.ticks"
    echo "$(($(cpu_ticks "$REDIS_PID") - r0))" >"$TMP/$name.redis_ticks"
    echo "$(($(round_trips "$gw") - rt0))" >"$TMP/$name.trips"
    wait_buckets "$gw" >"$TMP/$name.wait1"
}

# ---------------------------------------------------------------- phases
set -- $NODE_CPUS
start_gateway local "$1" local
phase local local --connections "$CONNECTIONS"
start_gateway n1 "$1" redis
phase redis n1 --connections "$CONNECTIONS"
# Paced latency, the two gateways alternating (a p99 here moves by milliseconds from one
# 10 s window to the next, so single phases side by side say little): the medians of
# PACED_ROUNDS rounds each, and of the per-round differences.
for round in $(seq 1 "$PACED_ROUNDS"); do
    phase "local.paced.$round" local --connections "$PACED_CONNECTIONS" --rate "$RATE"
    phase "redis.paced.$round" n1 --connections "$PACED_CONNECTIONS" --rate "$RATE"
done
stop_gateway local
# The median round stands for the paced rows below.
median_round() {
    for round in $(seq 1 "$PACED_ROUNDS"); do
        echo "$(($(jnum "$TMP/redis.paced.$round.json" p99_us) - $(jnum "$TMP/local.paced.$round.json" p99_us))) $round"
    done | sort -n | awk -v m=$(((PACED_ROUNDS + 1) / 2)) 'NR == m { print $2 }'
}
MEDIAN_ROUND=$(median_round)
for kind in local redis; do
    for ext in json ticks redis_ticks trips; do
        cp "$TMP/$kind.paced.$MEDIAN_ROUND.$ext" "$TMP/$kind.paced.$ext"
    done
done
start_gateway n2 "$2" redis
start_gateway n3 "$3" redis

# Three nodes at once, one load generator each, the connections split between them.
per_node=$((CONNECTIONS / 3))
for n in n1 n2 n3; do
    port_var="GW_PORT_$n"
    timeout 30 "$BIN/loadgen" --target "127.0.0.1:${!port_var}" --path /openai/v1/chat/completions \
        --body-file "$BODY" --threads 1 --json --header "Authorization: Bearer $GW_KEY" --connections 1 \
        --max-requests 1 --warmup-s 0 --duration-s 10 >"$TMP/three-$n.check.json" || die "$n: sanity request failed"
done
declare -A T0 RT0
for n in n1 n2 n3; do
    pid_var="GW_PID_$n"
    T0[$n]=$(cpu_ticks "${!pid_var}")
    RT0[$n]=$(round_trips "$n")
done
R0=$(cpu_ticks "$REDIS_PID")
log "phase three nodes"
LOADS=()
for n in n1 n2 n3; do
    port_var="GW_PORT_$n"
    timeout $((DURATION_S + WARMUP_S + 60)) taskset -c "$LOAD_CPU" "$BIN/loadgen" --target "127.0.0.1:${!port_var}" \
        --path /openai/v1/chat/completions --body-file "$BODY" --threads 1 --json \
        --header "Authorization: Bearer $GW_KEY" --connections "$per_node" --warmup-s "$WARMUP_S" \
        --duration-s "$DURATION_S" >"$TMP/three-$n.json" &
    LOADS+=($!)
done
for p in "${LOADS[@]}"; do wait "$p" || die "a three-node loadgen failed"; done
for n in n1 n2 n3; do
    pid_var="GW_PID_$n"
    echo "$(($(cpu_ticks "${!pid_var}") - T0[$n]))" >"$TMP/three-$n.ticks"
    echo "$(($(round_trips "$n") - RT0[$n]))" >"$TMP/three-$n.trips"
done
echo "$(($(cpu_ticks "$REDIS_PID") - R0))" >"$TMP/three.redis_ticks"

# ---------------------------------------------------------------- report
cpu_us() { awk -v t="$(cat "$TMP/$1.ticks")" -v n="$(jnum "$TMP/$1.json" completed_all)" -v k="$CLK_TCK" \
    'BEGIN { printf "%.1f", (n > 0) ? t / k * 1e6 / n : 0 }'; }
per_req() { awk -v a="$1" -v n="$2" 'BEGIN { printf "%.2f", (n > 0) ? a / n : 0 }'; }
redis_us() { awk -v t="$1" -v n="$2" -v k="$CLK_TCK" 'BEGIN { printf "%.1f", (n > 0) ? t / k * 1e6 / n : 0 }'; }
row() {
    local name=$1 label=$2 n
    n=$(jnum "$TMP/$name.json" completed_all)
    printf '| %s | %.0f | %s | %d | %d | %s | %s | %d |\n' "$label" "$(jnum "$TMP/$name.json" rps)" "$(cpu_us "$name")" \
        "$(jnum "$TMP/$name.json" p50_us)" "$(jnum "$TMP/$name.json" p99_us)" \
        "$(per_req "$(cat "$TMP/$name.trips")" "$n")" "$(redis_us "$(cat "$TMP/$name.redis_ticks")" "$n")" \
        "$(jnum "$TMP/$name.json" errors)"
}
{
    echo "## modelux: several nodes"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) · $(nproc) CPUs · budgeted, rate-limited route (@capped) ·" \
        "${WARMUP_S}s warmup + ${DURATION_S}s per phase · gateways on CPU(s) $NODE_CPUS, Redis on CPU $REDIS_CPU," \
        "everything else on CPU $LOAD_CPU"
    echo
    echo "| phase | req/s | gateway CPU µs/req | p50 µs | p99 µs | Redis round trips/req | Redis CPU µs/req | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    row local "1 node, in-process counters, $CONNECTIONS conns"
    row redis "1 node, Redis counters, $CONNECTIONS conns"
    row local.paced "1 node, in-process, $PACED_CONNECTIONS conns at $RATE/s (median round)"
    row redis.paced "1 node, Redis, $PACED_CONNECTIONS conns at $RATE/s (median round)"
    total_rps=0 total_n=0 total_ticks=0 total_trips=0
    for n in n1 n2 n3; do
        cp "$TMP/three.redis_ticks" "$TMP/three-$n.redis_ticks"
        row "three-$n" "3 nodes: $n, $per_node conns"
        total_rps=$(awk -v a="$total_rps" -v b="$(jnum "$TMP/three-$n.json" rps)" 'BEGIN { print a + b }')
        total_n=$((total_n + $(jnum "$TMP/three-$n.json" completed_all)))
        total_ticks=$((total_ticks + $(cat "$TMP/three-$n.ticks")))
        total_trips=$((total_trips + $(cat "$TMP/three-$n.trips")))
    done
    echo
    awk -v l="$(cpu_us local)" -v r="$(cpu_us redis)" 'BEGIN { printf "- CPU per request, Redis ÷ in-process counters: %.2f\n", r / l }'
    d50=() d99=()
    for round in $(seq 1 "$PACED_ROUNDS"); do
        d50+=($(($(jnum "$TMP/redis.paced.$round.json" p50_us) - $(jnum "$TMP/local.paced.$round.json" p50_us))))
        d99+=($(($(jnum "$TMP/redis.paced.$round.json" p99_us) - $(jnum "$TMP/local.paced.$round.json" p99_us))))
    done
    mid=$(((PACED_ROUNDS + 1) / 2))
    printf -- '- added by Redis counters at %d paced connections, p50 / p99 per round:' "$PACED_CONNECTIONS"
    for i in "${!d50[@]}"; do printf ' %+d / %+d µs;' "${d50[$i]}" "${d99[$i]}"; done
    printf ' median %+d / %+d µs\n' "$(printf '%s\n' "${d50[@]}" | sort -n | sed -n "${mid}p")" \
        "$(printf '%s\n' "${d99[@]}" | sort -n | sed -n "${mid}p")"
    # Measured inside the gateway: what each take or reservation waited on Redis (the
    # histogram's bucket bounds), free of the load generator's own scheduling noise.
    printf -- '- each request'"'"'s wait on Redis in those rounds (modelux_counters_wait_seconds), p50 / p99 at most:'
    for round in $(seq 1 "$PACED_ROUNDS"); do
        printf ' %s / %s µs;' "$(wait_quantile "redis.paced.$round" 0.5)" "$(wait_quantile "redis.paced.$round" 0.99)"
    done
    echo
    awk -v t="$total_rps" -v one="$(jnum "$TMP/redis.json" rps)" -v n="$total_n" -v ticks="$total_ticks" \
        -v trips="$total_trips" -v rt="$(cat "$TMP/three.redis_ticks")" -v k="$CLK_TCK" 'BEGIN {
        printf "- three nodes: %.0f req/s in all, %.2f× one node (all three share CPU %s here)\n", t, t / one, "'"$PROXY_CPU"'"
        printf "- three nodes: %.1f gateway CPU µs/req, %.2f Redis round trips/req, %.1f Redis CPU µs/req\n",
            ticks / k * 1e6 / n, trips / n, rt / k * 1e6 / n
    }'
} | tee "${REPORT_OUT:-/dev/null}"
