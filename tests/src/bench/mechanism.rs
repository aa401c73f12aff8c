//! The ways the protected host can drop a list of blocked sources in `bench-veth`: Mirage's
//! XDP program, one iptables rule per address (as the original system did), and an nftables set.
//! Each is installed in the lab's host namespace alone and reports the packets it dropped from
//! the kernel's own counters.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use agent::{addr::Net, loader, maps::Maps};
use agent_common::{Action, AttackerEntry};
use anyhow::{Context as _, Result, bail};

use crate::{
    lab::{Agent, HOST_IFACE, Lab},
    netns::run,
};

/// A drop mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// Mirage's XDP program (firewall mode), entries in its exact hash map, attached the way
    /// the agent does by default (generic mode on veth).
    Xdp,
    /// The same, forced into native (driver) mode, shown for reference: on veth the native path
    /// converts every skb into an XDP buffer (often a reallocation and copy).
    XdpNative,
    /// One `iptables -A INPUT -s ADDR -j DROP` rule per address.
    IptablesPerIp,
    /// One nftables rule matching a set of addresses.
    NftSet,
}

impl Mechanism {
    /// The name used as `baseline` in the output.
    pub const fn name(self) -> &'static str {
        match self {
            Mechanism::Xdp => "mirage-xdp",
            Mechanism::XdpNative => "mirage-xdp-native",
            Mechanism::IptablesPerIp => "iptables-per-ip",
            Mechanism::NftSet => "nft-set",
        }
    }
}

/// The nftables table made for the `nft-set` case.
const NFT_TABLE: &str = "mirage_bench";

/// A mechanism installed in the lab's host namespace. Dropping it removes it (the agent detaches
/// and unpins; the rules are flushed); dropping the lab afterwards removes everything else.
pub enum Installed {
    /// The agent and a handle on its pinned maps.
    Xdp {
        /// The pinned maps (for the counters); closed before the agent detaches.
        maps: Box<Maps>,
        /// The running agent.
        agent: Agent,
        /// How the program attached, as `ip link` reports it.
        attach_mode: String,
    },
    /// iptables rules in the host namespace.
    Iptables {
        /// The host namespace.
        ns: String,
        /// The address whose rule's counter is read.
        flooder: Ipv4Addr,
    },
    /// An nftables table in the host namespace.
    Nft {
        /// The host namespace.
        ns: String,
    },
}

impl Installed {
    /// Installs `mech` in `lab.host`, blocking `blocked` in order (the last is the most
    /// recently blocked).
    pub fn install(mech: Mechanism, lab: &Lab, blocked: &[Ipv4Addr]) -> Result<Self> {
        let ns = lab.host.name().to_owned();
        let last = *blocked.last().context("no address to block")?;
        match mech {
            Mechanism::Xdp | Mechanism::XdpNative => {
                let mut args = vec!["--mode", "firewall"];
                if mech == Mechanism::XdpNative {
                    args.extend(["--xdp-mode", "native"]);
                }
                let agent = Agent::start(&lab.host, &args)?;
                let mut maps = Box::new(
                    Maps::open_pinned(&loader::pin_dir(agent.root()))
                        .context("opening the agent's pinned maps")?,
                );
                for a in blocked {
                    maps.block(Net::V4(*a, 32), AttackerEntry::new(Action::Default, 0))?;
                }
                let attach_mode = xdp_attach_mode(&ns)?;
                Ok(Installed::Xdp {
                    maps,
                    agent,
                    attach_mode,
                })
            }
            Mechanism::IptablesPerIp => {
                // iptables-restore loads all rules in one transaction; 10,000 `iptables -A`
                // calls would take minutes. The resulting chain is the same: one rule per
                // address, evaluated in order.
                let mut rules = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
                for a in blocked {
                    rules.push_str(&format!("-A INPUT -s {a}/32 -j DROP\n"));
                }
                rules.push_str("COMMIT\n");
                exec_stdin(&ns, "iptables-restore", &[], &rules)?;
                let installed = Installed::Iptables { ns, flooder: last };
                let n = installed.iptables_rules()?;
                if n != blocked.len() {
                    bail!("iptables INPUT has {n} rules, expected {}", blocked.len());
                }
                Ok(installed)
            }
            Mechanism::NftSet => {
                let elements: Vec<String> = blocked.iter().map(Ipv4Addr::to_string).collect();
                let script = format!(
                    "table ip {NFT_TABLE} {{\n\
                     \tset attackers {{ type ipv4_addr; elements = {{ {} }} }}\n\
                     \tchain input {{\n\
                     \t\ttype filter hook input priority filter; policy accept;\n\
                     \t\tip saddr @attackers counter drop\n\
                     \t}}\n\
                     }}\n",
                    elements.join(", ")
                );
                exec_stdin(&ns, "nft", &["-f", "-"], &script)?;
                Ok(Installed::Nft { ns })
            }
        }
    }

