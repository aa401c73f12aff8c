//! The systemd journal collector, for hosts where a service (usually sshd) logs only there.
//!
//! It runs `journalctl --follow --output=json --unit U ...` as a child process and reads one
//! JSON object per entry. No journal crate is used: the maintained ones bind libsystemd
//! through C (a build dependency and `unsafe` code for little gain), while `journalctl` is on
//! every host that has a journal and its JSON output is a stable interface.
//!
//! * **Lines**: each entry becomes `TIMESTAMP HOST IDENT[PID]: MESSAGE`, the form rsyslog
//!   writes to `/var/log/auth.log` (RFC 3339 with microseconds), which the server's rule packs
//!   match. Newlines and CRs inside a message are escaped as rsyslog does (`#012`, `#015`).
//!   An entry without `MESSAGE` is skipped; a binary `MESSAGE` (an array of bytes) is decoded
//!   as UTF-8 with replacement.
//! * **Position**: the `__CURSOR` of the last entry of each batch is saved in
//!   `state_dir/logs/journal.json` after the batch was queued; a restart resumes with
//!   `--after-cursor`. On first start (no cursor) it starts at the end (`--lines=0`), like the
//!   files collector.
//! * **Failures**: if `journalctl` is missing or exits, it is started again with backoff (1 s
//!   doubling to 30 s); its standard error is logged.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::Command,
    sync::watch,
    time::{Instant, sleep, timeout},
};
use tracing::{debug, info, warn};

use super::{
    LogLine, Sink, SinkError,
    offsets::{self, JournalCursors},
    ship::host_name,
};
use crate::config::links::JournalSource;

/// The collector's state file, under `state_dir`.
pub const STATE_FILE: &str = "logs/journal.json";

/// How the collector runs `journalctl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalOptions {
    /// The program. Default `journalctl` (from `PATH`).
    pub journalctl: PathBuf,
    /// Arguments added before the others (e.g. `--directory=DIR`, or `--merge`).
    pub extra_args: Vec<String>,
    /// Most entries per batch. Default 1000.
    pub batch_max: usize,
    /// Longest a read entry waits for its batch to fill. Default 200 ms.
    pub batch_wait: Duration,
    /// First restart delay. Default 1 s (doubling to 30 s).
    pub restart_min: Duration,
    /// HOST used when an entry has no `_HOSTNAME`. Default: this machine's host name.
    pub host: String,
}

impl Default for JournalOptions {
    fn default() -> Self {
        Self {
            journalctl: PathBuf::from("journalctl"),
            extra_args: Vec::new(),
            batch_max: 1000,
            batch_wait: Duration::from_millis(200),
            restart_min: Duration::from_secs(1),
            host: host_name(),
        }
    }
}

/// Longest restart delay.
const RESTART_MAX: Duration = Duration::from_secs(30);

/// One journal entry as a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// `__CURSOR`.
    pub cursor: String,
    /// The line, when the entry has a message.
    pub line: Option<String>,
    /// `__REALTIME_TIMESTAMP` in Unix seconds.
    pub at: Option<i64>,
}

