//! HTTPS on the manager's listener: a certificate made here with rcgen, the real router over a
//! real PostgreSQL, a real TLS client.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::path::Path;

use manager::{ManagerConfig, app, config::TlsConfig, test_util::TestDb, tls};

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM into `dir`.
fn certificate(dir: &Path) -> (TlsConfig, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let pem = cert.cert.pem();
    std::fs::write(dir.join("cert.pem"), &pem).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    (
        TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        },
        pem,
    )
}

#[tokio::test]
async fn serves_https_and_refuses_plain_http() {
    let dir = tempfile_dir();
    let (config, pem) = certificate(dir.path());
    let db = TestDb::new().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tls::serve(
        listener,
        Some(tls::load(&config).unwrap()),
        app(db.state()),
        async move {
            let _ = stopped.await;
        },
    ));

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://localhost:{}/healthz", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A client that does not trust the certificate gets no answer.
    let untrusting = reqwest::Client::new();
    assert!(
        untrusting
            .get(format!("https://localhost:{}/healthz", addr.port()))
            .send()
            .await
            .is_err()
    );
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", addr.port()))
        .send()
        .await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "{plain:?}"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
}

#[test]
fn bad_certificates_are_clear_errors() {
    let dir = tempfile_dir();
    let (good, _) = certificate(dir.path());
    let missing = TlsConfig {
        cert: dir.path().join("absent.pem"),
        key: good.key.clone(),
    };
    let err = tls::load(&missing).unwrap_err().to_string();
    assert!(err.contains("absent.pem"), "{err}");

    // A key that belongs to another certificate.
    let other = rcgen::generate_simple_self_signed(vec!["other".to_owned()]).unwrap();
    std::fs::write(
        dir.path().join("other-key.pem"),
        other.signing_key.serialize_pem(),
    )
    .unwrap();
    let mismatched = TlsConfig {
        cert: good.cert.clone(),
        key: dir.path().join("other-key.pem"),
    };
    let err = tls::load(&mismatched).unwrap_err().to_string();
    assert!(err.contains("do not form a usable pair"), "{err}");

    // Not a certificate at all.
    std::fs::write(dir.path().join("junk.pem"), "not pem").unwrap();
    let junk = TlsConfig {
        cert: dir.path().join("junk.pem"),
        key: good.key,
    };
    assert!(tls::load(&junk).is_err());
}

#[test]
fn non_loopback_listen_needs_tls() {
    let plain = "listen = \"0.0.0.0:8443\"".parse::<ManagerConfig>();
    assert!(plain.unwrap_err().to_string().contains("listen"));
    let with_tls = "listen = \"0.0.0.0:8443\"\n[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\""
        .parse::<ManagerConfig>()
        .unwrap();
    assert!(with_tls.tls.is_some());
}

fn tempfile_dir() -> tempfile::TempDir {
    manager::test_util::temp_dir()
}
