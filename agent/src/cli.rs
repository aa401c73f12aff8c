//! The `mirage-agent` command line and what each command does.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::{
    Action, AttackerEntry, DataPathConfig, Mode, PIN_ROOT, RedirectModel, Target, TargetKey, family,
};
use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, RingBuf};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

use crate::{
    addr::Net,
    clock,
    config::{
        AgentConfig, ModeName, TargetAddr, XdpModeName, addr_from_bytes, family_name, model_name,
        proto_name,
    },
    flow::{FlowLog, FlowRecord, ListedFlow, report::FlowReporter},
    loader::{self, LoaderError},
    maps::{Maps, SourceStats},
    telemetry,
};

/// mirage-agent: the XDP/TC enforcement point of Mirage.
#[derive(Debug, Parser)]
#[command(name = "mirage-agent", version, about)]
pub struct Cli {
    /// bpffs directory for the pinned program and maps (a layout-version directory is added).
    #[arg(long, global = true, env = "MIRAGE_BPFFS_ROOT", default_value = PIN_ROOT)]
    pub bpffs_root: PathBuf,
    /// Enter this network namespace (a name under /run/netns) before doing anything. Unlike
    /// `ip netns exec`, this keeps the host's mount namespace, so pins land on the real bpffs
    /// and outlive the process.
    #[arg(long, global = true, env = "MIRAGE_NETNS")]
    pub netns: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Actions an operator may give an attacker entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ActionName {
    /// The mode's default action for attackers.
    Default,
    /// Drop.
    Drop,
    /// Let through (an exception inside a blocked range).
    Pass,
    /// Send to the sandbox.
    Redirect,
    /// Connect back to the sender (rate-capped by `reflect_pps`).
    Reflect,
}

impl From<ActionName> for Action {
    fn from(a: ActionName) -> Action {
        match a {
            ActionName::Default => Action::Default,
            ActionName::Drop => Action::Drop,
            ActionName::Pass => Action::Pass,
            ActionName::Redirect => Action::Redirect,
            ActionName::Reflect => Action::Reflect,
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the programs, attach them to every IFACE, pin them, and run until stopped. The
    /// programs stay attached after the agent exits; a new `run` takes the pinned links over
    /// without a gap.
    Run {
        /// Interface to manage; repeat it for several (`--iface eth0 --iface eth1`): the one
        /// attackers come in on and, when the sandbox sits behind another one, that one too.
        #[arg(long = "iface", value_name = "IFACE", required = true)]
        iface: Vec<String>,
        /// Data-path mode (overrides the configuration file).
        #[arg(long, value_enum)]
        mode: Option<ModeName>,
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// XDP attach mode (overrides the configuration file).
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpModeName>,
        /// Append one JSON object per new rewritten flow (attacker, original destination,
        /// target, NAT address) to FILE, one line each.
        #[arg(long, value_name = "FILE")]
        flow_log: Option<PathBuf>,
    },
    /// Add an attacker address or range.
    Block {
        /// ADDR or ADDR/LEN.
        net: String,
        /// How long the entry lives (e.g. `30m`, `12h`); the kernel ignores it afterwards.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// What to do with the attacker's packets.
        #[arg(long, value_enum, default_value = "default")]
        action: ActionName,
        /// Accept ranges broader than /16 (IPv4) or /32 (IPv6).
        #[arg(long)]
        force: bool,
    },
    /// Remove an attacker address or range.
    Unblock {
        /// ADDR or ADDR/LEN, exactly as blocked.
        net: String,
    },
    /// Add a source range that always passes.
    Allow {
        /// ADDR or ADDR/LEN.
        net: String,
        /// Accept ranges broader than /16 (IPv4) or /32 (IPv6).
        #[arg(long)]
        force: bool,
    },
    /// Remove a range from the allowlist.
    Disallow {
        /// ADDR or ADDR/LEN, exactly as allowed.
        net: String,
    },
    /// Show the mode, redirect settings, sandbox targets, allowlists and attacker entries.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List the rewritten flows (both directions of each) instead.
        #[arg(long)]
        flows: bool,
    },
    /// Per-source counters, most packets first, refreshed every second.
    Top {
        /// Print once and exit.
        #[arg(long)]
        once: bool,
        /// Print JSON (one document per refresh).
        #[arg(long)]
        json: bool,
        /// Rows to show in the table.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Remove the programs from every interface and delete the pinned state.
    Detach,
    /// Enroll with the manager: trade a one-time token for this agent's credential.
    Enroll(crate::sync::enroll::EnrollArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let root = cli.bpffs_root;
    if let Some(name) = &cli.netns {
        enter_netns(name)?;
    }
    match cli.command {
        Command::Run {
            iface,
            mode,
            config,
            xdp_mode,
            flow_log,
        } => run_agent(
            &root,
            &iface,
            mode,
            config.as_deref(),
            xdp_mode,
            flow_log.as_deref(),
        ),
        Command::Block {
            net,
            ttl,
            action,
            force,
        } => block(&root, &net, ttl, action, force),
        Command::Unblock { net } => {
            let net = parse_net(&net)?;
            open(&root)?.unblock(net)?;
            info!(%net, "Unblocked.");
            Ok(())
        }
        Command::Allow { net, force } => {
            let net = parse_net(&net)?.check_breadth(force)?;
            open(&root)?.allow(net)?;
            info!(%net, "Allowlisted.");
            Ok(())
        }
        Command::Disallow { net } => {
            let net = parse_net(&net)?;
            open(&root)?.disallow(net)?;
            info!(%net, "Removed from the allowlist.");
            Ok(())
        }
        Command::List { json, flows: true } => list_flows(&root, json),
        Command::List { json, flows: false } => list(&root, json),
        Command::Top { once, json, limit } => top(&root, once, json, limit),
        Command::Enroll(args) => crate::sync::enroll::run(&args),
        Command::Detach => {
            let ifaces = loader::detach(&root).context("detaching")?;
            if ifaces.is_empty() {
                info!("Nothing was attached; pinned state removed if any.");
            }
            Ok(())
        }
    }
}

/// Moves this (still single-threaded) process into the named network namespace.
fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("invalid network namespace name `{name}`");
    }
    let path = Path::new("/run/netns").join(name);
    let file = std::fs::File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    // SAFETY: a valid namespace fd; setns only changes this thread's namespace, and the process
    // has no other threads yet (the runtime is built later).
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("entering network namespace {name}"));
    }
    Ok(())
}

