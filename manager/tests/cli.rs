//! The `mirage-manager` binary: `create-admin` against a test database, and `serve` end to end
//! with its own embedded cluster (first start with a printed admin password, login over real
//! HTTP, clean stop on SIGTERM (also with an agent policy stream open), recovery after being
//! killed).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use manager::{
    db,
    test_util::{TestDb, temp_dir},
};

const BIN: &str = env!("CARGO_BIN_EXE_mirage-manager");
const PASSWORD: &str = "a long enough password";

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("manager.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn create_admin(config: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(BIN)
        .arg("create-admin")
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

async fn password_matches(pool: &sqlx::PgPool, username: &str, password: &str) -> bool {
    let (_, hash) = db::users::find_with_hash(pool, username)
        .await
        .unwrap()
        .unwrap();
    manager::auth::password::verify(password, &hash)
}

#[tokio::test]
async fn create_admin_reads_stdin_or_prints_a_generated_password() {
    let db = TestDb::new().await;
    let dir = temp_dir();
    let config = write_config(dir.path(), &format!("database_url = \"{}\"\n", db.url));

    let out = create_admin(
        &config,
        &["--username", "ops", "--password-stdin"],
        Some(&format!("{PASSWORD}\n")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "admin `ops` ready"
    );
    assert!(password_matches(&db.pool, "ops", PASSWORD).await);

    let out = create_admin(&config, &["--username", "gen"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let generated = stdout.trim().rsplit(' ').next().unwrap();
    assert!(stdout.contains("shown once"), "{stdout}");
    assert!(password_matches(&db.pool, "gen", generated).await);

    let out = create_admin(
        &config,
        &["--username", "ops", "--password-stdin"],
        Some(&format!("{PASSWORD}\n")),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reset"));
    let out = create_admin(&config, &["--username", "x", "--password-stdin"], Some(""));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no password on standard input"));
}

/// A `mirage-manager serve` child, killed on drop if still running; its stderr is collected.
struct Server {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "manager=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_healthy(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http(addr, "GET", "/healthz", None) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the manager exited ({status}):\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "not healthy in time:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&mut self, signal: libc::c_int) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_with(addr, method, path, "", json).map(|(status, _, body)| (status, body))
}

/// Like [`http`], with extra header lines (each ending in `\r\n`): (status, head, body).
fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    json: Option<&str>,
) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = json.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_owned(), b.to_owned()))
        .unwrap_or_default();
    Ok((status, head, body))
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postgres/data/postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

#[test]
fn serve_owns_its_cluster_from_first_start_to_sigterm() {
    let dir = temp_dir();
    let data_dir = dir.path().join("data");
    let addr = free_port();
    let config = write_config(
        dir.path(),
        &format!(
            "listen = \"{addr}\"\ndata_dir = \"{}\"\ncookie_secure = false\n",
            data_dir.display()
        ),
    );

    // First start: a new cluster, and the first admin's password on stderr, once.
    let mut server = Server::start(&config);
    server.wait_healthy(addr);
    let stderr = server.stderr();
    let password = stderr
        .lines()
        .skip_while(|l| !l.contains("with password:"))
        .find_map(|l| l.strip_prefix("    "))
        .unwrap_or_else(|| panic!("no password in:\n{stderr}"))
        .to_owned();
    let login = format!("{{\"username\":\"admin\",\"password\":\"{password}\"}}");
    let (status, body) = http(addr, "POST", "/api/v1/login", Some(&login)).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("csrf_token"));
    let (status, _) = http(addr, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    let pid = postmaster_pid(&data_dir).unwrap();
    let exit = server.signal(libc::SIGTERM);
    assert!(exit.success(), "{exit}:\n{}", server.stderr());
    assert!(
        postmaster_pid(&data_dir).is_none(),
        "the cluster is stopped with the manager"
    );
    assert!(server.stderr().contains("Embedded PostgreSQL stopped."));
    drop(server);

    // Killed: the postmaster outlives the manager; the next start takes it over.
    let mut server = Server::start(&config);
    server.wait_healthy(addr);
    assert!(
        !server.stderr().contains("with password:"),
        "no second bootstrap"
    );
    let orphan = postmaster_pid(&data_dir).unwrap();
    assert_ne!(orphan, pid);
    server.signal(libc::SIGKILL);
    drop(server);
    let mut server = Server::start(&config);
    server.wait_healthy(addr);
    assert!(
        server
            .stderr()
            .contains("left running by an earlier manager"),
        "{}",
        server.stderr()
    );
    let (status, _) = http(addr, "POST", "/api/v1/login", Some(&login)).unwrap();
    assert_eq!(status, 200);
    // create-admin next to the running manager attaches to its cluster and leaves it running.
    let out = create_admin(
        &config,
        &["--username", "ops", "--password-stdin"],
        Some(PASSWORD),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("attaching"));
    let ops = format!("{{\"username\":\"ops\",\"password\":\"{PASSWORD}\"}}");
    let (status, _) = http(addr, "POST", "/api/v1/login", Some(&ops)).unwrap();
    assert_eq!(status, 200);
    assert!(server.signal(libc::SIGINT).success());
    assert!(postmaster_pid(&data_dir).is_none());
}

/// A string field of a JSON body.
fn json_field(body: &str, key: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).unwrap();
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {body}"))
        .to_owned()
}

#[test]
fn serve_ends_open_policy_streams_at_sigterm() {
    let dir = temp_dir();
    let addr = free_port();
    let config = write_config(
        dir.path(),
        &format!(
            "listen = \"{addr}\"\ndata_dir = \"{}\"\ncookie_secure = false\n",
            dir.path().join("data").display()
        ),
    );
    let mut server = Server::start(&config);
    server.wait_healthy(addr);
    let stderr = server.stderr();
    let password = stderr
        .lines()
        .skip_while(|l| !l.contains("with password:"))
        .find_map(|l| l.strip_prefix("    "))
        .unwrap()
        .to_owned();
    let login = format!("{{\"username\":\"admin\",\"password\":\"{password}\"}}");
    let (status, head, body) = http_with(addr, "POST", "/api/v1/login", "", Some(&login)).unwrap();
    assert_eq!(status, 200, "{body}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    let csrf = json_field(&body, "csrf_token");
    let auth = format!("Cookie: {cookie}\r\nX-CSRF-Token: {csrf}\r\n");
    let (status, _, body) =
        http_with(addr, "POST", "/api/v1/enrollment-tokens", &auth, Some("{}")).unwrap();
    assert_eq!(status, 201, "{body}");
    let enroll = format!(
        "{{\"token\":\"{}\",\"hostname\":\"web-1\"}}",
        json_field(&body, "token")
    );
    let (status, _, body) =
        http_with(addr, "POST", "/api/v1/agent/enroll", "", Some(&enroll)).unwrap();
    assert_eq!(status, 201, "{body}");
    let credential = json_field(&body, "credential");

    // An agent holds its stream open...
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET /api/v1/agent/stream HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {credential}\r\n\r\n"
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("event: snapshot") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");

    // ...and SIGTERM still stops the manager promptly, ending the stream.
    let pid = libc::pid_t::try_from(server.child.id()).unwrap();
    // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the manager did not stop with a stream open:\n{}",
            server.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit}:\n{}", server.stderr());
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}
