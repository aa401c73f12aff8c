//! The lab topology: a protected host, an attacker and a legitimate client on one L2 segment.
//!
//! ```text
//!   attacker (198.18.0.3, fd6d:6972:6167:65::3) ─┐
//!                                                 ├─ br0 in "lan" ─── eth0 in "host"
//!   legit    (198.18.0.2, fd6d:6972:6167:65::2) ─┘                    (198.18.0.1, ::1)
//! ```
//!
//! All three reach the host through the same interface (`eth0` in the host namespace), which is
//! where the agent attaches: the legitimate client's packets cross the same XDP program as the
//! attacker's. Nothing is routed anywhere else: the namespaces have only this /24 and /64.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{Netns, run, unique_tag, veth};

/// The host's IPv4 address.
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The legitimate client's IPv4 address.
pub const LEGIT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The attacker's IPv4 address.
pub const ATTACKER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The host's IPv6 address.
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x6972, 0x6167, 0x65, 0, 0, 0, 1);
/// The legitimate client's IPv6 address.
pub const LEGIT_V6: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x6972, 0x6167, 0x65, 0, 0, 0, 2);
/// The attacker's IPv6 address.
pub const ATTACKER_V6: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x6972, 0x6167, 0x65, 0, 0, 0, 3);
/// The protected interface in the host namespace.
pub const HOST_IFACE: &str = "eth0";

/// Path of a workspace binary: `$MIRAGE_BIN_DIR/<name>` if set, else the cargo target directory
/// next to this crate (`target/debug`, or `target/release` when built so).
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("MIRAGE_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let release = target.join("release").join(name);
    let debug = target.join("debug").join(name);
    if debug.exists() || !release.exists() {
        debug
    } else {
        release
    }
}

/// The three-host lab. Dropping it removes every namespace (and so every veth and process).
pub struct Lab {
    /// Protected host.
    pub host: Netns,
    /// Legitimate client.
    pub legit: Netns,
    /// Attacker.
    pub attacker: Netns,
    /// The L2 segment (a bridge) joining them. Dropped last.
    pub lan: Netns,
}

