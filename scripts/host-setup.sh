#!/usr/bin/env bash
# Installs the Debian packages that the demo, the tests and the benchmarks
# need (root, Debian 12). Idempotent: a second run installs nothing. It never
# starts a dockerd in the machine's root namespace: every dockerd we use runs
# inside a test host (test/testhost.py).
set -euo pipefail

packages=(
    docker.io          # dockerd and containerd, started only inside test hosts
    iproute2           # ip netns, veth, ip rule
    iptables           # mangle rules of the tproxy state (iptables-nft)
    debootstrap        # offline image builds
    openssh-server     # sshd for the salt-ssh tests
    haproxy            # a local haproxy binary for functional tests
    python3 python3-venv python3-dev
    util-linux         # nsenter
    procps psmisc socat curl make gcc
    shellcheck         # make lint: the shell files the formula ships
)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "host-setup: all packages present"
    exit 0
fi

echo "host-setup: installing ${missing[*]}"
# Keep package scripts from starting services (dockerd, sshd, haproxy) in the
# root namespace, whatever this machine's policy is.
policy=/usr/sbin/policy-rc.d
restore_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    restore_policy=1
fi
trap '[ -n "$restore_policy" ] && rm -f "$policy"' EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "host-setup: done"
