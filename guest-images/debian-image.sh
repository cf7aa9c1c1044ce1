#!/usr/bin/env bash
# Build the Tessera stock-Debian guest (for hardware-KVM hosts; it cannot boot on PVM):
#
#   guest-images/debian-image.sh OUTDIR          (the project uses OUTDIR=target/guest)
#   EXTRA_DIR=/path/to/files guest-images/debian-image.sh OUTDIR
#
# Outputs:
#   OUTDIR/debian-vmlinuz              the stock Debian 12 kernel (bzImage) of linux-image-amd64,
#                                      taken from the .deb (apt-get download + dpkg-deb), never
#                                      installed on the host
#   OUTDIR/debian-initramfs.cpio.gz    busybox-static initramfs, /init = guest-images/rootfs/init
#   OUTDIR/debian-kernel-version       its kernel release, e.g. 6.1.0-56-amd64: modules are built
#                                      against the package linux-headers-<that release>
#   OUTDIR/debian-kernel.config        the kernel's config (from the .deb)
#
# Guest protocol (implemented by guest-images/rootfs/init, see its header):
#   kernel command line  tessera.run=CMD  runs CMD with `sh -c`. CMD encoding: ',' = a space,
#   %XX = the byte 0xXX (%2C = a comma, %25 = '%', %20 = a space); the kernel's quoting
#   tessera.run="echo hello" works too. Example: tessera.run=echo,hello  ->  echo hello
#   console: "tessera-guest: ready", the command's output, "tessera-guest: exit N"; then the
#   byte N is written to I/O port 0xf4 (Tessera's debug-exit: the VMM exits with N; QEMU
#   isa-debug-exit: (N<<1)|1); if that does not stop the VM, `poweroff -f`.
#
# Extra files (hook for later issues: the tessera_vgpu.ko module built against
# linux-headers-$(cat OUTDIR/debian-kernel-version), static guest tools, boot hooks):
#   - everything in guest-images/rootfs/ is copied into the image (the /init lives there);
#   - then everything in $EXTRA_DIR (if set) is copied on top, keeping its layout, e.g.
#       $EXTRA_DIR/lib/modules/<release>/extra/tessera_vgpu.ko
#       $EXTRA_DIR/usr/bin/tessera-smoke
#       $EXTRA_DIR/etc/tessera/init.d/10-vgpu.sh      (run by /init before tessera.run)
#   The cache key covers EXTRA_DIR's contents, so changing them rebuilds the image.
#
# Idempotent: OUTDIR/debian-image.key hashes this script, lib.sh, rootfs/, EXTRA_DIR, the
# kernel package version and the busybox version; when it matches nothing is done.
# Missing packages (busybox-static, cpio) are installed with apt-get (root needed only then);
# the kernel .deb is cached in OUTDIR/build/debs/.
#
# Environment: EXTRA_DIR (above); FORCE=1 rebuilds; DEBIAN_KERNEL_PACKAGE=linux-image-X-amd64
# pins a kernel package (default: what linux-image-amd64 depends on).
set -euo pipefail

GI_TAG=debian-image
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

[ $# -eq 1 ] || { echo "usage: [EXTRA_DIR=dir] $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
ROOTFS_SRC="$HERE/rootfs"
EXTRA_DIR=${EXTRA_DIR:-}
if [ -n "$EXTRA_DIR" ]; then
    [ -d "$EXTRA_DIR" ] || die "EXTRA_DIR=$EXTRA_DIR is not a directory"
    EXTRA_DIR=$(cd "$EXTRA_DIR" && pwd)
fi
OUT_KERNEL="$OUTDIR/debian-vmlinuz"
OUT_INITRAMFS="$OUTDIR/debian-initramfs.cpio.gz"
OUT_VERSION="$OUTDIR/debian-kernel-version"
KEYFILE="$OUTDIR/debian-image.key"
WORK="$OUTDIR/build/debian-image"
DEBS="$OUTDIR/build/debs"
# Fixed timestamp for the files of the image (reproducible archive).
EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

mkdir -p "$OUTDIR/build"
take_lock "$OUTDIR/build/.debian-image.lock"

ensure_packages busybox-static cpio gzip

# --- which kernel: linux-image-amd64 is a metapackage depending on linux-image-<release> ---
candidate_version() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }'; }

