//! Packet fixtures through the real XDP program with `BPF_PROG_TEST_RUN`.
//!
//! One table, one map state. Each row gives a description, the input frame, the expected XDP
//! action, the expected output bytes (the input, unchanged, for pass and drop), and the expected
//! change of every global counter; rows whose source can be parsed also check the per-source
//! counters. Counters not named in a row must not move.

#![allow(
    clippy::unwrap_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agent::{addr::Net, clock};
use agent_common::{Action, AttackerEntry, Counter, Mode};
use tests::{
    object::Object,
    packet::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Ext, GRE, L4, SYN, V4Opts, eth,
        eth_v4, eth_v6, ipv4, ipv6,
    },
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

// Addresses (never on a wire: these frames exist only inside BPF_PROG_TEST_RUN).
const HOST4: &str = "198.18.0.1";
const HOST6: &str = "2001:db8::1";
const LEGIT4: &str = "198.18.0.2";
const LEGIT6: &str = "2001:db8::2";
const ATTACKER4: &str = "198.18.0.66";
const ATTACKER6: &str = "2001:db8::66";

struct Row {
    desc: &'static str,
    frame: Vec<u8>,
    action: u32,
    /// Counters that move by one besides the action's packet/byte counters.
    extra: &'static [Counter],
    /// Source whose per-source counter for the action must move by one.
    source: Option<IpAddr>,
}

fn row(
    desc: &'static str,
    frame: Vec<u8>,
    action: u32,
    extra: &'static [Counter],
    source: Option<&str>,
) -> Row {
    Row {
        desc,
        frame,
        action,
        extra,
        source: source.map(|s| s.parse().unwrap()),
    }
}

fn setup(obj: &mut Object) {
    let m = &mut obj.maps;
    let now = clock::boottime_ns();
    let hour = 3_600_000_000_000;
    let net = |s: &str| s.parse::<Net>().unwrap();
    m.set_mode(Mode::Firewall).unwrap();
    for a in ["198.18.1.0/24", "198.18.9.9", "2001:db8:1::5"] {
        m.allow(net(a)).unwrap();
    }
    let entries = [
        (ATTACKER4, Action::Drop, 0),
        (ATTACKER6, Action::Drop, 0),
        // Inside the allowlisted 198.18.1.0/24: the allowlist wins.
        ("198.18.1.5", Action::Drop, 0),
        ("198.18.0.67", Action::Drop, now - 1),
        ("2001:db8::67", Action::Drop, now - 1),
        ("198.18.0.68", Action::Default, 0),
        ("198.18.0.69", Action::Drop, now + hour),
        ("198.18.0.70", Action::Redirect, 0),
        // An exact exception inside a blocked range.
        ("198.18.9.10", Action::Pass, 0),
        ("198.18.9.0/24", Action::Drop, 0),
        ("2001:db8:1::/48", Action::Drop, 0),
        ("198.18.10.0/24", Action::Drop, now - 1),
    ];
    for (n, a, exp) in entries {
        m.block(net(n), AttackerEntry::new(a, exp)).unwrap();
    }
}

fn tcp_syn() -> L4 {
    L4::tcp(40000, 22, SYN, b"")
}
fn udp() -> L4 {
    L4::udp(40000, 53, b"mirage-udp")
}
fn v4_from(src: &str, l4: L4) -> Vec<u8> {
    eth_v4(v4(src), v4(HOST4), l4)
}
fn v6_from(src: &str, l4: L4) -> Vec<u8> {
    eth_v6(v6(src), v6(HOST6), l4)
}
fn v6_ext(src: &str, exts: &[Ext], l4: L4) -> Vec<u8> {
    eth(&[], ETH_P_IPV6, &ipv6(v6(src), v6(HOST6), exts, l4))
}
fn v4_opts(src: &str, l4: L4, opts: V4Opts) -> Vec<u8> {
    eth(&[], ETH_P_IP, &ipv4(v4(src), v4(HOST4), l4, &opts))
}

/// One more extension header than the parser walks.
const NINE_EXT_HEADERS: [Ext; 9] = [const { Ext::DstOpts(0) }; 9];

