# mtproxy-formula/mtprotoproxy:local: Debian 11 minbase, Python 3.9 and
# mtprotoproxy 1.0.6 (it fails on Python >= 3.10). Run it with
# `PORT SECRET[,SECRET...] [AD_TAG] [TLS_DOMAIN]` or with the path of a
# config file (default /etc/mtprotoproxy/config.py).
#
# Speed: mtprotoproxy uses `cryptography` for AES when it can import it,
# before pycryptodome. Measured in one run against pycryptodome, real
# sessions through a replica to the stand-in data centre: 32-35 % less
# replica CPU per GiB relayed, so the image has cryptography and no
# pycryptodome (nothing would use it). uvloop, which mtprotoproxy also
# picks up, saved 0-6 % more on top of it: below the 10 % bar, left out.
#
# Hygiene: mtprotoproxy 1.0.6 catches `asyncio.streams.IncompleteReadError`
# when it relays; Python 3.8 moved that name to asyncio.exceptions, so on
# 3.9 evaluating the except clause raises AttributeError whenever a relay
# ends with an error or a cancel (a reset client, a normal close): a
# traceback per session in the log. The shim rewrites that one name to
# `asyncio.IncompleteReadError`, the same class, in both installed copies.
IMAGE=mtproxy-formula/mtprotoproxy:local
SUITE=bullseye
INCLUDE=python3,python3-pip,python3-setuptools
MTPROTOPROXY_VERSION=1.0.6
# Wheels for CPython 3.9 on x86_64 (manylinux2014: bullseye's glibc 2.31 runs them).
WHEELS=(cryptography==43.0.3 cffi==2.0.0 pycparser==2.23)
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
        --platform manylinux2014_x86_64 -d "$work/wheels" "${WHEELS[@]}"
    mkdir -p "$root/tmp/wheels"
    cp "$work"/wheels/* "$root/tmp/wheels/"
    chroot "$root" sh -c 'pip3 install --quiet --no-index --no-deps --no-build-isolation /tmp/wheels/*'
    rm -rf "$root/tmp/wheels" "$root/root/.cache"
    # The shim (see above); the build fails if the name is not there once per copy.
    local copy
    for copy in "$root/usr/local/bin/mtprotoproxy" "$root/usr/local/bin/mtprotoproxy.py"; do
        [ "$(grep -c 'asyncio\.streams\.IncompleteReadError' "$copy")" = 1 ] \
            || { echo "shim: asyncio.streams.IncompleteReadError not found once in $copy" >&2; return 1; }
        sed -i 's/asyncio\.streams\.IncompleteReadError/asyncio.IncompleteReadError/' "$copy"
    done
    install -d -m 0700 "$root/etc/mtprotoproxy"
    # mtprotoproxy picks cryptography up by itself; check it does.
    chroot "$root" python3 -c '
import sys
sys.argv = ["mtprotoproxy", "config.py"]  # with no argument, importing it prints its usage and exits
sys.path.insert(0, "/usr/local/bin")
import mtprotoproxy
assert mtprotoproxy.create_aes_ctr.__qualname__.startswith("try_use_cryptography_module."), "AES is not cryptography"
'
    rm -rf "$root/usr/local/bin/__pycache__"
}
