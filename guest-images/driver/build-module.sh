#!/usr/bin/env bash
# Build the tessera_vgpu kernel module for the stock Debian guest kernel:
#
#   guest-images/driver/build-module.sh OUTDIR     (the project uses OUTDIR=target/guest)
#     -> OUTDIR/tessera_vgpu.ko, OUTDIR/tessera_vgpu.ko.release (the kernel release it is for)
#
# Which kernel: OUTDIR/debian-kernel-version when debian-image.sh wrote it, else
# $DEBIAN_KERNEL_RELEASE, else $DEBIAN_KERNEL_PACKAGE (as for debian-image.sh), else the release the linux-image-amd64 metapackage depends on (the
# same rule as debian-image.sh). The module is built against Debian's
# linux-headers-<release> package, installed with apt-get when missing (root needed only
# then), with W=1; any compiler warning fails the build.
#
# Idempotent and fast when up to date: OUTDIR/tessera_vgpu.ko.key hashes the driver sources,
# the device-contract header, this script, lib.sh and the headers package version.
# The build happens in a copy of the sources under OUTDIR/build/driver-module/ (the source
# tree stays clean). FORCE=1 rebuilds anyway.
set -euo pipefail

GI_TAG=driver-module
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GI=$(cd "$HERE/.." && pwd)
ROOT=$(cd "$GI/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$GI/lib.sh"

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
OUT="$OUTDIR/tessera_vgpu.ko"
KEYFILE="$OUT.key"
WORK="$OUTDIR/build/driver-module"
ABI_HEADER="$ROOT/vgpu/abi/include/tessera_vgpu.h"
[ -f "$ABI_HEADER" ] || die "missing $ABI_HEADER"

kernel_release() {
    if [ -s "$OUTDIR/debian-kernel-version" ]; then
        cat "$OUTDIR/debian-kernel-version"
    elif [ -n "${DEBIAN_KERNEL_RELEASE:-}" ]; then
        echo "$DEBIAN_KERNEL_RELEASE"
    elif [ -n "${DEBIAN_KERNEL_PACKAGE:-}" ]; then
        echo "${DEBIAN_KERNEL_PACKAGE#linux-image-}"
    else
        apt-cache depends --important linux-image-amd64 2>/dev/null |
            awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-[0-9]/ { sub(/^linux-image-/, "", $2); print $2; exit }'
    fi
}

REL=$(kernel_release)
[ -n "$REL" ] || die "cannot tell the Debian kernel release (no $OUTDIR/debian-kernel-version, no DEBIAN_KERNEL_RELEASE, and apt knows no linux-image-amd64)"
HPKG="linux-headers-$REL"
KDIR="/usr/src/$HPKG"

mkdir -p "$OUTDIR/build"
take_lock "$OUTDIR/build/.driver-module.lock"

shopt -s nullglob
SOURCES=("$HERE"/*.c "$HERE"/*.h "$HERE/Kbuild")
shopt -u nullglob

key() {
    { echo "release $REL"; echo "headers $(dpkg-query -W -f='${Version}' "$HPKG" 2>/dev/null || true)"
      hash_paths "${SOURCES[@]}" "$ABI_HEADER" "$HERE/build-module.sh" "$GI/lib.sh"; } |
        sha256sum | cut -d' ' -f1
}

if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT" ] && [ "$(cat "$KEYFILE" 2>/dev/null || true)" = "$(key)" ]; then
    log "up to date: $OUT (Linux $REL)"
    exit 0
fi

ensure_packages "$HPKG" gcc make
[ -f "$KDIR/Makefile" ] || die "$HPKG is installed but $KDIR/Makefile is missing"

START=$(date +%s)
mkdir -p "$WORK"
# Copy only what changed, so make stays incremental.
for f in "${SOURCES[@]}" "$ABI_HEADER"; do
    cmp -s "$f" "$WORK/$(basename "$f")" || cp "$f" "$WORK/"
done
BUILDLOG="$WORK/build.log"
log "building against $KDIR (W=1)"
make -C "$KDIR" M="$WORK" CONFIG_TESSERA_VGPU=m W=1 modules > "$BUILDLOG" 2>&1 \
    || { tail -n 40 "$BUILDLOG" >&2; die "module build failed (log: $BUILDLOG)"; }
if grep -E 'warning:|error:' "$BUILDLOG" >&2; then
    die "the module build has warnings (log: $BUILDLOG)"
fi
# The module must be for that release.
modinfo_vermagic=$(strings "$WORK/tessera_vgpu.ko" | grep -m1 '^vermagic=' || true)
case "$modinfo_vermagic" in
    "vermagic=$REL "*) ;;
    *) die "unexpected vermagic in the module: $modinfo_vermagic (wanted $REL)" ;;
esac
cp "$WORK/tessera_vgpu.ko" "$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"
echo "$REL" > "$OUT.release"
key > "$KEYFILE"
log "built $OUT for Linux $REL in $(fmt_duration $(( $(date +%s) - START )))"
