//! seccomp-bpf sandboxing of the VMM's threads, Firecracker style: one allow-list per thread
//! role, compiled with seccompiler and installed on the thread itself (filters are inherited
//! by the threads it creates afterwards).
//!
//! | role | thread(s) | installed |
//! |---|---|---|
//! | [`Thread::Vcpu`] | `vcpuN`: `KVM_RUN` and the device emulation behind exits | at the start of each vCPU thread |
//! | [`Thread::Main`] | the thread in [`Vm::run`](crate::Vm::run): event loop, vCPU kicks, teardown | after the vCPU threads started |
//! | [`Thread::Device`] | `vgpu-cp`, `gpu-engineN`, `vfu-irq` | on a short-lived thread that builds the vGPU ([`on_device_thread`]); the device's threads inherit it |
//! | [`Thread::Server`] | every thread of `tessera serve` | on all its threads at once ([`apply_all_threads`]) once the GPU and the control socket are set up |
//! | [`Thread::GpuServer`] | every thread of `tessera serve --gpu vulkan` | the same, plus [`GPU_DRIVER`] |
//! | [`Thread::GpuDevice`] | the device threads of `tessera vm --gpu vulkan` | as [`Thread::Device`], plus [`GPU_DRIVER`] |
//!
//! The lists hold what the threads were seen to use (`strace -f` of the firmware guest's
//! conformance suite and of the test suite), nothing more: memory management for the
//! allocator, futexes, eventfd/epoll I/O, the handful of KVM ioctls each role issues (by
//! request number), and the calls a new thread makes while starting (device role only).
//! Anything else raises `SIGSYS`; [`install_sigsys_reporter`] turns it into a one-line
//! message and exit status 1. `tessera vm --seccomp false` turns all of this off for
//! debugging.

use std::collections::BTreeMap;
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled.
    #[error("cannot build the {0:?} seccomp filter")]
    Build(Thread, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the {0:?} seccomp filter")]
    Install(Thread, #[source] seccompiler::Error),
    /// The filtered setup thread could not be started.
    #[error("cannot start the filtered device setup thread")]
    Thread(#[source] std::io::Error),
    /// The filtered setup thread panicked.
    #[error("the filtered device setup thread panicked")]
    Panicked,
}

/// A thread role, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    /// The thread that runs the event loop and stops the VM.
    Main,
    /// [`Thread::Main`] of a VM with a control socket (`--api-socket`), which writes
    /// snapshots where its user asks: it may also create files and directories, read guest
    /// RAM's memfd at offsets, and read the KVM VM's state (irqchip, PIT, clock).
    Controlled,
    /// A vCPU thread.
    Vcpu,
    /// A device thread (vGPU command processor, software GPU engines) and the thread that
    /// builds the device.
    Device,
    /// The vGPU server: control connections, instance sockets (created and removed at run
    /// time), vfio-user messages with fds, DMA mappings, the vGPUs' own threads.
    Server,
    /// A device thread of a VM whose vGPUs run on a Vulkan GPU: [`Thread::Device`] plus
    /// [`GPU_DRIVER`] (the driver makes the vGPU's device and runs on these threads).
    GpuDevice,
    /// The vGPU server on a Vulkan GPU: [`Thread::Server`] plus what a user-space GPU driver
    /// does on the server's threads when it makes a vGPU's device and compiles and runs its
    /// shaders (see [`GPU_DRIVER`]).
    GpuServer,
}

/// What a user-space GPU driver (Mesa's lavapipe, measured with strace while it made a
/// device and ran the conformance suite; a hardware driver adds its device's ioctls) calls
/// beyond the server's list: thread placement and priority of its worker threads, a signal
/// handler, the user's home directory for its shader cache (an nscd lookup: also `socket`,
/// `AF_UNIX` only), and `ioctl` on its device nodes. It widens the sandbox; the server only installs it with `--gpu vulkan`.
pub const GPU_DRIVER: &[libc::c_long] = &[
    libc::SYS_rt_sigaction,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setscheduler,
    libc::SYS_setpriority,
    libc::SYS_lseek,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_connect,
    libc::SYS_ioctl,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    // Its configuration and cache directories (opening files still fails with EACCES in a
    // VM: see `denials`).
    libc::SYS_newfstatat,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_dup,
];

/// KVM's ioctl type (`KVMIO`, linux/kvm.h).
const KVMIO: u32 = 0xae;

// The KVM ioctl request numbers a filter lets through, from their definitions in
// linux/kvm.h (vmm-sys-util computes `_IOC(dir, KVMIO, nr, size)`).
vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
// A guest moves a memory BAR (VRAM).
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_bindings::kvm_userspace_memory_region
);
// A guest moves the doorbell BAR.
vmm_sys_util::ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_bindings::kvm_ioeventfd);
// An MSI-X message.
vmm_sys_util::ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_bindings::kvm_msi);
// A parked vCPU reading its own state for a snapshot.
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_bindings::kvm_fpu);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
// The control socket's thread reading the VM's state for a snapshot.
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_bindings::kvm_dirty_log);

