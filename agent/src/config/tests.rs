use super::*;

fn parse(s: &str) -> Result<AgentConfig, ConfigError> {
    s.parse()
}

const SANDBOX: &str = r#"
    [[sandbox]]
    target = "198.18.1.2"
"#;

#[test]
fn defaults_to_unreal_which_needs_a_sandbox() {
    assert_eq!(AgentConfig::default().mode, ModeName::Unreal);
    let err = parse("").unwrap_err();
    assert!(matches!(err, ConfigError::NoTargets { mode: "unreal" }));
    assert!(err.to_string().contains("[[sandbox]]"), "{err}");
    // `--mode firewall` makes the same empty file valid.
    let c = AgentConfig::parse("", Some(ModeName::Firewall)).unwrap();
    assert_eq!(c.mode, ModeName::Firewall);
    assert_eq!(c.nat_ports, DEFAULT_NAT_PORTS);
    assert_eq!(c.reflect_pps, DEFAULT_REFLECT_PPS);
    // ...and `--mode unreal` refuses a file that is valid in firewall mode.
    assert!(matches!(
        AgentConfig::parse("mode = \"firewall\"", Some(ModeName::Unreal)),
        Err(ConfigError::NoTargets { .. })
    ));
    assert!(matches!(
        parse("mode = \"honeypot\""),
        Err(ConfigError::NoTargets { mode: "honeypot" })
    ));
    // Reflect sends attackers back to themselves: no sandbox needed.
    assert!(parse("mode = \"reflect\"").is_ok());
}

#[test]
fn parses_a_full_file() {
    let c = parse(
        r#"
        mode = "unreal"
        xdp_mode = "generic"
        allowlist = ["198.18.0.0/24", "2001:db8::/48", "::ffff:192.0.2.1"]
        redirect_model = "full-nat"
        snat_v4 = "198.18.1.1"
        snat_v6 = "fd6d:6972:6167:66::1"
        nat_ports = [30000, 30999]
        reflect_pps = 50
        honeypot_allow_ports = ["tcp/22", "udp/53", "80", "TCP/22"]

        [[sandbox]]
        port = 22
        proto = "tcp"
        target = "198.18.1.2:2222"

        [[sandbox]]
        target = "198.18.1.2"

        [[sandbox]]
        port = 22
        target = "[fd6d:6972:6167:66::2]:2222"

        [[sandbox]]
        port = 53
        proto = "udp"
        target = "[::ffff:198.18.1.3]:5353"
        "#,
    )
    .unwrap();
    assert_eq!(c.xdp_mode, XdpModeName::Generic);
    assert_eq!(c.allowlist_nets().unwrap().len(), 3);

    let dp = c.data_path().unwrap();
    assert_eq!(dp.mode, Mode::Unreal as u8);
    assert_eq!(dp.flags, DataPathConfig::ENABLED);
    assert_eq!(dp.model, RedirectModel::FullNat as u8);
    assert_eq!(dp.reflect_pps, 50);
    assert_eq!((dp.nat_port_min, dp.nat_port_max), (30000, 30999));
    assert_eq!(dp.snat_v4, [198, 18, 1, 1]);
    assert_eq!(
        dp.snat_v6,
        "fd6d:6972:6167:66::1".parse::<Ipv6Addr>().unwrap().octets()
    );

    let ports: Vec<(u16, u8)> = c
        .allow_port_keys()
        .unwrap()
        .iter()
        .map(|k| (k.port, k.proto))
        .collect();
    assert_eq!(
        ports,
        [
            (22, IPPROTO_TCP),
            (53, IPPROTO_UDP),
            (80, IPPROTO_TCP),
            (80, IPPROTO_UDP)
        ]
    );

    let t: Vec<(u16, u8, u8, String)> = c
        .targets()
        .unwrap()
        .iter()
        .map(|(k, t)| (k.port, k.proto, k.family, t.to_string()))
        .collect();
    let (v4, v6) = (family::V4, family::V6);
    let expected: Vec<(u16, u8, u8, String)> = [
        (0, IPPROTO_TCP, v4, "198.18.1.2"),
        (22, IPPROTO_TCP, v4, "198.18.1.2:2222"),
        (0, IPPROTO_UDP, v4, "198.18.1.2"),
        (53, IPPROTO_UDP, v4, "198.18.1.3:5353"),
        (22, IPPROTO_TCP, v6, "[fd6d:6972:6167:66::2]:2222"),
        (22, IPPROTO_UDP, v6, "[fd6d:6972:6167:66::2]:2222"),
    ]
    .into_iter()
    .map(|(p, pr, f, s)| (p, pr, f, s.to_owned()))
    .collect();
    assert_eq!(t, expected);
}

