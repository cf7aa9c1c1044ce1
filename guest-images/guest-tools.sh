#!/usr/bin/env bash
# Build what the stock Debian guest needs to drive a Tessera vGPU, and lay it out as an
# EXTRA_DIR for debian-image.sh:
#
#   guest-images/guest-tools.sh OUTDIR        (the project uses OUTDIR=target/guest)
#   -> OUTDIR/extra/lib/modules/<release>/extra/tessera_vgpu.ko   (driver/build-module.sh)
#      OUTDIR/extra/usr/bin/tessera-smi, tessera-run              (static Rust tools, tools/)
#      OUTDIR/extra/usr/bin/tessera-check(-static)                (C, over libtessera)
#      OUTDIR/extra/usr/bin/tessera-vgpu-check, tessera-user-check (the checks, shell)
#      OUTDIR/extra/usr/lib/libtessera.{a,so,so.1}, usr/include/  (libtessera/)
#   then: EXTRA_DIR=OUTDIR/extra guest-images/debian-image.sh OUTDIR
#
# Idempotent and fast when up to date (the module has its own key; make and cargo are
# incremental; OUTDIR/extra is rebuilt from those outputs, and debian-image.sh hashes its
# contents, not timestamps). Needs cargo, a C compiler and (for the module) root once to
# install the kernel headers.
set -euo pipefail

GI_TAG=guest-tools
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)

bash "$HERE/driver/build-module.sh" "$OUTDIR"
REL=$(cat "$OUTDIR/tessera_vgpu.ko.release")

mkdir -p "$OUTDIR/build"
take_lock "$OUTDIR/build/.guest-tools.lock"

EXTRA="$OUTDIR/extra"
rm -rf "$EXTRA.tmp"
mkdir -p "$EXTRA.tmp/lib/modules/$REL/extra"
strip --strip-debug -o "$EXTRA.tmp/lib/modules/$REL/extra/tessera_vgpu.ko" "$OUTDIR/tessera_vgpu.ko"
install_user_tools "$OUTDIR" "$EXTRA.tmp"
rm -rf "$EXTRA"
mv "$EXTRA.tmp" "$EXTRA"
log "ready: $EXTRA (module for Linux $REL, libtessera, tessera-smi, tessera-run)"
