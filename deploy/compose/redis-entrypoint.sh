#!/bin/sh
# Starts one Redis server or Sentinel of docker-compose.cache.yml from the read-only templates in
# config/ (mounted at $TEMPLATES). Each instance gets its own writable copy in $DATA, because Redis
# and Sentinel rewrite their configuration at runtime (CONFIG REWRITE after a failover, discovered
# replicas and sentinels, epochs).
#
#   redis-entrypoint.sh server   <own hostname> [default master hostname]
#   redis-entrypoint.sh sentinel <own hostname>
#
# The copy is regenerated on every start, so edits to config/*.conf and a new REDIS_PASSWORD apply
# after a restart. Roles are not taken from the template blindly: the sentinels are asked first who
# the master is, so a former master that restarts after a failover comes back as a replica, and a
# restarted sentinel monitors the current master. Only when no sentinel answers (the first start of
# the stack) does the default apply: a server without a default master starts as the master.
set -eu

: "${REDIS_PASSWORD:?REDIS_PASSWORD must be set (for example: openssl rand -hex 32)}"
# The password is also the userinfo of Strata's REDIS_URL and a token of the config files: keep it
# to URL-unreserved characters so it needs no escaping anywhere.
case "$REDIS_PASSWORD" in
*[!A-Za-z0-9._~-]*)
    echo "REDIS_PASSWORD may only contain A-Z a-z 0-9 . _ ~ - (use: openssl rand -hex 32)" >&2
    exit 2
    ;;
esac

TEMPLATES=${TEMPLATES:-/etc/strata}
DATA=${DATA:-/data}
SENTINELS=${SENTINELS:-redis-sentinel-1 redis-sentinel-2 redis-sentinel-3}
SERVICE=${SENTINEL_SERVICE:-mymaster}
role=${1:?usage: redis-entrypoint.sh server|sentinel HOSTNAME [DEFAULT_MASTER]}
self=${2:?usage: redis-entrypoint.sh server|sentinel HOSTNAME [DEFAULT_MASTER]}

# Prints the master's hostname as the first sentinel that answers knows it, or nothing.
current_master() {
    for sentinel in $SENTINELS; do
        [ "$sentinel" = "$self" ] && continue
        master=$(REDISCLI_AUTH="$REDIS_PASSWORD" timeout 3 redis-cli --no-auth-warning --raw \
            -h "$sentinel" -p 26379 sentinel get-master-addr-by-name "$SERVICE" 2>/dev/null |
            head -n 1) || master=""
        case "$master" in
        "" | *ERR* | *NOAUTH* | *Could* ) ;;
        *)
            echo "$master"
            return 0
            ;;
        esac
    done
}

# The template minus its password placeholders and working directory, which are set below.
copy_template() {
    grep -vE '^[[:space:]]*(requirepass|masterauth|sentinel auth-pass|dir)[[:space:]]' "$1" >"$2"
}

case "$role" in
server)
    conf=$DATA/redis.conf
    copy_template "$TEMPLATES/redis.conf" "$conf"
    master=$(current_master) || master=""
    [ -n "$master" ] || master=${3:-}
    {
        echo "dir $DATA"
        echo "requirepass $REDIS_PASSWORD"
        echo "masterauth $REDIS_PASSWORD"
        # Announce the service name, not the container IP (which changes on every restart).
        echo "replica-announce-ip $self"
        if [ -n "$master" ] && [ "$master" != "$self" ]; then
            echo "replicaof $master 6379"
        fi
    } >>"$conf"
    echo "starting redis-server as ${master:+replica of }${master:-master} ($self)" >&2
    exec redis-server "$conf"
    ;;
sentinel)
    conf=$DATA/sentinel.conf
    copy_template "$TEMPLATES/sentinel.conf" "$conf.tmp"
    master=$(current_master) || master=""
    if [ -n "$master" ]; then
        sed -E "s/^(sentinel monitor $SERVICE )[^ ]+/\1$master/" "$conf.tmp" >"$conf"
        rm -f "$conf.tmp"
    else
        mv "$conf.tmp" "$conf"
    fi
    {
        echo "dir $DATA"
        # Strata (fred) authenticates to the sentinels with the password of its REDIS_URL, and the
        # sentinels use requirepass to authenticate to each other.
        echo "requirepass $REDIS_PASSWORD"
        echo "sentinel auth-pass $SERVICE $REDIS_PASSWORD"
        echo "sentinel announce-ip $self"
        echo "sentinel announce-port 26379"
    } >>"$conf"
    exec redis-server "$conf" --sentinel
    ;;
*)
    echo "unknown role $role: expected server or sentinel" >&2
    exit 2
    ;;
esac