fn parse_net(s: &str) -> Result<Net> {
    s.parse::<Net>()
        .with_context(|| format!("invalid address or range `{s}`"))
}

fn open(root: &Path) -> Result<Maps> {
    Maps::open_pinned(&loader::pin_dir(root)).context("opening the pinned maps")
}

/// Refuses interface lists the kernel would refuse later, after maps were already written.
fn check_ifaces(ifaces: &[String]) -> Result<()> {
    for (i, name) in ifaces.iter().enumerate() {
        // IFNAMSIZ is 16 with the NUL; `/` and NUL cannot be in a name; `all` and `default`
        // would alias the sysctl directories the forwarding check reads.
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', '\0'])
            || name == "all"
            || name == "default"
            || name == "."
            || name == ".."
        {
            bail!("invalid interface name `{name}`");
        }
        if ifaces[..i].contains(name) {
            bail!("interface `{name}` is given twice with --iface");
        }
    }
    Ok(())
}

/// Forwarding sysctls that are off, for the given families, as `(sysctl, /proc path)`. A
/// rewritten packet leaves through the FIB (`bpf_fib_lookup`, which reports
/// `BPF_FIB_LKUP_RET_FWD_DISABLED` when forwarding is off on the ingress device) or through the
/// kernel's forwarding path: both need forwarding on, globally and on each ingress interface.
fn forwarding_off(v4: bool, v6: bool, ifaces: &[String]) -> Result<Vec<String>> {
    let mut off = Vec::new();
    for (needed, fam) in [(v4, "ipv4"), (v6, "ipv6")] {
        if !needed {
            continue;
        }
        for scope in std::iter::once("all").chain(ifaces.iter().map(String::as_str)) {
            let path = format!("/proc/sys/net/{fam}/conf/{scope}/forwarding");
            let value = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading {path} (is {} enabled in this network namespace?)",
                    if fam == "ipv4" { "IPv4" } else { "IPv6" }
                )
            })?;
            if value.trim() == "0" {
                // sysctl(8) writes `.` in interface names as `/` (eth0.100 -> eth0/100).
                off.push(format!(
                    "net.{fam}.conf.{}.forwarding",
                    scope.replace('.', "/")
                ));
            }
        }
    }
    Ok(off)
}

