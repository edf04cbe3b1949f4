# mtproxy-formula/mtprotoproxy:local: Debian 11 minbase, Python 3.9 and
# mtprotoproxy 1.0.6 (it fails on Python >= 3.10). Run it with
# `PORT SECRET[,SECRET...] [AD_TAG] [TLS_DOMAIN]` or with the path of a
# config file (default /etc/mtprotoproxy/config.py).
IMAGE=mtproxy-formula/mtprotoproxy:local
SUITE=bullseye
INCLUDE=python3,python3-pip,python3-setuptools
MTPROTOPROXY_VERSION=1.0.6
PYCRYPTODOME_VERSION=3.23.0
CHANGES=(
    'ENTRYPOINT ["/usr/local/bin/mtprotoproxy"]'
    'CMD ["/etc/mtprotoproxy/config.py"]'
    'ENV PYTHONUNBUFFERED=1'
)

customize() {
    local root=$1 work=$2
    # Download on the build machine, install inside the root without an index.
    pip download --quiet --no-deps -d "$work/wheels" "mtprotoproxy==$MTPROTOPROXY_VERSION"
    pip download --quiet --no-deps --only-binary=:all: --python-version 3.9 \
        --platform manylinux2014_x86_64 -d "$work/wheels" "pycryptodome==$PYCRYPTODOME_VERSION"
    mkdir -p "$root/tmp/wheels"
    cp "$work"/wheels/* "$root/tmp/wheels/"
    chroot "$root" sh -c 'pip3 install --quiet --no-index --no-deps --no-build-isolation /tmp/wheels/*'
    rm -rf "$root/tmp/wheels" "$root/root/.cache"
    install -d -m 0700 "$root/etc/mtprotoproxy"
    chroot "$root" python3 -c 'import Crypto.Cipher.AES'
}