const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const F_GETFD: u64 = 1;
const F_DUPFD_CLOEXEC: u64 = 1030;
const PR_SET_NAME: u64 = 15;
/// The flags glibc's `pthread_create` passes to `clone`.
const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Reads and writes on a socket the thread already holds (vfio-user messages without fds).
const SOCKET_IO: [libc::c_long; 4] = [
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_writev,
    libc::SYS_readv,
];

/// `arg` (32 bits) equals one of `values`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )?])
        })
        .collect()
}

/// `setsockopt(_, level, name)` for each of `names`.
fn level_and_name(
    level: libc::c_int,
    names: &[libc::c_int],
) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let eq = |arg, v: libc::c_int| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v as u64)
    };
    names
        .iter()
        .map(|&n| SeccompRule::new(vec![eq(1, level)?, eq(2, n)?]))
        .collect()
}

fn allow(rules: &mut Rules, calls: &[libc::c_long]) {
    for &c in calls {
        rules.insert(c, Vec::new());
    }
}

/// What every thread of the process needs: the allocator, futexes, plain reads and writes of
/// descriptors it already has (eventfds, the serial output, stderr), signals returning, and
/// exiting.
fn common() -> Result<Rules, seccompiler::BackendError> {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getrandom,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // Passed by the allow-list only to be refused by `denials` with EACCES (glibc's
            // malloc opens /proc/sys/vm/overcommit_memory when it trims a thread's arena).
            libc::SYS_openat,
        ],
    );
    // Duplicating an eventfd (doorbells handed to the BAR mapper) and std's descriptor checks.
    r.insert(libc::SYS_fcntl, any_of(1, &[F_GETFD, F_DUPFD_CLOEXEC])?);
    Ok(r)
}

