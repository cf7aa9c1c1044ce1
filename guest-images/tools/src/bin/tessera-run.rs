//! `tessera-run`: runs jobs on a vGPU and checks every result against the CPU.
//!
//! ```text
//! tessera-run [-d N] [--sysmem] [JOB...]
//!   JOB: saxpy | sgemm | reduce | crc32 | copy | fill | fault | all (default: all)
//!   --sysmem   buffers in guest RAM instead of VRAM
//! ```
//! One line per job, `tessera-run: <job> ok (...)` or `tessera-run: <job> FAIL: ...`.
//! `fault` submits a job that reads an unmapped address: the wait must fail with EIO, the
//! context must report a not-present fault at that address, and after recovery it works.
//! Exit status: 0 when every job passed, 1 otherwise, 2 on bad usage.

use std::process::ExitCode;
use std::time::Instant;

use tessera_guest_tools::reference as cpu;
use tessera_guest_tools::{Device, Placement, STATE_FAULTED, fault, fault_name, pkt};

type Outcome = Result<String, String>;

fn err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn f32s_to_u32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn saxpy(d: &Device, place: Placement) -> Outcome {
    let n = 1usize << 16;
    let a = 1.5f32;
    let x = cpu::floats(1, n);
    let mut y = cpu::floats(2, n);
    let mut bx = d
        .buffer((n * 4) as u64, place, false)
        .map_err(err("x buffer"))?;
    let mut by = d
        .buffer((n * 4) as u64, place, true)
        .map_err(err("y buffer"))?;
    bx.write_u32s(0, &f32s_to_u32(&x));
    by.write_u32s(0, &f32s_to_u32(&y));
    d.run(&[pkt::saxpy(n as u64, a, bx.va(), by.va())])
        .map_err(err("saxpy"))?;
    cpu::saxpy(a, &x, &mut y);
    let got = by.read_u32s(0, n);
    match got.iter().zip(f32s_to_u32(&y)).position(|(g, w)| *g != w) {
        None => Ok(format!("n={n}")),
        Some(i) => Err(format!(
            "y[{i}] = {} , CPU says {}",
            f32::from_bits(got[i]),
            y[i]
        )),
    }
}

fn sgemm(d: &Device, place: Placement) -> Outcome {
    let (m, n, k) = (64usize, 48usize, 32usize);
    let a = cpu::floats(3, m * k);
    let b = cpu::floats(4, k * n);
    let mut ba = d
        .buffer((m * k * 4) as u64, place, false)
        .map_err(err("A buffer"))?;
    let mut bb = d
        .buffer((k * n * 4) as u64, place, false)
        .map_err(err("B buffer"))?;
    let bc = d
        .buffer((m * n * 4) as u64, place, true)
        .map_err(err("C buffer"))?;
    ba.write_u32s(0, &f32s_to_u32(&a));
    bb.write_u32s(0, &f32s_to_u32(&b));
    d.run(&[pkt::sgemm(
        m as u64,
        n as u64,
        k as u64,
        ba.va(),
        bb.va(),
        bc.va(),
    )])
    .map_err(err("sgemm"))?;
    let want = f32s_to_u32(&cpu::sgemm(m, n, k, &a, &b));
    let got = bc.read_u32s(0, m * n);
    match got.iter().zip(&want).position(|(g, w)| g != w) {
        None => Ok(format!("{m}x{k} * {k}x{n}")),
        Some(i) => Err(format!(
            "C[{}][{}] = {}, CPU says {}",
            i / n,
            i % n,
            f32::from_bits(got[i]),
            f32::from_bits(want[i])
        )),
    }
}

fn reduce(d: &Device, place: Placement) -> Outcome {
    let n = 1usize << 17;
    let x = cpu::xorshift(5, n);
    let mut bx = d
        .buffer((n * 4) as u64, place, false)
        .map_err(err("x buffer"))?;
    let out = d.buffer(4096, place, true).map_err(err("out buffer"))?;
    bx.write_u32s(0, &x);
    d.run(&[pkt::reduce_sum(n as u64, bx.va(), out.va())])
        .map_err(err("reduce_sum"))?;
    let mut b = [0u8; 8];
    out.read(0, &mut b);
    let (got, want) = (u64::from_le_bytes(b), cpu::reduce_sum(&x));
    if got == want {
        Ok(format!("n={n}"))
    } else {
        Err(format!("sum {got:#x}, CPU says {want:#x}"))
    }
}

