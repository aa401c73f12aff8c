//! Redirect and reflect through the real programs with `BPF_PROG_TEST_RUN`: each row runs the
//! XDP decision and then the TC rewrite over one frame, compares the TC output with the frame
//! expected byte for byte, and recomputes every IP/TCP/UDP/ICMP checksum of the output from
//! scratch. Rows run in order: replies find the flow entries that earlier rows created.
//!
//! The rows run in a network namespace of their own with no routes, so the FIB lookup after a
//! rewrite finds nothing and the program hands the packet to the stack (`TC_ACT_OK`): the
//! bytes are what is checked here; forwarding is the namespace tests' job.

#![allow(
    clippy::unwrap_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent::addr::Net;
use agent_common::{
    Action, AttackerEntry, DataPathConfig, Mode, PortKey, RedirectModel, Target, TargetKey, family,
};
use tests::{
    netns::Netns,
    object::Object,
    packet::{ACK, ETH_P_IP, L4, SYN, V4Opts, eth, eth_v4, eth_v6, ipv4, ipv6, verify_checksums},
    probe::in_netns,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

const HOST4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ATTACKER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 66);
const LEGIT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SANDBOX4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const SNAT4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
fn host6() -> Ipv6Addr {
    "2001:db8::1".parse().unwrap()
}
fn attacker6() -> Ipv6Addr {
    "2001:db8::66".parse().unwrap()
}
fn sandbox6() -> Ipv6Addr {
    "2001:db8:1::2".parse().unwrap()
}
fn snat6() -> Ipv6Addr {
    "2001:db8:1::1".parse().unwrap()
}

fn addr16(ip: IpAddr) -> [u8; 16] {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v) => a[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => a = v.octets(),
    }
    a
}

/// Loads the object and configures a mode, a model, and sandbox targets: TCP 22 → sandbox 2222,
/// everything else → the sandbox on the same port, for both families.
fn object(mode: Mode, model: RedirectModel) -> Object {
    let mut obj = Object::load().unwrap();
    let cfg = DataPathConfig {
        mode: mode as u8,
        flags: DataPathConfig::ENABLED,
        model: model as u8,
        _pad0: 0,
        reflect_pps: 1000,
        nat_port_min: 20000,
        nat_port_max: 20003,
        snat_v4: SNAT4.octets(),
        snat_v6: snat6().octets(),
    };
    obj.maps.set_config(&cfg).unwrap();
    for (fam, sandbox) in [
        (family::V4, IpAddr::V4(SANDBOX4)),
        (family::V6, IpAddr::V6(sandbox6())),
    ] {
        let t = |port| Target {
            addr: addr16(sandbox),
            port,
            _pad: [0; 2],
        };
        let k = |port, proto| TargetKey {
            port,
            proto,
            family: fam,
        };
        obj.maps.set_target(k(22, 6), t(2222)).unwrap();
        obj.maps.set_target(k(0, 6), t(0)).unwrap();
        obj.maps.set_target(k(0, 17), t(0)).unwrap();
    }
    obj
}

fn host(ip: IpAddr) -> Net {
    ip.to_string().parse().unwrap()
}

fn block(obj: &mut Object, who: IpAddr, action: Action) {
    obj.maps
        .block(host(who), AttackerEntry::new(action, 0))
        .unwrap();
}

