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
