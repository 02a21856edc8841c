#!/usr/bin/env bash
# Peer comparison: Strata against nginx proxy_cache, Varnish and a bare hyper server (the ceiling of
# Strata's own stack; for pass-through, a bare hyper reverse proxy), side by side on the same core and
# measured in turn (interleaved rounds), with the load generator on another core.
#
#   bash bench/compare.sh                       # DURATION=10s CONNECTIONS=64
#   DURATION=5s CONNECTIONS=128 bash bench/compare.sh
#
# Knobs (environment):
#   DURATION      length of each measured wrk run (default 10s); each is preceded by a WARMUP run (1s)
#   REPEAT        measured rounds (default 1): in each, every server runs once, in turn; each server
#                 keeps its best run (most requests/s)
#   CONNECTIONS   wrk connections (default 64); redis-benchmark uses the same number of clients
#   STAMPEDE_N    concurrent requests for one fresh key in the stampede (default 1000)
#   SERVER_CPU    core every server under test is pinned to (default 0)
#   LOAD_CPU      core of wrk and of the stampede client (default 1); redis-benchmark runs on
#                 SERVER_CPU, with redis-server on BACKEND_CPU
#   BACKEND_CPU   core of the origin and of redis-server (default: LOAD_CPU, so SERVER_CPU holds
#                 nothing but the server under test)
#   PORT_BASE     first of the 127.0.0.1 ports used (default 18000; PORT_BASE..PORT_BASE+11)
#   SERVERS       which parts run (default "nginx varnish ceiling strata l2"; l2 = redis + Strata L2)
#   STRATA_BUILD  0 skips `cargo build --release` and uses the existing target/release/strata
#   MEMORY_MB     CACHE_SIZE_MB of the memory scenario (default 256; 0 skips it)
#
# What it does: installs what is missing (wrk, nginx, varnish, redis) from Debian without root
# (`apt-get download` + `dpkg -x` into target/bench-deps), builds Strata (`cargo build --release`) and
# the helper servers under bench/ceiling (target/bench-ceiling), starts the origin, then measures:
#   1 KiB and 100 KiB L1 hits     nginx, Varnish, ceiling, Strata
#   L2 hits                       Strata with CACHE_SIZE_MB=0 + a local redis-server, against
#                                 redis-benchmark GET of a 1 KiB value (CONNECTIONS clients, and 1)
#   pass-through of /pass         nginx, Varnish, the proxy ceiling (a minimal hyper reverse proxy:
#                                 hyper-util's pooled client, no cache, no header rewriting), Strata,
#                                 and the origin hit directly
#   cold-key stampede             STAMPEDE_N concurrent GETs of one fresh 100 ms key: origin requests
#   memory                        Strata with CACHE_SIZE_MB=MEMORY_MB filled with distinct 1 KiB, then
#                                 100 KiB objects until L1 evicts: peak resident size (VmHWM)
# and prints the table (requests/s, p50, p99), the ratios, and the issue-5 targets; the same goes to
# bench/results.md with the date and the machine. Logs and configs of the run: target/bench-run/.
#
# Peers run in their stock shape plus what a reasonable operator sets, never against them: nginx has
# 1 worker, proxy_cache with proxy_cache_lock on, sendfile on (Debian's default; Debian's tcp_nopush is
# left off, it cut 100 KiB hits to a tenth here through 40 ms delayed-ACK stalls), access_log off,
# upstream keepalive and a high keepalive_requests (so wrk's connections are not recycled every 1000
# requests); pass-through is also run with proxy_cache_lock off (see below) and the better result is
# compared. Varnish has the builtin VCL (`-b`), malloc storage, default parameters and its working
# directory on tmpfs (/dev/shm) as Varnish recommends.
#
# Logging alike: nginx runs with access_log off, Varnish keeps only its in-memory log (nothing reads
# it here) and the ceiling logs nothing, so Strata runs with its access log off too
# (RUST_LOG=info,strata::access=off). Strata's default, the access log on, is measured beside it for
# 1 KiB hits as "strata-log" (lines written to a file), so what the log costs is in the table.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WARMUP=${WARMUP:-1s}
REPEAT=${REPEAT:-1}
STAMPEDE_N=${STAMPEDE_N:-1000}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BACKEND_CPU=${BACKEND_CPU:-$LOAD_CPU}
PORT_BASE=${PORT_BASE:-18000}
SERVERS=${SERVERS:-nginx varnish ceiling strata l2}
MEMORY_MB=${MEMORY_MB:-256}
want() { [[ " $SERVERS " == *" $1 "* ]]; }

ORIGIN_PORT=$PORT_BASE
NGINX_PORT=$((PORT_BASE + 1))
VARNISH_PORT=$((PORT_BASE + 2))
CEILING_PORT=$((PORT_BASE + 3))
STRATA_PORT=$((PORT_BASE + 4))
STRATA_ADMIN_PORT=$((PORT_BASE + 5))
VARNISH_ADMIN_PORT=$((PORT_BASE + 6))
REDIS_PORT=$((PORT_BASE + 7))
NGINX_NOLOCK_PORT=$((PORT_BASE + 8))
STRATA_LOG_PORT=$((PORT_BASE + 9))
STRATA_LOG_ADMIN_PORT=$((PORT_BASE + 10))
PROXY_CEILING_PORT=$((PORT_BASE + 11))
ORIGIN="127.0.0.1:$ORIGIN_PORT"