fn rules(thread: Thread) -> Result<Rules, seccompiler::BackendError> {
    let mut r = common()?;
    match thread {
        Thread::Vcpu => {
            // KVM_RUN; a guest moving the vGPU's BARs (VRAM memory slot, doorbell
            // ioeventfds); MSI-X messages released by configuration or table writes.
            r.insert(
                libc::SYS_ioctl,
                any_of(
                    1,
                    &[
                        KVM_RUN(),
                        KVM_SET_USER_MEMORY_REGION(),
                        KVM_IOEVENTFD(),
                        KVM_SIGNAL_MSI(),
                        KVM_GET_REGS(),
                        KVM_GET_SREGS(),
                        KVM_GET_MSRS(),
                        KVM_GET_FPU(),
                        KVM_GET_LAPIC(),
                        KVM_GET_MP_STATE(),
                        KVM_GET_VCPU_EVENTS(),
                        KVM_GET_DEBUGREGS(),
                        KVM_GET_XSAVE(),
                        KVM_GET_XCRS(),
                    ],
                )?,
            );
            // Register accesses of a vfio-user device are messages on its (connected)
            // socket.
            allow(&mut r, &SOCKET_IO);
        }
        Thread::Main | Thread::Controlled => {
            allow(
                &mut r,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    // Kicking vCPU threads out of KVM_RUN.
                    libc::SYS_tgkill,
                    // Tearing down: returning VRAM (hole punching) and unmapping.
                    libc::SYS_fallocate,
                    // The control socket (`--api-socket`): its connections, and removing it
                    // when the VM ends.
                    libc::SYS_accept4,
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                ],
            );
            // Reading a control request, writing its reply.
            allow(&mut r, &SOCKET_IO);
            // A control connection's request timeout.
            r.insert(
                libc::SYS_setsockopt,
                level_and_name(libc::SOL_SOCKET, &[libc::SO_RCVTIMEO])?,
            );
            if thread == Thread::Controlled {
                // Writing a snapshot: its directory and files, guest RAM read at offsets.
                allow(
                    &mut r,
                    &[
                        libc::SYS_openat,
                        libc::SYS_mkdir,
                        libc::SYS_mkdirat,
                        libc::SYS_rename,
                        libc::SYS_renameat,
                        libc::SYS_renameat2,
                        libc::SYS_fsync,
                        libc::SYS_fstat,
                        libc::SYS_newfstatat,
                        libc::SYS_statx,
                        libc::SYS_pread64,
                        // Sending a migration: one connection to its destination.
                        libc::SYS_connect,
                    ],
                );
                r.insert(
                    libc::SYS_socket,
                    any_of(
                        0,
                        &[
                            libc::AF_UNIX as u64,
                            libc::AF_INET as u64,
                            libc::AF_INET6 as u64,
                        ],
                    )?,
                );
                let mut opts =
                    level_and_name(libc::SOL_SOCKET, &[libc::SO_RCVTIMEO, libc::SO_SNDTIMEO])?;
                opts.extend(level_and_name(libc::IPPROTO_TCP, &[libc::TCP_NODELAY])?);
                r.insert(libc::SYS_setsockopt, opts);
                // Restoring the terminal; the VM's state.
                r.insert(
                    libc::SYS_ioctl,
                    any_of(
                        1,
                        &[
                            TCGETS,
                            TCSETS,
                            KVM_GET_IRQCHIP(),
                            KVM_GET_CLOCK(),
                            KVM_GET_PIT2(),
                            // A migration's dirty logs.
                            KVM_GET_DIRTY_LOG(),
                            KVM_SET_USER_MEMORY_REGION(),
                        ],
                    )?,
                );
            } else {
                // Restoring the terminal.
                r.insert(libc::SYS_ioctl, any_of(1, &[TCGETS, TCSETS])?);
            }
        }
        Thread::Device | Thread::GpuDevice => {
            allow(
                &mut r,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    // Reset scrubs VRAM by punching holes.
                    libc::SYS_fallocate,
                    // Building the device on the setup thread: VRAM memfd, eventfds, epoll.
                    libc::SYS_memfd_create,
                    libc::SYS_ftruncate,
                    libc::SYS_eventfd2,
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    // Starting its threads (clone3 is refused with ENOSYS by a second filter,
                    // see `device_clone3`, so that glibc uses clone, whose flags are checked).
                    libc::SYS_clone3,
                    libc::SYS_set_robust_list,
                    libc::SYS_rseq,
                ],
            );
            // A vfio-user device's heartbeat (a register read on its connected socket).
            allow(&mut r, &SOCKET_IO);
            r.insert(libc::SYS_clone, any_of(0, &[CLONE_THREAD_FLAGS])?);
            r.insert(libc::SYS_prctl, any_of(0, &[PR_SET_NAME])?);
            // VRAM memfds are sealed against resizing when created.
            r.insert(
                libc::SYS_fcntl,
                any_of(1, &[F_GETFD, F_DUPFD_CLOEXEC, libc::F_ADD_SEALS as u64])?,
            );
            r.insert(libc::SYS_ioctl, any_of(1, &[KVM_SIGNAL_MSI()])?);
        }
        Thread::Server | Thread::GpuServer => {
            allow(
                &mut r,
                &[
                    // Waiting for clients and doorbells.
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    libc::SYS_eventfd2,
                    // Connections and messages (fds come and go with SCM_RIGHTS).
                    libc::SYS_accept4,
                    libc::SYS_recvmsg,
                    libc::SYS_sendmsg,
                    // Instance sockets: created 0600, removed with the instance.
                    libc::SYS_bind,
                    libc::SYS_listen,
                    libc::SYS_chmod,
                    libc::SYS_fchmodat,
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    // Checking client fds (size, seals, eventfd-ness).
                    libc::SYS_statx,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_readlink,
                    libc::SYS_readlinkat,
                    // VRAM files: created sealed, punched on reset and detach.
                    libc::SYS_memfd_create,
                    libc::SYS_ftruncate,
                    libc::SYS_fallocate,
                    // Threads of instances and vGPUs (clone3 fails with ENOSYS, see
                    // `device_clone3`).
                    libc::SYS_clone3,
                    libc::SYS_set_robust_list,
                    libc::SYS_rseq,
                    // The panic message of a malformed message caught on an instance thread
                    // (std shortens source paths against the working directory).
                    libc::SYS_getcwd,
                    // Interrupting an interrupt relay blocked on a client's eventfd when
                    // its attachment ends (`vgpu_server::attach::EventVectors`).
                    libc::SYS_tgkill,
                ],
            );
            allow(&mut r, &SOCKET_IO);
            r.insert(libc::SYS_socket, any_of(0, &[libc::AF_UNIX as u64])?);
            // The idle timeout of control connections; the timeouts of TLS session
            // connections and their TCP_NODELAY (`vgpu_server::tls`), and of metrics
            // scrapers.
            let mut opts =
                level_and_name(libc::SOL_SOCKET, &[libc::SO_RCVTIMEO, libc::SO_SNDTIMEO])?;
            opts.extend(level_and_name(libc::IPPROTO_TCP, &[libc::TCP_NODELAY])?);
            r.insert(libc::SYS_setsockopt, opts);
            // Finding an instance's connection and its peer (`vgpu_server::peer`).
            r.insert(
                libc::SYS_getsockopt,
                any_of(2, &[libc::SO_PEERCRED as u64, libc::SO_ACCEPTCONN as u64])?,
            );
            allow(
                &mut r,
                &[
                    libc::SYS_getsockname,
                    libc::SYS_shutdown,
                    // Instance sockets handed to their owner (`vgpu create --owner`).
                    libc::SYS_chown,
                    libc::SYS_fchownat,
                ],
            );
            r.insert(libc::SYS_clone, any_of(0, &[CLONE_THREAD_FLAGS])?);
            r.insert(libc::SYS_prctl, any_of(0, &[PR_SET_NAME])?);
            r.insert(
                libc::SYS_fcntl,
                any_of(
                    1,
                    &[
                        F_GETFD,
                        F_DUPFD_CLOEXEC,
                        libc::F_ADD_SEALS as u64,
                        libc::F_GET_SEALS as u64,
                    ],
                )?,
            );
        }
    }
    if matches!(thread, Thread::GpuDevice | Thread::GpuServer) {
        // Last: unconditional `ioctl` replaces the roles' request lists.
        allow(&mut r, GPU_DRIVER);
        // The user lookup tries nscd's socket.
        r.insert(libc::SYS_socket, any_of(0, &[libc::AF_UNIX as u64])?);
    }
    Ok(r)
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    let a = TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let a = TargetArch::aarch64;
    a
}

