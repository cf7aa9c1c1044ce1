//! The server's metrics in the OpenMetrics text format (prometheus-client), gathered at each
//! scrape: per vGPU instance, per GPU partition and for the server. Served over HTTP by
//! `tessera serve --metrics-addr` ([`MetricsServer`]) and over the control socket
//! (`tessera top --prometheus`).
//!
//! Names follow Prometheus' conventions: base units in the name (`_seconds`, `_bytes`),
//! counters end in `_total`, fractions in `_ratio`, and state that is a string (the policy) is
//! an `_info` gauge of 1 with the string as a label.

use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use vgpu::physical::{PartitionInfo, VgpuStats};

use crate::Daemon;

/// What one scrape reports: a snapshot taken under the daemon's short locks.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Per instance.
    pub vgpus: Vec<VgpuStats>,
    /// Per partition.
    pub partitions: Vec<PartitionInfo>,
    /// Instances with a client attached.
    pub attached: usize,
    /// The server's version.
    pub version: &'static str,
}

/// One metric family: its name (without unit and `_total`), help, unit and type, and its
/// samples as (labels, value).
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
    kind: MetricType,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family<'_> {
    fn encode(self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut metric =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        if let [(labels, value)] = self.samples.as_slice()
            && labels.is_empty()
        {
            return sample(self.kind, *value, metric);
        }
        for (labels, value) in &self.samples {
            sample(self.kind, *value, metric.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// One sample of a counter or a gauge.
fn sample(kind: MetricType, value: f64, to: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(to),
        _ => ConstGauge::new(value).encode(to),
    }
}

impl Snapshot {
    fn families(&self) -> Vec<Family<'static>> {
        let vgpu = |name, help, unit, kind, get: fn(&VgpuStats) -> f64| Family {
            name,
            help,
            unit,
            kind,
            samples: self
                .vgpus
                .iter()
                .map(|s| {
                    let labels = vec![
                        ("vgpu", s.name.clone()),
                        ("partition", s.partition.to_string()),
                    ];
                    (labels, get(s))
                })
                .collect(),
        };
        let partition = |name, help, unit, get: fn(&PartitionInfo) -> f64| Family {
            name,
            help,
            unit,
            kind: MetricType::Gauge,
            samples: self
                .partitions
                .iter()
                .map(|p| (vec![("partition", p.index.to_string())], get(p)))
                .collect(),
        };
        let server = |name, help, value: f64, labels: Vec<(&'static str, String)>| Family {
            name,
            help,
            unit: None,
            kind: MetricType::Gauge,
            samples: vec![(labels, value)],
        };
        vec![
            vgpu(
                "tessera_vgpu_busy",
                "GPU time the instance has had since it was created",
                Some(Unit::Seconds),
                MetricType::Counter,
                |s| s.busy_ns as f64 / 1e9,
            ),
            vgpu(
                "tessera_vgpu_share_ratio",
                "The instance's share of its partition's GPU time over the last 100 ms (0 to 1)",
                None,
                MetricType::Gauge,
                |s| s.share,
            ),
            vgpu(
                "tessera_vgpu_queue_depth",
                "Packets queued in the instance's contexts",
                None,
                MetricType::Gauge,
                |s| s.queue_depth as f64,
            ),
            vgpu(
                "tessera_vgpu_context_switches",
                "Times the scheduler gave the instance the GPU",
                None,
                MetricType::Counter,
                |s| s.context_switches as f64,
            ),
            vgpu(
                "tessera_vgpu_faults",
                "Faults the instance's contexts took",
                None,
                MetricType::Counter,
                |s| s.faults as f64,
            ),
            vgpu(
                "tessera_vgpu_resets",
                "Watchdog resets of the instance",
                None,
                MetricType::Counter,
                |s| s.resets as f64,
            ),
            vgpu(
                "tessera_vgpu_poll_cpu",
                "Host CPU time the instance's command processor has spent polling tail shadows",
                Some(Unit::Seconds),
                MetricType::Counter,
                |s| s.poll_ns as f64 / 1e9,
            ),
            partition(
                "tessera_partition_vram",
                "VRAM of the partition",
                Some(Unit::Bytes),
                |p| p.spec.vram as f64,
            ),
            partition(
                "tessera_partition_vram_free",
                "VRAM of the partition not leased to an instance",
                Some(Unit::Bytes),
                |p| p.vram_free as f64,
            ),
            partition(
                "tessera_partition_engines",
                "Engines (GPU workers) of the partition",
                None,
                |p| p.spec.engines as f64,
            ),
            partition(
                "tessera_partition_slice",
                "The scheduler's time slice",
                Some(Unit::Seconds),
                |p| p.slice_us as f64 / 1e6,
            ),
            Family {
                name: "tessera_partition_policy_info",
                help: "The partition's scheduling policy (label policy) and GPU (label gpu)",
                unit: None,
                kind: MetricType::Gauge,
                samples: self
                    .partitions
                    .iter()
                    .map(|p| {
                        let labels = vec![
                            ("partition", p.index.to_string()),
                            ("policy", p.policy.clone()),
                            ("gpu", p.gpu.clone()),
                        ];
                        (labels, 1.0)
                    })
                    .collect(),
            },
            server(
                "tessera_server_instances",
                "vGPU instances the server has",
                self.vgpus.len() as f64,
                vec![],
            ),
            server(
                "tessera_server_attached_instances",
                "Instances with a VMM attached",
                self.attached as f64,
                vec![],
            ),
            server(
                "tessera_server_info",
                "The server's version (label version)",
                1.0,
                vec![("version", self.version.to_string())],
            ),
        ]
    }

    /// The OpenMetrics text of this snapshot.
    pub fn text(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(self.clone())));
        let mut out = String::new();
        // Writing into a String cannot fail; an error here would be a bug in the encoder.
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }
}

