//! Replays the real-log corpus (`tests/corpus/`, ground truth in its `MANIFEST.md`) through the
//! rule packs and checks, per service, that every attacker is flagged and no legitimate client
//! is. Once through the library, once through the built `mirage-server scan` binary.

#![allow(
    clippy::unwrap_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{collections::BTreeSet, process::Command};

use server::{RuleSet, Scanner};

mod common;

use common::{
    corpus,
    ground_truth::{CASES, LEGIT},
};

/// Flagged addresses of one service, through the library.
fn flagged_lib(set: &RuleSet, files: &[&str]) -> BTreeSet<String> {
    let mut scanner = Scanner::new(set).unwrap();
    for f in files {
        let contents = std::fs::read(corpus().join(f)).unwrap();
        scanner.feed(f, &contents);
    }
    assert_eq!(scanner.stats().oversized, 0);
    scanner.flagged().into_iter().map(|f| f.addr).collect()
}

fn check(service: &str, flagged: &BTreeSet<String>, attackers: &[&str]) {
    for a in attackers {
        assert!(
            flagged.contains(*a),
            "{service}: attacker {a} not flagged; flagged {flagged:?}"
        );
    }
    for l in LEGIT {
        assert!(!flagged.contains(*l), "{service}: legitimate {l} flagged");
    }
}

#[test]
fn corpus_per_service_through_library() {
    for (service, files, attackers) in CASES {
        let set = RuleSet::builtin().unwrap().only_service(service);
        check(service, &flagged_lib(&set, files), attackers);
    }
}

#[test]
fn corpus_without_service_recognises_formats_per_line() {
    // All files at once, every rule on every line: the same verdicts per service, and no
    // rule of one service fires on another service's file.
    let set = RuleSet::builtin().unwrap();
    let mut scanner = Scanner::new(&set).unwrap();
    for (service, files, _) in CASES {
        for f in *files {
            let contents = std::fs::read(corpus().join(f)).unwrap();
            for m in scanner.feed(f, &contents) {
                assert_eq!(&m.service, service, "{f}:{} matched {}", m.line, m.rule);
            }
        }
    }
    let flagged = scanner.flagged();
    for (service, _, attackers) in CASES {
        let addrs: BTreeSet<String> = flagged
            .iter()
            .filter(|f| f.service == *service)
            .map(|f| f.addr.clone())
            .collect();
        check(service, &addrs, attackers);
    }
}

#[test]
fn corpus_compromise_after_brute_force() {
    // atk2 (10.77.0.67) cracked test:password1 over ssh (:22, :2223) and ftp (:21, :2121) and
    // logged in; legitimate users log in after at most one typo and must not match.
    let set = RuleSet::builtin().unwrap();
    let mut scanner = Scanner::new(&set).unwrap();
    for (_, files, _) in &CASES[..2] {
        for f in *files {
            let contents = std::fs::read(corpus().join(f)).unwrap();
            scanner.feed(f, &contents);
        }
    }
    let compromised: BTreeSet<(String, String)> = scanner
        .flagged()
        .into_iter()
        .filter(|f| f.rule.ends_with("-login-after-brute-force"))
        .map(|f| (f.rule, f.addr))
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("sshd-login-after-brute-force", "10.77.0.67"),
        ("vsftpd-login-after-brute-force", "10.77.0.67"),
    ]
    .iter()
    .map(|(r, a)| ((*r).to_owned(), (*a).to_owned()))
    .collect();
    assert_eq!(compromised, want);
}

#[test]
fn corpus_counts_match_the_manifest() {
    // Spot checks against MANIFEST.md's per-address statistics.
    let set = RuleSet::builtin().unwrap();
    let mut scanner = Scanner::new(&set).unwrap();
    let mut count = |file: &str, rule: &str, addr: &str| {
        let contents = std::fs::read(corpus().join(file)).unwrap();
        scanner
            .feed(file, &contents)
            .iter()
            .filter(|m| m.rule == rule && m.addr.to_string() == addr)
            .count()
    };
    assert_eq!(
        count("sshd/auth.log", "sshd-failed-password", "fd77::66"),
        100
    );
    assert_eq!(
        count("sshd/sshd-E-info.log", "sshd-failed-password", "10.77.0.67"),
        12
    );
    assert_eq!(
        count("vsftpd/vsftpd.log", "vsftpd-fail-login", "10.77.0.67"),
        50
    );
    assert_eq!(
        count("vsftpd/syslog-vsftpd.log", "vsftpd-fail-login", "fd77::66"),
        100
    );
    assert_eq!(
        count("rsync/rsyncd.log", "rsync-auth-failed", "10.77.0.66"),
        25
    );
    assert_eq!(
        count("mysql/general.log", "mysql-access-denied", "10.77.0.67"),
        57
    );
    assert_eq!(
        count("mysql/error.log", "mysql-access-denied", "10.77.0.67"),
        57
    );
}

