//! Redirect and reflect end to end: the real agent on the protected host's two interfaces
//! (`eth0` toward the clients, `eth1` toward the sandbox), real TCP and UDP servers on the host,
//! in the sandbox and in the attacker's own namespace, for both redirect models and both
//! families. See `tests::sandbox_lab` for the topology.
//!
//! Every scenario checks what each side *saw*: the servers answer with their name, their port
//! and the peer address they accepted, and the clients note where the answer came from. A
//! failed assertion prints the agent's global counters, flow log and log.

#![allow(
    clippy::unwrap_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use tests::sandbox_lab::{
    CLOSED_PORT, DNS_PORT, Exchange, Family, FlowLogLine, LeakWatch, REFLECT_PORT, RedirectModel,
    SANDBOX_CLOSED_PORT, SANDBOX_DNS_PORT, SANDBOX_SSH_PORT, SANDBOX_WEB_PORT, SSH_PORT,
    SandboxAgent, SandboxLab, Session, UNMAPPED_PORT, UdpClient, WEB_PORT, tcp_ask,
    udp_connected_ask,
};

/// How long an exchange that should succeed may take (a first packet may wait for ARP/ND).
const OK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for an exchange that should fail.
const FAIL_TIMEOUT: Duration = Duration::from_secs(1);
/// The reflect rate cap configured for the reflect scenario, packets per source and second.
const REFLECT_PPS: u64 = 100;

/// Asserts who answered, on which port, and whom they saw; `$diag` is appended on failure.
macro_rules! check_reply {
    ($ex:expr, $who:expr, $port:expr, $peer_ip:expr, $diag:expr, $($ctx:tt)+) => {{
        let ex: &Exchange = $ex;
        let ctx = format!($($ctx)+);
        assert!(
            ex.reply.who == $who && ex.reply.port == $port && ex.reply.peer.ip() == $peer_ip,
            "{ctx}: expected {} on port {} seeing {}, got {:?}\n{}",
            $who,
            $port,
            $peer_ip,
            ex,
            $diag
        );
    }};
}

fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn sysctl(ns: &tests::netns::Netns, key: &str) -> String {
    let out = ns.exec("sysctl", &["-n", key]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The topology on its own, no agent: the clients reach the host's services and nothing else;
/// only the host forwards; the sandbox routes through the host under `preserve-source` and has
/// no route toward the clients under `full-nat`.
#[test]
fn sandbox_lab_routes_only_what_each_model_needs() {
    for model in [RedirectModel::PreserveSource, RedirectModel::FullNat] {
        let lab = SandboxLab::new(model).unwrap();
        let _host = lab.host_services().unwrap();
        let _sandbox = lab.sandbox_services().unwrap();
        let none = "(no agent)";

        assert_eq!(
            sysctl(&lab.lab.host, "net.ipv4.conf.all.forwarding"),
            "1",
            "{model:?}"
        );
        assert_eq!(
            sysctl(&lab.lab.host, "net.ipv6.conf.all.forwarding"),
            "1",
            "{model:?}"
        );
        // The agent checks each ingress interface too, not only `all`.
        for iface in ["eth0", "eth1"] {
            for fam in ["ipv4", "ipv6"] {
                let key = format!("net.{fam}.conf.{iface}.forwarding");
                assert_eq!(sysctl(&lab.lab.host, &key), "1", "{model:?} {key}");
            }
        }
        for ns in [&lab.sandbox, &lab.lab.attacker, &lab.lab.legit] {
            assert_eq!(sysctl(ns, "net.ipv4.conf.all.forwarding"), "0");
            assert_eq!(sysctl(ns, "net.ipv6.conf.all.forwarding"), "0");
        }

        for family in Family::ALL {
            let ssh = sock(family.host(), SSH_PORT);
            let ex = tcp_ask(lab.lab.legit.name(), ssh, "hi", OK_TIMEOUT)
                .unwrap()
                .unwrap();
            check_reply!(
                &ex,
                "host",
                SSH_PORT,
                family.legit(),
                none,
                "{model:?} {family} legit tcp"
            );
            assert_eq!(ex.reply.peer, ex.local);
            let udp = UdpClient::bind(lab.lab.attacker.name(), family).unwrap();
            let ex = udp
                .ask(sock(family.host(), DNS_PORT), "q", OK_TIMEOUT)
                .unwrap();
            check_reply!(
                &ex,
                "host",
                DNS_PORT,
                family.attacker(),
                none,
                "{model:?} {family} attacker udp"
            );
            assert_eq!(ex.remote, sock(family.host(), DNS_PORT));

            // The clients have no route to the sandbox link.
            let sandbox = sock(family.sandbox(), SANDBOX_SSH_PORT);
            for client in [&lab.lab.attacker, &lab.lab.legit] {
                let r = tcp_ask(client.name(), sandbox, "hi", FAIL_TIMEOUT).unwrap();
                assert!(
                    r.is_err(),
                    "{model:?} {family}: {} reached the sandbox: {r:?}",
                    client.name()
                );
            }

            // The sandbox reaches the host's LAN address only through its default route.
            let r = tcp_ask(lab.sandbox.name(), ssh, "hi", FAIL_TIMEOUT).unwrap();
            match model {
                RedirectModel::PreserveSource => {
                    let ex = r.unwrap();
                    check_reply!(
                        &ex,
                        "host",
                        SSH_PORT,
                        family.sandbox(),
                        none,
                        "{family} sandbox to host"
                    );
                }
                RedirectModel::FullNat => assert!(
                    r.as_ref()
                        .is_err_and(|e| e.kind() == ErrorKind::NetworkUnreachable),
                    "{family}: the full-nat sandbox has a route to the LAN: {r:?}"
                ),
            }
        }
    }
}

/// `unreal`: the attacker's new connections land in the sandbox, what the sandbox sees depends
/// on the model, the attacker only ever sees the host's address, the legitimate client and a
/// connection opened before the block keep the real service, and a redirected connection stays
/// redirected after the attacker is unblocked.
fn unreal(model: RedirectModel, family: Family) {
    let lab = SandboxLab::new(model).unwrap();
    let _host = lab.host_services().unwrap();
    let _sandbox = lab.sandbox_services().unwrap();
    let watch = LeakWatch::start(lab.lab.attacker.name()).unwrap();
    let agent = SandboxAgent::start(&lab, &lab.config("unreal", "")).unwrap();
    let atk = lab.lab.attacker.name();
    let legit = lab.lab.legit.name();
    let ssh = sock(family.host(), SSH_PORT);
    let ctx = format!("{} {family}", model.name());
    // What the sandbox should see as the attacker's address.
    let seen = match model {
        RedirectModel::PreserveSource => family.attacker(),
        RedirectModel::FullNat => family.host_sandbox_side(),
    };

    // Before the block the attacker is a client like any other; keep that connection open.
    let mut early = Session::open(atk, ssh, OK_TIMEOUT).unwrap().unwrap();
    let ex = early.ask("before", OK_TIMEOUT).unwrap();
    check_reply!(
        &ex,
        "host",
        SSH_PORT,
        family.attacker(),
        agent.diagnostics(),
        "{ctx}: attacker before block"
    );

    agent.block(family.attacker(), None).unwrap();

    // A new connection lands in the sandbox; the attacker's socket is connected to the host.
    let mut late = Session::open(atk, ssh, OK_TIMEOUT)
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "{ctx}: attacker connect after block: {e}\n{}",
                agent.diagnostics()
            )
        });
    let ex = late.ask("after", OK_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "{ctx}: attacker exchange after block: {e}\n{}",
            agent.diagnostics()
        )
    });
    check_reply!(
        &ex,
        "sandbox",
        SANDBOX_SSH_PORT,
        seen,
        agent.diagnostics(),
        "{ctx}: attacker after block"
    );
    assert_eq!(ex.remote, ssh, "{ctx}: the attacker's peer");
    if model == RedirectModel::PreserveSource {
        assert_eq!(
            ex.reply.peer, ex.local,
            "{ctx}: the sandbox saw another port"
        );
    }
    let redirected = ex.clone();

    // Per-port targets and the default target.
    let ex = tcp_ask(atk, sock(family.host(), WEB_PORT), "web", OK_TIMEOUT)
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "{ctx}: attacker to {WEB_PORT}: {e}\n{}",
                agent.diagnostics()
            )
        });
    check_reply!(
        &ex,
        "sandbox",
        SANDBOX_WEB_PORT,
        seen,
        agent.diagnostics(),
        "{ctx}: attacker to {WEB_PORT}"
    );
    let ex = tcp_ask(atk, sock(family.host(), UNMAPPED_PORT), "other", OK_TIMEOUT)
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "{ctx}: attacker to {UNMAPPED_PORT}: {e}\n{}",
                agent.diagnostics()
            )
        });
    check_reply!(
        &ex,
        "sandbox",
        SANDBOX_SSH_PORT,
        seen,
        agent.diagnostics(),
        "{ctx}: attacker to {UNMAPPED_PORT} (default target)"
    );

    // The connection from before the block still talks to the real service.
    let ex = early.ask("still", OK_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "{ctx}: pre-block connection broke: {e}\n{}",
            agent.diagnostics()
        )
    });
    check_reply!(
        &ex,
        "host",
        SSH_PORT,
        family.attacker(),
        agent.diagnostics(),
        "{ctx}: pre-block connection"
    );

    // The legitimate client is untouched.
    let ex = tcp_ask(legit, ssh, "legit", OK_TIMEOUT).unwrap().unwrap();
    check_reply!(
        &ex,
        "host",
        SSH_PORT,
        family.legit(),
        agent.diagnostics(),
        "{ctx}: legit"
    );

    // The flow log names the attacker's socket, the original destination and the target; under
    // full-nat its NAT address and port are exactly what the sandbox saw.
    let flow = agent
        .wait_flow(OK_TIMEOUT, |f| f.attacker == redirected.local)
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "{ctx}: no flow-log line for {}\n{}",
                redirected.local,
                agent.diagnostics()
            )
        });
    assert_eq!(
        (flow.kind.as_str(), flow.model.as_str(), flow.proto.as_str()),
        ("redirect", model.name(), "tcp"),
        "{ctx}: {flow:?}"
    );
    assert_eq!(flow.orig_dst, ssh, "{ctx}: {flow:?}");
    assert_eq!(
        flow.target,
        sock(family.sandbox(), SANDBOX_SSH_PORT),
        "{ctx}: {flow:?}"
    );
    if model == RedirectModel::FullNat {
        assert_eq!(
            flow.nat, redirected.reply.peer,
            "{ctx}: NAT mapping vs what the sandbox saw"
        );
    }

    // Unblocked: the redirected connection stays in the sandbox, a new one reaches the host.
    agent.unblock(family.attacker()).unwrap();
    let ex = late.ask("unblocked", OK_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "{ctx}: redirected connection broke on unblock: {e}\n{}",
            agent.diagnostics()
        )
    });
    check_reply!(
        &ex,
        "sandbox",
        SANDBOX_SSH_PORT,
        seen,
        agent.diagnostics(),
        "{ctx}: redirected connection after unblock"
    );
    let ex = tcp_ask(atk, ssh, "fresh", OK_TIMEOUT).unwrap().unwrap();
    check_reply!(
        &ex,
        "host",
        SSH_PORT,
        family.attacker(),
        agent.diagnostics(),
        "{ctx}: new connection after unblock"
    );

    let global = agent.global().unwrap();
    assert!(
        global.get("redirect").copied().unwrap_or(0) > 0,
        "{ctx}: {global:?}"
    );
    // The attacker saw frames, and none of them named the sandbox link.
    assert!(watch.frames() > 0);
    assert_eq!(
        watch.leaks(),
        Vec::<String>::new(),
        "{ctx}: sandbox addresses reached the attacker"
    );
}

