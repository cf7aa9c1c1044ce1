//! The host client of a remote vGPU: [`connect`] attaches a [`HostClient`] to an instance of
//! `tessera serve` over its vfio-user socket.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use vgpu::host::{HostClient, HostError, RegisterPort};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// vfio-user region index of BAR 0.
const BAR0_REGION: u32 = 0;
/// vfio-user region index of BAR 2 (VRAM).
const BAR2_REGION: u32 = 2;

/// BAR 0 of a vGPU instance, reached with vfio-user region messages.
struct Remote(vfu::Client);

impl RegisterPort for Remote {
    fn read(&mut self, off: u64) -> u32 {
        let mut d = [0xffu8; 4];
        // A lost server reads as all-ones, like the spec's lost device.
        if self.0.region_read(BAR0_REGION, off, &mut d).is_err() {
            d = [0xff; 4];
        }
        u32::from_le_bytes(d)
    }

    fn write(&mut self, off: u64, v: u32) {
        let _ = self.0.region_write(BAR0_REGION, off, &v.to_le_bytes());
    }
}

fn mem_err(e: impl std::fmt::Display) -> HostError {
    HostError::Memory(e.to_string())
}

/// A client of the vGPU instance served on `socket` (by `tessera serve`), with `sys_size`
/// bytes of memory in a memfd that the server maps with DMA_MAP. `sealed`: sealed against
/// shrinking and growing, as Tessera's VMM seals guest RAM (Cloud Hypervisor's is not).
pub fn connect(socket: &Path, sys_size: u64, sealed: bool) -> Result<HostClient, HostError> {
    let file =
        Arc::new(vgpu::backend::memfd("tessera-host-client", sys_size, sealed).map_err(mem_err)?);
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        sys_size as usize,
        Some(FileOffset::from_arc(file.clone(), 0)),
    )])
    .map_err(mem_err)?;
    let mut client = vfu::Client::new(socket)
        .map_err(|e| HostError::Connect(format!("{}: {e}", socket.display())))?;
    let vram_size = client
        .region(BAR2_REGION)
        .map(|r| r.size)
        .filter(|&s| s > 0)
        .ok_or_else(|| HostError::Connect("the server offers no VRAM region".into()))?;
    client
        .dma_map(0, 0, sys_size, file.as_raw_fd())
        .map_err(|e| HostError::Connect(format!("DMA_MAP: {e}")))?;
    HostClient::start(
        Box::new(Remote(client)),
        mem,
        Some(file),
        sys_size,
        vram_size,
    )
}
