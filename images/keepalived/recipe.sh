# mtproxy-formula/keepalived:local: Debian 13 minbase with Debian's
# keepalived (VRRP only: the formula's mtproxy.vip moves the cells' virtual
# addresses between hosts). It runs on the host network with NET_ADMIN,
# NET_RAW and NET_BROADCAST; the formula bind-mounts its config folder on
# /etc/keepalived/mtproxy (read-only): not on /etc/keepalived, which holds
# the package's keepalived.config-opts (without it keepalived refuses to
# start). SIGHUP reloads the config without dropping the addresses a host
# holds.
#
# /usr/local/bin/mtproxy-cell-check ADDRESS FRONTEND_PORT BACKEND_ADDRESS
# PORT...: keepalived's track script. It succeeds when the cell serves: the
# HAProxy frontend accepts a connection and at least one replica does. It
# runs as the unprivileged keepalived_script user (keepalived picks that
# user for scripts by itself), with bash's /dev/tcp: no other tool.
IMAGE=mtproxy-formula/keepalived:local
SUITE=trixie
INCLUDE=keepalived
CHANGES=(
    'CMD ["keepalived", "--dont-fork", "--log-console", "--vrrp", "--use-file", "/etc/keepalived/mtproxy/keepalived.conf"]'
)

customize() {
    local root=$1
    chroot "$root" useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin keepalived_script
    cat > "$root/usr/local/bin/mtproxy-cell-check" <<'SCRIPT'
#!/bin/bash
# The cell serves when its frontend accepts a connection and a replica does.
address=$1 port=$2 backend=$3
shift 3
(exec 3<>"/dev/tcp/$address/$port") 2>/dev/null || exit 1
for replica_port in "$@"; do
    (exec 3<>"/dev/tcp/$backend/$replica_port") 2>/dev/null && exit 0
done
exit 1
SCRIPT
    chmod 0755 "$root/usr/local/bin/mtproxy-cell-check"
    # The formula runs keepalived's config test (2.3.3 in trixie) before a config goes live.
    local usage
    usage=$(chroot "$root" keepalived --help 2>&1 || true)
    grep -q -- '--config-test' <<<"$usage" || { echo "keepalived has no --config-test" >&2; return 1; }
    rm -f "$root/etc/keepalived/keepalived.conf"
    install -d -m 0700 "$root/etc/keepalived/mtproxy"
}