DEPS=$ROOT/target/bench-deps
RUN=$ROOT/target/bench-run
HELPERS=$ROOT/target/bench-ceiling/release
RESULTS=$ROOT/bench/results.md

log() { printf '[compare] %s\n' "$*" >&2; }
die() { printf '[compare] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------------
# Processes: everything started is recorded and stopped on exit.
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
VARNISH_DIR=
trap 'cleanup; [[ $VARNISH_DIR == /dev/shm/* ]] && rm -rf "$VARNISH_DIR"; true' EXIT
trap 'exit 130' INT TERM

# start_on CPU LOGFILE CMD...: runs CMD pinned to CPU in the background; its pid lands in STARTED.
STARTED=
start_on() {
    local cpu=$1 logfile=$2
    shift 2
    taskset -c "$cpu" "$@" >"$logfile" 2>&1 &
    STARTED=$!
    [[ $cpu != "$SERVER_CPU" ]] || SERVER_PID=$STARTED
    PIDS+=("$STARTED")
}

stop() {
    local pid=$1 kept=() p
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
    PIDS=("${kept[@]}")
}

# wait_http URL PID LOGFILE: until URL answers 200 (15 s), or fail with the log's tail.
wait_http() {
    local url=$1 pid=$2 logfile=$3 i
    for ((i = 0; i < 150; i++)); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null) == 200 ]]; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    log "$url did not come up; last lines of $logfile:"
    tail -n 20 "$logfile" >&2 || true
    return 1
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

to_secs() {
    local d=$1
    case $d in
        *ms) echo 1 ;;
        *s) echo "${d%s}" ;;
        *m) echo $((${d%m} * 60)) ;;
        *h) echo $((${d%h} * 3600)) ;;
        *) echo "$d" ;;
    esac
}

# ---------------------------------------------------------------------------------------------------
# Dependencies.
command -v taskset >/dev/null || die "taskset (util-linux) is required"
command -v curl >/dev/null || die "curl is required"
command -v python3 >/dev/null || die "python3 is required (stampede client)"
(($(nproc) >= 2)) || log "warning: fewer than 2 cores; server and load generator will share one"

# fetch_debs, find_bin, ensure, extra_libs, add_libdirs (shared with bench/instructions.sh).
# shellcheck source=bench/deps.sh
. "$ROOT/bench/deps.sh"

ensure wrk wrk libluajit-5.1-2 libluajit-5.1-common || die "wrk is required and could not be installed"
WRK=$(find_bin wrk)
{ "$WRK" -v 2>&1 || true; } | grep -q wrk || die "$WRK does not run (missing libluajit?)"

NGINX=
if ensure nginx nginx nginx-common; then NGINX=$(find_bin nginx); else log "nginx unavailable: skipped"; fi
VARNISHD=
extra_libs libjemalloc2=libjemalloc.so.2 libedit2=libedit.so.2
if ensure varnishd varnish libvarnishapi3; then VARNISHD=$(find_bin varnishd); else log "varnish unavailable: skipped"; fi
REDIS_SERVER=
extra_libs liblzf1=liblzf.so.1
if ensure redis-server redis-server redis-tools && find_bin redis-benchmark >/dev/null; then
    REDIS_SERVER=$(find_bin redis-server)
    REDIS_BENCHMARK=$(find_bin redis-benchmark)
else
    log "redis unavailable: the L2 scenario is skipped"
fi

# ---------------------------------------------------------------------------------------------------
# Builds: Strata once in release (LTO; reuses target/), the helper servers in their own target dir.
if ! command -v cargo >/dev/null 2>&1 && [[ -f "${CARGO_HOME:-$HOME/.cargo}/env" ]]; then
    # shellcheck disable=SC1091
    . "${CARGO_HOME:-$HOME/.cargo}/env"
fi
command -v cargo >/dev/null || die "cargo not found"
STRATA=$ROOT/target/release/strata
if [[ ${STRATA_BUILD:-1} == 0 ]]; then
    [[ -x $STRATA ]] || die "STRATA_BUILD=0 but $STRATA does not exist"
    log "STRATA_BUILD=0: using the existing $STRATA (built $(date -r "$STRATA" '+%F %T'))"
else
    log "building strata (cargo build --release; LTO, takes minutes when sources changed)"
    (unset LD_LIBRARY_PATH; cargo build --release --quiet) || die "strata build failed"
fi
log "building origin + ceiling (bench/ceiling)"
(unset LD_LIBRARY_PATH; cd bench/ceiling && cargo build --release --quiet --target-dir "$ROOT/target/bench-ceiling") ||
    die "bench/ceiling build failed"

# ---------------------------------------------------------------------------------------------------
rm -rf "$RUN"
mkdir -p "$RUN"
for p in $ORIGIN_PORT $NGINX_PORT $VARNISH_PORT $CEILING_PORT $STRATA_PORT $STRATA_ADMIN_PORT $VARNISH_ADMIN_PORT $REDIS_PORT \
    $NGINX_NOLOCK_PORT $STRATA_LOG_PORT $STRATA_LOG_ADMIN_PORT $PROXY_CEILING_PORT; do
    port_free "$p" || die "127.0.0.1:$p is in use; set PORT_BASE"
