//! Operations on a vGPU's Vulkan device: checked extents become (buffer, offset) pairs in its
//! imported VRAM and guest RAM; each group is one submission, so the `RunControl` is asked
//! between them.

use std::ops::Range;
use std::sync::Arc;

use ash::vk;
use vgpu_abi::fault;

use super::device::{VulkanImport, VulkanVram};
use crate::backend::{COPY_GROUP, Launch, Op, RunControl};
use crate::mem::{Extent, Fault, Loc, ScatterList, Spaces};

/// Where an extent lives on the device.
fn locate(spaces: &Spaces, vram: &VulkanVram, e: &Extent) -> Result<(vk::Buffer, u64), Fault> {
    match e.loc {
        Loc::Vram => Ok((vram.buffer.buffer, e.addr)),
        Loc::Sys => spaces
            .import
            .as_deref()
            .and_then(|i| i.downcast_ref::<VulkanImport>())
            .and_then(|i| {
                i.regions
                    .iter()
                    .find(|r| e.addr >= r.start && e.addr + e.len <= r.start + r.len)
            })
            .map(|r| (r.buffer.buffer, e.addr - r.start))
            // Checked against the domain above the seam: only memory that went away gets here.
            .ok_or(Fault::new(fault::DMA_DOMAIN, e.addr)),
    }
}

/// A copy between two buffers.
struct Copy {
    src: vk::Buffer,
    dst: vk::Buffer,
    region: vk::BufferCopy,
}

/// The copies that move bytes `range` of `src` to the same bytes of `dst`.
fn copies(
    spaces: &Spaces,
    vram: &VulkanVram,
    src: &ScatterList,
    dst: &ScatterList,
    range: Range<u64>,
) -> Result<Vec<Copy>, Fault> {
    let mut out = Vec::new();
    src.pieces(range.start, range.end - range.start, |se, s_within, r| {
        let (sb, so) = locate(spaces, vram, se)?;
        let s_at = so + s_within;
        let from = range.start + r.start as u64;
        dst.pieces(from, r.len() as u64, |de, d_within, r2| {
            let (db, doff) = locate(spaces, vram, de)?;
            out.push(Copy {
                src: sb,
                dst: db,
                region: vk::BufferCopy {
                    src_offset: s_at + r2.start as u64,
                    dst_offset: doff + d_within,
                    size: r2.len() as u64,
                },
            });
            Ok(())
        })
    })?;
    Ok(out)
}

/// The fills of bytes `range` of `dst` (4-byte aligned: FILL's rule).
fn fills(
    spaces: &Spaces,
    vram: &VulkanVram,
    dst: &ScatterList,
    range: Range<u64>,
) -> Result<Vec<(vk::Buffer, u64, u64)>, Fault> {
    let mut out = Vec::new();
    dst.pieces(range.start, range.end - range.start, |e, within, r| {
        let (b, off) = locate(spaces, vram, e)?;
        out.push((b, off + within, r.len() as u64));
        Ok(())
    })?;
    Ok(out)
}

struct VkLaunch {
    op: Op,
    spaces: Arc<Spaces>,
}

impl VkLaunch {
    fn vram(&self) -> Result<&VulkanVram, Fault> {
        self.spaces
            .vram
            .as_any()
            .downcast_ref::<VulkanVram>()
            .ok_or(Fault::new(fault::BAD_PACKET, 0))
    }

    /// Runs group `g` as one submission.
    fn group(&self, g: u64) -> Result<(), Fault> {
        let vram = self.vram()?;
        let sp = &*self.spaces;
        match &self.op {
            Op::Copy { src, dst } => {
                let start = g * COPY_GROUP;
                let end = (start + COPY_GROUP).min(src.len());
                let list = copies(sp, vram, src, dst, start..end)?;
                vram.dev.run(|d, cmd| {
                    for c in &list {
                        // SAFETY: recording into this device's command buffer; both buffers
                        // belong to it and the region lies inside them (checked extents).
                        unsafe { d.cmd_copy_buffer(cmd, c.src, c.dst, &[c.region]) };
                    }
                })
            }
            Op::Fill { dst, pattern } => {
                let start = g * COPY_GROUP;
                let end = (start + COPY_GROUP).min(dst.len());
                let list = fills(sp, vram, dst, start..end)?;
                vram.dev.run(|d, cmd| {
                    for &(b, off, len) in &list {
                        // SAFETY: as above; offset and size are multiples of 4 (FILL's rule,
                        // and extents split only at page boundaries).
                        unsafe { d.cmd_fill_buffer(cmd, b, off, len, *pattern) };
                    }
                })
            }
            Op::Dispatch(_) => Err(Fault::new(fault::BAD_OPCODE, 0)),
        }
    }
}

impl Launch for VkLaunch {
    fn run(&mut self, groups: Range<u64>, ctl: Arc<dyn RunControl>) -> Result<u64, Fault> {
        for g in groups.clone() {
            if ctl.stop() {
                return Ok(g);
            }
            let r = self.group(g);
            ctl.group_done();
            r?;
        }
        Ok(groups.end.max(groups.start))
    }

    fn finish(self: Box<Self>) -> Result<(), Fault> {
        Ok(())
    }
}

/// Prepares `op`. Kernels do not run on Vulkan yet: they fault `BAD_OPCODE` (the backend is
/// not offered to users until they do).
pub(super) fn prepare(op: Op, spaces: Arc<Spaces>) -> Result<Box<dyn Launch>, Fault> {
    if matches!(op, Op::Dispatch(_)) {
        return Err(Fault::new(fault::BAD_OPCODE, 0));
    }
    Ok(Box::new(VkLaunch { op, spaces }))
}