/// The compiled allow-list of `thread`: allowed calls pass, anything else raises `SIGSYS`.
pub fn filter(thread: Thread) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(thread, e);
    let f = SeccompFilter::new(
        rules(thread).map_err(build)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch(),
    )
    .map_err(build)?;
    f.try_into().map_err(build)
}

/// A second device filter: `clone3` fails with `ENOSYS` (its flags live in memory, out of a
/// filter's reach), so thread creation falls back to `clone`, whose flags the allow-list
/// checks. Stacked filters: the stricter verdict wins.
fn device_clone3() -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(Thread::Device, e);
    let mut r = Rules::new();
    r.insert(libc::SYS_clone3, Vec::new());
    let f = SeccompFilter::new(
        r,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch(),
    )
    .map_err(build)?;
    f.try_into().map_err(build)
}

/// A filter stacked on every thread: opening files fails with `EACCES` instead of killing
/// the VM (the allow-list lets `openat` through to this verdict). No thread needs a file once
/// the VM runs; glibc's malloc tries to read /proc/sys/vm/overcommit_memory when it trims a
/// thread's arena and copes with the failure.
fn denials(thread: Thread) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(thread, e);
    let mut r = Rules::new();
    if thread != Thread::Controlled {
        r.insert(libc::SYS_openat, Vec::new());
    }
    let f = SeccompFilter::new(
        r,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch(),
    )
    .map_err(build)?;
    f.try_into().map_err(build)
}

