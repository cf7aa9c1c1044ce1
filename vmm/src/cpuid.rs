//! The CPUID each vCPU sees: KVM's supported set, with topology filled in and chosen features
//! hidden.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// A CPUID feature that can be hidden from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    name: &'static str,
    leaf: u32,
    reg: Reg,
    bit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
}

macro_rules! features {
    ($($name:literal => ($leaf:literal, $reg:ident, $bit:literal)),* $(,)?) => {
        /// Every feature `--cpus hide=` accepts.
        pub const FEATURES: &[Feature] = &[
            $(Feature { name: $name, leaf: $leaf, reg: Reg::$reg, bit: $bit }),*
        ];
    };
}

features! {
    "pcid" => (1, Ecx, 17),
    "x2apic" => (1, Ecx, 21),
    "popcnt" => (1, Ecx, 23),
    "tsc-deadline" => (1, Ecx, 24),
    "aes" => (1, Ecx, 25),
    "xsave" => (1, Ecx, 26),
    "avx" => (1, Ecx, 28),
    "rdrand" => (1, Ecx, 30),
    "cx16" => (1, Ecx, 13),
    "fsgsbase" => (7, Ebx, 0),
    "avx2" => (7, Ebx, 5),
    "smep" => (7, Ebx, 7),
    "erms" => (7, Ebx, 9),
    "invpcid" => (7, Ebx, 10),
    "avx512f" => (7, Ebx, 16),
    "rdseed" => (7, Ebx, 18),
    "smap" => (7, Ebx, 20),
    "umip" => (7, Ecx, 2),
    "pku" => (7, Ecx, 3),
    "la57" => (7, Ecx, 16),
}

/// What a PVM host's instruction emulator cannot run; hidden by default there.
pub const PVM_HIDDEN: &[&str] = &[
    "cx16", "xsave", "popcnt", "smap", "smep", "fsgsbase", "pcid",
];

impl Feature {
    /// The feature's name as `--cpus hide=` takes it.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// An unknown feature name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown CPUID feature {0:?} (known: {known})", known = FEATURES.iter().map(|f| f.name).collect::<Vec<_>>().join(", "))]
pub struct UnknownFeature(pub String);

impl FromStr for Feature {
    type Err = UnknownFeature;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FEATURES
            .iter()
            .find(|f| f.name == s)
            .copied()
            .ok_or_else(|| UnknownFeature(s.to_string()))
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
    }
}

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// The feature words a guest given `cpuid` depends on: the vendor (leaf 0), then the feature
/// registers of leaves 1, 7 and 0x8000_0001 and the XSAVE sizes of leaf 0xd (a snapshot's
/// guest may use any of these, so it is restored only where they are the same).
pub fn features(cpuid: &CpuId) -> Vec<u32> {
    let find = |function: u32, index: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
    };
    let mut out = Vec::new();
    for (function, index, regs) in [
        (0, 0, "bdc"),
        (1, 0, "cd"),
        (7, 0, "bcd"),
        (0xd, 0, "ac"),
        (0x8000_0001, 0, "cd"),
    ] {
        let e = find(function, index);
        for r in regs.chars() {
            out.push(e.map_or(0, |e| match r {
                'a' => e.eax,
                'b' => e.ebx,
                'c' => e.ecx,
                _ => e.edx,
            }));
        }
    }
    out
}

/// Adapts `base` (KVM's supported CPUID) for vCPU `cpu` of `ncpus`, hiding `hidden`.
pub fn vcpu_cpuid(base: &CpuId, cpu: u8, ncpus: u8, hidden: &[Feature]) -> CpuId {
    let mut cpuid = base.clone();
    let hide_xsave = hidden.iter().any(|f| f.name == "xsave");
    // Bits needed to number `ncpus` logical processors in the x2APIC id.
    let core_bits = u32::from(ncpus).next_power_of_two().trailing_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | u32::from(cpu) << 24 | u32::from(ncpus) << 16;
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if ncpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
                if hide_xsave {
                    e.ecx &= !LEAF1_ECX_OSXSAVE;
                }
            }
            0xb | 0x1f => {
                e.edx = u32::from(cpu);
                match e.index {
                    0 => {
                        (e.eax, e.ebx, e.ecx) = (0, 1, 1 << 8);
                    }
                    1 => {
                        (e.eax, e.ebx, e.ecx) = (core_bits, u32::from(ncpus), 2 << 8 | 1);
                    }
                    i => {
                        (e.eax, e.ebx, e.ecx) = (0, 0, i);
                    }
                }
            }
            0xd if hide_xsave => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            _ => {}
        }
        let (function, index) = (e.function, e.index);
        for f in hidden.iter().filter(|f| f.leaf == function && index == 0) {
            *reg_mut(e, f.reg) &= !(1 << f.bit);
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn hides_features_and_sets_topology() {
        let base =
            CpuId::from_entries(&[entry(1, 0), entry(7, 0), entry(0xb, 1), entry(0xd, 0)]).unwrap();
        let hidden: Vec<Feature> = PVM_HIDDEN.iter().map(|n| n.parse().unwrap()).collect();
        let c = vcpu_cpuid(&base, 1, 2, &hidden);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 1, "APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 2, "logical count");
        for bit in [13, 23, 26, 27, 17] {
            assert_eq!(e[0].ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_ne!(e[0].ecx & (1 << 28), 0, "avx untouched");
        for bit in [0, 7, 20] {
            assert_eq!(e[1].ebx & (1 << bit), 0, "leaf 7 ebx bit {bit}");
        }
        assert_eq!((e[2].eax, e[2].ebx, e[2].edx), (1, 2, 1));
        assert_eq!(e[3].eax, 0, "xsave leaf cleared");
    }

    #[test]
    fn parses_names() {
        assert_eq!("cx16".parse::<Feature>().unwrap().name(), "cx16");
        let err = "sse9".parse::<Feature>().unwrap_err();
        assert!(err.to_string().contains("unknown CPUID feature \"sse9\""));
    }
}
