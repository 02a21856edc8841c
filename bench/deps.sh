# Shared by bench/compare.sh and bench/instructions.sh (sourced): tools from Debian without root,
# `apt-get download` + `dpkg -x` into $DEPS, found next to the system's own. Needs ROOT, DEPS and log.

fetch_debs() { # fetch_debs PKG...: download and unpack into $DEPS; false if the download failed
    local tmp deb
    command -v apt-get >/dev/null || return 1
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download -qq "$@" >/dev/null 2>&1); then
        rm -rf "$tmp"
        return 1
    fi
    mkdir -p "$DEPS"
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$DEPS"; done
    rm -rf "$tmp"
}
has_lib() { ldconfig -p 2>/dev/null | grep -q "$1" || compgen -G "$DEPS/usr/lib/*/$1*" >/dev/null; }
find_bin() { # find_bin NAME: system PATH first, then the unpacked packages
    local name=$1 dir
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
    for dir in "$DEPS/usr/bin" "$DEPS/usr/sbin" "$ROOT/target/test-deps/redis/usr/bin"; do
        [[ -x $dir/$name ]] && { echo "$dir/$name"; return 0; }
    done
    return 1
}
# Libraries unpacked next to the binaries (luajit for wrk, varnishapi, jemalloc, ...).
add_libdirs() {
    local libdir
    for libdir in "$DEPS"/usr/lib/*-linux-gnu "$ROOT"/target/test-deps/redis/usr/lib/*-linux-gnu; do
        if [[ -d $libdir && :${LD_LIBRARY_PATH:-}: != *":$libdir:"* ]]; then
            export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    done
}
add_libdirs
ensure() { # ensure BIN PKG...: make BIN available, downloading PKG... if needed
    local bin=$1
    shift
    find_bin "$bin" >/dev/null && return 0
    log "installing $* into target/bench-deps"
    fetch_debs "$@" || log "could not download: $*"
    add_libdirs
    find_bin "$bin" >/dev/null
}
extra_libs() { # packages for shared libraries the system lacks
    local pkg lib
    for pkg in "$@"; do
        lib=${pkg%%=*}
        has_lib "${pkg#*=}" || fetch_debs "$lib" || true
    done
    add_libdirs
}
