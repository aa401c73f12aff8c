//! The Mirage demo (`cargo xtask demo`, as root), in three acts.
//!
//! 1. The firewall: a protected host, a legitimate client and an attacker in three network
//!    namespaces; `mirage-agent` protects the host's interface in firewall mode. Both clients
//!    reach the host over TCP, UDP and ICMP; then the operator blocks the attacker, whose packets
//!    are dropped by the XDP program from then on, while the legitimate client is untouched.
//! 2. The sandbox (镜花水月): the same three hosts plus a sandbox namespace behind the host, and
//!    the agent in `unreal` mode on both of the host's interfaces. Once the operator flags the
//!    attacker, its new connections to the host's SSH port land in the sandbox, which sees the
//!    attacker's real address, while the attacker's socket still talks to the host's address; the
//!    legitimate client and the attacker's connection from before the flag keep the real service.
//! 3. The control plane: a real `mirage-manager` with its embedded PostgreSQL; the lab's agent
//!    enrolls with a one-time token and holds its policy stream; a verdict posted the way
//!    `mirage-server` posts it reaches the agent's kernel map by itself, in milliseconds, and the
//!    attacker is dropped.
//!
//! Each act's lab, agent and pins are removed at its end, also on failure (RAII guards). Exits
//! non-zero if anything did not behave as shown.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the demo's output is its purpose"
)]

use std::{
    io::IsTerminal as _,
    net::{IpAddr, SocketAddr},
    process::{Command, ExitCode},
    time::Duration,
};

use agent::{loader, maps::Maps};
use anyhow::{Context as _, Result};
use tests::{
    lab::{ATTACKER_V4, Agent, HOST_IFACE, HOST_V4, LEGIT_V4, Lab, binary, ping},
    manager::ManagerProcess,
    netns::{Netns, unique_tag},
    probe::{EchoServer, tcp_echo_roundtrip, udp_echo_roundtrip},
    relay::Relay,
    sandbox_lab::{
        Exchange, HOST_SANDBOX_V4, RedirectModel, SANDBOX_IFACE, SANDBOX_SSH_PORT, SANDBOX_V4,
        SSH_PORT, SandboxAgent, SandboxLab, Session, tcp_ask,
    },
};

/// The echo service's port on the host (the classic echo port; the namespace is private).
const ECHO_PORT: u16 = 7;
/// How long a probe waits: long enough for a healthy round trip on veth, short enough that the
/// attacker's dropped probes do not make the demo drag.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const STEPS: usize = 17;

fn main() -> ExitCode {
    if let Err(err) = tests::netns::cleanup_on_interrupt() {
        eprintln!("warning: Ctrl-C will not clean up: {err:#}");
    }
    let style = Style::detect();
    let mut checks = Checks::default();
    let result = run(&style, &mut checks);
    // Everything the demo made is gone by now: `run`'s guards dropped on return.
    match result {
        Ok(cleanup) => {
            println!();
            println!("{}", style.bold("Cleaned up"));
            for line in cleanup {
                println!("  {line}");
            }
        }
        Err(err) => {
            eprintln!();
            eprintln!("demo error: {err:#}");
            return ExitCode::FAILURE;
        }
    }
    println!();
    if checks.failed.is_empty() {
        println!(
            "{}",
            style.green(&format!(
                "Demo passed: all {} expectations met.",
                checks.total
            ))
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "{}",
            style.red(&format!(
                "Demo FAILED: {} of {} expectations not met:",
                checks.failed.len(),
                checks.total
            ))
        );
        for f in &checks.failed {
            println!("  - {f}");
        }
        ExitCode::FAILURE
    }
}

/// Runs both acts; returns what the clean-up removed (checked after the guards dropped).
fn run(style: &Style, checks: &mut Checks) -> Result<Vec<String>> {
    let mut cleanup = firewall_act(style, checks)?;
    cleanup.extend(sandbox_act(style, checks)?);
    cleanup.extend(control_plane_act(style, checks)?);
    Ok(cleanup)
}