/// Parses one line of `journalctl --output=json`; `None` if it is not a journal entry (no
/// `__CURSOR`).
pub fn parse_entry(json: &str, default_host: &str) -> Option<JournalEntry> {
    let v: Value = serde_json::from_str(json).ok()?;
    let field = |name: &str| -> Option<String> {
        match v.get(name)? {
            Value::String(s) => Some(s.clone()),
            // Binary (or not UTF-8) fields come as arrays of bytes.
            Value::Array(bytes) => {
                let bytes: Vec<u8> = bytes
                    .iter()
                    .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect();
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let cursor = field("__CURSOR")?;
    let micros = field("__REALTIME_TIMESTAMP").and_then(|t| t.parse::<i64>().ok());
    let at = micros.map(|us| us.div_euclid(1_000_000));
    let line = field("MESSAGE").map(|message| {
        let ts = micros
            .and_then(DateTime::<Utc>::from_timestamp_micros)
            .map_or_else(
                || "-".to_owned(),
                |t| t.to_rfc3339_opts(SecondsFormat::Micros, false),
            );
        let host = field("_HOSTNAME").unwrap_or_else(|| default_host.to_owned());
        let ident = field("SYSLOG_IDENTIFIER")
            .or_else(|| field("_COMM"))
            .unwrap_or_else(|| "-".to_owned());
        let pid = field("SYSLOG_PID").or_else(|| field("_PID"));
        let message = message
            .trim_end_matches('\n')
            .replace('\n', "#012")
            .replace('\r', "#015");
        match pid {
            Some(pid) => format!("{ts} {host} {ident}[{pid}]: {message}"),
            None => format!("{ts} {host} {ident}: {message}"),
        }
    });
    Some(JournalEntry { cursor, line, at })
}

/// The key a source's cursor is saved under.
fn key(source: &JournalSource) -> String {
    format!("{}:{}", source.service, source.units.join(","))
}

/// Follows the journal for `source` until `shutdown` turns true or the sink closes.
pub async fn run(
    source: &JournalSource,
    sink: Sink,
    state_dir: &Path,
    options: JournalOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let state_path = state_dir.join(STATE_FILE);
    let key = key(source);
    let mut delay = options.restart_min;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let state: JournalCursors = match offsets::load(&state_path) {
            Ok(s) => s,
            Err(err) => {
                warn!(error = %err, "The journal cursors are unreadable; starting at the end.");
                JournalCursors::default()
            }
        };
        let cursor = state.cursors.get(&key).cloned();
        let started = Instant::now();
        match follow(
            source,
            &sink,
            &state_path,
            &key,
            cursor,
            &options,
            &mut shutdown,
        )
        .await
        {
            Ended::Stop => return,
            Ended::Exited(why) => {
                if started.elapsed() > Duration::from_secs(60) {
                    delay = options.restart_min;
                }
                warn!(units = ?source.units, reason = %why, retry_in = ?delay, "journalctl stopped; starting it again.");
            }
        }
        tokio::select! {
            () = sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        delay = (delay * 2).min(RESTART_MAX);
    }
}

enum Ended {
    Stop,
    Exited(String),
}

/// Runs one `journalctl` until it exits or the collector stops.
async fn follow(
    source: &JournalSource,
    sink: &Sink,
    state_path: &Path,
    key: &str,
    cursor: Option<String>,
    options: &JournalOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let mut cmd = Command::new(&options.journalctl);
    cmd.args(&options.extra_args)
        .args(["--follow", "--output=json", "--no-pager", "--quiet"]);
    for unit in &source.units {
        cmd.arg("--unit").arg(unit);
    }
    match &cursor {
        Some(c) => cmd.arg("--after-cursor").arg(c),
        None => cmd.arg("--lines=0"),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => {
            return Ended::Exited(format!(
                "cannot start {}: {err}",
                options.journalctl.display()
            ));
        }
    };
    info!(units = ?source.units, resume = cursor.is_some(), "Following the journal.");
    if let Some(stderr) = child.stderr.take() {
        let units = source.units.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                warn!(units = ?units, message = %line, "journalctl says:");
            }
        });
    }
    let Some(stdout) = child.stdout.take() else {
        return Ended::Exited("no standard output".to_owned());
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut batch: Vec<LogLine> = Vec::new();
    let mut last_cursor: Option<String> = None;
    let mut deadline: Option<Instant> = None;
    let ended = loop {
        let wait = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        let next = tokio::select! {
            _ = shutdown.changed() => None,
            next = timeout(wait, lines.next_line()) => Some(next),
        };
        let flush = match next {
            None => {
                // Stopping: queue what was read before going.
                if let Err(ended) =
                    ship_batch(sink, &mut batch, &mut last_cursor, state_path, key).await
                {
                    break ended;
                }
                break Ended::Stop;
            }
            Some(Err(_)) => true,
            Some(Ok(Ok(Some(json)))) => {
                match parse_entry(&json, &options.host) {
                    Some(entry) => {
                        if let Some(line) = entry.line {
                            batch.push(LogLine {
                                service: source.service.clone(),
                                source: format!("journal:{}", source.units.join(",")),
                                line,
                                read_at: entry.at.unwrap_or(0),
                            });
                        }
                        last_cursor = Some(entry.cursor);
                        deadline.get_or_insert_with(|| Instant::now() + options.batch_wait);
                    }
                    None => debug!(line = %json, "Not a journal entry; skipped."),
                }
                batch.len() >= options.batch_max
            }
            Some(Ok(Ok(None))) => {
                if let Err(ended) =
                    ship_batch(sink, &mut batch, &mut last_cursor, state_path, key).await
                {
                    break ended;
                }
                break Ended::Exited("end of output".to_owned());
            }
            Some(Ok(Err(err))) => break Ended::Exited(format!("reading its output: {err}")),
        };
        if flush {
            deadline = None;
            if let Err(ended) =
                ship_batch(sink, &mut batch, &mut last_cursor, state_path, key).await
            {
                break ended;
            }
        }
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    ended
}

/// Queues the batch and saves the cursor of its last entry.
async fn ship_batch(
    sink: &Sink,
    batch: &mut Vec<LogLine>,
    last_cursor: &mut Option<String>,
    state_path: &Path,
    key: &str,
) -> Result<(), Ended> {
    let Some(cursor) = last_cursor.take() else {
        return Ok(());
    };
    match sink.send(std::mem::take(batch)).await {
        Ok(()) => {}
        Err(SinkError::Closed) => return Err(Ended::Stop),
        // Not advancing: journalctl is restarted from the saved cursor.
        Err(err) => return Err(Ended::Exited(format!("queueing failed: {err}"))),
    }
    let path = state_path.to_owned();
    let key = key.to_owned();
    let saved = tokio::task::spawn_blocking(move || {
        let mut state: JournalCursors = offsets::load(&path).unwrap_or_default();
        state.cursors.insert(key, cursor);
        offsets::save(&path, &state)
    })
    .await;
    match saved {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(Ended::Exited(format!("saving the cursor: {err}"))),
        Err(err) => Err(Ended::Exited(format!("saving the cursor: {err}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// Recorded from `journalctl --output=json --unit ssh.service` on Debian 12 (fields
    /// trimmed).
    const SSHD: &str = r#"{"__CURSOR":"s=9c1b;i=1f3;b=77;m=1d2;t=5f8;x=aa","__REALTIME_TIMESTAMP":"1795831163123456","__MONOTONIC_TIMESTAMP":"123","_BOOT_ID":"77","PRIORITY":"6","SYSLOG_FACILITY":"4","SYSLOG_IDENTIFIER":"sshd","_PID":"4242","_COMM":"sshd","_SYSTEMD_UNIT":"ssh.service","_HOSTNAME":"web-1","MESSAGE":"Failed password for root from 203.0.113.9 port 4242 ssh2"}"#;

    #[test]
    fn entries_become_auth_log_lines() {
        let e = parse_entry(SSHD, "fallback").unwrap();
        assert_eq!(e.cursor, "s=9c1b;i=1f3;b=77;m=1d2;t=5f8;x=aa");
        assert_eq!(e.at, Some(1_795_831_163));
        assert_eq!(
            e.line.as_deref(),
            Some(
                "2026-11-28T01:59:23.123456+00:00 web-1 sshd[4242]: Failed password for root from 203.0.113.9 port 4242 ssh2"
            )
        );
    }

    #[test]
    fn binary_multiline_and_missing_fields() {
        // MESSAGE as bytes ("a\nb\xff"), no host, no pid, no SYSLOG_IDENTIFIER.
        let e = parse_entry(
            r#"{"__CURSOR":"c1","__REALTIME_TIMESTAMP":"1000000","_COMM":"sshd-session","MESSAGE":[97,10,98,255]}"#,
            "h",
        )
        .unwrap();
        assert_eq!(
            e.line.as_deref(),
            Some("1970-01-01T00:00:01.000000+00:00 h sshd-session: a#012b\u{fffd}")
        );
        let e = parse_entry(r#"{"__CURSOR":"c2","MESSAGE":null}"#, "h").unwrap();
        assert_eq!(e.line, None, "no message, but the cursor still moves");
        assert_eq!(e.cursor, "c2");
        assert_eq!(parse_entry(r#"{"MESSAGE":"x"}"#, "h"), None);
        assert_eq!(parse_entry("not json", "h"), None);
    }

    /// A stand-in for `journalctl` (no journald runs in the test environment): prints the
    /// recorded entries after `--after-cursor` (all with `--lines=0` absent), then exits or
    /// waits, and records its arguments.
    fn fake_journalctl(dir: &Path, entries: &[String]) -> PathBuf {
        let data = dir.join("entries.json");
        std::fs::write(&data, entries.join("\n") + "\n").unwrap();
        let script = dir.join("journalctl");
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/sh
echo "$@" >> {args}
after=""; lines0=""
while [ $# -gt 0 ]; do
  case "$1" in
    --after-cursor) after="$2"; shift ;;
    --lines=0) lines0=1 ;;
  esac
  shift
done
if [ -n "$lines0" ]; then exit 0; fi
if [ -z "$after" ]; then cat {data}; exit 0; fi
awk -v c="\"__CURSOR\":\"$after\"" 'found {{ print }} index($0, c) {{ found = 1 }}' {data}
"#,
                args = dir.join("args").display(),
                data = data.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn entry(i: usize) -> String {
        format!(
            r#"{{"__CURSOR":"c{i}","__REALTIME_TIMESTAMP":"{}","SYSLOG_IDENTIFIER":"sshd","_PID":"7","_HOSTNAME":"h","MESSAGE":"line {i}"}}"#,
            1_795_831_163_000_000u64 + i as u64
        )
    }

    #[tokio::test]
    async fn resumes_after_its_cursor_and_starts_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let source = JournalSource {
            service: "sshd".to_owned(),
            units: vec!["ssh.service".to_owned()],
        };
        let entries: Vec<String> = (1..=5).map(entry).collect();
        let options = JournalOptions {
            journalctl: fake_journalctl(dir.path(), &entries),
            restart_min: Duration::from_millis(10),
            batch_wait: Duration::from_millis(10),
            host: "h".to_owned(),
            ..JournalOptions::default()
        };
        let state = dir.path().join("state");
        // First start: no cursor, so `--lines=0`: nothing old is shipped. Then pretend a
        // cursor was saved at entry 2 and check that 3..=5 come, exactly once.
        let (sink, mut rx) = Sink::channel(8);
        let (stop_tx, stop) = watch::channel(false);
        let task = {
            let (source, options, state) = (source.clone(), options.clone(), state.clone());
            tokio::spawn(async move { run(&source, sink, &state, options, stop).await })
        };
        sleep(Duration::from_millis(100)).await;
        assert!(
            rx.try_recv().is_err(),
            "nothing from before the first start"
        );
        let mut cursors = JournalCursors::default();
        cursors.cursors.insert(key(&source), "c2".to_owned());
        offsets::save(&state.join(STATE_FILE), &cursors).unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            let (lines, done) = timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
            got.extend(lines.into_iter().map(|l| l.line));
            done.send(Ok(())).unwrap();
        }
        assert_eq!(
            got,
            (3..=5)
                .map(|i| format!("2026-11-28T01:59:23.{:06}+00:00 h sshd[7]: line {i}", i))
                .collect::<Vec<_>>()
        );
        // The fake exits after printing; restarted, it resumes after c5: nothing again.
        sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "nothing twice");
        let saved: JournalCursors = offsets::load(&state.join(STATE_FILE)).unwrap();
        assert_eq!(saved.cursors[&key(&source)], "c5");
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert!(
            args.lines()
                .next()
                .unwrap()
                .contains("--unit ssh.service --lines=0"),
            "{args}"
        );
        assert!(args.contains("--after-cursor c5"), "{args}");
        stop_tx.send(true).unwrap();
        timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
