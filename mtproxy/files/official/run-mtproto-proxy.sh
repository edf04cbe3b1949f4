#!/bin/sh
# Managed by Salt (mtproxy-formula): entry point of a telegrammessenger/proxy
# replica (flavor official, _modules/mtproxy_flavor.py), run as
#   sh run-mtproto-proxy.sh SETTINGS
# SETTINGS is the replica's 0600 file (mounted read-only): PORT, STATS_PORT,
# SECRETS, TAG, MAX_CONNECTIONS and RESERVED_FILES. The secrets and the tag
# are never in the environment (docker inspect shows that) nor on this
# script's command line.
# Like the original design's run.sh it listens on $PORT, so several replicas
# share the host network. From the environment (mtproxy:replica_environment):
# WORKERS as in the image's own run.sh; NAT_INFO (<local address>:<public
# address>), needed behind NAT.
set -eu
if [ $# -ne 1 ] || [ ! -r "$1" ]; then
    echo "usage: $0 SETTINGS (the replica's settings file)" >&2
    exit 2
fi
# shellcheck source=/dev/null
. "$1"
data=/data
mkdir -p "$data"
# Telegram's proxy secret and data-centre list, fetched at each start as the
# image's run.sh does; the last good copy is kept for when that fails.
for item in getProxySecret:proxy-secret getProxyConfig:proxy-multi.conf; do
    url="https://core.telegram.org/${item%%:*}" file="$data/${item#*:}"
    if curl -fsS --max-time 20 "$url" -o "$file.new"; then
        mv "$file.new" "$file"
    elif [ ! -s "$file" ]; then
        echo "cannot fetch $url and no earlier copy" >&2
        exit 1
    fi
done
# mtproto-proxy needs -c + 16 open files and, without CAP_SYS_RESOURCE, cannot
# raise the container's limit: size -c from that limit. (ulimit -n is not
# POSIX, but dash, the image's sh, and busybox sh have it.)
# shellcheck disable=SC3045
limit=$(ulimit -n)
if [ "$limit" = unlimited ]; then limit=65600; fi
connections=$MAX_CONNECTIONS
if [ "$connections" -eq 0 ]; then connections=$((limit - RESERVED_FILES)); fi
if [ "$connections" -lt 1 ] || [ $((connections + RESERVED_FILES)) -gt "$limit" ]; then
    echo "max connections $connections need $((connections + RESERVED_FILES)) open files;" \
        "the container's limit is $limit (pillar mtproxy:replica_limits:nofile)" >&2
    exit 1
fi
set -- -u root -p "$STATS_PORT" -H "$PORT" -M "${WORKERS:-1}" -C 60000 \
    -c "$connections" --aes-pwd "$data/proxy-secret" --allow-skip-dh
# mtproto-proxy takes secrets only as -S arguments (no file, no environment
# variable): they are on its command line, not on this wrapper's.
for secret in $SECRETS; do
    set -- "$@" -S "$secret"
done
if [ -n "$TAG" ]; then set -- "$@" -P "$TAG"; fi
if [ -n "${NAT_INFO:-}" ]; then set -- "$@" --nat-info "$NAT_INFO"; fi
exec /usr/local/bin/mtproto-proxy "$@" "$data/proxy-multi.conf"
