//! Who is on the other end of an instance's connection (`SO_PEERCRED`).
//!
//! The kernel already keeps everyone else out: an instance socket is mode 0600 and belongs
//! to the instance's owner, so only that user and root can connect. The server also records
//! the connected peer's credentials and checks them against the owner before it serves the
//! client's first device access, so a socket whose mode or owner was changed behind the
//! server's back still serves only its owner (and root).

use std::os::fd::RawFd;

/// Credentials of a connected peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    /// The peer's process id when it connected.
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
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

/// Ends the connection on `fd` (both directions): the server loop then sees the end of the
/// stream and returns.
pub fn hang_up(fd: RawFd) {
    // SAFETY: shutdown on a socket of ours; it does not close or reuse the descriptor.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_peer_of_a_connection() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = of(std::os::fd::AsRawFd::as_raw_fd(&a)).expect("a connected socket's peer");
        assert_eq!(peer.pid, std::process::id() as i32);
        assert_eq!(peer.uid, devices::files::euid());
        assert!(of(-1).is_none());
    }
}
