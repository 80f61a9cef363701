#!/usr/bin/env bash
# One-command load comparison of the modelux gateway against a plain nginx
# proxy_pass hop, both in front of the same zero-latency mock OpenAI upstream.
#
#   loadtest/run.sh                  # 10 s per phase
#   DURATION_S=30 loadtest/run.sh
#   SKIP_GATEWAY=1 loadtest/run.sh   # direct + nginx only
#   PINGORA_BARE=path/to/binary loadtest/run.sh   # also a bare pingora proxy hop
#
# Core layout (2-core machine): core 0 = the proxy under test, alone;
# core 1 = loadgen + mock upstream. See loadtest/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION_S=${DURATION_S:-10}
WARMUP_S=${WARMUP_S:-2}
CONNECTIONS=${CONNECTIONS:-64}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
MOCK_CPU=${MOCK_CPU:-1}
SKIP_GATEWAY=${SKIP_GATEWAY:-0}
# Paced phases: total req/s for the latency comparison below saturation (0 = skip).
RATE=${RATE:-5000}
# Streamed phases (SSE answers, same connections) and the one-connection phases (tail
# latency when nothing queues): 0 skips them.
STREAM=${STREAM:-1}
ONE_CONN=${ONE_CONN:-1}
# Management PATCHes sent while a second paced gateway phase runs (0 skips): the proxy's
# tail with the control plane busy, against the same phase without.
CHURN=${CHURN:-100}
# Webhook endpoints registered (all event types, pointed at the mock) before load: the
# proxied route with the outbox and its sender active, against a run without.
WEBHOOKS=${WEBHOOKS:-0}
# Phases for the Responses API and a passthrough call (1), beside the chat route.
PASSTHROUGH=${PASSTHROUGH:-1}
# Exact response-cache hits (1): the chat request over and over through a project with
# `cache: {mode: exact}`, so every request after the first is answered from the cache;
# beside the proxied route and nginx (0 skips).
CACHE_HIT=${CACHE_HIT:-1}
# Replay (experiments): this many requests stored, then replayed routing_only on their own
# (time, memory), and experiments run back to back during a second paced phase (the
# proxy's tail while one runs). 0 skips.
REPLAY=${REPLAY:-50000}
# Pairs of paced phases (without, then with experiments running) for the tail comparison.
REPLAY_PAIRS=${REPLAY_PAIRS:-3}
# Where the gateway keeps its traces: embedded (default) or clickhouse (Debian's
# clickhouse-server, installed when missing, started here on loopback ports, pinned with the
# load generator). Every gateway phase then writes to it.
TRACE_STORE=${TRACE_STORE:-embedded}
# Resident memory with this many streams open through the gateway at once (0 skips).
OPEN_STREAMS=${OPEN_STREAMS:-1000}
# A bare pingora proxy (no auth, no body work) to run beside nginx: the floor of any
# pingora-based hop. Listens on $LISTEN, forwards to $UPSTREAM.
PINGORA_BARE=${PINGORA_BARE:-}
SKIP_BUILD=${SKIP_BUILD:-0}
BUILD_TIMEOUT_S=${BUILD_TIMEOUT_S:-3600}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-30}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release

GW_KEY=mlx_sk_loadtest_0123456789abcdef
GW_CACHE_KEY=mlx_sk_loadtest_cached_0123456789ab
MANAGE_KEY=mlx_mk_loadtest_0123456789abcdef
CLK_TCK=$(getconf CLK_TCK)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/modelux-load.XXXXXX")
PIDS=()