/// Act 3: the control plane. A real `mirage-manager` with its own embedded PostgreSQL; the lab's
/// agent enrolls with a one-time token and holds its policy stream; a verdict as `mirage-server`
/// reports it reaches the agent's kernel map by itself and the attacker is dropped.
fn control_plane_act(style: &Style, checks: &mut Checks) -> Result<Vec<String>> {
    println!();
    println!(
        "{}",
        style.bold("Mirage demo, act 3: the control plane (mirage-manager)")
    );
    println!(
        "mirage-server reports verdicts to mirage-manager, which keeps attackers, evidence and\n\
         policy in PostgreSQL and pushes every change to the agents over one authenticated\n\
         stream each; the agent applies it to its kernel maps itself. Here the manager runs for\n\
         real, with the embedded PostgreSQL cluster it starts itself; the verdict is posted the\n\
         way mirage-server posts it."
    );
    heading(
        style,
        12,
        "Starting mirage-manager (embedded PostgreSQL, loopback only)",
    );
    let lab = Lab::new().context("building the lab")?;
    let echo_addr = SocketAddr::new(IpAddr::V4(HOST_V4), ECHO_PORT);
    let echo = EchoServer::start(lab.host.name(), echo_addr).context("starting the echo server")?;
    let manager = ManagerProcess::start().context("starting mirage-manager")?;
    // The agent lives in the lab's host namespace, whose loopback is its own: a relay there
    // reaches the manager's loopback listener.
    let relay = Relay::start(lab.host.name(), 0, manager.addr()).context("starting the relay")?;
    let tag = unique_tag();
    let state = DirGuard(std::env::temp_dir().join(format!("mirage-agent-{tag}-state")));
    let config = DirGuard(std::env::temp_dir().join(format!("mirage-agent-{tag}.toml")));
    println!(
        "  $ mirage-manager serve --config {}/manager.toml",
        manager.dir().display()
    );
    println!(
        "  Listening on {} (PID {}); cluster in {}/data/postgres; first-start admin password\n  \
         printed once (only its argon2id hash is stored). The agent reaches it as\n  \
         http://{} from the host namespace.",
        manager.base_url(),
        manager.pid(),
        manager.dir().display(),
        relay.addr()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    let outcome = runtime.block_on(control_plane_steps(
        style,
        checks,
        &manager,
        &relay,
        &lab,
        echo_addr,
        (&state.0, &config.0),
    ));
    let dir = manager.dir().to_owned();
    let names: Vec<String> = [&lab.host, &lab.legit, &lab.attacker, &lab.lan]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    drop(relay);
    drop(manager);
    drop(echo);
    drop(lab);
    let state_dir = state.0.clone();
    drop(state);
    drop(config);
    outcome?;
    checks.expect(
        !dir.exists(),
        &format!("the manager's data directory {} is removed", dir.display()),
    );
    checks.expect(
        !state_dir.exists(),
        &format!(
            "the agent's state directory {} is removed",
            state_dir.display()
        ),
    );
    let remaining = netns_list()?;
    checks.expect(
        names.iter().all(|n| !remaining.contains(n)),
        "no lab namespace of act 3 is left",
    );
    Ok(vec![
        "stopped mirage-manager (SIGTERM: it stopped its PostgreSQL cluster), removed its data directory".to_owned(),
        "removed the agent's state directory (credential, applied policy)".to_owned(),
        format!("deleted the namespaces {}", names.join(", ")),
    ])
}

/// Removes a file or directory on drop.
struct DirGuard(std::path::PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0).or_else(|_| std::fs::remove_file(&self.0));
    }
}

