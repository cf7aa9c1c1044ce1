//! Command packets, decoded and checked once into typed commands.

use vgpu_abi::{Packet, fault, kernel, limits, packet};

/// A built-in kernel with checked arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kernel {
    /// `y = a·x + y` over `n` f32.
    Saxpy {
        /// Elements.
        n: u64,
        /// Scale.
        a: f32,
        /// x buffer VA.
        x: u64,
        /// y buffer VA.
        y: u64,
    },
    /// `C = A·B`, row-major f32.
    Sgemm {
        /// Rows of A and C.
        m: u64,
        /// Columns of B and C.
        n: u64,
        /// Columns of A, rows of B.
        k: u64,
        /// A VA.
        a: u64,
        /// B VA.
        b: u64,
        /// C VA.
        c: u64,
    },
    /// Wrapping u64 sum of `n` u32.
    ReduceSum {
        /// Elements.
        n: u64,
        /// Input VA.
        x: u64,
        /// Output VA (u64).
        out: u64,
    },
    /// CRC-32 of `len` bytes.
    Crc32 {
        /// Bytes.
        len: u64,
        /// Input VA.
        src: u64,
        /// Output VA (u32).
        out: u64,
    },
    /// Spin `us` microseconds in each of `groups` workgroups.
    SpinUs {
        /// Microseconds per workgroup.
        us: u64,
        /// Workgroups.
        groups: u64,
    },
}

/// A command, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    /// Nothing.
    Nop,
    /// Copy `len` bytes.
    Copy {
        /// Source VA.
        src: u64,
        /// Destination VA.
        dst: u64,
        /// Bytes.
        len: u64,
    },
    /// Fill with a 32-bit pattern.
    Fill {
        /// Destination VA.
        dst: u64,
        /// Bytes (multiple of 4).
        len: u64,
        /// Pattern.
        pattern: u32,
    },
    /// Run a kernel.
    Dispatch(Kernel),
    /// Signal a fence.
    Fence {
        /// VA of the u64 to write.
        va: u64,
        /// Value.
        value: u64,
        /// Raise the context's interrupt.
        irq: bool,
    },
    /// Write the GPU time.
    Timestamp {
        /// VA of the u64 to write.
        va: u64,
    },
}

fn bad() -> u32 {
    fault::BAD_PACKET
}

/// Requires the argument words past those `p`'s command uses ([`packet::args_used`]) to be
/// zero.
fn unused_zero(p: &Packet) -> Result<(), u32> {
    let used = packet::args_used(p.opcode, p.flags).ok_or_else(bad)?;
    if p.args[used..].iter().all(|&a| a == 0) {
        Ok(())
    } else {
        Err(bad())
    }
}

