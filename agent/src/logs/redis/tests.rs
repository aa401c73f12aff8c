//! Line formatting, `ACL LOG` parsing and de-duplication, backoff, and whole sessions against a
//! scripted in-process server (hostile replies, reconnects). The tests against a real
//! `redis-server` are in `agent/tests/redis.rs`.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::{
    acl::{AclState, Entry, STATE_FILE},
    monitor::{MAX_LINE, OwnConns, TRUNCATED, bounded, client, sanitize},
    resp::{Decoder, Limits, Value, encode},
    *,
};
use crate::logs::Request;

// ---------------------------------------------------------------------------------------------
// MONITOR lines

/// Lines of `server/tests/corpus/redis/monitor.log` (redis-cli's output, so the status lines
/// Redis sent) with the client each names.
const CORPUS_MONITOR: &[(&str, &str)] = &[
    (
        r#"1795831163.631456 [0 10.77.0.20:44474] "AUTH" "(redacted)""#,
        "10.77.0.20:44474",
    ),
    (
        r#"1795831163.654534 [0 10.77.0.20:44480] "SET" "session:alice:42" "{\"cart\":[1,3]}" "EX" "3600""#,
        "10.77.0.20:44480",
    ),
    (
        r#"1795831189.042534 [0 10.77.0.66:44958] "EVAL" "local io_l = package.loadlib(\"/usr/lib/x86_64-linux-gnu/liblua5.1.so.0\", \"luaopen_io\"); return 1" "0""#,
        "10.77.0.66:44958",
    ),
    (
        r#"1795831163.6 [0 lua] "CONFIG" "GET" "requirepass""#,
        "lua",
    ),
    (
        r#"1795831163.600001 [3 [fd77::66]:59722] "SET" "k" "v\r\n\x00""#,
        "[fd77::66]:59722",
    ),
    (
        r#"1795831163.600001 [0 unix:/run/redis/redis.sock] "PING""#,
        "unix:/run/redis/redis.sock",
    ),
];

#[test]
fn real_monitor_lines_ship_unchanged() {
    let own = OwnConns::default();
    for (raw, addr) in CORPUS_MONITOR {
        assert_eq!(sanitize(raw.as_bytes()), *raw);
        assert_eq!(client(raw), Some(*addr), "{raw}");
        assert_eq!(
            monitor::line(raw.as_bytes(), false, &own).as_deref(),
            Some(*raw)
        );
    }
}

