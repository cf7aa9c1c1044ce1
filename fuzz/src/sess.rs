//! `session_messages`: a session client (issue #21) that speaks garbage. The fuzz input is
//! decoded into a sequence of frames: requests of every kind with fuzzed fields (buffers and
//! contexts that exist or not, extents past their buffers, memfds sealed, unsealed, too
//! short or missing, kernels of every kind), raw bytes that are no request, lengths over the
//! limit, and a last frame cut short. They are written to `vgpu_server::session`'s server
//! running over a fresh vGPU, exactly as `tessera serve` serves one session.
//!
//! Oracles: nothing panics; the session always ends (no hang); afterwards the vGPU still
//! answers; a neighbour's VRAM canary and a host memfd that was never offered are intact.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use devices::pci::PciDeviceSync;
use vgpu::backend::SoftGpu;
use vgpu::backend::soft::SoftVram;
use vgpu::device::DEFAULT_WATCHDOG;
use vgpu::sched::{Params, Scheduler};
use vgpu::{BarAddresses, DmaDomain, Interrupts, Vgpu, VgpuSetup};
use vgpu_abi::{pci, regs};
use vgpu_server::attach::DmaBudget;
use vgpu_server::session::SessionServer;
use vgpu_session::frame;
use vgpu_session::link::Link;
use vgpu_session::proto::{BufRef, Command, Request, VERSION};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::input::Input;
use crate::rig::{self, VRAM_SIZE, profile};

/// Commands per input at most (a hung job then never fills a ring, so no submission waits
/// long for room).
const MAX_COMMANDS: usize = 256;
/// Longest `Wait` a frame asks for (ms).
const MAX_WAIT_MS: u32 = 20;
/// Largest client memory offered.
const MAX_MEMORY: u64 = 256 << 10;

struct Fixture {
    gpu: Arc<SoftGpu>,
    bystanders: rig::Bystanders,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        gpu: Arc::new(SoftGpu::new(2 * VRAM_SIZE, 1).expect("software GPU")),
        bystanders: rig::Bystanders::new(),
    })
}

/// One frame to send: its bytes and a descriptor to pass with them.
pub struct Frame {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// A memfd sent with them (SCM_RIGHTS).
    pub fd: Option<File>,
}

fn small(input: &mut Input<'_>) -> u64 {
    match input.u8() % 4 {
        0 => u64::from(input.u8()),
        1 => u64::from(input.u16()) * 4,
        2 => u64::from(input.u32()) % (2 * VRAM_SIZE),
        _ => input.u64(),
    }
}

fn bufref(input: &mut Input<'_>) -> BufRef {
    BufRef {
        buffer: match input.u8() % 8 {
            0 => input.u32(),
            n => u32::from(n),
        },
        offset: small(input),
    }
}

fn command(input: &mut Input<'_>) -> Command {
    match input.u8() % 8 {
        0 => Command::Copy {
            src: bufref(input),
            dst: bufref(input),
            len: small(input),
        },
        1 => Command::Fill {
            dst: bufref(input),
            len: small(input),
            value: input.u32(),
        },
        2 => Command::Saxpy {
            n: small(input),
            a: f32::from_bits(input.u32()),
            x: bufref(input),
            y: bufref(input),
        },
        3 => Command::Sgemm {
            m: u64::from(input.u8()),
            n: u64::from(input.u8()),
            k: u64::from(input.u8()),
            a: bufref(input),
            b: bufref(input),
            c: bufref(input),
        },
        4 => Command::ReduceSum {
            n: small(input),
            x: bufref(input),
            out: bufref(input),
        },
        5 => Command::Crc32 {
            len: small(input),
            src: bufref(input),
            out: bufref(input),
        },
        7 => Command::Timestamp { dst: bufref(input) },
        _ => Command::SpinUs {
            us: u64::from(input.u8()),
            groups: u64::from(input.u8() % 4),
        },
    }
}

fn encode(req: &Request) -> Vec<u8> {
    frame::encode(req).expect("requests of bounded size encode")
}