cleanup() {
    local rc=$?
    stop_started
    if [ "$rc" != 0 ]; then
        log "failed; logs kept in $TMP"
        for f in "$TMP"/*.log "$TMP"/nginx/error.log; do
            [ -s "$f" ] && { log "--- $f (tail)"; tail -n 20 "$f" >&2; }
        done
    elif [ "${KEEP_TMP:-0}" = 1 ]; then
        log "temp files kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LOG_TAG=run.sh
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

need curl || apt_install curl
need taskset || apt_install util-linux
need pgrep || apt_install procps
if ! need nginx && ! [ -x /usr/sbin/nginx ]; then
    apt_install nginx-light || apt_install nginx
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# ---------------------------------------------------------------- build
if [ "$SKIP_BUILD" != 1 ]; then
    pkgs=(-p modelux-loadtest)
    [ "$SKIP_GATEWAY" = 1 ] || pkgs=(-p modelux "${pkgs[@]}")
    log "building release binaries (${pkgs[*]})"
    (cd "$ROOT" && timeout "$BUILD_TIMEOUT_S" cargo build --release "${pkgs[@]}") ||
        die "cargo build failed"
fi
for b in mock-upstream loadgen; do [ -x "$BIN/$b" ] || die "missing $BIN/$b"; done
[ "$SKIP_GATEWAY" = 1 ] || [ -x "$BIN/modelux" ] || die "missing $BIN/modelux (SKIP_GATEWAY=1 to skip)"

BUSY=$(busy_pct)
if [ "$BUSY" -gt 10 ]; then
    log "warning: the machine is already ${BUSY}% busy; results will be noisy"
fi

# ---------------------------------------------------------------- mock
start_mock mock "$MOCK_CPU"
MOCK_ADDR=$MOCK_STARTED_ADDR
MOCK_PORT=${MOCK_ADDR##*:}
wait_status "http://$MOCK_ADDR/v1/models" 200
log "mock upstream on $MOCK_ADDR"

BODY_MOCK=$TMP/body-direct.json
BODY_GW=$TMP/body-gateway.json
printf '%s' '{"model":"mock/mock-model","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}' >"$BODY_GW"
# Translated route: OpenAI client, Anthropic upstream (same mock, /v1/messages).
BODY_XLAT=$TMP/body-gateway-xlat.json
printf '%s' '{"model":"mockant/claude-mock","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}' >"$BODY_XLAT"
# Translated route: OpenAI client, Gemini upstream (same mock, /v1beta/models/…:generateContent).
# The Responses API (routed like chat, bytes passed through) and a passthrough naming an id.
BODY_RESPONSES=$TMP/body-gateway-responses.json
printf '%s' '{"model":"mock/mock-model","input":[{"role":"user","content":"Say hello in one short sentence."}],"max_output_tokens":16}' >"$BODY_RESPONSES"
BODY_EMPTY=$TMP/body-empty.json
printf '{}' >"$BODY_EMPTY"

BODY_XLAT_GEMINI=$TMP/body-gateway-xlat-gemini.json
printf '%s' '{"model":"mockgem/gemini-mock","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}' >"$BODY_XLAT_GEMINI"
# Direct and nginx hops send the same body; the mock echoes any model.
cp "$BODY_GW" "$BODY_MOCK"
BODY_GW_STREAM=$TMP/body-gateway-stream.json
printf '%s' '{"model":"mock/mock-model","stream":true,"messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}' >"$BODY_GW_STREAM"
BODY_MOCK_STREAM=$TMP/body-direct-stream.json
cp "$BODY_GW_STREAM" "$BODY_MOCK_STREAM"
# Open streams: a second mock that takes 8 s to stream its answer (80 tokens, 100 ms apart).
BODY_SLOW_STREAM=$TMP/body-gateway-slow.json
printf '%s' '{"model":"slow/mock-model","stream":true,"messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}' >"$BODY_SLOW_STREAM"
start_mock mock-slow "$MOCK_CPU" --tokens 80 --inter-token-ms 100
SLOW_ADDR=$MOCK_STARTED_ADDR

# ---------------------------------------------------------------- clickhouse
TRACES_YAML=
if [ "$TRACE_STORE" = clickhouse ] && [ "$SKIP_GATEWAY" != 1 ]; then
    start_clickhouse "$LOAD_CPU"
    TRACES_YAML="traces: { clickhouse: { url: \"http://127.0.0.1:$CH_HTTP\" }, flush_interval_ms: 500 }"
fi

# ---------------------------------------------------------------- gateway
if [ "$SKIP_GATEWAY" != 1 ]; then
    GW_PORT=$(free_port) || die "no free port"
    GW_MANAGE_PORT=$(free_port) || die "no free port"
    cat >"$TMP/gw.yaml" <<YAML
server:
  proxy_listen: "127.0.0.1:$GW_PORT"
  manage_listen: "127.0.0.1:$GW_MANAGE_PORT"
  threads: 1
providers:
  - { id: mock, kind: openai_compatible, base_url: "http://127.0.0.1:$MOCK_PORT/v1", api_key: "sk-mock" }
  - { id: mockant, kind: anthropic, base_url: "http://127.0.0.1:$MOCK_PORT", api_key: "sk-ant-mock" }
  - { id: mockgem, kind: google, base_url: "http://127.0.0.1:$MOCK_PORT/v1beta", api_key: "g-mock" }
  - { id: slow, kind: openai_compatible, base_url: "http://$SLOW_ADDR/v1", api_key: "sk-mock" }
projects:
  - id: default
    keys:
      # Far above what one run sends, so the limiter runs on every request but never refuses.
      - { name: load, key: "$GW_KEY", requests_per_minute: 1000000000 }
  - id: cached
    cache: { mode: exact, ttl_seconds: 3600 }
    keys:
      - { name: load-cached, key: "$GW_CACHE_KEY", requests_per_minute: 1000000000 }
management_keys:
  - { name: admin, key: "$MANAGE_KEY" }
# The churn phase sends more management calls than the default 60 a minute.
rate_limits: { management_requests_per_minute: 0 }
$TRACES_YAML
YAML
    "$BIN/modelux" check --config "$TMP/gw.yaml" >"$TMP/gw-check.log" 2>&1 ||
        die "gateway rejected the generated config: $(cat "$TMP/gw-check.log")"
    RUST_LOG=${RUST_LOG:-warn} taskset -c "$PROXY_CPU" "$BIN/modelux" serve --config "$TMP/gw.yaml" \
        >"$TMP/gateway.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    wait_status "http://127.0.0.1:$GW_MANAGE_PORT/healthz" 200
    alive "$GW_PID" gateway
    sleep 1
    rss_kib "$GW_PID" >"$TMP/gateway.start.rss"
    log "gateway on 127.0.0.1:$GW_PORT (manage $GW_MANAGE_PORT), pid $GW_PID"
    registered=0
    for i in $(seq 1 "$WEBHOOKS"); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "Authorization: Bearer $MANAGE_KEY" \
            -H 'content-type: application/json' \
            -d "{\"url\":\"http://127.0.0.1:$MOCK_PORT/webhook/$i\",\"event_types\":[\"*\"]}" \
            "http://127.0.0.1:$GW_MANAGE_PORT/manage/v1/webhooks/endpoints") || true
        [ "$code" = 201 ] && registered=$((registered + 1))
    done
    [ "$WEBHOOKS" = 0 ] || log "webhook endpoints registered: $registered of $WEBHOOKS"
fi

# ---------------------------------------------------------------- bare pingora
if [ -n "$PINGORA_BARE" ]; then
    [ -x "$PINGORA_BARE" ] || die "PINGORA_BARE=$PINGORA_BARE is not an executable"
    PB_PORT=$(free_port) || die "no free port"
    LISTEN=127.0.0.1:$PB_PORT UPSTREAM=127.0.0.1:$MOCK_PORT RUST_LOG=warn \
        taskset -c "$PROXY_CPU" "$PINGORA_BARE" >"$TMP/pingora.log" 2>&1 &
    PB_PID=$!
    PIDS+=("$PB_PID")
    wait_status "http://127.0.0.1:$PB_PORT/v1/models" 200
    log "bare pingora on 127.0.0.1:$PB_PORT, pid $PB_PID"
fi

# ---------------------------------------------------------------- nginx
NGINX_PORT=$(free_port) || die "no free port"
NP=$TMP/nginx
mkdir -p "$NP/tmp"
cat >"$NP/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $NP/nginx.pid;
error_log $NP/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $NP/tmp/body;
    proxy_temp_path $NP/tmp/proxy;
    fastcgi_temp_path $NP/tmp/fastcgi;
    uwsgi_temp_path $NP/tmp/uwsgi;
    scgi_temp_path $NP/tmp/scgi;
    keepalive_requests 1000000;
    upstream mock {
        server 127.0.0.1:$MOCK_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
taskset -c "$PROXY_CPU" "$NGINX" -p "$NP/" -c "$NP/nginx.conf" -e "$NP/error.log" \
    >"$TMP/nginx.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_status "http://127.0.0.1:$NGINX_PORT/v1/models" 200
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -n 1 || true)
[ -n "$NGINX_WORKER" ] || die "nginx worker not found"
PIDS+=("$NGINX_WORKER")
log "nginx on 127.0.0.1:$NGINX_PORT, master $NGINX_PID, worker $NGINX_WORKER"

# ---------------------------------------------------------------- phases
# run_phase NAME PORT PATH MEASURE_PID [extra loadgen args...]
run_phase() {
    local name=$1 port=$2 path=$3 pid=$4
    shift 4
    local base=${name%.*} body=$BODY_MOCK stream=()
    case $base in
        gateway | gateway_cache_hit) body=$BODY_GW ;;
        gateway_xlat) body=$BODY_XLAT ;;
        gateway_xlat_gemini) body=$BODY_XLAT_GEMINI ;;
        gateway_responses) body=$BODY_RESPONSES ;;
        gateway_passthrough) body=$BODY_EMPTY ;;
        gateway_stream) body=$BODY_GW_STREAM ;;
        gateway_open_streams) body=$BODY_SLOW_STREAM ;;
        *_stream) body=$BODY_MOCK_STREAM ;;
    esac
    case $base in *_stream | *_streams) stream=(--stream) ;; esac
    local conns=${PHASE_CONNECTIONS:-$CONNECTIONS}
    local common=(--target "127.0.0.1:$port" --path "$path" --body-file "$body" --threads 1 --json "${stream[@]}" "$@")
    # One request first so a broken hop fails loudly instead of timing 10 s
    # of errors.
    timeout 30 "$BIN/loadgen" "${common[@]}" --connections 1 --max-requests 1 \
        --warmup-s 0 --duration-s 10 >"$TMP/$name.check.json" ||
        die "$name: sanity request failed"
    [ "$(jnum "$TMP/$name.check.json" ok)" = 1 ] ||
        die "$name: sanity request did not return 2xx: $(cat "$TMP/$name.check.json")"
    local t0=0 t1=0
    [ "$pid" != - ] && t0=$(cpu_ticks "$pid")
    log "phase $name: ${conns} connections, ${WARMUP_S}s warmup + ${DURATION_S}s"
    # The highest RSS while the phase runs (sampled every 200 ms).
    local sampler=
    if [ "$pid" != - ]; then
        (peak=0; while kill -0 "$pid" 2>/dev/null; do
            r=$(rss_kib "$pid"); [ "${r:-0}" -gt "$peak" ] && peak=$r && echo "$peak" >"$TMP/$name.peak"
            sleep 0.2; done) &
        sampler=$!
    fi
    timeout $((DURATION_S + WARMUP_S + 60)) taskset -c "$LOAD_CPU" "$BIN/loadgen" "${common[@]}" \
        --connections "$conns" --warmup-s "$WARMUP_S" --duration-s "$DURATION_S" \
        >"$TMP/$name.json" || die "$name: loadgen failed"
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null || true
    if [ "$pid" != - ]; then
        t1=$(cpu_ticks "$pid")
        echo "$((t1 - t0))" >"$TMP/$name.ticks"
        rss_kib "$pid" >"$TMP/$name.rss"
    fi
}

# Resident memory with many streams open at once (each lasts 8 s; the phase holds
# $OPEN_STREAMS connections for its whole length). First, on a fresh gateway: memory
# taken by earlier phases would stay resident and hide what the streams take.
if [ "$OPEN_STREAMS" != 0 ] && [ "$SKIP_GATEWAY" != 1 ]; then
    PHASE_CONNECTIONS=$OPEN_STREAMS WARMUP_S=1 DURATION_S=6 run_phase gateway_open_streams \
        "$GW_PORT" /openai/v1/chat/completions "$GW_PID" --header "Authorization: Bearer $GW_KEY" \
        --timeout-s 30
fi

# json_str FILE FIELD: a string field of one-line JSON.
jstr() { sed -nE "s/.*\"$2\":\"([^\"]*)\".*/\1/p" "$1" | head -n 1; }

# start_experiment OUT BODY: POST an experiment, its id on stdout. The calls run on the
# load generator's CPU, never beside the gateway.
start_experiment() {
    taskset -c "$LOAD_CPU" curl -s -o "$1" -w '%{http_code}' --max-time 30 -H "Authorization: Bearer $MANAGE_KEY" \
        -H 'content-type: application/json' -d "$2" \
        "http://127.0.0.1:$GW_MANAGE_PORT/manage/v1/experiments" >"$1.code"
    [ "$(cat "$1.code")" = 202 ] || die "experiment not accepted: $(cat "$1.code") $(cat "$1")"
    sed -nE 's/.*"id":"(exp_[0-9a-f]+)".*/\1/p' "$1" | head -n 1
}

# wait_experiment ID OUT [INTERVAL_S]: poll until it is finished; its status on stdout.
wait_experiment() {
    local st
    for _ in $(seq 1 6000); do
        taskset -c "$LOAD_CPU" curl -s -o "$2" --max-time 5 -H "Authorization: Bearer $MANAGE_KEY" \
            "http://127.0.0.1:$GW_MANAGE_PORT/manage/v1/experiments/$1" || true
        st=$(sed -nE 's/.*"status":"(queued|running|completed|failed|cancelled)".*/\1/p' "$2" | tail -n 1)
        case $st in completed | failed | cancelled) echo "$st"; return 0 ;; esac
        sleep "${3:-0.02}"
    done
    die "experiment $1 did not finish in 120 s"
}

