#!/usr/bin/env bash
# Build the user space for the minimal kernel: OUTDIR/minimal-initramfs.cpio
#
#   guest-images/minimal-initramfs.sh OUTDIR     (the project uses OUTDIR=target/guest)
#
# An uncompressed cpio (the minimal kernel has no decompressor: gzip takes minutes of
# emulated time on PVM) holding:
#   /bin/busybox (busybox-static) and links for the applets /init and the checks use
#   /init                       guest-images/rootfs/init (tessera.run=CMD, exit status out)
#   /usr/bin/tessera-smi, tessera-run            static Rust tools (tools/)
#   /usr/bin/tessera-check-static, tessera-check libtessera's C check, static and dynamic
#   /usr/bin/tessera-user-check                  runs all of them (tools/tessera-user-check)
#   /usr/lib/libtessera.so.1, the dynamic loader, libc.so.6 and libm.so.6 of this host
# The tessera_vgpu driver is built into the kernel, so nothing is loaded at boot.
# Boot it (PVM hosts need pvm_quirks, see README.md):
#   tessera vm --kernel OUTDIR/vmlinux-minimal --initramfs OUTDIR/minimal-initramfs.cpio \
#     --vgpu profile=256M --cmdline "console=ttyS0 ... pvm_quirks tessera.run=tessera-user-check"
#
# Idempotent: make and cargo are incremental, and the archive is rewritten only when its
# bytes change (owner 0:0, fixed mtimes, sorted entries). Missing packages are installed with
# apt-get (root needed only then); root is needed for the two device nodes.
set -euo pipefail

GI_TAG=minimal-initramfs
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
OUT="$OUTDIR/minimal-initramfs.cpio"
WORK="$OUTDIR/build/minimal-initramfs"
EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
# Every applet that rootfs/init and tessera-user-check run (each link is an archive entry, and
# every entry costs unpacking time on PVM).
APPLETS="sh cat dd dmesg echo grep ls mkdir mount poweroff printf reboot sed setsid cttyhack
         sleep sync"

mkdir -p "$OUTDIR/build"
take_lock "$OUTDIR/build/.minimal-initramfs.lock"
ensure_packages busybox-static cpio

rm -rf "$WORK"
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc}
chmod 1777 "$R/tmp"
cp /bin/busybox "$R/bin/busybox"
for applet in $APPLETS; do
    path=$(/bin/busybox --list-full | grep -E "(^|/)$applet\$" | head -n 1)
    [ -n "$path" ] || die "busybox has no $applet applet"
    ln -s /bin/busybox "$R/$path"
done
mknod -m 600 "$R/dev/console" c 5 1 || die "mknod /dev/console failed (needs root)"
mknod -m 666 "$R/dev/null" c 1 3
cp -a "$HERE/rootfs/." "$R/"
chmod 0755 "$R/init"
/bin/busybox sh -n "$R/init" || die "/init is not valid busybox sh"
install_user_tools "$OUTDIR" "$R"
# Headers and the static archive are for building, not for the guest.
rm -rf "$R/usr/include" "$R/usr/lib/libtessera.a" "$R/usr/bin/tessera-vgpu-check"

find "$R" -exec touch -h -d "@$EPOCH" {} +
(cd "$R" && find . -mindepth 1 -print | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) > "$WORK/initramfs.cpio"
if cmp -s "$WORK/initramfs.cpio" "$OUT"; then
    log "up to date: $OUT"
else
    mv -f "$WORK/initramfs.cpio" "$OUT"
    log "built $OUT: $(du -h --apparent-size "$OUT" | cut -f1), $(find "$R" | wc -l) entries"
fi
rm -rf "$WORK"
