# Shared helpers for the guest-images/ scripts. Source it; do not run it.
# shellcheck shell=bash

# log/die print "[<script>] message" on stderr.
GI_TAG=${GI_TAG:-guest-images}

log() { printf '[%s] %s\n' "$GI_TAG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$GI_TAG" "$*" >&2; exit 1; }

# is_installed PKG: true when the Debian package PKG is installed.
is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

# apt_get ARGS...: apt-get, non-interactive, waiting (up to 10 min) for other apt/dpkg runs.
apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"
}

# apt_update: `apt-get update`, retried a few times (the lists lock may be held by another run).
apt_update() {
    local i
    for i in 1 2 3 4 5; do
        if apt_get update -q >&2; then return 0; fi
        log "apt-get update failed (try $i/5); retrying in 10 s"
        sleep 10
    done
    die "apt-get update failed"
}

# ensure_packages PKG...: install the missing ones (no recommends). apt-get update runs only
# when something has to be installed.
ensure_packages() {
    local p missing=()
    for p in "$@"; do
        is_installed "$p" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages: ${missing[*]} (run as root, or install them: apt-get install ${missing[*]})"
    log "installing: ${missing[*]}"
    apt_update
    apt_get install -y --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# hash_paths PATH...: one sha256 over the names and contents of the given files and of every
# file/symlink below the given directories (sorted, so the order of the listing is irrelevant).
hash_paths() {
    local p
    for p in "$@"; do
        if [ -d "$p" ]; then
            (cd "$p" && find . \( -type f -o -type l \) -print0 | LC_ALL=C sort -z |
                while IFS= read -r -d '' f; do
                    if [ -L "$f" ]; then
                        printf 'L %s -> %s\n' "$f" "$(readlink "$f")"
                    else
                        printf 'F %s %s %s\n' "$f" "$(stat -c %a "$f")" "$(sha256sum < "$f" | cut -d' ' -f1)"
                    fi
                done)
        elif [ -e "$p" ]; then
            printf 'F %s %s\n' "$(basename "$p")" "$(sha256sum < "$p" | cut -d' ' -f1)"
        else
            printf 'missing %s\n' "$p"
        fi
    done | sha256sum | cut -d' ' -f1
}

# take_lock FILE: hold an exclusive lock on FILE until the script exits (concurrent runs on
# the same OUTDIR wait for each other instead of building into the same tree).
take_lock() {
    exec {GI_LOCK_FD}>"$1"
    if ! flock -n "$GI_LOCK_FD"; then
        log "waiting for another build holding $1"
        flock "$GI_LOCK_FD"
    fi
}

# fmt_duration SECONDS -> "3m 07s"
fmt_duration() { printf '%dm %02ds' $(($1 / 60)) $(($1 % 60)); }

# install_user_tools OUTDIR DEST: builds libtessera with its C check program (make) and the
# static Rust guest tools (cargo, tools/) under OUTDIR/build/, and installs them below DEST:
#   usr/bin/tessera-smi, tessera-run, tessera-check-static, tessera-check, tessera-user-check
#   usr/lib/libtessera.{a,so,so.1}, usr/include/tessera*.h
# Incremental (make and cargo); needs cargo, a C compiler and the Debian packages below.
install_user_tools() {
    local outdir=$1 dest=$2 here libout bin tool
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    ensure_packages gcc make libc6-dev binutils
    libout="$outdir/build/libtessera"
    make -s -C "$here/libtessera" OUT="$libout" >&2 || die "libtessera build failed"
    # Static binaries (tools/.cargo/config.toml says so too, for builds from that directory).
    (cd "$here/tools" && RUSTFLAGS="-C target-feature=+crt-static" "${CARGO:-cargo}" build -q \
        --release --locked --target-dir "$outdir/build/guest-tools" >&2) || die "guest tools build failed"
    bin="$outdir/build/guest-tools/release"
    mkdir -p "$dest/usr/bin" "$dest/usr/lib" "$dest/usr/include"
    for tool in tessera-smi tessera-run; do
        strip --strip-all -o "$dest/usr/bin/$tool" "$bin/$tool"
    done
    strip --strip-all -o "$dest/usr/bin/tessera-check-static" "$libout/tessera-check-static"
    strip --strip-all -o "$dest/usr/bin/tessera-check" "$libout/tessera-check"
    install -m 0755 "$here/tools/tessera-vgpu-check" "$here/tools/tessera-user-check" "$dest/usr/bin/"
    install -m 0644 "$libout/libtessera.a" "$dest/usr/lib/"
    strip --strip-unneeded -o "$dest/usr/lib/libtessera.so.1" "$libout/libtessera.so.1"
    ln -sf libtessera.so.1 "$dest/usr/lib/libtessera.so"
    install -m 0644 "$libout"/include/*.h "$dest/usr/include/"
    for tool in tessera-smi tessera-run tessera-check-static; do
        readelf -l "$dest/usr/bin/$tool" | grep -q 'INTERP' && die "$tool is not statically linked"
    done
    readelf -d "$dest/usr/bin/tessera-check" | grep -q 'NEEDED.*libtessera.so.1' \
        || die "tessera-check is not linked against libtessera.so.1"
    # The C library the dynamic tessera-check needs: its interpreter and NEEDED libraries
    # (besides libtessera), at the paths this host's glibc has them.
    local interp lib path
    interp=$(readelf -l "$libout/tessera-check" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    [ -n "$interp" ] || die "tessera-check names no program interpreter"
    mkdir -p "$dest$(dirname "$interp")"
    cp -L "$interp" "$dest$interp"
    for lib in $(readelf -d "$libout/tessera-check" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'); do
        [ "$lib" = libtessera.so.1 ] && continue
        path=$(gcc -print-file-name="$lib")
        [ -f "$path" ] || die "cannot find $lib, which tessera-check needs"
        path=$(readlink -f "$path")
        mkdir -p "$dest/lib/x86_64-linux-gnu"
        cp "$path" "$dest/lib/x86_64-linux-gnu/$lib"
    done
}
