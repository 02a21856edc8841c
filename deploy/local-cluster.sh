#!/usr/bin/env bash
# The docker-compose.cache.yml topology as local processes, for machines without a container engine:
# a Redis master and replica, three sentinels (quorum 2), a demo origin, and two Strata instances that
# find Redis through Sentinel. Everything listens on free 127.0.0.1 ports.
#
#   deploy/local-cluster.sh start [DIR]   start; writes DIR/cluster.env (KEY=value lines: ports, pids,
#                                          secrets; sourceable) and prints it
#   deploy/local-cluster.sh stop DIR      stop everything started in DIR
#
# Needs redis-server and redis-cli (PATH, or target/test-deps/redis as tests/run.sh installs them),
# python3 (the demo origin) and the strata binary (STRATA_BIN, else target/release or target/debug).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command=${1:-start}
dir=${2:-}

die() { echo "local-cluster: $*" >&2; exit 1; }

stop_all() {
    local pids="$1/pids"
    [[ -f $pids ]] || return 0
    # Sentinels first, so they do not fail over while the servers go down.
    tac "$pids" | while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.2
    tac "$pids" | while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$pids"
}

if [[ $command == stop ]]; then
    [[ -n $dir ]] || die "usage: $0 stop DIR"
    stop_all "$dir"
    exit 0
fi
[[ $command == start ]] || die "usage: $0 start [DIR] | stop DIR"

# --- tools ------------------------------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1 && [[ -x $repo/target/test-deps/redis/usr/bin/redis-server ]]; then
    export PATH="$repo/target/test-deps/redis/usr/bin:$PATH"
    for libdir in "$repo"/target/test-deps/redis/usr/lib/*-linux-gnu; do
        export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
fi
command -v redis-server >/dev/null 2>&1 || die "redis-server not found (run bash tests/run.sh once, or install redis-server)"
command -v python3 >/dev/null 2>&1 || die "python3 not found (the demo origin)"
strata=${STRATA_BIN:-}
if [[ -z $strata ]]; then
    for candidate in "$repo/target/release/strata" "$repo/target/debug/strata"; do
        [[ -x $candidate ]] && { strata=$candidate; break; }
    done
fi
[[ -n $strata && -x $strata ]] || die "strata binary not found: cargo build --release, or set STRATA_BIN"

dir=${dir:-$(mktemp -d -t strata-cluster.XXXXXX)}
mkdir -p "$dir"
: >"$dir/pids"
trap 'echo "local-cluster: start failed; stopping" >&2; stop_all "$dir"' ERR

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_for() { # what, command...
    local what=$1; shift
    for _ in $(seq 1 200); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    die "$what did not come up (logs in $dir)"
}

spawn() { # name, command... : runs in the background, logs to DIR/name.log, records the pid
    local name=$1; shift
    "$@" >"$dir/$name.log" 2>&1 &
    echo $! >>"$dir/pids"
    echo $!
}

password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
master=$(free_port); replica=$(free_port)
sentinels=("$(free_port)" "$(free_port)" "$(free_port)")
origin=$(free_port)
strata_ports=("$(free_port)" "$(free_port)"); admin_ports=("$(free_port)" "$(free_port)")

# --- Redis master and replica (the settings of config/redis.conf that matter here) -------------------
redis_common=(--bind 127.0.0.1 --protected-mode no --save "" --appendonly no
              --requirepass "$password" --masterauth "$password" --maxmemory 256mb
              --maxmemory-policy allkeys-lru --repl-diskless-sync-delay 0)
mkdir -p "$dir/master" "$dir/replica"
master_pid=$(spawn master redis-server --port "$master" --dir "$dir/master" "${redis_common[@]}")
replica_pid=$(spawn replica redis-server --port "$replica" --dir "$dir/replica" "${redis_common[@]}" \
    --replicaof 127.0.0.1 "$master")
wait_for "redis master" redis-cli -p "$master" -a "$password" --no-auth-warning ping
wait_for "redis replica in sync" sh -c "redis-cli -p $master -a $password --no-auth-warning info replication | grep -q 'state=online'"

# --- three sentinels, quorum 2 (config/sentinel.conf, with test-sized timers) ------------------------
sentinel_pids=()
for i in 0 1 2; do
    port=${sentinels[$i]}
    mkdir -p "$dir/sentinel$i"
    cat >"$dir/sentinel$i/sentinel.conf" <<EOF
port $port
bind 127.0.0.1
dir $dir/sentinel$i
sentinel monitor mymaster 127.0.0.1 $master 2
sentinel auth-pass mymaster $password
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 3000
sentinel parallel-syncs mymaster 1
EOF
    sentinel_pids+=("$(spawn "sentinel$i" redis-server "$dir/sentinel$i/sentinel.conf" --sentinel)")
done
for port in "${sentinels[@]}"; do
    wait_for "sentinel $port" sh -c "redis-cli -p $port sentinel get-master-addr-by-name mymaster | grep -q $master"
    wait_for "sentinel $port sees its peers" sh -c "redis-cli -p $port sentinel master mymaster | grep -A1 '^num-other-sentinels$' | tail -1 | grep -q 2"
done

# --- demo origin: every path cacheable for 60 s --------------------------------------------------------
cat >"$dir/origin.py" <<'EOF'
import http.server, sys
class Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("origin says " + self.path + "\n").encode()
        self.send_response(200)
        self.send_header("Cache-Control", "public, max-age=60, stale-if-error=600")
        self.send_header("Surrogate-Key", "demo")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Origin).serve_forever()
EOF
origin_pid=$(spawn origin python3 "$dir/origin.py" "$origin")
wait_for "origin" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$origin/')"

# --- two Strata instances, Redis through Sentinel ------------------------------------------------------
redis_url="redis-sentinel://:$password@127.0.0.1:${sentinels[0]}?sentinelServiceName=mymaster&node=127.0.0.1:${sentinels[1]}&node=127.0.0.1:${sentinels[2]}"
strata_pids=()
for i in 0 1; do
    strata_pids+=("$(spawn "strata$i" env ORIGIN_URL="http://127.0.0.1:$origin" \
        LISTEN_ADDR="127.0.0.1:${strata_ports[$i]}" ADMIN_ADDR="127.0.0.1:${admin_ports[$i]}" \
        ADMIN_TOKEN="$token" REDIS_URL="$redis_url" REDIS_TIMEOUT=200ms SHUTDOWN_TIMEOUT=2s \
        CACHE_SIZE_MB=64 RUST_LOG=info "$strata")")
done
for i in 0 1; do
    wait_for "strata$i" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${admin_ports[$i]}/health')"
done
trap - ERR

cat >"$dir/cluster.env" <<EOF
CLUSTER_DIR=$dir
REDIS_PASSWORD=$password
ADMIN_TOKEN=$token
MASTER_PORT=$master
MASTER_PID=$master_pid
REPLICA_PORT=$replica
REPLICA_PID=$replica_pid
SENTINEL1_PORT=${sentinels[0]}
SENTINEL2_PORT=${sentinels[1]}
SENTINEL3_PORT=${sentinels[2]}
ORIGIN_PORT=$origin
ORIGIN_PID=$origin_pid
STRATA1_PORT=${strata_ports[0]}
STRATA1_ADMIN_PORT=${admin_ports[0]}
STRATA1_PID=${strata_pids[0]}
STRATA2_PORT=${strata_ports[1]}
STRATA2_ADMIN_PORT=${admin_ports[1]}
STRATA2_PID=${strata_pids[1]}
EOF
cat "$dir/cluster.env"