/// Installs `thread`'s filter on the calling thread.
pub fn apply(thread: Thread) -> Result<(), SeccompError> {
    let prog = filter(thread)?;
    let mut extra = vec![denials(thread)?];
    if let Thread::Device | Thread::GpuDevice = thread {
        extra.push(device_clone3()?);
    }
    // The allow-list goes last: it forbids seccomp(2) itself.
    for p in &extra {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Install(thread, e))?;
    }
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(thread, e))
}

/// Installs `thread`'s filter on every thread of the process (for `tessera serve`, whose
/// engines and instance threads exist before it can filter itself).
pub fn apply_all_threads(thread: Thread) -> Result<(), SeccompError> {
    let prog = filter(thread)?;
    for p in [denials(thread)?, device_clone3()?, prog] {
        seccompiler::apply_filter_all_threads(&p).map_err(|e| SeccompError::Install(thread, e))?;
    }
    Ok(())
}

/// Runs `build` on a new thread under the device filter and returns its result: every thread
/// `build` starts (a vGPU's command processor, a software GPU's engines) inherits the filter.
/// The calling thread stays unfiltered.
pub fn on_device_thread<T: Send>(
    role: Thread,
    build: impl FnOnce() -> T + Send,
) -> Result<T, SeccompError> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("device-setup".into())
            .spawn_scoped(s, || apply(role).map(|()| build()))
            .map_err(SeccompError::Thread)?;
        h.join().map_err(|_| SeccompError::Panicked)?
    })
}