#[test]
fn refuses_unknown_keys_and_bad_entries() {
    assert!(matches!(
        parse("mdoe = \"firewall\""),
        Err(ConfigError::Parse(_))
    ));
    assert!(matches!(
        parse("mode = \"firewall\"\nallowlist = [\"0.0.0.0/0\"]"),
        Err(ConfigError::Allow { .. })
    ));
    assert!(
        parse("mode = \"firewall\"\nallowlist = [\"0.0.0.0/0\"]\nallow_broad_ranges = true")
            .is_ok()
    );
    assert!(matches!(
        parse("mode = \"firewall\"\nallowlist = [\"198.18.0.1/24\"]"),
        Err(ConfigError::Allow { .. })
    ));
    assert!(matches!(
        parse("mode = \"bounce\""),
        Err(ConfigError::Parse(_))
    ));
    assert!(matches!(
        parse("redirect_model = \"nat\"\n[[sandbox]]\ntarget = \"198.18.1.2\""),
        Err(ConfigError::Parse(_))
    ));
    // Unknown keys inside a table too.
    assert!(matches!(
        parse("[[sandbox]]\ntarget = \"198.18.1.2\"\nprot = \"tcp\""),
        Err(ConfigError::Parse(_))
    ));
    assert!(matches!(
        parse("[[sandbox]]\nport = 22"),
        Err(ConfigError::Parse(_))
    ));
    assert!(matches!(
        parse("[[sandbox]]\nproto = \"icmp\"\ntarget = \"198.18.1.2\""),
        Err(ConfigError::Parse(_))
    ));
}

#[test]
fn validates_target_addresses() {
    let bad = [
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "127.0.0.1:22",
        "::",
        "[::1]:22",
        "ff02::1",
        "[ff02::1]:53",
        "::ffff:127.0.0.1",
        "198.18.1.2:0",
        "198.18.1.2:99999",
        "sandbox.example:22",
        "198.18.1.0/24",
        "",
    ];
    for t in bad {
        let text = format!("[[sandbox]]\ntarget = \"{t}\"");
        let err = parse(&text).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Address { key, .. } if key == "sandbox[0].target"),
            "{t}: {err:?}"
        );
    }
    let good = [
        ("198.18.1.2", "198.18.1.2", family::V4),
        ("198.18.1.2:2222", "198.18.1.2:2222", family::V4),
        ("::ffff:198.18.1.2", "198.18.1.2", family::V4),
        ("[::ffff:198.18.1.2]:80", "198.18.1.2:80", family::V4),
        ("fd00::2", "fd00::2", family::V6),
        ("[fd00::2]", "fd00::2", family::V6),
        ("[fd00::2]:8080", "[fd00::2]:8080", family::V6),
    ];
    for (t, shown, fam) in good {
        let c = parse(&format!("[[sandbox]]\ntarget = \"{t}\"")).unwrap();
        let targets = c.targets().unwrap();
        assert_eq!(targets.len(), 2, "{t}: proto any is TCP and UDP");
        assert!(
            targets
                .iter()
                .all(|(k, a)| k.family == fam && k.port == 0 && a.to_string() == shown),
            "{t}: {targets:?}"
        );
    }
}

#[test]
fn target_map_values() {
    let c = parse("[[sandbox]]\nport = 80\nproto = \"tcp\"\ntarget = \"198.18.1.2:8080\"").unwrap();
    let (k, t) = c.targets().unwrap()[0];
    assert_eq!(
        k,
        TargetKey {
            port: 80,
            proto: IPPROTO_TCP,
            family: family::V4
        }
    );
    let t: Target = t.into();
    assert_eq!(&t.addr[..4], &[198, 18, 1, 2]);
    assert_eq!(&t.addr[4..], &[0; 12]);
    assert_eq!(t.port, 8080);
}

