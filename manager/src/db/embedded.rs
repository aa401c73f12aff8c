//! The embedded PostgreSQL cluster: with no `database_url`, the manager owns a private cluster
//! under `data_dir/postgres`, built with the system's PostgreSQL binaries.
//!
//! Layout of the cluster directory (`dir`, owned by the manager's user, mode 0711 so that the
//! `postgres` user can reach its own subdirectories but list nothing):
//!
//! | Path | Owner, mode | What |
//! |---|---|---|
//! | `data/` | postgres, 0700 | `PGDATA` (initdb on first start) |
//! | `run/` | postgres, 0700 | the Unix socket directory (`listen_addresses = ''`: no TCP at all) |
//! | `postgres.log` | postgres, 0600 | the server's log (`pg_ctl -l`) |
//! | `password` | manager, 0600 | the `mirage` superuser's password |
//! | `lock` | manager, 0600 | `flock`ed while a manager process owns the cluster |
//!
//! **Authentication.** `initdb -A scram-sha-256` with a generated password: the socket directory
//! is already private (0700, owned by `postgres`, so only `postgres` and root can connect at all),
//! and the password makes a second barrier for the case where that directory's mode is loosened
//! or another local process runs as `postgres`; `trust` would let any such process in as
//! superuser. SCRAM costs a few milliseconds per new connection, which the pool amortizes.
//!
//! **Users.** PostgreSQL refuses to run as root. When the manager runs as root, every PostgreSQL
//! program runs as the `postgres` system user (set with `setuid`/`setgid` on the child, so no
//! `runuser`/PAM is involved); otherwise they run as the manager's own user.
//!
//! **Ownership.** [`EmbeddedPostgres::start`] takes an exclusive `flock` on `lock`. A second
//! process (such as `mirage-manager create-admin` next to a running manager) that finds the lock
//! held attaches to the running cluster instead and never stops it. The owner stops the cluster
//! (`pg_ctl stop -m fast`) in [`EmbeddedPostgres::stop`] or on drop. A postmaster left running by a
//! manager that was killed is stopped and started again with this build's options; a
//! `postmaster.pid` whose process is gone or is not PostgreSQL (a PID reused after a reboot, which
//! PostgreSQL itself would take for a live server) is removed.

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::{
            fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
            process::CommandExt as _,
        },
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use rand::RngCore as _;
use sqlx::postgres::PgConnectOptions;
use tracing::{info, warn};

/// The cluster's superuser, which the manager connects as.
pub const SUPERUSER: &str = "mirage";
/// The system user PostgreSQL runs as when the manager is root.
pub const SYSTEM_USER: &str = "postgres";
/// How long `pg_ctl` may take to start or stop the server.
const PG_CTL_TIMEOUT_SECS: u64 = 60;

/// Errors starting or stopping the embedded cluster.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// A file system operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Running as root, but there is no `postgres` user to run PostgreSQL as.
    #[error(
        "no `{SYSTEM_USER}` system user to run PostgreSQL as (it refuses to run as root); install \
         the postgresql-15 package, or run the manager as a non-root user"
    )]
    NoSystemUser,
    /// A directory on the way to the cluster cannot be entered by the `postgres` user.
    #[error(
        "{path} cannot be entered by the `{SYSTEM_USER}` user; allow it (`chmod o+x {path}`) or \
         choose another data_dir"
    )]
    NotTraversable {
        /// The directory.
        path: PathBuf,
    },
    /// A PostgreSQL program failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its output and, for `pg_ctl start`, the end of the server log.
        output: String,
    },
    /// The cluster exists but its password file is gone, so the manager cannot log in.
    #[error(
        "{data} holds a cluster but {password} is missing; restore it, or move {data} away to \
         start with an empty database"
    )]
    MissingPassword {
        /// The data directory.
        data: PathBuf,
        /// The password file.
        password: PathBuf,
    },
    /// Another process owns the cluster, and it did not become ready in time.
    #[error("another process owns the cluster in {dir}, and it was not ready within {secs} s")]
    NotReady {
        /// The cluster directory.
        dir: PathBuf,
        /// How long we waited.
        secs: u64,
    },
    /// The cluster path contains a character `pg_ctl -o` cannot carry.
    #[error("{path}: the embedded cluster's path must not contain quotes")]
    BadPath {
        /// The path.
        path: PathBuf,
    },
}