#[test]
fn unreal_preserve_source_ipv4() {
    unreal(RedirectModel::PreserveSource, Family::V4);
}

#[test]
fn unreal_preserve_source_ipv6() {
    unreal(RedirectModel::PreserveSource, Family::V6);
}

#[test]
fn unreal_full_nat_ipv4() {
    unreal(RedirectModel::FullNat, Family::V4);
}

#[test]
fn unreal_full_nat_ipv6() {
    unreal(RedirectModel::FullNat, Family::V6);
}

/// A DNS-like request/response through the redirect: the answers come from the host's address
/// and port, several requests from one socket stay one flow, and the legitimate client's
/// requests reach the real service.
fn udp_through_redirect(model: RedirectModel) {
    let lab = SandboxLab::new(model).unwrap();
    let _host = lab.host_services().unwrap();
    let _sandbox = lab.sandbox_services().unwrap();
    let watch = LeakWatch::start(lab.lab.attacker.name()).unwrap();
    let agent = SandboxAgent::start(&lab, &lab.config("unreal", "")).unwrap();
    for family in Family::ALL {
        let ctx = format!("{} {family} udp", model.name());
        let dns = sock(family.host(), DNS_PORT);
        agent.block(family.attacker(), None).unwrap();
        let seen = match model {
            RedirectModel::PreserveSource => family.attacker(),
            RedirectModel::FullNat => family.host_sandbox_side(),
        };
        let client = UdpClient::bind(lab.lab.attacker.name(), family).unwrap();
        let mut ports = Vec::new();
        for i in 0..3 {
            let ex = client
                .ask(dns, &format!("query{i}"), OK_TIMEOUT)
                .unwrap_or_else(|e| panic!("{ctx}: request {i}: {e}\n{}", agent.diagnostics()));
            check_reply!(
                &ex,
                "sandbox",
                SANDBOX_DNS_PORT,
                seen,
                agent.diagnostics(),
                "{ctx}: request {i}"
            );
            assert_eq!(ex.remote, dns, "{ctx}: the answer's source");
            ports.push(ex.reply.peer.port());
        }
        ports.dedup();
        assert_eq!(
            ports.len(),
            1,
            "{ctx}: one socket, several flows: {ports:?}"
        );
        if model == RedirectModel::PreserveSource {
            assert_eq!(ports[0], client.local.port(), "{ctx}");
        }
        let flow = agent
            .wait_flow(OK_TIMEOUT, |f| {
                f.proto == "udp" && f.attacker == sock(family.attacker(), client.local.port())
            })
            .unwrap()
            .unwrap_or_else(|| panic!("{ctx}: no flow-log line\n{}", agent.diagnostics()));
        assert_eq!(flow.orig_dst, dns, "{ctx}: {flow:?}");
        assert_eq!(
            flow.target,
            sock(family.sandbox(), SANDBOX_DNS_PORT),
            "{ctx}: {flow:?}"
        );
        if model == RedirectModel::FullNat {
            assert_eq!(flow.nat, sock(seen, ports[0]), "{ctx}: {flow:?}");
        }

        let legit = UdpClient::bind(lab.lab.legit.name(), family).unwrap();
        let ex = legit.ask(dns, "legit", OK_TIMEOUT).unwrap();
        check_reply!(
            &ex,
            "host",
            DNS_PORT,
            family.legit(),
            agent.diagnostics(),
            "{ctx}: legit"
        );
    }
    assert_eq!(
        watch.leaks(),
        Vec::<String>::new(),
        "sandbox addresses reached the attacker"
    );
}