fn crc32(d: &Device, place: Placement) -> Outcome {
    let len = 256usize << 10;
    let data: Vec<u8> = cpu::xorshift(6, len / 4)
        .into_iter()
        .flat_map(u32::to_le_bytes)
        .collect();
    let mut src = d
        .buffer(len as u64, place, false)
        .map_err(err("source buffer"))?;
    let out = d.buffer(4096, place, true).map_err(err("out buffer"))?;
    src.write(0, &data);
    d.run(&[pkt::crc32(len as u64, src.va(), out.va())])
        .map_err(err("crc32"))?;
    let got = out.read_u32s(0, 1)[0];
    let want = cpu::crc32(&data);
    if got == want {
        Ok(format!("{} KiB, {got:#010x}", len >> 10))
    } else {
        Err(format!("crc {got:#010x}, CPU says {want:#010x}"))
    }
}

/// A COPY from guest RAM into a buffer of `place` (read back through its CPU mapping: for
/// VRAM, the driver's mmap of the aperture), then one at odd offsets and an odd length inside
/// `place`, whose neighbouring bytes must not change.
fn copy(d: &Device, place: Placement) -> Outcome {
    let len = 256usize << 10;
    let (src_off, dst_off, odd) = (3usize, 5usize, 100_003usize);
    let data: Vec<u8> = cpu::xorshift(7, len / 4)
        .into_iter()
        .flat_map(u32::to_le_bytes)
        .collect();
    let mut src = d
        .buffer(len as u64, Placement::Sysmem, false)
        .map_err(err("source buffer"))?;
    let mid = d
        .buffer(len as u64, place, true)
        .map_err(err("middle buffer"))?;
    let mut dst = d
        .buffer(len as u64, place, true)
        .map_err(err("destination buffer"))?;
    src.write(0, &data);
    dst.write(0, &vec![0x5a; len]);
    d.run(&[pkt::copy(src.va(), mid.va(), len as u64)])
        .map_err(err("copy"))?;
    let mut got = vec![0u8; len];
    mid.read(0, &mut got);
    if got != data {
        return Err("the destination does not hold the source".into());
    }
    d.run(&[pkt::copy(
        mid.va() + src_off as u64,
        dst.va() + dst_off as u64,
        odd as u64,
    )])
    .map_err(err("copy at odd offsets"))?;
    let mut want = vec![0x5a; len];
    want[dst_off..dst_off + odd].copy_from_slice(&data[src_off..src_off + odd]);
    dst.read(0, &mut got);
    match got.iter().zip(&want).position(|(g, w)| g != w) {
        None => Ok(format!(
            "{} KiB, then {odd} bytes at odd offsets",
            len >> 10
        )),
        Some(i) => Err(format!(
            "byte {i} is {:#04x} after the odd copy, expected {:#04x}",
            got[i], want[i]
        )),
    }
}

/// A FILL of a range inside a buffer: the range holds the pattern, its neighbours keep
/// what the CPU wrote.
fn fill(d: &Device, place: Placement) -> Outcome {
    let words = 64usize << 10;
    let (first, count, pattern) = (3usize, words - 7, 0xc0ff_ee11u32);
    let mut b = d
        .buffer((words * 4) as u64, place, true)
        .map_err(err("buffer"))?;
    let before: Vec<u32> = (0..words as u32).collect();
    b.write_u32s(0, &before);
    d.run(&[pkt::fill(
        b.va() + (first * 4) as u64,
        (count * 4) as u64,
        pattern,
    )])
    .map_err(err("fill"))?;
    let got = b.read_u32s(0, words);
    let want = |i: usize| {
        if (first..first + count).contains(&i) {
            pattern
        } else {
            before[i]
        }
    };
    match (0..words).find(|&i| got[i] != want(i)) {
        None => Ok(format!("{count} words of {pattern:#x}")),
        Some(i) => Err(format!(
            "word {i} is {:#x}, expected {:#x}",
            got[i],
            want(i)
        )),
    }
}