/// Refuses to run a mode that forwards rewritten packets when forwarding is off. The agent never
/// turns forwarding on itself: that decides what the whole host routes, which is the operator's
/// call.
fn check_forwarding(cfg: &AgentConfig, ifaces: &[String]) -> Result<()> {
    let mode = Mode::from(cfg.mode).name();
    let (v4, v6) = cfg.forwarding_needed()?;
    let off = forwarding_off(v4, v6, ifaces)?;
    if let Some(first) = off.first() {
        let fix: Vec<String> = off.iter().map(|s| format!("sysctl -w {s}=1")).collect();
        bail!(
            "{first} is 0 in the agent's network namespace, and mode `{mode}` forwards rewritten \
             packets; enable forwarding there first (`{}`); the agent does not change it itself",
            fix.join("; ")
        );
    }
    if cfg.mode == ModeName::Firewall {
        // Per-attacker `redirect` entries can still use the targets.
        let targets = cfg.targets()?;
        let has = |f| targets.iter().any(|(k, _)| k.family == f);
        for s in forwarding_off(has(family::V4), has(family::V6), ifaces)? {
            warn!(
                sysctl = %s,
                "Forwarding is off: attackers blocked with `--action redirect` will not reach the sandbox."
            );
        }
    }
    Ok(())
}

