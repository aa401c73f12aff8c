//! The `mirage-agent` command line and what each command does.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::{Action, AttackerEntry, Mode, PIN_ROOT};
use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    addr::Net,
    clock,
    config::{AgentConfig, ModeName, XdpModeName},
    loader,
    maps::{Maps, SourceStats},
};

/// mirage-agent: the XDP enforcement point of Mirage.
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
    /// Send to the sandbox (needs the redirect data path).
    Redirect,
    /// Connect back to the sender (needs the reflect data path).
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
    /// Load the program, attach it to IFACE, pin it, and run until stopped. The program stays
    /// attached after the agent exits; a new `run` takes the pinned link over without a gap.
    Run {
        /// Interface to protect.
        #[arg(long)]
        iface: String,
        /// Data-path mode (overrides the configuration file).
        #[arg(long, value_enum)]
        mode: Option<ModeName>,
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// XDP attach mode (overrides the configuration file).
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpModeName>,
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
    /// Show the mode, allowlist and attacker entries.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
    /// Remove the program from every interface and delete the pinned state.
    Detach,
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
        } => run_agent(&root, &iface, mode, config.as_deref(), xdp_mode),
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
        Command::List { json } => list(&root, json),
        Command::Top { once, json, limit } => top(&root, once, json, limit),
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

/// Refuses modes and actions whose data path this build does not have yet, so that an operator
/// never believes attackers are handled when the kernel would pass them.
fn require_implemented(action: Action) -> Result<()> {
    if matches!(action, Action::Redirect | Action::Reflect) {
        bail!(
            "action `{}` needs the redirect/reflect data path, which this build does not have yet; use `drop`",
            action.name()
        );
    }
    Ok(())
}

fn run_agent(
    root: &Path,
    iface: &str,
    mode: Option<ModeName>,
    config: Option<&Path>,
    xdp_mode: Option<XdpModeName>,
) -> Result<()> {
    let cfg = match config {
        Some(p) => AgentConfig::load(p).with_context(|| format!("loading {}", p.display()))?,
        None => AgentConfig::default(),
    };
    let mode: Mode = mode.unwrap_or(cfg.mode).into();
    require_implemented(mode.attacker_action())
        .with_context(|| format!("mode `{}`", mode.name()))?;
    let allow = cfg.allowlist_nets()?;
    let xdp_mode = xdp_mode.unwrap_or(cfg.xdp_mode);

    loader::ensure_bpffs(root)?;
    let dir = loader::pin_dir(root);
    let mut ebpf = loader::load(&dir)?;
    // Fill the maps before the program is attached or swapped in: a new program must never run
    // against a configuration that is not there yet.
    let mut maps = loader::take_maps(&mut ebpf)?;
    for net in &allow {
        maps.allow(*net)?;
    }
    maps.set_mode(mode)?;
    let prog = loader::xdp_program(&mut ebpf, loader::XDP_PROGRAM)?;
    let attached = loader::attach(prog, root, iface, xdp_mode)?;
    info!(
        iface,
        mode = mode.name(),
        ?attached,
        allowlisted = allow.len(),
        "Mirage agent running."
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(async move {
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
                _ = sweep.tick() => match maps.sweep_expired() {
                    Ok(0) => {}
                    Ok(n) => info!(removed = n, "Swept expired attacker entries."),
                    Err(err) => warn!(error = %err, "Sweeping expired entries failed."),
                },
            }
        }
        anyhow::Ok(())
    })?;
    // The pinned link keeps enforcing; only `detach` removes it.
    info!(
        iface,
        "Agent stopping; the XDP program stays attached (pinned). Use `mirage-agent detach` to remove it."
    );
    Ok(())
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
    require_implemented(action)?;
    let expires_ns = match ttl {
        None => 0,
        Some(d) if d.is_zero() => bail!("--ttl must be positive"),
        Some(d) => {
            clock::boottime_ns().saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        }
    };
    let mut maps = open(root)?;
    let mode = Mode::try_from(maps.config()?.mode).unwrap_or(Mode::Firewall);
    require_implemented(match action {
        Action::Default => mode.attacker_action(),
        a => a,
    })
    .with_context(|| format!("the agent runs in mode `{}`", mode.name()))?;
    if maps.is_allowlisted(net.addr())? {
        warn!(%net, "The address is allowlisted; the entry is stored but the allowlist wins.");
    }
    maps.block(net, AttackerEntry::new(action, expires_ns))?;
    info!(%net, action = action.name(), ?ttl, "Blocked.");
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
struct Listing {
    mode: &'static str,
    enabled: bool,
    allowlist: Vec<String>,
    attackers: Vec<ListedAttacker>,
}

fn list(root: &Path, json: bool) -> Result<()> {
    let maps = open(root)?;
    let cfg = maps.config()?;
    let now = clock::boottime_ns();
    let listing = Listing {
        mode: Mode::try_from(cfg.mode)
            .map(Mode::name)
            .unwrap_or("unknown"),
        enabled: cfg.flags & agent_common::DataPathConfig::ENABLED != 0,
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
    };
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &listing)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "mode: {} ({})",
        listing.mode,
        if listing.enabled {
            "enforcing"
        } else {
            "not configured"
        }
    )?;
    writeln!(out, "allowlist ({}):", listing.allowlist.len())?;
    for a in &listing.allowlist {
        writeln!(out, "  {a}")?;
    }
    writeln!(out, "attackers ({}):", listing.attackers.len())?;
    for a in &listing.attackers {
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
struct TopDoc {
    global: std::collections::BTreeMap<&'static str, u64>,
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
