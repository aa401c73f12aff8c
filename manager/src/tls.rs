//! HTTPS for the listener: the certificate chain and key from `[tls]`, served with rustls.
//!
//! The crypto provider is chosen here (ring) rather than left to rustls' process default: several
//! crates in the build enable providers, and with more than one enabled rustls refuses to pick.
//! TLS 1.2 and 1.3 with rustls' safe defaults; HTTP/1.1 only (what the router speaks).

use std::{path::Path, sync::Arc};

use axum_server::tls_rustls::RustlsConfig;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};

use crate::config::TlsConfig;

/// Errors loading the certificate or key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("reading {what} from {path}: {reason}")]
    Pem {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The file holds no certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificate(String),
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("the certificate and key in [tls] do not form a usable pair")]
    Rustls(#[source] rustls::Error),
}

/// Loads `[tls]` into a server configuration.
pub fn load(tls: &TlsConfig) -> Result<RustlsConfig, TlsError> {
    let certs = certificates(&tls.cert)?;
    let key = private_key(&tls.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(RustlsConfig::from_config(Arc::new(config)))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|err| TlsError::Pem {
            what: "certificate",
            path: path.display().to_string(),
            reason: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.display().to_string()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|err| TlsError::Pem {
        what: "private key",
        path: path.display().to_string(),
        reason: err.to_string(),
    })
}

/// Serves `app` on `listener` until `shutdown` completes: HTTPS when `tls` is given, plain HTTP
/// otherwise. Open connections get up to [`DRAIN`] to finish after `shutdown` (the policy
/// streams end on their own when the bus closes).
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Option<RustlsConfig>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use std::net::SocketAddr;
    listener.set_nonblocking(true)?;
    let make = app.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, make)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(tls) => {
            let handle = axum_server::Handle::new();
            let signal = handle.clone();
            tokio::spawn(async move {
                shutdown.await;
                signal.graceful_shutdown(Some(DRAIN));
            });
            axum_server::from_tcp_rustls(listener, tls)?
                .handle(handle)
                .serve(make)
                .await
        }
    }
}

/// How long open connections may finish after shutdown under TLS.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);
