//! Running a VM: vCPU threads, the event loop, and stopping.

use super::*;

/// Restores the terminal's line discipline when dropped.
struct TermiosGuard(Option<libc::termios>);

impl TermiosGuard {
    /// Puts a terminal stdin in character mode without echo (signals still work).
    fn char_mode() -> Self {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(0) } != 1 {
            return TermiosGuard(None);
        }
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: t is a valid out-pointer for tcgetattr on fd 0.
        if unsafe { libc::tcgetattr(0, t.as_mut_ptr()) } != 0 {
            return TermiosGuard(None);
        }
        // SAFETY: tcgetattr succeeded, so t is initialized.
        let saved = unsafe { t.assume_init() };
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        // SAFETY: raw is a valid termios derived from the current one.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        TermiosGuard(Some(saved))
    }
}

impl Drop for TermiosGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the termios read from fd 0 earlier.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vm {
    /// Runs the VM until the guest exits or the VMM fails; returns why it stopped.
    pub fn run(mut self) -> Result<ExitReason, VmError> {
        static HANDLER: Once = Once::new();
        let mut handler_result = Ok(());
        HANDLER.call_once(|| {
            handler_result = register_signal_handler(kick_signal(), kick_handler);
        });
        handler_result.map_err(|e| VmError::Os("install the vCPU kick handler", e.into()))?;

        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(VmError::EventLoop)?;
        em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(self.exit.clone()))));
        let controlled = self.api.is_some();
        if let Some(api) = self.api.take() {
            em.add_subscriber(Arc::new(Mutex::new(api)));
        }
        let _termios = match (&self.serial, self.stdin_input) {
            (Some(serial), true) => {
                em.add_subscriber(Arc::new(Mutex::new(SerialInput {
                    stdin: dup_fd(0, "duplicate stdin")?,
                    serial: serial.clone(),
                })));
                Some(TermiosGuard::char_mode())
            }
            _ => None,
        };

        if self.seccomp {
            crate::seccomp::install_sigsys_reporter()
                .map_err(|e| VmError::Os("install the seccomp violation reporter", e))?;
        }
        let (done_tx, done_rx) = mpsc::channel::<u8>();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let stop = self.vcpus.first().map(|v| v.stop.clone());
        for runner in self.vcpus.drain(..) {
            let done = done_tx.clone();
            let cpu = runner.cpu;
            let exit = self.exit.clone();
            let (seccomp, vcpu_exit) = (self.seccomp, self.exit.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{cpu}"))
                .spawn(move || {
                    match seccomp.then(|| crate::seccomp::apply(crate::seccomp::Thread::Vcpu)) {
                        Some(Err(e)) => vcpu_exit.request(ExitReason::Failure(error_chain(&e))),
                        _ => runner.run(),
                    }
                    let _ = done.send(cpu);
                });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    exit.request(ExitReason::Failure(format!(
                        "cannot start vCPU thread {cpu}: {e}"
                    )));
                    break;
                }
            }
        }
        drop(done_tx);
        *self
            .controls
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            threads.iter().map(|h| h.as_pthread_t()).collect();
        if self.seccomp
            && let Err(e) = crate::seccomp::apply(if controlled {
                crate::seccomp::Thread::Controlled
            } else {
                crate::seccomp::Thread::Main
            })
        {
            self.exit.request(ExitReason::Failure(error_chain(&e)));
        }

        let mut loop_error = None;
        while self.exit.reason().is_none() {
            if let Err(e) = em.run() {
                loop_error = Some(VmError::EventLoop(e));
                break;
            }
        }

        // Stop the vCPUs: raise the flag, then kick each thread out of KVM_RUN until it has
        // reported back (a kick that lands just before KVM_RUN is lost, hence the repeat).
        if let Some(stop) = stop {
            stop.store(true, Ordering::Release);
        }
        // Parked (paused) vCPUs wake to see it.
        self.controls.gate.release();
        let mut running = threads.len();
        while running > 0 {
            for h in threads.iter().filter(|h| !h.is_finished()) {
                // SAFETY: the pthread handle belongs to a thread we spawned and have not joined.
                unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            }
            match done_rx.recv_timeout(Duration::from_millis(5)) {
                Ok(_) => running -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for h in threads {
            if h.join().is_err() {
                self.exit
                    .request(ExitReason::Failure("a vCPU thread panicked".into()));
            }
        }
        let _ = (&self.vm_fd, &self.pio, &self.mmio);
        if let Some(e) = loop_error {
            return Err(e);
        }
        Ok(self
            .exit
            .reason()
            .unwrap_or(ExitReason::Failure("VM stopped without a reason".into())))
    }
}
