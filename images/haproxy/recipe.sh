# mtproxy-formula/haproxy:local: Debian 13 minbase with Debian's HAProxy 3.0.
# It runs as root (TPROXY's `usesrc clientip` needs it) in master-worker
# mode; the formula bind-mounts /etc/haproxy (the config directory) and
# /run/haproxy (master CLI and admin sockets).
IMAGE=mtproxy-formula/haproxy:local
SUITE=trixie
INCLUDE=haproxy
CHANGES=(
    'CMD ["haproxy", "-W", "-db", "-S", "/run/haproxy/master.sock,mode,600", "-f", "/etc/haproxy/haproxy.cfg"]'
)

customize() {
    local root=$1
    install -d -m 0700 "$root/run/haproxy"
}
