# Helpers shared by the load scripts (run.sh, nodes.sh): logging, installs, ports,
# readiness and per-process CPU and memory. Sourced; the caller sets LOG_TAG and, before
# sourcing, READY_TIMEOUT_S.

log() { printf '[%s] %s\n' "${LOG_TAG:-load}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

need() { command -v "$1" >/dev/null 2>&1; }

# Stops the processes the script started (PIDS), by PID: TERM, up to 5 s, then KILL.
stop_started() {
    local pid alive
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

apt_install() {
    need apt-get || die "$* missing and apt-get unavailable"
    log "installing $*"
    timeout 600 apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "$@" >/dev/null
}

# A port nobody listens on right now (small race window is acceptable here).
free_port() {
    local p
    for _ in $(seq 1 200); do
        # Below the kernel's ephemeral range (32768+), where loadgen's own client sockets
        # (and their TIME_WAIT remains) would collide with a listener.
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# wait_status URL STATUS: poll until URL answers STATUS, bounded.
wait_status() {
    local url=$1 want=$2 code
    for _ in $(seq 1 $((READY_TIMEOUT_S * 10))); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
        [ "$code" = "$want" ] && return 0
        sleep 0.1
    done
    die "$url did not answer $want within ${READY_TIMEOUT_S}s (last: ${code:-none})"
}

alive() { kill -0 "$1" 2>/dev/null || die "$2 exited early"; }

# CPU ticks (utime+stime, all threads) and RSS (KiB) of a PID.
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# Numeric field of loadgen's one-line JSON (no jq dependency).
jnum() { sed -nE "s/.*\"$2\":(-?[0-9][0-9.eE+-]*).*/\1/p" "$1"; }

# Other work on the machine (a cargo build, say) skews every number here:
# sample overall CPU use for a second before starting anything.
busy_pct() {
    local a b
    read -ra a </proc/stat
    sleep 1
    read -ra b </proc/stat
    awk -v a="${a[*]}" -v b="${b[*]}" 'BEGIN {
        n = split(a, x, " "); split(b, y, " ")
        for (i = 2; i <= n && i <= 9; i++) { d = y[i] - x[i]; t += d; if (i == 5 || i == 6) idle += d }
        # Parenthesized: a bare ">" after printf is an output redirection.
        printf "%d", ((t > 0) ? 100 * (t - idle) / t : 0)
    }'
}

# start_clickhouse CPU: Debian's clickhouse-server (installed when missing) on two free
# loopback ports, pinned to CPU, data under $TMP/clickhouse; sets CH_HTTP, CH_TCP and
# CH_PID and adds the PID to PIDS (the caller stops it by PID).
start_clickhouse() {
    local cpu=$1 bin ch
    bin=$(command -v clickhouse-server || { [ -x /usr/sbin/clickhouse-server ] && echo /usr/sbin/clickhouse-server; } || true)
    if [ -z "$bin" ]; then
        apt_install clickhouse-server
        bin=$(command -v clickhouse-server || echo /usr/sbin/clickhouse-server)
    fi
    ch=$TMP/clickhouse
    mkdir -p "$ch/data" "$ch/tmp" "$ch/user_files" "$ch/format_schemas"
    CH_HTTP=$(free_port) || die "no free port"
    CH_TCP=$(free_port) || die "no free port"
    cat >"$ch/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <http_port>$CH_HTTP</http_port>
  <tcp_port>$CH_TCP</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>$ch/data/</path>
  <tmp_path>$ch/tmp/</tmp_path>
  <user_files_path>$ch/user_files/</user_files_path>
  <format_schema_path>$ch/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
</yandex>
XML
    cat >"$ch/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
XML
    (cd "$ch" && exec taskset -c "$cpu" "$bin" --config-file="$ch/config.xml") >"$TMP/clickhouse.log" 2>&1 &
    CH_PID=$!
    PIDS+=("$CH_PID")
    wait_status "http://127.0.0.1:$CH_HTTP/ping" 200
    log "clickhouse on 127.0.0.1:$CH_HTTP, pid $CH_PID"
}

# start_mock NAME CPU [mock-upstream args…]: the bundled mock on a free loopback port,
# pinned to CPU, logs in $TMP/NAME.*; sets MOCK_STARTED_PID and MOCK_STARTED_ADDR
# (host:port) and adds the PID to PIDS.
start_mock() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$BIN/mock-upstream" --listen 127.0.0.1:0 --threads 1 "$@" \
        >"$TMP/$name.out" 2>"$TMP/$name.log" &
    MOCK_STARTED_PID=$!
    PIDS+=("$MOCK_STARTED_PID")
    MOCK_STARTED_ADDR=
    for _ in $(seq 1 $((READY_TIMEOUT_S * 10))); do
        MOCK_STARTED_ADDR=$(sed -n 's/^listening on //p' "$TMP/$name.out")
        [ -n "$MOCK_STARTED_ADDR" ] && return 0
        alive "$MOCK_STARTED_PID" "mock-upstream ($name)"
        sleep 0.1
    done
    die "mock-upstream ($name) did not report its address"
}
