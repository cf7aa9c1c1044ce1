//! The server loop against two clients: the `vfio_user` crate's (Cloud Hypervisor's, so the
//! wire format stays what it speaks) and ours (with migration), plus hostile bytes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    vfio_region_info, vfio_region_sparse_mmap_area,
};
use vfu::wire::{self, Header, Put, cmd, flags};
use vfu::{Client, Device, DeviceInfo, DeviceState, IrqInfo, Migration, ServerRegion};

/// What the test device saw.
#[derive(Debug, Default)]
struct Seen {
    maps: Vec<(u64, u64, u64)>,
    irqs: Vec<(u32, u32, usize)>,
    resets: u32,
    steps: Vec<(DeviceState, DeviceState)>,
    written: Vec<u8>,
    logging: Option<Vec<(u64, u64)>>,
}

/// A device with one 4 KiB register region and a migration stream of `stream_len` bytes.
struct TestDevice {
    regs: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
    out: Vec<u8>,
    dirty: Vec<u64>,
    fail_resume: bool,
}

impl Device for TestDevice {
    fn region_read(&mut self, _r: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let o = offset as usize;
        data.copy_from_slice(&self.regs[o..o + data.len()]);
        Ok(())
    }
    fn region_write(&mut self, _r: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let o = offset as usize;
        self.regs[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn dma_map(
        &mut self,
        _f: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        assert!(fd.is_some());
        self.seen
            .lock()
            .expect("lock")
            .maps
            .push((offset, address, size));
        Ok(())
    }
    fn dma_unmap(&mut self, _f: u32, _a: u64, _s: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.seen.lock().expect("lock").resets += 1;
        Ok(())
    }
    fn set_irqs(
        &mut self,
        index: u32,
        _f: u32,
        start: u32,
        _c: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        self.seen
            .lock()
            .expect("lock")
            .irqs
            .push((index, start, fds.len()));
        Ok(())
    }
    fn migration(&mut self) -> Option<&mut dyn Migration> {
        Some(self)
    }
}

impl Migration for TestDevice {
    fn step(&mut self, from: DeviceState, to: DeviceState) -> std::io::Result<()> {
        if self.fail_resume && from == DeviceState::Resuming {
            return Err(std::io::Error::other("the state does not fit"));
        }
        if to == DeviceState::PreCopy || to == DeviceState::StopCopy && self.out.is_empty() {
            self.out = (0..3000u32).map(|i| i as u8).collect();
        }
        self.seen.lock().expect("lock").steps.push((from, to));
        Ok(())
    }
    fn read(&mut self, max: usize) -> std::io::Result<Vec<u8>> {
        let n = max.min(self.out.len());
        Ok(self.out.drain(..n).collect())
    }
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.seen
            .lock()
            .expect("lock")
            .written
            .extend_from_slice(data);
        Ok(())
    }
    fn reset(&mut self) {
        self.out.clear();
    }
    fn logging_start(&mut self, ranges: &[(u64, u64)]) -> std::io::Result<()> {
        self.seen.lock().expect("lock").logging = Some(ranges.to_vec());
        Ok(())
    }
    fn logging_stop(&mut self) -> std::io::Result<()> {
        self.seen.lock().expect("lock").logging = None;
        Ok(())
    }
    fn logging_report(&mut self, iova: u64, length: u64) -> std::io::Result<Vec<(u64, u64)>> {
        let (inside, rest): (Vec<u64>, Vec<u64>) = self
            .dirty
            .iter()
            .partition(|&&a| a >= iova && a < iova + length);
        self.dirty = rest;
        Ok(inside.into_iter().map(|a| (a, a + 4096)).collect())
    }
}

fn info(vram: &File) -> DeviceInfo {
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let region = |index, size, flags| ServerRegion {
        info: vfio_region_info {
            argsz: 32,
            flags,
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    };
    let mut vram_region = region(1, 8192, rw | VFIO_REGION_INFO_FLAG_MMAP);
    vram_region.sparse_areas = vec![vfio_region_sparse_mmap_area {
        offset: 0,
        size: 8192,
    }];
    vram_region.mmap_fd = Some(vram.as_raw_fd());
    DeviceInfo {
        resettable: true,
        regions: vec![region(0, 4096, rw), vram_region],
        irqs: vec![IrqInfo {
            index: 0,
            flags: 1,
            count: 4,
        }],
    }
}

/// A server thread on one end of a socket pair; the other end is returned.
type Served = JoinHandle<Result<(), String>>;

fn server(dirty: Vec<u64>, fail_resume: bool) -> (UnixStream, Arc<Mutex<Seen>>, Served) {
    let (a, b) = UnixStream::pair().expect("socket pair");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let t = std::thread::spawn(move || {
        let vram = tempfile();
        let mut dev = TestDevice {
            regs: vec![0; 4096],
            seen: s,
            out: Vec::new(),
            dirty,
            fail_resume,
        };
        vfu::serve(b, &info(&vram), &mut dev).map_err(|e| e.to_string())
    });
    (a, seen, t)
}

fn tempfile() -> File {
    let f = tempfile::tempfile().expect("temporary file");
    f.set_len(8192).expect("size");
    f
}

#[test]
fn the_vfio_user_crate_client_is_served() {
    let (a, seen, t) = server(Vec::new(), false);
    // The crate's client connects by path: serve the pair's end behind a listener.
    let dir = std::env::temp_dir().join(format!("vfu-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let relay = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        // Relays bytes and descriptors one message at a time, both ways.
        let mut a = a;
        loop {
            let Ok(m) = wire::recv(&mut c) else { return };
            let fds: Vec<i32> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
            wire::send(&mut a, m.header, &m.payload, &fds).unwrap();
            let r = wire::recv(&mut a).unwrap();
            let fds: Vec<i32> = r.fds.iter().map(|f| f.as_raw_fd()).collect();
            wire::send(&mut c, r.header, &r.payload, &fds).unwrap();
        }
    });
    let mut c = vfio_user::Client::new(&path).expect("the crate's client connects");
    let vram = c.region(1).expect("region 1");
    assert_eq!(vram.size, 8192);
    assert!(
        vram.file_offset.is_some(),
        "the mmap fd came with the capability"
    );
    assert_eq!(vram.sparse_areas.len(), 1);
    c.region_write(0, 8, &[1, 2, 3, 4]).unwrap();
    let mut d = [0u8; 4];
    c.region_read(0, 8, &mut d).unwrap();
    assert_eq!(d, [1, 2, 3, 4]);
    let irq = c.get_irq_info(0).unwrap();
    assert_eq!((irq.index, irq.count), (0, 4));
    let f = tempfile();
    c.dma_map(0, 1 << 20, 8192, f.as_raw_fd()).unwrap();
    c.set_irqs(0, 0, 1, 2, &[f.as_raw_fd(), f.as_raw_fd()])
        .unwrap();
    c.reset().unwrap();
    drop(c);
    relay.join().unwrap();
    t.join().unwrap().unwrap();
    let s = seen.lock().expect("lock");
    assert_eq!(s.maps, [(0, 1 << 20, 8192)]);
    assert_eq!(s.irqs, [(0, 1, 2)]);
    assert_eq!(s.resets, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn migration_states_data_and_dirty_log() {
    let dirty = vec![0x10_0000, 0x10_3000, 0x20_0000];
    let (a, seen, t) = server(dirty, false);
    let mut c = Client::from_stream(a).unwrap();
    assert_eq!(c.region(1).unwrap().size, 8192);
    assert_eq!(c.migration_flags().unwrap(), 5, "STOP_COPY | PRE_COPY");
    assert_eq!(c.device_state().unwrap(), DeviceState::Running);
    // No data outside the saving states; nothing changes.
    assert_eq!(
        c.mig_read(100).unwrap_err().errno(),
        Some(libc::EINVAL as u32)
    );
    assert_eq!(
        c.mig_write(&[1]).unwrap_err().errno(),
        Some(libc::EINVAL as u32)
    );
    // Pre-copy: the stream comes in pieces, then "nothing now".
    c.logging_start(&[(0x10_0000, 0x10_0000)]).unwrap();
    c.set_device_state(DeviceState::PreCopy).unwrap();
    let mut got = Vec::new();
    loop {
        let d = c.mig_read(1000).unwrap();
        if d.is_empty() {
            break;
        }
        got.extend(d);
    }
    assert_eq!(got, (0..3000u32).map(|i| i as u8).collect::<Vec<_>>());
    assert_eq!(
        c.logging_report(0x10_0000, 0x10_0000).unwrap(),
        [0x10_0000, 0x10_3000]
    );
    assert_eq!(
        c.logging_report(0x10_0000, 0x10_0000).unwrap(),
        [] as [u64; 0]
    );
    // STOP_COPY -> PRE_COPY is refused and the state stays.
    c.set_device_state(DeviceState::StopCopy).unwrap();
    let e = c.set_device_state(DeviceState::PreCopy).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL as u32));
    assert_eq!(c.device_state().unwrap(), DeviceState::StopCopy);
    // A combination: STOP_COPY -> RESUMING goes through STOP.
    c.set_device_state(DeviceState::Resuming).unwrap();
    c.mig_write(&vec![7u8; 3 << 20]).unwrap();
    c.set_device_state(DeviceState::Running).unwrap();
    c.logging_stop().unwrap();
    drop(c);
    t.join().unwrap().unwrap();
    let s = seen.lock().expect("lock");
    use DeviceState::*;
    assert_eq!(
        s.steps,
        [
            (Running, PreCopy),
            (PreCopy, StopCopy),
            (StopCopy, Stop),
            (Stop, Resuming),
            (Resuming, Stop),
            (Stop, Running)
        ]
    );
    assert_eq!(s.written.len(), 3 << 20);
    assert_eq!(s.logging, None);
}

#[test]
fn a_failed_resume_leaves_error_until_a_reset() {
    let (a, _seen, t) = server(Vec::new(), true);
    let mut c = Client::from_stream(a).unwrap();
    c.set_device_state(DeviceState::Resuming).unwrap();
    c.mig_write(b"garbage").unwrap();
    assert!(c.set_device_state(DeviceState::Running).is_err());
    assert_eq!(c.device_state().unwrap(), DeviceState::Error);
    assert!(c.set_device_state(DeviceState::Stop).is_err());
    c.reset().unwrap();
    assert_eq!(c.device_state().unwrap(), DeviceState::Running);
    drop(c);
    t.join().unwrap().unwrap();
}

fn raw_call(s: &mut UnixStream, command: u16, payload: &[u8]) -> Header {
    wire::send(
        s,
        Header {
            message_id: 9,
            command,
            ..Header::default()
        },
        payload,
        &[],
    )
    .expect("send");
    wire::recv(s).expect("reply").header
}

#[test]
fn hostile_messages_get_errors_and_the_stream_stays_in_step() {
    let (mut a, _seen, t) = server(Vec::new(), false);
    let einval = libc::EINVAL as u32;
    // Unknown and retired commands, with payloads the server must skip.
    for c in [0u16, 6, 11, 14, 15, 19, 0xffff] {
        let h = raw_call(&mut a, c, &[0xaa; 40]);
        assert!(h.flags & flags::ERROR != 0, "command {c}");
        assert_eq!(h.error, libc::ENOTSUP as u32);
    }
    // Short fixed parts, a region past the last, a huge access, a bad feature.
    assert_eq!(raw_call(&mut a, cmd::REGION_READ, &[0; 8]).error, einval);
    let mut p = Vec::new();
    p.u64(0).u32(9).u32(4);
    assert_eq!(raw_call(&mut a, cmd::REGION_READ, &p).error, einval);
    let mut p = Vec::new();
    p.u64(0).u32(0).u32(u32::MAX);
    assert_eq!(raw_call(&mut a, cmd::REGION_READ, &p).error, einval);
    let mut p = Vec::new();
    p.u64(0).u32(0).u32(16);
    p.extend_from_slice(&[1; 4]);
    assert_eq!(
        raw_call(&mut a, cmd::REGION_WRITE, &p).error,
        einval,
        "data shorter than count"
    );
    let mut p = Vec::new();
    p.u32(16).u32(0x3_0002).u32(2).u32(0);
    assert_eq!(
        raw_call(&mut a, cmd::DEVICE_FEATURE, &p).error,
        einval,
        "GET and SET"
    );
    let mut p = Vec::new();
    p.u32(16).u32(0x2_0002).u32(5).u32(0);
    assert_eq!(
        raw_call(&mut a, cmd::DEVICE_FEATURE, &p).error,
        einval,
        "a P2P state"
    );
    let mut p = Vec::new();
    p.u32(64).u32(0x1_0008).u64(0).u64(0).u64(4096);
    assert_eq!(
        raw_call(&mut a, cmd::DEVICE_FEATURE, &p).error,
        einval,
        "an empty report"
    );
    let mut p = Vec::new();
    p.u32(64).u32(0x1_0008).u64(0).u64(1 << 40).u64(4096);
    assert_eq!(
        raw_call(&mut a, cmd::DEVICE_FEATURE, &p).error,
        einval,
        "a bitmap too big"
    );
    // Still in step: a good read works.
    let mut p = Vec::new();
    p.u64(0).u32(0).u32(4);
    let h = raw_call(&mut a, cmd::REGION_READ, &p);
    assert_eq!((h.flags & flags::ERROR, h.message_size), (0, 16 + 16 + 4));
    // A size the stream cannot follow ends the connection, without a panic.
    let mut bad = Vec::new();
    Header {
        command: cmd::REGION_WRITE,
        message_size: u32::MAX,
        ..Header::default()
    }
    .encode(&mut bad);
    a.write_all(&bad).unwrap();
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let e = t.join().unwrap().unwrap_err();
    assert!(e.contains("message size"), "{e}");
}
