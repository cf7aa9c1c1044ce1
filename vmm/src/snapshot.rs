//! The snapshot container (issue #22): how a paused VM's state is laid out in a file, and the
//! checks that refuse a file that is not one, is cut short or changed, or belongs to another
//! kind of VM, before any of it is used. Not yet wired to `vmctl` (see docs/architecture.md,
//! "The VM control socket").
//!
//! Layout (little-endian):
//!
//! ```text
//! magic      8 bytes  "TESSNAP\0"
//! version    u32      FORMAT_VERSION
//! fingerprint         u32 length + bytes (what the VM must match: a `Fingerprint`, JSON)
//! sections   u32 count, then per section: u16 name length + name (UTF-8), u64 length + bytes
//! crc        u32      CRC-32 (IEEE) of every byte before it
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"TESSNAP\0";
/// The layout this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Most sections in one snapshot.
pub const MAX_SECTIONS: u32 = 4096;
/// Longest fingerprint, and longest section name.
const MAX_FINGERPRINT: u32 = 64 << 10;
const MAX_NAME: u16 = 256;

/// What a snapshot was taken of; a restore refuses a snapshot whose fingerprint differs from
/// the VM it would become.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Profiles of the in-process vGPUs, in slot order.
    pub vgpus: Vec<String>,
    /// The CPUID features the guest was given (vendor, then leaf/register words).
    pub cpu_features: Vec<u32>,
}