/// How to run the embedded cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Directory holding `initdb`, `pg_ctl` and `postgres`.
    pub bin_dir: PathBuf,
    /// `false` turns off `fsync` and synchronous commit: for throw-away test clusters only.
    pub durable: bool,
}

impl EmbeddedOptions {
    /// Durable options with the given binaries.
    pub fn new(bin_dir: impl Into<PathBuf>) -> Self {
        Self {
            bin_dir: bin_dir.into(),
            durable: true,
        }
    }
}

/// A uid/gid pair to run PostgreSQL programs as.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running embedded cluster. Dropping the owner stops it.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    dir: PathBuf,
    options: EmbeddedOptions,
    run_as: Option<RunAs>,
    password: String,
    /// Held while this process owns the cluster; `None` when attached to another owner's.
    lock: Option<File>,
    running: bool,
}

impl EmbeddedPostgres {
    /// Starts the cluster in `dir` (creating it on first start), or attaches to the one another
    /// process owns there. Blocks for up to a minute; call it from a blocking context.
    pub fn start(dir: &Path, options: &EmbeddedOptions) -> Result<Self, EmbeddedError> {
        let run_as = if is_root() {
            Some(lookup_user(SYSTEM_USER)?)
        } else {
            None
        };
        if dir.to_string_lossy().contains(['\'', '"']) {
            return Err(EmbeddedError::BadPath {
                path: dir.to_owned(),
            });
        }
        create_dir(dir, 0o711)?;
        set_mode(dir, 0o711)?;
        if let Some(user) = run_as {
            check_traversable(dir, user)?;
        }

        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        let mut pg = Self {
            dir: dir.to_owned(),
            options: options.clone(),
            run_as,
            password: String::new(),
            lock: None,
            running: false,
        };
        if !try_lock(&lock).map_err(io_err("locking", &lock_path))? {
            info!(dir = %dir.display(), "Another process owns the embedded PostgreSQL cluster, attaching to it.");
            pg.password = pg.read_password()?;
            pg.wait_attached()?;
            return Ok(pg);
        }
        pg.lock = Some(lock);

        if !pg.data_dir().join("PG_VERSION").exists() {
            pg.init()?;
        }
        pg.password = pg.read_password()?;
        pg.prepare_owned_dir(&pg.run_dir(), true)?;
        pg.prepare_owned_dir(&pg.log_path(), false)?;
        pg.clear_stale_pid()?;
        pg.pg_ctl_start()?;
        pg.running = true;
        Ok(pg)
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Connection options for `database` through the Unix socket.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(self.socket_dir())
            .username(SUPERUSER)
            .password(&self.password)
            .database(database)
    }

