//! `tessera bench session`: GPU sessions (issue #21) against the device they reach, side by
//! side in one run. A vGPU server runs in this process with one instance; a session opens on
//! its UNIX socket (operands in client memory, zero copy) and runs the same batches as a host
//! process driving an identical vGPU directly (`bench vgpu`'s native runs). Then the cost of
//! one call (an empty submission and its wait) and the rate of pipelined small calls. Then the
//! same instance over TCP with mutual TLS on loopback (a test CA made for the run): the same
//! call measurements, and the bandwidth of large writes into VRAM against a plain TCP copy of
//! the same bytes between two threads of this process.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vgpu::physical::GpuKind;
use vgpu_session::proto::{Reply, Request};
use vgpu_session::tls::{TlsAddr, TlsFiles};
use vgpu_session::{Command, Session, WaitResult};

use super::median;
use super::vgpu::{BenchServer, SAXPY, SGEMM, native_ms};

/// Options.
#[derive(Debug, Args)]
pub struct SessionArgs {
    /// Runs of each measurement (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Calls per latency and rate measurement.
    #[arg(long, default_value_t = 2000)]
    calls: u32,
    /// vGPU profile of the instance.
    #[arg(long, default_value = "256M")]
    profile: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The GPU under the instance: soft, or a Vulkan device: vulkan[,device=N].
    #[arg(long, value_name = "soft|vulkan[,device=N]", default_value = "soft")]
    gpu: GpuKind,
}

#[derive(Debug, Serialize)]
struct Report {
    sgemm_session_ms: f64,
    sgemm_device_ms: f64,
    saxpy_session_ms: f64,
    saxpy_device_ms: f64,
    /// Throughput through a UNIX-socket session over the same work on the device directly
    /// (both workloads; target ≥ 0.98).
    unix_over_device: f64,
    /// One empty submission and its wait, round trip (µs).
    unix_call_p50_us: f64,
    unix_call_p99_us: f64,
    /// Empty submissions sent back to back, replies read after (calls per second).
    unix_pipelined_calls_per_s: f64,
    /// The same over TCP with mutual TLS on loopback.
    tls_call_p50_us: f64,
    tls_call_p99_us: f64,
    tls_pipelined_calls_per_s: f64,
    /// Pipelined small-call rate over TLS ÷ over the UNIX socket (target ≥ 0.5).
    tls_over_unix_calls: f64,
    /// Large writes into VRAM over TLS (MB/s, 10^6 bytes).
    tls_write_mb_s: f64,
    /// Large reads from VRAM over TLS (MB/s).
    tls_read_mb_s: f64,
    /// The same bytes through a plain TCP socket on loopback, between two threads (MB/s).
    plain_tcp_mb_s: f64,
    /// TLS writes ÷ the plain socket copy (target ≥ 0.9).
    tls_over_plain_copy: f64,
}

/// Bytes of one large write or read, and how many make one bandwidth run.
const CHUNK: u64 = 8 << 20;
const CHUNKS: u64 = 32;

/// Writes (`read` false) or reads `CHUNKS` chunks of `CHUNK` bytes of VRAM through `s`,
/// pipelined (up to 4 requests ahead); MB/s.
fn inline_mb_s(s: &mut Session, read: bool) -> Result<f64, String> {
    let e = |e: vgpu_session::SessionError| e.to_string();
    let buf = s.alloc_vram(CHUNK).map_err(e)?;
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 13 % 251) as u8).collect();
    let t = Instant::now();
    let (mut sent, mut done) = (0, 0);
    while done < CHUNKS {
        while sent < CHUNKS && sent - done < 4 {
            if read {
                s.send(&Request::Read {
                    at: buf.at(0),
                    len: CHUNK,
                })
            } else {
                s.send_write(buf.at(0), &data)
            }
            .map_err(e)?;
            sent += 1;
        }
        match s.recv().map_err(e)? {
            Reply::Done | Reply::Data { .. } => done += 1,
            r => return Err(format!("unexpected reply {r:?}")),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    s.free(buf).map_err(e)?;
    Ok((CHUNK * CHUNKS) as f64 / secs / 1e6)
}

/// The same bytes as [`inline_mb_s`] through a plain TCP connection on loopback, from this
/// thread to another that reads them into a buffer; MB/s.
fn plain_tcp_mb_s() -> Result<f64, String> {
    let io = |e: std::io::Error| e.to_string();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = listener.accept()?;
        let mut buf = vec![0u8; CHUNK as usize];
        for _ in 0..CHUNKS {
            c.read_exact(&mut buf)?;
        }
        c.write_all(&[1])
    });
    let mut c = TcpStream::connect(addr).map_err(io)?;
    c.set_nodelay(true).map_err(io)?;
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 13 % 251) as u8).collect();
    let t = Instant::now();
    for _ in 0..CHUNKS {
        c.write_all(&data).map_err(io)?;
    }
    c.read_exact(&mut [0u8]).map_err(io)?;
    let secs = t.elapsed().as_secs_f64();
    reader
        .join()
        .map_err(|_| "the reader thread panicked".to_string())?
        .map_err(io)?;
    Ok((CHUNK * CHUNKS) as f64 / secs / 1e6)
}

