//! Test PKI made with rcgen: a CA, a server certificate for `localhost`, agent client
//! certificates and one from a foreign CA, written where a `[tls]` section can name them; and
//! the client side of a TLS connection with or without a client certificate.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use server::config::TlsConfig;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

/// A client certificate and its key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: Vec<u8>,
}

/// Everything TLS: the files the server reads and the client identities.
pub struct Pki {
    _dir: TempDir,
    pub tls: TlsConfig,
    pub ca: CertificateDer<'static>,
    /// SAN `web-1`, CN `web-1.example`.
    pub agent: Identity,
    /// No SAN, CN `db-2`.
    pub cn_only: Identity,
    /// SAN `web-1`, but signed by another CA.
    pub foreign: Identity,
}

pub fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

pub fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    cn: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
) -> (rcgen::Certificate, KeyPair) {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert, key)
}

pub fn identity(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    cn: Option<&str>,
) -> Identity {
    let (cert, key) = leaf(issuer, sans, cn, ExtendedKeyUsagePurpose::ClientAuth);
    Identity {
        cert: cert.der().clone(),
        key: key.serialize_der(),
    }
}

pub fn pki(allow_anonymous: bool) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("Mirage agents CA");
    let (server_cert, server_key) = leaf(
        &ca,
        &["localhost", "127.0.0.1"],
        Some("mirage-server"),
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let path = |name: &str| -> PathBuf { dir.path().join(name) };
    std::fs::write(path("server.crt"), server_cert.pem()).unwrap();
    std::fs::write(path("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(path("ca.crt"), ca.pem()).unwrap();
    let agent = identity(&ca, &["web-1"], Some("web-1.example"));
    let cn_only = identity(&ca, &[], Some("db-2"));
    let foreign = identity(&self::ca("Someone else's CA"), &["web-1"], None);
    Pki {
        tls: TlsConfig {
            cert: path("server.crt"),
            key: path("server.key"),
            client_ca: path("ca.crt"),
            allow_anonymous,
        },
        ca: ca.der().clone(),
        agent,
        cn_only,
        foreign,
        _dir: dir,
    }
}

pub fn client_tls(pki: &Pki, identity: Option<&Identity>) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                vec![id.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

/// Connects and completes the client side of the handshake (with TLS 1.3 the server may still
/// refuse the client's certificate after that).
pub async fn tls_connect(
    addr: SocketAddr,
    pki: &Pki,
    identity: Option<&Identity>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    client_tls(pki, identity)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}