/// Runs XDP then TC over `frame`; checks the XDP verdict, the TC verdict, the output bytes
/// against `expected`, and every checksum of the output.
fn step(obj: &mut Object, desc: &str, frame: &[u8], xdp: u32, expected: &[u8]) {
    let x = obj.run(agent_common::programs::XDP, frame, 1).unwrap();
    assert_eq!(x.action, xdp, "{desc}: xdp verdict");
    if xdp == XDP_DROP {
        return;
    }
    let t = obj.run_tc(frame).unwrap();
    assert_eq!(t.action, TC_ACT_OK, "{desc}: tc verdict");
    if t.output != expected {
        panic!(
            "{desc}: output differs\n got      {}\n expected {}",
            hex(&t.output),
            hex(expected)
        );
    }
    // A rewritten packet must leave with every checksum right; one left alone is the input,
    // malformed inputs included.
    if expected != frame {
        verify_checksums(&t.output).unwrap_or_else(|e| panic!("{desc}: bad {e}"));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    eth_v4(src, dst, L4::tcp(sport, dport, flags, b""))
}
fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    eth_v4(src, dst, L4::udp(sport, dport, b"\x12\x34 dns-like query"))
}
fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    eth_v6(src, dst, L4::tcp(sport, dport, flags, b""))
}
fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    eth_v6(src, dst, L4::udp(sport, dport, b"\x12\x34 dns-like query"))
}

/// Runs `f` in a fresh, route-less network namespace (see the module docs).
fn isolated(f: impl FnOnce() + Send) {
    let ns = Netns::new(&format!("mirage-{}-fix", tests::netns::unique_tag())).unwrap();
    in_netns(ns.name(), f).unwrap();
}