/// Runs `(name, size, batch)` once through the session: operands in client memory, the
/// same inputs as the native run; returns the batch's wall time (ms).
fn session_ms(
    s: &mut Session,
    ctx: u32,
    (name, size, batch): (&str, u64, u64),
) -> Result<f64, String> {
    let e = |e: vgpu_session::SessionError| e.to_string();
    let elems = if name == "sgemm" { size * size } else { size };
    let bytes = elems * 4;
    let operands = if name == "sgemm" { 3 } else { 2 };
    let (buf, mem) = s.map_memory(operands * bytes).map_err(e)?;
    let init: Vec<u8> = (0..elems)
        .flat_map(|i| ((i % 7) as f32).to_le_bytes())
        .collect();
    mem.write(0, &init).map_err(e)?;
    mem.write(bytes, &init).map_err(e)?;
    let cmd = if name == "sgemm" {
        Command::Sgemm {
            m: size,
            n: size,
            k: size,
            a: buf.at(0),
            b: buf.at(bytes),
            c: buf.at(2 * bytes),
        }
    } else {
        Command::Saxpy {
            n: size,
            a: 2.0,
            x: buf.at(0),
            y: buf.at(bytes),
        }
    };
    s.run(ctx, &[cmd]).map_err(e)?; // warm up
    let t = Instant::now();
    s.run(ctx, &vec![cmd; batch as usize]).map_err(e)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    s.free(buf).map_err(e)?;
    Ok(ms)
}

