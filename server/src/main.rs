//! `mirage-server`: see the library documentation. `main` only parses flags and prints.

use std::{
    io::{BufWriter, IsTerminal, Read, Write},
    path::PathBuf,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use server::{RuleSet, Scanner, timestamp::Timestamps};
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
    let Command::Scan {
        rules,
        no_builtin,
        service,
        matches,
        year,
        files,
    } = Cli::parse().command;

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
