//! `tessera-smi`: the vGPUs of this guest, their memory, contexts and faults.
//!
//! ```text
//! tessera-smi            every /dev/tessera/vgpu<N> (or the device TESSERA_DEVICE names)
//! tessera-smi -d N       only vgpu<N>
//! ```
//! Exit status: 0, or 1 when there is no vGPU or one cannot be queried.

use std::process::ExitCode;

use tessera_guest_tools::{Device, IOCTL_VERSION, count, device_name};
use vgpu_abi::{caps, kernel};

fn names(bits: u32, table: &[(u32, &str)]) -> String {
    let v: Vec<&str> = table
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(" ")
    }
}

fn show(index: usize) -> Result<(), String> {
    let name = device_name(index);
    let dev = Device::open(index).map_err(|e| e.to_string())?;
    let i = dev.info().map_err(|e| format!("{name}: info: {e}"))?;
    if i.ioctl_version != IOCTL_VERSION {
        return Err(format!(
            "{name}: driver speaks ioctl version {}, this tool {IOCTL_VERSION}",
            i.ioctl_version
        ));
    }
    let mib = |b: u64| b >> 20;
    if !name.starts_with('/') {
        // A GPU session: no PCI function here.
        println!(
            "{name}  Tessera vGPU ABI {}.{}  (session)",
            i.abi_version >> 16,
            i.abi_version & 0xffff
        );
    } else {
        println!(
            "vgpu{index}  {:04x}:{:02x}:{:02x}.{}  Tessera vGPU ABI {}.{}  profile {}",
            i.pci_domain,
            i.pci_bus,
            i.pci_devfn >> 3,
            i.pci_devfn & 7,
            i.abi_version >> 16,
            i.abi_version & 0xffff,
            i.subsystem_id
        );
    }
    println!(
        "  vram      {} MiB total, {} MiB free",
        mib(i.vram_size),
        mib(i.vram_free)
    );
    println!(
        "  contexts  {}/{} in use, rings of {} packets, {} MSI-X vectors",
        i.contexts_in_use, i.num_contexts, i.ring_entries, i.msix_vectors
    );
    println!("  faults    {} since reset", i.fault_count);
    println!(
        "  caps      {}",
        names(
            i.caps,
            &[
                (caps::HUGE_PAGES, "huge-pages"),
                (caps::SYSMEM, "sysmem"),
                (caps::TIMESTAMPS, "timestamps"),
                (caps::WAIT, "wait"),
                (caps::TAIL_SHADOW, "tail-shadow"),
            ]
        )
    );
    println!(
        "  kernels   {}",
        names(
            i.kernels,
            &[
                (1 << kernel::SAXPY, "saxpy"),
                (1 << kernel::SGEMM, "sgemm"),
                (1 << kernel::REDUCE_SUM, "reduce_sum"),
                (1 << kernel::CRC32, "crc32"),
                (1 << kernel::SPIN_US, "spin_us"),
            ]
        )
    );
    Ok(())
}

/// `tessera-smi --help`.
const USAGE: &str = "usage: tessera-smi [-d|--device N]
Lists the vGPUs (/dev/tessera/vgpuN, or the device TESSERA_DEVICE names: unix:PATH,
tls://HOST:PORT/INSTANCE): identity, VRAM, contexts, kernels, faults; -d N: one.
Exit status: 0, 1 when a vGPU cannot be read, 2 on bad usage.";

/// The one device asked for (`Some(None)`: all; `None`: only the usage, `--help`).
fn parse_args() -> Result<Option<Option<usize>>, lexopt::Error> {
    use lexopt::prelude::*;
    let mut only = None;
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Short('d') | Long("device") => only = Some(p.value()?.parse()?),
            Short('h') | Long("help") => return Ok(None),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Some(only))
}

fn main() -> ExitCode {
    let only = match parse_args() {
        Ok(Some(only)) => only,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("tessera-smi: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let n = count();
    if n == 0 && only.is_none() {
        eprintln!("tessera-smi: no vGPU (/dev/tessera/vgpu0 missing: is tessera_vgpu loaded?)");
        return ExitCode::FAILURE;
    }
    let mut ok = true;
    for index in only.map_or(0..n, |d| d..d + 1) {
        if let Err(e) = show(index) {
            eprintln!("tessera-smi: {e}");
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