#[test]
fn udp_request_response_through_preserve_source() {
    udp_through_redirect(RedirectModel::PreserveSource);
}

#[test]
fn udp_request_response_through_full_nat() {
    udp_through_redirect(RedirectModel::FullNat);
}

/// `honeypot`: with no attacker entry at all, a source that is not allowlisted goes to the
/// sandbox on every port but the allowlisted ones; an allowlisted source always reaches the
/// real services.
#[test]
fn honeypot_sends_all_but_allowlisted_sources_and_ports_to_the_sandbox() {
    let lab = SandboxLab::new(RedirectModel::PreserveSource).unwrap();
    let _host = lab.host_services().unwrap();
    let _sandbox = lab.sandbox_services().unwrap();
    let extra = format!(
        "allowlist = [\"{}\", \"{}\"]\nhoneypot_allow_ports = [\"tcp/{SSH_PORT}\", \"udp/{DNS_PORT}\"]",
        Family::V4.legit(),
        Family::V6.legit()
    );
    let agent = SandboxAgent::start(&lab, &lab.config("honeypot", &extra)).unwrap();
    let (atk, legit) = (lab.lab.attacker.name(), lab.lab.legit.name());
    for family in Family::ALL {
        let web = sock(family.host(), WEB_PORT);
        let ssh = sock(family.host(), SSH_PORT);
        let dns = sock(family.host(), DNS_PORT);

        let ex = tcp_ask(atk, web, "web", OK_TIMEOUT)
            .unwrap()
            .unwrap_or_else(|e| {
                panic!("{family}: stranger to {web}: {e}\n{}", agent.diagnostics())
            });
        check_reply!(
            &ex,
            "sandbox",
            SANDBOX_WEB_PORT,
            family.attacker(),
            agent.diagnostics(),
            "{family}: stranger to a non-allowlisted port"
        );
        let ex = tcp_ask(atk, sock(family.host(), UNMAPPED_PORT), "other", OK_TIMEOUT)
            .unwrap()
            .unwrap_or_else(|e| {
                panic!(
                    "{family}: stranger to {UNMAPPED_PORT}: {e}\n{}",
                    agent.diagnostics()
                )
            });
        check_reply!(
            &ex,
            "sandbox",
            SANDBOX_SSH_PORT,
            family.attacker(),
            agent.diagnostics(),
            "{family}: stranger to the default target"
        );
        let ex = tcp_ask(atk, ssh, "ssh", OK_TIMEOUT)
            .unwrap()
            .unwrap_or_else(|e| {
                panic!("{family}: stranger to {ssh}: {e}\n{}", agent.diagnostics())
            });
        check_reply!(
            &ex,
            "host",
            SSH_PORT,
            family.attacker(),
            agent.diagnostics(),
            "{family}: stranger to an allowlisted port"
        );
        let ex = UdpClient::bind(atk, family)
            .unwrap()
            .ask(dns, "q", OK_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "{family}: stranger to udp {dns}: {e}\n{}",
                    agent.diagnostics()
                )
            });
        check_reply!(
            &ex,
            "host",
            DNS_PORT,
            family.attacker(),
            agent.diagnostics(),
            "{family}: stranger to an allowlisted udp port"
        );

        for dst in [web, ssh] {
            let ex = tcp_ask(legit, dst, "legit", OK_TIMEOUT)
                .unwrap()
                .unwrap_or_else(|e| {
                    panic!(
                        "{family}: allowlisted to {dst}: {e}\n{}",
                        agent.diagnostics()
                    )
                });
            check_reply!(
                &ex,
                "host",
                dst.port(),
                family.legit(),
                agent.diagnostics(),
                "{family}: allowlisted source to {dst}"
            );
        }
    }
}