#[test]
fn preserve_source_ipv4_and_ipv6() {
    isolated(|| {
        let mut obj = object(Mode::Unreal, RedirectModel::PreserveSource);
        block(&mut obj, ATTACKER4.into(), Action::Default);
        block(&mut obj, attacker6().into(), Action::Default);
        // TCP, IPv4: SYN to the real port 22 goes to the sandbox's 2222; replies come back
        // from the protected host's address and port.
        step(
            &mut obj,
            "v4 syn redirected",
            &tcp4(ATTACKER4, 40000, HOST4, 22, SYN),
            XDP_PASS,
            &tcp4(ATTACKER4, 40000, SANDBOX4, 2222, SYN),
        );
        step(
            &mut obj,
            "v4 syn-ack rewritten back",
            &tcp4(SANDBOX4, 2222, ATTACKER4, 40000, SYN | ACK),
            XDP_PASS,
            &tcp4(HOST4, 22, ATTACKER4, 40000, SYN | ACK),
        );
        step(
            &mut obj,
            "v4 ack follows the flow",
            &tcp4(ATTACKER4, 40000, HOST4, 22, ACK),
            XDP_PASS,
            &tcp4(ATTACKER4, 40000, SANDBOX4, 2222, ACK),
        );
        let unknown = tcp4(ATTACKER4, 40001, HOST4, 22, ACK);
        step(
            &mut obj,
            "v4 non-syn of an unknown flow is not redirected",
            &unknown,
            XDP_PASS,
            &unknown,
        );
        let legit = tcp4(LEGIT4, 40000, HOST4, 22, SYN);
        step(&mut obj, "v4 legit syn untouched", &legit, XDP_PASS, &legit);
        // UDP, IPv4, default target keeps the port.
        step(
            &mut obj,
            "v4 udp redirected",
            &udp4(ATTACKER4, 5353, HOST4, 53),
            XDP_PASS,
            &udp4(ATTACKER4, 5353, SANDBOX4, 53),
        );
        step(
            &mut obj,
            "v4 udp reply",
            &udp4(SANDBOX4, 53, ATTACKER4, 5353),
            XDP_PASS,
            &udp4(HOST4, 53, ATTACKER4, 5353),
        );
        // UDP without a checksum stays without one.
        let mut nocsum = udp4(ATTACKER4, 5354, HOST4, 53);
        nocsum[14 + 20 + 6] = 0;
        nocsum[14 + 20 + 7] = 0;
        let mut nocsum_out = udp4(ATTACKER4, 5354, SANDBOX4, 53);
        nocsum_out[14 + 20 + 6] = 0;
        nocsum_out[14 + 20 + 7] = 0;
        step(
            &mut obj,
            "v4 udp checksum 0 stays 0",
            &nocsum,
            XDP_PASS,
            &nocsum_out,
        );
        // IPv6.
        let (a6, h6, s6) = (attacker6(), host6(), sandbox6());
        step(
            &mut obj,
            "v6 syn redirected",
            &tcp6(a6, 40000, h6, 22, SYN),
            XDP_PASS,
            &tcp6(a6, 40000, s6, 2222, SYN),
        );
        step(
            &mut obj,
            "v6 syn-ack rewritten back",
            &tcp6(s6, 2222, a6, 40000, SYN | ACK),
            XDP_PASS,
            &tcp6(h6, 22, a6, 40000, SYN | ACK),
        );
        step(
            &mut obj,
            "v6 udp redirected",
            &udp6(a6, 5353, h6, 53),
            XDP_PASS,
            &udp6(a6, 5353, s6, 53),
        );
        step(
            &mut obj,
            "v6 udp reply",
            &udp6(s6, 53, a6, 5353),
            XDP_PASS,
            &udp6(h6, 53, a6, 5353),
        );

        // ICMP errors from the sandbox about the UDP flow quote the sandbox's address; the
        // attacker must see the protected host's instead.
        let quoted = ipv4(
            ATTACKER4,
            SANDBOX4,
            L4::udp(5353, 53, b"\x12\x34 dns-like query"),
            &V4Opts::default(),
        );
        let err = eth_v4(SANDBOX4, ATTACKER4, L4::icmp_error(3, 3, &quoted));
        let quoted_out = ipv4(
            ATTACKER4,
            HOST4,
            L4::udp(5353, 53, b"\x12\x34 dns-like query"),
            &V4Opts::default(),
        );
        let mut expected = eth_v4(HOST4, ATTACKER4, L4::icmp_error(3, 3, &quoted_out));
        // The quoted UDP checksum is left as it was (documented in icmp.rs): copy it over.
        let q = 14 + 20 + 8 + 20 + 6;
        expected[q..q + 2].copy_from_slice(&err[q..q + 2]);
        fix_icmp_checksum(&mut expected, 14 + 20);
        step(
            &mut obj,
            "v4 icmp port unreachable from the sandbox",
            &err,
            XDP_PASS,
            &expected,
        );

        let quoted6 = ipv6(a6, s6, &[], L4::udp(5353, 53, b"\x12\x34 dns-like query"));
        let err6 = eth_v6(s6, a6, L4::icmpv6_error(1, 4, &quoted6));
        let quoted6_out = ipv6(a6, h6, &[], L4::udp(5353, 53, b"\x12\x34 dns-like query"));
        let mut expected6 = eth_v6(h6, a6, L4::icmpv6_error(1, 4, &quoted6_out));
        let q6 = 14 + 40 + 8 + 40 + 6;
        expected6[q6..q6 + 2].copy_from_slice(&err6[q6..q6 + 2]);
        fix_icmpv6_checksum(&mut expected6);
        step(
            &mut obj,
            "v6 icmp port unreachable from the sandbox",
            &err6,
            XDP_PASS,
            &expected6,
        );

        let g = obj.maps.global().unwrap();
        assert_eq!(g["flow_new"], 5, "flows created: {g:?}");
        assert_eq!(g["icmp_rewritten"], 2);
        assert!(g["not_new_flow"] >= 1);
        // Ten packets of redirected flows, both directions; the ICMP errors come from the
        // sandbox, which is no attacker, and count as passed.
        assert_eq!(g["redirect"], 10);
    });
}

