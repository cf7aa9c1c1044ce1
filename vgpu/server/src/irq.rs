//! A vfio-user attachment's MSI-X routes ([`EventVectors`]): the client's eventfds, written
//! by a relay thread so that the vGPU never blocks on a file the client shares.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::pci::VectorSink;
use vgpu_abi::pci as abi_pci;

/// The vGPU's interrupt routes, as the client handed them over: one eventfd per MSI-X vector.
///
/// An eventfd is a file the client shares, and a client that fills its counter (writes
/// `0xffff_ffff_ffff_fffe`) makes the next write block. So the command processor, which
/// raises interrupts under the vGPU's lock and holding the GPU, only marks a vector pending
/// here; one relay thread per attachment writes the eventfds. Only that thread can block on
/// a hostile client, and when the attachment ends a signal interrupts its write.
#[derive(Debug, Default)]
pub struct EventVectors {
    relay: Arc<Relay>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct Relay {
    state: Mutex<RelayState>,
    wake: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct RelayState {
    routes: Vec<Option<Arc<File>>>,
    /// Vectors raised and not yet written (bit `v`).
    pending: u32,
    stop: bool,
    /// The relay thread has returned.
    done: bool,
}

/// The signal that interrupts a relay blocked in a write (its handler does nothing).
fn relay_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

/// Installs the handler of the signal that interrupts interrupt relays, once per process. A
/// server calls it before its seccomp filter, which refuses `rt_sigaction`
/// ([`crate::Daemon::new`] does).
pub fn install_relay_signal() -> std::io::Result<()> {
    static RESULT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    RESULT
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(relay_signal(), relay_signal_handler)
                .map_err(|e| format!("cannot install the interrupt relay's signal handler: {e}"))
        })
        .clone()
        .map_err(std::io::Error::other)
}

extern "C" fn relay_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Relay {
    fn lock(&self) -> std::sync::MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let mut st = self.lock();
        loop {
            if st.stop {
                st.done = true;
                self.wake.notify_all();
                return;
            }
            if st.pending == 0 {
                st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let bits = std::mem::take(&mut st.pending);
            let due: Vec<(u16, Arc<File>)> = (0..abi_pci::MSIX_VECTORS)
                .filter(|&v| bits & 1 << v != 0)
                .filter_map(|v| Some((v, st.routes.get(usize::from(v))?.clone()?)))
                .collect();
            drop(st);
            let mut again = 0;
            for (v, evt) in due {
                match (&*evt).write(&1u64.to_ne_bytes()) {
                    Ok(_) => {}
                    // The end of the attachment, or a stray signal: raised again below
                    // unless stopping.
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => again |= 1 << v,
                    Err(e) => tracing::warn!("cannot signal MSI-X vector {v}: {e}"),
                }
            }
            st = self.lock();
            st.pending |= again;
        }
    }
}

impl EventVectors {
    /// Routes vectors `start..` to `fds` (eventfds, checked by the caller); `None`s remove.
    pub(crate) fn set(
        &self,
        start: usize,
        fds: impl IntoIterator<Item = Option<File>>,
    ) -> std::io::Result<()> {
        let mut st = self.relay.lock();
        st.routes
            .resize_with(usize::from(abi_pci::MSIX_VECTORS), || None);
        for (route, fd) in st.routes[start..].iter_mut().zip(fds) {
            *route = fd.map(Arc::new);
        }
        let any = st.routes.iter().any(Option::is_some);
        drop(st);
        if any {
            self.start_relay()?;
        }
        Ok(())
    }

    fn start_relay(&self) -> std::io::Result<()> {
        let mut t = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_some() {
            return Ok(());
        }
        install_relay_signal()?;
        let relay = self.relay.clone();
        *t = Some(
            std::thread::Builder::new()
                .name("vfu-irq".into())
                .stack_size(256 << 10)
                .spawn(move || relay.run())?,
        );
        Ok(())
    }
}

impl VectorSink for EventVectors {
    fn trigger(&self, v: u16) {
        let mut st = self.relay.lock();
        if st.routes.get(usize::from(v)).is_some_and(Option::is_some) {
            st.pending |= 1 << v;
            self.relay.wake.notify_one();
        }
    }
}

impl Drop for EventVectors {
    fn drop(&mut self) {
        let Some(t) = self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut st = self.relay.lock();
        st.stop = true;
        self.relay.wake.notify_all();
        // A relay blocked on a client's full eventfd returns from its write when signalled;
        // a signal that lands just before the write is lost, so it is sent until the relay
        // is done (at most for a second: then the thread is left to end by itself).
        for _ in 0..100 {
            if st.done {
                drop(st);
                let _ = t.join();
                return;
            }
            drop(st);
            let _ = vmm_sys_util::signal::Killable::kill(&t, relay_signal());
            st = self.relay.lock();
            if !st.done {
                st = self
                    .relay
                    .wake
                    .wait_timeout(st, std::time::Duration::from_millis(10))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        tracing::error!("an interrupt relay did not stop; it is left behind");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn eventfd_file(initial: u64) -> File {
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        if initial > 0 {
            evt.write(initial).unwrap();
        }
        let raw = std::os::fd::IntoRawFd::into_raw_fd(evt);
        // SAFETY: `raw` was just released by the EventFd and is owned by nothing else.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(raw) }
    }

    /// A client that fills its eventfd's counter (a blocking eventfd, so the next write
    /// blocks) cannot block the vGPU: raising its vector returns at once, vectors signalled
    /// before it are delivered, and ending the attachment interrupts the relay's write.

    #[test]
    fn a_full_eventfd_blocks_no_one() {
        let full = eventfd_file(0xffff_ffff_ffff_fffe);
        let ok = eventfd_file(0);
        let ok_reader = ok.try_clone().unwrap();
        let v = Arc::new(EventVectors::default());
        v.set(0, [Some(ok), Some(full)]).unwrap();
        let relay = v.relay.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let raiser = v.clone();
        std::thread::spawn(move || {
            for _ in 0..3 {
                raiser.trigger(0);
                raiser.trigger(1);
            }
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("raising a vector blocked on the client's full eventfd");
        // Vector 0 was written (before the relay blocked on vector 1).
        let mut pfd = libc::pollfd {
            fd: ok_reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 20_000) };
        assert_eq!(ready, 1, "vector 0 was never signalled");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(v);
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("ending the attachment hung on the relay");
        assert!(relay.lock().done, "the relay thread is still blocked");
    }
}
