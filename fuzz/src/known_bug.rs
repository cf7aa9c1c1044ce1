//! Bugs found by these targets and not fixed yet. Each gets a reproducer in
//! `tests/tests/isolation.rs` (marked `#[ignore = "bug: ..."]`) and a [`KnownBug`] here that
//! the targets consult to steer around it, so that fuzzing keeps looking for new ones; set
//! `TESSERA_FUZZ_KNOWN_BUGS=1` to stop avoiding them (to check a fix). When a bug is fixed its
//! entry goes and its reproducer becomes a plain regression test.
//!
//! None at the moment. Found and fixed so far (3e15af9): an MMIO read wider than 4 bytes of
//! the MSI-X table panicked (`MsixState::read_table`); a ring base reprogrammed near 2^64
//! overflowed the packet address (`Processor::step`). Later: a tail published behind head ran
//! up to 2^32 stale ring slots (now a `RING_CONFIG` fault).

use std::sync::OnceLock;

/// One known bug.
#[derive(Debug)]
pub struct KnownBug {
    /// What it is and where.
    pub what: &'static str,
}

impl KnownBug {
    /// Whether the targets should avoid triggering it.
    pub fn avoid(&self) -> bool {
        static HUNT: OnceLock<bool> = OnceLock::new();
        !*HUNT.get_or_init(|| std::env::var_os("TESSERA_FUZZ_KNOWN_BUGS").is_some_and(|v| v == "1"))
    }
}
