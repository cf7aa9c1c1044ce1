#!/usr/bin/env bash
# Build the Tessera minimal guest kernel: OUTDIR/vmlinux-minimal
#
#   guest-images/minimal-kernel.sh OUTDIR          (the project uses OUTDIR=target/guest)
#
# An uncompressed ELF vmlinux, bootable as a PVH ELF (Tessera, Cloud Hypervisor, QEMU -kernel),
# for our PVM KVM hosts: it gets through kernel init and PCI enumeration there (Linux user space
# cannot start on PVM). See guest-images/README.md for the kernel command line.
#
# How: Debian's linux-source package (Debian 12: linux-source-6.1, tarball under /usr/src) is
# extracted to OUTDIR/build/minimal-kernel/, guest-images/patches/*.patch are applied
# (patch -p1, in name order), then `make tinyconfig`, the fragment guest-images/minimal.config
# is merged (scripts/kconfig/merge_config.sh -n: tinyconfig + fragment resolved with
# allnoconfig, so nothing default-y sneaks in; every line of the fragment is checked), and
# `make -j$(nproc) vmlinux`.
#
# The tessera_vgpu driver (guest-images/driver/, plus the device-contract header
# vgpu/abi/include/tessera_vgpu.h) is built in: its sources are copied to
# drivers/gpu/tessera/ of the tree, drivers/gpu/Makefile and drivers/Kconfig get one line each
# pointing there, and the fragment turns on CONFIG_TESSERA_VGPU.
#
# Idempotent: OUTDIR/vmlinux-minimal.key holds a hash of this script, lib.sh, the fragment, the
# patches, the driver sources and the linux-source version; when it matches, nothing is done.
# The extracted tree is reused (incremental make) unless the source version or the patches
# changed.
# Missing build dependencies are installed with apt-get (root needed only then).
#
# Environment: FORCE=1 rebuilds even when up to date; JOBS=N overrides $(nproc);
#              LINUX_SOURCE_TARBALL=/path/linux-source-X.Y.tar.xz picks another tarball.
set -euo pipefail

GI_TAG=minimal-kernel
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
OUT="$OUTDIR/vmlinux-minimal"
KEYFILE="$OUTDIR/vmlinux-minimal.key"
FRAGMENT="$HERE/minimal.config"
BUILD_PARENT="$OUTDIR/build/minimal-kernel"
JOBS=${JOBS:-$(nproc)}
BUILD_DEPS=(bc bison flex gcc libc6-dev libelf-dev make patch xz-utils)

