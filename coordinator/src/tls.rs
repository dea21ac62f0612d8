//! TLS for the gRPC server (`[server] tls_cert`, `tls_key`, `tls_client_ca`): read and checked
//! before the job starts, so a missing or unreadable file is an error naming its key.
use mtl_job::ServerSection;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::CoordinatorError;

/// The server's TLS configuration, or `None` when `[server]` asks for plain HTTP/2.
pub(crate) fn server_config(server: &ServerSection) -> Result<Option<ServerTlsConfig>, CoordinatorError> {
    if server.tls_cert.is_empty() {
        return Ok(None);
    }
    let cert = read_pem("server.tls_cert", &server.tls_cert, "CERTIFICATE")?;
    let key = read_pem("server.tls_key", &server.tls_key, "PRIVATE KEY")?;
    let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if !server.tls_client_ca.is_empty() {
        let ca = read_pem("server.tls_client_ca", &server.tls_client_ca, "CERTIFICATE")?;
        cfg = cfg.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(Some(cfg))
}

/// Reads a PEM file and checks that it holds a `kind` block (`-----BEGIN ...kind-----`).
fn read_pem(key: &'static str, path: &str, kind: &str) -> Result<Vec<u8>, CoordinatorError> {
    let tls = |message: String| CoordinatorError::Tls { key, path: path.into(), message };
    let pem = std::fs::read(path).map_err(|e| tls(e.to_string()))?;
    let text = String::from_utf8_lossy(&pem);
    let has_block = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.trim_end().ends_with(&format!("{kind}-----")));
    if !has_block {
        return Err(tls(format!("no PEM block ending in `{kind}` (expected -----BEGIN ...{kind}-----)")));
    }
    Ok(pem)
}