/// Writes `n` in decimal into `buf`; returns the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The name of system call `nr`, for the calls a filter is likely to meet (the report says
/// what was refused, not only its number).
fn syscall_name(nr: libc::c_long) -> &'static [u8] {
    const NAMES: &[(libc::c_long, &[u8])] = &[
        (libc::SYS_open, b"open"),
        (libc::SYS_openat, b"openat"),
        (libc::SYS_stat, b"stat"),
        (libc::SYS_fstat, b"fstat"),
        (libc::SYS_newfstatat, b"newfstatat"),
        (libc::SYS_statx, b"statx"),
        (libc::SYS_ioctl, b"ioctl"),
        (
            libc::SYS_rt_sigaction,
            b"rt_sigaction (a signal handler changed)",
        ),
        (libc::SYS_kill, b"kill"),
        (libc::SYS_tgkill, b"tgkill"),
        (libc::SYS_clone, b"clone"),
        (libc::SYS_clone3, b"clone3"),
        (libc::SYS_execve, b"execve"),
        (libc::SYS_fork, b"fork"),
        (libc::SYS_socket, b"socket"),
        (libc::SYS_connect, b"connect"),
        (libc::SYS_accept4, b"accept4"),
        (libc::SYS_sendto, b"sendto"),
        (libc::SYS_recvfrom, b"recvfrom"),
        (libc::SYS_sendmsg, b"sendmsg"),
        (libc::SYS_recvmsg, b"recvmsg"),
        (libc::SYS_fcntl, b"fcntl"),
        (libc::SYS_setsockopt, b"setsockopt"),
        (libc::SYS_ftruncate, b"ftruncate"),
        (libc::SYS_fallocate, b"fallocate"),
        (libc::SYS_memfd_create, b"memfd_create"),
        (libc::SYS_mkdir, b"mkdir"),
        (libc::SYS_unlink, b"unlink"),
        (libc::SYS_readlink, b"readlink"),
        (libc::SYS_readlinkat, b"readlinkat"),
        (libc::SYS_prctl, b"prctl"),
        (libc::SYS_seccomp, b"seccomp"),
        (libc::SYS_ptrace, b"ptrace"),
        (libc::SYS_pipe2, b"pipe2"),
        (libc::SYS_dup, b"dup"),
        (libc::SYS_dup3, b"dup3"),
        (libc::SYS_getdents64, b"getdents64"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or(b"unknown to the report".as_slice(), |(_, name)| *name)
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `siginfo_t` for SIGSYS (x86_64 and aarch64): `si_call_addr` at byte 16, `si_syscall`
    // (int) at byte 24.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t of at least 128 bytes.
        let at = unsafe { info.cast::<u8>().add(24) };
        // SAFETY: for SIGSYS the int at byte 24 of siginfo_t is the system call number.
        unsafe { at.cast::<libc::c_int>().read_unaligned() }
    };
    let mut buf = [0u8; 20];
    let mut msg = [0u8; 200];
    let mut len = 0;
    for part in [
        b"tessera: seccomp: forbidden system call ".as_slice(),
        decimal(nr.max(0) as u64, &mut buf),
        b" (",
        syscall_name(libc::c_long::from(nr)),
        b"; run with --seccomp false to debug)\n",
    ] {
        msg[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    // SAFETY: write(2) is async-signal-safe and allowed by every filter; the buffer is valid
    // for `len` bytes.
    unsafe { libc::write(2, msg.as_ptr().cast(), len) };
    // SAFETY: _exit(2) is async-signal-safe and allowed by every filter.
    unsafe { libc::_exit(1) }
}

/// Reports a filter violation on stderr and exits with status 1 (instead of dying silently
/// from `SIGSYS`). Installed once per process.
pub fn install_sigsys_reporter() -> Result<(), std::io::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; all zeroes is a valid (empty) value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: a valid sigset_t to clear.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: a valid sigaction whose handler only calls async-signal-safe functions.
        let rc = unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) };
        if rc != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, ExitStatus};

    use super::*;

    const CHILD_ENV: &str = "TESSERA_SECCOMP_CHILD";

    /// Runs `case` of [`child`] in a fresh process (this test binary again): filters stay
    /// out of the test runner, and nothing forks a multi-threaded process.
    fn run_child(case: &str) -> ExitStatus {
        Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "seccomp::tests::child", "--nocapture"])
            .env(CHILD_ENV, case)
            .status()
            .expect("run the child")
    }

    /// Every role's name in [`role`].
    const ROLES: [&str; 7] = [
        "main",
        "controlled",
        "vcpu",
        "device",
        "server",
        "gpu-server",
        "gpu-device",
    ];

    fn role(name: &str) -> Thread {
        match name {
            "main" => Thread::Main,
            "controlled" => Thread::Controlled,
            "vcpu" => Thread::Vcpu,
            "server" => Thread::Server,
            "gpu-server" => Thread::GpuServer,
            "gpu-device" => Thread::GpuDevice,
            _ => Thread::Device,
        }
    }

    /// The child side: does nothing unless started by [`run_child`]; then runs the case and
    /// leaves with `_exit` (never returning into the test runner under a filter).
    #[test]
    fn child() {
        let Ok(case) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (what, name) = case.split_once(':').unwrap_or((case.as_str(), "device"));
        let code = match what {
            // Allowed calls keep working under the filter.
            "allowed" => {
                apply(role(name)).expect("install");
                // SAFETY: writing from a valid buffer to stderr.
                let n = unsafe { libc::write(2, b"allowed\n".as_ptr().cast(), 8) };
                if n == 8 { 0 } else { 10 }
            }
            // No role opens a netlink socket (only a migration's sender opens stream ones).
            "socket" => {
                apply(role(name)).expect("install");
                // SAFETY: a plain system call with constant arguments.
                unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
                11
            }
            // KVM_RUN belongs to vCPU threads only.
            "kvm_run" => {
                apply(role(name)).expect("install");
                // SAFETY: an ioctl on an invalid descriptor; the filter decides first.
                unsafe { libc::ioctl(-1, KVM_RUN()) };
                12
            }
            "report" => {
                install_sigsys_reporter().expect("handler");
                apply(role(name)).expect("install");
                // SAFETY: as above.
                unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
                13
            }
            // Threads started under the device filter inherit it, and starting them works.
            "device_threads" => {
                let r = on_device_thread(Thread::Device, || {
                    let t = std::thread::Builder::new()
                        .name("engine".into())
                        .spawn(|| {
                            // SAFETY: as above; inherited filter must stop it.
                            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
                        })
                        .expect("spawn under the filter");
                    t.join().ok()
                });
                match r {
                    Ok(Some(_)) => 14,
                    _ => 15,
                }
            }
            // The server's filter reaches threads that existed before it was installed, and
            // lets it make UNIX sockets only.
            "server_threads" => {
                let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
                let early = std::thread::spawn(move || {
                    let _ = go_rx.recv();
                    // SAFETY: as above; the filter installed meanwhile must stop it.
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
                });
                apply_all_threads(Thread::Server).expect("install");
                // SAFETY: a plain system call with constant arguments.
                let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                if unix < 0 {
                    // SAFETY: leaving the child without unwinding.
                    unsafe { libc::_exit(19) };
                }
                let _ = go_tx.send(());
                let _ = early.join();
                18
            }
            "device_spawn" => {
                let r = on_device_thread(Thread::Device, || {
                    std::thread::Builder::new()
                        .name("engine".into())
                        .spawn(|| 7)
                        .ok()
                        .and_then(|t| t.join().ok())
                });
                if matches!(r, Ok(Some(7))) { 0 } else { 16 }
            }
            _ => 17,
        };
        // SAFETY: leaving the child process without unwinding into the runner.
        unsafe { libc::_exit(code) };
    }

    #[test]
    fn every_role_allows_what_it_needs() {
        for r in ROLES {
            let st = run_child(&format!("allowed:{r}"));
            assert_eq!(st.code(), Some(0), "{r}: {st:?}");
        }
        let st = run_child("device_spawn");
        assert_eq!(
            st.code(),
            Some(0),
            "threads start under the device filter: {st:?}"
        );
    }

    #[test]
    fn a_forbidden_call_kills_the_process_with_sigsys() {
        for r in ROLES {
            let st = run_child(&format!("socket:{r}"));
            assert_eq!(st.signal(), Some(libc::SIGSYS), "{r}: {st:?}");
        }
    }

    #[test]
    fn ioctls_are_filtered_by_request_number() {
        for r in ["main", "device", "server"] {
            let st = run_child(&format!("kvm_run:{r}"));
            assert_eq!(st.signal(), Some(libc::SIGSYS), "{r}: {st:?}");
        }
        // A vCPU may: the call itself fails (bad descriptor) and the child goes on.
        assert_eq!(run_child("kvm_run:vcpu").code(), Some(12));
    }

    #[test]
    fn device_filter_is_inherited_by_device_threads() {
        let st = run_child("device_threads");
        assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}");
    }

    #[test]
    fn the_server_filter_covers_every_thread() {
        let st = run_child("server_threads");
        assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}");
    }

    #[test]
    fn the_reporter_exits_with_status_1() {
        let st = run_child("report:vcpu");
        assert_eq!(st.code(), Some(1), "{st:?}");
    }

    #[test]
    fn kvm_request_numbers() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(KVM_SIGNAL_MSI(), 0x4020_aea5);
    }
}