impl Lab {
    /// Builds the topology, with IPv4 and IPv6 on every host, and waits until the host answers
    /// both clients.
    pub fn new() -> Result<Self> {
        let tag = unique_tag();
        let lan = Netns::new(&format!("mirage-{tag}-lan"))?;
        let host = Netns::new(&format!("mirage-{tag}-host"))?;
        let legit = Netns::new(&format!("mirage-{tag}-legit"))?;
        let attacker = Netns::new(&format!("mirage-{tag}-atk"))?;
        // No multicast snooping: the bridge floods multicast (MLD reports included) to every
        // port like a plain segment, so the host sees every packet a client sends.
        lan.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        for ns in [&host, &legit, &attacker] {
            // A quiet segment: no duplicate-address detection (its solicitations come from `::`)
            // and MLD reports repeated within milliseconds instead of over seconds, so that
            // once the lab is up the only packets on the wire are the ones a test sends.
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            ns.sysctl(
                "net.ipv6.conf.default.mldv2_unsolicited_report_interval",
                "10",
            )?;
            ns.sysctl(
                "net.ipv6.conf.default.mldv1_unsolicited_report_interval",
                "10",
            )?;
        }
        for (ns, port, v4, v6) in [
            (&host, "p-host", HOST_V4, HOST_V6),
            (&legit, "p-legit", LEGIT_V4, LEGIT_V6),
            (&attacker, "p-atk", ATTACKER_V4, ATTACKER_V6),
        ] {
            veth(ns, HOST_IFACE, &lan, port)?;
            lan.ip(&["link", "set", port, "master", "br0"])?;
            lan.ip(&["link", "set", port, "up"])?;
            // No IPv6 autoconfiguration or DAD noise: the packets on the wire are the ones we send.
            ns.sysctl(&format!("net.ipv6.conf.{HOST_IFACE}.accept_ra"), "0")?;
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", HOST_IFACE])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                HOST_IFACE,
                "nodad",
            ])?;
            ns.ip(&["link", "set", HOST_IFACE, "up"])?;
        }
        let lab = Self {
            host,
            legit,
            attacker,
            lan,
        };
        lab.wait_reachable()?;
        Ok(lab)
    }

    /// Makes `client`'s neighbour entries for the host permanent, so the client never needs the
    /// host's ARP or neighbour-discovery answers. With the client blocked, its IPv6 neighbour
    /// solicitations are dropped like the rest of its packets, and its stack would otherwise
    /// discard queued packets when resolution fails: with static entries every packet its stack
    /// sends reaches the wire, which is what exact accounting tests need.
    pub fn static_neighbours(&self, client: &Netns) -> Result<()> {
        let out = self.host.ip(&["-j", "link", "show", HOST_IFACE])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mac = v[0]["address"]
            .as_str()
            .context("host eth0 has no MAC address")?
            .to_owned();
        for addr in [HOST_V4.to_string(), HOST_V6.to_string()] {
            client.ip(&[
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &mac,
                "dev",
                HOST_IFACE,
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    fn wait_reachable(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for (ns, dst) in [
            (&self.legit, IpAddr::V4(HOST_V4)),
            (&self.attacker, IpAddr::V4(HOST_V4)),
            (&self.legit, IpAddr::V6(HOST_V6)),
            (&self.attacker, IpAddr::V6(HOST_V6)),
        ] {
            loop {
                if ping(ns, dst, 1, Duration::from_millis(500))? == 1 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{dst} not reachable from {} after 10 s", ns.name());
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

/// Sends `count` pings from `ns` to `dst`; returns how many were answered.
pub fn ping(ns: &Netns, dst: IpAddr, count: u32, wait: Duration) -> Result<u32> {
    let out = ns
        .command("ping")
        .args([
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-W",
            &format!("{:.1}", wait.as_secs_f64()),
            &dst.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .context("running ping")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "N packets transmitted, M received, ..."
    let received = text
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("transmitted, ")?;
            rest.split_whitespace().next()?.parse::<u32>().ok()
        })
        .unwrap_or(0);
    Ok(received)
}

/// A running `mirage-agent run` in the host namespace with a private bpffs root. On drop it
/// stops the agent (by PID) and runs `mirage-agent detach`, which removes the program and every
/// pin it made.
pub struct Agent {
    bin: PathBuf,
    log: PathBuf,
    root: PathBuf,
    netns: String,
    child: Option<std::process::Child>,
}

impl Agent {
    /// Starts the agent on the lab host's `eth0` and waits until it is attached.
    pub fn start(host: &Netns, args: &[&str]) -> Result<Self> {
        let tag = unique_tag();
        let root = PathBuf::from(format!("/sys/fs/bpf/mirage-test-{tag}"));
        let mut agent = Self {
            bin: binary("mirage-agent"),
            log: std::env::temp_dir().join(format!("mirage-agent-{tag}.log")),
            root,
            netns: host.name().to_owned(),
            child: None,
        };
        agent.spawn(args)?;
        Ok(agent)
    }

    /// (Re)starts the `run` process; an existing pinned link is taken over.
    pub fn spawn(&mut self, args: &[&str]) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["run", "--iface", HOST_IFACE]).args(args);
        // The agent's log goes to a file (appended across restarts) so it does not interleave
        // with test or demo output; `log()` reads it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        cmd.stdin(Stdio::null()).stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        self.child = Some(child);
        let link = self.root.join(format!("v{}", agent_common::LAYOUT_VERSION));
        let link = link.join(format!("link-xdp-{HOST_IFACE}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        // Attached once the link pin exists and the mode is configured.
        while !(link.exists()
            && self
                .cli(&["list", "--json"])
                .is_ok_and(|o| o.contains("\"enabled\": true")))
        {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("mirage-agent exited early: {status}\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("mirage-agent did not attach within 20 s\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the `run` process with SIGTERM and waits for it; the pinned program keeps running.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling a child we spawned and have not reaped, by its PID.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }

    /// A `mirage-agent` command with this agent's bpffs root and namespace.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("MIRAGE_BPFFS_ROOT", &self.root)
            .env("MIRAGE_NETNS", &self.netns);
        cmd
    }

    /// Runs a CLI command to completion and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = run(self.command().args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `top --once --json`, parsed.
    pub fn top(&self) -> Result<serde_json::Value> {
        let text = self.cli(&["top", "--once", "--json"])?;
        serde_json::from_str(&text).context("parsing top --json")
    }

    /// What the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The bpffs root this agent pins under.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
        // Without the namespace: it may already be gone, and detach only touches bpffs.
        let _ = self
            .command()
            .env_remove("MIRAGE_NETNS")
            .arg("detach")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_file(&self.log);
    }
}
