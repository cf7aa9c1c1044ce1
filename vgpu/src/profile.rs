//! vGPU profiles (like mdev types): how much VRAM an instance gets and how many contexts.

/// A vGPU profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// Name used on the command line (`--vgpu profile=NAME`).
    pub name: &'static str,
    /// VRAM size (a power of two: it is a BAR).
    pub vram: u64,
    /// Contexts (≤ `vgpu_abi::limits::MAX_CONTEXTS`).
    pub contexts: u32,
    /// Engine threads of the private software GPU an in-process instance gets.
    pub engines: usize,
}

/// Built-in profiles.
pub const PROFILES: &[Profile] = &[
    Profile {
        name: "64M",
        vram: 64 << 20,
        contexts: 16,
        engines: 2,
    },
    Profile {
        name: "256M",
        vram: 256 << 20,
        contexts: 16,
        engines: 2,
    },
    Profile {
        name: "1G",
        vram: 1 << 30,
        contexts: 16,
        engines: 2,
    },
];

impl Profile {
    /// The PCI subsystem id that names this profile to the guest: its place in [`PROFILES`]
    /// plus one (1 for a profile not in the list).
    pub fn subsystem_id(&self) -> u16 {
        PROFILES
            .iter()
            .position(|p| p == self)
            .map_or(1, |i| i as u16 + 1)
    }
}

/// Finds a profile by name.
pub fn find(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_valid_bars() {
        for p in PROFILES {
            assert!(p.vram.is_power_of_two());
            assert!(p.contexts >= 2 && p.contexts <= vgpu_abi::limits::MAX_CONTEXTS);
        }
        assert_eq!(find("256m").map(|p| p.vram), Some(256 << 20));
        assert!(find("3G").is_none());
    }
}