fn run_agent(
    root: &Path,
    ifaces: &[String],
    mode: Option<ModeName>,
    config: Option<&Path>,
    xdp_mode: Option<XdpModeName>,
    flow_log: Option<&Path>,
) -> Result<()> {
    let what = match config {
        Some(p) => format!("loading {}", p.display()),
        None => "checking the built-in configuration (no --config)".to_owned(),
    };
    let cfg = AgentConfig::load(config, mode).context(what)?;
    let mode: Mode = cfg.mode.into();
    let data_path = cfg.data_path()?;
    let targets: Vec<(TargetKey, Target)> = cfg
        .targets()?
        .into_iter()
        .map(|(k, t)| (k, t.into()))
        .collect();
    let allow_ports = cfg.allow_port_keys()?;
    let allow = cfg.allowlist_nets()?;
    let xdp_mode = xdp_mode.unwrap_or(cfg.xdp_mode);
    check_ifaces(ifaces)?;
    check_forwarding(&cfg, ifaces)?;
    if mode == Mode::Reflect && cfg.reflect_pps == 0 {
        warn!("reflect_pps is 0: reflection is disabled and attackers' packets pass.");
    }
    let mut flow_log = flow_log
        .map(FlowLog::open)
        .transpose()
        .context("opening --flow-log")?;

    loader::ensure_bpffs(root)?;
    let dir = loader::pin_dir(root);
    let mut ebpf = loader::load(&dir)?;
    // Verify every program before touching the maps: a pinned program from the previous run
    // may still be enforcing, and must not see a new configuration that this run cannot
    // complete.
    loader::xdp_program(&mut ebpf, loader::XDP_PROGRAM)?;
    // The TC rewriter is attached in every mode, firewall included: a restart into firewall
    // mode must not cut flows that were redirected before it, and per-attacker `redirect` or
    // `reflect` entries work in any mode. Only firewall mode can do without it.
    let has_tc = match loader::tc_program(&mut ebpf, loader::TC_PROGRAM) {
        Ok(_) => true,
        Err(err @ LoaderError::MissingProgram { .. }) if mode == Mode::Firewall => {
            warn!(
                error = %err,
                "No TC rewriter in this build: firewall mode works, but per-attacker redirect and reflect entries will pass."
            );
            false
        }
        Err(err @ LoaderError::MissingProgram { .. }) => {
            return Err(err).with_context(|| {
                format!(
                    "mode `{}` rewrites packets, which needs the TC program `{}`; this build of \
                     agent-ebpf does not have it (use --mode firewall)",
                    mode.name(),
                    loader::TC_PROGRAM
                )
            });
        }
        Err(err) => return Err(err.into()),
    };
    let events = loader::take_flow_events(&mut ebpf)?;
    // Fill the maps before the programs are attached or swapped in: a new program must never
    // run against a configuration that is not there yet. Targets and ports are replaced by the
    // file's; allowlist and attacker entries added at run time are kept. The CONFIG entry goes
    // last, so the mode switches only once its targets are in place.
    let mut maps = loader::take_maps(&mut ebpf)?;
    for net in &allow {
        maps.allow(*net)?;
    }
    // With a manager, the policy it last gave (saved in state_dir) replaces the file's
    // fallback from the first instant, so a restart never switches the mode back for the
    // moment before the sync restores the rest.
    match crate::sync::persisted_data_plane(&cfg) {
        Some(plane) => {
            info!(
                mode = plane.mode().name(),
                "Restoring the data-path settings of the last applied manager policy."
            );
            maps.replace_targets(&plane.targets)?;
            maps.replace_allow_ports(&plane.allow_ports)?;
            maps.set_config(&plane.config)?;
        }
        None => {
            maps.replace_targets(&targets)?;
            maps.replace_allow_ports(&allow_ports)?;
            maps.set_config(&data_path)?;
        }
    }

    for iface in ifaces {
        // The rewriter first: anything the decision program starts sending its way must find
        // it there.
        let tc = if has_tc {
            let prog = loader::program_mut(&mut ebpf, loader::TC_PROGRAM, "TC")?;
            Some(loader::attach_tc(prog, root, iface)?)
        } else {
            None
        };
        let prog = loader::program_mut(&mut ebpf, loader::XDP_PROGRAM, "XDP")?;
        let xdp = loader::attach(prog, root, iface, xdp_mode)?;
        info!(iface, ?xdp, ?tc, "Interface managed.");
    }
    for (iface, tc) in loader::pinned_links(root) {
        if !ifaces.contains(&iface) {
            warn!(
                iface,
                link = if tc { "TC" } else { "XDP" },
                "A pinned link on an interface not given with --iface keeps running; `mirage-agent detach` removes every link."
            );
        }
    }
    info!(
        ifaces = ?ifaces,
        mode = mode.name(),
        model = model_name(RedirectModel::try_from(data_path.model).unwrap_or_default()),
        targets = targets.len(),
        honeypot_allow_ports = allow_ports.len(),
        allowlisted = allow.len(),
        "Mirage agent running."
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(async move {
        // SAFETY: the ring buffer owns its map's fd (an `OwnedFd` inside `MapData`) for as long
        // as the `AsyncFd` owns the ring buffer, and `as_raw_fd` always returns that same fd.
        let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(io::Error::from)
            .context("registering the flow-event ring buffer with epoll")?;
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        let mut kernel_stats = tokio::time::interval(telemetry::KERNEL_EVERY);
        if let Some(addr) = cfg.metrics {
            telemetry::serve(addr)
                .await
                .context("starting the metrics listener")?;
        }
        // Policy from the manager (`[manager]`), after the metrics recorder is in place: its tasks
        // hold their own handles on the pinned maps and stop when this handle drops.
        let _policy_sync = crate::sync::start(&cfg, &dir).context("starting the policy sync")?;
        // Log collection and shipping (`[server]`, `[[logs]]`, `[[journal]]`, `[redis]`).
        let logs = crate::logs::start(&cfg).await.context(
            "starting log shipping (check [server] ca, cert and key, and that no other agent uses state_dir)",
        )?;
        // New flows go to the server (as `mirage-flow` lines) and to the manager.
        let reporter = FlowReporter::start(&cfg, logs.as_ref().map(crate::logs::Handles::sink))
            .context("starting the flow reporter (check [manager] url and ca)")?;
        // Events written while no agent ran are still in the pinned ring buffer: read them now
        // (after the shipper and reporter started, so they are reported too).
        drain_events(events.get_mut(), flow_log.as_mut(), reporter.as_ref());
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
                guard = events.readable_mut() => {
                    let mut guard = guard.context("polling the flow-event ring buffer")?;
                    drain_events(guard.get_inner_mut(), flow_log.as_mut(), reporter.as_ref());
                    guard.clear_ready();
                }
                _ = kernel_stats.tick(), if cfg.metrics.is_some() => telemetry::record_kernel(&maps),
                _ = sweep.tick() => match maps.sweep_expired() {
                    Ok(0) => {}
                    Ok(n) => info!(removed = n, "Swept expired attacker entries."),
                    Err(err) => warn!(error = %err, "Sweeping expired entries failed."),
                },
            }
        }
        if let Some(reporter) = reporter {
            reporter.shutdown().await;
        }
        if let Some(logs) = logs {
            logs.shutdown().await;
        }
        anyhow::Ok(())
    })?;
    // The pinned links keep enforcing; only `detach` removes them.
    info!(
        ifaces = ?ifaces,
        "Agent stopping; the programs stay attached (pinned). Use `mirage-agent detach` to remove them."
    );
    Ok(())
}

