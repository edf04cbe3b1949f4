# bare-bookworm: the root filesystem of a bare Debian 12 host for the
# bootstrap test (test/integration/test_bootstrap_bare_rootfs.py), not an
# image any dockerd loads: build it into its own folder,
#
#   images/build.sh bare-bookworm build/rootfs
#
# Minbase with what every Debian 12 VPS has: systemd as init (the test boots
# it as the root's PID 1), openssh-server, python3 and iproute2 (Salt's
# network module runs `ip`); nothing else. Its apt
# source is a local repository inside the root (/var/local/mtproxy-apt, a
# flat repository, trusted=yes) holding exactly what `apt-get install
# docker.io python3-venv` fetches on this root (Recommends included, as an
# operator's apt installs them): the test host has no route to a mirror, and
# a test never runs apt on the machine itself. Package lists are left empty,
# as on a fresh VPS image: whoever installs must update them first.
IMAGE=mtproxy-formula/bare-bookworm:rootfs
SUITE=bookworm
INCLUDE=systemd-sysv,openssh-server,python3,iproute2
REPO_PACKAGES=(docker.io python3-venv)
REPO=/var/local/mtproxy-apt
CHANGES=()

customize() {
    local root=$1
    # debootstrap left bookworm's lists from the mirror: resolve and fetch against this very root.
    chroot "$root" apt-get install --download-only -y -qq "${REPO_PACKAGES[@]}" >/dev/null
    install -d "$root$REPO"
    mv "$root"/var/cache/apt/archives/*.deb "$root$REPO/"
    # A flat repository's index, by dpkg-deb alone (no dpkg-dev on the build machine).
    local deb
    (
        cd "$root$REPO"
        for deb in *.deb; do
            dpkg-deb -f "$deb"
            printf 'Filename: ./%s\nSize: %s\nSHA256: %s\n\n' \
                "$deb" "$(stat -c %s "$deb")" "$(sha256sum "$deb" | cut -d' ' -f1)"
        done > Packages
    )
    grep -q '^Package: docker.io$' "$root$REPO/Packages" \
        || { echo "bare-bookworm: docker.io is not in the local repository" >&2; return 1; }
    echo "deb [trusted=yes] file:$REPO ./" > "$root/etc/apt/sources.list"
    # Bare: none of the packages the bootstrap installs is there yet.
    local pkg
    for pkg in "${REPO_PACKAGES[@]}"; do
        ! chroot "$root" dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' \
            || { echo "bare-bookworm: $pkg is installed already" >&2; return 1; }
    done
}
