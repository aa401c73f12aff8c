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
    child: Child,
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
        let mut child = Command::new(binary("mirage-manager"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting mirage-manager (built by `cargo xtask demo`)")?;
        let stderr = child.stderr.take().context("no stderr")?;
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
        let mut me = Self {
            child,
            dir,
            addr,
            password: String::new(),
        };
        me.password = rx
            .recv_timeout(START_TIMEOUT)
            .context("mirage-manager printed no first-start password")?;
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = me.child.try_wait()? {
                bail!("mirage-manager exited: {status}");
            }
            if Instant::now() > deadline {
                bail!("mirage-manager does not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(me)
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

    /// The manager's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ManagerProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nobody listens on (bound and released; a race with another process taking
/// it in between is possible but harmless: the manager then fails to start and says so).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
