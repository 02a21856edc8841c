#!/usr/bin/env bash
# The single test command for Strata: prepares a fresh Debian machine, then runs the whole suite.
#   bash tests/run.sh                  # everything
#   bash tests/run.sh --test <name>    # extra arguments are passed to `cargo test`
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

warn() { printf 'tests/run.sh: warning: %s\n' "$*" >&2; }

# System packages the suite needs. redis-server/redis-tools: real Redis peers for the L2 tests of later
# milestones (harmless before). gcc/libc6-dev: `ring` compiles C and rustc links through `cc`.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server redis-tools)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)

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

exec cargo test --locked --all-targets "$@"
