//! `mirage-server`: see the library documentation. `main` only parses flags, starts the
//! runtime and prints.

use std::{
    io::{BufWriter, IsTerminal, Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use server::{RuleSet, Scanner, config::ServerConfig, daemon, timestamp::Timestamps};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Attack detection over service logs.
#[derive(Debug, Parser)]
#[command(name = "mirage-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: syslog listeners, detection, verdicts to the manager.
    Run {
        /// Configuration file (reference: docs/server-config.md).
        #[arg(
            long,
            short,
            value_name = "FILE",
            default_value = "/etc/mirage/server.toml"
        )]
        config: PathBuf,
        /// Check the configuration and rule packs, then exit.
        #[arg(long)]
        check: bool,
    },
    /// Replay log files through the rule packs and print JSON lines (like fail2ban-regex).
    Scan {
        /// Also load every *.toml rule pack in DIR (repeatable); ids must stay unique.
        #[arg(long, value_name = "DIR")]
        rules: Vec<PathBuf>,
        /// Do not load the built-in packs (only those given with --rules).
        #[arg(long)]
        no_builtin: bool,
        /// Only this service's rules (sshd, vsftpd, rsync, mysql, redis, mongodb, web, ...);
        /// without it every rule is tried on every line.
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// Print one JSON line per matching log line instead of one per flagged source.
        #[arg(long)]
        matches: bool,
        /// Year assumed for RFC 3164 syslog timestamps, which carry none (default: this year).
        #[arg(long, value_name = "YEAR")]
        year: Option<i64>,
        /// Log files to replay; `-` reads standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::registry()
        .with(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("server=info,mirage_server=info")),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    match Cli::parse().command {
        Command::Run { config, check } => run(&config, check),
        Command::Scan {
            rules,
            no_builtin,
            service,
            matches,
            year,
            files,
        } => scan(rules, no_builtin, service, matches, year, files),
    }
}

fn run(path: &Path, check: bool) -> anyhow::Result<()> {
    let config = ServerConfig::load(path)
        .with_context(|| format!("invalid configuration {}", path.display()))?;
    if check {
        let mut rules = if config.rules.builtin {
            RuleSet::builtin().context("built-in rule packs are invalid")?
        } else {
            RuleSet::default()
        };
        for dir in &config.rules.dirs {
            rules
                .add_dir(dir)
                .with_context(|| format!("loading rule packs from {}", dir.display()))?;
        }
        tracing::info!(
            rules = rules.rules().len(),
            "Configuration and rule packs are valid."
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        if let Some(addr) = config.metrics.listen {
            serve_metrics(addr).await?;
        }
        let running = daemon::start(&config)
            .await
            .context("starting mirage-server")?;
        tracing::info!("mirage-server running.");
        shutdown_signal().await;
        running.shutdown().await;
        tracing::info!("mirage-server stopped.");
        Ok(())
    })
}

/// Serves `GET /metrics` (Prometheus text) on `addr`.
async fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr}"))?;
    tracing::info!(%addr, "Serving metrics.");
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "Metrics listener failed.");
        }
    });
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down."),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down."),
            }
        }
        Err(err) => {
            tracing::warn!(%err, "Cannot watch SIGTERM; stopping on SIGINT only.");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn scan(
    rules: Vec<PathBuf>,
    no_builtin: bool,
    service: Option<String>,
    matches: bool,
    year: Option<i64>,
    files: Vec<PathBuf>,
) -> anyhow::Result<()> {
    let mut set = if no_builtin {
        RuleSet::default()
    } else {
        RuleSet::builtin().context("built-in rule packs are invalid")?
    };
    for dir in &rules {
        set.add_dir(dir)
            .with_context(|| format!("loading rule packs from {}", dir.display()))?;
    }
    if let Some(name) = &service {
        set = set.only_service(name);
    }
    if set.is_empty() {
        bail!("no rules loaded; check --service and --rules (try without --service)");
    }

    let timestamps = match year {
        Some(y) => Timestamps::with_year(y),
        None => Timestamps::new(),
    }
    .context("compiling timestamp formats")?;
    let mut scanner = Scanner::with_timestamps(&set, timestamps);
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for file in &files {
        let contents = if file.as_os_str() == "-" {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading standard input")?;
            buf
        } else {
            std::fs::read(file).with_context(|| format!("reading {}", file.display()))?
        };
        let found = scanner.feed(&file.display().to_string(), &contents);
        if matches {
            for m in found {
                serde_json::to_writer(&mut out, &m)?;
                writeln!(out)?;
            }
        }
    }
    if !matches {
        for f in scanner.flagged() {
            serde_json::to_writer(&mut out, &f)?;
            writeln!(out)?;
        }
    }
    out.flush()?;
    let s = scanner.stats();
    tracing::info!(
        lines = s.lines,
        matched = s.matched,
        unparseable = s.unparseable,
        oversized = s.oversized,
        unresolved = s.unresolved,
        "Scan finished."
    );
    Ok(())
}