fn aligned(va: u64, align: u64) -> Result<(), u32> {
    if va.is_multiple_of(align) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `count` elements of `size` bytes, at most `MAX_TRANSFER` bytes in all.
fn bytes(count: u64, size: u64) -> Result<u64, u32> {
    count
        .checked_mul(size)
        .filter(|&b| b <= limits::MAX_TRANSFER)
        .ok_or_else(bad)
}

impl Command {
    /// Decodes and checks `p`; the error is a `vgpu_abi::fault` code.
    pub fn decode(p: &Packet) -> Result<Command, u32> {
        let a = p.args;
        let no_flags = || if p.flags == 0 { Ok(()) } else { Err(bad()) };
        match p.opcode {
            packet::OP_NOP => {
                no_flags()?;
                unused_zero(p)?;
                Ok(Command::Nop)
            }
            packet::OP_COPY => {
                no_flags()?;
                unused_zero(p)?;
                bytes(a[2], 1)?;
                Ok(Command::Copy {
                    src: a[0],
                    dst: a[1],
                    len: a[2],
                })
            }
            packet::OP_FILL => {
                no_flags()?;
                unused_zero(p)?;
                bytes(a[1], 1)?;
                aligned(a[0], 4)?;
                aligned(a[1], 4)?;
                let pattern = u32::try_from(a[2]).map_err(|_| bad())?;
                Ok(Command::Fill {
                    dst: a[0],
                    len: a[1],
                    pattern,
                })
            }
            packet::OP_FENCE => {
                if p.flags & !packet::FENCE_IRQ != 0 {
                    return Err(bad());
                }
                unused_zero(p)?;
                aligned(a[0], 8)?;
                Ok(Command::Fence {
                    va: a[0],
                    value: a[1],
                    irq: p.flags & packet::FENCE_IRQ != 0,
                })
            }
            packet::OP_TIMESTAMP => {
                no_flags()?;
                unused_zero(p)?;
                aligned(a[0], 8)?;
                Ok(Command::Timestamp { va: a[0] })
            }
            packet::OP_DISPATCH => Ok(Command::Dispatch(decode_kernel(p)?)),
            _ => Err(fault::BAD_OPCODE),
        }
    }
}

fn decode_kernel(p: &Packet) -> Result<Kernel, u32> {
    let a = p.args;
    match p.flags {
        kernel::SAXPY => {
            unused_zero(p)?;
            bytes(a[0], 4)?;
            let f = u32::try_from(a[1]).map_err(|_| bad())?;
            aligned(a[2], 4)?;
            aligned(a[3], 4)?;
            Ok(Kernel::Saxpy {
                n: a[0],
                a: f32::from_bits(f),
                x: a[2],
                y: a[3],
            })
        }
        kernel::SGEMM => {
            unused_zero(p)?;
            let dims = [a[0], a[1], a[2]];
            if dims.iter().any(|&d| d == 0 || d > limits::MAX_SGEMM_DIM) {
                return Err(bad());
            }
            for va in [a[3], a[4], a[5]] {
                aligned(va, 4)?;
            }
            Ok(Kernel::Sgemm {
                m: a[0],
                n: a[1],
                k: a[2],
                a: a[3],
                b: a[4],
                c: a[5],
            })
        }
        kernel::REDUCE_SUM => {
            unused_zero(p)?;
            bytes(a[0], 4)?;
            aligned(a[1], 4)?;
            aligned(a[2], 8)?;
            Ok(Kernel::ReduceSum {
                n: a[0],
                x: a[1],
                out: a[2],
            })
        }
        kernel::CRC32 => {
            unused_zero(p)?;
            bytes(a[0], 1)?;
            aligned(a[2], 4)?;
            Ok(Kernel::Crc32 {
                len: a[0],
                src: a[1],
                out: a[2],
            })
        }
        kernel::SPIN_US => {
            unused_zero(p)?;
            if a[0] > limits::MAX_SPIN_US || a[1] == 0 || a[1] > limits::MAX_SPIN_GROUPS {
                return Err(bad());
            }
            Ok(Kernel::SpinUs {
                us: a[0],
                groups: a[1],
            })
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_command() {
        assert_eq!(
            Command::decode(&Packet::new(packet::OP_NOP, 0, &[])),
            Ok(Command::Nop)
        );
        assert_eq!(
            Command::decode(&Packet::new(packet::OP_COPY, 0, &[1, 2, 3])),
            Ok(Command::Copy {
                src: 1,
                dst: 2,
                len: 3
            })
        );
        assert_eq!(
            Command::decode(&Packet::new(packet::OP_FILL, 0, &[4, 8, 0xdead_beef])),
            Ok(Command::Fill {
                dst: 4,
                len: 8,
                pattern: 0xdead_beef
            })
        );
        assert_eq!(
            Command::decode(&Packet::new(packet::OP_FENCE, packet::FENCE_IRQ, &[8, 42])),
            Ok(Command::Fence {
                va: 8,
                value: 42,
                irq: true
            })
        );
        assert_eq!(
            Command::decode(&Packet::new(packet::OP_TIMESTAMP, 0, &[16])),
            Ok(Command::Timestamp { va: 16 })
        );
        let two = 2.0f32.to_bits() as u64;
        assert_eq!(
            Command::decode(&Packet::new(
                packet::OP_DISPATCH,
                kernel::SAXPY,
                &[10, two, 0, 64]
            )),
            Ok(Command::Dispatch(Kernel::Saxpy {
                n: 10,
                a: 2.0,
                x: 0,
                y: 64
            }))
        );
        assert!(
            Command::decode(&Packet::new(
                packet::OP_DISPATCH,
                kernel::SGEMM,
                &[2, 2, 2, 0, 16, 32]
            ))
            .is_ok()
        );
        assert!(
            Command::decode(&Packet::new(
                packet::OP_DISPATCH,
                kernel::REDUCE_SUM,
                &[4, 0, 8]
            ))
            .is_ok()
        );
        assert!(
            Command::decode(&Packet::new(packet::OP_DISPATCH, kernel::CRC32, &[9, 1, 4])).is_ok()
        );
        assert!(
            Command::decode(&Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[10, 2])).is_ok()
        );
    }

    #[test]
    fn rejects_malformed_packets() {
        assert_eq!(
            Command::decode(&Packet::new(0x77, 0, &[])),
            Err(fault::BAD_OPCODE)
        );
        for p in [
            Packet::new(packet::OP_NOP, 1, &[]),
            Packet::new(packet::OP_NOP, 0, &[0, 0, 0, 0, 0, 0, 1]),
            Packet::new(packet::OP_COPY, 0, &[0, 0, limits::MAX_TRANSFER + 1]),
            Packet::new(packet::OP_COPY, 0, &[0, 0, 1, 9]),
            Packet::new(packet::OP_FILL, 0, &[2, 8, 0]),
            Packet::new(packet::OP_FILL, 0, &[0, 6, 0]),
            Packet::new(packet::OP_FILL, 0, &[0, 8, 1 << 32]),
            Packet::new(packet::OP_FENCE, 2, &[0, 1]),
            Packet::new(packet::OP_FENCE, 0, &[4, 1]),
            Packet::new(packet::OP_TIMESTAMP, 0, &[12]),
            Packet::new(packet::OP_DISPATCH, 99, &[]),
            Packet::new(packet::OP_DISPATCH, kernel::SAXPY, &[u64::MAX, 0, 0, 0]),
            Packet::new(packet::OP_DISPATCH, kernel::SAXPY, &[1, 1 << 32, 0, 0]),
            Packet::new(packet::OP_DISPATCH, kernel::SAXPY, &[1, 0, 2, 0]),
            Packet::new(packet::OP_DISPATCH, kernel::SGEMM, &[0, 1, 1, 0, 0, 0]),
            Packet::new(
                packet::OP_DISPATCH,
                kernel::SGEMM,
                &[limits::MAX_SGEMM_DIM + 1, 1, 1, 0, 0, 0],
            ),
            Packet::new(packet::OP_DISPATCH, kernel::REDUCE_SUM, &[1, 0, 4]),
            Packet::new(packet::OP_DISPATCH, kernel::CRC32, &[1, 0, 2]),
            Packet::new(
                packet::OP_DISPATCH,
                kernel::SPIN_US,
                &[limits::MAX_SPIN_US + 1, 1],
            ),
            Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[1, 0]),
        ] {
            assert_eq!(Command::decode(&p), Err(fault::BAD_PACKET), "{p:?}");
        }
    }
}