/// Decodes an input into frames.
pub fn decode(input: &mut Input<'_>) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut commands = 0;
    // Most inputs start by saying hello properly, so the rest reaches the requests.
    if !input.u8().is_multiple_of(8) {
        out.push(Frame {
            bytes: encode(&Request::Hello { version: VERSION }),
            fd: None,
        });
    }
    while !input.is_empty() && out.len() < 64 {
        let plain = |bytes| Frame { bytes, fd: None };
        let f = match input.u8() % 16 {
            0 => plain(encode(&Request::Hello {
                version: if input.u8() & 1 == 0 {
                    VERSION
                } else {
                    input.u32()
                },
            })),
            1 => plain(encode(&Request::CreateContext)),
            2 => plain(encode(&Request::AllocVram { size: small(input) })),
            3 => {
                let len = small(input) % (MAX_MEMORY + 1);
                let size = match input.u8() % 4 {
                    0 => small(input),
                    _ => len,
                };
                let fd = match input.u8() % 4 {
                    0 => None,
                    1 => Some(vgpu::backend::memfd("fuzz-client", len, false).expect("memfd")),
                    _ => Some(vgpu::backend::memfd("fuzz-client", len, true).expect("memfd")),
                };
                Frame {
                    bytes: encode(&Request::MapMemory { size }),
                    fd,
                }
            }
            4 => plain(encode(&Request::Free {
                buffer: bufref(input).buffer,
            })),
            5 => {
                let at = bufref(input);
                let n = usize::from(input.u16() % 4096);
                let data = (0..n).map(|_| input.u8()).collect();
                plain(encode(&Request::Write { at, data }))
            }
            6 => plain(encode(&Request::Read {
                at: bufref(input),
                len: small(input) % (1 << 20),
            })),
            7..=9 => {
                let n = usize::from(input.u8() % 4);
                let cmds: Vec<Command> = (0..n).map(|_| command(input)).collect();
                commands += cmds.len();
                if commands > MAX_COMMANDS {
                    break;
                }
                plain(encode(&Request::Submit {
                    ctx: u32::from(input.u8() % 6),
                    commands: cmds,
                }))
            }
            10 => plain(encode(&Request::Wait {
                ctx: u32::from(input.u8() % 6),
                fence: u64::from(input.u8()),
                timeout_ms: input.u32() % (MAX_WAIT_MS + 1),
            })),
            11 => plain(encode(&Request::ResetContext {
                ctx: u32::from(input.u8() % 6),
            })),
            12 => {
                // Bytes that are (most likely) no request, with a correct length.
                let n = usize::from(input.u8());
                let body: Vec<u8> = (0..n).map(|_| input.u8()).collect();
                let mut b = (n as u32).to_le_bytes().to_vec();
                b.extend(body);
                plain(b)
            }
            13 => plain(input.u32().max(1 << 27).to_le_bytes().to_vec()),
            14 => {
                // A frame cut short: the connection ends inside it.
                let mut b = encode(&Request::Read {
                    at: bufref(input),
                    len: 16,
                });
                b.truncate(usize::from(input.u8()) % b.len());
                out.push(plain(b));
                break;
            }
            _ => plain(encode(&Request::Hello { version: VERSION })),
        };
        out.push(f);
    }
    out
}

fn new_vgpu(vram: Arc<SoftVram>) -> Vgpu {
    let f = fixture();
    Vgpu::new(VgpuSetup {
        profile: profile(),
        bars: BarAddresses { regs: 0, vram: 0 },
        sys: vm_memory::GuestMemoryMmap::new(),
        domain: DmaDomain::default(),
        vram,
        backend: f.gpu.clone(),
        interrupts: Interrupts::Msi(Arc::new(vgpu::device::NoMsi)),
        sched: Scheduler::private(),
        sched_params: Params::default(),
        watchdog: DEFAULT_WATCHDOG,
    })
    .expect("vGPU")
}

/// Runs one input end to end and checks the oracles.
pub fn run(data: &[u8]) {
    let f = fixture();
    let frames = decode(&mut Input::new(data));
    let vgpu = new_vgpu(Arc::new(SoftVram::new(VRAM_SIZE).expect("VRAM")));
    let (client, server_side) = UnixStream::pair().expect("socket pair");
    let writer = std::thread::spawn(move || {
        let mut reader = client.try_clone().expect("clone");
        let drain = std::thread::spawn(move || {
            let mut sink = [0u8; 1 << 16];
            while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
        });
        for fr in frames {
            let sent = match &fr.fd {
                Some(fd) => client.send_with_fd(&fr.bytes[..], fd.as_raw_fd()).is_ok(),
                None => (&client).write_all(&fr.bytes).is_ok(),
            };
            if !sent {
                break;
            }
        }
        let _ = client.shutdown(std::net::Shutdown::Write);
        let _ = drain.join();
    });
    let stop = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut server =
        SessionServer::new(&vgpu, "fuzz", "fuzz", Arc::new(DmaBudget::default())).expect("session");
    let mut link = Link::Unix(server_side);
    server.serve(&mut link, &stop);
    drop(server);
    drop(link);
    writer.join().expect("client thread");
    // The device still answers.
    let mut magic = [0u8; 4];
    vgpu.read_bar(pci::BAR_REGS, regs::MAGIC, &mut magic);
    assert_eq!(
        u32::from_le_bytes(magic),
        regs::MAGIC_VALUE,
        "vGPU dead after the input"
    );
    drop(vgpu);
    // Nobody else's memory changed.
    f.bystanders.check();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_seed_decodes_to_a_real_session() {
        let seeds = crate::seeds::session();
        let frames = decode(&mut Input::new(&seeds[0].1));
        let reqs: Vec<Request> = frames
            .iter()
            .map(|f| {
                let len = u32::from_le_bytes(f.bytes[..4].try_into().expect("header")) as usize;
                assert_eq!(len + 4, f.bytes.len());
                postcard::from_bytes(&f.bytes[4..]).expect("a request")
            })
            .collect();
        let kinds: Vec<&str> = reqs
            .iter()
            .map(|r| match r {
                Request::Hello { .. } => "hello",
                Request::CreateContext => "context",
                Request::AllocVram { size: 16384 } => "vram",
                Request::MapMemory { size: 65536 } => "memory",
                Request::Write { .. } => "write",
                Request::Submit { commands, .. } if commands.len() == 3 => "submit",
                Request::Wait { .. } => "wait",
                Request::Read { .. } => "read",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "hello", "context", "vram", "memory", "write", "submit", "wait", "read"
            ]
        );
        assert!(frames[3].fd.is_some(), "the memfd goes with MapMemory");
    }

    #[test]
    fn seeds_and_noise_run() {
        for seed in crate::seeds::session() {
            run(&seed.1);
        }
        run(&[]);
        run(&[0xff; 300]);
    }
}