#[test]
fn refuses_duplicate_targets() {
    // `any` and `tcp` on the same port and family collide.
    let err = parse(
        r#"
        [[sandbox]]
        port = 22
        target = "198.18.1.2"
        [[sandbox]]
        port = 22
        proto = "tcp"
        target = "198.18.1.3"
        "#,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::DuplicateTarget {
                first: 0,
                second: 1,
                port: 22,
                proto: "tcp",
                family: "IPv4"
            }
        ),
        "{err:?}"
    );
    // Two default targets of one family.
    assert!(matches!(
        parse(
            "[[sandbox]]\ntarget = \"198.18.1.2\"\n[[sandbox]]\nport = 0\ntarget = \"198.18.1.3:80\""
        ),
        Err(ConfigError::DuplicateTarget { port: 0, .. })
    ));
    // Same port, other family or other protocol: fine.
    assert!(
        parse(
            r#"
            [[sandbox]]
            port = 22
            target = "198.18.1.2"
            [[sandbox]]
            port = 22
            target = "fd00::2"
            [[sandbox]]
            port = 53
            proto = "udp"
            target = "198.18.1.2"
            [[sandbox]]
            port = 53
            proto = "tcp"
            target = "198.18.1.3"
            "#
        )
        .is_ok()
    );
}

#[test]
fn full_nat_needs_snat_per_family() {
    let v4 = "redirect_model = \"full-nat\"\n[[sandbox]]\ntarget = \"198.18.1.2\"\n";
    assert!(matches!(
        parse(v4),
        Err(ConfigError::MissingSnat { key: "snat_v4", .. })
    ));
    // An IPv6 source address does not help IPv4 targets.
    assert!(matches!(
        parse(&format!("snat_v6 = \"fd00::1\"\n{v4}")),
        Err(ConfigError::MissingSnat { key: "snat_v4", .. })
    ));
    assert!(parse(&format!("snat_v4 = \"198.18.1.1\"\n{v4}")).is_ok());

    let both = format!("snat_v4 = \"198.18.1.1\"\n{v4}[[sandbox]]\ntarget = \"fd00::2\"\n");
    assert!(matches!(
        parse(&both),
        Err(ConfigError::MissingSnat { key: "snat_v6", .. })
    ));
    assert!(parse(&format!("snat_v6 = \"fd00::1\"\n{both}")).is_ok());
    // preserve-source needs neither.
    assert!(parse(SANDBOX).is_ok());
}

#[test]
fn validates_snat_addresses() {
    for (key, value) in [
        ("snat_v4", "fd00::1"),
        ("snat_v4", "0.0.0.0"),
        ("snat_v4", "224.0.0.1"),
        ("snat_v4", "127.0.0.1"),
        ("snat_v4", "nope"),
        ("snat_v6", "198.18.1.1"),
        ("snat_v6", "::ffff:198.18.1.1"),
        ("snat_v6", "::1"),
        ("snat_v6", "ff02::2"),
    ] {
        let err = parse(&format!("{key} = \"{value}\"\n{SANDBOX}")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Address { key: k, .. } if k == key),
            "{key} = {value}: {err:?}"
        );
    }
    let c = parse(&format!("snat_v4 = \"::ffff:198.18.1.1\"\n{SANDBOX}")).unwrap();
    assert_eq!(
        c.snat_v4_addr().unwrap(),
        Some(Ipv4Addr::new(198, 18, 1, 1))
    );
}

#[test]
fn validates_nat_ports_and_allow_ports() {
    for ports in ["[1023, 2000]", "[40000, 30000]", "[0, 0]"] {
        let err = parse(&format!("nat_ports = {ports}\n{SANDBOX}")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Value { key, .. } if key == "nat_ports"),
            "{ports}: {err:?}"
        );
    }
    assert!(parse(&format!("nat_ports = [1024, 1024]\n{SANDBOX}")).is_ok());
    // Not two numbers, or not ports.
    for ports in ["[20000]", "[1, 2, 3]", "[20000, 70000]"] {
        assert!(
            matches!(
                parse(&format!("nat_ports = {ports}\n{SANDBOX}")),
                Err(ConfigError::Parse(_))
            ),
            "{ports}"
        );
    }
    for entry in [
        "tcp/0",
        "sctp/22",
        "tcp/",
        "tcp/65536",
        "ssh",
        "+22",
        "tcp/+22",
    ] {
        let err = parse(&format!("honeypot_allow_ports = [\"{entry}\"]\n{SANDBOX}")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Value { key, .. } if key == "honeypot_allow_ports[0]"),
            "{entry}: {err:?}"
        );
    }
}