done

declare -A RPS P50 P99 NOTE STAMP
FOREIGN=0
BEST_FOREIGN=0
LOAD_START=$(cut -d' ' -f1 /proc/loadavg)
awk -v l="$LOAD_START" 'BEGIN {exit !(l > 0.5)}' && log "warning: load average is $LOAD_START (earlier runs count too); other work on this machine would skew the numbers"
SECS=$(to_secs "$DURATION")

to_ms() { # wrk latency (e.g. 812.00us, 1.20ms, 1.01s, 1.00m) to milliseconds
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

origin_count() { { curl -s --max-time 5 "http://$ORIGIN/_count?$1" || true; } | tr -d '[:space:]'; }

# Noise check: how much of the server core went to processes other than the server under test.
SERVER_PID=
core_busy() { awk -v c="cpu$SERVER_CPU" '$1 == c {print $2 + $3 + $4}' /proc/stat; }
tree_cpu() { # user+system ticks of SERVER_PID and its children (nginx workers, the Varnish child)
    local p total=0 t
    [[ -n $SERVER_PID ]] || { echo 0; return; }
    for p in "$SERVER_PID" $(pgrep -P "$SERVER_PID" 2>/dev/null || true); do
        t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk 'NR == 1 {print $12 + $13}' || true)
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

# rounds SCENARIO CONNS SERVER=URL...: a warm-up run for each server, then REPEAT rounds in which each
# server has one measured run in turn. Interleaved, a noisy minute of this shared machine falls on
# every server alike instead of on whichever ran then; each server keeps its best run (noise only
# slows down). Fills RPS/P50/P99/NOTE.
declare -A SERVER_PIDS ROUND_RPS
rounds() {
    local scenario=$1 conns=$2 spec server url r rps before after busy0 tree0 t0 foreign note out
    shift 2
    local -A best origin_hits best_foreign
    for spec in "$@"; do
        server=${spec%%=*} url=${spec#*=}
        taskset -c "$LOAD_CPU" timeout 60 "$WRK" -t1 -c"$conns" -d"$WARMUP" "$url" >/dev/null 2>&1 || true
        best[$server]=-1 origin_hits[$server]=0 best_foreign[$server]=0
    done
    for ((r = 1; r <= REPEAT; r++)); do
        for spec in "$@"; do
            server=${spec%%=*} url=${spec#*=}
            out="$RUN/wrk-$scenario-$server.txt"
            SERVER_PID=${SERVER_PIDS[$server]:-}
            before=$(origin_count "/${url#http://*/}")
            busy0=$(core_busy); tree0=$(tree_cpu); t0=$(date +%s%N)
            if ! taskset -c "$LOAD_CPU" timeout $((SECS + 60)) "$WRK" -t1 -c"$conns" -d"$DURATION" --timeout 5s --latency "$url" >"$out.$r" 2>&1; then
                log "wrk failed for $server $scenario: $(tail -n 3 "$out.$r")"
                continue
            fi
            # foreign = busy ticks of the server core not spent by the server, as % of the run's wall time
            foreign=$(awk -v b="$(($(core_busy) - busy0))" -v t="$(($(tree_cpu) - tree0))" -v ns="$(($(date +%s%N) - t0))" \
                -v hz="$(getconf CLK_TCK)" 'BEGIN {f = (b - t) / hz / (ns / 1e9) * 100; printf "%.0f", f < 0 ? 0 : f}')
            after=$(origin_count "/${url#http://*/}")
            if [[ -n $before && -n $after ]]; then origin_hits[$server]=$((origin_hits[$server] + after - before)); fi
            rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out.$r")
            ROUND_RPS[$scenario,$server,$r]=${rps:-}
            if ((${rps:-0} > best[$server])); then
                best[$server]=${rps:-0}
                cp "$out.$r" "$out"
                best_foreign[$server]=$foreign
            fi
        done
    done
    for spec in "$@"; do
        server=${spec%%=*}
        ((best[$server] >= 0)) || continue
        out="$RUN/wrk-$scenario-$server.txt"
        RPS[$scenario,$server]=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")
        P50[$scenario,$server]=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
        P99[$scenario,$server]=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
        note=""
        note+=$(awk '/Non-2xx or 3xx responses:/ {printf "%s non-2xx; ", $NF}' "$out")
        note+=$(awk '/Socket errors:/ {sub(/^ *Socket errors: */, ""); printf "socket errors %s; ", $0}' "$out")
        if [[ $scenario == l1_* || $scenario == l2* ]] && ((origin_hits[$server] > 0)); then
            note+="${origin_hits[$server]} origin requests during the runs; "
        fi
        ((best_foreign[$server] >= 10)) && note+="other processes took ${best_foreign[$server]}% of the server core; "
        NOTE[$scenario,$server]=$note
        log "$(printf '%-9s %-12s %9s req/s  p50 %8s ms  p99 %8s ms  %s' "$scenario" "$server" \
            "${RPS[$scenario,$server]}" "${P50[$scenario,$server]}" "${P99[$scenario,$server]}" "$note")"
    done
}

# stampede SERVER PORT: STAMPEDE_N concurrent requests for one fresh key; count origin requests.
stampede() {
    local server=$1 port=$2 path result count
    path="/cold?n=$server-$$-$RANDOM"
    result=$(taskset -c "$LOAD_CPU" timeout 90 python3 "$ROOT/bench/stampede.py" 127.0.0.1 "$port" "$path" "$STAMPEDE_N" 30 2>"$RUN/stampede-$server.err") ||
        result="failed: $(tail -n 1 "$RUN/stampede-$server.err")"
    sleep 0.3
    count=$(origin_count "$path")
    STAMP[$server]="$count|$result"
    log "stampede  $(printf '%-8s' "$server") origin requests: $count  ($result)"
}

warm() { # warm URL...: fetch each twice so it is cached
    local url
    for url in "$@"; do curl -s -o /dev/null --max-time 5 "$url"; curl -s -o /dev/null --max-time 5 "$url"; done
}

SKIPPED=()
HIT_1K=() HIT_100K=() PASS=() STAMPEDE=()
# serving NAME PORT [pass-only]: NAME (pid in STARTED) answers on PORT: warm it, enter it in the rounds.
serving() {
    local name=$1 port=$2 pass_only=${3:-}
    SERVER_PIDS[$name]=$STARTED
    PASS+=("$name=http://127.0.0.1:$port/pass")
    [[ -n $pass_only ]] && return 0
    warm "http://127.0.0.1:$port/1k" "http://127.0.0.1:$port/100k"
    HIT_1K+=("$name=http://127.0.0.1:$port/1k")
    HIT_100K+=("$name=http://127.0.0.1:$port/100k")
    STAMPEDE+=("$name=$port")
}

# All servers run side by side, each pinned to SERVER_CPU; an idle one costs the measured one nothing.
# --- origin ----------------------------------------------------------------------------------------
start_on "$BACKEND_CPU" "$RUN/origin.log" "$HELPERS/strata-origin" "$ORIGIN"
ORIGIN_PID=$STARTED
wait_http "http://$ORIGIN/1k" "$ORIGIN_PID" "$RUN/origin.log" || die "origin did not start"
PASS+=("origin=http://$ORIGIN/pass")

# --- nginx -----------------------------------------------------------------------------------------
# proxy_cache_lock also serialises requests for an uncacheable URL (the waiters poll every 500 ms),
# so a second nginx with the lock off is measured for pass-through and the better result is compared.
if ! want nginx; then
    :
elif [[ -n $NGINX ]]; then
    for variant in nginx nginx-nolock; do
        dir="$RUN/$variant" port=$NGINX_PORT lock=on
        [[ $variant == nginx-nolock ]] && port=$NGINX_NOLOCK_PORT lock=off
        mkdir -p "$dir/logs" "$dir/cache" "$dir/tmp"
        cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 10000000;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    proxy_cache_path $dir/cache levels=1:2 keys_zone=bench:16m max_size=1g inactive=1h use_temp_path=off;
    upstream origin { server $ORIGIN; keepalive 64; }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock $lock;
            add_header X-Cache-Status \$upstream_cache_status;
        }
    }
}
EOF
        start_on "$SERVER_CPU" "$dir/stderr.log" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log"
        if ! wait_http "http://127.0.0.1:$port/1k" "$STARTED" "$dir/logs/error.log"; then
            SKIPPED+=("$variant: did not start (see target/bench-run/$variant/)")
        elif [[ $variant == nginx ]]; then
            serving nginx "$port"
        else
            serving nginx-nolock "$port" pass-only
        fi
    done