shopt -s nullglob
PATCHES=("$HERE"/patches/*.patch)
DRIVER_SOURCES=("$HERE"/driver/*.c "$HERE"/driver/*.h "$HERE/driver/Kbuild" "$HERE/driver/Kconfig"
                "$HERE/../vgpu/abi/include/tessera_vgpu.h")
shopt -u nullglob

# The newest /usr/src/linux-source-*.tar.xz (or $LINUX_SOURCE_TARBALL); empty when none.
find_tarball() {
    if [ -n "${LINUX_SOURCE_TARBALL:-}" ]; then
        [ -f "$LINUX_SOURCE_TARBALL" ] || die "LINUX_SOURCE_TARBALL=$LINUX_SOURCE_TARBALL does not exist"
        echo "$LINUX_SOURCE_TARBALL"
        return
    fi
    find /usr/src -maxdepth 1 -name 'linux-source-*.tar.xz' 2>/dev/null | sort -V | tail -n 1
}

# "package version" of the tarball (from dpkg), else its size and mtime.
tarball_version() {
    local pkg
    pkg=$(dpkg-query -S "$1" 2>/dev/null | head -n 1 | cut -d: -f1 || true)
    if [ -n "$pkg" ]; then
        echo "$pkg $(dpkg-query -W -f='${Version}' "$pkg")"
    else
        stat -c 'file %n %s %Y' "$1"
    fi
}

TARBALL=$(find_tarball)
if [ -z "$TARBALL" ]; then
    log "no /usr/src/linux-source-*.tar.xz: installing Debian's linux-source package"
    ensure_packages linux-source "${BUILD_DEPS[@]}"
    TARBALL=$(find_tarball)
    [ -n "$TARBALL" ] || die "linux-source is installed but no /usr/src/linux-source-*.tar.xz was found"
fi
SRC_VERSION=$(tarball_version "$TARBALL")

mkdir -p "$OUTDIR/build"
take_lock "$OUTDIR/build/.minimal-kernel.lock"

# Key of the extracted+patched tree, and of the whole output.
SRC_KEY=$( { echo "$SRC_VERSION"; hash_paths "${PATCHES[@]}"; } | sha256sum | cut -d' ' -f1)
KEY=$( { echo "src $SRC_KEY"; hash_paths "$HERE/minimal-kernel.sh" "$HERE/lib.sh" "$FRAGMENT"
         hash_paths "${DRIVER_SOURCES[@]}"; } | sha256sum | cut -d' ' -f1)

if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT" ] && [ "$(cat "$KEYFILE" 2>/dev/null || true)" = "$KEY" ]; then
    log "up to date: $OUT ($SRC_VERSION)"
    exit 0
fi

ensure_packages "${BUILD_DEPS[@]}"

START=$(date +%s)
log "building from $TARBALL ($SRC_VERSION), $JOBS jobs"

# --- source tree: extract + patch, unless the one already there has the same key ---
if [ "$(cat "$BUILD_PARENT/.src-key" 2>/dev/null || true)" != "$SRC_KEY" ]; then
    log "extracting $(basename "$TARBALL") into $BUILD_PARENT"
    rm -rf "$BUILD_PARENT"
    mkdir -p "$BUILD_PARENT"
    tar -xf "$TARBALL" -C "$BUILD_PARENT"
    for p in "${PATCHES[@]}"; do
        log "applying patches/$(basename "$p")"
        SRCDIR=$(find "$BUILD_PARENT" -mindepth 1 -maxdepth 1 -type d | head -n 1)
        patch -d "$SRCDIR" -p1 --forward --batch --quiet < "$p" || die "patch $(basename "$p") does not apply to $SRC_VERSION"
    done
    echo "$SRC_KEY" > "$BUILD_PARENT/.src-key"
else
    log "reusing the extracted tree in $BUILD_PARENT"
fi
SRCDIR=$(find "$BUILD_PARENT" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[ -f "$SRCDIR/Makefile" ] || die "no kernel tree in $BUILD_PARENT (delete it and retry)"

# --- the tessera_vgpu driver: drivers/gpu/tessera/ (copy only what changed: make stays incremental) ---
DRV_DST="$SRCDIR/drivers/gpu/tessera"
mkdir -p "$DRV_DST"
for f in "${DRIVER_SOURCES[@]}"; do
    [ -f "$f" ] || die "missing driver source $f"
    cmp -s "$f" "$DRV_DST/$(basename "$f")" || cp "$f" "$DRV_DST/"
done
for f in "$DRV_DST"/*; do     # sources since removed from guest-images/driver/
    keep=0
    for g in "${DRIVER_SOURCES[@]}"; do [ "$(basename "$g")" = "$(basename "$f")" ] && keep=1; done
    case "$f" in *.o|*.a|*.cmd|*.order|*.mod*) keep=1 ;; esac
    [ $keep = 1 ] || rm -f "$f"
done
# shellcheck disable=SC2016 # a make variable, not a shell one
grep -q 'tessera/' "$SRCDIR/drivers/gpu/Makefile" \
    || echo 'obj-$(CONFIG_TESSERA_VGPU)		+= tessera/' >> "$SRCDIR/drivers/gpu/Makefile"
grep -q 'drivers/gpu/tessera/Kconfig' "$SRCDIR/drivers/Kconfig" \
    || sed -i 's|^source "drivers/gpu/trace/Kconfig"$|&\nsource "drivers/gpu/tessera/Kconfig"|' "$SRCDIR/drivers/Kconfig"
grep -q 'drivers/gpu/tessera/Kconfig' "$SRCDIR/drivers/Kconfig" || die "cannot hook the driver into drivers/Kconfig"

KMAKE=(make -C "$SRCDIR" ARCH=x86_64 -s)
BUILDLOG="$BUILD_PARENT/build.log"

# --- configuration: tinyconfig + fragment ---
log "configuring: make tinyconfig + $(basename "$FRAGMENT")"
{
    "${KMAKE[@]}" tinyconfig
    # -n: re-resolve with allnoconfig (KCONFIG_ALLCONFIG = tinyconfig + fragment), so options
    # that only become visible through the fragment default to "n" (olddefconfig would turn on
    # every default-y driver behind them: 8250 PCI/LPSS/..., all RD_* decompressors, ...).
    (cd "$SRCDIR" && ARCH=x86_64 scripts/kconfig/merge_config.sh -n .config "$FRAGMENT")
} > "$BUILDLOG" 2>&1 || { tail -n 30 "$BUILDLOG" >&2; die "configuration failed (log: $BUILDLOG)"; }

missing=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF "$line" "$SRCDIR/.config" || missing+=("$line") ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }; sym=${sym%% *}
            grep -q "^$sym=" "$SRCDIR/.config" && missing+=("$line") ;;
    esac
done < "$FRAGMENT"
[ ${#missing[@]} -eq 0 ] || die "Kconfig did not keep: ${missing[*]} (a dependency is missing in $(basename "$FRAGMENT"))"

# --- build ---
log "make -j$JOBS vmlinux (log: $BUILDLOG)"
# A line every 30 s while make runs (a first build takes minutes): objects built so far.
progress() {
    local t=0
    while sleep 30; do
        t=$((t + 30))
        log "still building vmlinux: ${t} s, $(find "$SRCDIR" -name '*.o' | wc -l) objects"
    done
}
progress &
TICKER=$!
trap 'kill "$TICKER" 2>/dev/null' EXIT
"${KMAKE[@]}" -j"$JOBS" vmlinux >> "$BUILDLOG" 2>&1 \
    || { tail -n 40 "$BUILDLOG" >&2; die "kernel build failed (log: $BUILDLOG)"; }
kill "$TICKER" 2>/dev/null
trap - EXIT
# The built-in driver compiles without warnings (driver/build-module.sh checks W=1 as well).
if grep -E '^drivers/gpu/tessera/.*(warning|error):' "$BUILDLOG" >&2; then
    die "the built-in tessera_vgpu driver has warnings (log: $BUILDLOG)"
fi

# The PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18) must be there, or no VMM can boot it.
readelf -n "$SRCDIR/vmlinux" | grep -q 'Xen.*0x00000012' \
    || readelf -n "$SRCDIR/vmlinux" | grep -qi 'PHYS32_ENTRY' \
    || die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); check CONFIG_PVH"

KREL=$("${KMAKE[@]}" kernelrelease)
cp "$SRCDIR/vmlinux" "$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"
cp "$SRCDIR/.config" "$OUTDIR/vmlinux-minimal.config"
echo "$KEY" > "$KEYFILE"

ELAPSED=$(( $(date +%s) - START ))
log "built $OUT: Linux $KREL, $(du -h --apparent-size "$OUT" | cut -f1) (config: $OUTDIR/vmlinux-minimal.config)"
log "build took $(fmt_duration "$ELAPSED")"
