//! `mirage-manager` entry point: logging set-up and dispatch. Everything else is in the library.
use std::io::IsTerminal as _;

use clap::Parser as _;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| "manager=info".into()))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    manager::cli::run(manager::cli::Cli::parse())
}
