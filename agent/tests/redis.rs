//! The Redis collector against a real `redis-server` (Debian package `redis-server`, installed
//! by `cargo xtask setup`), started by each test on a free loopback port with `--requirepass`,
//! no persistence, its own directory, and killed by PID when the test ends. A system Redis, if
//! one runs, is never touched.
//!
//! Commands run by a client appear as `MONITOR` lines in `redis-cli MONITOR`'s format, failed
//! `AUTH` attempts as `ACL LOG` lines, both recognised by the server's real rule set; the
//! collector survives a Redis restart, authenticates as a minimal ACL user, and keeps retrying
//! with a wrong password until the password file is fixed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agent::{
    config::links::RedisSource,
    logs::{
        LogLine, Sink,
        redis::{
            self,
            resp::{Decoder, Limits, Value, encode_command},
        },
    },
};
use server::rules::{Extracted, RuleSet};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, watch},
    task::JoinHandle,
};

const PASSWORD: &str = "requirepass-Zq8";
const DEADLINE: Duration = Duration::from_secs(20);

/// A `redis-server` of the test's own; killed (by its PID) on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts one on a free port.
    async fn start(dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(dir, port).await
    }

    /// Starts one on `port` (again, after [`stop`](Self::stop)).
    async fn start_on(dir: &Path, port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--requirepass", PASSWORD])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run redis-server ({err}): install the Debian package redis-server \
                     (`cargo xtask setup` does)"
                )
            });
        let mut server = Self {
            child: Some(child),
            port,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(Ok(Some(status))) = server.child.as_mut().map(Child::try_wait) {
                panic!(
                    "redis-server exited ({status}); see {}",
                    dir.join("redis.log").display()
                );
            }
            if let Ok(mut c) = Client::connect(&server.address()).await
                && c.call(&["AUTH", PASSWORD]).await == Value::Simple(b"OK".to_vec())
                && c.call(&["PING"]).await == Value::Simple(b"PONG".to_vec())
            {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start; see {}",
                dir.join("redis.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills it and waits until it is gone.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// An admin connection (authenticated).
    async fn admin(&self) -> Client {
        let mut c = Client::connect(&self.address()).await.unwrap();
        assert_eq!(c.call(&["AUTH", PASSWORD]).await, ok());
        c
    }

    /// Waits until `CLIENT LIST` shows `n` connections whose line contains `what`.
    async fn wait_clients(&self, what: &str, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        let mut admin = self.admin().await;
        loop {
            let Value::Bulk(list) = admin.call(&["CLIENT", "LIST"]).await else {
                panic!("CLIENT LIST");
            };
            let list = String::from_utf8(list).unwrap();
            if list.lines().filter(|l| l.contains(what)).count() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {n} clients with {what}:\n{list}\nlog: {}",
                self.dir.join("redis.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ok() -> Value {
    Value::Simple(b"OK".to_vec())
}

/// A plain RESP client, as an application or an attacker would connect.
struct Client {
    stream: TcpStream,
    dec: Decoder,
}

impl Client {
    async fn connect(address: &str) -> std::io::Result<Self> {
        Ok(Self {
            stream: TcpStream::connect(address).await?,
            dec: Decoder::new(Limits::default()),
        })
    }

    fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().unwrap()
    }

    async fn call(&mut self, args: &[&str]) -> Value {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.stream.write_all(&encode_command(&args)).await.unwrap();
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(v) = self.dec.decode().unwrap() {
                return v;
            }
            let n = tokio::time::timeout(DEADLINE, self.stream.read(&mut buf))
                .await
                .expect("a reply")
                .unwrap();
            assert!(n > 0, "redis closed the connection");
            self.dec.feed(&buf[..n]);
        }
    }
}

/// A running collector and the lines it shipped.
struct Collector {
    lines: mpsc::UnboundedReceiver<LogLine>,
    seen: Vec<LogLine>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Collector {
    fn start(cfg: RedisSource, state_dir: &Path) -> Self {
        let (sink, mut requests) = Sink::channel(16);
        let (tx, lines) = mpsc::unbounded_channel();
        // The shipper's part: take each batch, acknowledge it as durably queued.
        tokio::spawn(async move {
            while let Some((batch, done)) = requests.recv().await {
                for line in batch {
                    let _ = tx.send(line);
                }
                let _ = done.send(Ok(()));
            }
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(redis::run(cfg, sink, state_dir.to_owned(), stop_rx));
        Self {
            lines,
            seen: Vec::new(),
            stop,
            task,
        }
    }

    /// Waits for a shipped line that satisfies `pred` (lines before it are kept in `seen`).
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&LogLine) -> bool) -> LogLine {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no line {what}; shipped: {:#?}", self.seen))
                .expect("the collector's sink is open");
            self.seen.push(line.clone());
            if pred(&line) {
                return line;
            }
        }
    }

    /// Takes every line shipped so far without waiting.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    async fn stop(self) -> Vec<LogLine> {
        let Self {
            mut lines,
            mut seen,
            stop,
            task,
        } = self;
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the collector stops")
            .expect("the collector does not panic");
        while let Ok(line) = lines.try_recv() {
            seen.push(line);
        }
        seen
    }
}

fn password_file(dir: &Path, password: &str) -> PathBuf {
    let path = dir.join("redis-password");
    std::fs::write(&path, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `1795831163.631456`: Unix seconds with six decimals.
fn is_monitor_timestamp(ts: &str) -> bool {
    ts.split_once('.').is_some_and(|(s, us)| {
        !s.is_empty() && us.len() == 6 && s.bytes().chain(us.bytes()).all(|b| b.is_ascii_digit())
    })
}

/// The MONITOR line of `client` with these quoted arguments (timestamp aside).
fn monitor_line_for(client: SocketAddr, args: &str) -> impl Fn(&LogLine) -> bool {
    let tail = format!(" [0 {client}] {args}");
    move |l: &LogLine| {
        l.source == "redis:monitor" && l.line.strip_suffix(&tail).is_some_and(is_monitor_timestamp)
    }
}

/// The ACL LOG line of a failed AUTH by `client`.
fn acl_auth_failure_of(client: SocketAddr) -> impl Fn(&LogLine) -> bool {
    let addr = format!(" addr={client} ");
    move |l: &LogLine| {
        l.source == "redis:acl-log"
            && l.line.starts_with("id=")
            && l.line.contains(&addr)
            && l.line.contains(" cmd=auth ")
    }
}

/// (rule id, address) of every match of the server's built-in rules on `line`.
fn rule_hits(rules: &RuleSet, line: &str) -> Vec<(String, String)> {
    rules
        .evaluate(line)
        .into_iter()
        .map(|m| {
            let addr = match m.addr {
                Extracted::Addr(a) => a.to_string(),
                other => format!("{other:?}"),
            };
            (rules.rules()[m.rule].config.id.clone(), addr)
        })
        .collect()
}

#[tokio::test]
async fn commands_and_failed_auth_ship_as_lines_the_server_rules_match() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path()).await;
    // The collector's own user with the least it needs (docs/agent-config.md, "## Redis").
    let mut admin = redis.admin().await;
    assert_eq!(
        admin
            .call(&[
                "ACL",
                "SETUSER",
                "mirage",
                "reset",
                "on",
                ">collector-pw",
                "+monitor",
                "+acl|log"
            ])
            .await,
        ok()
    );
    let state_dir = dir.path().join("state");
    let mut collector = Collector::start(
        RedisSource {
            address: redis.address(),
            username: Some("mirage".into()),
            password_file: Some(password_file(dir.path(), "collector-pw")),
            acl_log_secs: 1,
        },
        &state_dir,
    );
    // Both connections up: the monitor (flags=O) and a first ACL LOG read recorded.
    redis.wait_clients("flags=O", 1).await;
    let deadline = Instant::now() + DEADLINE;
    while !state_dir.join("redis-acl.json").exists() {
        assert!(Instant::now() < deadline, "no ACL LOG state written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An application.
    let mut app = Client::connect(&redis.address()).await.unwrap();
    assert_eq!(app.call(&["AUTH", PASSWORD]).await, ok());
    assert_eq!(
        app.call(&["SET", "cart:42", "{\"items\":[1]}\n\x01é"])
            .await,
        ok()
    );
    app.call(&["GET", "cart:42"]).await;
    // An attacker: guesses passwords, then writes a web shell with the right one.
    let mut attacker = Client::connect(&redis.address()).await.unwrap();
    for guess in ["123456", "redis", "admin"] {
        assert!(matches!(
            attacker.call(&["AUTH", guess]).await,
            Value::Error(e) if e.starts_with(b"WRONGPASS")
        ));
    }
    assert_eq!(attacker.call(&["AUTH", PASSWORD]).await, ok());
    assert_eq!(
        attacker
            .call(&["SET", "x", "<?php system($_GET['c']); ?>"])
            .await,
        ok()
    );

    let app_addr = app.local_addr();
    let atk_addr = attacker.local_addr();
    let set = collector
        .wait_for(
            "for the application's SET",
            monitor_line_for(
                app_addr,
                r#""SET" "cart:42" "{\"items\":[1]}\n\x01\xc3\xa9""#,
            ),
        )
        .await;
    assert_eq!(set.service, "redis");
    collector
        .wait_for(
            "for the application's GET",
            monitor_line_for(app_addr, r#""GET" "cart:42""#),
        )
        .await;
    collector
        .wait_for(
            "for the application's AUTH, redacted",
            monitor_line_for(app_addr, r#""AUTH" "(redacted)""#),
        )
        .await;
    let shell = collector
        .wait_for(
            "for the attacker's SET",
            monitor_line_for(atk_addr, r#""SET" "x" "<?php system($_GET['c']); ?>""#),
        )
        .await;
    // Redis folds the three failures into one entry; a read between two of them ships it
    // early and again once it grew, so the last line counts all three.
    let failure = acl_auth_failure_of(atk_addr);
    let acl = collector
        .wait_for("in ACL LOG for the attacker's failed AUTH", |l| {
            failure(l) && l.line.ends_with(" reason=auth count=3")
        })
        .await;
    assert!(acl.line.contains(" user=default "), "{}", acl.line);

    // The server's real rules flag both, with the attacker's address.
    let rules = RuleSet::builtin().unwrap();
    let ip = atk_addr.ip().to_string();
    assert_eq!(
        rule_hits(&rules, &shell.line),
        [("redis-monitor-payload".to_owned(), ip.clone())]
    );
    assert_eq!(
        rule_hits(&rules, &acl.line),
        [("redis-acl-auth-failure".to_owned(), ip.clone())]
    );
    assert_eq!(
        rule_hits(&rules, &set.line),
        Vec::<(String, String)>::new(),
        "an application's SET is not an attack"
    );

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lines = collector.stop().await;
    for l in &lines {
        // No password ever leaves, and every AUTH line is a client's (the collector's own
        // ACL LOG connection is not shipped).
        assert!(
            !l.line.contains(PASSWORD) && !l.line.contains("collector-pw"),
            "{l:?}"
        );
        if l.source == "redis:monitor" && l.line.contains("\"AUTH\"") {
            assert!(
                l.line.contains(&format!("[0 {app_addr}]"))
                    || l.line.contains(&format!("[0 {atk_addr}]")),
                "{l:?}"
            );
        }
        assert!(l.line.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{l:?}");
    }
    // One ACL LOG entry, each of its states shipped once: counts strictly grow.
    let counts: Vec<u32> = lines
        .iter()
        .filter(|l| l.source == "redis:acl-log")
        .map(|l| l.line.rsplit_once(" count=").unwrap().1.parse().unwrap())
        .collect();
    assert!(counts.windows(2).all(|w| w[0] < w[1]), "{lines:#?}");
    assert_eq!(counts.last(), Some(&3));
}

#[tokio::test]
async fn survives_a_redis_restart_and_ships_each_acl_entry_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path()).await;
    let state_dir = dir.path().join("state");
    let cfg = RedisSource {
        address: redis.address(),
        username: None,
        password_file: Some(password_file(dir.path(), PASSWORD)),
        acl_log_secs: 1,
    };
    let mut collector = Collector::start(cfg.clone(), &state_dir);
    redis.wait_clients("flags=O", 1).await;
    redis.wait_clients("cmd=acl|log", 1).await;

    let mut c = redis.admin().await;
    c.call(&["SET", "before", "1"]).await;
    collector
        .wait_for(
            "before the restart",
            monitor_line_for(c.local_addr(), r#""SET" "before" "1""#),
        )
        .await;
    let mut bad = Client::connect(&redis.address()).await.unwrap();
    bad.call(&["AUTH", "wrong"]).await;
    collector
        .wait_for(
            "for the first failed AUTH",
            acl_auth_failure_of(bad.local_addr()),
        )
        .await;

    // Restart on the same port: the collector reconnects by itself.
    redis.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let port = redis.port;
    drop(redis);
    let redis = RedisServer::start_on(dir.path(), port).await;
    redis.wait_clients("flags=O", 1).await;
    let mut c = redis.admin().await;
    c.call(&["SET", "after", "2"]).await;
    collector
        .wait_for(
            "after the restart",
            monitor_line_for(c.local_addr(), r#""SET" "after" "2""#),
        )
        .await;
    let mut bad2 = Client::connect(&redis.address()).await.unwrap();
    bad2.call(&["AUTH", "wrong-again"]).await;
    collector
        .wait_for(
            "for the failed AUTH after the restart",
            acl_auth_failure_of(bad2.local_addr()),
        )
        .await;

    // An agent restart: the state file says both entries were shipped, nothing is re-sent.
    let lines = collector.stop().await;
    assert_eq!(
        lines.iter().filter(|l| l.source == "redis:acl-log").count(),
        2,
        "{lines:#?}"
    );
    let mut collector = Collector::start(cfg, &state_dir);
    redis.wait_clients("cmd=acl|log", 1).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    collector.drain();
    c.call(&["SET", "later", "3"]).await;
    collector
        .wait_for(
            "after the agent restart",
            monitor_line_for(c.local_addr(), r#""SET" "later" "3""#),
        )
        .await;
    let lines = collector.stop().await;
    assert!(
        lines.iter().all(|l| l.source != "redis:acl-log"),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn wrong_password_is_retried_until_the_file_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path()).await;
    let pw = password_file(dir.path(), "not-the-password");
    let mut collector = Collector::start(
        RedisSource {
            address: redis.address(),
            username: None,
            password_file: Some(pw.clone()),
            acl_log_secs: 1,
        },
        &dir.path().join("state"),
    );
    // Refused again and again (Redis counts the failures in its ACL LOG), nothing shipped,
    // the collector still running.
    let mut admin = redis.admin().await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let Value::Array(entries) = admin.call(&["ACL", "LOG"]).await else {
            panic!("ACL LOG");
        };
        let count = entries.first().and_then(|e| match e {
            Value::Array(f) => f.get(1).cloned(),
            _ => None,
        });
        if matches!(count, Some(Value::Integer(n)) if n >= 4) {
            break;
        }
        assert!(Instant::now() < deadline, "the collector did not retry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!collector.task.is_finished());
    collector.drain();
    assert!(collector.seen.is_empty(), "{:#?}", collector.seen);

    // Fixed: picked up at the next attempt (backoff is at most 30 s; here far less).
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    redis.wait_clients("flags=O", 1).await;
    admin.call(&["SET", "fixed", "1"]).await;
    collector
        .wait_for(
            "once the password is right",
            monitor_line_for(admin.local_addr(), r#""SET" "fixed" "1""#),
        )
        .await;
    collector.stop().await;
}
