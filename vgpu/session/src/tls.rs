//! Sessions over TCP with mutual TLS (rustls, the ring provider, TLS 1.2 and 1.3).
//!
//! Both sides present a certificate and check the other's against a CA of their own: the
//! server its client CA, the client the CA that issued the server's certificate. A client
//! certificate also says which instances it may open: their names are DNS names in its
//! subjectAltName ([`names_instance`]). Certificates and keys come from PEM files
//! ([`TlsFiles`]); `tessera tls test-ca DIR` makes a set for trying it out.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::link::{Link, Tls};

/// The directory holding `ca.pem`, `client.pem` and `client-key.pem` (as `tessera tls
/// test-ca` writes them).
pub const TLS_DIR_ENV: &str = "TESSERA_TLS_DIR";
/// The CA file (overrides `$TESSERA_TLS_DIR/ca.pem`).
pub const TLS_CA_ENV: &str = "TESSERA_TLS_CA";
/// The certificate file (overrides `$TESSERA_TLS_DIR/client.pem`).
pub const TLS_CERT_ENV: &str = "TESSERA_TLS_CERT";
/// The key file (overrides `$TESSERA_TLS_DIR/client-key.pem`).
pub const TLS_KEY_ENV: &str = "TESSERA_TLS_KEY";

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM item of the kind needed.
    #[error("{path}: {what}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The client was not told where its files are.
    #[error(
        "no TLS files: set {TLS_DIR_ENV} (a directory with ca.pem, client.pem and \
         client-key.pem) or {TLS_CA_ENV}, {TLS_CERT_ENV} and {TLS_KEY_ENV}"
    )]
    NoFiles,
}

/// A CA, and this side's certificate chain and key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA whose certificates this side accepts from its peer.
    pub ca: PathBuf,
    /// This side's certificate (chain, end entity first).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// A client's files, from the environment.
    pub fn from_env() -> Result<TlsFiles, TlsError> {
        let var = |k| std::env::var_os(k).map(PathBuf::from);
        let dir = var(TLS_DIR_ENV);
        let pick = |k, name: &str| var(k).or_else(|| dir.as_ref().map(|d| d.join(name)));
        match (
            pick(TLS_CA_ENV, "ca.pem"),
            pick(TLS_CERT_ENV, "client.pem"),
            pick(TLS_KEY_ENV, "client-key.pem"),
        ) {
            (Some(ca), Some(cert), Some(key)) => Ok(TlsFiles { ca, cert, key }),
            _ => Err(TlsError::NoFiles),
        }
    }
}

/// The ring provider: X25519/P-256/P-384 key exchange, AES-GCM and ChaCha20-Poly1305. rustls
/// deprecates it for lacking the hybrid post-quantum exchange (X25519MLKEM768) of its
/// aws-lc-rs provider, which would add a large C and assembly build to every build of
/// Tessera; docs/architecture.md ("Sessions over TCP") records the choice.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| file_error(path, e))?;
    }
    Ok(Arc::new(roots))
}

fn config_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// A client's configuration: it trusts `files.ca` for the server and presents `files.cert`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots(&files.ca)?;
    let c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(config_error)?;
    Ok(Arc::new(c))
}

/// A server's configuration: it presents `files.cert` and requires a client certificate
/// that `files.ca` issued.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
            .build()
            .map_err(config_error)?;
    let c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(config_error)?;
    Ok(Arc::new(c))
}

/// A `tls://HOST:PORT/INSTANCE` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsAddr {
    /// The server's name (checked against its certificate) or address.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The instance to open.
    pub instance: String,
}

impl std::str::FromStr for TlsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected tls://HOST:PORT/INSTANCE");
        let rest = s.strip_prefix("tls://").ok_or_else(bad)?;
        let (hostport, instance) = rest.split_once('/').ok_or_else(bad)?;
        let (host, port) = hostport.rsplit_once(':').ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = port.parse().map_err(|_| bad())?;
        if host.is_empty() || instance.is_empty() || instance.contains('/') {
            return Err(bad());
        }
        Ok(TlsAddr {
            host: host.to_string(),
            port,
            instance: instance.to_string(),
        })
    }
}

/// Connects to `addr` and completes the handshake.
pub fn connect(addr: &TlsAddr, config: Arc<ClientConfig>) -> std::io::Result<Link> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let name = ServerName::try_from(addr.host.clone())
        .map_err(|e| invalid(format!("server name {:?}: {e}", addr.host)))?;
    let sock = TcpStream::connect((addr.host.as_str(), addr.port))?;
    // Small calls must not wait for Nagle; pipelined ones are batched by the link.
    sock.set_nodelay(true)?;
    let conn = ClientConnection::new(config, name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut tls = Tls::new(conn, sock);
    tls.handshake()?;
    Ok(Link::Tls(Box::new(tls)))
}

