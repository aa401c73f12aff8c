//! RAII guards for network namespaces and the processes started in them.

use std::{
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for names made by this process: `<pid36>-<n>`. Every namespace, pin
/// directory and log file the lab makes carries one, so [`cleanup_on_interrupt`] can find what
/// this process made by the prefix `<pid36>-` (the dash keeps one process's prefix from being
/// a prefix of another's).
pub fn unique_tag() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", process_tag())
}

/// This process's part of [`unique_tag`].
fn process_tag() -> String {
    radix36(std::process::id())
}

/// Makes SIGINT, SIGTERM and SIGHUP clean up before the process exits. The RAII guards do not
/// run when a signal kills a process, so a Ctrl-C during `cargo xtask demo` or a benchmark
/// would leave namespaces, veths and pins behind. Call this first thing in `main`. A handler
/// (async-signal-safe: one `write`) passes the signal number through a pipe to a dedicated
/// thread, which kills this process's own children (by PID), deletes the namespaces and bpffs
/// pin directories named with this process's tag (which also detaches any XDP/TC link pinned
/// there and removes the veths), and exits with 128 + signal.
///
/// A handler rather than blocking the signals and `sigwait`: a blocked mask is inherited by
/// every child (std's `Command` keeps the parent's mask), so agents and managers started later
/// could never be stopped with SIGTERM; a caught signal is reset to its default across `exec`.
pub fn cleanup_on_interrupt() -> Result<()> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    let [read_fd, write_fd] = fds;
    SIGNAL_PIPE.store(write_fd, Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls write(2) on a descriptor set above.
        let previous = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            bail!(
                "installing a handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            let mut sig = 0u8;
            // SAFETY: reading one byte into a local from our own pipe.
            let n = unsafe { libc::read(read_fd, (&raw mut sig).cast(), 1) };
            if n != 1 {
                return;
            }
            #[expect(
                clippy::print_stderr,
                reason = "the operator pressed Ctrl-C and must see why we linger"
            )]
            {
                eprintln!("\nInterrupted: removing this run's namespaces, pins and processes.");
            }
            reap();
            std::process::exit(128 + i32::from(sig));
        })
        .context("starting the interrupt thread")?;
    Ok(())
}

/// The write end of the signal pipe (-1 until [`cleanup_on_interrupt`]).
static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = u8::try_from(sig).unwrap_or(u8::MAX);
        // SAFETY: write(2) is async-signal-safe; one byte from a local.
        unsafe { libc::write(fd, (&raw const byte).cast(), 1) };
    }
}

/// Removes everything this process made, found by name (see [`unique_tag`]).
fn reap() {
    let me = std::process::id();
    let prefix = format!("{}-", process_tag());
    // Children first, by PID: agents, managers, iperf3, pings still running. SIGTERM first and
    // a few seconds' grace (a manager stops its embedded PostgreSQL on SIGTERM; killed outright
    // it would leave the cluster running), then SIGKILL for whatever is left.
    let children = || -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                // The parent PID is the second field after the parenthesised command name; a
                // zombie (state Z) has already exited.
                let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
                let state = rest.next()?;
                let ppid = rest.next()?.parse::<u32>().ok()?;
                (ppid == me && state != "Z").then_some(pid)
            })
            .collect()
    };
    for pid in children() {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !children().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for pid in children() {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name
                .strip_prefix("mirage-")
                .is_some_and(|rest| rest.starts_with(&prefix))
            {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let tmp = std::env::temp_dir();
    for (dir, start) in [
        (
            std::path::Path::new("/sys/fs/bpf"),
            format!("mirage-test-{prefix}"),
        ),
        (tmp.as_path(), format!("mirage-agent-{prefix}")),
        (tmp.as_path(), format!("mirage-sandbox-{prefix}")),
        (tmp.as_path(), format!("mirage-manager-{prefix}")),
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&start) {
                    let p = e.path();
                    let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
                }
            }
        }
    }
}

fn radix36(mut v: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs a command to completion and fails with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

/// Runs `ip ARGS...` in the root namespace.
pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// A network namespace, deleted (with every process we started in it) on drop.
pub struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    /// Creates `name` with `lo` up.
    pub fn new(name: &str) -> Result<Self> {
        ip(&["netns", "add", name]).with_context(|| format!("creating netns {name}"))?;
        let ns = Self {
            name: name.to_owned(),
            children: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (under /run/netns).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that will run inside the namespace (`ip netns exec`). Note that `ip netns exec`
    /// also gives the command a private mount namespace with a fresh /sys: anything that pins
    /// under bpffs must instead enter the namespace itself (`mirage-agent --netns`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program ARGS...` in the namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(self.command(program).args(args))
    }

    /// Spawns a long-running command; it is killed (by PID) when the namespace is dropped.
    pub fn spawn(&mut self, mut cmd: Command) -> Result<u32> {
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting the namespace removes its interfaces; a veth whose peer is elsewhere goes too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Creates a veth pair with one end in each namespace.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    ip(&[
        "link",
        "add",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])
    .with_context(|| {
        format!(
            "creating veth {a_name}@{} <-> {b_name}@{}",
            a.name(),
            b.name()
        )
    })?;
    Ok(())
}

/// Moves the calling thread into network namespace `name` (under /run/netns). Sockets the
/// thread creates afterwards belong to that namespace; other threads are unaffected.
pub fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("invalid network namespace name `{name}`");
    }
    let path = std::path::Path::new("/run/netns").join(name);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a valid namespace fd that outlives the call; setns changes only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering network namespace {name}"));
    }
    Ok(())
}

/// A thread running inside a network namespace; see [`spawn_in_netns`].
pub struct NetnsThread<T> {
    ns: String,
    handle: std::thread::JoinHandle<Option<T>>,
}

impl<T> NetnsThread<T> {
    /// Waits for the thread and returns what it returned.
    pub fn join(self) -> Result<T> {
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.ns))?
            .ok_or_else(|| anyhow::anyhow!("thread did not enter netns {}", self.ns))
    }
}

/// Runs `f` on a new thread that has entered network namespace `ns` (a name under /run/netns)
/// and returns at once with the running thread, for work that outlives the caller's scope
/// (floods, servers). For a call that returns a value, use [`crate::probe::in_netns`].
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<NetnsThread<T>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let name = ns.to_owned();
    let handle = std::thread::spawn(move || {
        let entered = enter_netns(&name);
        let ok = entered.is_ok();
        let _ = tx.send(entered);
        ok.then(f)
    });
    rx.recv().context("netns thread vanished")??;
    Ok(NetnsThread {
        ns: ns.to_owned(),
        handle,
    })
}