    /// A `postgres://` URL for `database` through the Unix socket (the password is hex, so it
    /// needs no escaping).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@localhost/{database}?host={}",
            self.password,
            self.socket_dir().display()
        )
    }

    /// Whether this process owns (and will stop) the cluster.
    pub fn is_owner(&self) -> bool {
        self.lock.is_some()
    }

    /// Stops the cluster if this process owns it and it runs (`pg_ctl stop -m fast`: open
    /// sessions are ended, transactions rolled back, then a clean shutdown checkpoint).
    pub fn stop(&mut self) -> Result<(), EmbeddedError> {
        if !self.running || self.lock.is_none() {
            return Ok(());
        }
        self.running = false;
        self.pg_ctl_stop()?;
        info!(dir = %self.dir.display(), "Embedded PostgreSQL stopped.");
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run_dir(&self) -> PathBuf {
        self.socket_dir()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn password_path(&self) -> PathBuf {
        self.dir.join("password")
    }

    fn read_password(&self) -> Result<String, EmbeddedError> {
        let path = self.password_path();
        match fs::read_to_string(&path) {
            Ok(s) => Ok(s.trim().to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(EmbeddedError::MissingPassword {
                data: self.data_dir(),
                password: path,
            }),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// First start: a password, then `initdb`.
    fn init(&self) -> Result<(), EmbeddedError> {
        let data = self.data_dir();
        info!(data = %data.display(), "Creating the embedded PostgreSQL cluster.");
        // A data directory without PG_VERSION is what an interrupted initdb leaves; initdb refuses
        // a non-empty directory, so start over.
        if data.exists() {
            fs::remove_dir_all(&data).map_err(io_err("removing", &data))?;
        }
        let password_path = self.password_path();
        let password = random_hex(32);
        write_private(&password_path, &password)?;
        self.prepare_owned_dir(&data, true)?;
        let run_dir = self.run_dir();
        self.prepare_owned_dir(&run_dir, true)?;
        // initdb reads the password as the postgres user, from its own private directory.
        let pwfile = run_dir.join("initdb.pw");
        write_private(&pwfile, &password)?;
        self.chown(&pwfile)?;
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        if !self.options.durable {
            initdb.arg("--no-sync");
        }
        let result = run(&mut initdb, None);
        let _ = fs::remove_file(&pwfile);
        result
    }

    fn pg_ctl_start(&self) -> Result<(), EmbeddedError> {
        let mut server = format!(
            "-k '{}' -c listen_addresses='' -c unix_socket_permissions=0700",
            self.run_dir().display()
        );
        if !self.options.durable {
            server.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let mut start = self.command("pg_ctl");
        start
            .arg("start")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", &PG_CTL_TIMEOUT_SECS.to_string(), "-o", &server]);
        run(&mut start, Some(&self.log_path()))?;
        info!(dir = %self.dir.display(), "Embedded PostgreSQL started.");
        Ok(())
    }

    fn pg_ctl_stop(&self) -> Result<(), EmbeddedError> {
        let mut stop = self.command("pg_ctl");
        stop.arg("stop").arg("-D").arg(self.data_dir()).args([
            "-m",
            "fast",
            "-w",
            "-t",
            &PG_CTL_TIMEOUT_SECS.to_string(),
        ]);
        run(&mut stop, None)
    }

    /// Handles a `postmaster.pid` left by an earlier run.
    fn clear_stale_pid(&self) -> Result<(), EmbeddedError> {
        let pid_path = self.data_dir().join("postmaster.pid");
        let text = match fs::read_to_string(&pid_path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("reading", &pid_path)(e)),
        };
        let pid = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok());
        if let Some(pid) = pid
            && is_postmaster_of(pid, &self.data_dir())
        {
            // Our lock was free, so the manager that started it is gone: stop it and start again
            // with this build's options.
            warn!(
                pid,
                "Stopping a PostgreSQL server left running by an earlier manager."
            );
            return self.pg_ctl_stop();
        }
        warn!(pid = ?pid, path = %pid_path.display(), "Removing a stale postmaster.pid.");
        fs::remove_file(&pid_path).map_err(io_err("removing", &pid_path))
    }

    /// Waits until the owner's server accepts connections (its `postmaster.pid` says `ready`).
    fn wait_attached(&self) -> Result<(), EmbeddedError> {
        let deadline = Instant::now() + Duration::from_secs(PG_CTL_TIMEOUT_SECS);
        let pid_path = self.data_dir().join("postmaster.pid");
        loop {
            let ready = fs::read_to_string(&pid_path)
                .is_ok_and(|t| t.lines().nth(7).is_some_and(|l| l.trim() == "ready"));
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EmbeddedError::NotReady {
                    dir: self.dir.clone(),
                    secs: PG_CTL_TIMEOUT_SECS,
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates `path` (a directory, or an empty file) if missing, owned by the user PostgreSQL
    /// runs as, mode 0700 or 0600.
    fn prepare_owned_dir(&self, path: &Path, dir: bool) -> Result<(), EmbeddedError> {
        if dir {
            create_dir(path, 0o700)?;
            set_mode(path, 0o700)?;
        } else {
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err("creating", path))?;
        }
        self.chown(path)
    }

    fn chown(&self, path: &Path) -> Result<(), EmbeddedError> {
        if let Some(user) = self.run_as {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                .map_err(io_err("changing the owner of", path))?;
        }
        Ok(())
    }

    /// A PostgreSQL program, run as the right user, from the cluster directory, with no `PG*`
    /// variables of ours leaking into it.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.options.bin_dir.join(program));
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        for key in [
            "PGDATA",
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGPASSWORD",
            "PGOPTIONS",
        ] {
            cmd.env_remove(key);
        }
        if let Some(user) = self.run_as {
            // std drops the supplementary groups too when uid is set by root.
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            warn!(dir = %self.dir.display(), error = %err, "Stopping embedded PostgreSQL failed.");
        }
    }
}

/// Runs `cmd`; on failure the error carries its output and, if given, the end of `log`.
fn run(cmd: &mut Command, log: Option<&Path>) -> Result<(), EmbeddedError> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().map_err(|source| EmbeddedError::Io {
        op: "running",
        path: PathBuf::from(cmd.get_program()),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(log) = log
        && let Ok(text) = fs::read_to_string(log)
    {
        let tail: Vec<&str> = text.lines().rev().take(10).collect();
        output.push_str("\nserver log (last lines):\n");
        for line in tail.into_iter().rev() {
            output.push_str(line);
            output.push('\n');
        }
    }
    Err(EmbeddedError::Command {
        command: shown,
        status: out.status.to_string(),
        output: output.trim().to_owned(),
    })
}

/// Whether `pid` is a live PostgreSQL postmaster serving `data`.
fn is_postmaster_of(pid: u32, data: &Path) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let is_postgres = fs::read_to_string(proc.join("comm")).is_ok_and(|c| c.trim() == "postgres");
    let cmdline = fs::read(proc.join("cmdline")).unwrap_or_default();
    let data = data.as_os_str().as_encoded_bytes();
    is_postgres && cmdline.split(|b| *b == 0).any(|arg| arg == data)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn lookup_user(name: &str) -> Result<RunAs, EmbeddedError> {
    let cname = CString::new(name).map_err(|_| EmbeddedError::NoSystemUser)?;
    // SAFETY: an all-zero `passwd` is a valid value of this plain C struct.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and `buf.len()` is its size;
    // getpwnam_r writes only into `pwd` and `buf`, and `result` is null or points at `pwd`.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(EmbeddedError::NoSystemUser);
    }
    Ok(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Checks that `user` can enter every directory from `/` down to `dir`.
fn check_traversable(dir: &Path, user: RunAs) -> Result<(), EmbeddedError> {
    let dir = dir.canonicalize().map_err(io_err("resolving", dir))?;
    for ancestor in dir.ancestors() {
        let meta = fs::metadata(ancestor).map_err(io_err("reading", ancestor))?;
        let mode = meta.permissions().mode();
        let ok = if meta.uid() == user.uid {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(EmbeddedError::NotTraversable {
                path: ancestor.to_owned(),
            });
        }
    }
    Ok(())
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: the descriptor is open for the duration of the call; flock has no memory effects.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

fn create_dir(path: &Path, mode: u32) -> Result<(), EmbeddedError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_err("creating", path))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), EmbeddedError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err("setting the mode of", path))
}

/// Writes `contents` to a new file readable by its owner only.
fn write_private(path: &Path, contents: &str) -> Result<(), EmbeddedError> {
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating", path))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err("writing", path))
}

/// `n` random bytes from the OS, hex-encoded.
pub(crate) fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    crate::auth::hex(&bytes)
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EmbeddedError {
    let path = path.to_owned();
    move |source| EmbeddedError::Io { op, path, source }
}