/// A registry collector that reports one snapshot.
#[derive(Debug)]
struct Fixed(Snapshot);

impl Collector for Fixed {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for family in self.0.families() {
            family.encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// The content type of [`Snapshot::text`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapes answered at once, each on a thread of its own; a connection past them is told
/// `503` and closed.
pub const MAX_SCRAPERS: usize = 4;
/// How long a scraper has to send its request head and to take the answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read (request line and headers).
const MAX_HEAD: usize = 8 << 10;
/// Most headers a request may carry.
const MAX_HEADERS: usize = 32;

/// `GET /metrics` over HTTP, until the process exits. One thread accepts (backing off while
/// `accept` fails); each connection is served on a thread of its own, at most
/// [`MAX_SCRAPERS`] at once, gets one answer and is closed, and must send its request head
/// within [`SCRAPE_TIMEOUT`]: idle, slow or numerous clients hold no more than that. Requests
/// are parsed by `httparse`. (There is no stop: the listener is bound before the server's
/// sandbox starts and lives as long as the process.)
pub struct MetricsServer {
    addr: SocketAddr,
}

impl MetricsServer {
    /// Binds `addr` and serves `daemon`'s metrics from then on.
    pub fn start(addr: SocketAddr, daemon: Arc<Daemon>) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || accept_scrapers(&listener, &daemon))?;
        Ok(MetricsServer { addr })
    }

    /// The address it listens on (the port the system picked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

fn accept_scrapers(listener: &TcpListener, daemon: &Arc<Daemon>) {
    let scrapes = crate::ConnectionThreads::new("metrics-scrape", MAX_SCRAPERS);
    let mut backoff = crate::AcceptBackoff::new();
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                backoff.failed("metrics listener", &e);
                continue;
            }
        };
        backoff.succeeded();
        if stream.set_read_timeout(Some(SCRAPE_TIMEOUT)).is_err()
            || stream.set_write_timeout(Some(SCRAPE_TIMEOUT)).is_err()
        {
            continue;
        }
        let daemon = daemon.clone();
        if let Err(mut stream) = scrapes.serve(stream, move |s| scrape(s, &daemon)) {
            // Best effort: the answer fits the empty send buffer of a new connection.
            let _ = stream.write_all(&response(
                1,
                "503 Service Unavailable",
                "text/plain",
                b"too many scrapes at once; retry\n",
            ));
        }
    }
}