fn rows() -> Vec<Row> {
    use Counter::*;
    let ip4 = ipv4(v4(ATTACKER4), v4(HOST4), udp(), &V4Opts::default());
    let ip6 = ipv6(v6(ATTACKER6), v6(HOST6), &[], udp());
    let frag_first = V4Opts {
        more_fragments: true,
        ..V4Opts::default()
    };
    let frag_later = V4Opts {
        frag_offset: 185,
        ..V4Opts::default()
    };
    // Router Alert (RFC 2113) + NOP padding: a 24-byte header.
    let router_alert = V4Opts {
        options: vec![0x94, 0x04, 0x00, 0x00],
        ..V4Opts::default()
    };
    let long_options = V4Opts {
        options: vec![0x01; 12],
        ..V4Opts::default()
    };
    let mut bad_ihl = v4_from(ATTACKER4, udp());
    bad_ihl[14] = 0x44; // IHL 4 words: less than the minimum header
    let mut truncated_options = v4_from(ATTACKER4, udp());
    truncated_options[14] = 0x4f; // IHL 15 words: options run past the packet's end
    truncated_options.truncate(14 + 40);
    let mut wrong_version6 = v6_from(ATTACKER6, udp());
    wrong_version6[14] = 0x40;
    let mut wrong_version4 = v4_from(ATTACKER4, udp());
    wrong_version4[14] = 0x65;

    vec![
        // Plain protocols, both families.
        row(
            "ipv4 tcp syn from a legit client passes",
            v4_from(LEGIT4, tcp_syn()),
            XDP_PASS,
            &[],
            Some(LEGIT4),
        ),
        row(
            "ipv4 tcp syn from an attacker is dropped",
            v4_from(ATTACKER4, tcp_syn()),
            XDP_DROP,
            &[],
            Some(ATTACKER4),
        ),
        row(
            "ipv4 udp from a legit client passes",
            v4_from(LEGIT4, udp()),
            XDP_PASS,
            &[],
            Some(LEGIT4),
        ),
        row(
            "ipv4 udp from an attacker is dropped",
            v4_from(ATTACKER4, udp()),
            XDP_DROP,
            &[],
            Some(ATTACKER4),
        ),
        row(
            "icmp echo from a legit client passes",
            v4_from(LEGIT4, L4::icmp_echo(7, 1)),
            XDP_PASS,
            &[],
            Some(LEGIT4),
        ),
        row(
            "icmp echo from an attacker is dropped",
            v4_from(ATTACKER4, L4::icmp_echo(7, 1)),
            XDP_DROP,
            &[],
            Some(ATTACKER4),
        ),
        row(
            "ipv6 tcp syn from a legit client passes",
            v6_from(LEGIT6, tcp_syn()),
            XDP_PASS,
            &[],
            Some(LEGIT6),
        ),
        row(
            "ipv6 tcp syn from an attacker is dropped",
            v6_from(ATTACKER6, tcp_syn()),
            XDP_DROP,
            &[],
            Some(ATTACKER6),
        ),
        row(
            "ipv6 udp from a legit client passes",
            v6_from(LEGIT6, udp()),
            XDP_PASS,
            &[],
            Some(LEGIT6),
        ),
        row(
            "ipv6 udp from an attacker is dropped",
            v6_from(ATTACKER6, udp()),
            XDP_DROP,
            &[],
            Some(ATTACKER6),
        ),
        row(
            "icmpv6 echo from a legit client passes",
            v6_from(LEGIT6, L4::icmpv6_echo(7, 1)),
            XDP_PASS,
            &[],
            Some(LEGIT6),
        ),
        row(
            "icmpv6 echo from an attacker is dropped",
            v6_from(ATTACKER6, L4::icmpv6_echo(7, 1)),
            XDP_DROP,
            &[],
            Some(ATTACKER6),
        ),
        row(
            "a protocol we do not parse (gre) is judged by source",
            v4_from(ATTACKER4, L4::raw(GRE, &[0, 0, 0x08, 0])),
            XDP_DROP,
            &[],
            Some(ATTACKER4),
        ),
        // VLAN tags.
        row(
            "802.1q-tagged ipv4 from an attacker is dropped",
            eth(&[(ETH_P_8021Q, 100)], ETH_P_IP, &ip4),
            XDP_DROP,
            &[],
            Some(ATTACKER4),
        ),
        row(
            "qinq (802.1ad + 802.1q) ipv4 from an attacker is dropped",
            eth(&[(ETH_P_8021AD, 10), (ETH_P_8021Q, 100)], ETH_P_IP, &ip4),
            XDP_DROP,
            &[],
            Some(ATTACKER4),
        ),
        row(
            "qinq ipv6 from an attacker is dropped",
            eth(&[(ETH_P_8021AD, 10), (ETH_P_8021Q, 100)], ETH_P_IPV6, &ip6),
            XDP_DROP,
            &[],
            Some(ATTACKER6),
        ),
        row(
            "three vlan tags are beyond the parser: passed as not-ip",
            eth(
                &[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)],
                ETH_P_IP,
                &ip4,
            ),
            XDP_PASS,
            &[NotIp],
            None,
        ),
        row(
            "arp passes as not-ip",
            eth(&[], ETH_P_ARP, &[0u8; 28]),
            XDP_PASS,
            &[NotIp],
            None,
        ),
        // IPv4 options and fragments.
        row(
            "ipv4 with router-alert option from an attacker is dropped",
            v4_opts(ATTACKER4, udp(), router_alert),
            XDP_DROP,
            &[],
            Some(ATTACKER4),
        ),
        row(
            "ipv4 with 12 bytes of options from a legit client passes",
            v4_opts(LEGIT4, tcp_syn(), long_options),
            XDP_PASS,
            &[],
            Some(LEGIT4),
        ),
        row(
            "ipv4 first fragment from an attacker is dropped",
            v4_opts(ATTACKER4, udp(), frag_first.clone()),
            XDP_DROP,
            &[Fragment],
            Some(ATTACKER4),
        ),
        row(
            "ipv4 non-first fragment from an attacker is dropped by source",
            v4_opts(ATTACKER4, L4::raw(17, &[0xab; 24]), frag_later.clone()),
            XDP_DROP,
            &[Fragment],
            Some(ATTACKER4),
        ),
        row(
            "ipv4 non-first fragment from a legit client passes",
            v4_opts(LEGIT4, L4::raw(17, &[0xab; 24]), frag_later),
            XDP_PASS,
            &[Fragment],
            Some(LEGIT4),
        ),
        // IPv6 extension headers and fragments.
        row(
            "ipv6 hop-by-hop + destination options before tcp, attacker, dropped",
            v6_ext(ATTACKER6, &[Ext::HopByHop(0), Ext::DstOpts(1)], tcp_syn()),
            XDP_DROP,
            &[],
            Some(ATTACKER6),
        ),
        row(
            "ipv6 routing header before udp, legit, passes",
            v6_ext(LEGIT6, &[Ext::Routing(2)], udp()),
            XDP_PASS,
            &[],
            Some(LEGIT6),
        ),
        row(
            "ipv6 first fragment from an attacker is dropped",
            v6_ext(
                ATTACKER6,
                &[Ext::Fragment {
                    offset: 0,
                    more: true,
                }],
                udp(),
            ),
            XDP_DROP,
            &[Fragment],
            Some(ATTACKER6),
        ),
        row(
            "ipv6 non-first fragment from an attacker is dropped by source",
            v6_ext(
                ATTACKER6,
                &[Ext::Fragment {
                    offset: 100,
                    more: false,
                }],
                L4::raw(17, &[0xcd; 16]),
            ),
            XDP_DROP,
            &[Fragment],
            Some(ATTACKER6),
        ),
        row(
            "ipv6 chain of nine extension headers: l4 unparsed, legit passes",
            v6_ext(LEGIT6, &NINE_EXT_HEADERS, udp()),
            XDP_PASS,
            &[L4ParseError],
            Some(LEGIT6),
        ),
        row(
            "ipv6 chain of nine extension headers: attacker still dropped by source",
            v6_ext(ATTACKER6, &NINE_EXT_HEADERS, udp()),
            XDP_DROP,
            &[L4ParseError],
            Some(ATTACKER6),
        ),
        row(
            "ipv6 hop-by-hop header cut short: legit passes",
            v6_ext(LEGIT6, &[Ext::Raw(0, vec![17])], L4::raw(17, &[])),
            XDP_PASS,
            &[L4ParseError],
            Some(LEGIT6),
        ),
        // Truncation at every layer.
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (ETH_HLEN), so the
        // shortest frame a row can give is the bare header.
        row(
            "ethernet header alone, ipv4 ethertype, nothing after it",
            v4_from(ATTACKER4, udp())[..14].to_vec(),
            XDP_PASS,
            &[ParseError],
            None,
        ),
        row(
            "truncated vlan tag",
            eth(&[], ETH_P_8021Q, &[0x00]),
            XDP_PASS,
            &[ParseError],
            None,
        ),
        row(
            "truncated ipv4 header (source not readable)",
            v4_from(ATTACKER4, udp())[..14 + 12].to_vec(),
            XDP_PASS,
            &[ParseError],
            None,
        ),
        row(
            "ipv4 ihl below five words",
            bad_ihl,
            XDP_PASS,
            &[ParseError],
            None,
        ),
        row(
            "ipv4 options past the end of the packet",
            truncated_options,
            XDP_PASS,
            &[ParseError],
            None,
        ),
        row(
            "ipv4 ethertype with version 6",
            wrong_version4,
            XDP_PASS,
            &[ParseError],
            None,
        ),
        row(
            "truncated ipv6 header",
            v6_from(ATTACKER6, udp())[..14 + 30].to_vec(),
            XDP_PASS,
            &[ParseError],
            None,
        ),
        row(
            "ipv6 ethertype with version 4",
            wrong_version6,
            XDP_PASS,
            &[ParseError],
            None,
        ),
        row(
            "truncated tcp header from an attacker: dropped by source",
            v4_from(ATTACKER4, tcp_syn().truncated(10)),
            XDP_DROP,
            &[L4ParseError],
            Some(ATTACKER4),
        ),
        row(
            "truncated tcp header from a legit client passes",
            v4_from(LEGIT4, tcp_syn().truncated(10)),
            XDP_PASS,
            &[L4ParseError],
            Some(LEGIT4),
        ),
        row(
            "truncated udp header over ipv6 from an attacker: dropped by source",
            v6_from(ATTACKER6, udp().truncated(4)),
            XDP_DROP,
            &[L4ParseError],
            Some(ATTACKER6),
        ),
        row(
            "truncated icmp header from a legit client passes",
            v4_from(LEGIT4, L4::icmp_echo(1, 1).truncated(3)),
            XDP_PASS,
            &[L4ParseError],
            Some(LEGIT4),
        ),
        // Precedence.
        row(
            "allowlist range beats an exact attacker entry",
            v4_from("198.18.1.5", tcp_syn()),
            XDP_PASS,
            &[Allowlisted],
            Some("198.18.1.5"),
        ),
        row(
            "allowlisted host beats an attacker range",
            v4_from("198.18.9.9", tcp_syn()),
            XDP_PASS,
            &[Allowlisted],
            Some("198.18.9.9"),
        ),
        row(
            "ipv6 allowlisted host beats an attacker range",
            v6_from("2001:db8:1::5", tcp_syn()),
            XDP_PASS,
            &[Allowlisted],
            Some("2001:db8:1::5"),
        ),
        row(
            "attacker range drops a host inside it",
            v4_from("198.18.9.20", udp()),
            XDP_DROP,
            &[],
            Some("198.18.9.20"),
        ),
        row(
            "ipv6 attacker range drops a host inside it",
            v6_from("2001:db8:1::20", udp()),
            XDP_DROP,
            &[],
            Some("2001:db8:1::20"),
        ),
        row(
            "exact pass entry beats the range around it",
            v4_from("198.18.9.10", udp()),
            XDP_PASS,
            &[],
            Some("198.18.9.10"),
        ),
        row(
            "default action resolves to the mode's (firewall: drop)",
            v4_from("198.18.0.68", tcp_syn()),
            XDP_DROP,
            &[],
            Some("198.18.0.68"),
        ),
        // Expiry.
        row(
            "expired exact ipv4 entry acts as absent",
            v4_from("198.18.0.67", tcp_syn()),
            XDP_PASS,
            &[Expired],
            Some("198.18.0.67"),
        ),
        row(
            "expired exact ipv6 entry acts as absent",
            v6_from("2001:db8::67", tcp_syn()),
            XDP_PASS,
            &[Expired],
            Some("2001:db8::67"),
        ),
        row(
            "entry expiring in an hour still drops",
            v4_from("198.18.0.69", tcp_syn()),
            XDP_DROP,
            &[],
            Some("198.18.0.69"),
        ),
        row(
            "expired range acts as absent",
            v4_from("198.18.10.7", tcp_syn()),
            XDP_PASS,
            &[Expired],
            Some("198.18.10.7"),
        ),
        // A redirect with nowhere to go fails open, counted.
        row(
            "redirect entry with no sandbox target configured passes",
            v4_from("198.18.0.70", tcp_syn()),
            XDP_PASS,
            &[NoTarget],
            Some("198.18.0.70"),
        ),
    ]
}

