//! The command line: `serve` and `create-admin`.

use std::{
    io::{self, BufRead as _, Write as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use tracing::{info, warn};

use crate::{AppState, ManagerConfig, admin, alerts, app, db, evidence, policy};

/// How often expired attackers are removed (agents also expire them in the kernel on time).
const EXPIRY_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// mirage-manager: the Mirage control plane.
#[derive(Debug, Parser)]
#[command(name = "mirage-manager", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serves the API until SIGINT or SIGTERM (then stops the embedded cluster, if any).
    Serve {
        /// Configuration file (TOML); without it, the defaults.
        #[arg(long, short, env = "MIRAGE_MANAGER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Creates an admin user. The password is read from standard input with `--password-stdin`;
    /// otherwise a random one is generated and printed once.
    CreateAdmin {
        /// Configuration file (TOML), the same as `serve`'s.
        #[arg(long, short, env = "MIRAGE_MANAGER_CONFIG")]
        config: Option<PathBuf>,
        /// Login name.
        #[arg(long)]
        username: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// If the user exists, make it an enabled admin with the new password.
        #[arg(long)]
        reset: bool,
    },
}

/// Runs a command.
pub fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve { config } => runtime.block_on(serve(load(config.as_deref())?)),
        Command::CreateAdmin {
            config,
            username,
            password_stdin,
            reset,
        } => {
            let password = if password_stdin {
                Some(read_password_line()?)
            } else {
                None
            };
            runtime.block_on(create_admin(
                load(config.as_deref())?,
                &username,
                password,
                reset,
            ))
        }
    }
}

fn load(path: Option<&std::path::Path>) -> Result<ManagerConfig> {
    match path {
        Some(path) => ManagerConfig::load(path)
            .with_context(|| format!("loading the configuration from {}", path.display())),
        None => Ok(ManagerConfig::default()),
    }
}

fn read_password_line() -> Result<String> {
    let mut line = String::new();
    io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        bail!("no password on standard input (drop --password-stdin to generate one)");
    }
    Ok(password)
}

/// Serves until SIGINT/SIGTERM.
pub async fn serve(config: ManagerConfig) -> Result<()> {
    let database = db::Database::open(&config)
        .await
        .context("opening the database")?;
    let result = serve_with(&config, &database).await;
    database.close().await;
    result
}

async fn serve_with(config: &ManagerConfig, database: &db::Database) -> Result<()> {
    let pool = database.pool.clone();
    if let Some((user, password)) = admin::bootstrap_admin(&pool)
        .await
        .context("creating the first admin")?
    {
        print_once(&format!(
            "\nmirage-manager: first start, created user `{}` (admin) with password:\n\n    {password}\n\n\
             It is shown only this once and stored only as an argon2id hash. Log in and change it, \
             or set one with `mirage-manager create-admin --username {} --reset --password-stdin`.\n",
            user.username, user.username
        ));
    }
    let tls = match &config.tls {
        Some(tls) => Some(crate::tls::load(tls).context("loading the [tls] certificate and key")?),
        None => None,
    };
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("listening on {}", config.listen))?;
    info!(listen = %config.listen, tls = tls.is_some(), "Serving.");
    let sweeper = tokio::spawn(sweep(pool.clone()));
    let expiry = tokio::spawn(policy::expiry::run(pool.clone(), EXPIRY_SWEEP));
    let retention = tokio::spawn(evidence::retention::run(
        pool.clone(),
        evidence::retention::INTERVAL,
    ));
    let alerts = tokio::spawn(alerts::dispatch::run(
        pool.clone(),
        alerts::dispatch::DispatchOptions::default(),
    ));
    let state = AppState::new(pool, config.clone());
    let bus = state.bus.clone();
    let served = crate::tls::serve(listener, tls, app(state), async move {
        shutdown_signal().await;
        bus.close();
    })
    .await
    .context("serving HTTP");
    sweeper.abort();
    expiry.abort();
    alerts.abort();
    retention.abort();
    info!("Stopped serving.");
    served
}

/// Prints to stderr, outside the log format, so the one-time password is easy to spot.
fn print_once(text: &str) {
    let mut stderr = io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes());
    let _ = stderr.flush();
}

/// Deletes expired sessions and unused enrollment tokens a day past their expiry every minute.
/// (Old login attempts go with the retention sweep, which keeps them `login_attempts_days`.)
async fn sweep(pool: sqlx::PgPool) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if let Err(err) = db::sessions::delete_expired(&pool).await {
            warn!(error = %err, "Sweeping expired sessions failed.");
        }
        if let Err(err) = db::agents::delete_stale_enrollment_tokens(&pool).await {
            warn!(error = %err, "Sweeping stale enrollment tokens failed.");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            warn!(error = %err, "Cannot watch SIGTERM; stopping on SIGINT only.");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received, shutting down."),
        _ = term.recv() => info!("SIGTERM received, shutting down."),
    }
}

/// `create-admin`: opens the database (attaching to a running manager's embedded cluster if
/// there is one) and creates or resets the admin.
pub async fn create_admin(
    config: ManagerConfig,
    username: &str,
    password: Option<String>,
    reset: bool,
) -> Result<()> {
    let database = db::Database::open(&config)
        .await
        .context("opening the database")?;
    let created = admin::create_admin(&database.pool, username, password, reset).await;
    database.close().await;
    let created = created.context("creating the admin")?;
    let mut out = io::stdout().lock();
    match created.generated_password {
        Some(password) => writeln!(
            out,
            "admin `{}` ready; password (shown once): {password}",
            created.user.username
        ),
        None => writeln!(out, "admin `{}` ready", created.user.username),
    }
    .context("writing to standard output")?;
    Ok(())
}