if [ "$REPLAY" != 0 ] && [ "$SKIP_GATEWAY" != 1 ]; then
    # Exactly $REPLAY requests tagged phase=fill, closed loop.
    log "replay: storing $REPLAY requests"
    timeout 600 taskset -c "$LOAD_CPU" "$BIN/loadgen" --target "127.0.0.1:$GW_PORT" \
        --path /openai/v1/chat/completions --body-file "$BODY_GW" --threads 1 --json \
        --header "Authorization: Bearer $GW_KEY" --header "X-Modelux-User-Tags: phase=fill" \
        --connections "$CONNECTIONS" --warmup-s 0 --duration-s 300 --max-requests "$REPLAY" \
        >"$TMP/replay_fill.json" || die "replay fill: loadgen failed"
    # The writer flushes every second; then the records are all readable.
    sleep 3
    REPLAY_BODY='{"candidate":{"strategy":"single","model":"mockant/claude-mock"},"projectId":"default","windowHours":1,"filters":{"tags":{"phase":"fill"}}}'
    rss_before=$(rss_kib "$GW_PID")
    (peak=0; while kill -0 "$GW_PID" 2>/dev/null; do
        r=$(rss_kib "$GW_PID"); [ "${r:-0}" -gt "$peak" ] && peak=$r && echo "$peak" >"$TMP/replay.peak"
        sleep 0.02; done) &
    sampler=$!
    t0=$(date +%s%N)
    id=$(start_experiment "$TMP/replay.created" "$REPLAY_BODY")
    st=$(wait_experiment "$id" "$TMP/replay.done")
    t1=$(date +%s%N)
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
    [ "$st" = completed ] || die "replay experiment ended $st: $(cat "$TMP/replay.done")"
    echo "$(( (t1 - t0) / 1000000 )) $(jnum "$TMP/replay.done" requests) $rss_before $(cat "$TMP/replay.peak" 2>/dev/null || echo "$rss_before")" \
        >"$TMP/replay.result"
    log "replay: $(cat "$TMP/replay.result") (ms, requests, RSS before KiB, peak KiB)"