#[test]
fn corpus_through_the_binary() {
    let bin = env!("CARGO_BIN_EXE_mirage-server");
    for (service, files, attackers) in CASES {
        let out = Command::new(bin)
            .arg("scan")
            .args(["--service", service])
            .args(files.iter().map(|f| corpus().join(f)))
            .output()
            .unwrap();
        assert!(out.status.success(), "{service}: {out:?}");
        let mut flagged = BTreeSet::new();
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["service"], *service);
            for key in ["rule", "severity", "action", "count"] {
                assert!(!v[key].is_null(), "{line}");
            }
            flagged.insert(v["addr"].as_str().unwrap().to_owned());
        }
        check(service, &flagged, attackers);
    }
}

#[test]
fn binary_matches_mode_prints_every_matching_line() {
    let bin = env!("CARGO_BIN_EXE_mirage-server");
    let out = Command::new(bin)
        .args(["scan", "--matches", "--service", "rsync"])
        .arg(corpus().join("rsync/rsyncd.log"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let auth: Vec<_> = lines
        .iter()
        .filter(|v| v["rule"] == "rsync-auth-failed" && v["addr"] == "10.77.0.66")
        .collect();
    assert_eq!(auth.len(), 25);
    assert!(auth[0]["line"].as_u64().unwrap() > 0);
    assert!(auth[0]["file"].as_str().unwrap().ends_with("rsyncd.log"));
    assert!(
        auth[0]["timestamp"]
            .as_str()
            .unwrap()
            .starts_with("2026-11-28T01:59:")
    );
}

#[test]
fn binary_loads_extra_rule_dirs_and_rejects_bad_ones() {
    let bin = env!("CARGO_BIN_EXE_mirage-server");
    let dir = std::env::temp_dir().join(format!("mirage-server-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("honeypot.toml"),
        r#"
[[rule]]
id = "honeypot-touch"
service = "honeypot"
description = "Any connection to the honeypot port"
patterns = ['^(?:\S+ \S+ )?honeypot: connection from (?P<addr>\S+)$']
threshold = 1
window = 60
severity = "critical"
action = "redirect"
"#,
    )
    .unwrap();
    let log = dir.join("honeypot.log");
    std::fs::write(&log, "honeypot: connection from ::ffff:192.0.2.7\n").unwrap();
    let out = Command::new(bin)
        .args(["scan", "--service", "honeypot", "--rules"])
        .arg(&dir)
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(r#""addr":"192.0.2.7""#), "{stdout}");

    std::fs::write(dir.join("zz-bad.toml"), "[[rule]]\nid = \"x\"\n").unwrap();
    let out = Command::new(bin)
        .args(["scan", "--rules"])
        .arg(&dir)
        .arg(&log)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("zz-bad.toml"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn binary_reads_stdin_and_windows_rfc3164_lines() {
    use std::{io::Write, process::Stdio};
    // Five failures 5 minutes apart never fit the 10-minute window; five in one minute do.
    let mut log = String::new();
    for i in 0..5 {
        log.push_str(&format!(
            "Nov 28 0{i}:00:00 vm sshd[1]: Failed password for root from 192.0.2.1 port 22 ssh2\n"
        ));
        log.push_str(&format!(
            "Nov 28 05:00:0{i} vm sshd[2]: Failed password for root from 192.0.2.2 port 22 ssh2\n"
        ));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_mirage-server"))
        .args(["scan", "--service", "sshd", "--year", "2026", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(log.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.contains("192.0.2.1"), "{stdout}");
    assert!(
        stdout.contains(r#""addr":"192.0.2.2","service":"sshd","rule":"sshd-failed-password""#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#""first":"2026-11-28T05:00:00Z""#),
        "{stdout}"
    );
}