/// Reads one request head from `stream` and answers it, all within [`SCRAPE_TIMEOUT`]
/// however slowly the scraper sends or reads; the connection then closes.
fn scrape(mut stream: TcpStream, daemon: &Daemon) {
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    // The time left, as the socket's timeout for its next read or write (`None`: none left).
    let left = |stream: &TcpStream, write: bool| {
        let left = deadline.saturating_duration_since(Instant::now());
        let set = if write {
            stream.set_write_timeout(Some(left))
        } else {
            stream.set_read_timeout(Some(left))
        };
        (!left.is_zero() && set.is_ok()).then_some(())
    };
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let answer = loop {
        if left(&stream, false).is_none() {
            tracing::debug!("metrics: a scraper sent no whole request in {SCRAPE_TIMEOUT:?}");
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("metrics: the scraper went away: {e}");
                return;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => break answer(&request, daemon),
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                break response(1, "431 Request Header Fields Too Large", "text/plain", b"");
            }
            Err(e) => {
                let why = format!("{e}\n");
                break response(1, "400 Bad Request", "text/plain", why.as_bytes());
            }
        }
    };
    let mut rest = &answer[..];
    while !rest.is_empty() {
        if left(&stream, true).is_none() {
            tracing::debug!("metrics: a scraper took no whole answer in {SCRAPE_TIMEOUT:?}");
            return;
        }
        match stream.write(rest) {
            Ok(0) => return,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!("metrics: the scraper went away: {e}");
                return;
            }
        }
    }
}

/// The answer to a whole request head.
fn answer(request: &httparse::Request<'_, '_>, daemon: &Daemon) -> Vec<u8> {
    let version = request.version.unwrap_or(1);
    match (request.method, request.path) {
        (Some("GET"), Some("/metrics")) => response(
            version,
            "200 OK",
            CONTENT_TYPE,
            daemon.snapshot().text().as_bytes(),
        ),
        (Some("GET"), _) => response(
            version,
            "404 Not Found",
            "text/plain",
            b"not found: the metrics are at /metrics\n",
        ),
        _ => response(
            version,
            "405 Method Not Allowed",
            "text/plain",
            b"only GET\n",
        ),
    }
}

/// A whole HTTP/1.`version` response that closes the connection.
fn response(version: u8, status: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.{version} {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu::physical::PartitionSpec;
    use vgpu::sched::MemberStats;

    #[test]
    fn openmetrics_text_with_help_types_units_and_labels() {
        let snapshot = Snapshot {
            vgpus: vec![VgpuStats::new(
                "vm1",
                0,
                MemberStats {
                    busy_ns: 2_500_000_000,
                    window_share: 0.25,
                    switches: 7,
                    ..Default::default()
                },
                (3, 1, 0),
            )],
            partitions: vec![PartitionInfo {
                index: 0,
                spec: PartitionSpec {
                    engines: 2,
                    vram: 1 << 30,
                },
                vram_free: 768 << 20,
                policy: "best-effort".into(),
                slice_us: 2000,
                gpu: "soft (2 engines)".into(),
                poll_window_us: 300,
                poll_vgpu_percent: 25,
                poll_total_percent: 100,
                poll_ns: 0,
            }],
            attached: 1,
            version: "9.9.9",
        };
        let t = snapshot.text();
        for line in [
            "# HELP tessera_vgpu_busy_seconds GPU time the instance has had since it was created",
            "# TYPE tessera_vgpu_busy_seconds counter",
            "# UNIT tessera_vgpu_busy_seconds seconds",
            "tessera_vgpu_busy_seconds_total{vgpu=\"vm1\",partition=\"0\"} 2.5",
            "# TYPE tessera_vgpu_poll_cpu_seconds counter",
            "tessera_vgpu_poll_cpu_seconds_total{vgpu=\"vm1\",partition=\"0\"} 0.0",
            "# TYPE tessera_vgpu_share_ratio gauge",
            "tessera_vgpu_share_ratio{vgpu=\"vm1\",partition=\"0\"} 0.25",
            "tessera_vgpu_queue_depth{vgpu=\"vm1\",partition=\"0\"} 3.0",
            "tessera_vgpu_context_switches_total{vgpu=\"vm1\",partition=\"0\"} 7.0",
            "tessera_vgpu_faults_total{vgpu=\"vm1\",partition=\"0\"} 1.0",
            "tessera_partition_vram_bytes{partition=\"0\"} 1073741824.0",
            "tessera_partition_vram_free_bytes{partition=\"0\"} 805306368.0",
            "tessera_partition_slice_seconds{partition=\"0\"} 0.002",
            "tessera_partition_policy_info{partition=\"0\",policy=\"best-effort\",gpu=\"soft (2 engines)\"} 1.0",
            "tessera_server_instances 1.0",
            "tessera_server_attached_instances 1.0",
            "tessera_server_info{version=\"9.9.9\"} 1.0",
            "# EOF",
        ] {
            assert!(t.lines().any(|l| l == line), "no line {line:?} in:\n{t}");
        }
    }
}