fi

# Saturation (closed loop: throughput and CPU per request), then paced at $RATE req/s
# (latency added by the hop when it is not the bottleneck).
for mode in sat paced; do
    extra=()
    sfx=
    if [ "$mode" = paced ]; then
        [ "$RATE" = 0 ] && break
        extra=(--rate "$RATE")
        sfx=.paced
    fi
    run_phase direct$sfx "$MOCK_PORT" /v1/chat/completions - "${extra[@]}"
    if [ "$SKIP_GATEWAY" != 1 ]; then
        alive "$GW_PID" gateway
        run_phase gateway$sfx "$GW_PORT" /openai/v1/chat/completions "$GW_PID" \
            --header "Authorization: Bearer $GW_KEY" "${extra[@]}"
        if [ "$mode" = paced ] && [ "$CHURN" != 0 ]; then
            manage="http://127.0.0.1:$GW_MANAGE_PORT/manage/v1"
            curl -sf -o /dev/null -H "Authorization: Bearer $MANAGE_KEY" -H 'content-type: application/json' \
                -d '{"slug":"churn","project":"default","strategy":"single","model":"mock/mock-model"}' \
                "$manage/routing-configs" || die "cannot create the churn routing config"
            # $CHURN PATCHes spread over the phase, each a new version swapped in.
            interval=$(awk -v t="$((WARMUP_S + DURATION_S))" -v n="$CHURN" 'BEGIN { printf "%.3f", t / n }')
            (for i in $(seq 1 "$CHURN"); do
                taskset -c "$LOAD_CPU" curl -s -o /dev/null -w '%{http_code}\n' --max-time 5 -X PATCH \
                    -H "Authorization: Bearer $MANAGE_KEY" -H 'content-type: application/json' \
                    -d "{\"timeout_ms\": $((1000 + i))}" "$manage/routing-configs/churn" >>"$TMP/churn.codes"
                sleep "$interval"
            done) &
            churner=$!
            run_phase gateway_churn.paced "$GW_PORT" /openai/v1/chat/completions "$GW_PID" \
                --header "Authorization: Bearer $GW_KEY" "${extra[@]}"
            wait "$churner" || true
        fi
        if [ "$mode" = paced ] && [ "$REPLAY" != 0 ]; then
            # Phases without and with experiments (run back to back for the whole phase,
            # each over the stored fill), alternating: this VM's p99 moves by 2× between
            # two identical phases, so one pair says little; the medians are compared.
            for pair in $(seq 1 "$REPLAY_PAIRS"); do
                run_phase "gateway_quiet$pair.paced" "$GW_PORT" /openai/v1/chat/completions "$GW_PID" \
                    --header "Authorization: Bearer $GW_KEY" "${extra[@]}"
                (end=$(( $(date +%s) + WARMUP_S + DURATION_S ))
                 while [ "$(date +%s)" -lt "$end" ]; do
                     i=$(start_experiment "$TMP/replay_bg.created" "$REPLAY_BODY") || break
                     wait_experiment "$i" "$TMP/replay_bg.done" 0.2 >>"$TMP/replay_bg.statuses" || break
                 done) &
                replayer=$!
                run_phase "gateway_replay$pair.paced" "$GW_PORT" /openai/v1/chat/completions "$GW_PID" \
                    --header "Authorization: Bearer $GW_KEY" "${extra[@]}"
                wait "$replayer" || true
            done
        fi
        if [ "$mode" = sat ]; then
            run_phase gateway_xlat "$GW_PORT" /openai/v1/chat/completions "$GW_PID" \
                --header "Authorization: Bearer $GW_KEY"
            run_phase gateway_xlat_gemini "$GW_PORT" /openai/v1/chat/completions "$GW_PID" \
                --header "Authorization: Bearer $GW_KEY"
            if [ "$CACHE_HIT" = 1 ]; then
                # The sanity request is the miss that fills the entry; the phase's are hits.
                lookups() {
                    curl -sf "http://127.0.0.1:$GW_MANAGE_PORT/metrics" |
                        awk -v r="$1" '$1 == "modelux_cache_lookups_total{result=\"" r "\"}" { print $2 }'
                }
                hits0=$(lookups hit)
                run_phase gateway_cache_hit "$GW_PORT" /openai/v1/chat/completions "$GW_PID" \
                    --header "Authorization: Bearer $GW_CACHE_KEY"
                echo "$(( ${hits0:-0} )) $(lookups hit)" >"$TMP/cache_hits"
            fi
            if [ "$PASSTHROUGH" = 1 ]; then
                run_phase gateway_responses "$GW_PORT" /openai/v1/responses "$GW_PID" \
                    --header "Authorization: Bearer $GW_KEY"
                # A background response, then its cancel over and over: a passthrough
                # to the provider holding it (answered 200 each time).
                rid=$(curl -sf -H "Authorization: Bearer $GW_KEY" -H 'content-type: application/json' \
                    -d '{"model":"mock/mock-model","input":"x","background":true}' \
                    "http://127.0.0.1:$GW_PORT/openai/v1/responses" |
                    sed -nE 's/^ *"id": *"([^"]*)".*/\1/p' | head -n 1)
                [ -n "$rid" ] || die "cannot create the passthrough phase's response"
                run_phase gateway_passthrough "$GW_PORT" "/openai/v1/responses/$rid/cancel" "$GW_PID" \
                    --header "Authorization: Bearer $GW_KEY"
            fi
        fi
    fi
    alive "$NGINX_PID" nginx
    run_phase nginx$sfx "$NGINX_PORT" /v1/chat/completions "$NGINX_WORKER" "${extra[@]}"
    [ -z "$PINGORA_BARE" ] || run_phase pingora$sfx "$PB_PORT" /v1/chat/completions "$PB_PID" "${extra[@]}"