#[test]
fn reflect_pps_zero_is_allowed() {
    let c = parse("mode = \"reflect\"\nreflect_pps = 0").unwrap();
    assert_eq!(c.data_path().unwrap().reflect_pps, 0);
}

#[test]
fn documented_examples_are_valid() {
    for (doc, text) in [
        ("docs/config.md", include_str!("../../../docs/config.md")),
        ("README.md", include_str!("../../../README.md")),
    ] {
        let blocks: Vec<&str> = text
            .split("```toml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .collect();
        assert!(!blocks.is_empty(), "{doc} has no TOML example");
        for b in blocks {
            if let Err(err) = parse(b) {
                panic!("{doc} example does not parse: {err:?}\n{b}");
            }
        }
    }
}

#[test]
fn forwarding_needed_by_mode_and_family() {
    let v4 = AgentConfig::parse(SANDBOX, None).unwrap();
    assert_eq!(v4.forwarding_needed().unwrap(), (true, false));
    let fw = AgentConfig::parse(SANDBOX, Some(ModeName::Firewall)).unwrap();
    assert_eq!(fw.forwarding_needed().unwrap(), (false, false));
    let reflect = AgentConfig::parse("", Some(ModeName::Reflect)).unwrap();
    assert_eq!(reflect.forwarding_needed().unwrap(), (true, true));
    let v6 = parse("mode = \"honeypot\"\n[[sandbox]]\ntarget = \"fd00::2\"").unwrap();
    assert_eq!(v6.forwarding_needed().unwrap(), (false, true));
}

#[test]
fn link_sections_parse_and_validate() {
    let cfg = parse(
        r#"
mode = "firewall"
state_dir = "/tmp/mirage-agent"
metrics = "127.0.0.1:9101"
[manager]
url = "https://manager.example:8443"
[server]
address = "server.example:6514"
ca = "/etc/mirage/server-ca.crt"
cert = "/etc/mirage/agent.crt"
key = "/etc/mirage/agent.key"
[[logs]]
service = "sshd"
paths = ["/var/log/auth.log"]
[[logs]]
service = "web"
paths = ["/var/log/nginx/*access.log"]
[redis]
address = "127.0.0.1:6379"
password_file = "/etc/mirage/redis.pass"
[[journal]]
service = "sshd"
units = ["ssh.service"]
"#,
    )
    .unwrap();
    assert_eq!(cfg.logs.len(), 2);
    assert_eq!(cfg.manager.as_ref().unwrap().heartbeat_secs, 15);
    assert_eq!(cfg.redis.as_ref().unwrap().acl_log_secs, 10);
    // A manager supplies the targets: unreal without a sandbox is accepted then.
    assert!(parse("[manager]\nurl = \"https://m:8443\"\n").is_ok());
    for (text, key) in [
        ("[manager]\nurl = \"ftp://m\"\n", "manager.url"),
        (
            "mode = \"firewall\"\n[[logs]]\nservice = \"sshd\"\npaths = [\"/var/log/auth.log\"]\n",
            "server",
        ),
        (
            "mode = \"firewall\"\n[server]\naddress = \"nohost\"\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n",
            "server.address",
        ),
        (
            "mode = \"firewall\"\n[server]\naddress = \"s:6514\"\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n[[logs]]\nservice = \"SSH\"\npaths = [\"/x\"]\n",
            "logs[0].service",
        ),
        (
            "mode = \"firewall\"\n[server]\naddress = \"s:6514\"\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n[[logs]]\nservice = \"sshd\"\npaths = [\"relative.log\"]\n",
            "logs[0].paths",
        ),
    ] {
        match parse(text) {
            Err(ConfigError::Value { key: k, .. }) => assert_eq!(k, key, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}
