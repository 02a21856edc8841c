#!/usr/bin/env bash
# The single test command for Strata: prepares a fresh Debian machine, then runs the whole suite.
#   bash tests/run.sh                  # everything
#   bash tests/run.sh --test <name>    # extra arguments are passed to `cargo test`
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

warn() { printf 'tests/run.sh: warning: %s\n' "$*" >&2; }

# System packages the suite needs. redis-server/redis-sentinel/redis-tools: real Redis peers for the
# L2 tests (sentinels run as `redis-server --sentinel`).
# gcc/libc6-dev: `ring` compiles C and rustc links through `cc`.
# As root they are installed with apt-get. Otherwise Debian's Redis packages are downloaded (no root
# needed) and unpacked under target/test-deps, which is put on PATH for the tests.
redis_local="$PWD/target/test-deps/redis"
install_redis_locally() {
    local tmp
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -qq redis-tools redis-server redis-sentinel libjemalloc2 liblzf1 >/dev/null 2>&1); then
        mkdir -p "$redis_local"
        for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$redis_local"; done
    else
        warn "could not download Redis packages; L2 tests will fail"
    fi
    rm -rf "$tmp"
}

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
        missing+=(redis-server redis-sentinel redis-tools)
    elif [[ ! -x "$redis_local/usr/bin/redis-server" ]] && command -v apt-get >/dev/null 2>&1; then
        install_redis_locally
    fi
fi
if [[ -x "$redis_local/usr/bin/redis-server" ]]; then
    export PATH="$redis_local/usr/bin:$PATH"
    for libdir in "$redis_local"/usr/lib/*-linux-gnu; do
        export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
fi

if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        warn "apt-get not available; not installing: ${missing[*]}"
    elif [[ $(id -u) -ne 0 ]]; then
        warn "not root; not installing: ${missing[*]} (run as root or install them yourself)"
    else
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; }; then
            warn "apt-get could not install: ${missing[*]}"
        fi
    fi
fi

# rustup puts cargo in ~/.cargo/bin, which non-login shells often lack on PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -f "${CARGO_HOME:-$HOME/.cargo}/env" ]]; then
    # shellcheck disable=SC1091
    . "${CARGO_HOME:-$HOME/.cargo}/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "tests/run.sh: cargo not found; install Rust (1.85+) with rustup: https://rustup.rs" >&2
    exit 127
fi

# A clean build of the suite takes about 1.5 GB under target/; say so up front rather than let the
# linker fail half-way with "No space left on device".
mkdir -p target
free_kb=$(df -Pk target 2>/dev/null | awk 'NR == 2 { print $4 }')
if [[ -n "$free_kb" ]] && ((free_kb < 2 * 1024 * 1024)); then
    warn "only $((free_kb / 1024)) MB free under target/; a clean build of the suite needs about 1.5 GB"
fi

command -v redis-server >/dev/null 2>&1 && echo "tests/run.sh: using $(redis-server --version | cut -d' ' -f1-3)"
exec cargo test --locked --all-targets "$@"