fn fault_job(d: &Device, place: Placement) -> Outcome {
    let buf = d.buffer(4096, place, true).map_err(err("buffer"))?;
    // The page after a buffer is never mapped (the driver leaves a guard page).
    let bad = buf.va() + buf.size();
    let s = d
        .submit(&[pkt::copy(bad, buf.va(), 64)])
        .map_err(err("submit"))?;
    match d.wait(s, 10_000_000_000) {
        Err(e) if e.raw_os_error() == Some(EIO) => {}
        other => {
            return Err(format!(
                "faulting job: wait returned {other:?}, expected EIO"
            ));
        }
    }
    let st = d.ctx_state().map_err(err("state"))?;
    if st.flags & STATE_FAULTED == 0 || st.fault_code != fault::NOT_PRESENT || st.fault_addr != bad
    {
        return Err(format!(
            "context state {st:?}, expected a not-present fault at {bad:#x}"
        ));
    }
    d.recover().map_err(err("recover"))?;
    d.run(&[pkt::fill(buf.va(), 64, 0x600d)])
        .map_err(err("after recovery"))?;
    if buf.read_u32s(0, 1)[0] != 0x600d {
        return Err("fill after recovery did not land".into());
    }
    Ok(format!(
        "{} at {bad:#x}, recovered",
        fault_name(st.fault_code)
    ))
}

/// errno EIO: the context stopped on a fault.
const EIO: i32 = 5;

type Job = fn(&Device, Placement) -> Outcome;

const JOBS: &[(&str, Job)] = &[
    ("saxpy", saxpy),
    ("sgemm", sgemm),
    ("reduce", reduce),
    ("crc32", crc32),
    ("copy", copy),
    ("fill", fill),
    ("fault", fault_job),
];

/// `tessera-run --help`.
const USAGE: &str = "usage: tessera-run [-d|--device N] [--sysmem] [saxpy|sgemm|reduce|crc32|copy|fill|fault|all]...
Runs the built-in kernels on /dev/tessera/vgpuN (default 0), or on the device TESSERA_DEVICE
names (unix:PATH, tls://HOST:PORT/INSTANCE), through libtessera and checks their results on
the CPU; buffers in VRAM, or in system memory with --sysmem. No job: all.
Exit status: 0 when every job passed, 1 otherwise, 2 on bad usage.";

/// What the command line asks for.
struct Args {
    device: usize,
    place: Placement,
    jobs: Vec<&'static str>,
}

/// Reads the command line; `None`: only the usage (`--help`).
fn parse_args() -> Result<Option<Args>, lexopt::Error> {
    use lexopt::prelude::*;
    let (mut device, mut place, mut jobs) = (0usize, Placement::Vram, Vec::new());
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Short('d') | Long("device") => device = p.value()?.parse()?,
            Long("sysmem") => place = Placement::Sysmem,
            Short('h') | Long("help") => return Ok(None),
            Value(v) => {
                let v = v.string()?;
                if v == "all" {
                    jobs.extend(JOBS.iter().map(|(n, _)| *n));
                } else if let Some((n, _)) = JOBS.iter().find(|(n, _)| *n == v) {
                    jobs.push(*n);
                } else {
                    return Err(format!("unknown job {v:?}").into());
                }
            }
            _ => return Err(arg.unexpected()),
        }
    }
    if jobs.is_empty() {
        jobs.extend(JOBS.iter().map(|(n, _)| *n));
    }
    Ok(Some(Args {
        device,
        place,
        jobs,
    }))
}

fn main() -> ExitCode {
    let Args {
        device,
        place,
        jobs,
    } = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("tessera-run: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let dev = match Device::open(device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tessera-run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    for name in jobs {
        let Some((_, job)) = JOBS.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let t = Instant::now();
        match job(&dev, place) {
            Ok(what) => println!(
                "tessera-run: {name} ok ({what}, {:.1} ms)",
                t.elapsed().as_secs_f64() * 1e3
            ),
            Err(why) => {
                println!("tessera-run: {name} FAIL: {why}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