/// Reads every pending flow event: logs it, appends it to the flow log and hands it to the
/// reporter (server and manager).
fn drain_events(
    ring: &mut RingBuf<MapData>,
    mut log: Option<&mut FlowLog>,
    reporter: Option<&FlowReporter>,
) {
    while let Some(item) = ring.next() {
        let rec = match FlowRecord::decode(&item) {
            Ok(r) => r,
            Err(err) => {
                warn!(error = %err, "Skipped a malformed flow event.");
                continue;
            }
        };
        drop(item);
        info!(
            kind = rec.kind,
            model = rec.model,
            proto = rec.proto,
            attacker = %rec.attacker,
            orig_dst = %rec.orig_dst,
            target = %rec.target,
            nat = %rec.nat,
            "New rewritten flow."
        );
        if let Some(log) = log.as_deref_mut()
            && let Err(err) = log.append(&rec)
        {
            warn!(error = %err, "Writing the flow log failed.");
        }
        if let Some(reporter) = reporter {
            reporter.offer(&rec);
        }
    }
}

fn block(
    root: &Path,
    net: &str,
    ttl: Option<Duration>,
    action: ActionName,
    force: bool,
) -> Result<()> {
    let net = parse_net(net)?.check_breadth(force)?.check_source()?;
    let action: Action = action.into();
    let expires_ns = match ttl {
        None => 0,
        Some(d) if d.is_zero() => bail!("--ttl must be positive"),
        Some(d) => {
            clock::boottime_ns().saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        }
    };
    let mut maps = open(root)?;
    warn_if_ineffective(root, &maps, net, action)?;
    if maps.is_allowlisted(net.addr())? {
        warn!(%net, "The address is allowlisted; the entry is stored but the allowlist wins.");
    }
    maps.block(net, AttackerEntry::new(action, expires_ns))?;
    info!(%net, action = action.name(), ?ttl, "Blocked.");
    Ok(())
}