    /// Packets dropped so far, from the mechanism's own kernel counter: the agent's global drop
    /// counter, the flooding address's iptables rule, or the nftables rule's counter.
    pub fn drops(&self) -> Result<u64> {
        match self {
            Installed::Xdp { maps, .. } => Ok(maps
                .global()?
                .get(agent_common::Counter::Drop.name())
                .copied()
                .unwrap_or(0)),
            Installed::Iptables { ns, flooder } => {
                let out = exec(ns, "iptables", &["-L", "INPUT", "-v", "-x", "-n"])?;
                let flooder = flooder.to_string();
                // "pkts bytes target prot opt in out source destination"
                out.lines()
                    .find(|l| {
                        l.split_whitespace()
                            .any(|f| f == flooder || f == format!("{flooder}/32"))
                    })
                    .and_then(|l| l.split_whitespace().next()?.parse().ok())
                    .with_context(|| format!("no iptables rule for {flooder} in:\n{out}"))
            }
            Installed::Nft { ns } => {
                let out = exec(ns, "nft", &["list", "chain", "ip", NFT_TABLE, "input"])?;
                out.split_once("counter packets ")
                    .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
                    .with_context(|| format!("no counter in:\n{out}"))
            }
        }
    }

    /// A line for the reader saying what is in place.
    pub fn describe(&self) -> String {
        match self {
            Installed::Xdp { attach_mode, .. } => {
                format!("mirage XDP on {HOST_IFACE}, attached in {attach_mode} mode")
            }
            Installed::Iptables { .. } => {
                let version = Command::new("iptables")
                    .arg("--version")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                    .unwrap_or_default();
                format!("iptables INPUT chain, one DROP rule per address ({version})")
            }
            Installed::Nft { .. } => {
                format!(
                    "nftables table ip {NFT_TABLE}: one `ip saddr @attackers counter drop` rule"
                )
            }
        }
    }

    fn iptables_rules(&self) -> Result<usize> {
        let Installed::Iptables { ns, .. } = self else {
            return Ok(0);
        };
        let out = exec(ns, "iptables", &["-S", "INPUT"])?;
        Ok(out.lines().filter(|l| l.starts_with("-A INPUT")).count())
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        // The lab's namespaces are deleted right after, which would remove the rules too; doing
        // it here keeps each case's teardown explicit.
        match self {
            Installed::Xdp { .. } => {} // `Agent`'s drop detaches and unpins.
            Installed::Iptables { ns, .. } => {
                let _ = exec(ns, "iptables", &["-F", "INPUT"]);
            }
            Installed::Nft { ns } => {
                let _ = exec(ns, "nft", &["delete", "table", "ip", NFT_TABLE]);
            }
        }
    }
}

/// How XDP is attached to the host's interface: `native (driver)`, `generic (SKB)`, or `none`.
pub fn xdp_attach_mode(ns: &str) -> Result<String> {
    let out = run(Command::new("ip").args(["-n", ns, "-d", "link", "show", "dev", HOST_IFACE]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    Ok(if words.contains(&"xdpgeneric") {
        "generic (SKB)"
    } else if words.contains(&"xdpoffload") {
        "offloaded"
    } else if words.contains(&"xdp") {
        "native (driver)"
    } else {
        "none"
    }
    .to_owned())
}

/// Runs `program ARGS...` in namespace `ns` and returns its stdout.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let out = run(Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program ARGS...` in namespace `ns` with `input` on its stdin.
pub fn exec_stdin(ns: &str, program: &str, args: &[&str], input: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let written = child
        .stdin
        .take()
        .context("no stdin")
        .and_then(|mut stdin| stdin.write_all(input.as_bytes()).context("writing stdin"));
    // Wait in every case, so the child is reaped even if writing failed.
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    written?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
