//! Only the instance's owner (and root) is served: the socket belongs to the owner with mode
//! 0600, and the server checks the connected peer's credentials (`SO_PEERCRED`) before the
//! first device access, so even a socket whose mode was changed behind its back serves no
//! one else. Needs root (to act as other users); skipped otherwise.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use vgpu::physical::{GpuSpec, PhysicalGpu};
use vgpu::sched::Params;
use vgpu_server::{Daemon, ServeOptions};

const OWNER: u32 = 65534;
const STRANGER: u32 = 4321;

/// Runs `f` on a thread whose effective uid is `uid` (a raw `setresuid` changes only the
/// calling thread's credentials, which are what `connect` and `SO_PEERCRED` see).
fn as_user<T: Send + 'static>(uid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: setresuid(-1, uid, -1) for this thread only; the thread ends after `f`.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, -1i32, uid, -1i32) };
        assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread")
}

/// A server in `/tmp/tessera-NAME-PID` with one instance, "o", that belongs to [`OWNER`].
fn owned_instance(name: &str) -> (PathBuf, std::sync::Arc<Daemon>, vgpu_server::InstanceInfo) {
    let dir = PathBuf::from(format!("/tmp/tessera-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let gpu = PhysicalGpu::new(&GpuSpec::whole(256 << 20, 1)).expect("GPU");
    let daemon = Daemon::new(
        gpu,
        ServeOptions {
            dir: dir.clone(),
            ..ServeOptions::default()
        },
    )
    .expect("server");
    let profile = vgpu::profile::find("64M").expect("profile");
    let info = daemon
        .create_owned(
            profile,
            Some("o".into()),
            None,
            None,
            Params::default(),
            Some(OWNER),
        )
        .expect("instance");
    (dir, daemon, info)
}

fn config_id(socket: &Path) -> Result<u32, String> {
    let mut c = vfio_user::Client::new(socket).map_err(|e| e.to_string())?;
    let mut id = [0u8; 4];
    c.region_read(7, 0, &mut id).map_err(|e| e.to_string())?;
    Ok(u32::from_le_bytes(id))
}

#[test]
fn only_the_owner_and_root_are_served() {
    if devices::files::euid() != 0 {
        eprintln!("skipped: needs root to act as other users");
        return;
    }
    let (dir, daemon, info) = owned_instance("trust");
    let socket = info.socket.clone();
    let m = std::fs::metadata(&socket).expect("socket");
    assert_eq!((m.uid(), m.mode() & 0o777), (OWNER, 0o600));

    // The owner is served.
    let s = socket.clone();
    assert_eq!(as_user(OWNER, move || config_id(&s)), Ok(0x0001_7e55));
    // Root is served too.
    assert_eq!(config_id(&socket), Ok(0x0001_7e55));

    // A stranger cannot even connect.
    let s = socket.clone();
    let e = as_user(STRANGER, move || config_id(&s)).expect_err("stranger refused");
    assert!(e.contains("ermission denied"), "{e}");

    // Someone opens the socket to all behind the server's back: the peer check still
    // refuses the stranger before any device access (all-ones, then the connection ends).
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let s = socket.clone();
    let r = as_user(STRANGER, move || config_id(&s));
    assert_ne!(r, Ok(0x0001_7e55), "a stranger was served");
    // The instance still serves its owner afterwards.
    let s = socket.clone();
    let again = as_user(OWNER, move || config_id(&s));
    assert_eq!(again, Ok(0x0001_7e55));
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same for sessions (`vgpu-NAME.session`): the socket is the owner's, mode 0600, and a
/// stranger who reaches it anyway is refused before the session opens.
#[test]
fn only_the_owner_and_root_open_sessions() {
    if devices::files::euid() != 0 {
        eprintln!("skipped: needs root to act as other users");
        return;
    }
    let (dir, daemon, info) = owned_instance("trust-s");
    let socket = info.session_socket.clone();
    let m = std::fs::metadata(&socket).expect("session socket");
    assert_eq!((m.uid(), m.mode() & 0o777), (OWNER, 0o600));
    let open = |path: PathBuf| {
        move || {
            vgpu_session::Session::connect_unix(&path)
                .map(|s| s.info().instance.clone())
                .map_err(|e| devices::error_chain(&e))
        }
    };
    assert_eq!(as_user(OWNER, open(socket.clone())), Ok("o".to_string()));
    assert_eq!(open(socket.clone())(), Ok("o".to_string()), "root");
    let e = as_user(STRANGER, open(socket.clone())).expect_err("stranger refused");
    assert!(e.contains("ermission denied"), "{e}");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let r = as_user(STRANGER, open(socket.clone()));
    assert!(r.is_err(), "a stranger opened a session: {r:?}");
    assert_eq!(as_user(OWNER, open(socket.clone())), Ok("o".to_string()));
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_directory_another_user_owns_or_can_write_is_refused() {
    if devices::files::euid() != 0 {
        eprintln!("skipped: needs root to make files of other users");
        return;
    }
    let root = PathBuf::from(format!("/tmp/tessera-trustdir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("scratch");
    let gpu = PhysicalGpu::new(&GpuSpec::whole(64 << 20, 1)).expect("GPU");
    let try_dir = |dir: &Path| {
        Daemon::new(
            gpu.clone(),
            ServeOptions {
                dir: dir.to_path_buf(),
                ..ServeOptions::default()
            },
        )
        .map(drop)
        .map_err(|e| devices::error_chain(&e))
    };
    // Made first by someone else.
    let theirs = root.join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(OWNER), None).expect("chown");
    let e = try_dir(&theirs).expect_err("foreign directory");
    assert!(e.contains("belongs to uid 65534"), "{e}");
    let m = std::fs::metadata(&theirs).expect("stat");
    assert_eq!(
        m.mode() & 0o777,
        0o755,
        "the server changed a directory it refused"
    );
    // Inside a directory everyone may write (not sticky).
    let open = root.join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = try_dir(&open.join("run")).expect_err("writable parent");
    assert!(e.contains("which other users may write"), "{e}");
    // Our own, under a sticky /tmp: fine.
    try_dir(&root.join("ours")).expect("own directory");
    let _ = std::fs::remove_dir_all(&root);
}