else
    SKIPPED+=("nginx: not installed and could not be downloaded")
fi

# --- Varnish ---------------------------------------------------------------------------------------
# Unprivileged: varnishd picks the `none` jail when not root; -n keeps its working dir under RUN.
if ! want varnish; then
    :
elif [[ -n $VARNISHD ]]; then
    VARNISH_DIR="$RUN/varnish"
    if [[ -d /dev/shm && -w /dev/shm ]]; then VARNISH_DIR=$(mktemp -d /dev/shm/strata-bench-varnish.XXXXXX); fi
    vargs=(-F -n "$VARNISH_DIR" -a "127.0.0.1:$VARNISH_PORT" -T "127.0.0.1:$VARNISH_ADMIN_PORT"
        -b "$ORIGIN" -s malloc,256m)
    if [[ $VARNISHD == "$DEPS"/* ]]; then
        vargs+=(-p "vmod_path=$(dirname "$(compgen -G "$DEPS/usr/lib/*/varnish/vmods/libvmod_std.so" | head -n1)")")
    fi
    [[ $(id -u) -eq 0 ]] || vargs+=(-j none)
    start_on "$SERVER_CPU" "$RUN/varnish.log" "$VARNISHD" "${vargs[@]}"
    if wait_http "http://127.0.0.1:$VARNISH_PORT/1k" "$STARTED" "$RUN/varnish.log"; then
        serving varnish "$VARNISH_PORT"
    else
        SKIPPED+=("varnish: varnishd did not start (see target/bench-run/varnish.log)")
    fi
else
    SKIPPED+=("varnish: not installed and could not be downloaded")
fi

# --- ceiling ---------------------------------------------------------------------------------------
if want ceiling; then
    start_on "$SERVER_CPU" "$RUN/ceiling.log" "$HELPERS/strata-ceiling" "127.0.0.1:$CEILING_PORT"
    wait_http "http://127.0.0.1:$CEILING_PORT/1k" "$STARTED" "$RUN/ceiling.log" || die "ceiling did not start"
    SERVER_PIDS[ceiling]=$STARTED
    HIT_1K+=("ceiling=http://127.0.0.1:$CEILING_PORT/1k")
    HIT_100K+=("ceiling=http://127.0.0.1:$CEILING_PORT/100k")
    # The pass-through ceiling: what passing a request through costs on this stack with no proxy logic.
    start_on "$SERVER_CPU" "$RUN/proxy-ceiling.log" "$HELPERS/strata-proxy-ceiling" "127.0.0.1:$PROXY_CEILING_PORT" "$ORIGIN"
    wait_http "http://127.0.0.1:$PROXY_CEILING_PORT/pass" "$STARTED" "$RUN/proxy-ceiling.log" || die "proxy ceiling did not start"
    serving proxy-ceiling "$PROXY_CEILING_PORT" pass-only
fi

# --- Strata (L1) -----------------------------------------------------------------------------------
STRATA_ENV=(ORIGIN_URL="http://$ORIGIN" LISTEN_ADDR="127.0.0.1:$STRATA_PORT" ADMIN_ADDR="127.0.0.1:$STRATA_ADMIN_PORT"
    RUST_LOG="info,strata::access=off")
STRATA_PID=
if want strata; then
    start_on "$SERVER_CPU" "$RUN/strata-l1.log" env "${STRATA_ENV[@]}" "$STRATA"
    STRATA_PID=$STARTED
    wait_http "http://127.0.0.1:$STRATA_ADMIN_PORT/ready" "$STRATA_PID" "$RUN/strata-l1.log" || die "strata did not start"
    serving strata "$STRATA_PORT"
    xc=$(curl -s -o /dev/null -D - "http://127.0.0.1:$STRATA_PORT/1k" | awk -F': ' 'tolower($1) == "x-cache" {print $2}' | tr -d '\r' || true)
    [[ $xc == HIT-L1 ]] || log "warning: strata answered /1k with X-Cache: $xc after warming (expected HIT-L1)"
    # The default configuration, access log on: 1 KiB hits only, to show what the log costs.
    start_on "$SERVER_CPU" "$RUN/strata-log.log" env ORIGIN_URL="http://$ORIGIN" LISTEN_ADDR="127.0.0.1:$STRATA_LOG_PORT" \
        ADMIN_ADDR="127.0.0.1:$STRATA_LOG_ADMIN_PORT" "$STRATA"
    wait_http "http://127.0.0.1:$STRATA_LOG_ADMIN_PORT/ready" "$STARTED" "$RUN/strata-log.log" || die "strata (access log on) did not start"
    SERVER_PIDS[strata-log]=$STARTED
    warm "http://127.0.0.1:$STRATA_LOG_PORT/1k"
    HIT_1K+=("strata-log=http://127.0.0.1:$STRATA_LOG_PORT/1k")
fi

# --- The rounds ------------------------------------------------------------------------------------
if ((${#HIT_1K[@]} > 0)); then
    rounds l1_1k "$CONNECTIONS" "${HIT_1K[@]}"
    rounds l1_100k "$CONNECTIONS" "${HIT_100K[@]}"
fi
rounds pass "$CONNECTIONS" "${PASS[@]}"
for spec in "${STAMPEDE[@]}"; do stampede "${spec%%=*}" "${spec#*=}"; done
if [[ -n $STRATA_PID ]]; then
    STRATA_RSS=$(awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$STRATA_PID/status" 2>/dev/null || echo "?")
fi
# The peers stop here: the memory and L2 scenarios run Strata alone.
for pid in "${SERVER_PIDS[@]}"; do stop "$pid"; done
if [[ $VARNISH_DIR == /dev/shm/* ]]; then rm -rf "$VARNISH_DIR"; fi

# --- Memory: a full L1 of small objects, then of large ones ----------------------------------------
declare -A MEM_HWM MEM_ENTRIES
if want strata && ((MEMORY_MB > 0)); then
    for object in 1k 100k; do
        start_on "$SERVER_CPU" "$RUN/strata-memory-$object.log" env "${STRATA_ENV[@]}" CACHE_SIZE_MB="$MEMORY_MB" "$STRATA"
        pid=$STARTED
        wait_http "http://127.0.0.1:$STRATA_ADMIN_PORT/ready" "$pid" "$RUN/strata-memory-$object.log" || die "strata did not start"
        # Fill with new URLs until L1 has evicted for a while (a full L1), at most 12 rounds.
        for ((round = 1; round <= 12; round++)); do
            FILL_PATH="/$object" FILL_RUN="$round" taskset -c "$LOAD_CPU" timeout 60 "$WRK" -t1 -c"$CONNECTIONS" -d3s \
                -s "$ROOT/bench/fill.lua" "http://127.0.0.1:$STRATA_PORT" >"$RUN/wrk-memory-$object.txt" 2>&1 || true
            stats=$(curl -s --max-time 5 "http://127.0.0.1:$STRATA_ADMIN_PORT/stats" || true)
            evictions=$(echo "$stats" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("l1_evictions", 0))' 2>/dev/null || echo 0)
            # 1 KiB: a few 10^5 entries fit; 100 KiB: a few thousand.
            if [[ $object == 1k ]]; then ((evictions > 20000)) && break; else ((evictions > 3000)) && break; fi
        done
        MEM_ENTRIES[$object]=$(echo "$stats" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("l1_entries", "?"))' 2>/dev/null || echo "?")
        MEM_HWM[$object]=$(awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status" 2>/dev/null || echo "")
        log "memory    $object objects: CACHE_SIZE_MB=$MEMORY_MB, ${MEM_ENTRIES[$object]} entries, peak RSS ${MEM_HWM[$object]:-?} MiB"
        stop "$pid"
    done
fi

# --- L2: redis-benchmark reference, then Strata with CACHE_SIZE_MB=0 --------------------------------
REDIS_P50=
REDIS_P50_C1=
if ! want l2; then
    :
elif [[ -n $REDIS_SERVER ]]; then
    start_on "$BACKEND_CPU" "$RUN/redis.log" "$REDIS_SERVER" --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir "$RUN" --protected-mode yes
    redis_pid=$STARTED
    sleep 0.5
    # -t set,get: the SET stores the 1 KiB value the GETs then read (GET alone would read a miss).
    redis_get_p50() { # clients -> p50 of GET in ms
        taskset -c "$SERVER_CPU" timeout 120 "$REDIS_BENCHMARK" -h 127.0.0.1 -p "$REDIS_PORT" \
            -t set,get -d 1024 -c "$1" -n "$2" --csv 2>/dev/null |
            awk -F'","' '$1 == "\"GET" {print $5}'
    }
    REDIS_P50=$(redis_get_p50 "$CONNECTIONS" 100000)
    REDIS_P50_C1=$(redis_get_p50 1 20000)
    log "redis-benchmark GET 1 KiB p50: ${REDIS_P50:-?} ms ($CONNECTIONS clients), ${REDIS_P50_C1:-?} ms (1 client)"

    start_on "$SERVER_CPU" "$RUN/strata-l2.log" env "${STRATA_ENV[@]}" CACHE_SIZE_MB=0 \
        REDIS_URL="redis://127.0.0.1:$REDIS_PORT" "$STRATA"
    pid=$STARTED
    if wait_http "http://127.0.0.1:$STRATA_ADMIN_PORT/ready" "$pid" "$RUN/strata-l2.log"; then
        xc=
        for ((i = 0; i < 50; i++)); do
            xc=$(curl -s -o /dev/null -D - "http://127.0.0.1:$STRATA_PORT/1k" | awk -F': ' 'tolower($1) == "x-cache" {print $2}' | tr -d '\r' || true)
            [[ $xc == HIT-L2 ]] && break
            sleep 0.1
        done
        [[ $xc == HIT-L2 ]] || log "warning: strata (L2) answers /1k with X-Cache: $xc (expected HIT-L2)"
        SERVER_PIDS[strata]=$pid
        rounds l2 "$CONNECTIONS" "strata=http://127.0.0.1:$STRATA_PORT/1k"
        rounds l2_c1 1 "strata=http://127.0.0.1:$STRATA_PORT/1k"
    else
        SKIPPED+=("strata L2: did not become ready (see target/bench-run/strata-l2.log)")
    fi
    stop "$pid"
    stop "$redis_pid"
else
    SKIPPED+=("L2 hits: redis-server/redis-benchmark unavailable")
fi
stop "$ORIGIN_PID"

# ---------------------------------------------------------------------------------------------------
# Report.
num() { [[ -n ${1:-} ]] && echo "$1" || echo "n/a"; }
ratio() { # ratio A B: A/B to 2 decimals, or n/a
    if [[ -n ${1:-} && -n ${2:-} && ${2:-0} != 0 ]]; then awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; else echo "n/a"; fi
}
# round_ratios SCENARIO A B: A/B of each round (servers side by side in time), then their median.
round_ratios() {
    local r a b list=()
    for ((r = 1; r <= REPEAT; r++)); do
        a=${ROUND_RPS[$1,$2,$r]:-} b=${ROUND_RPS[$1,$3,$r]:-}
        [[ -n $a && -n $b && $b != 0 ]] && list+=("$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", a / b}')")
    done
    ((${#list[@]})) || { echo "n/a|n/a"; return; }
    printf '%s|%s\n' "${list[*]}" "$(printf '%s\n' "${list[@]}" | sort -n | awk '{v[NR] = $1} END {printf "%.2f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}')"
}
fmt_ms() { [[ -n ${1:-} ]] && awk -v v="$1" 'BEGIN {printf "%.2f", v}' || echo "n/a"; }
check() { # check VALUE OP LIMIT: met / MISSED / n/a
    [[ $1 == n/a || -z $3 ]] && { echo "n/a"; return; }
    awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN { ok = (op == ">=") ? (v >= l) : (v <= l); print ok ? "met" : "MISSED" }'
}

versions() {
    local v
    v="wrk $({ "$WRK" -v 2>&1 || true; } | awk 'NR == 1 {print $2}')"
    [[ -n $NGINX ]] && v+=", nginx $({ "$NGINX" -v 2>&1 || true; } | sed 's|.*/||')"
    [[ -n $VARNISHD ]] && v+=", $({ "$VARNISHD" -V 2>&1 || true; } | awk 'NR == 1 {sub(/^\(/, "", $2); print $2}')"
    [[ -n $REDIS_SERVER ]] && v+=", redis $({ "$REDIS_SERVER" --version || true; } | sed 's/.*v=\([^ ]*\).*/\1/')"
    v+=", strata $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || v+=" (+ uncommitted changes)"
    echo "$v"
}

ceiling_of() { # the ceiling a scenario is compared with: the bare server, or for pass-through the bare proxy
    if [[ $1 == pass ]]; then echo proxy-ceiling; else echo ceiling; fi
}

best_nginx() { # the better nginx result of a scenario (pass-through is run with the lock on and off)
    local a=${RPS[$1,nginx]:-} b=${RPS[$1,nginx-nolock]:-}
    if [[ -n $b && (-z $a || $b -gt $a) ]]; then echo "$b"; else echo "$a"; fi
}

report() {
    local cpu kernel
    cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    kernel=$(uname -r)
    echo "# Strata peer comparison"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: $(nproc) cores ($cpu), Linux $kernel"
    echo "- Placement: servers on core $SERVER_CPU; wrk and the stampede client on core $LOAD_CPU; origin and redis-server on core $BACKEND_CPU"
    echo "- Load average (1 min) before the run: $LOAD_START. Notes flag runs where other processes took ≥ 10% of the server core."
    echo "- Load: wrk -t1 -c$CONNECTIONS -d$DURATION --latency after a $WARMUP warm-up, best of $REPEAT rounds in which the servers take turns; stampede: $STAMPEDE_N concurrent requests"
    echo "- Versions: $(versions)"
    echo
    echo "## Throughput and latency"
    echo
    echo "| Scenario | Server | req/s | p50 ms | p99 ms | Notes |"
    echo "|---|---|--:|--:|--:|---|"
    local scenario server label
    for scenario in l1_1k l1_100k l2 l2_c1 pass; do
        case $scenario in
            l1_1k) label="1 KiB L1 hit" ;;
            l1_100k) label="100 KiB L1 hit" ;;
            l2) label="1 KiB L2 hit (CACHE_SIZE_MB=0)" ;;
            l2_c1) label="1 KiB L2 hit, 1 connection" ;;
            pass) label="pass-through (no-store)" ;;
        esac
        for server in nginx nginx-nolock varnish ceiling proxy-ceiling strata strata-log origin; do
            [[ -n ${RPS[$scenario,$server]:-} ]] || continue
            printf '| %s | %s | %s | %s | %s | %s |\n' "$label" "$server" "${RPS[$scenario,$server]}" \
                "$(fmt_ms "${P50[$scenario,$server]}")" "$(fmt_ms "${P99[$scenario,$server]}")" "${NOTE[$scenario,$server]%; }"
        done
    done
    if [[ -n $REDIS_P50 || -n $REDIS_P50_C1 ]]; then
        printf '| redis-benchmark GET 1 KiB | redis (%s clients) | | %s | | reference for L2 |\n' "$CONNECTIONS" "$(fmt_ms "$REDIS_P50")"
        printf '| redis-benchmark GET 1 KiB | redis (1 client) | | %s | | reference for L2, 1 connection |\n' "$(fmt_ms "$REDIS_P50_C1")"
    fi
    echo
    echo "## Ratios (requests/s, Strata / peer)"
    echo
    echo "| Scenario | Strata/nginx | Strata/Varnish | Strata/ceiling | Strata/origin direct |"
    echo "|---|--:|--:|--:|--:|"
    for scenario in l1_1k l1_100k pass; do
        case $scenario in l1_1k) label="1 KiB L1 hit" ;; l1_100k) label="100 KiB L1 hit" ;; pass) label="pass-through" ;; esac
        printf '| %s | %s | %s | %s | %s |\n' "$label" \
            "$(ratio "${RPS[$scenario,strata]:-}" "$(best_nginx "$scenario")")" \
            "$(ratio "${RPS[$scenario,strata]:-}" "${RPS[$scenario,varnish]:-}")" \
            "$(ratio "${RPS[$scenario,strata]:-}" "${RPS[$scenario,$(ceiling_of "$scenario")]:-}")" \
            "$(ratio "${RPS[$scenario,strata]:-}" "${RPS[$scenario,origin]:-}")"
    done
    echo
    echo "Strata/nginx for pass-through compares against the better of nginx with proxy_cache_lock on and off:"
    echo "with the lock on, concurrent requests for an uncacheable URL wait for the lock holder and poll every 500 ms."
    echo "Strata runs with its access log off, as nginx does here (access_log off); strata-log is Strata's"
    echo "default, the access log on, written to a file. For pass-through, the ceiling is proxy-ceiling: a"
    echo "minimal hyper reverse proxy (hyper-util's pooled client, no cache, no header rewriting, no checks)."
    echo
    echo "The ratios above (and the verdicts below) put each server's best run against the other's. Round by"
    echo "round, the two ran minutes apart at most; these are the ratios of each round and their median:"
    echo
    echo "| Ratio | Each round | Median |"
    echo "|---|---|--:|"
    local pair rr
    for pair in "l1_1k strata ceiling 1 KiB L1 hit, Strata/ceiling" "l1_1k strata nginx 1 KiB L1 hit, Strata/nginx" \
        "l1_1k strata-log ceiling 1 KiB L1 hit, Strata with its access log on/ceiling" \
        "l1_100k strata ceiling 100 KiB L1 hit, Strata/ceiling" "pass strata origin pass-through, Strata/origin direct" \
        "pass strata proxy-ceiling pass-through, Strata/proxy ceiling" \
        "pass proxy-ceiling origin pass-through, proxy ceiling/origin direct" \
        "pass nginx-nolock origin pass-through, nginx (lock off)/origin direct"; do
        read -r scenario a b label <<<"$pair"
        rr=$(round_ratios "$scenario" "$a" "$b")
        [[ ${rr%%|*} == n/a ]] || printf '| %s | %s | %s |\n' "$label" "${rr%%|*}" "${rr#*|}"
    done
    echo
    echo "## Cold-key stampede ($STAMPEDE_N concurrent requests for one fresh key, origin answers in 100 ms)"
    echo
    echo "| Server | Origin requests | Client result |"
    echo "|---|--:|---|"
    for server in nginx varnish strata; do
        [[ -n ${STAMP[$server]:-} ]] || continue
        printf '| %s | %s | %s |\n' "$server" "${STAMP[$server]%%|*}" "${STAMP[$server]#*|}"
    done
    echo
    echo "## Issue 5 targets (this run)"
    echo
    local r l2limit l2limit1
    l2limit=$([[ -n $REDIS_P50 ]] && awk -v v="$REDIS_P50" 'BEGIN {printf "%.3f", v + 0.2}' || true)
    l2limit1=$([[ -n $REDIS_P50_C1 ]] && awk -v v="$REDIS_P50_C1" 'BEGIN {printf "%.3f", v + 0.2}' || true)
    echo "| Target | Measured | Result |"
    echo "|---|--:|---|"
    r=$(ratio "${RPS[l1_1k,strata]:-}" "${RPS[l1_1k,nginx]:-}"); echo "| 1 KiB L1: ≥ 1.5× nginx | ${r} | $(check "$r" ">=" 1.5) |"
    r=$(ratio "${RPS[l1_1k,strata]:-}" "${RPS[l1_1k,ceiling]:-}"); echo "| 1 KiB L1: ≥ 0.9× ceiling | ${r} | $(check "$r" ">=" 0.9) |"
    r=$(ratio "${RPS[l1_100k,strata]:-}" "${RPS[l1_100k,nginx]:-}"); echo "| 100 KiB L1: ≥ 1.0× nginx | ${r} | $(check "$r" ">=" 1.0) |"
    r=$(ratio "${RPS[l1_100k,strata]:-}" "${RPS[l1_100k,varnish]:-}"); echo "| 100 KiB L1: ≥ 1.0× Varnish | ${r} | $(check "$r" ">=" 1.0) |"
    r=$(ratio "${RPS[l1_100k,strata]:-}" "${RPS[l1_100k,ceiling]:-}"); echo "| 100 KiB L1: ≥ 0.9× ceiling | ${r} | $(check "$r" ">=" 0.9) |"
    r=$(num "${P50[l2,strata]:-}"); [[ $r != n/a ]] && r=$(fmt_ms "$r")
    echo "| L2: p50 ≤ redis GET p50 + 0.2 ms ($CONNECTIONS conns: ≤ $(num "$l2limit") ms) | ${r} ms | $(check "$r" "<=" "$l2limit") |"
    r=$(num "${P50[l2_c1,strata]:-}"); [[ $r != n/a ]] && r=$(fmt_ms "$r")
    echo "| L2, 1 connection: p50 ≤ redis GET p50 + 0.2 ms (≤ $(num "$l2limit1") ms) | ${r} ms | $(check "$r" "<=" "$l2limit1") |"
    r=$(ratio "${RPS[pass,strata]:-}" "${RPS[pass,origin]:-}"); echo "| pass-through: ≥ 0.85× origin direct | ${r} | $(check "$r" ">=" 0.85) |"
    r=$(ratio "${RPS[pass,proxy-ceiling]:-}" "${RPS[pass,origin]:-}")
    echo "| (reference) pass-through, proxy ceiling: same target | ${r} | $(check "$r" ">=" 0.85) |"
    local memlimit object
    memlimit=$(awk -v m="$MEMORY_MB" 'BEGIN {printf "%.0f", 1.25 * m + 40}')
    for object in 1k 100k; do
        r=$(num "${MEM_HWM[$object]:-}")
        echo "| memory, L1 full of ${object/k/ KiB} objects: peak RSS ≤ 1.25 × $MEMORY_MB + 40 = $memlimit MiB | ${r} MiB | $(check "$r" "<=" "$memlimit") |"
    done
    echo
    echo "Memory: CACHE_SIZE_MB=$MEMORY_MB filled with distinct URLs until L1 evicted (entries held: 1 KiB ${MEM_ENTRIES[1k]:-?}, 100 KiB ${MEM_ENTRIES[100k]:-?}); peak resident size (VmHWM). Strata's resident size after the hit runs, L1 nearly empty: ${STRATA_RSS:-?} MiB."
    if ((${#SKIPPED[@]})); then
        echo
        echo "Skipped:"
        local s
        for s in "${SKIPPED[@]}"; do echo "- $s"; done
    fi
}

report | tee "$RESULTS"
log "written to ${RESULTS#"$ROOT"/}; logs and configs in target/bench-run/"
