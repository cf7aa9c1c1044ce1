//! `tessera tls test-ca DIR`: a CA, a server certificate and a client certificate for trying
//! sessions over TCP with mutual TLS (`tessera serve --session-tls`, `TESSERA_DEVICE=tls://…`).
//! For tests and first steps; a deployment uses its own PKI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::{EXIT_FAILURE, EXIT_USAGE};

/// `tessera tls`.
#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a test CA and certificates signed by it, as PEM files in DIR: ca.pem (give it to
    /// both sides), server.pem and server-key.pem (`tessera serve --tls-cert --tls-key`;
    /// --tls-client-ca ca.pem), client.pem and client-key.pem (TESSERA_TLS_DIR=DIR).
    TestCa(TestCaArgs),
}

/// Options of `tessera tls test-ca`.
#[derive(Debug, Args)]
pub struct TestCaArgs {
    /// Where the files go (created if missing; keys are mode 0600).
    dir: PathBuf,
    /// Names clients reach the server by (DNS names or IP addresses), repeatable.
    #[arg(long = "server-name", value_name = "NAME", default_values = ["localhost", "127.0.0.1", "::1"])]
    server_names: Vec<String>,
    /// Instances the client certificate may open, repeatable.
    #[arg(long = "instance", value_name = "NAME", required = true)]
    instances: Vec<String>,
    /// Replace files already in DIR.
    #[arg(long)]
    force: bool,
}

pub fn run(cmd: TlsCommand) -> ExitCode {
    match cmd {
        TlsCommand::TestCa(a) => {
            if !a.force && a.dir.join("ca.pem").exists() {
                eprintln!(
                    "tessera: {} already holds a CA (--force replaces it)",
                    a.dir.display()
                );
                return ExitCode::from(EXIT_USAGE);
            }
            match test_ca(&a.dir, &a.server_names, &a.instances) {
                Ok(()) => {
                    println!("{}", a.dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tessera: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

/// Writes a fresh CA and its server and client certificates into `dir`.
pub(crate) fn test_ca(dir: &Path, server: &[String], instances: &[String]) -> Result<(), String> {
    let make = |e: rcgen::Error| format!("cannot make a certificate: {e}");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    let ca_key = KeyPair::generate().map_err(make)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(make)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: a client certificate from another test CA must not even match
    // this one's name.
    let cn = format!("Tessera test CA {}", uuid::Uuid::new_v4().simple());
    ca.distinguished_name.push(DnType::CommonName, cn);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(make)?;

    let leaf = |names: &[String], cn: &str, usage| -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(make)?;
        let mut p = CertificateParams::new(names.to_vec()).map_err(make)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(make)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) =
        leaf(server, "tessera serve", ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_pem, client_key) = leaf(
        instances,
        "tessera client",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    for (name, text, secret) in [
        ("ca.pem", ca_cert.pem(), false),
        ("ca-key.pem", ca_key.serialize_pem(), true),
        ("server.pem", server_pem, false),
        ("server-key.pem", server_key, true),
        ("client.pem", client_pem, false),
        ("client-key.pem", client_key, true),
    ] {
        write(&dir.join(name), &text, if secret { 0o600 } else { 0o644 })?;
    }
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    // A file that existed keeps its mode on open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}