/// The server's side of a new connection: the handshake (the client's certificate checked
/// against the client CA), to be done by `deadline`, which stays set ([`Tls::set_deadline`]).
pub fn accept(
    sock: TcpStream,
    config: Arc<ServerConfig>,
    deadline: std::time::Instant,
) -> std::io::Result<Tls> {
    let conn = ServerConnection::new(config)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut tls = Tls::new(conn, sock);
    tls.set_deadline(Some(deadline))?;
    tls.handshake()?;
    Ok(tls)
}

/// Whether the client certificate `cert` names `instance` (a DNS name of its
/// subjectAltName).
pub fn names_instance(cert: &CertificateDer<'_>, instance: &str) -> bool {
    // An instance name is one label (letters, digits, '-', '_'): nothing DNS would read as
    // another name (a trailing dot, a wildcard).
    let plain = !instance.is_empty()
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let Ok(name) = ServerName::try_from(instance) else {
        return false;
    };
    if !plain {
        return false;
    }
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Reply, Request};
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    /// A CA, a server certificate for `localhost` and a client certificate naming
    /// `instances`, as files: (server's files, client's files, the directory).
    fn pki(instances: &[&str]) -> (TlsFiles, TlsFiles, tempfile::TempDir) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf = |names: Vec<String>, name: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            let (c, k) = (
                dir.path().join(format!("{name}.pem")),
                dir.path().join(format!("{name}-key.pem")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        };
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let (sc, sk) = leaf(vec!["localhost".into()], "server");
        let (cc, ck) = leaf(instances.iter().map(|s| s.to_string()).collect(), "client");
        (
            TlsFiles {
                ca: ca_file.clone(),
                cert: sc,
                key: sk,
            },
            TlsFiles {
                ca: ca_file,
                cert: cc,
                key: ck,
            },
            dir,
        )
    }

    #[test]
    fn a_client_certificate_names_its_instances_and_no_others() {
        let (_, client, _dir) = pki(&["c1", "tenant_2"]);
        let cert = certs(&client.cert).unwrap().remove(0);
        assert!(names_instance(&cert, "c1"));
        assert!(
            names_instance(&cert, "tenant_2"),
            "instance names may hold '_'"
        );
        for other in ["c2", "c", "c1.", "", "C1x", "*"] {
            assert!(!names_instance(&cert, other), "{other:?}");
        }
    }

    #[test]
    fn frames_cross_a_tls_link_both_ways_pipelined() {
        let (server, client, _dir) = pki(&["c1"]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = server_config(&server).unwrap();
        let srv = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut link = Link::Tls(Box::new(accept(sock, config, deadline).unwrap()));
            for _ in 0..100 {
                let (req, _) = link.recv::<Request>().unwrap();
                let Request::Free { buffer } = req else {
                    panic!("{req:?}")
                };
                link.send(&Reply::Buffer { buffer, size: 0 }, None).unwrap();
            }
            link.flush().unwrap();
        });
        let addr = TlsAddr {
            host: "localhost".into(),
            port,
            instance: "c1".into(),
        };
        let mut link = connect(&addr, client_config(&client).unwrap()).unwrap();
        for buffer in 0..100 {
            link.send(&Request::Free { buffer }, None).unwrap();
        }
        for want in 0..100 {
            let (r, _) = link.recv::<Reply>().unwrap();
            assert_eq!(
                r,
                Reply::Buffer {
                    buffer: want,
                    size: 0
                }
            );
        }
        srv.join().unwrap();
    }

    #[test]
    fn a_handshake_that_trickles_ends_at_its_deadline() {
        let (server, _, _dir) = pki(&["c1"]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let trickle = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            // A TLS record header, then a byte now and then: never a whole ClientHello.
            for b in [22u8, 3, 1, 0x40, 0].iter().cycle().take(40) {
                if std::io::Write::write_all(&mut s, &[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (sock, _) = listener.accept().unwrap();
        let started = Instant::now();
        let r = accept(
            sock,
            server_config(&server).unwrap(),
            started + Duration::from_millis(400),
        );
        let took = started.elapsed();
        assert_eq!(
            r.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::TimedOut)
        );
        assert!(took < Duration::from_millis(1500), "took {took:?}");
        trickle.join().unwrap();
    }

    #[test]
    fn addresses() {
        let a: TlsAddr = "tls://gpuhost:7070/c1".parse().unwrap();
        assert_eq!(
            a,
            TlsAddr {
                host: "gpuhost".into(),
                port: 7070,
                instance: "c1".into()
            }
        );
        let a: TlsAddr = "tls://[::1]:7/x".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 7));
        for bad in [
            "tls://h:1",
            "tls://h/x",
            "tls://:1/x",
            "tls://h:port/x",
            "tls://h:1/",
            "tls://h:1/a/b",
            "unix:/x",
        ] {
            assert!(bad.parse::<TlsAddr>().is_err(), "{bad}");
        }
    }
}