/// Warns when an attacker entry's action cannot take effect with what is in the maps now (the
/// entry is still stored: the configuration may be completed later).
fn warn_if_ineffective(root: &Path, maps: &Maps, net: Net, action: Action) -> Result<()> {
    let cfg = maps.config()?;
    let mode = Mode::try_from(cfg.mode).unwrap_or(Mode::Firewall);
    let effective = match action {
        Action::Default => mode.attacker_action(),
        a => a,
    };
    if !matches!(effective, Action::Redirect | Action::Reflect) {
        return Ok(());
    }
    if !loader::pinned_links(root).iter().any(|(_, tc)| *tc) {
        warn!(%net, action = effective.name(), "No TC rewriter is attached; the kernel passes these packets.");
    }
    if effective == Action::Reflect && cfg.reflect_pps == 0 {
        warn!(%net, "reflect_pps is 0: reflection is disabled, the kernel passes these packets.");
    }
    if effective == Action::Redirect {
        let fam = match net {
            Net::V4(..) => family::V4,
            Net::V6(..) => family::V6,
        };
        if !maps.targets()?.iter().any(|(k, _)| k.family == fam) {
            warn!(
                %net,
                family = family_name(fam),
                "No sandbox target of this family is configured; the kernel passes these packets (counted as no_target)."
            );
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct ListedAttacker {
    net: String,
    action: &'static str,
    /// Seconds until expiry; absent for entries that never expire.
    expires_in_secs: Option<f64>,
    expired: bool,
}

#[derive(Serialize)]
struct ListedTarget {
    /// Protected port; 0 for the default target.
    port: u16,
    proto: &'static str,
    family: &'static str,
    /// Sandbox `ADDR[:PORT]`; without a port the protected port is kept.
    target: String,
}

#[derive(Serialize)]
struct ListedLink {
    iface: String,
    xdp: bool,
    tc: bool,
}

#[derive(Serialize)]
struct Listing {
    mode: &'static str,
    enabled: bool,
    model: &'static str,
    reflect_pps: u32,
    nat_ports: [u16; 2],
    snat_v4: Option<String>,
    snat_v6: Option<String>,
    links: Vec<ListedLink>,
    targets: Vec<ListedTarget>,
    honeypot_allow_ports: Vec<String>,
    allowlist: Vec<String>,
    attackers: Vec<ListedAttacker>,
}

fn listed_links(root: &Path) -> Vec<ListedLink> {
    let mut by_iface: BTreeMap<String, ListedLink> = BTreeMap::new();
    for (iface, tc) in loader::pinned_links(root) {
        let l = by_iface.entry(iface.clone()).or_insert(ListedLink {
            iface,
            xdp: false,
            tc: false,
        });
        if tc {
            l.tc = true;
        } else {
            l.xdp = true;
        }
    }
    by_iface.into_values().collect()
}

fn snat(fam: u8, bytes: [u8; 16]) -> Option<String> {
    (bytes != [0; 16])
        .then(|| addr_from_bytes(fam, bytes))
        .flatten()
        .map(|ip| ip.to_string())
}

fn listing(root: &Path, maps: &Maps) -> Result<Listing> {
    let cfg: DataPathConfig = maps.config()?;
    let now = clock::boottime_ns();
    let mut snat_v4 = [0u8; 16];
    snat_v4[..4].copy_from_slice(&cfg.snat_v4);
    Ok(Listing {
        mode: Mode::try_from(cfg.mode)
            .map(Mode::name)
            .unwrap_or("unknown"),
        enabled: cfg.flags & DataPathConfig::ENABLED != 0,
        model: RedirectModel::try_from(cfg.model)
            .map(model_name)
            .unwrap_or("unknown"),
        reflect_pps: cfg.reflect_pps,
        nat_ports: [cfg.nat_port_min, cfg.nat_port_max],
        snat_v4: snat(family::V4, snat_v4),
        snat_v6: snat(family::V6, cfg.snat_v6),
        links: listed_links(root),
        targets: maps
            .targets()?
            .into_iter()
            .map(|(k, t)| ListedTarget {
                port: k.port,
                proto: proto_name(k.proto).unwrap_or("unknown"),
                family: family_name(k.family),
                target: addr_from_bytes(k.family, t.addr)
                    .map(|addr| TargetAddr { addr, port: t.port }.to_string())
                    .unwrap_or_else(|| "invalid".to_owned()),
            })
            .collect(),
        honeypot_allow_ports: maps
            .allow_ports()?
            .into_iter()
            .map(|k| format!("{}/{}", proto_name(k.proto).unwrap_or("unknown"), k.port))
            .collect(),
        allowlist: maps.allowlist()?.iter().map(Net::to_string).collect(),
        attackers: maps
            .attackers()?
            .into_iter()
            .map(|(net, e)| ListedAttacker {
                net: net.to_string(),
                action: Action::try_from(e.action)
                    .map(Action::name)
                    .unwrap_or("unknown"),
                expires_in_secs: (e.expires_ns != 0)
                    .then(|| (e.expires_ns as f64 - now as f64) / 1e9),
                expired: e.expired(now),
            })
            .collect(),
    })
}

fn list(root: &Path, json: bool) -> Result<()> {
    let listing = listing(root, &open(root)?)?;
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &listing)?;
        writeln!(out)?;
        return Ok(());
    }
    render_listing(&mut out, &listing)?;
    Ok(())
}

fn render_listing(out: &mut impl Write, l: &Listing) -> io::Result<()> {
    writeln!(
        out,
        "mode: {} ({})",
        l.mode,
        if l.enabled {
            "enforcing"
        } else {
            "not configured"
        }
    )?;
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".to_owned());
    writeln!(
        out,
        "redirect model: {}  nat ports: {}-{}  snat: {} / {}  reflect cap: {} pps",
        l.model,
        l.nat_ports[0],
        l.nat_ports[1],
        opt(&l.snat_v4),
        opt(&l.snat_v6),
        l.reflect_pps
    )?;
    writeln!(out, "interfaces ({}):", l.links.len())?;
    for link in &l.links {
        let mut progs = Vec::new();
        if link.xdp {
            progs.push("xdp");
        }
        if link.tc {
            progs.push("tc");
        }
        writeln!(out, "  {:<16} {}", link.iface, progs.join("+"))?;
    }
    writeln!(out, "sandbox targets ({}):", l.targets.len())?;
    for t in &l.targets {
        let port = match t.port {
            0 => "*".to_owned(),
            p => p.to_string(),
        };
        writeln!(
            out,
            "  {}/{:<6} {:<5} -> {}{}",
            t.proto,
            port,
            t.family,
            t.target,
            if t.port == 0 { "  (default)" } else { "" }
        )?;
    }
    write!(
        out,
        "honeypot allowed ports ({}):",
        l.honeypot_allow_ports.len()
    )?;
    for p in &l.honeypot_allow_ports {
        write!(out, " {p}")?;
    }
    writeln!(out)?;
    writeln!(out, "allowlist ({}):", l.allowlist.len())?;
    for a in &l.allowlist {
        writeln!(out, "  {a}")?;
    }
    writeln!(out, "attackers ({}):", l.attackers.len())?;
    for a in &l.attackers {
        let expiry = match a.expires_in_secs {
            None => "never".to_owned(),
            Some(_) if a.expired => "expired".to_owned(),
            Some(s) => {
                humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string()
            }
        };
        writeln!(out, "  {:<42} {:<9} expires: {expiry}", a.net, a.action)?;
    }
    Ok(())
}

#[derive(Serialize)]
struct FlowListing {
    flows: Vec<ListedFlow>,
}

fn list_flows(root: &Path, json: bool) -> Result<()> {
    let maps = open(root)?;
    let now = clock::boottime_ns();
    let mut flows = Vec::new();
    for (k, v) in maps.flows()? {
        match ListedFlow::new(&k, &v, now) {
            Ok(f) => flows.push(f),
            Err(err) => warn!(error = %err, "Skipped an unreadable flow entry."),
        }
    }
    let doc = FlowListing { flows };
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "flow entries ({}):", doc.flows.len())?;
    if !doc.flows.is_empty() {
        writeln!(
            out,
            "  {:<17} {:<5} {:<47} {:<47} {:>8}",
            "KIND", "PROTO", "ARRIVES AS (SRC -> DST)", "LEAVES AS (SRC -> DST)", "AGE(s)"
        )?;
    }
    for f in &doc.flows {
        writeln!(
            out,
            "  {:<17} {:<5} {:<47} {:<47} {:>8.1}",
            f.kind,
            f.proto,
            format!("{} -> {}", f.src, f.dst),
            format!("{} -> {}", f.new_src, f.new_dst),
            f.age_secs
        )?;
    }
    Ok(())
}

