//! `mirage-agent enroll`: trades a one-time enrollment token (an operator creates it in the
//! manager) for this agent's own credential, and writes it to `state_dir/credential`, mode 0600.
//!
//! The credential is never printed or logged. An existing credential file is not replaced
//! unless `--force` is given, and that is checked *before* the token is spent: a token is good
//! for one enrollment only.

use std::{
    ffi::CStr,
    fs::{self, OpenOptions},
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use tracing::info;

use super::client;
use crate::config::links::DEFAULT_STATE_DIR;

/// How long the enrollment request may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `mirage-agent enroll` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct EnrollArgs {
    /// The manager's base URL, e.g. `https://manager.example:8443` (`http://` only to a
    /// loopback address).
    #[arg(long, value_name = "URL")]
    pub manager: String,
    /// The one-time enrollment token. Also read from `MIRAGE_ENROLL_TOKEN`, which keeps it out
    /// of the process list.
    #[arg(long, env = "MIRAGE_ENROLL_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The name to enroll under (default: this host's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Where the agent keeps its state; the credential goes to `DIR/credential` (the default
    /// `credential_file` of `[manager]`).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Extra CA certificate (PEM) for the manager's HTTPS, besides the web PKI roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Replace an existing credential file.
    #[arg(long)]
    pub force: bool,
}

/// `POST /api/v1/agent/enroll` answer.
#[derive(Deserialize)]
struct Enrolled {
    agent_id: i64,
    name: String,
    credential: String,
}

/// Runs `mirage-agent enroll`.
pub fn run(args: &EnrollArgs) -> Result<()> {
    let base = client::manager_url(&args.manager)?;
    let path = args.state_dir.join("credential");
    if path.exists() && !args.force {
        bail!(
            "{} exists: this agent is enrolled already; pass --force to enroll again and replace \
             it (the token is not used otherwise)",
            path.display()
        );
    }
    let hostname = match &args.name {
        Some(n) => n.clone(),
        None => hostname().context("reading this host's name (or pass --name)")?,
    };
    let http = client::client(args.ca.as_deref())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let url = client::endpoint(&base, "api/v1/agent/enroll");
    let body = serde_json::json!({
        "token": args.token.trim(),
        "hostname": hostname,
        "addresses": local_addresses(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let enrolled: Enrolled = rt.block_on(async {
        let resp = http
            .post(&url)
            .timeout(TIMEOUT)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("reaching the manager at {base}"))?;
        let status = resp.status();
        if status.is_success() {
            return resp
                .json::<Enrolled>()
                .await
                .context("reading the manager's answer");
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(text);
        match status.as_u16() {
            401 => bail!(
                "the manager refused the token ({message}): it is unknown, used or expired; ask \
                 an operator for a new one"
            ),
            _ => bail!("the manager answered {status}: {message}"),
        }
    })?;
    write_credential(&args.state_dir, &enrolled.credential, args.force)?;
    info!(
        agent = %enrolled.name,
        id = enrolled.agent_id,
        path = %path.display(),
        "Enrolled; the credential is stored (mode 0600)."
    );
    Ok(())
}

/// Writes `state_dir/credential` (mode 0600, directory 0700): a temporary file, fsynced, then
/// renamed into place when `replace`, or linked (which fails if the name exists) otherwise.
pub fn write_credential(state_dir: &Path, credential: &str, replace: bool) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let path = state_dir.join("credential");
    let tmp = state_dir.join(format!("credential.tmp-{}", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let written = file
        .write_all(credential.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all());
    drop(file);
    let placed = written.and_then(|()| {
        if replace {
            fs::rename(&tmp, &path)
        } else {
            fs::hard_link(&tmp, &path)
        }
    });
    let _ = fs::remove_file(&tmp);
    placed.with_context(|| format!("writing {}", path.display()))?;
    fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", state_dir.display()))?;
    Ok(())
}

/// This host's name.
fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into our buffer.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("gethostname");
    }
    let name = CStr::from_bytes_until_nul(&buf)
        .context("the host name is not terminated")?
        .to_string_lossy()
        .into_owned();
    if name.is_empty() {
        bail!("the host name is empty");
    }
    Ok(name)
}

/// This host's addresses as the manager shows them: every interface address but loopback,
/// link-local and multicast ones.
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list and stores its head in `head`; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null `ifa_addr` points to a sockaddr whose family says its type.
            let ip = unsafe {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sa = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                        Some(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()))
                    }
                    libc::AF_INET6 => {
                        let sa = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                        Some(IpAddr::from(sa.sin6_addr.s6_addr))
                    }
                    _ => None,
                }
            };
            if let Some(ip) = ip.map(crate::addr::normalize)
                && !ip.is_loopback()
                && !ip.is_multicast()
                && !is_link_local(ip)
                && !out.contains(&ip)
            {
                out.push(ip);
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn writes_a_private_credential_and_refuses_to_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        write_credential(&state, "first", false).unwrap();
        let path = state.join("credential");
        assert_eq!(fs::read_to_string(&path).unwrap(), "first\n");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(write_credential(&state, "second", false).is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "first\n");
        write_credential(&state, "second", true).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "second\n");
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&state).unwrap().count(), 1);
    }

    #[test]
    fn refuses_before_spending_the_token() {
        let dir = tempfile::tempdir().unwrap();
        write_credential(dir.path(), "x", false).unwrap();
        let args = EnrollArgs {
            // Nothing listens there: the refusal must come before any request.
            manager: "http://127.0.0.1:9".into(),
            token: "t".into(),
            name: Some("h".into()),
            state_dir: dir.path().to_owned(),
            ca: None,
            force: false,
        };
        let err = run(&args).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        let args = EnrollArgs {
            manager: "http://192.0.2.1:8443".into(),
            force: true,
            ..args
        };
        assert!(run(&args).unwrap_err().to_string().contains("loopback"));
    }

    #[test]
    fn knows_its_name_and_addresses() {
        assert!(!hostname().unwrap().is_empty());
        assert!(local_addresses().iter().all(|a| !a.is_loopback()));
    }
}