fn sources(obj: &Object) -> BTreeMap<IpAddr, (u64, u64)> {
    obj.maps
        .sources()
        .unwrap()
        .into_iter()
        .map(|s| (s.addr, (s.packets.pass, s.packets.drop)))
        .collect()
}

#[test]
fn fixture_table() {
    let mut obj = Object::load().unwrap();
    setup(&mut obj);
    let rows = rows();
    assert!(rows.len() >= 30, "the table has {} rows", rows.len());
    let mut failures = Vec::new();
    for r in &rows {
        let before = obj.maps.global().unwrap();
        let src_before = sources(&obj);
        let out = obj.run(agent_common::programs::XDP, &r.frame, 1).unwrap();
        let after = obj.maps.global().unwrap();
        let src_after = sources(&obj);

        let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
        let bytes = r.frame.len() as u64;
        let (pkts, byte_counter) = if r.action == XDP_DROP {
            (Counter::Drop, Counter::DropBytes)
        } else {
            (Counter::Pass, Counter::PassBytes)
        };
        expected.insert(pkts.name(), 1);
        expected.insert(byte_counter.name(), bytes);
        for c in r.extra {
            *expected.entry(c.name()).or_default() += 1;
        }
        let delta: BTreeMap<&str, u64> = after
            .iter()
            .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v != 0)
            .collect();

        let mut problems = Vec::new();
        if out.action != r.action {
            problems.push(format!("action {} (expected {})", out.action, r.action));
        }
        if out.output != r.frame {
            problems.push("output bytes differ from the input".to_owned());
        }
        if delta != expected {
            problems.push(format!("counters moved {delta:?}, expected {expected:?}"));
        }
        if let Some(src) = r.source {
            let b = src_before.get(&src).copied().unwrap_or((0, 0));
            let a = src_after.get(&src).copied().unwrap_or((0, 0));
            let want = if r.action == XDP_DROP {
                (b.0, b.1 + 1)
            } else {
                (b.0 + 1, b.1)
            };
            if a != want {
                problems.push(format!(
                    "source {src} (pass, drop) {b:?} -> {a:?}, expected {want:?}"
                ));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", r.desc, problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn unconfigured_program_passes_everything() {
    let mut obj = Object::load().unwrap();
    // Attacker entries exist, but the agent has not enabled the data path yet.
    obj.maps
        .block(
            ATTACKER4.parse().unwrap(),
            AttackerEntry::new(Action::Drop, 0),
        )
        .unwrap();
    let frame = v4_from(ATTACKER4, udp());
    let before = obj.maps.global().unwrap();
    let out = obj.run(agent_common::programs::XDP, &frame, 1).unwrap();
    let after = obj.maps.global().unwrap();
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(after["unconfigured"] - before["unconfigured"], 1);
    assert_eq!(after["pass"] - before["pass"], 1);
    assert_eq!(after["drop"], before["drop"]);
}

#[test]
fn baseline_program_passes() {
    let mut obj = Object::load().unwrap();
    let out = obj
        .run(
            agent_common::programs::BASELINE,
            &v4_from(ATTACKER4, udp()),
            1,
        )
        .unwrap();
    assert_eq!(out.action, XDP_PASS);
}
