#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind: Strata against the hyper
# ceiling (1 KiB hits) and against the origin hit directly (pass-through). Unlike requests/s, these
# counts barely move with a shared machine's noise, so they show what a change to Strata's own code
# did. They leave out the kernel (about two thirds of a request's time here; see bench/compare.sh).
#
#   bash bench/instructions.sh              # DURATION=8s CONNECTIONS=8
#
# Each server runs alone under callgrind on SERVER_CPU (default 0) while wrk loads it from LOAD_CPU
# (default 1); counting is switched on after a warm-up request and off when wrk ends, so start-up
# is left out. Scenarios:
#   1 KiB L1 hit       ceiling, Strata
#   pass-through       origin directly, the proxy ceiling (bench/ceiling/src/bin/proxy.rs), Strata
#   L2 (CACHE_SIZE_MB=0, local redis-server): Strata; concurrent requests for the key share one
#                      Redis GET (coalescing), as in bench/compare.sh
# Strata's access log is off here (RUST_LOG=info,strata::access=off): it is a choice of the
# operator's, and its cost is stated separately in the README. Needs valgrind (installed from Debian
# into target/bench-deps when missing), wrk, and for L2 redis-server.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
DEPS=$ROOT/target/bench-deps
RUN=$ROOT/target/bench-run
HELPERS=$ROOT/target/bench-ceiling/release
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-8}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PORT_BASE=${PORT_BASE:-18200}
ORIGIN_PORT=$PORT_BASE
SERVER_PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 2))
REDIS_PORT=$((PORT_BASE + 3))

log() { printf '[instructions] %s\n' "$*" >&2; }
die() { printf '[instructions] error: %s\n' "$*" >&2; exit 1; }

# shellcheck source=bench/deps.sh
. "$ROOT/bench/deps.sh"
ensure wrk wrk libluajit-5.1-2 libluajit-5.1-common || die "wrk is required and could not be installed"
WRK=$(find_bin wrk)
if ! command -v valgrind >/dev/null; then
    ensure valgrind valgrind || die "valgrind is required and could not be installed"
    # An unpacked valgrind finds its tools through VALGRIND_LIB.
    export VALGRIND_LIB=$DEPS/usr/libexec/valgrind
fi
VALGRIND=$(find_bin valgrind)
CALLGRIND_CONTROL=$(find_bin callgrind_control) || die "callgrind_control not found"
REDIS_SERVER=$(find_bin redis-server || true)

(unset LD_LIBRARY_PATH; cargo build --release --quiet) || die "strata build failed"
(unset LD_LIBRARY_PATH; cd bench/ceiling && cargo build --release --quiet --target-dir "$ROOT/target/bench-ceiling") ||
    die "bench/ceiling build failed"
mkdir -p "$RUN"

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # wait_http URL: until it answers 200 (60 s: valgrind starts slowly)
    local i
    for ((i = 0; i < 600; i++)); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null) == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

taskset -c "$LOAD_CPU" "$HELPERS/strata-origin" "127.0.0.1:$ORIGIN_PORT" >"$RUN/instructions-origin.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$ORIGIN_PORT/1k" || die "origin did not start"
if [[ -n $REDIS_SERVER ]]; then
    taskset -c "$LOAD_CPU" "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        >"$RUN/instructions-redis.log" 2>&1 &
    PIDS+=($!)
fi

# count NAME PORT PATH READY_URL CMD...: instructions per request of CMD (run with the variables in
# the array SERVER_ENV) under load on PORT/PATH.
SERVER_ENV=()
count() {
    local name=$1 port=$2 path=$3 ready=$4 pid requests collected
    shift 4
    local out=$RUN/instructions-$name.log
    env "${SERVER_ENV[@]}" taskset -c "$SERVER_CPU" "$VALGRIND" --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$RUN/callgrind-$name.out" "$@" >"$out" 2>&1 &
    pid=$!
    wait_http "$ready" || { kill "$pid"; die "$name did not start (see $out)"; }
    # Twice: a cache fills on the first request.
    curl -s -o /dev/null "http://127.0.0.1:$port$path"
    curl -s -o /dev/null "http://127.0.0.1:$port$path"
    "$CALLGRIND_CONTROL" -i on "$pid" >/dev/null 2>&1
    requests=$(taskset -c "$LOAD_CPU" "$WRK" -t1 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$port$path" |
        awk '/requests in/ {print $1}')
    "$CALLGRIND_CONTROL" -i off "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    collected=$(awk '/Collected :/ {gsub(",", "", $NF); print $NF}' "$out")
    [[ -n $collected && ${requests:-0} -gt 0 ]] || die "$name: no count (see $out)"
    echo $((collected / requests))
}

STRATA=$ROOT/target/release/strata
STRATA_ENV=(ORIGIN_URL="http://127.0.0.1:$ORIGIN_PORT" LISTEN_ADDR="127.0.0.1:$SERVER_PORT"
    ADMIN_ADDR="127.0.0.1:$ADMIN_PORT" RUST_LOG=info,strata::access=off)
READY="http://127.0.0.1:$ADMIN_PORT/ready"

log "1 KiB hits: ceiling"
ceiling=$(count ceiling "$SERVER_PORT" /1k "http://127.0.0.1:$SERVER_PORT/1k" "$HELPERS/strata-ceiling" "127.0.0.1:$SERVER_PORT")
log "pass-through: origin directly"
direct=$(count origin-direct "$SERVER_PORT" /pass "http://127.0.0.1:$SERVER_PORT/1k" "$HELPERS/strata-origin" "127.0.0.1:$SERVER_PORT")
log "pass-through: proxy ceiling (minimal hyper reverse proxy)"
bare_proxy=$(count proxy-ceiling "$SERVER_PORT" /pass "http://127.0.0.1:$SERVER_PORT/pass" "$HELPERS/strata-proxy-ceiling" \
    "127.0.0.1:$SERVER_PORT" "127.0.0.1:$ORIGIN_PORT")
SERVER_ENV=("${STRATA_ENV[@]}")
log "1 KiB hits: strata"
hit=$(count strata-hit "$SERVER_PORT" /1k "$READY" "$STRATA")
log "pass-through: strata"
pass=$(count strata-pass "$SERVER_PORT" /pass "$READY" "$STRATA")
l2=n/a
if [[ -n $REDIS_SERVER ]]; then
    log "L2 (CACHE_SIZE_MB=0): strata"
    SERVER_ENV=("${STRATA_ENV[@]}" CACHE_SIZE_MB=0 REDIS_URL="redis://127.0.0.1:$REDIS_PORT")
    l2=$(count strata-l2 "$SERVER_PORT" /1k "$READY" "$STRATA")
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
cat <<TABLE
| Scenario ($CONNECTIONS connections, user-space instructions per request) | Peer | Strata | Strata / peer |
|---|--:|--:|--:|
| 1 KiB L1 hit (peer: hyper ceiling) | $ceiling | $hit | $(ratio "$hit" "$ceiling") |
| pass-through (peer: origin hit directly) | $direct | $pass | $(ratio "$pass" "$direct") |
| pass-through (peer: proxy ceiling, a minimal hyper reverse proxy) | $bare_proxy | $pass | $(ratio "$pass" "$bare_proxy") |
| L2 hit, CACHE_SIZE_MB=0 | | $l2 | |
TABLE
