//! Connecting to the coordinator, over TLS when its URL is `https://`. One place for the worker
//! and `coordinator status`, so both read the same flags and fail with the same messages.
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::v1::coordinator_client::CoordinatorClient;

/// What a client trusts and shows over TLS (`--ca`, `--client-cert`, `--client-key`).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA that signed the coordinator's certificate (PEM). Without it, the system's roots.
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a coordinator that requires mutual TLS.
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `cert`.
    pub key: Option<PathBuf>,
}

impl ClientTls {
    fn is_given(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    fn config(&self) -> Result<ClientTlsConfig, String> {
        let mut cfg = ClientTlsConfig::new();
        cfg = match &self.ca {
            Some(ca) => cfg.ca_certificate(Certificate::from_pem(read("--ca", ca)?)),
            None => cfg.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                cfg =
                    cfg.identity(Identity::from_pem(read("--client-cert", cert)?, read("--client-key", key)?))
            }
            (None, None) => {}
            _ => return Err("--client-cert and --client-key go together".into()),
        }
        Ok(cfg)
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// Connects to the coordinator at `url` (`http://` or `https://`), with messages up to
/// [`crate::MAX_MESSAGE_BYTES`] both ways. The error says what to fix: a file that cannot be
/// read, a URL that does not match the flags, a certificate that is not trusted.
pub async fn connect(url: &str, tls: &ClientTls) -> Result<CoordinatorClient<Channel>, String> {
    let mut endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| format!("bad URL {url}: {e}"))?;
    if url.starts_with("https://") {
        endpoint = endpoint.tls_config(tls.config()?).map_err(|e| describe(&e))?;
    } else if tls.is_given() {
        return Err(format!("TLS flags were given but {url} is not an https:// URL"));
    }
    let channel = endpoint.connect().await.map_err(|e| {
        let cause = describe(&e);
        if cause.contains("certificate") || cause.contains("UnknownIssuer") {
            format!("{cause}: the coordinator's TLS certificate is not trusted; pass the CA that signed it with --ca")
        } else {
            cause
        }
    })?;
    Ok(CoordinatorClient::new(channel)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES))
}

/// A failed call's message with its transport causes, and what to do about a TLS refusal (a
/// coordinator with mutual TLS refuses a client without a certificate only at its first call:
/// the handshake of TLS 1.3 ends before the server checks the client's certificate).
pub fn describe_status(status: &tonic::Status) -> String {
    let mut out = status.message().to_string();
    if let Some(source) = std::error::Error::source(status) {
        out = format!("{out}: {}", describe(source));
    }
    if out.contains("CertificateRequired") {
        out.push_str(": the coordinator requires a client certificate; pass --client-cert and --client-key");
    } else if out.contains("UnknownCA") || out.contains("BadCertificate") {
        out.push_str(": the coordinator does not trust this client's certificate (--client-cert)");
    } else if std::error::Error::source(status).is_some() {
        // The connection broke during the call. Over mutual TLS the alert that says why does
        // not always arrive before the close.
        out.push_str(
            " (if the coordinator uses mutual TLS, server.tls_client_ca, it drops clients without a \
             certificate it trusts: pass --client-cert and --client-key)",
        );
    }
    out
}

/// An error with its causes, outermost first: tonic's transport error says only "transport
/// error"; what went wrong is in its sources.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