done

# Streamed answers (SSE), at saturation.
if [ "$STREAM" = 1 ]; then
    run_phase direct_stream "$MOCK_PORT" /v1/chat/completions -
    [ "$SKIP_GATEWAY" = 1 ] || run_phase gateway_stream "$GW_PORT" /openai/v1/chat/completions "$GW_PID" \
        --header "Authorization: Bearer $GW_KEY"
    run_phase nginx_stream "$NGINX_PORT" /v1/chat/completions "$NGINX_WORKER"
    [ -z "$PINGORA_BARE" ] || run_phase pingora_stream "$PB_PORT" /v1/chat/completions "$PB_PID"
fi

# One connection: latency when nothing queues (the tail is background work stalling the
# request, not load).
if [ "$ONE_CONN" = 1 ]; then
    export PHASE_CONNECTIONS=1
    run_phase direct.1conn "$MOCK_PORT" /v1/chat/completions -
    [ "$SKIP_GATEWAY" = 1 ] || run_phase gateway.1conn "$GW_PORT" /openai/v1/chat/completions "$GW_PID" \
        --header "Authorization: Bearer $GW_KEY"
    run_phase nginx.1conn "$NGINX_PORT" /v1/chat/completions "$NGINX_WORKER"
    [ -z "$PINGORA_BARE" ] || run_phase pingora.1conn "$PB_PORT" /v1/chat/completions "$PB_PID"
    unset PHASE_CONNECTIONS