/// Round trips of an empty submission and its wait (µs, sorted).
fn call_latency(s: &mut Session, ctx: u32, calls: u32) -> Result<Vec<f64>, String> {
    let e = |e: vgpu_session::SessionError| e.to_string();
    let mut out = Vec::with_capacity(calls as usize);
    for _ in 0..calls {
        let t = Instant::now();
        let f = s.submit(ctx, &[]).map_err(e)?;
        match s.wait(ctx, f, Duration::from_secs(10)).map_err(e)? {
            WaitResult::Done => {}
            w => return Err(format!("an empty submission ended with {w:?}")),
        }
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Empty submissions pipelined: all sent, then every reply read; calls per second.
fn pipelined_rate(s: &mut Session, ctx: u32, calls: u32) -> Result<f64, String> {
    let e = |e: vgpu_session::SessionError| e.to_string();
    let t = Instant::now();
    // A writer and a reader on one connection: the socket buffer cannot hold every request,
    // so replies are read while requests go out.
    let mut last = 0;
    let mut sent = 0;
    let mut read = 0;
    while read < calls {
        while sent < calls && sent - read < 256 {
            s.send(&Request::Submit {
                ctx,
                commands: Vec::new(),
            })
            .map_err(e)?;
            sent += 1;
        }
        match s.recv().map_err(e)? {
            Reply::Submitted { fence } => last = fence,
            r => return Err(format!("unexpected reply {r:?}")),
        }
        read += 1;
    }
    match s.wait(ctx, last, Duration::from_secs(60)).map_err(e)? {
        WaitResult::Done => {}
        w => return Err(format!("pipelined submissions ended with {w:?}")),
    }
    Ok(f64::from(calls) / t.elapsed().as_secs_f64())
}

pub fn run(args: SessionArgs) -> Result<(), String> {
    let profile = vgpu::profile::find(&args.profile)
        .ok_or_else(|| format!("unknown vGPU profile {:?}", args.profile))?;
    let server = BenchServer::start(profile, args.gpu, true)?;
    let mut s = Session::connect_unix(&server.session_socket).map_err(|e| e.to_string())?;
    let ctx = s.create_context().map_err(|e| e.to_string())?;
    let mut progress = super::Progress::new("session", args.runs as usize + 1);
    let (mut sg, mut sd, mut xg, mut xd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        progress.step(format!("run {run}: sgemm and saxpy, session and device"));
        sg.push(session_ms(&mut s, ctx, SGEMM)?);
        sd.push(native_ms(profile, SGEMM, args.gpu)?);
        xg.push(session_ms(&mut s, ctx, SAXPY)?);
        xd.push(native_ms(profile, SAXPY, args.gpu)?);
    }
    progress.step("per-call latency and pipelined rate, UNIX socket then TLS");
    let lat = call_latency(&mut s, ctx, args.calls)?;
    let rate = pipelined_rate(&mut s, ctx, args.calls)?;
    // One client at a time: the TLS session is served once this one has left.
    drop(s);
    let pki = std::env::temp_dir().join(format!("tessera-bench-pki-{}", std::process::id()));
    crate::tls_cmd::test_ca(&pki, &["localhost".into()], &["bench".into()])?;
    let files = TlsFiles {
        ca: pki.join("ca.pem"),
        cert: pki.join("client.pem"),
        key: pki.join("client-key.pem"),
    };
    let tls = vgpu_session::tls::server_config(&TlsFiles {
        cert: pki.join("server.pem"),
        key: pki.join("server-key.pem"),
        ..files.clone()
    })
    .map_err(|e| e.to_string())?;
    let listener = vgpu_server::tls::TlsListener::start(
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        tls,
        &server.daemon,
    )
    .map_err(|e| e.to_string())?;
    let addr = TlsAddr {
        host: "localhost".into(),
        port: listener.addr().port(),
        instance: "bench".into(),
    };
    let mut t = Session::connect_tls(&addr, &files).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&pki);
    let ctx = t.create_context().map_err(|e| e.to_string())?;
    let tls_lat = call_latency(&mut t, ctx, args.calls)?;
    let tls_rate = pipelined_rate(&mut t, ctx, args.calls)?;
    let (mut tw, mut tr, mut pl) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        tw.push(inline_mb_s(&mut t, false)?);
        tr.push(inline_mb_s(&mut t, true)?);
        pl.push(plain_tcp_mb_s()?);
    }
    let (tls_write_mb_s, plain_tcp_mb_s) = (median(&tw), median(&pl));
    let pick = |v: &[f64], q: usize| v[((v.len() - 1) * q / 100).min(v.len() - 1)];
    let (sgemm_session_ms, sgemm_device_ms) = (median(&sg), median(&sd));
    let (saxpy_session_ms, saxpy_device_ms) = (median(&xg), median(&xd));
    let r = Report {
        sgemm_session_ms,
        sgemm_device_ms,
        saxpy_session_ms,
        saxpy_device_ms,
        unix_over_device: (sgemm_device_ms + saxpy_device_ms)
            / (sgemm_session_ms + saxpy_session_ms),
        unix_call_p50_us: pick(&lat, 50),
        unix_call_p99_us: pick(&lat, 99),
        unix_pipelined_calls_per_s: rate,
        tls_call_p50_us: pick(&tls_lat, 50),
        tls_call_p99_us: pick(&tls_lat, 99),
        tls_pipelined_calls_per_s: tls_rate,
        tls_over_unix_calls: tls_rate / rate,
        tls_write_mb_s,
        tls_read_mb_s: median(&tr),
        plain_tcp_mb_s,
        tls_over_plain_copy: tls_write_mb_s / plain_tcp_mb_s,
    };
    if args.json {
        return super::print_json(&r);
    }
    println!(
        "GPU sessions, profile {}, {} runs, medians",
        profile.name, args.runs
    );
    println!("throughput (ms per batch):   session   device");
    println!(
        "  sgemm {}³ ×{}{:>18.2}{:>9.2}",
        SGEMM.1, SGEMM.2, r.sgemm_session_ms, r.sgemm_device_ms
    );
    println!(
        "  saxpy {} ×{}{:>16.2}{:>9.2}",
        SAXPY.1, SAXPY.2, r.saxpy_session_ms, r.saxpy_device_ms
    );
    println!("  session ÷ device throughput {:.3}", r.unix_over_device);
    println!(
        "one call (empty submission + wait), UNIX socket: p50 {:.1} µs, p99 {:.1} µs; \
         pipelined {:.0} calls/s",
        r.unix_call_p50_us, r.unix_call_p99_us, r.unix_pipelined_calls_per_s
    );
    println!(
        "one call, TCP + mutual TLS on loopback: p50 {:.1} µs, p99 {:.1} µs; pipelined {:.0} \
         calls/s ({:.3} of the UNIX socket's)",
        r.tls_call_p50_us, r.tls_call_p99_us, r.tls_pipelined_calls_per_s, r.tls_over_unix_calls
    );
    println!(
        "large copies over TLS ({} MiB requests): write {:.0} MB/s, read {:.0} MB/s; plain TCP \
         {:.0} MB/s; TLS write ÷ plain {:.3}",
        CHUNK >> 20,
        r.tls_write_mb_s,
        r.tls_read_mb_s,
        r.plain_tcp_mb_s,
        r.tls_over_plain_copy
    );
    Ok(())
}