#[derive(Serialize)]
struct TopDoc {
    global: BTreeMap<&'static str, u64>,
    sources: Vec<SourceStats>,
}

fn top(root: &Path, once: bool, json: bool, limit: usize) -> Result<()> {
    let maps = open(root)?;
    loop {
        let doc = TopDoc {
            global: maps.global()?,
            sources: maps.sources()?,
        };
        let mut out = io::stdout().lock();
        if json {
            serde_json::to_writer(&mut out, &doc)?;
            writeln!(out)?;
        } else {
            if !once {
                // Clear the screen and home the cursor, like top(1).
                write!(out, "\x1b[2J\x1b[H")?;
            }
            render_table(&mut out, &doc, limit)?;
        }
        out.flush()?;
        drop(out);
        if once {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn render_table(out: &mut impl Write, doc: &TopDoc, limit: usize) -> io::Result<()> {
    let g = |k: &str| doc.global.get(k).copied().unwrap_or(0);
    writeln!(
        out,
        "mirage top: pass {} drop {} redirect {} reflect {} | allowlisted {} not-ip {} parse-errors {} l4-errors {} fragments {}",
        g("pass"),
        g("drop"),
        g("redirect"),
        g("reflect"),
        g("allowlisted"),
        g("not_ip"),
        g("parse_error"),
        g("l4_parse_error"),
        g("fragment"),
    )?;
    writeln!(
        out,
        "flows: new {} not-new {} no-target {} nat-exhausted {} reflect-limited {} icmp-rewritten {} fib-fallback {} rewrite-errors {}",
        g("flow_new"),
        g("not_new_flow"),
        g("no_target"),
        g("nat_exhausted"),
        g("reflect_limited"),
        g("icmp_rewritten"),
        g("fib_fallback"),
        g("rewrite_error"),
    )?;
    writeln!(
        out,
        "{:<40} {:>12} {:>14} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "SOURCE", "PACKETS", "BYTES", "PASS", "DROP", "REDIRECT", "REFLECT", "LAST(s)"
    )?;
    for s in doc.sources.iter().take(limit) {
        writeln!(
            out,
            "{:<40} {:>12} {:>14} {:>10} {:>10} {:>10} {:>10} {:>9.1}",
            s.addr.to_string(),
            s.total_packets,
            s.total_bytes,
            s.packets.pass,
            s.packets.drop,
            s.packets.redirect,
            s.packets.reflect,
            s.last_seen_secs_ago,
        )?;
    }
    if doc.sources.len() > limit {
        writeln!(out, "... {} more sources", doc.sources.len() - limit)?;
    }
    Ok(())
}