#[test]
fn raw_bytes_are_escaped_like_sdscatrepr() {
    // What `sdscatrepr` writes for non-printable bytes; Redis never sends them raw, but a
    // line must stay one printable line whatever arrives.
    assert_eq!(
        sanitize(b"a\x01b\x7fc\xc3\xa9\t\0"),
        r"a\x01b\x7fc\xc3\xa9\x09\x00"
    );
    assert_eq!(sanitize(br#""\"\\""#), r#""\"\\""#);
    let line = monitor::line(
        b"1.000001 [0 127.0.0.1:1] \"SET\" \"a\xffb\"",
        false,
        &OwnConns::default(),
    );
    assert_eq!(
        line.as_deref(),
        Some(r#"1.000001 [0 127.0.0.1:1] "SET" "a\xffb""#)
    );
}

#[test]
fn client_field_needs_the_monitor_shape() {
    for bad in [
        "",
        "OK",
        "1795831163 [0 1.2.3.4:5] \"X\"",
        "1795831163.1 [x 1.2.3.4:5] \"X\"",
        "1795831163.1 0 1.2.3.4:5] \"X\"",
        "a.1 [0 1.2.3.4:5] \"X\"",
    ] {
        assert_eq!(client(bad), None, "{bad}");
    }
    // Shipped all the same: it is what Redis sent.
    assert_eq!(
        monitor::line(b"OK", false, &OwnConns::default()).as_deref(),
        Some("OK")
    );
}

#[test]
fn own_connections_are_skipped_while_registered() {
    let own = OwnConns::default();
    let addr: SocketAddr = "127.0.0.1:45996".parse().unwrap();
    let v6: SocketAddr = "[::1]:6000".parse().unwrap();
    let line = br#"1795855240.334253 [0 127.0.0.1:45996] "AUTH" "(redacted)""#;
    let line6 = br#"1795855240.334253 [0 [::1]:6000] "AUTH" "(redacted)""#;
    let other = br#"1795855240.334253 [0 127.0.0.1:45997] "AUTH" "(redacted)""#;
    {
        let _g = own.register(addr);
        let _g6 = own.register(v6);
        assert_eq!(monitor::line(line, false, &own), None);
        assert_eq!(monitor::line(line6, false, &own), None);
        assert!(monitor::line(other, false, &own).is_some());
    }
    assert!(monitor::line(line, false, &own).is_some());
    assert!(monitor::line(line6, false, &own).is_some());
}

#[test]
fn long_lines_are_cut_and_marked() {
    let long = format!(
        r#"1795831163.654534 [0 10.77.0.66:1] "SET" "x" "{}""#,
        "a".repeat(20_000)
    );
    let line = monitor::line(long.as_bytes(), false, &OwnConns::default()).unwrap();
    assert_eq!(line.len(), MAX_LINE);
    assert!(line.ends_with(TRUNCATED));
    assert!(line.starts_with(r#"1795831163.654534 [0 10.77.0.66:1] "SET" "x" "aaa"#));
    // Cut by the decoder already (a `LongSimple`): marked, not cut again.
    assert_eq!(bounded("abc".into(), true), format!("abc{TRUNCATED}"));
    assert_eq!(bounded("abc".into(), false), "abc");
    // Escaping can quadruple a line; the bound holds after it.
    let line = monitor::line(&[0u8; 10_000], false, &OwnConns::default()).unwrap();
    assert_eq!(line.len(), MAX_LINE);
}

// ---------------------------------------------------------------------------------------------
// ACL LOG

fn bulk(s: &str) -> Value {
    Value::Bulk(s.as_bytes().to_vec())
}

/// An entry as Redis 7.0 sends it (`age` varies between reads of the same entry).
fn entry_70(count: i64, age: &str, client_info: &str) -> Value {
    Value::Array(vec![
        bulk("count"),
        Value::Integer(count),
        bulk("reason"),
        bulk("auth"),
        bulk("context"),
        bulk("toplevel"),
        bulk("object"),
        bulk("AUTH"),
        bulk("username"),
        bulk("default"),
        bulk("age-seconds"),
        bulk(age),
        bulk("client-info"),
        bulk(client_info),
    ])
}

/// An entry as Redis 7.2+ sends it.
fn entry_72(id: i64, count: i64, created: i64, updated: i64, client_info: &str) -> Value {
    let Value::Array(mut fields) = entry_70(count, "1.5", client_info) else {
        unreachable!()
    };
    fields.extend([
        bulk("entry-id"),
        Value::Integer(id),
        bulk("timestamp-created"),
        Value::Integer(created),
        bulk("timestamp-last-updated"),
        Value::Integer(updated),
    ]);
    Value::Array(fields)
}

/// `client-info` of `server/tests/corpus/redis/acl-log.txt`.
const CORPUS_CLIENT_57: &str = "id=57 addr=10.77.0.67:58052 laddr=10.77.0.10:6379 fd=9 name= age=0 idle=0 flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=28 qbuf-free=20446 argv-mem=12 multi-mem=0 rbs=16384 rbp=16384 obl=0 oll=0 omem=0 tot-mem=37660 events=r cmd=auth user=default redir=-1 resp=2";
const CORPUS_CLIENT_23: &str = "id=23 addr=10.77.0.66:59554 laddr=10.77.0.10:6379 fd=11 name= age=1 idle=0 flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=27 qbuf-free=20447 argv-mem=11 multi-mem=0 rbs=1024 rbp=64 obl=0 oll=0 omem=0 tot-mem=22299 events=r cmd=auth user=default redir=-1 resp=2";

#[test]
fn acl_log_entries_become_client_info_lines() {
    let reply = Value::Array(vec![
        entry_70(3, "100.03100000000001", CORPUS_CLIENT_57),
        entry_70(10, "283.04399999999998", CORPUS_CLIENT_23),
    ]);
    let entries = acl::parse(&reply).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entries[0].line,
        format!("{CORPUS_CLIENT_57} reason=auth count=3")
    );
    assert_eq!(
        entries[1].line,
        format!("{CORPUS_CLIENT_23} reason=auth count=10")
    );
    assert!(entries[0].key.starts_with("fnv:"));
    assert_ne!(entries[0].key, entries[1].key);

    // The same entries read later: only age-seconds moved, so the keys hold.
    let later = acl::parse(&Value::Array(vec![
        entry_70(3, "160.5", CORPUS_CLIENT_57),
        entry_70(10, "343.1", CORPUS_CLIENT_23),
    ]))
    .unwrap();
    assert_eq!(entries, later);

    // 7.2+: keyed by id and timestamps.
    let e = acl::parse(&Value::Array(vec![entry_72(
        7,
        2,
        1_795_831_163_000,
        1_795_831_164_500,
        CORPUS_CLIENT_57,
    )]))
    .unwrap();
    assert_eq!(e[0].key, "7/1795831163000/1795831164500");

    // An empty log, and malformed replies.
    assert_eq!(acl::parse(&Value::Array(Vec::new())).unwrap(), Vec::new());
    for bad in [
        Value::Null,
        Value::Simple(b"OK".to_vec()),
        Value::Array(vec![Value::Integer(1)]),
        Value::Array(vec![Value::Array(vec![bulk("count")])]),
        Value::Array(vec![Value::Array(vec![bulk("count"), Value::Integer(1)])]),
        Value::Array(vec![Value::Array(vec![
            Value::Integer(1),
            bulk("client-info"),
        ])]),
    ] {
        assert!(
            matches!(acl::parse(&bad), Err(RedisError::Unexpected { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn acl_log_lines_are_printable_and_bounded() {
    let e = acl::parse(&Value::Array(vec![entry_70(
        1,
        "0",
        "id=1 addr=1.2.3.4:5 name=\x1b[31m x",
    )]))
    .unwrap();
    assert_eq!(
        e[0].line,
        r"id=1 addr=1.2.3.4:5 name=\x1b[31m x reason=auth count=1"
    );
    let huge = format!("id=1 addr=1.2.3.4:5 {}", "x".repeat(100_000));
    let e = acl::parse(&Value::Array(vec![entry_70(1, "0", &huge)])).unwrap();
    assert_eq!(e[0].line.len(), MAX_LINE);
}

fn keys(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.line.as_str()).collect()
}

#[tokio::test]
async fn acl_state_ships_new_and_grown_entries_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let a1 = entry_70(1, "5.0", "id=4 addr=127.0.0.1:1 cmd=auth user=default");
    let b1 = entry_70(1, "1.0", "id=9 addr=127.0.0.1:2 cmd=auth user=default");
    let b3 = entry_70(3, "0.1", "id=12 addr=127.0.0.1:3 cmd=auth user=default");
    let c1 = entry_70(1, "0.0", "id=13 addr=127.0.0.1:4 cmd=auth user=default");

    // First sight: the existing entry is a baseline, nothing shipped.
    let mut state = AclState::load(dir.path(), "127.0.0.1:6379");
    assert!(state.first_sight());
    let r1 = acl::parse(&Value::Array(vec![a1.clone()])).unwrap();
    assert!(state.new_lines(&r1).is_empty());
    state.record(&r1);
    state.save().await.unwrap();
    assert!(!state.first_sight());

    // A new entry (newest first in the reply).
    let r2 = acl::parse(&Value::Array(vec![b1.clone(), a1.clone()])).unwrap();
    assert_eq!(state.new_lines(&r2), vec![r2[0].line.clone()]);
    state.record(&r2);
    assert!(state.new_lines(&r2).is_empty());
    state.save().await.unwrap();

    // Reloaded (an agent restart): nothing again; then b grew to 3 and c is new: both, oldest
    // first.
    let mut state = AclState::load(dir.path(), "127.0.0.1:6379");
    assert!(!state.first_sight());
    assert!(state.new_lines(&r2).is_empty());
    let r3 = acl::parse(&Value::Array(vec![c1.clone(), b3.clone(), a1.clone()])).unwrap();
    assert_eq!(
        state.new_lines(&r3),
        vec![r3[1].line.clone(), r3[0].line.clone()]
    );
    assert!(r3[1].line.ends_with("count=3"));
    state.record(&r3);
    state.save().await.unwrap();

    // A Redis restart empties the log, then one new entry.
    let r4 = acl::parse(&Value::Array(Vec::new())).unwrap();
    assert!(state.new_lines(&r4).is_empty());
    state.record(&r4);
    let r5 = acl::parse(&Value::Array(vec![entry_70(
        1,
        "0.2",
        "id=3 addr=127.0.0.1:9 cmd=auth user=default",
    )]))
    .unwrap();
    assert_eq!(keys(&r5).len(), state.new_lines(&r5).len());

    // The file is readable JSON with the address; another address means first sight.
    let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
    assert!(text.contains("\"address\": \"127.0.0.1:6379\""), "{text}");
    assert!(AclState::load(dir.path(), "127.0.0.1:6380").first_sight());
    std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
    assert!(AclState::load(dir.path(), "127.0.0.1:6379").first_sight());
}

#[tokio::test]
async fn acl_state_save_fails_cleanly_when_the_dir_is_unwritable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let mut state = AclState::load(&file, "127.0.0.1:6379");
    state.record(&[]);
    assert!(matches!(state.save().await, Err(RedisError::State { .. })));
}

// ---------------------------------------------------------------------------------------------
// Backoff and errors

#[test]
fn backoff_doubles_to_its_cap_with_full_jitter() {
    let mut b = Backoff::default();
    let mut ceilings = Vec::new();
    for _ in 0..12 {
        let ceiling = b.ceiling();
        let d = b.next_delay();
        assert!(d <= ceiling, "{d:?} > {ceiling:?}");
        ceilings.push(ceiling.as_millis());
    }
    assert_eq!(
        ceilings,
        [
            250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000, 30000
        ]
    );
    for _ in 0..1000 {
        b.next_delay();
    }
    assert_eq!(b.ceiling(), BACKOFF_MAX);
    b.reset();
    assert_eq!(b.ceiling(), BACKOFF_MIN);
    // Jitter: not all the same.
    let delays: std::collections::HashSet<Duration> = (0..20)
        .map(|_| Backoff { attempt: 7 }.next_delay())
        .collect();
    assert!(delays.len() > 1);
}

#[test]
fn errors_name_their_cause() {
    let err = RedisError::Connect {
        address: "127.0.0.1:1".into(),
        source: io::Error::from(io::ErrorKind::ConnectionRefused),
    };
    assert_eq!(err.kind(), "connect");
    assert!(
        Chain(&err)
            .to_string()
            .starts_with("connecting to 127.0.0.1:1: ")
    );
    let err = RedisError::Protocol(RespError::InvalidType(b'!'));
    assert_eq!(
        Chain(&err).to_string(),
        "redis protocol: invalid type byte 0x21"
    );
}

// ---------------------------------------------------------------------------------------------
// Whole sessions against a scripted server

/// A server that speaks just enough RESP: reads commands and lets the test answer them.
struct Fake {
    listener: TcpListener,
}

impl Fake {
    async fn new() -> Self {
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn addr(&self) -> String {
        self.listener.local_addr().unwrap().to_string()
    }

    async fn accept(&self) -> FakeConn {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), self.listener.accept())
            .await
            .expect("the collector connects")
            .unwrap();
        FakeConn {
            stream,
            dec: Decoder::new(Limits::default()),
        }
    }
}

struct FakeConn {
    stream: TcpStream,
    dec: Decoder,
}

impl FakeConn {
    /// The next command, as strings.
    async fn command(&mut self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(Value::Array(args)) = self.dec.decode().unwrap() {
                return args
                    .into_iter()
                    .map(|a| match a {
                        Value::Bulk(b) => String::from_utf8(b).unwrap(),
                        other => panic!("{other:?}"),
                    })
                    .collect();
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf))
                .await
                .expect("a command")
                .unwrap();
            assert!(n > 0, "the collector closed the connection");
            self.dec.feed(&buf[..n]);
        }
    }

    async fn reply(&mut self, v: &Value) {
        let mut out = Vec::new();
        encode(v, &mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
}

fn ok() -> Value {
    Value::Simple(b"OK".to_vec())
}

/// Takes the next batch from the sink and acknowledges it.
async fn next_batch(rx: &mut mpsc::Receiver<Request>) -> Vec<LogLine> {
    let (lines, done) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("lines arrive")
        .expect("the sink is open");
    done.send(Ok(())).unwrap();
    lines
}

fn config(address: String, password_file: Option<PathBuf>, acl_log_secs: u64) -> RedisSource {
    RedisSource {
        address,
        username: Some("mirage".into()),
        password_file,
        acl_log_secs,
    }
}

/// The original collector panicked on a full read; here a huge line is cut, a hostile length
/// drops the connection, and the collector reconnects.
#[tokio::test]
async fn r6_full_read_and_hostile_replies_do_not_panic() {
    let fake = Fake::new().await;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let (sink, mut rx) = Sink::channel(8);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run(
        config(fake.addr(), Some(pw), 0),
        sink,
        dir.path().to_owned(),
        stop,
    ));

    let mut c = fake.accept().await;
    assert_eq!(c.command().await, ["AUTH", "mirage", "s3cret"]);
    c.reply(&ok()).await;
    assert_eq!(c.command().await, ["MONITOR"]);
    c.reply(&ok()).await;

    // A 20 MB status line in one burst, then a normal one.
    let mut huge = b"+1795831163.654534 [0 10.77.0.66:1] \"SET\" \"x\" \"".to_vec();
    huge.resize(20 * 1024 * 1024, b'a');
    huge.extend_from_slice(b"\"\r\n+1795831163.700000 [0 10.77.0.66:1] \"GET\" \"x\"\r\n");
    c.send(&huge).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(next_batch(&mut rx).await);
    }
    assert_eq!(got[0].line.len(), MAX_LINE);
    assert!(got[0].line.ends_with(TRUNCATED));
    assert_eq!(got[0].service, "redis");
    assert_eq!(got[0].source, "redis:monitor");
    assert_eq!(
        got[1].line,
        r#"1795831163.700000 [0 10.77.0.66:1] "GET" "x""#
    );

    // A bulk string of 100 GB announced: a protocol error, the connection is dropped.
    c.send(b"$100000000000\r\n").await;
    let mut c = fake.accept().await;
    assert_eq!(c.command().await, ["AUTH", "mirage", "s3cret"]);
    // Wrong password: retried with backoff, no panic.
    c.reply(&Value::Error(
        b"WRONGPASS invalid username-password pair or user is disabled.".to_vec(),
    ))
    .await;
    let mut c = fake.accept().await;
    assert_eq!(c.command().await, ["AUTH", "mirage", "s3cret"]);
    c.reply(&ok()).await;
    assert_eq!(c.command().await, ["MONITOR"]);
    c.reply(&ok()).await;
    c.send(b"+1.000001 [0 10.0.0.1:2] \"PING\"\r\n").await;
    assert_eq!(
        next_batch(&mut rx).await[0].line,
        r#"1.000001 [0 10.0.0.1:2] "PING""#
    );

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the collector stops")
        .unwrap();
}

#[tokio::test]
async fn acl_log_connection_reads_periodically_and_hides_its_own_auth() {
    let fake = Fake::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (sink, mut rx) = Sink::channel(8);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run(
        config(fake.addr(), None, 1),
        sink,
        dir.path().to_owned(),
        stop,
    ));

    // Two connections arrive, in either order; no password file, so no AUTH.
    let mut first = fake.accept().await;
    let mut second = fake.accept().await;
    let (mut mon, mut acl, acl_addr) = {
        let a = first.command().await;
        let b = second.command().await;
        if a == ["MONITOR"] {
            assert_eq!(b, ["ACL", "LOG", "1024"]);
            let addr = second.stream.peer_addr().unwrap();
            (first, second, addr)
        } else {
            assert_eq!(a, ["ACL", "LOG", "1024"]);
            assert_eq!(b, ["MONITOR"]);
            let addr = first.stream.peer_addr().unwrap();
            (second, first, addr)
        }
    };
    mon.reply(&ok()).await;
    // First read: a baseline.
    acl.reply(&Value::Array(vec![entry_70(1, "9.0", CORPUS_CLIENT_57)]))
        .await;
    // The ACL connection's own AUTH is not shipped, a client's is.
    mon.send(format!("+1.000001 [0 {acl_addr}] \"AUTH\" \"(redacted)\"\r\n+1.000002 [0 10.77.0.67:1] \"AUTH\" \"(redacted)\"\r\n").as_bytes())
        .await;
    let lines = next_batch(&mut rx).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(
        lines[0].line,
        r#"1.000002 [0 10.77.0.67:1] "AUTH" "(redacted)""#
    );

    // Second read, about a second later: the grown entry is shipped.
    assert_eq!(acl.command().await, ["ACL", "LOG", "1024"]);
    acl.reply(&Value::Array(vec![entry_70(4, "0.5", CORPUS_CLIENT_23)]))
        .await;
    let lines = next_batch(&mut rx).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].source, "redis:acl-log");
    assert_eq!(
        lines[0].line,
        format!("{CORPUS_CLIENT_23} reason=auth count=4")
    );
    // Saved once the sink took it.
    assert_eq!(acl.command().await, ["ACL", "LOG", "1024"]);
    let saved = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
    assert!(saved.contains("fnv:"), "{saved}");
    // A NOPERM reply ends the session (and is retried).
    acl.reply(&Value::Error(
        b"NOPERM this user has no permissions to run the 'acl|log' command".to_vec(),
    ))
    .await;
    let mut again = fake.accept().await;
    assert_eq!(again.command().await, ["ACL", "LOG", "1024"]);

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the collector stops")
        .unwrap();
}

#[tokio::test]
async fn stops_while_redis_is_unreachable_and_when_the_sink_closes() {
    // Nothing listens on the port: connection refused, retried until stopped.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let (sink, _rx) = Sink::channel(1);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run(
        config(format!("127.0.0.1:{port}"), None, 1),
        sink,
        dir.path().to_owned(),
        stop,
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the collector stops")
        .unwrap();

    // A missing password file is an error like any other: retried, no panic.
    let fake = Fake::new().await;
    let (sink, rx) = Sink::channel(1);
    let (_stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run(
        config(fake.addr(), Some(dir.path().join("missing")), 0),
        sink,
        dir.path().to_owned(),
        stop,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished());
    std::fs::write(dir.path().join("missing"), "pw").unwrap();
    let mut c = fake.accept().await;
    assert_eq!(c.command().await, ["AUTH", "mirage", "pw"]);
    c.reply(&ok()).await;
    assert_eq!(c.command().await, ["MONITOR"]);
    c.reply(&ok()).await;
    // The shipper goes away: the collector ends by itself.
    drop(rx);
    c.send(b"+1.000001 [0 10.0.0.1:2] \"PING\"\r\n").await;
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the collector ends with the sink")
        .unwrap();
}

/// A stalled shipper must not make Redis buffer the monitor's output (without limit, for a
/// `normal` client): the collector reads on, drops what does not fit, and ships again once the
/// shipper is back.
#[tokio::test]
async fn monitor_reads_on_while_the_shipper_is_stalled() {
    let fake = Fake::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (sink, mut rx) = Sink::channel(1);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run(
        config(fake.addr(), None, 0),
        sink,
        dir.path().to_owned(),
        stop,
    ));
    let mut c = fake.accept().await;
    assert_eq!(c.command().await, ["MONITOR"]);
    c.reply(&ok()).await;

    // 16 MB of lines while nobody takes the batches: far more than the socket buffers and
    // the collector's own buffer hold, so the write completes only if the collector reads.
    let line = b"+1795831163.654534 [0 10.77.0.66:1] \"GET\" \"some-key-of-a-busy-app\"\r\n";
    let burst: Vec<u8> = line.repeat(16 * 1024 * 1024 / line.len());
    tokio::time::timeout(Duration::from_secs(60), c.send(&burst))
        .await
        .expect("the collector keeps reading while the shipper is stalled");

    // The shipper is back: batches flow again, and a later line arrives (sent until one does:
    // while the buffer is still full a line is dropped like the burst's).
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((batch, done)) = rx.recv().await {
            let _ = done.send(Ok(()));
            let _ = lines_tx.send(batch);
        }
    });
    let mut shipped = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    'resend: loop {
        c.send(b"+1795831199.000001 [0 10.77.0.66:1] \"GET\" \"after\"\r\n")
            .await;
        let wait = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(batch)) = tokio::time::timeout_at(wait, lines.recv()).await {
            shipped += batch.len();
            if batch.iter().any(|l| l.line.contains("\"after\"")) {
                break 'resend;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing shipped after the stall"
        );
    }
    assert!(
        shipped < burst.len() / line.len(),
        "some lines were dropped"
    );

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the collector stops")
        .unwrap();
}
