//! Files a user names on the command line, opened so that the wrong kind of file is refused
//! at once instead of blocking or being half-used: a FIFO given as a kernel would block
//! `open` forever, a directory would fail somewhere in the loader with a confusing message.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What kind of file `m` is, in words, when it is not a regular file.
fn not_regular(m: &Metadata) -> Option<&'static str> {
    let t = m.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else {
        Some("not a regular file")
    }
}

fn refuse(kind: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {kind}, not a regular file"),
    )
}

/// Clears `O_NONBLOCK` again once the open cannot block any more.
fn blocking(f: File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with valid commands and flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Opens `path` for reading if it is a regular file. Anything else (a directory, a FIFO, a
/// socket, a device) is refused before it is opened, and checked again on the open file, so
/// a FIFO swapped in meanwhile cannot block the caller either (the open is non-blocking).
pub fn open_regular(path: &Path) -> io::Result<File> {
    if let Some(kind) = not_regular(&std::fs::metadata(path)?) {
        return Err(refuse(kind));
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if let Some(kind) = not_regular(&f.metadata()?) {
        return Err(refuse(kind));
    }
    blocking(f)
}

/// Opens `path` for appending output (created if missing): a regular file, or a terminal or
/// other character device such as `/dev/null`. A FIFO must already have a reader (a FIFO
/// without one would block `open` forever); directories, sockets and block devices are
/// refused.
pub fn open_output(path: &Path) -> io::Result<File> {
    if let Ok(m) = std::fs::metadata(path) {
        let t = m.file_type();
        if !(t.is_file() || t.is_char_device() || t.is_fifo()) {
            return Err(refuse(not_regular(&m).unwrap_or("not a regular file")));
        }
    }
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is a FIFO (named pipe) that nobody reads",
            ),
            _ => e,
        })?;
    blocking(f)
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Why a path cannot be trusted.
fn untrusted(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{} {why}", path.display()),
    )
}

/// Checks that nobody but `trusted` users (and root) can replace what `path` names: `path`
/// itself and every directory above it (symlinks resolved) must belong to one of them, and
/// each of those directories must not be writable by anyone else unless it is sticky (like
/// `/tmp`, where only an entry's owner may rename or remove it).
pub fn check_trusted_path(path: &Path, trusted: &[u32]) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(path)?;
    let ok_owner = |uid: u32| uid == 0 || trusted.contains(&uid);
    let m = std::fs::symlink_metadata(&real)?;
    if !ok_owner(m.uid()) {
        return Err(untrusted(
            path,
            format!("belongs to uid {}, which is not trusted here", m.uid()),
        ));
    }
    for dir in real.ancestors().skip(1) {
        let m = std::fs::symlink_metadata(dir)?;
        if !ok_owner(m.uid()) {
            return Err(untrusted(
                path,
                format!(
                    "lies in {}, which belongs to uid {} (another user could replace it)",
                    dir.display(),
                    m.uid()
                ),
            ));
        }
        let others_write = m.mode() & 0o022 != 0;
        let sticky = m.mode() & libc::S_ISVTX != 0;
        if others_write && !sticky {
            return Err(untrusted(
                path,
                format!(
                    "lies in {}, which other users may write (mode {:o})",
                    dir.display(),
                    m.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tessera-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn only_regular_files_are_read() {
        let d = scratch("read");
        let file = d.join("f");
        std::fs::write(&file, b"kernel").unwrap();
        assert!(open_regular(&file).is_ok());
        let fifo = d.join("fifo");
        mkfifo(&fifo);
        let sock = d.join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for (p, kind) in [
            (d.as_path(), "a directory"),
            (fifo.as_path(), "a FIFO"),
            (sock.as_path(), "a socket"),
            (Path::new("/dev/zero"), "a character device"),
        ] {
            let e = open_regular(p).unwrap_err().to_string();
            assert!(e.contains(kind), "{}: {e}", p.display());
        }
        assert_eq!(
            open_regular(&d.join("missing")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn trusted_paths() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("trust");
        let me = euid();
        assert!(check_trusted_path(&d, &[me]).is_ok());
        // A directory others may write (and not sticky) cannot be trusted below.
        let open = d.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let inner = open.join("inner");
        std::fs::create_dir(&inner).unwrap();
        let e = check_trusted_path(&inner, &[me]).unwrap_err().to_string();
        assert!(e.contains("which other users may write (mode 777)"), "{e}");
        // Sticky, like /tmp: fine.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_trusted_path(&inner, &[me]).is_ok());
        if me == 0 {
            // Owned by another user: refused.
            let theirs = d.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = check_trusted_path(&theirs, &[me]).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
            assert!(check_trusted_path(&theirs, &[me, 65534]).is_ok());
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn output_never_blocks() {
        let d = scratch("write");
        assert!(open_output(&d.join("log")).is_ok());
        assert!(open_output(Path::new("/dev/null")).is_ok());
        let fifo = d.join("fifo");
        mkfifo(&fifo);
        let e = open_output(&fifo).unwrap_err().to_string();
        assert!(e.contains("nobody reads"), "{e}");
        assert!(
            open_output(&d)
                .unwrap_err()
                .to_string()
                .contains("directory")
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
