//! A real `mirage-manager serve` in a child process: its own data directory (so its own embedded
//! PostgreSQL cluster), listening on a free loopback port, with the one-time admin password it
//! prints at first start. Dropping the guard sends SIGTERM (the manager then stops its cluster)
//! and waits; only if it hangs is it killed, by PID. The data directory is removed afterwards.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{lab::binary, netns::unique_tag};

/// How long the manager may take to start (first start runs `initdb`).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long it may take to stop (it stops its cluster first).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running manager.
pub struct ManagerProcess {
    /// `None` while stopped ([`ManagerProcess::stop`]).
    child: Option<Child>,
    dir: PathBuf,
    addr: SocketAddr,
    password: String,
}

impl ManagerProcess {
    /// Starts `mirage-manager serve` on a free loopback port with a fresh data directory
    /// (`/tmp/mirage-manager-<tag>`, removed on drop) and waits until it answers.
    pub fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("mirage-manager-{}", unique_tag()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // The postgres user must be able to enter it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        let port = free_port()?;
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let config = dir.join("manager.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\ndata_dir = \"{}\"\ncookie_secure = false\n",
                dir.join("data").display()
            ),
        )?;
        let mut me = Self {
            child: None,
            dir,
            addr,
            password: String::new(),
        };
        let stderr = me.spawn()?;
        // Read stderr on a thread: the password comes first; the rest is drained so the pipe
        // never fills.
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut expect_password = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if expect_password && !line.trim().is_empty() {
                    let _ = tx.send(line.trim().to_owned());
                    expect_password = false;
                }
                if line.contains("with password:") {
                    expect_password = true;
                }
            }
        });
        me.password = rx
            .recv_timeout(START_TIMEOUT)
            .context("mirage-manager printed no first-start password")?;
        me.wait_listening()?;
        Ok(me)
    }

    fn spawn(&mut self) -> Result<std::process::ChildStderr> {
        let mut child = Command::new(binary("mirage-manager"))
            .args(["serve", "--config"])
            .arg(self.dir.join("manager.toml"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting mirage-manager (built by `cargo xtask demo`)")?;
        let stderr = child.stderr.take().context("no stderr")?;
        self.child = Some(child);
        Ok(stderr)
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(self.addr).is_err() {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("mirage-manager exited: {status}");
            }
            if Instant::now() > deadline {
                bail!("mirage-manager does not listen on {}", self.addr);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops the manager (SIGTERM: it stops its cluster too) and keeps its data directory, so
    /// that [`ManagerProcess::restart`] brings the same manager back.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Starts the stopped manager again, on the same address with the same data, and waits
    /// until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let stderr = self.spawn()?;
        // Drained so the pipe never fills.
        std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .for_each(drop);
        });
        self.wait_listening()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The first admin's password, as printed once at first start.
    pub fn admin_password(&self) -> &str {
        &self.password
    }

    /// The data directory (embedded cluster under `data/postgres`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manager's PID (0 while stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for ManagerProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM, then a wait; SIGKILL only if it hangs.
fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signalling our own child, not yet reaped, by PID.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A loopback port nobody listens on (bound and released; a race with another process taking
/// it in between is possible but harmless: the manager then fails to start and says so).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