/// `reflect`: the attacker's connection to our port P is answered by its own listener on P
/// (which sees the connection come from the host); the legitimate client is untouched; and a
/// UDP flood well over the cap is reflected at no more than the cap.
#[test]
fn reflect_turns_the_attacker_back_on_itself_within_the_rate_cap() {
    let lab = SandboxLab::new(RedirectModel::PreserveSource).unwrap();
    let _host = lab.host_services().unwrap();
    let own = lab.attacker_self_service().unwrap();
    let extra = format!("reflect_pps = {REFLECT_PPS}");
    let agent = SandboxAgent::start(&lab, &lab.config("reflect", &extra)).unwrap();
    let (atk, legit) = (lab.lab.attacker.name(), lab.lab.legit.name());

    for family in Family::ALL {
        let p = sock(family.host(), REFLECT_PORT);
        // Not blocked yet: nothing listens on P on the host.
        let r = tcp_ask(atk, p, "x", FAIL_TIMEOUT).unwrap();
        assert!(
            r.as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
            "{family}: before the block: {r:?}"
        );
        agent.block(family.attacker(), None).unwrap();
        let ex = tcp_ask(atk, p, "self", OK_TIMEOUT)
            .unwrap()
            .unwrap_or_else(|e| {
                panic!("{family}: reflected connect: {e}\n{}", agent.diagnostics())
            });
        check_reply!(
            &ex,
            "attacker-self",
            REFLECT_PORT,
            family.host(),
            agent.diagnostics(),
            "{family}: reflected connection"
        );
        assert_eq!(ex.remote, p, "{family}: the attacker's peer");
        let flow = agent
            .wait_flow(OK_TIMEOUT, |f| f.attacker == ex.local)
            .unwrap()
            .unwrap_or_else(|| panic!("{family}: no flow-log line\n{}", agent.diagnostics()));
        assert_eq!(flow.kind, "reflect", "{flow:?}");
        assert_eq!(
            flow.target,
            sock(family.attacker(), REFLECT_PORT),
            "{flow:?}"
        );
        assert_eq!(flow.nat, ex.reply.peer, "{flow:?}");

        let ex = tcp_ask(legit, sock(family.host(), SSH_PORT), "legit", OK_TIMEOUT)
            .unwrap()
            .unwrap();
        check_reply!(
            &ex,
            "host",
            SSH_PORT,
            family.legit(),
            agent.diagnostics(),
            "{family}: legit"
        );
        let r = tcp_ask(legit, p, "x", FAIL_TIMEOUT).unwrap();
        assert!(
            r.as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
            "{family}: legit to P must not be reflected: {r:?}"
        );
    }

    // Let the rate window of the exchanges above pass, then flood at 10× the cap for 2 s.
    thread::sleep(Duration::from_millis(1100));
    let limited_before = agent
        .global()
        .unwrap()
        .get("reflect_limited")
        .copied()
        .unwrap_or(0);
    let before = own.udp_received();
    let client = UdpClient::bind(atk, Family::V4).unwrap();
    let (sent, took) = client.flood(
        sock(Family::V4.host(), REFLECT_PORT),
        u32::try_from(REFLECT_PPS * 10).unwrap(),
        Duration::from_secs(2),
    );
    thread::sleep(Duration::from_millis(300));
    let reflected = own.udp_received() - before;
    let global = agent.global().unwrap();
    let limited = global.get("reflect_limited").copied().unwrap_or(0) - limited_before;
    // Two one-second windows, plus slack for the window that opens as the flood ends.
    let cap = REFLECT_PPS * 2 + REFLECT_PPS / 5;
    assert!(
        sent >= REFLECT_PPS * 15,
        "the flood was too small: {sent} in {took:?}"
    );
    assert!(
        reflected <= cap,
        "reflected {reflected} of {sent} datagrams in {took:?}, cap {cap}\n{}",
        agent.diagnostics()
    );
    assert!(
        reflected >= REFLECT_PPS,
        "reflected only {reflected} of {sent} datagrams in {took:?}\n{}",
        agent.diagnostics()
    );
    assert!(limited > 0, "reflect_limited did not grow: {global:?}");
}

