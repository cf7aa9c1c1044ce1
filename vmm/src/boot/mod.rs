//! Putting a kernel, its command line, an initramfs and the platform tables into guest memory.
//!
//! A kernel is tried as a PVH ELF first (linux-loader's ELF loader reports the PVH entry note)
//! and as a bzImage otherwise; the result says how the boot vCPU must start.

pub mod mptable;

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{
    BIOS_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, MPTABLE_START, ram_ranges,
};

/// Where the PVH start info goes.
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH module list goes (after the start info).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// Where the PVH memory map goes.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Where the Linux zero page (boot_params) goes for bzImage boots.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line we accept (including the NUL).
pub const CMDLINE_MAX: usize = 4096;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// A bzImage's 64-bit entry point is 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Boot errors: each names what is wrong with the user's files.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Neither an ELF nor a bzImage.
    #[error("{0} is not a kernel (neither a PVH ELF nor a bzImage)")]
    NotAKernel(String),
    /// An ELF file without a PVH entry note.
    #[error("{0} is an ELF file without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry(String),
    /// The loader rejected the image (truncated, bad headers, does not fit).
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// Kernel path.
        path: String,
        /// What linux-loader said.
        #[source]
        source: loader::Error,
    },
    /// Reading the kernel file failed.
    #[error("cannot read kernel {path}")]
    Read {
        /// Kernel path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The command line is too long or has invalid characters.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot place the kernel command line")]
    CmdlineWrite(#[source] loader::Error),
    /// The initramfs does not fit between the kernel and the end of low memory.
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel (ends at {kernel_end:#x}); give the VM more memory"
    )]
    InitramfsTooLarge {
        /// Path.
        path: String,
        /// Its size.
        size: u64,
        /// Highest address it may end at.
        limit: u64,
        /// Where the kernel ends.
        kernel_end: u64,
    },
    /// Reading the initramfs failed.
    #[error("cannot read initramfs {path}")]
    InitramfsRead {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing boot parameters failed.
    #[error("cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// A guest-memory access failed.
    #[error("cannot write guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// How the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = start info.
    Pvh {
        /// Entry point.
        entry: u64,
        /// Start-info address.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode on identity page tables, `%rsi` = zero page.
    Linux64 {
        /// Entry point.
        entry: u64,
        /// Zero-page address.
        zero_page: u64,
    },
}

/// What to boot.
#[derive(Debug)]
pub struct BootSources<'a> {
    /// Kernel file and its path (for messages).
    pub kernel: (&'a mut File, &'a str),
    /// Optional initramfs and its path.
    pub initramfs: Option<(&'a mut File, &'a str)>,
    /// Kernel command line.
    pub cmdline: &'a str,
}

/// The e820 map for `ram_size` bytes of RAM.
pub fn e820_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
        (BIOS_START, HIMEM_START - BIOS_START, E820_RESERVED),
    ];
    for (base, size) in ram_ranges(ram_size) {
        let start = base.max(HIMEM_START);
        if base + size > start {
            map.push((start, base + size - start, E820_RAM));
        }
    }
    map
}

/// Loads everything and returns how to start the boot vCPU.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    ncpus: u8,
    src: BootSources<'_>,
) -> Result<BootEntry, BootError> {
    let (kernel, kpath) = src.kernel;
    let cmdline = Cmdline::try_from(src.cmdline, CMDLINE_MAX).map_err(BootError::Cmdline)?;
    let himem = Some(GuestAddress(HIMEM_START));
    let read_err = |source| BootError::Read {
        path: kpath.to_string(),
        source,
    };
    let load_err = |source| BootError::Load {
        path: kpath.to_string(),
        source,
    };

    let elf = Elf::load(mem, None, kernel, himem);
    let (result, pvh) = match elf {
        Ok(r) => match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => (r, Some(entry)),
            _ => return Err(BootError::NoPvhEntry(kpath.to_string())),
        },
        Err(loader::Error::Elf(
            loader::elf::Error::InvalidElfMagicNumber | loader::elf::Error::ReadElfHeader,
        )) => {
            kernel.seek(SeekFrom::Start(0)).map_err(read_err)?;
            match BzImage::load(mem, None, kernel, himem) {
                Ok(r) => (r, None),
                Err(loader::Error::Bzimage(
                    loader::bzimage::Error::InvalidBzImage
                    | loader::bzimage::Error::ReadBzImageHeader,
                )) => return Err(BootError::NotAKernel(kpath.to_string())),
                Err(e) => return Err(load_err(e)),
            }
        }
        Err(e) => return Err(load_err(e)),
    };
    let kernel_end = result.kernel_load.raw_value() + result.kernel_end;

    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(BootError::CmdlineWrite)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();

    let initrd = match src.initramfs {
        Some((file, path)) => {
            let limit = ram_size.min(MMIO_GAP_START);
            Some(load_initramfs(
                mem,
                file,
                path,
                kernel_end.max(HIMEM_START),
                limit,
            )?)
        }
        None => None,
    };

    mptable::write(mem, MPTABLE_START, ncpus)?;
    let e820 = e820_map(ram_size);

    match pvh {
        Some(entry) => {
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                    addr,
                    size,
                    type_,
                    reserved: 0,
                })
                .collect();
            let mut params;
            if let Some((addr, size)) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
                params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
                params.set_modules(
                    &[hvm_modlist_entry {
                        paddr: addr,
                        size,
                        ..Default::default()
                    }],
                    GuestAddress(PVH_MODLIST_START),
                );
            } else {
                params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            }
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)?;
            Ok(BootEntry::Pvh {
                entry: entry.raw_value(),
                start_info: PVH_INFO_START,
            })
        }
        None => {
            let mut bp = boot_params::default();
            if let Some(hdr) = result.setup_header {
                bp.hdr = hdr;
            }
            bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            bp.hdr.header = KERNEL_HDR_MAGIC;
            bp.hdr.cmd_line_ptr = CMDLINE_START as u32;
            bp.hdr.cmdline_size = cmdline_len as u32;
            bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            if let Some((addr, size)) = initrd {
                bp.hdr.ramdisk_image = addr as u32;
                bp.hdr.ramdisk_size = size as u32;
            }
            for (slot, &(addr, size, type_)) in bp.e820_table.iter_mut().zip(&e820) {
                *slot = boot_e820_entry {
                    addr,
                    size,
                    r#type: type_,
                };
            }
            bp.e820_entries = e820.len() as u8;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&bp, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
            .map_err(BootError::BootParams)?;
            Ok(BootEntry::Linux64 {
                entry: result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                zero_page: ZERO_PAGE_START,
            })
        }
    }
}

/// Places the initramfs page-aligned as high as possible below `limit`, above `kernel_end`.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &str,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::InitramfsRead {
        path: path.to_string(),
        source,
    };
    let size = file.metadata().map_err(read_err)?.len();
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_string(),
        size,
        limit,
        kernel_end,
    };
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or_else(too_large)?;
    if addr + size > MMIO_GAP_END {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(BootError::Memory)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_bios() {
        let m = e820_map(64 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert!(m.contains(&(BIOS_START, 0x1_0000, E820_RESERVED)));
        assert_eq!(
            *m.last().unwrap(),
            (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM)
        );
        let big = e820_map(5 << 30);
        assert_eq!(*big.last().unwrap(), (MMIO_GAP_END, 2 << 30, E820_RAM));
    }
}
