#!/usr/bin/env bash
# Builds one of our container images offline, as a root filesystem tarball
# that `docker import` loads into any dockerd (no registry is involved).
#
#   images/build.sh NAME [OUT_DIR]
#
# The recipe is images/NAME/recipe.sh. A build is cached by the hash of this
# script and the recipe folder: the same recipe never builds twice. The result
# is OUT_DIR/NAME-HASH.tar plus OUT_DIR/NAME.json, which names the tarball,
# the image reference and the `docker import --change` lines.
set -euo pipefail

name=${1:?usage: images/build.sh NAME [OUT_DIR]}
here=$(cd "$(dirname "$0")" && pwd)
recipe_dir=$here/$name
out_dir=$(mkdir -p "${2:-$here/../build/images}" && cd "${2:-$here/../build/images}" && pwd)
[ -f "$recipe_dir/recipe.sh" ] || { echo "no recipe: $recipe_dir/recipe.sh" >&2; exit 2; }

hash=$( (cat "$here/build.sh"; find "$recipe_dir" -type f -print0 | sort -z | xargs -0 cat) \
        | sha256sum | cut -c1-16)
tarball=$out_dir/$name-$hash.tar
manifest=$out_dir/$name.json

if [ -s "$tarball" ] && [ -s "$manifest" ] && grep -q "$hash" "$manifest"; then
    echo "image $name: cached ($tarball)"
    exit 0
fi

# Recipe interface: SUITE, INCLUDE, IMAGE, CHANGES (array), and customize ROOT.
# shellcheck source=/dev/null
source "$recipe_dir/recipe.sh"

work=$(mktemp -d "$out_dir/.build-$name.XXXXXX")
# debootstrap may leave proc/sys mounted inside the root, on failure and (seen
# on a loaded machine) after a successful run too.
unmount_root() {
    for m in proc sys dev/pts dev; do
        mountpoint -q "$work/root/$m" 2>/dev/null && umount -l "$work/root/$m" || true
    done
}
cleanup() {
    unmount_root
    rm -rf "$work"
}
trap cleanup EXIT

start=$(date +%s)
echo "image $name: debootstrap $SUITE (+$INCLUDE)"
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$work/root" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

customize "$work/root" "$work"

# Slim the root: nothing at run time needs package lists, docs or caches.
rm -rf "$work/root"/var/lib/apt/lists/* "$work/root"/var/cache/apt/* \
       "$work/root"/usr/share/doc/* "$work/root"/usr/share/man/* \
       "$work/root"/usr/share/locale/* "$work/root"/var/log/*.log
unmount_root
tar -C "$work/root" --numeric-owner -cf "$work/rootfs.tar" .
mv "$work/rootfs.tar" "$tarball"

{
    printf '{\n  "image": "%s",\n  "hash": "%s",\n  "tarball": "%s",\n  "changes": [' \
        "$IMAGE" "$hash" "$(basename "$tarball")"
    sep=""
    for change in "${CHANGES[@]}"; do
        printf '%s\n    "%s"' "$sep" "${change//\"/\\\"}"
        sep=","
    done
    printf '\n  ]\n}\n'
} > "$manifest"
# Older builds of this image are dead weight.
find "$out_dir" -maxdepth 1 -name "$name-*.tar" ! -name "$(basename "$tarball")" -delete
echo "image $name: built in $(( $(date +%s) - start )) s ($(du -h "$tarball" | cut -f1))"