fi

# ---------------------------------------------------------------- report
row() {
    local name=$1 f=$TMP/$1.json base=direct
    case $name in
        *.paced) base=direct.paced ;;
        *.1conn) base=direct.1conn ;;
        *_stream) base=direct_stream ;;
    esac
    local rps p50 p99 p999 errs all base50 base99 ticks rss
    rps=$(jnum "$f" rps)
    p50=$(jnum "$f" p50_us)
    p99=$(jnum "$f" p99_us)
    p999=$(jnum "$f" p999_us)
    errs=$(jnum "$f" errors)
    all=$(jnum "$f" completed_all)
    base50=$(jnum "$TMP/$base.json" p50_us)
    base99=$(jnum "$TMP/$base.json" p99_us)
    ticks=$(cat "$TMP/$name.ticks" 2>/dev/null || echo -)
    rss=$(cat "$TMP/$name.peak" 2>/dev/null || cat "$TMP/$name.rss" 2>/dev/null || echo -)
    awk -v n="$name" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v p999="$p999" \
        -v errs="$errs" -v all="$all" -v b50="$base50" -v b99="$base99" \
        -v ticks="$ticks" -v rss="$rss" -v tck="$CLK_TCK" 'BEGIN {
        add50 = (n ~ /^direct/) ? "–" : sprintf("%+d", p50 - b50)
        add99 = (n ~ /^direct/) ? "–" : sprintf("%+d", p99 - b99)
        cpu = (ticks == "-" || all == 0) ? "–" : sprintf("%.1f", ticks / tck * 1e6 / all)
        mib = (rss == "-") ? "–" : sprintf("%.1f", rss / 1024)
        printf "| %s | %.0f | %d | %d | %d | %s | %s | %s | %s | %d |\n",
            n, rps, p50, p99, p999, add50, add99, cpu, mib, errs
    }'
}

