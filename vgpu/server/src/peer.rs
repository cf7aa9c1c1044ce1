//! Who is on the other end of an instance's connection (`SO_PEERCRED`).
//!
//! The kernel already keeps everyone else out: an instance socket is mode 0600 and belongs
//! to the instance's owner, so only that user and root can connect. The server also records
//! the connected peer's credentials and checks them against the owner before it serves the
//! client's first device access, so a socket whose mode or owner was changed behind the
//! server's back still serves only its owner (and root).
//!
//! The `vfio_user` crate accepts the connection itself and keeps the stream to itself, so
//! the connection is found by its address: the one connected (not listening) socket of this
//! process whose local address is the instance's socket path. An instance serves one
//! connection at a time, so there is exactly one.

use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Highest descriptor number searched.
const MAX_FD: RawFd = 1 << 16;

/// Credentials of a connected peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    /// The peer's process id when it connected.
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

fn local_path_is(fd: RawFd, path: &[u8]) -> bool {
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`.
    let rc =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if rc != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return false;
    }
    let name: Vec<u8> = addr
        .sun_path
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    name == path
}

/// The connected socket of this process bound to `path`, and its peer's credentials.
pub fn connection(path: &Path) -> Option<(RawFd, Peer)> {
    let want = path.as_os_str().as_bytes();
    (0..MAX_FD).find_map(|fd| {
        if !local_path_is(fd, want) || sockopt_int(fd, libc::SO_ACCEPTCONN) != Some(0) {
            return None;
        }
        of(fd).map(|p| (fd, p))
    })
}

/// The credentials of the peer of the connected socket `fd`.
pub fn of(fd: RawFd) -> Option<Peer> {
    // SAFETY: ucred is plain data; all zeroes is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(Peer {
        pid: cred.pid,
        uid: cred.uid,
    })
}

/// Ends the connection on `fd` (both directions): the crate's server loop then sees the end
/// of the stream and returns.
pub fn hang_up(fd: RawFd) {
    // SAFETY: shutdown on a socket of ours; it does not close or reuse the descriptor.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_connection_and_its_peer() {
        let dir = std::env::temp_dir().join(format!("tessera-peer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(
            connection(&path).is_none(),
            "a listener is not a connection"
        );
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (server_side, _) = l.accept().unwrap();
        let (fd, peer) = connection(&path).expect("the accepted connection");
        assert_eq!(fd, std::os::fd::AsRawFd::as_raw_fd(&server_side));
        assert_eq!(peer.pid, std::process::id() as i32);
        assert_eq!(peer.uid, devices::files::euid());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
