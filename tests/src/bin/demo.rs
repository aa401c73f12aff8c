//! The Mirage demo (`cargo xtask demo`, as root), in two acts.
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

use anyhow::{Context as _, Result};
use tests::{
    lab::{ATTACKER_V4, Agent, HOST_IFACE, HOST_V4, LEGIT_V4, Lab, ping},
    manager::ManagerProcess,
    netns::Netns,
    probe::{EchoServer, tcp_echo_roundtrip, udp_echo_roundtrip},
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

/// Act 3: the control plane. A real `mirage-manager` with its own embedded PostgreSQL; a verdict
/// as `mirage-server` reports it; the agent's policy stream receives the change; the entry is
/// applied to the lab's agent and the attacker is dropped.
fn control_plane_act(style: &Style, checks: &mut Checks) -> Result<Vec<String>> {
    println!();
    println!(
        "{}",
        style.bold("Mirage demo, act 3: the control plane (mirage-manager)")
    );
    println!(
        "mirage-server reports verdicts to mirage-manager, which keeps attackers, evidence and\n\
         policy in PostgreSQL and pushes every change to the agents over one authenticated\n\
         stream each. Here the manager runs for real, with the embedded PostgreSQL cluster it\n\
         starts itself; the verdict is posted the way mirage-server posts it."
    );
    heading(
        style,
        12,
        "Starting mirage-manager (embedded PostgreSQL, loopback only)",
    );
    let lab = Lab::new().context("building the lab")?;
    let echo_addr = SocketAddr::new(IpAddr::V4(HOST_V4), ECHO_PORT);
    let echo = EchoServer::start(lab.host.name(), echo_addr).context("starting the echo server")?;
    let agent = Agent::start(&lab.host, &["--mode", "firewall"]).context("starting the agent")?;
    let manager = ManagerProcess::start().context("starting mirage-manager")?;
    println!(
        "  $ mirage-manager serve --config {}/manager.toml",
        manager.dir().display()
    );
    println!(
        "  Listening on {} (PID {}); cluster in {}/data/postgres; first-start admin password\n  \
         printed once (only its argon2id hash is stored).",
        manager.base_url(),
        manager.pid(),
        manager.dir().display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    let outcome = runtime.block_on(control_plane_steps(
        style, checks, &manager, &agent, &lab, echo_addr,
    ));
    let dir = manager.dir().to_owned();
    let names: Vec<String> = [&lab.host, &lab.legit, &lab.attacker, &lab.lan]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    drop(manager);
    drop(echo);
    drop(agent);
    drop(lab);
    outcome?;
    checks.expect(
        !dir.exists(),
        &format!("the manager's data directory {} is removed", dir.display()),
    );
    let remaining = netns_list()?;
    checks.expect(
        names.iter().all(|n| !remaining.contains(n)),
        "no lab namespace of act 3 is left",
    );
    Ok(vec![
        "stopped mirage-manager (SIGTERM: it stopped its PostgreSQL cluster), removed its data directory".to_owned(),
        format!("deleted the namespaces {}", names.join(", ")),
    ])
}

async fn control_plane_steps(
    style: &Style,
    checks: &mut Checks,
    manager: &ManagerProcess,
    agent: &Agent,
    lab: &Lab,
    echo_addr: SocketAddr,
) -> Result<()> {
    use futures_util::StreamExt as _;
    let base = manager.base_url();
    let http = reqwest::Client::new();
    heading(
        style,
        13,
        "An operator logs in; a server credential and an agent enrollment",
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
    let enrolled: serde_json::Value = http
        .post(format!("{base}/api/v1/agent/enroll"))
        .json(&serde_json::json!({
            "token": token["token"], "hostname": "demo-host",
            "addresses": [HOST_V4.to_string()], "version": env!("CARGO_PKG_VERSION"),
        }))
        .send()
        .await?
        .json()
        .await?;
    let agent_credential = enrolled["credential"]
        .as_str()
        .context("no agent credential")?
        .to_owned();
    println!(
        "  POST /api/v1/enrollment-tokens, then /api/v1/agent/enroll: the agent's own credential"
    );

    heading(style, 14, "The agent opens its policy stream");
    let resp = http
        .get(format!("{base}/api/v1/agent/stream"))
        .bearer_auth(&agent_credential)
        .send()
        .await?;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut next_event = async move || -> Result<(String, serde_json::Value)> {
        loop {
            if let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut event = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if !event.is_empty() {
                    return Ok((event, serde_json::from_str(&data)?));
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
                .await
                .context("no event within 10 s")?
                .context("the stream ended")??;
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    let (kind, snapshot) = next_event().await?;
    println!(
        "  GET /api/v1/agent/stream: `{kind}` at revision {}, {} attacker entries, mode {}",
        snapshot["revision"],
        snapshot["attackers"].as_array().map_or(0, Vec::len),
        snapshot["policy"]["mode"]
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
    let sent = std::time::Instant::now();
    let post_verdicts = || {
        http.post(format!("{base}/api/v1/verdicts"))
            .bearer_auth(&server_credential)
            .json(&verdicts)
            .send()
    };
    let answer: serde_json::Value = post_verdicts().await?.json().await?;
    println!("  POST /api/v1/verdicts (service credential): {answer}");
    let (kind, delta) = next_event().await?;
    let took = sent.elapsed();
    println!(
        "  The agent's stream got `{kind}` revision {}: {} {} {} after {:.1} ms",
        delta["revision"],
        delta["op"],
        delta["net"],
        delta["action"],
        took.as_secs_f64() * 1000.0
    );
    checks.expect(
        kind == "delta" && delta["net"] == format!("{ATTACKER_V4}/32"),
        "the verdict reaches the agent's stream as a delta for the attacker",
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
        "Applied to the kernel map; the attacker is dropped, the legitimate client is not",
    );
    println!(
        "  (Until the agent's own policy sync lands, the demo applies the delta with the CLI.)"
    );
    let net = delta["net"].as_str().context("delta without net")?;
    println!("  $ mirage-agent block {net}");
    agent.cli(&["block", net]).context("mirage-agent block")?;
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