/// Recomputes the ICMPv4 checksum of a frame (for expected frames whose quoted bytes were
/// patched after building).
fn fix_icmp_checksum(f: &mut [u8], l4: usize) {
    f[l4 + 2] = 0;
    f[l4 + 3] = 0;
    let c = tests::packet::checksum(&f[l4..]);
    f[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
}

fn fix_icmpv6_checksum(f: &mut [u8]) {
    let l4 = 14 + 40;
    f[l4 + 2] = 0;
    f[l4 + 3] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[14 + 8..14 + 40]);
    pseudo.extend_from_slice(&((f.len() - l4) as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let acc = tests::packet::sum16(&pseudo, 0);
    let c = !(tests::packet::sum16(&f[l4..], acc) as u16);
    f[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn full_nat_allocates_ports_and_maps_replies_back() {
    isolated(|| {
        let mut obj = object(Mode::Unreal, RedirectModel::FullNat);
        block(&mut obj, ATTACKER4.into(), Action::Redirect);
        block(&mut obj, attacker6().into(), Action::Redirect);
        // The NAT port is chosen in the kernel: read it from the output, then check all else.
        let mut ports = Vec::new();
        for sport in [40000u16, 40001, 40002, 40003] {
            let syn = tcp4(ATTACKER4, sport, HOST4, 22, SYN);
            let x = obj.run(agent_common::programs::XDP, &syn, 1).unwrap();
            assert_eq!(x.action, XDP_PASS);
            let t = obj.run_tc(&syn).unwrap();
            let out = &t.output;
            let nat_port = u16::from_be_bytes([out[34], out[35]]);
            assert!((20000..=20003).contains(&nat_port), "nat port {nat_port}");
            assert!(!ports.contains(&nat_port), "nat port {nat_port} reused");
            ports.push(nat_port);
            assert_eq!(
                out,
                &tcp4(SNAT4, nat_port, SANDBOX4, 2222, SYN),
                "v4 syn {sport}"
            );
            verify_checksums(out).unwrap();
            step(
                &mut obj,
                "v4 full-nat reply",
                &tcp4(SANDBOX4, 2222, SNAT4, nat_port, SYN | ACK),
                XDP_PASS,
                &tcp4(HOST4, 22, ATTACKER4, sport, SYN | ACK),
            );
        }
        // Four ports, four flows: a fifth finds none free and is dropped, not leaked.
        let t = obj.run_tc(&tcp4(ATTACKER4, 40004, HOST4, 22, SYN)).unwrap();
        assert_eq!(t.action, 2, "TC_ACT_SHOT when the NAT range is exhausted");
        assert_eq!(obj.maps.global().unwrap()["nat_exhausted"], 1);

        let (a6, h6, s6, n6) = (attacker6(), host6(), sandbox6(), snat6());
        let syn = udp6(a6, 5353, h6, 53);
        obj.run(agent_common::programs::XDP, &syn, 1).unwrap();
        let t = obj.run_tc(&syn).unwrap();
        let l4 = 14 + 40;
        let nat_port = u16::from_be_bytes([t.output[l4], t.output[l4 + 1]]);
        assert_eq!(t.output, udp6(n6, nat_port, s6, 53));
        verify_checksums(&t.output).unwrap();
        step(
            &mut obj,
            "v6 full-nat udp reply",
            &udp6(s6, 53, n6, nat_port),
            XDP_PASS,
            &udp6(h6, 53, a6, 5353),
        );

        // IPv6 TCP and IPv4 UDP under full-nat.
        let syn6 = tcp6(a6, 41000, h6, 22, SYN);
        obj.run(agent_common::programs::XDP, &syn6, 1).unwrap();
        let t = obj.run_tc(&syn6).unwrap();
        let p6 = u16::from_be_bytes([t.output[l4], t.output[l4 + 1]]);
        assert_eq!(t.output, tcp6(n6, p6, s6, 2222, SYN));
        verify_checksums(&t.output).unwrap();
        step(
            &mut obj,
            "v6 full-nat tcp reply",
            &tcp6(s6, 2222, n6, p6, SYN | ACK),
            XDP_PASS,
            &tcp6(h6, 22, a6, 41000, SYN | ACK),
        );
        // The four IPv4 ports went to TCP toward sandbox port 2222; the reverse key holds the
        // sandbox port, so UDP toward port 53 can use them again.
        let q = udp4(ATTACKER4, 5353, HOST4, 53);
        obj.run(agent_common::programs::XDP, &q, 1).unwrap();
        let t = obj.run_tc(&q).unwrap();
        let p4 = u16::from_be_bytes([t.output[34], t.output[35]]);
        assert_eq!(t.output, udp4(SNAT4, p4, SANDBOX4, 53));
        verify_checksums(&t.output).unwrap();
        step(
            &mut obj,
            "v4 full-nat udp reply",
            &udp4(SANDBOX4, 53, SNAT4, p4),
            XDP_PASS,
            &udp4(HOST4, 53, ATTACKER4, 5353),
        );

        // An ICMP error from the sandbox about the full-nat UDP flow: the attacker must see it
        // come from the protected host, about its own socket, with no NAT or sandbox address.
        let payload = b"\x12\x34 dns-like query";
        let quoted = ipv4(
            SNAT4,
            SANDBOX4,
            L4::udp(p4, 53, payload),
            &V4Opts::default(),
        );
        let err = eth_v4(SANDBOX4, SNAT4, L4::icmp_error(3, 3, &quoted));
        let quoted_out = ipv4(
            ATTACKER4,
            HOST4,
            L4::udp(5353, 53, payload),
            &V4Opts::default(),
        );
        let mut expected = eth_v4(HOST4, ATTACKER4, L4::icmp_error(3, 3, &quoted_out));
        let q_csum = 14 + 20 + 8 + 20 + 6;
        expected[q_csum..q_csum + 2].copy_from_slice(&err[q_csum..q_csum + 2]);
        fix_icmp_checksum(&mut expected, 14 + 20);
        step(
            &mut obj,
            "v4 full-nat icmp error from the sandbox",
            &err,
            XDP_PASS,
            &expected,
        );
    });
}

#[test]
fn reflect_turns_the_connection_back() {
    isolated(|| {
        let mut obj = object(Mode::Reflect, RedirectModel::PreserveSource);
        block(&mut obj, ATTACKER4.into(), Action::Default);
        step(
            &mut obj,
            "v4 syn reflected to the attacker's own port",
            &tcp4(ATTACKER4, 40000, HOST4, 80, SYN),
            XDP_PASS,
            &tcp4(HOST4, 40000, ATTACKER4, 80, SYN),
        );
        step(
            &mut obj,
            "the attacker's own syn-ack goes back to its client",
            &tcp4(ATTACKER4, 80, HOST4, 40000, SYN | ACK),
            XDP_PASS,
            &tcp4(HOST4, 80, ATTACKER4, 40000, SYN | ACK),
        );
        step(
            &mut obj,
            "v4 udp reflected",
            &udp4(ATTACKER4, 5353, HOST4, 53),
            XDP_PASS,
            &udp4(HOST4, 5353, ATTACKER4, 53),
        );
        block(&mut obj, attacker6().into(), Action::Default);
        step(
            &mut obj,
            "v6 syn reflected",
            &tcp6(attacker6(), 40000, host6(), 80, SYN),
            XDP_PASS,
            &tcp6(host6(), 40000, attacker6(), 80, SYN),
        );
        step(
            &mut obj,
            "v6 the attacker's own syn-ack goes back",
            &tcp6(attacker6(), 80, host6(), 40000, SYN | ACK),
            XDP_PASS,
            &tcp6(host6(), 80, attacker6(), 40000, SYN | ACK),
        );
        step(
            &mut obj,
            "v6 udp reflected",
            &udp6(attacker6(), 5353, host6(), 53),
            XDP_PASS,
            &udp6(host6(), 5353, attacker6(), 53),
        );
        step(
            &mut obj,
            "v6 the attacker's own udp answer goes back",
            &udp6(attacker6(), 53, host6(), 5353),
            XDP_PASS,
            &udp6(host6(), 53, attacker6(), 5353),
        );
        let g = obj.maps.global().unwrap();
        assert_eq!(g["reflect"], 7);
        assert_eq!(g["flow_new"], 4);

        // A cap of 0 switches reflection off: the packet reaches the real service untouched.
        let mut cfg = obj.maps.config().unwrap();
        cfg.reflect_pps = 0;
        obj.maps.set_config(&cfg).unwrap();
        let syn = tcp4(ATTACKER4, 40010, HOST4, 80, SYN);
        step(&mut obj, "reflection disabled", &syn, XDP_PASS, &syn);
        assert_eq!(obj.maps.global().unwrap()["reflect_disabled"], 1);
    });
}

#[test]
fn reflect_cap_drops_in_xdp() {
    isolated(|| {
        let mut obj = object(Mode::Reflect, RedirectModel::PreserveSource);
        let mut cfg = obj.maps.config().unwrap();
        cfg.reflect_pps = 5;
        obj.maps.set_config(&cfg).unwrap();
        block(&mut obj, ATTACKER4.into(), Action::Default);
        let mut passed = 0;
        for i in 0..20u16 {
            let r = obj
                .run(
                    agent_common::programs::XDP,
                    &udp4(ATTACKER4, 6000 + i, HOST4, 53),
                    1,
                )
                .unwrap();
            if r.action == XDP_PASS {
                passed += 1;
            }
        }
        // Twenty packets within far less than a second: five pass, the rest are dropped.
        assert_eq!(passed, 5);
        assert_eq!(obj.maps.global().unwrap()["reflect_limited"], 15);
    });
}

#[test]
fn honeypot_redirects_everyone_but_allowlisted_sources_and_ports() {
    isolated(|| {
        let mut obj = object(Mode::Honeypot, RedirectModel::PreserveSource);
        obj.maps
            .allow_port(PortKey {
                port: 443,
                proto: 6,
                _pad: 0,
            })
            .unwrap();
        obj.maps.allow(host(IpAddr::V4(LEGIT4))).unwrap();
        let anyone = Ipv4Addr::new(198, 18, 0, 77);
        step(
            &mut obj,
            "stranger to port 22 goes to the sandbox",
            &tcp4(anyone, 40000, HOST4, 22, SYN),
            XDP_PASS,
            &tcp4(anyone, 40000, SANDBOX4, 2222, SYN),
        );
        let https = tcp4(anyone, 40001, HOST4, 443, SYN);
        step(
            &mut obj,
            "stranger to an allowlisted port reaches the real service",
            &https,
            XDP_PASS,
            &https,
        );
        let legit = tcp4(LEGIT4, 40000, HOST4, 22, SYN);
        step(
            &mut obj,
            "allowlisted source always reaches the real service",
            &legit,
            XDP_PASS,
            &legit,
        );
    });
}

#[test]
fn truncated_and_fragmented_packets_are_never_rewritten() {
    isolated(|| {
        let mut obj = object(Mode::Unreal, RedirectModel::PreserveSource);
        block(&mut obj, ATTACKER4.into(), Action::Default);
        let frag = eth(
            &[],
            ETH_P_IP,
            &ipv4(
                ATTACKER4,
                HOST4,
                L4::raw(17, &[0xab; 24]),
                &V4Opts {
                    frag_offset: 10,
                    ..V4Opts::default()
                },
            ),
        );
        step(&mut obj, "non-first fragment", &frag, XDP_PASS, &frag);
        let short = eth_v4(ATTACKER4, HOST4, L4::tcp(40000, 22, SYN, b"").truncated(10));
        step(&mut obj, "truncated tcp", &short, XDP_PASS, &short);
        let icmp = eth_v4(ATTACKER4, HOST4, L4::icmp_echo(1, 1));
        step(
            &mut obj,
            "icmp echo from an attacker is not redirected",
            &icmp,
            XDP_PASS,
            &icmp,
        );
    });
}