/// Per-attacker actions override the mode's default: in `firewall` mode an entry with
/// `--action redirect` goes to the sandbox while a plain entry is dropped.
#[test]
fn per_attacker_action_overrides_the_mode() {
    let lab = SandboxLab::new(RedirectModel::PreserveSource).unwrap();
    let _host = lab.host_services().unwrap();
    let _sandbox = lab.sandbox_services().unwrap();
    let agent = SandboxAgent::start(&lab, &lab.config("firewall", "")).unwrap();
    let atk = lab.lab.attacker.name();
    agent
        .block(Family::V4.attacker(), Some("redirect"))
        .unwrap();
    agent.block(Family::V6.attacker(), None).unwrap();

    let ex = tcp_ask(atk, sock(Family::V4.host(), SSH_PORT), "x", OK_TIMEOUT)
        .unwrap()
        .unwrap_or_else(|e| panic!("redirect override: {e}\n{}", agent.diagnostics()));
    check_reply!(
        &ex,
        "sandbox",
        SANDBOX_SSH_PORT,
        Family::V4.attacker(),
        agent.diagnostics(),
        "redirect override in firewall mode"
    );
    let r = tcp_ask(atk, sock(Family::V6.host(), SSH_PORT), "x", FAIL_TIMEOUT).unwrap();
    assert!(
        r.as_ref().is_err_and(|e| e.kind() == ErrorKind::TimedOut),
        "the plain entry must be dropped: {r:?}"
    );
    let ex = tcp_ask(
        lab.lab.legit.name(),
        sock(Family::V4.host(), SSH_PORT),
        "legit",
        OK_TIMEOUT,
    )
    .unwrap()
    .unwrap();
    check_reply!(
        &ex,
        "host",
        SSH_PORT,
        Family::V4.legit(),
        agent.diagnostics(),
        "legit"
    );
}

