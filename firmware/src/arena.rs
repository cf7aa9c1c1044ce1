//! A bump allocator over a range of addresses (guest RAM or VRAM offsets)
//! with marks to give everything back between conformance cases.

/// Allocates aligned blocks from `[next, end)`.
#[derive(Clone, Copy, Debug)]
pub struct Arena {
    start: u64,
    next: u64,
    end: u64,
}

impl Arena {
    /// An arena over `[start, end)`.
    pub const fn new(start: u64, end: u64) -> Self {
        Self {
            start,
            next: start,
            end,
        }
    }

    /// `size` bytes aligned to `align` (a power of two), or `None` if full.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let at = self.next.checked_add(align - 1)? & !(align - 1);
        let end = at.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(at)
    }

    /// The current allocation point, for [`Arena::release`].
    pub fn mark(&self) -> u64 {
        self.next
    }

    /// Free everything allocated since `mark`.
    pub fn release(&mut self, mark: u64) {
        self.next = mark.clamp(self.start, self.end);
    }

    /// Bytes left (ignoring alignment).
    pub fn free(&self) -> u64 {
        self.end - self.next
    }
}