/// Whether `addr` has a live entry in the agent's pinned attacker map.
fn in_kernel_map(agent: &Agent, addr: IpAddr) -> Result<Option<&'static str>> {
    let maps = Maps::open_pinned(&loader::pin_dir(agent.root()))?;
    let now = agent::clock::boottime_ns();
    Ok(maps
        .attackers()?
        .into_iter()
        .find(|(n, e)| n.is_host() && n.addr() == addr && !e.expired(now))
        .map(|(_, e)| {
            agent_common::Action::try_from(e.action).map_or("?", agent_common::Action::name)
        }))
}

async fn control_plane_steps(
    style: &Style,
    checks: &mut Checks,
    manager: &ManagerProcess,
    relay: &Relay,
    lab: &Lab,
    echo_addr: SocketAddr,
    (state, config): (&std::path::Path, &std::path::Path),
) -> Result<()> {
    let base = manager.base_url();
    let http = reqwest::Client::new();
    heading(
        style,
        13,
        "An operator logs in; a server credential; the agent enrolls with a one-time token",
    );
    let resp = http
        .post(format!("{base}/api/v1/login"))
        .json(&serde_json::json!({ "username": "admin", "password": manager.admin_password() }))
        .send()
        .await?;
    let cookie = resp
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("no session cookie")?
        .to_owned();
    let me: serde_json::Value = resp.json().await?;
    let csrf = me["csrf_token"]
        .as_str()
        .context("no CSRF token")?
        .to_owned();
    println!(
        "  POST /api/v1/login as admin: session cookie (HttpOnly, SameSite=Strict) + CSRF token"
    );
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{base}{path}"))
            .header(reqwest::header::COOKIE, &cookie)
            .header("x-csrf-token", &csrf)
            .json(&body)
            .send()
    };
    let server: serde_json::Value = post(
        "/api/v1/service-credentials",
        serde_json::json!({ "name": "demo-server" }),
    )
    .await?
    .json()
    .await?;
    let server_credential = server["credential"]
        .as_str()
        .context("no credential")?
        .to_owned();
    println!(
        "  POST /api/v1/service-credentials {{\"name\": \"demo-server\"}}: a bearer credential for mirage-server (stored as SHA-256)"
    );
    let token: serde_json::Value = post("/api/v1/enrollment-tokens", serde_json::json!({}))
        .await?
        .json()
        .await?;
    let token = token["token"].as_str().context("no token")?.to_owned();
    println!("  POST /api/v1/enrollment-tokens: a one-time token (valid one hour)");
    let url = format!("http://{}", relay.addr());
    println!(
        "  $ mirage-agent --netns {} enroll --manager {url} --name demo-host --state-dir {} \
         (token in MIRAGE_ENROLL_TOKEN)",
        lab.host.name(),
        state.display()
    );
    let enrolled = Command::new(binary("mirage-agent"))
        .env("MIRAGE_NETNS", lab.host.name())
        .env("MIRAGE_ENROLL_TOKEN", &token)
        .args([
            "enroll",
            "--manager",
            &url,
            "--name",
            "demo-host",
            "--state-dir",
        ])
        .arg(state)
        .output()
        .context("running mirage-agent enroll")?;
    let credential_file = state.join("credential");
    let private = std::fs::metadata(&credential_file)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777 == 0o600)
        .unwrap_or(false);
    println!(
        "  Enrolled: the agent's own credential is in {} (mode 0600), never printed",
        credential_file.display()
    );
    checks.expect(
        enrolled.status.success() && private,
        "the agent enrolls and keeps its credential private",
    );

    heading(
        style,
        14,
        "The agent starts, opens its policy stream and applies the manager's policy",
    );
    std::fs::write(
        config,
        format!(
            "mode = \"firewall\"          # the fallback until the manager's policy arrives\n\
             state_dir = \"{}\"\n\n[manager]\nurl = \"{url}\"\nheartbeat_secs = 2\n",
            state.display()
        ),
    )?;
    println!("  {}:", config.display());
    print_indented(&std::fs::read_to_string(config)?);
    let config_arg = config.display().to_string();
    println!(
        "  $ mirage-agent --netns {} run --iface {HOST_IFACE} --config {config_arg}",
        lab.host.name()
    );
    let agent =
        Agent::start(&lab.host, &["--config", &config_arg]).context("starting the agent")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let record = loop {
        let agents: serde_json::Value = http
            .get(format!("{base}/api/v1/agents"))
            .header(reqwest::header::COOKIE, &cookie)
            .send()
            .await?
            .json()
            .await?;
        let record = agents
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["name"] == "demo-host" && a["applied_revision"].is_i64())
            .cloned();
        if let Some(record) = record {
            break Some(record);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let record = record.unwrap_or_default();
    println!(
        "  The manager's agents page: demo-host, mode {}, applied revision {}, heartbeat with its kernel counters",
        record["mode"], record["applied_revision"]
    );
    checks.expect(
        record["mode"] == "unreal",
        "the agent applies the manager's policy (mode unreal) and reports it",
    );
    let maps = Maps::open_pinned(&loader::pin_dir(agent.root()))?;
    let allowlisted = maps
        .allowlist()?
        .iter()
        .any(|n| n.to_string() == "127.0.0.1");
    println!(
        "  The manager's address, as the agent reaches it (127.0.0.1), is allowlisted by the agent itself"
    );
    checks.expect(
        allowlisted,
        "the manager's address is allowlisted automatically",
    );

    heading(
        style,
        15,
        &format!("mirage-server reports an SSH brute force from {ATTACKER_V4}"),
    );
    let at =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?;
    let verdicts = serde_json::json!({ "verdicts": [{
        "id": "demo-1", "addr": ATTACKER_V4.to_string(), "rule": "sshd-failed-password",
        "service": "sshd", "severity": "high", "action": "drop", "count": 6, "at": at,
        "evidence": [
            format!("sshd[4121]: Failed password for root from {ATTACKER_V4} port 50022 ssh2"),
            format!("sshd[4121]: Failed password for root from {ATTACKER_V4} port 50022 ssh2"),
            format!("sshd[4125]: Invalid user admin from {ATTACKER_V4} port 50030"),
            format!("sshd[4125]: Failed password for invalid user admin from {ATTACKER_V4} port 50030 ssh2"),
        ],
    }]});
    let post_verdicts = || {
        http.post(format!("{base}/api/v1/verdicts"))
            .bearer_auth(&server_credential)
            .json(&verdicts)
            .send()
    };
    let sent = std::time::Instant::now();
    let answer: serde_json::Value = post_verdicts().await?.json().await?;
    println!("  POST /api/v1/verdicts (service credential): {answer}");
    let deadline = sent + Duration::from_secs(10);
    let action = loop {
        if let Some(action) = in_kernel_map(&agent, IpAddr::V4(ATTACKER_V4))? {
            break Some(action);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    let took = sent.elapsed();
    println!(
        "  In the agent's kernel map after {:.1} ms (from the POST; stream delta, applied by the agent): {ATTACKER_V4} {}",
        took.as_secs_f64() * 1000.0,
        action.unwrap_or("(missing)")
    );
    checks.expect(
        action == Some("drop"),
        "the verdict reaches the agent's kernel map by itself, as a drop entry",
    );
    let again: serde_json::Value = post_verdicts().await?.json().await?;
    println!("  The same batch again (a retry): {again}");
    checks.expect(
        again["accepted"] == 0 && again["duplicates"] == 1,
        "a retried verdict batch is stored once",
    );

    heading(
        style,
        16,
        "Enforced: the attacker is dropped, the legitimate client is not",
    );
    println!("  $ mirage-agent list");
    print_indented(&agent.cli(&["list"])?);
    probe_all(style, checks, &lab.legit, "legit", echo_addr, true)?;
    probe_all(style, checks, &lab.attacker, "attacker", echo_addr, false)?;

    heading(
        style,
        17,
        "The evidence, as the web UI's attacker page shows it",
    );
    let attackers: serde_json::Value = http
        .get(format!("{base}/api/v1/attackers?q={ATTACKER_V4}"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await?
        .json()
        .await?;
    let id = attackers[0]["id"].as_i64().context("no attacker entry")?;
    let page: serde_json::Value = http
        .get(format!("{base}/api/v1/attackers/{id}"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await?
        .json()
        .await?;
    let a = &page["attacker"];
    println!(
        "  attacker {}: action {}, rule {}, evidence {}, expires {}, reported by {}",
        a["net"], a["action"], a["rule"], a["evidence_count"], a["expires_at"], a["reported_by"]
    );
    for line in page["detections"][0]["evidence"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!("    | {}", line.as_str().unwrap_or_default());
    }
    println!("  Web UI: {base}/ (while the manager runs; log in as admin).");
    checks.expect(
        page["detections"].as_array().is_some_and(|d| d.len() == 1),
        "the attacker page joins the detection and its evidence lines",
    );
    drop(agent);
    Ok(())
}

/// Act 1: the firewall.
fn firewall_act(style: &Style, checks: &mut Checks) -> Result<Vec<String>> {
    println!("{}", style.bold("Mirage demo, act 1: the XDP firewall"));
    println!(
        "mirage-agent attaches an XDP program to the protected host's interface. In firewall mode\n\
         it drops every packet from a source in its attacker map before the kernel's network\n\
         stack sees it; everyone else passes untouched."
    );

    heading(
        style,
        1,
        "Building the lab (network namespaces, nothing leaves this machine)",
    );
    let lab = Lab::new().context("building the lab")?;
    println!("  attacker  {ATTACKER_V4:<12} ({})", lab.attacker.name());
    println!("  legit     {LEGIT_V4:<12} ({})", lab.legit.name());
    println!(
        "  host      {HOST_V4:<12} ({}), interface {HOST_IFACE}",
        lab.host.name()
    );
    println!("  All three share one bridge; both clients reach the host through its {HOST_IFACE}.");
    let echo_addr = SocketAddr::new(IpAddr::V4(HOST_V4), ECHO_PORT);
    let echo = EchoServer::start(lab.host.name(), echo_addr).context("starting the echo server")?;
    println!(
        "  Echo service (TCP and UDP) listening on {} in the host namespace.",
        echo.tcp_addr()
    );

    heading(
        style,
        2,
        &format!("Starting mirage-agent in firewall mode on the host's {HOST_IFACE}"),
    );
    println!(
        "  $ mirage-agent --netns {} run --iface {HOST_IFACE} --mode firewall",
        lab.host.name()
    );
    let agent = Agent::start(&lab.host, &["--mode", "firewall"]).context("starting the agent")?;
    println!(
        "  Attached; program, maps and link pinned under {}/v{}.",
        agent.root().display(),
        agent_common::LAYOUT_VERSION
    );
    for line in agent.log().lines() {
        println!("  agent log: {}", line.trim());
    }

    heading(style, 3, "Before blocking: both clients reach the host");
    println!("  The attacker map is empty, so the program passes everything.");
    probe_all(style, checks, &lab.legit, "legit", echo_addr, true)?;
    probe_all(style, checks, &lab.attacker, "attacker", echo_addr, true)?;

    heading(
        style,
        4,
        &format!("The operator blocks the attacker ({ATTACKER_V4})"),
    );
    println!("  $ mirage-agent block {ATTACKER_V4}");
    agent
        .cli(&["block", &ATTACKER_V4.to_string()])
        .context("mirage-agent block")?;
    println!("  One entry in the attacker map; it takes effect on the next packet, no reload.");

    heading(
        style,
        5,
        "After blocking: the attacker is dropped, the legitimate client is not",
    );
    probe_all(style, checks, &lab.legit, "legit", echo_addr, true)?;
    probe_all(style, checks, &lab.attacker, "attacker", echo_addr, false)?;

    heading(style, 6, "What the agent reports");
    println!("  $ mirage-agent list");
    print_indented(&agent.cli(&["list"]).context("mirage-agent list")?);
    println!("  $ mirage-agent top --once");
    print_indented(&agent.cli(&["top", "--once"]).context("mirage-agent top")?);
    let drops = attacker_drops(&agent)?;
    checks.expect(
        drops > 0,
        &format!("the per-source counters show drops for {ATTACKER_V4} (saw {drops})"),
    );

    // Clean up in order (the guards would do the same on an early return), then check.
    let names: Vec<String> = [&lab.host, &lab.legit, &lab.attacker, &lab.lan]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    let root = agent.root().to_owned();
    drop(echo);
    drop(agent);
    drop(lab);
    let remaining = netns_list()?;
    let left: Vec<&String> = names.iter().filter(|n| remaining.contains(n)).collect();
    checks.expect(
        left.is_empty(),
        &format!("no lab namespace is left (left: {left:?})"),
    );
    checks.expect(
        !root.exists(),
        &format!("no pin is left under {}", root.display()),
    );
    Ok(vec![
        "stopped mirage-agent and ran `mirage-agent detach`: XDP detached, pins removed".to_owned(),
        format!("deleted the namespaces {}", names.join(", ")),
    ])
}

/// Act 2: an attacker's SSH connection lands in the sandbox; the legitimate client's does not.
fn sandbox_act(style: &Style, checks: &mut Checks) -> Result<Vec<String>> {
    println!();
    println!(
        "{}",
        style.bold("Mirage demo, act 2: into the sandbox (unreal mode)")
    );
    println!(
        "In unreal mode the program does not drop a flagged attacker: it rewrites the attacker's\n\
         new connections toward a sandbox host, and the sandbox's replies back, so the attacker\n\
         keeps talking to \"the server\" while everything it does lands in the sandbox."
    );

    heading(
        style,
        7,
        "Building the lab again, with a sandbox behind the host",
    );
    let lab = SandboxLab::new(RedirectModel::PreserveSource).context("building the sandbox lab")?;
    println!(
        "  attacker  {ATTACKER_V4:<12} ({})",
        lab.lab.attacker.name()
    );
    println!("  legit     {LEGIT_V4:<12} ({})", lab.lab.legit.name());
    println!(
        "  host      {HOST_V4:<12} ({}), {HOST_IFACE} toward the clients, {SANDBOX_IFACE} \
         {HOST_SANDBOX_V4} toward the sandbox",
        lab.lab.host.name()
    );
    println!("  sandbox   {SANDBOX_V4:<12} ({})", lab.sandbox.name());
    println!(
        "  Only the host forwards, between its own two interfaces; the clients have no route to\n  \
         the sandbox, and the sandbox routes its replies through the host (preserve-source)."
    );
    let ssh = SocketAddr::new(IpAddr::V4(HOST_V4), SSH_PORT);
    let _host = lab.host_services().context("starting the host's service")?;
    let _sandbox = lab
        .sandbox_services()
        .context("starting the sandbox's service")?;
    println!(
        "  The real service listens on {ssh} (host); its imitation on {} (sandbox).",
        SocketAddr::new(IpAddr::V4(SANDBOX_V4), SANDBOX_SSH_PORT)
    );
    println!("  Each answers with its name and the client address it sees.");

    heading(
        style,
        8,
        &format!("Starting mirage-agent in unreal mode on {HOST_IFACE} and {SANDBOX_IFACE}"),
    );
    let config = lab.config("unreal", "");
    println!(
        "  $ mirage-agent --netns {} run --iface {HOST_IFACE} --iface {SANDBOX_IFACE} \
         --config agent.toml --flow-log flows.jsonl",
        lab.lab.host.name()
    );
    println!("  agent.toml (IPv4 targets shown; it has the same for IPv6):");
    let mut blocks = config.split("\n[[sandbox]]\n");
    for line in blocks.next().unwrap_or_default().lines() {
        if !line.is_empty() {
            println!("    {line}");
        }
    }
    for block in blocks.filter(|b| !b.contains("fd6d:")) {
        println!(
            "    [[sandbox]] {}",
            block.lines().collect::<Vec<_>>().join("  ")
        );
    }
    let agent = SandboxAgent::start(&lab, &config).context("starting the agent")?;
    let root = agent.agent().root().to_owned();

    heading(
        style,
        9,
        "Before flagging: both clients reach the real service",
    );
    let (atk, legit) = (lab.lab.attacker.name(), lab.lab.legit.name());
    let ex = tcp_ask(legit, ssh, "hello", PROBE_TIMEOUT)?;
    show(style, checks, "legit", ssh, ex.as_ref().ok(), "host");
    let mut early =
        Session::open(atk, ssh, PROBE_TIMEOUT)?.context("the attacker's first connection")?;
    let ex = early.ask("hello", PROBE_TIMEOUT);
    show(style, checks, "attacker", ssh, ex.as_ref().ok(), "host");
    println!("  The attacker keeps this connection open.");

    heading(
        style,
        10,
        &format!(
            "The operator flags the attacker ({ATTACKER_V4}): new connections go to the sandbox"
        ),
    );
    println!("  $ mirage-agent block {ATTACKER_V4}");
    agent
        .block(IpAddr::V4(ATTACKER_V4), None)
        .context("mirage-agent block")?;
    let late = tcp_ask(atk, ssh, "whoami", PROBE_TIMEOUT)?;
    show(
        style,
        checks,
        "attacker",
        ssh,
        late.as_ref().ok(),
        "sandbox",
    );
    if let Ok(ex) = &late {
        let ok = ex.remote == ssh && ex.reply.peer == ex.local;
        checks.expect(
            ok,
            "the attacker's socket is connected to the host and the sandbox sees its real address",
        );
        println!(
            "  {} the attacker's socket {} is connected to {}; the sandbox saw {}",
            mark(style, ok),
            ex.local,
            ex.remote,
            ex.reply.peer
        );
    }
    let ex = early.ask("still-there", PROBE_TIMEOUT);
    show(style, checks, "attacker", ssh, ex.as_ref().ok(), "host");
    println!("  (that was the connection opened before the flag: it is left alone until it ends)");
    let ex = tcp_ask(legit, ssh, "hello-again", PROBE_TIMEOUT)?;
    show(style, checks, "legit", ssh, ex.as_ref().ok(), "host");

    heading(style, 11, "What the agent reports");
    let flows = agent.flows().context("reading the flow log")?;
    println!("  flows.jsonl (what attributes sandbox records to the attacker):");
    for f in &flows {
        println!(
            "    {} {} {} {} -> {} via {}",
            f.kind, f.model, f.proto, f.attacker, f.orig_dst, f.target
        );
    }
    let logged = late
        .as_ref()
        .is_ok_and(|ex| flows.iter().any(|f| f.attacker == ex.local));
    checks.expect(
        logged,
        "the flow log names the attacker's redirected connection",
    );
    println!("  $ mirage-agent top --once");
    print_indented(
        &agent
            .agent()
            .cli(&["top", "--once"])
            .context("mirage-agent top")?,
    );

    let names: Vec<String> = lab
        .namespaces()
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    drop(early);
    drop(agent);
    drop(lab);
    let remaining = netns_list()?;
    let left: Vec<&String> = names.iter().filter(|n| remaining.contains(n)).collect();
    checks.expect(
        left.is_empty(),
        &format!("no sandbox-lab namespace is left (left: {left:?})"),
    );
    checks.expect(
        !root.exists(),
        &format!("no pin is left under {}", root.display()),
    );
    Ok(vec![
        "stopped the second mirage-agent and ran `mirage-agent detach`: XDP and TC detached, pins removed".to_owned(),
        format!("deleted the namespaces {}", names.join(", ")),
    ])
}

/// Prints and records who answered a TCP exchange, against who should have.
fn show(
    style: &Style,
    checks: &mut Checks,
    who: &str,
    dst: SocketAddr,
    ex: Option<&Exchange>,
    expect: &str,
) {
    let (got, outcome) = match ex {
        Some(ex) => (
            ex.reply.who.as_str(),
            format!(
                "answered by the {} (it saw {})",
                ex.reply.who, ex.reply.peer
            ),
        ),
        None => ("nobody", "no answer".to_owned()),
    };
    let ok = got == expect;
    let why = if ok {
        String::new()
    } else {
        format!("  (expected the {expect})")
    };
    println!(
        "  {} {who:<9} TCP to {dst:<18} {outcome}{why}",
        mark(style, ok)
    );
    checks.expect(ok, &format!("{who}: TCP to {dst}: {outcome}{why}"));
}

fn mark(style: &Style, ok: bool) -> String {
    if ok {
        style.green("ok ")
    } else {
        style.red("BAD")
    }
}

/// Probes TCP, UDP and ICMP from `ns` to the host and records whether each matched `expect`.
fn probe_all(
    style: &Style,
    checks: &mut Checks,
    ns: &Netns,
    who: &str,
    echo: SocketAddr,
    expect: bool,
) -> Result<()> {
    let tcp = tcp_echo_roundtrip(ns.name(), echo, b"hello over tcp", PROBE_TIMEOUT)?;
    report(
        style,
        checks,
        who,
        &format!("TCP echo to {echo}"),
        tcp,
        expect,
    );
    let udp = udp_echo_roundtrip(ns.name(), echo, b"hello over udp", PROBE_TIMEOUT)?;
    report(
        style,
        checks,
        who,
        &format!("UDP echo to {echo}"),
        udp,
        expect,
    );
    let answered = ping(ns, echo.ip(), 3, PROBE_TIMEOUT)?;
    report(
        style,
        checks,
        who,
        &format!("ping {} ({answered}/3 answered)", echo.ip()),
        answered > 0,
        expect,
    );
    Ok(())
}

fn report(style: &Style, checks: &mut Checks, who: &str, what: &str, got: bool, expect: bool) {
    let outcome = if got {
        "reaches the host"
    } else {
        "gets no answer"
    };
    let ok = got == expect;
    let mark = mark(style, ok);
    let why = if ok {
        String::new()
    } else {
        format!(
            "  (expected it to {})",
            if expect {
                "reach the host"
            } else {
                "be dropped"
            }
        )
    };
    println!("  {mark} {who:<9} {what:<32} {outcome}{why}");
    checks.expect(ok, &format!("{who}: {what}: {outcome}{why}"));
}

/// The attacker's `drop` packet counter from `top --once --json`.
fn attacker_drops(agent: &Agent) -> Result<u64> {
    let top = agent.top()?;
    let attacker = ATTACKER_V4.to_string();
    let drops = top["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["addr"].as_str() == Some(attacker.as_str()))
        .and_then(|s| s["packets"]["drop"].as_u64())
        .unwrap_or(0);
    Ok(drops)
}

fn netns_list() -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

fn heading(style: &Style, n: usize, title: &str) {
    println!();
    println!("{}", style.bold(&format!("[{n}/{STEPS}] {title}")));
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

/// Expectations met and missed.
#[derive(Default)]
struct Checks {
    total: usize,
    failed: Vec<String>,
}

impl Checks {
    fn expect(&mut self, ok: bool, what: &str) {
        self.total += 1;
        if !ok {
            self.failed.push(what.to_owned());
        }
    }
}

/// ANSI styling when stdout is a terminal, plain text otherwise (CI logs, pipes).
struct Style {
    ansi: bool,
}

impl Style {
    fn detect() -> Self {
        Self {
            ansi: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.ansi {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }

    fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }

    fn red(&self, s: &str) -> String {
        self.paint("31", s)
    }
}