{
    echo "## modelux load test"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) · $(nproc) CPUs · ${CONNECTIONS} connections · non-streaming" \
        "· ${WARMUP_S}s warmup + ${DURATION_S}s per target · proxy on CPU $PROXY_CPU," \
        "loadgen on CPU $LOAD_CPU, mock on CPU $MOCK_CPU · $("$NGINX" -v 2>&1 | sed 's/.*: //')"
    echo
    echo "| target | req/s | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | CPU µs/req | RSS MiB | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    row direct
    [ "$SKIP_GATEWAY" = 1 ] || row gateway
    [ "$SKIP_GATEWAY" = 1 ] || row gateway_xlat
    [ "$SKIP_GATEWAY" = 1 ] || row gateway_xlat_gemini
    [ "$SKIP_GATEWAY" = 1 ] || [ "$CACHE_HIT" != 1 ] || row gateway_cache_hit
    [ "$SKIP_GATEWAY" = 1 ] || [ "$PASSTHROUGH" != 1 ] || row gateway_responses
    [ "$SKIP_GATEWAY" = 1 ] || [ "$PASSTHROUGH" != 1 ] || row gateway_passthrough
    row nginx
    [ -z "$PINGORA_BARE" ] || row pingora
    echo
    header() {
        echo "| target | req/s | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | CPU µs/req | RSS MiB | errors |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    }
    ratio() { # ratio NAME BASE: CPU µs/req of NAME over BASE's, same run
        awk -v a="$(cat "$TMP/$1.ticks" 2>/dev/null)" -v an="$(jnum "$TMP/$1.json" completed_all)" \
            -v b="$(cat "$TMP/$2.ticks" 2>/dev/null)" -v bn="$(jnum "$TMP/$2.json" completed_all)" \
            'BEGIN { if (a > 0 && b > 0 && an > 0 && bn > 0) printf "%.2f", (a / an) / (b / bn); else printf "–" }'
    }
    if [ "$STREAM" = 1 ]; then
        echo "Streamed (SSE) answers, ${CONNECTIONS} connections:"
        echo
        header
        row direct_stream
        [ "$SKIP_GATEWAY" = 1 ] || row gateway_stream
        row nginx_stream
        [ -z "$PINGORA_BARE" ] || row pingora_stream
        echo
    fi
    if [ "$ONE_CONN" = 1 ]; then
        echo "One connection (the tail is what background work adds when nothing queues):"
        echo
        header
        row direct.1conn
        [ "$SKIP_GATEWAY" = 1 ] || row gateway.1conn
        row nginx.1conn
        [ -z "$PINGORA_BARE" ] || row pingora.1conn
        echo
    fi
    if [ "$SKIP_GATEWAY" != 1 ]; then
        echo "CPU per request, gateway ÷ nginx: JSON **$(ratio gateway nginx)×**, streamed **$(ratio gateway_stream nginx_stream)×**."
        [ -z "$PINGORA_BARE" ] ||
            echo "CPU per request, gateway ÷ bare pingora: JSON **$(ratio gateway pingora)×**, streamed **$(ratio gateway_stream pingora_stream)×**."
        echo "Gateway RSS after start: $(awk '{ printf "%.1f", $1 / 1024 }' "$TMP/gateway.start.rss") MiB."
        if [ "$OPEN_STREAMS" != 0 ]; then
            echo "Gateway RSS with $OPEN_STREAMS streams open: $(awk '{ printf "%.1f", $1 / 1024 }' "$TMP/gateway_open_streams.peak" 2>/dev/null) MiB (peak; $(jnum "$TMP/gateway_open_streams.json" errors) errors)."
        fi
        echo
    fi
    if [ "$RATE" != 0 ]; then
        echo "Paced at $RATE req/s in total (latency below saturation; CPU is per request at that rate):"
        echo
        echo "| target | req/s | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | CPU µs/req | RSS MiB | errors |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        row direct.paced
        [ "$SKIP_GATEWAY" = 1 ] || row gateway.paced
        [ "$SKIP_GATEWAY" = 1 ] || [ "$CHURN" = 0 ] || row gateway_churn.paced
        if [ "$SKIP_GATEWAY" != 1 ] && [ "$REPLAY" != 0 ]; then
            for pair in $(seq 1 "$REPLAY_PAIRS"); do
                row "gateway_quiet$pair.paced"
                row "gateway_replay$pair.paced"
            done
        fi
        row nginx.paced
        [ -z "$PINGORA_BARE" ] || row pingora.paced
        echo
        if [ "$SKIP_GATEWAY" != 1 ] && [ "$CHURN" != 0 ]; then
            awk -v a="$(jnum "$TMP/gateway_churn.paced.json" p99_us)" -v b="$(jnum "$TMP/gateway.paced.json" p99_us)" \
                -v ok="$(grep -c '^200$' "$TMP/churn.codes" 2>/dev/null || echo 0)" -v n="$CHURN" \
                'BEGIN { if (b > 0) printf "Gateway p99 with %d management PATCHes during the run (%d answered 200): %d µs against %d µs without (**%+.1f%%**).\n\n", n, ok, a, b, 100 * (a - b) / b }'
        fi
    fi
    if [ "$SKIP_GATEWAY" != 1 ] && [ "$REPLAY" != 0 ] && [ -s "$TMP/replay.result" ]; then
        read -r ms n before peak <"$TMP/replay.result"
        awk -v ms="$ms" -v n="$n" -v before="$before" -v peak="$peak" \
            -v store="$TRACE_STORE" 'BEGIN { printf "Replay (routing_only, " store " trace store): %d stored requests in **%.2f s** (API call to completed, polled every 20 ms); gateway RSS %.1f MiB before, %.1f MiB peak (**%+.1f MiB**).\n", n, ms / 1000, before / 1024, peak / 1024, (peak - before) / 1024 }'
        if [ "$RATE" != 0 ]; then
            median_p99() { # median_p99 PREFIX: median p99 of the REPLAY_PAIRS phases
                for pair in $(seq 1 "$REPLAY_PAIRS"); do jnum "$TMP/$1$pair.paced.json" p99_us; done |
                    sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
            }
            awk -v a="$(median_p99 gateway_replay)" -v b="$(median_p99 gateway_quiet)" -v n="$REPLAY_PAIRS" \
                -v runs="$(grep -c completed "$TMP/replay_bg.statuses" 2>/dev/null || echo 0)" \
                'BEGIN { if (b > 0) printf "Gateway p99 with experiments running (%d completed, back to back, over %d phases): median %d µs against %d µs over %d phases without, alternating (**%+.1f%%**).\n", runs, n, a, b, n, 100 * (a - b) / b }'
        fi
        echo
    fi
    if [ "$SKIP_GATEWAY" != 1 ]; then
        awk -v g="$(jnum "$TMP/gateway.json" rps)" -v n="$(jnum "$TMP/nginx.json" rps)" \
            'BEGIN { if (n > 0) printf "Gateway throughput: **%.1f%%** of nginx.\n", 100 * g / n }'
        awk -v x="$(jnum "$TMP/gateway_xlat.json" rps)" -v g="$(jnum "$TMP/gateway.json" rps)" \
            'BEGIN { if (g > 0) printf "Translated route (OpenAI client, Anthropic upstream): **%.1f%%** of the same-format route.\n", 100 * x / g }'
        awk -v x="$(jnum "$TMP/gateway_xlat_gemini.json" rps)" -v g="$(jnum "$TMP/gateway.json" rps)" \
            'BEGIN { if (g > 0) printf "Translated route (OpenAI client, Gemini upstream): **%.1f%%** of the same-format route.\n", 100 * x / g }'
        if [ "$CACHE_HIT" = 1 ]; then
            read -r h0 h1 <"$TMP/cache_hits"
            awk -v c="$(jnum "$TMP/gateway_cache_hit.json" rps)" -v g="$(jnum "$TMP/gateway.json" rps)" \
                -v vsg="$(ratio gateway_cache_hit gateway)" -v vsn="$(ratio gateway_cache_hit nginx)" \
                -v all="$(jnum "$TMP/gateway_cache_hit.json" completed_all)" -v hits="$(( ${h1:-0} - ${h0:-0} ))" \
                'BEGIN { if (g > 0) printf "Exact cache hits: **%.2f×** the proxied route'"'"'s throughput; CPU per hit **%s×** the proxied route'"'"'s, **%s×** nginx'"'"'s per proxied request; %d of the phase'"'"'s %d requests were hits.\n", c / g, vsg, vsn, hits, all }'
        fi
        if [ "$PASSTHROUGH" = 1 ]; then
            echo "CPU per request over the same-format chat route's: Responses API create **$(ratio gateway_responses gateway)**, passthrough (\`POST /responses/{id}/cancel\`) **$(ratio gateway_passthrough gateway)**."
        fi
    else
        echo "Gateway phase skipped (SKIP_GATEWAY=1)."
    fi
} | tee "$TMP/report.md"
if [ -n "${REPORT_OUT:-}" ]; then cp "$TMP/report.md" "$REPORT_OUT"; fi