kernel_package() {
    if [ -n "${DEBIAN_KERNEL_PACKAGE:-}" ]; then echo "$DEBIAN_KERNEL_PACKAGE"; return; fi
    apt-cache depends --important linux-image-amd64 2>/dev/null |
        awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

KPKG=$(kernel_package)
KPKG_VERSION=
[ -n "$KPKG" ] && KPKG_VERSION=$(candidate_version "$KPKG")
if [ -z "$KPKG" ] || [ -z "$KPKG_VERSION" ] || [ "$KPKG_VERSION" = "(none)" ]; then
    log "apt does not know linux-image-amd64 yet: running apt-get update"
    [ "$(id -u)" -eq 0 ] || die "apt-get update needs root"
    apt_update
    KPKG=$(kernel_package)
    [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to a kernel package"
    KPKG_VERSION=$(candidate_version "$KPKG")
    { [ -n "$KPKG_VERSION" ] && [ "$KPKG_VERSION" != "(none)" ]; } || die "no installable version of $KPKG"
fi
KREL=${KPKG#linux-image-}
KREL=${KREL%-unsigned}
BUSYBOX_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)

KEY=$( {
    echo "kernel $KPKG $KPKG_VERSION"
    echo "busybox $BUSYBOX_VERSION"
    echo "epoch $EPOCH"
    hash_paths "$HERE/debian-image.sh" "$HERE/lib.sh" "$ROOTFS_SRC"
    if [ -n "$EXTRA_DIR" ]; then echo extra; hash_paths "$EXTRA_DIR"; fi
} | sha256sum | cut -d' ' -f1)

if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT_KERNEL" ] && [ -f "$OUT_INITRAMFS" ] && [ -f "$OUT_VERSION" ] &&
   [ "$(cat "$KEYFILE" 2>/dev/null || true)" = "$KEY" ]; then
    log "up to date: $OUT_KERNEL ($KPKG $KPKG_VERSION), $OUT_INITRAMFS"
    exit 0
fi

START=$(date +%s)

# --- kernel: download the .deb (cached), take boot/vmlinuz-* and boot/config-* out of it ---
mkdir -p "$DEBS"
DEB=
for f in "$DEBS/${KPKG}_"*.deb; do
    [ -f "$f" ] && [ "$(dpkg-deb -f "$f" Version 2>/dev/null || true)" = "$KPKG_VERSION" ] && DEB=$f
done
if [ -z "$DEB" ]; then
    log "downloading $KPKG $KPKG_VERSION (apt-get download)"
    rm -f "$DEBS/${KPKG}_"*.deb
    # apt's sandbox user cannot write to root-owned dirs; as root, download as root.
    (cd "$DEBS" && apt-get -o APT::Sandbox::User=root download "$KPKG=$KPKG_VERSION" >&2) \
        || die "apt-get download $KPKG=$KPKG_VERSION failed"
    for f in "$DEBS/${KPKG}_"*.deb; do DEB=$f; done
    [ -f "$DEB" ] || die "apt-get download produced no .deb in $DEBS"
else
    log "using cached $(basename "$DEB")"
fi

rm -rf "$WORK"
mkdir -p "$WORK/deb" "$WORK/root"
# `dpkg-deb -x` would also unpack ~400 MB of modules we do not need: take the two files.
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$WORK/deb" "./boot/vmlinuz-$KREL" "./boot/config-$KREL" \
    || die "$(basename "$DEB") has no boot/vmlinuz-$KREL"
KCONFIG="$WORK/deb/boot/config-$KREL"
for opt in CONFIG_DEVTMPFS=y CONFIG_SERIAL_8250_CONSOLE=y CONFIG_BLK_DEV_INITRD=y CONFIG_RD_GZIP=y CONFIG_BINFMT_ELF=y; do
    grep -qx "$opt" "$KCONFIG" || die "$KPKG lacks $opt: the initramfs would not work"
done
grep -qx CONFIG_DEVPORT=y "$KCONFIG" \
    || log "WARNING: $KPKG has no CONFIG_DEVPORT: no /dev/port, the guest can only poweroff -f (no exit status)"
if [ -z "$(candidate_version "linux-headers-$KREL")" ] || [ "$(candidate_version "linux-headers-$KREL")" = "(none)" ]; then
    log "WARNING: apt knows no linux-headers-$KREL (needed later to build modules for this kernel)"
fi

# --- initramfs tree ---
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lib/modules/"$KREL"}
chmod 1777 "$R/tmp"
cp /bin/busybox "$R/bin/busybox"
# Applet links, made at build time (no `busybox --install` at boot).
while IFS= read -r applet; do
    [ -e "$R/$applet" ] || [ -L "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done < <(/bin/busybox --list-full)
[ -L "$R/bin/sh" ] || die "busybox has no sh applet?"
# The kernel opens /dev/console for init before anything is mounted.
mknod -m 600 "$R/dev/console" c 5 1 || die "mknod /dev/console failed (needs root)"
mknod -m 666 "$R/dev/null" c 1 3
cp -a "$ROOTFS_SRC/." "$R/"
if [ -n "$EXTRA_DIR" ]; then
    log "adding the files of EXTRA_DIR=$EXTRA_DIR"
    cp -a "$EXTRA_DIR/." "$R/"
fi
chmod 0755 "$R/init"
/bin/busybox sh -n "$R/init" || die "/init is not valid busybox sh"
echo "$KREL" > "$R/etc/tessera-kernel-version"

find "$R" -exec touch -h -d "@$EPOCH" {} +
(cd "$R" && find . -mindepth 1 -print | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n > "$OUT_INITRAMFS.tmp"

# --- publish ---
cp "$WORK/deb/boot/vmlinuz-$KREL" "$OUT_KERNEL.tmp"
cp "$KCONFIG" "$OUTDIR/debian-kernel.config"
echo "$KREL" > "$OUT_VERSION.tmp"
mv -f "$OUT_KERNEL.tmp" "$OUT_KERNEL"
mv -f "$OUT_INITRAMFS.tmp" "$OUT_INITRAMFS"
mv -f "$OUT_VERSION.tmp" "$OUT_VERSION"
echo "$KEY" > "$KEYFILE"
rm -rf "$WORK/deb"

log "kernel:    $OUT_KERNEL ($KPKG $KPKG_VERSION, $(du -h --apparent-size "$OUT_KERNEL" | cut -f1))"
log "initramfs: $OUT_INITRAMFS ($(du -h --apparent-size "$OUT_INITRAMFS" | cut -f1), $(find "$R" -mindepth 1 | wc -l) entries)"
log "headers:   linux-headers-$KREL (release in $OUT_VERSION)"
log "took $(fmt_duration $(( $(date +%s) - START )))"
