//! Policy sync end to end: a real `mirage-manager` (its own embedded PostgreSQL) and a real
//! `mirage-agent run` in the lab's host namespace, which reaches the manager's loopback listener
//! through a relay (each namespace has its own loopback). Everything the agent does is read back
//! from the pinned kernel maps, and checked with packets where that is cheap.
//!
//! One scenario, in order: enrollment; the first snapshot (a hand-made CLI entry survives it);
//! a verdict reaches the map, a manual unblock removes it, an expiry removes it; the manager
//! goes down and enforcement does not change, not even across an agent restart with the maps
//! wiped; the manager comes back, changes are made, and the agent converges to its revision;
//! the agent is revoked, and keeps enforcing what it has.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use agent::{addr::Net, clock, loader, maps::Maps};
use serde_json::{Value, json};
use tests::{
    lab::{ATTACKER_V4, Agent, HOST_V4, LEGIT_V4, Lab, binary, ping},
    manager::ManagerProcess,
    netns::unique_tag,
    relay::Relay,
};

/// A hand-made entry (`mirage-agent block`): the sync must leave it alone.
const HAND: &str = "198.18.0.99";

/// Removes a directory on drop.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real `mirage-server run` on loopback: plain UDP syslog from a relay network, verdicts to
/// the manager. Stopped (SIGTERM, by PID) on drop; its directory goes with the caller's guard.
struct ServerProcess {
    child: std::process::Child,
    udp: std::net::SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    fn start(dir: &Path, manager: std::net::SocketAddr, credential: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let credential_file = dir.join("server.credential");
        std::fs::write(&credential_file, format!("{credential}\n")).unwrap();
        std::fs::set_permissions(&credential_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nudp = [\"{udp}\"]\n\n[trust]\nrelay_networks = [\"127.0.0.0/8\"]\n\n\
                 [manager]\nurl = \"http://{manager}\"\ncredential_file = \"{}\"\n\n\
                 [queue]\ndir = \"{}\"\n",
                credential_file.display(),
                dir.join("queue").display()
            ),
        )
        .unwrap();
        let log = dir.join("server.log");
        let child = Command::new(binary("mirage-server"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "server=info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, udp, log }
    }

    /// Sends `n` sshd failed-password lines for `addr`, as rsyslog relays them (RFC 5424).
    fn failed_passwords(&self, addr: &str, n: usize) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        for i in 0..n {
            let line = format!(
                "<38>1 {ts} lab-host sshd 4121 - - Failed password for root from {addr} port {} ssh2",
                50000 + i
            );
            sock.send_to(line.as_bytes(), self.udp).unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signalling our own child, not yet reaped, by PID.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

/// The manager's JSON API as an admin.
struct Api {
    http: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
    rt: tokio::runtime::Runtime,
}

impl Api {
    fn login(base: &str, password: &str) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = reqwest::Client::new();
        let (cookie, csrf) = rt.block_on(async {
            let resp = http
                .post(format!("{base}/api/v1/login"))
                .json(&json!({ "username": "admin", "password": password }))
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "login: {}", resp.status());
            let cookie = resp
                .headers()
                .get(reqwest::header::SET_COOKIE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .unwrap()
                .to_owned();
            let me: Value = resp.json().await.unwrap();
            (cookie, me["csrf_token"].as_str().unwrap().to_owned())
        });
        Self {
            http,
            base: base.to_owned(),
            cookie,
            csrf,
            rt,
        }
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.rt.block_on(async {
            let mut req = self
                .http
                .request(method, format!("{}{path}", self.base))
                .header(reqwest::header::COOKIE, &self.cookie)
                .header("x-csrf-token", &self.csrf);
            if let Some(body) = body {
                req = req.json(&body);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
    }

    fn post(&self, path: &str, body: Value) -> Value {
        let (status, v) = self.call(reqwest::Method::POST, path, Some(body));
        assert!((200..300).contains(&status), "POST {path}: {status} {v}");
        v
    }

    fn get(&self, path: &str) -> Value {
        let (status, v) = self.call(reqwest::Method::GET, path, None);
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    fn unblock(&self, net: &str) {
        let found = self.get(&format!("/api/v1/attackers?q={net}"));
        let id = found
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["net"].as_str().unwrap().starts_with(&format!("{net}/")))
            .unwrap_or_else(|| panic!("no attacker entry for {net}: {found}"))["id"]
            .as_i64()
            .unwrap();
        let (status, v) = self.call(
            reqwest::Method::DELETE,
            &format!("/api/v1/attackers/{id}"),
            None,
        );
        assert_eq!(status, 204, "unblock {net}: {v}");
    }

    /// A verdict as `mirage-server` posts it (service credential).
    fn verdict(&self, credential: &str, id: &str, addr: &str) -> Value {
        self.rt.block_on(async {
            let at = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            let resp = self
                .http
                .post(format!("{}/api/v1/verdicts", self.base))
                .bearer_auth(credential)
                .json(&json!({ "verdicts": [{
                    "id": id, "addr": addr, "rule": "sshd-failed-password", "service": "sshd",
                    "severity": "high", "action": "drop", "count": 6, "at": at,
                    "evidence": [format!("Failed password for root from {addr} port 50022 ssh2")],
                }]}))
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "verdicts: {}", resp.status());
            resp.json().await.unwrap()
        })
    }

    /// What the manager would send a fresh agent now (the poll interface, agent credential).
    fn snapshot(&self, agent_credential: &str) -> Value {
        self.rt.block_on(async {
            let resp = self
                .http
                .post(format!("{}/api/v1/agent/policy", self.base))
                .bearer_auth(agent_credential)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "policy: {}", resp.status());
            resp.json().await.unwrap()
        })
    }

    /// The agent's record, with its last heartbeat's revision and counters.
    fn agent(&self, name: &str) -> Value {
        self.get("/api/v1/agents")
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }
}

/// Polls `f` every 50 ms until it holds; panics with the agent's log after `timeout`.
fn eventually(agent: &Agent, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "not within {timeout:?}: {what}\n--- agent log ---\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn maps(agent: &Agent) -> Maps {
    Maps::open_pinned(&loader::pin_dir(agent.root())).unwrap()
}

/// The live (unexpired) attacker entries in the kernel: network → action name.
fn live_attackers(agent: &Agent) -> Vec<(Net, &'static str)> {
    let now = clock::boottime_ns();
    maps(agent)
        .attackers()
        .unwrap()
        .into_iter()
        .filter(|(_, e)| !e.expired(now))
        .map(|(n, e)| {
            (
                n,
                agent_common::Action::try_from(e.action).map_or("?", agent_common::Action::name),
            )
        })
        .collect()
}

/// Every attacker network in the kernel, expired or not.
fn all_attackers(agent: &Agent) -> BTreeSet<Net> {
    maps(agent)
        .attackers()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

fn has(agent: &Agent, net: &str) -> bool {
    let net: Net = net.parse().unwrap();
    live_attackers(agent).iter().any(|(n, _)| *n == net)
}

fn attacker_reaches_host(lab: &Lab) -> bool {
    ping(
        &lab.attacker,
        IpAddr::V4(HOST_V4),
        2,
        Duration::from_millis(300),
    )
    .unwrap()
        > 0
}

fn legit_reaches_host(lab: &Lab) -> bool {
    ping(
        &lab.legit,
        IpAddr::V4(HOST_V4),
        2,
        Duration::from_millis(500),
    )
    .unwrap()
        > 0
}

fn write_config(path: &Path, url: &str, state: &Path) {
    std::fs::write(
        path,
        format!(
            "mode = \"firewall\"\nstate_dir = \"{}\"\n\n[manager]\nurl = \"{url}\"\nheartbeat_secs = 1\n",
            state.display()
        ),
    )
    .unwrap();
}

fn enroll(ns: &str, url: &str, token: &str, state: &Path, force: bool) -> std::process::Output {
    let mut cmd = Command::new(binary("mirage-agent"));
    cmd.env("MIRAGE_NETNS", ns).args([
        "enroll",
        "--manager",
        url,
        "--token",
        token,
        "--name",
        "lab-host",
        "--state-dir",
        &state.display().to_string(),
    ]);
    if force {
        cmd.arg("--force");
    }
    cmd.output().unwrap()
}

#[test]
fn policy_follows_the_manager_and_survives_its_absence() {
    let lab = Lab::new().unwrap();
    let mut manager = ManagerProcess::start().unwrap();
    let relay = Relay::start(lab.host.name(), 0, manager.addr()).unwrap();
    let url = format!("http://{}", relay.addr());
    let api = Api::login(&manager.base_url(), manager.admin_password());
    let tag = unique_tag();
    let state = DirGuard(std::env::temp_dir().join(format!("mirage-agent-{tag}-state")));
    let config = DirGuard(std::env::temp_dir().join(format!("mirage-agent-{tag}.toml")));

    // Enrollment, through the relay from the host namespace.
    let server = api.post(
        "/api/v1/service-credentials",
        json!({ "name": "test-server" }),
    );
    let server_credential = server["credential"].as_str().unwrap().to_owned();
    let token = api.post("/api/v1/enrollment-tokens", json!({}))["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = enroll(lab.host.name(), &url, &token, &state.0, false);
    assert!(
        out.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let credential_file = state.0.join("credential");
    let credential = std::fs::read_to_string(&credential_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(!credential.is_empty());
    let mode = std::fs::metadata(&credential_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!printed.contains(&credential), "the credential was printed");
    // A second enrollment is refused before the (new) token is spent.
    let token2 = api.post("/api/v1/enrollment-tokens", json!({}))["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let again = enroll(lab.host.name(), &url, &token2, &state.0, false);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(
        std::fs::read_to_string(&credential_file).unwrap().trim(),
        credential
    );

    // The agent: the file says firewall; the manager's default policy says unreal.
    write_config(&config.0, &url, &state.0);
    let cfg_arg = config.0.display().to_string();
    let args = ["--config", cfg_arg.as_str()];
    let mut agent = Agent::start(&lab.host, &args).unwrap();
    agent.cli(&["block", HAND]).unwrap();
    eventually(
        &agent,
        "the first heartbeat with a revision",
        Duration::from_secs(20),
        || {
            let a = api.agent("lab-host");
            a["applied_revision"].is_i64() && a["counters"]["global"].is_object()
        },
    );
    let record = api.agent("lab-host");
    assert_eq!(record["mode"], "unreal", "{record}");
    let m = maps(&agent);
    assert_eq!(
        agent_common::Mode::try_from(m.config().unwrap().mode).unwrap(),
        agent_common::Mode::Unreal
    );
    // The manager's address (the relay's, from the agent's side) is allowlisted by itself.
    assert!(
        m.allowlist()
            .unwrap()
            .contains(&"127.0.0.1".parse().unwrap()),
        "{:?}",
        m.allowlist()
    );
    assert!(
        has(&agent, HAND),
        "the hand-made entry survives the snapshot"
    );

    // A verdict reaches the kernel map; the attacker is dropped, the legitimate client is not.
    assert!(attacker_reaches_host(&lab));
    let sent = Instant::now();
    let answer = api.verdict(&server_credential, "t-1", &ATTACKER_V4.to_string());
    assert_eq!(answer["accepted"], 1, "{answer}");
    eventually(
        &agent,
        "the verdict in the kernel map",
        Duration::from_secs(10),
        || has(&agent, &ATTACKER_V4.to_string()),
    );
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "verdict to map took {took:?}"
    );
    assert!(live_attackers(&agent).contains(&(ATTACKER_V4.to_string().parse().unwrap(), "drop")));
    assert!(!attacker_reaches_host(&lab));
    assert!(legit_reaches_host(&lab));

    // The whole pipeline: sshd lines to a real mirage-server, its verdict to the manager, the
    // delta to the agent. The rule's action is `redirect` (no sandbox in this lab: the map is
    // what is checked).
    {
        let server_dir = DirGuard(std::env::temp_dir().join(format!("mirage-agent-{tag}-server")));
        let server = ServerProcess::start(&server_dir.0, manager.addr(), &server_credential);
        let flagged = "198.18.0.70";
        let deadline = Instant::now() + Duration::from_secs(30);
        while !has(&agent, flagged) {
            assert!(
                Instant::now() < deadline,
                "the server's verdict never reached the map\n--- server ---\n{}\n--- agent ---\n{}",
                server.log(),
                agent.log()
            );
            // Five lines make the rule fire; sent again until the server listens.
            server.failed_passwords(flagged, 5);
            thread::sleep(Duration::from_millis(500));
        }
        assert!(
            live_attackers(&agent).contains(&(flagged.parse().unwrap(), "redirect")),
            "{:?}",
            live_attackers(&agent)
        );
        drop(server);
        api.unblock(flagged);
    }

    // A manual unblock removes it.
    api.unblock(&ATTACKER_V4.to_string());
    eventually(
        &agent,
        "the unblock in the kernel map",
        Duration::from_secs(10),
        || !all_attackers(&agent).contains(&ATTACKER_V4.to_string().parse().unwrap()),
    );
    assert!(attacker_reaches_host(&lab));

    // An expiry removes it: the kernel stops enforcing at once, the entry goes with the sweeps.
    api.post(
        "/api/v1/attackers",
        json!({ "net": ATTACKER_V4.to_string(), "action": "drop", "ttl_secs": 3 }),
    );
    eventually(
        &agent,
        "the expiring entry in the map",
        Duration::from_secs(10),
        || has(&agent, &ATTACKER_V4.to_string()),
    );
    assert!(!attacker_reaches_host(&lab));
    eventually(&agent, "the entry expired", Duration::from_secs(10), || {
        !has(&agent, &ATTACKER_V4.to_string())
    });
    assert!(attacker_reaches_host(&lab));
    eventually(
        &agent,
        "the expired entry removed",
        Duration::from_secs(20),
        || !all_attackers(&agent).contains(&ATTACKER_V4.to_string().parse().unwrap()),
    );

    // The state enforced while the manager is away.
    api.post(
        "/api/v1/attackers",
        json!({ "net": ATTACKER_V4.to_string(), "action": "drop" }),
    );
    api.post(
        "/api/v1/attackers",
        json!({ "net": "fd00:6d69:7261::/48", "action": "redirect" }),
    );
    api.verdict(&server_credential, "t-2", "198.18.0.50");
    eventually(
        &agent,
        "three more entries",
        Duration::from_secs(10),
        || {
            has(&agent, &ATTACKER_V4.to_string())
                && has(&agent, "fd00:6d69:7261::/48")
                && has(&agent, "198.18.0.50")
        },
    );
    let before = live_attackers(&agent);

    manager.stop();
    eventually(&agent, "the agent notices", Duration::from_secs(20), || {
        agent.log().contains("Policy stream to the manager lost")
    });
    thread::sleep(Duration::from_secs(3));
    assert_eq!(live_attackers(&agent), before, "enforcement changed");
    assert!(!attacker_reaches_host(&lab));
    assert!(legit_reaches_host(&lab));

    // Even an agent restart with the maps wiped restores it, without the manager.
    agent.stop().unwrap();
    let detach = agent
        .command()
        .env_remove("MIRAGE_NETNS")
        .arg("detach")
        .output()
        .unwrap();
    assert!(detach.status.success());
    agent.spawn(&args).unwrap();
    // The hand-made entry went with the maps; the operator adds it again.
    agent.cli(&["block", HAND]).unwrap();
    eventually(
        &agent,
        "the persisted policy restored",
        Duration::from_secs(20),
        || {
            let live = live_attackers(&agent);
            before
                .iter()
                .filter(|(n, _)| n.to_string() != HAND)
                .all(|e| live.contains(e))
        },
    );
    assert_eq!(
        agent_common::Mode::try_from(maps(&agent).config().unwrap().mode).unwrap(),
        agent_common::Mode::Unreal,
        "the policy's mode, not the file's fallback"
    );
    assert!(!attacker_reaches_host(&lab));

    // The manager returns; changes follow; the agent converges to its current revision.
    manager.restart().unwrap();
    let api = Api::login(&manager.base_url(), manager.admin_password());
    api.unblock(&ATTACKER_V4.to_string());
    api.post(
        "/api/v1/attackers",
        json!({ "net": "198.18.0.60", "action": "drop", "ttl_secs": 3600 }),
    );
    api.post("/api/v1/allowlist", json!({ "net": LEGIT_V4.to_string() }));
    let want = api.snapshot(&credential);
    let head = want["revision"].as_i64().unwrap();
    let mut expected: BTreeSet<Net> = want["attackers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["net"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(expected.contains(&"198.18.0.60".parse().unwrap()));
    expected.insert(HAND.parse().unwrap());
    eventually(
        &agent,
        "converged to the manager's revision",
        Duration::from_secs(60),
        || {
            api.agent("lab-host")["applied_revision"].as_i64() == Some(head)
                && all_attackers(&agent) == expected
        },
    );
    assert!(
        maps(&agent)
            .allowlist()
            .unwrap()
            .contains(&LEGIT_V4.to_string().parse().unwrap())
    );
    assert!(attacker_reaches_host(&lab));
    assert!(has(&agent, HAND));
    assert!(
        !agent.log().contains(&credential),
        "the credential was logged"
    );

    // Revoked: the manager ends the stream and refuses the credential; enforcement stays.
    let converged = live_attackers(&agent);
    let id = api.agent("lab-host")["id"].as_i64().unwrap();
    let (status, _) = api.call(
        reqwest::Method::DELETE,
        &format!("/api/v1/agents/{id}"),
        None,
    );
    assert_eq!(status, 204);
    eventually(
        &agent,
        "the refusal logged",
        Duration::from_secs(20),
        || agent.log().contains("refused this agent's credential"),
    );
    assert_eq!(live_attackers(&agent), converged, "enforcement changed");
    drop(relay);
}