/// A snapshot: its fingerprint and named sections of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub fingerprint: Fingerprint,
    pub sections: BTreeMap<String, Vec<u8>>,
}

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The first bytes are not [`MAGIC`].
    #[error("not a Tessera snapshot")]
    NotASnapshot,
    /// Another layout version.
    #[error("snapshot format version {found} (this Tessera reads version {FORMAT_VERSION})")]
    Version {
        /// The file's.
        found: u32,
    },
    /// The file ends early.
    #[error("the snapshot is truncated")]
    Truncated,
    /// A length or count past its limit.
    #[error("the snapshot is corrupt: {0}")]
    Corrupt(String),
    /// The CRC does not match the bytes.
    #[error("the snapshot is corrupt: checksum {found:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The file's.
        found: u32,
        /// Of its bytes.
        computed: u32,
    },
    /// Taken of another kind of VM.
    #[error("the snapshot was taken of another VM: {0}")]
    Mismatch(String),
    /// Reading or writing failed.
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes read from `r`, counted into the CRC; the end of the file is [`SnapshotError::Truncated`].
struct Reader<R> {
    r: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, SnapshotError> {
        let mut out = Vec::new();
        // Read in bounded steps: a length field is not trusted to allocate.
        let mut chunk = [0u8; 64 << 10];
        while out.len() < n {
            let want = (n - out.len()).min(chunk.len());
            match self.r.read(&mut chunk[..want]) {
                Ok(0) => return Err(SnapshotError::Truncated),
                Ok(k) => out.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.crc.update(&out);
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let b = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&b);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

impl Snapshot {
    /// Writes the snapshot to `w`.
    pub fn write(&self, w: &mut impl Write) -> Result<(), SnapshotError> {
        let corrupt = |what: String| SnapshotError::Corrupt(what);
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let fp = serde_json::to_vec(&self.fingerprint).map_err(|e| corrupt(e.to_string()))?;
        out.extend_from_slice(&(fp.len() as u32).to_le_bytes());
        out.extend_from_slice(&fp);
        let count = u32::try_from(self.sections.len())
            .ok()
            .filter(|&c| c <= MAX_SECTIONS)
            .ok_or_else(|| corrupt(format!("{} sections", self.sections.len())))?;
        out.extend_from_slice(&count.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out);
        w.write_all(&out)?;
        for (name, bytes) in &self.sections {
            let n = u16::try_from(name.len())
                .ok()
                .filter(|&n| n <= MAX_NAME)
                .ok_or_else(|| corrupt(format!("section name {name:?}")))?;
            let mut head = n.to_le_bytes().to_vec();
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            crc.update(&head);
            crc.update(bytes);
            w.write_all(&head)?;
            w.write_all(bytes)?;
        }
        w.write_all(&crc.finalize().to_le_bytes())?;
        Ok(())
    }

    /// Reads a snapshot from `r`, checking everything before returning any of it: the magic,
    /// the version, every length, the checksum, and that its fingerprint is `expected`
    /// (`None`: any).
    pub fn read(r: impl Read, expected: Option<&Fingerprint>) -> Result<Snapshot, SnapshotError> {
        let mut rd = Reader {
            r,
            crc: crc32fast::Hasher::new(),
        };
        let magic: [u8; 8] = rd.array().map_err(|e| match e {
            SnapshotError::Truncated => SnapshotError::NotASnapshot,
            e => e,
        })?;
        if &magic != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let found = rd.u32()?;
        if found != FORMAT_VERSION {
            return Err(SnapshotError::Version { found });
        }
        let fp_len = rd.u32()?;
        if fp_len > MAX_FINGERPRINT {
            return Err(SnapshotError::Corrupt(format!(
                "fingerprint of {fp_len} bytes"
            )));
        }
        let fp = rd.bytes(fp_len as usize)?;
        let count = rd.u32()?;
        if count > MAX_SECTIONS {
            return Err(SnapshotError::Corrupt(format!("{count} sections")));
        }
        let mut sections = BTreeMap::new();
        for _ in 0..count {
            let n = rd.u16()?;
            if n > MAX_NAME {
                return Err(SnapshotError::Corrupt(format!("section name of {n} bytes")));
            }
            let name = String::from_utf8(rd.bytes(usize::from(n))?)
                .map_err(|_| SnapshotError::Corrupt("a section name is not UTF-8".into()))?;
            let len = usize::try_from(rd.u64()?)
                .map_err(|_| SnapshotError::Corrupt("a section longer than memory".into()))?;
            let bytes = rd.bytes(len)?;
            if sections.insert(name.clone(), bytes).is_some() {
                return Err(SnapshotError::Corrupt(format!("section {name:?} twice")));
            }
        }
        let computed = rd.crc.clone().finalize();
        let found = u32::from_le_bytes(rd.array()?);
        if found != computed {
            return Err(SnapshotError::Checksum { found, computed });
        }
        let fingerprint: Fingerprint = serde_json::from_slice(&fp)
            .map_err(|e| SnapshotError::Corrupt(format!("fingerprint: {e}")))?;
        if let Some(want) = expected {
            check_fingerprint(&fingerprint, want)?;
        }
        // Nothing may follow the checksum.
        let mut extra = [0u8; 1];
        if rd.r.read(&mut extra)? != 0 {
            return Err(SnapshotError::Corrupt("bytes after the checksum".into()));
        }
        Ok(Snapshot {
            fingerprint,
            sections,
        })
    }
}

/// The first way `got` differs from `want`, in words.
pub fn check_fingerprint(got: &Fingerprint, want: &Fingerprint) -> Result<(), SnapshotError> {
    let m = |what: String| Err(SnapshotError::Mismatch(what));
    if got.vcpus != want.vcpus {
        return m(format!("{} vCPUs, this VM has {}", got.vcpus, want.vcpus));
    }
    if got.memory != want.memory {
        return m(format!(
            "{} bytes of RAM, this VM has {}",
            got.memory, want.memory
        ));
    }
    if got.vgpus != want.vgpus {
        return m(format!(
            "vGPUs {:?}, this VM has {:?}",
            got.vgpus, want.vgpus
        ));
    }
    if got.cpu_features != want.cpu_features {
        return m("other CPU features than this host gives its guests".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            fingerprint: Fingerprint {
                vcpus: 2,
                memory: 64 << 20,
                vgpus: vec!["64M".into()],
                cpu_features: vec![0x756e_6547, 0x1f, 7],
            },
            sections: [
                ("vcpu0".to_string(), vec![1u8; 1000]),
                (
                    "vgpu0".to_string(),
                    (0..70_000u32).map(|i| i as u8).collect(),
                ),
                ("empty".to_string(), Vec::new()),
            ]
            .into_iter()
            .collect(),
        }
    }

    fn bytes(s: &Snapshot) -> Vec<u8> {
        let mut out = Vec::new();
        s.write(&mut out).unwrap();
        out
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let s = sample();
        let got = Snapshot::read(&bytes(&s)[..], Some(&s.fingerprint)).unwrap();
        assert_eq!(got, s);
    }

    #[test]
    fn every_truncation_and_every_changed_byte_is_refused() {
        let s = sample();
        let good = bytes(&s);
        for cut in 0..good.len() {
            let r = Snapshot::read(&good[..cut], None);
            assert!(
                matches!(
                    r,
                    Err(SnapshotError::Truncated | SnapshotError::NotASnapshot)
                ),
                "cut at {cut}: {r:?}"
            );
        }
        // Every byte of the head and the section headers, and a sample of the data.
        let positions: Vec<usize> = (0..200).chain((200..good.len()).step_by(97)).collect();
        for &i in &positions {
            let mut bad = good.clone();
            bad[i] ^= 0x5a;
            assert!(Snapshot::read(&bad[..], None).is_err(), "byte {i} changed");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(Snapshot::read(&longer[..], None).is_err());
    }

    #[test]
    fn a_snapshot_of_another_vm_or_version_is_refused_with_what_differs() {
        let s = sample();
        let good = bytes(&s);
        let mut want = s.fingerprint.clone();
        want.memory = 128 << 20;
        let e = Snapshot::read(&good[..], Some(&want)).unwrap_err();
        assert!(
            e.to_string()
                .contains("67108864 bytes of RAM, this VM has 134217728"),
            "{e}"
        );
        want = s.fingerprint.clone();
        want.vgpus = vec!["1G".into()];
        let e = Snapshot::read(&good[..], Some(&want)).unwrap_err();
        assert!(e.to_string().contains("vGPUs"), "{e}");
        let mut v2 = good.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = Snapshot::read(&v2[..], None).unwrap_err();
        assert!(
            e.to_string()
                .contains("version 2 (this Tessera reads version 1)"),
            "{e}"
        );
        let e = Snapshot::read(&b"#!/bin/sh\necho hi\n"[..], None).unwrap_err();
        assert_eq!(e.to_string(), "not a Tessera snapshot");
    }

    #[test]
    fn lengths_are_not_trusted_to_allocate() {
        // A header claiming a section of 2^60 bytes, then the end of the file.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(b"{}");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.push(b'x');
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            Snapshot::read(&b[..], None),
            Err(SnapshotError::Truncated)
        ));
    }
}
