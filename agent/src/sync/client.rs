//! The HTTPS client the agent talks to the manager with, and what it needs: the manager's URL
//! (checked: `http://` only to a loopback address, so a credential never crosses a network in
//! clear), the TLS configuration (rustls with the ring provider named explicitly, because the
//! process links more than one and rustls refuses to pick; the web PKI roots plus the
//! configured CA), and the bearer credential.

use std::{
    io,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use reqwest::{
    Url,
    header::{HeaderValue, InvalidHeaderValue},
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};

/// Connection establishment limit (the stream itself has no overall limit).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive on the stream's connection, so a silently vanished peer is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Errors setting up the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not usable.
    #[error("manager URL `{url}`: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The CA file could not be read or holds no certificate.
    #[error("CA certificate file {path}: {reason}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls or reqwest refused the configuration.
    #[error("building the HTTPS client: {0}")]
    Build(String),
    /// The credential file could not be read.
    #[error(
        "reading the manager credential {path}; enroll the agent first (`mirage-agent enroll`)"
    )]
    Credential {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The credential file is empty or not a header value.
    #[error("the manager credential in {path} is empty or malformed; enroll again")]
    CredentialInvalid {
        /// The file.
        path: PathBuf,
    },
}

/// Parses and checks the manager's base URL: `https://`, or `http://` to a loopback address.
pub fn manager_url(url: &str) -> Result<Url, ClientError> {
    let bad = |reason: &str| ClientError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("must not carry a user name or password"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    match parsed.scheme() {
        "https" => {}
        "http" => {
            let loopback = match literal_host(&parsed) {
                Some(ip) => ip.is_loopback(),
                None => parsed
                    .host_str()
                    .is_some_and(|h| h.eq_ignore_ascii_case("localhost")),
            };
            if !loopback {
                return Err(bad(
                    "http:// is accepted only to a loopback address; use https://",
                ));
            }
        }
        _ => return Err(bad("must start with https:// or http://")),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(parsed)
}

/// `base` + `path` (`api/v1/...`), keeping any path prefix of `base`.
pub fn endpoint(base: &Url, path: &str) -> String {
    format!("{}/{path}", base.as_str().trim_end_matches('/'))
}

/// The manager's host as an address, when the URL names one literally.
pub fn literal_host(base: &Url) -> Option<IpAddr> {
    let host = base.host_str()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

/// The HTTPS client: rustls with ring, the web PKI roots plus `ca`, HTTP/1.1, no redirects (the
/// credential is for the configured manager only).
pub fn client(ca: Option<&Path>) -> Result<reqwest::Client, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca {
        let ca_err = |reason: String| ClientError::Ca {
            path: path.to_owned(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no PEM certificate in it".to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Build(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(TCP_KEEPALIVE)
        .user_agent(concat!("mirage-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ClientError::Build(e.to_string()))
}

/// Reads the credential file into an `Authorization` value (marked sensitive, so it is never
/// logged by the HTTP stack). Warns if others may read the file.
pub fn bearer(path: &Path) -> Result<HeaderValue, ClientError> {
    let meta = std::fs::metadata(path).map_err(|source| ClientError::Credential {
        path: path.to_owned(),
        source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "The manager credential file is readable by others; `chmod 600` it."
        );
    }
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::Credential {
        path: path.to_owned(),
        source,
    })?;
    let credential = text.trim();
    let invalid = |_: InvalidHeaderValue| ClientError::CredentialInvalid {
        path: path.to_owned(),
    };
    if credential.is_empty() {
        return Err(ClientError::CredentialInvalid {
            path: path.to_owned(),
        });
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {credential}")).map_err(invalid)?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn http_only_to_loopback() {
        for ok in [
            "https://manager.example:8443",
            "https://192.0.2.1",
            "http://127.0.0.1:8443",
            "http://[::1]:8443/",
            "http://localhost:8443/prefix",
        ] {
            assert!(manager_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://192.0.2.1:8443",
            "http://manager.example",
            "ftp://127.0.0.1",
            "https://user:pw@manager.example",
            "https://manager.example/?x=1",
            "not a url",
        ] {
            assert!(manager_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_keep_the_prefix() {
        let u = manager_url("https://m.example:8443/mirage/").unwrap();
        assert_eq!(
            endpoint(&u, "api/v1/agent/stream"),
            "https://m.example:8443/mirage/api/v1/agent/stream"
        );
        let u = manager_url("http://127.0.0.1:9").unwrap();
        assert_eq!(endpoint(&u, "api/v1/x"), "http://127.0.0.1:9/api/v1/x");
        assert_eq!(literal_host(&u), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(
            literal_host(&manager_url("https://m.example").unwrap()),
            None
        );
    }

    #[test]
    fn reads_the_credential_and_marks_it_sensitive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credential");
        assert!(matches!(bearer(&path), Err(ClientError::Credential { .. })));
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "  s3cret  ").unwrap();
        let v = bearer(&path).unwrap();
        assert!(v.is_sensitive());
        assert_eq!(v.to_str().unwrap(), "Bearer s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            bearer(&path),
            Err(ClientError::CredentialInvalid { .. })
        ));
        std::fs::write(&path, "a\nb").unwrap();
        assert!(bearer(&path).is_err());
    }

    #[test]
    fn builds_with_and_without_a_ca() {
        assert!(client(None).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        assert!(matches!(client(Some(&path)), Err(ClientError::Ca { .. })));
    }
}