/// A closed sandbox port refuses the redirected attacker as if the host did: the reset comes
/// back through the reverse rewrite, and the ICMP port-unreachable error about the UDP flow is
/// rewritten with the header it quotes (the attacker's connected socket reports the refusal
/// only if that header names its own flow). The host does serve that port, so a refusal can
/// only come from the sandbox; and no frame names the sandbox link.
#[test]
fn closed_sandbox_port_refuses_as_the_host() {
    for model in [RedirectModel::PreserveSource, RedirectModel::FullNat] {
        let lab = SandboxLab::new(model).unwrap();
        let _host = lab.host_services().unwrap();
        let atk = lab.lab.attacker.name();
        let watch = LeakWatch::start(atk).unwrap();
        let agent = SandboxAgent::start(&lab, &lab.config("unreal", "")).unwrap();
        for family in Family::ALL {
            let ctx = format!("{} {family}", model.name());
            let dst = sock(family.host(), CLOSED_PORT);
            let ex = udp_connected_ask(lab.lab.legit.name(), dst, "legit", OK_TIMEOUT)
                .unwrap()
                .unwrap();
            check_reply!(
                &ex,
                "host",
                CLOSED_PORT,
                family.legit(),
                agent.diagnostics(),
                "{ctx}: legit udp"
            );
            agent.block(family.attacker(), None).unwrap();
            let r = udp_connected_ask(atk, dst, "knock", OK_TIMEOUT).unwrap();
            assert!(
                r.as_ref()
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
                "{ctx}: udp to a closed sandbox port: {r:?}\n{}",
                agent.diagnostics()
            );
            let r = tcp_ask(atk, dst, "knock", OK_TIMEOUT).unwrap();
            assert!(
                r.as_ref()
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
                "{ctx}: tcp to a closed sandbox port: {r:?}\n{}",
                agent.diagnostics()
            );
            // The refusals came from the sandbox: the flow log has both flows.
            for proto in ["udp", "tcp"] {
                let target = sock(family.sandbox(), SANDBOX_CLOSED_PORT);
                let flow = agent
                    .wait_flow(OK_TIMEOUT, |f| f.proto == proto && f.target == target)
                    .unwrap();
                assert!(
                    flow.is_some(),
                    "{ctx}: no {proto} flow to the closed port\n{}",
                    agent.diagnostics()
                );
            }
        }
        let global = agent.global().unwrap();
        assert!(
            global.get("icmp_rewritten").copied().unwrap_or(0) >= 2,
            "{}: {global:?}",
            model.name()
        );
        assert_eq!(
            watch.leaks(),
            Vec::<String>::new(),
            "{}: sandbox addresses reached the attacker",
            model.name()
        );
    }
}

/// A redirected connection stays in the sandbox after its attacker entry expires (the expiry
/// is checked in the kernel, with no agent action); new connections then reach the host.
#[test]
fn redirected_connection_outlives_its_attacker_entry() {
    let lab = SandboxLab::new(RedirectModel::PreserveSource).unwrap();
    let _host = lab.host_services().unwrap();
    let _sandbox = lab.sandbox_services().unwrap();
    let agent = SandboxAgent::start(&lab, &lab.config("unreal", "")).unwrap();
    let atk = lab.lab.attacker.name();
    let ttl = Duration::from_secs(2);
    let mut sessions = Vec::new();
    for family in Family::ALL {
        agent.block_for(family.attacker(), ttl).unwrap();
        let ssh = sock(family.host(), SSH_PORT);
        let mut s = Session::open(atk, ssh, OK_TIMEOUT).unwrap().unwrap();
        let ex = s.ask("flagged", OK_TIMEOUT).unwrap();
        check_reply!(
            &ex,
            "sandbox",
            SANDBOX_SSH_PORT,
            family.attacker(),
            agent.diagnostics(),
            "{family}: while flagged"
        );
        sessions.push((family, s));
    }
    thread::sleep(ttl + Duration::from_millis(500));
    for (family, mut s) in sessions {
        let ex = s.ask("expired", OK_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "{family}: redirected connection broke on expiry: {e}\n{}",
                agent.diagnostics()
            )
        });
        check_reply!(
            &ex,
            "sandbox",
            SANDBOX_SSH_PORT,
            family.attacker(),
            agent.diagnostics(),
            "{family}: after expiry, same connection"
        );
        let ex = tcp_ask(atk, sock(family.host(), SSH_PORT), "new", OK_TIMEOUT)
            .unwrap()
            .unwrap();
        check_reply!(
            &ex,
            "host",
            SSH_PORT,
            family.attacker(),
            agent.diagnostics(),
            "{family}: after expiry, new connection"
        );
    }
}

/// Flow-log lines parse as the agent's contract says.
#[test]
fn flow_log_line_format() {
    let line = r#"{"kind":"redirect","model":"full-nat","proto":"tcp","attacker":"[fd6d:6972:6167:65::3]:40000","orig_dst":"[fd6d:6972:6167:65::1]:22","target":"[fd6d:6972:6167:66::2]:2222","nat":"[fd6d:6972:6167:66::1]:20001","ts_ns":5}"#;
    let f: FlowLogLine = serde_json::from_str(line).unwrap();
    assert_eq!(f.attacker, "[fd6d:6972:6167:65::3]:40000".parse().unwrap());
    assert_eq!(f.nat.port(), 20001);
}
