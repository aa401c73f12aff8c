use agent_common::family;

use super::*;
use crate::config::{IPPROTO_TCP, IPPROTO_UDP};

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut b = [0; 16];
    b[..4].copy_from_slice(&a);
    b
}

fn event() -> FlowEvent {
    FlowEvent {
        ts_ns: 123,
        attacker: v4([198, 18, 0, 3]),
        orig_dst: v4([198, 18, 0, 1]),
        target: v4([198, 18, 1, 2]),
        nat_addr: v4([198, 18, 1, 1]),
        attacker_port: 40000,
        orig_dport: 22,
        target_port: 2222,
        nat_port: 20001,
        kind: FlowKind::RedirectForward as u8,
        family: family::V4,
        proto: IPPROTO_TCP,
        model: RedirectModel::FullNat as u8,
        _pad: [0; 4],
    }
}

fn bytes(e: &FlowEvent) -> Vec<u8> {
    // SAFETY: FlowEvent is repr(C) plain data without implicit padding.
    unsafe {
        std::slice::from_raw_parts((e as *const FlowEvent).cast::<u8>(), size_of::<FlowEvent>())
    }
    .to_vec()
}

#[test]
fn decodes_and_serializes_the_documented_shape() {
    let rec = FlowRecord::decode(&bytes(&event())).unwrap();
    assert_eq!(
        serde_json::to_string(&rec).unwrap(),
        r#"{"kind":"redirect","model":"full-nat","proto":"tcp","attacker":"198.18.0.3:40000","orig_dst":"198.18.0.1:22","target":"198.18.1.2:2222","nat":"198.18.1.1:20001","ts_ns":123}"#
    );
}

#[test]
fn ipv6_addresses_are_bracketed() {
    let mut e = event();
    e.family = family::V6;
    e.proto = IPPROTO_UDP;
    e.kind = FlowKind::ReflectForward as u8;
    e.model = RedirectModel::PreserveSource as u8;
    e.attacker = "fd6d:6972:6167:65::3"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    let rec = FlowRecord::try_from(&e).unwrap();
    assert_eq!(rec.kind, "reflect");
    assert_eq!(rec.model, "preserve-source");
    assert_eq!(rec.proto, "udp");
    assert_eq!(rec.attacker, "[fd6d:6972:6167:65::3]:40000");
}

#[test]
fn refuses_bad_events() {
    let b = bytes(&event());
    assert_eq!(
        FlowRecord::decode(&b[..80]),
        Err(FlowError::Size {
            len: 80,
            expected: 88
        })
    );
    let mut e = event();
    e.kind = 0;
    assert!(matches!(
        FlowRecord::try_from(&e),
        Err(FlowError::Field { field: "kind", .. })
    ));
    let mut e = event();
    e.family = 2;
    assert!(matches!(
        FlowRecord::try_from(&e),
        Err(FlowError::Field {
            field: "family",
            ..
        })
    ));
    let mut e = event();
    e.proto = 1;
    assert!(matches!(
        FlowRecord::try_from(&e),
        Err(FlowError::Field { field: "proto", .. })
    ));
    let mut e = event();
    e.model = 9;
    assert!(matches!(
        FlowRecord::try_from(&e),
        Err(FlowError::Field { field: "model", .. })
    ));
}

#[test]
fn flow_log_appends_lines() {
    let path = std::env::temp_dir().join(format!("mirage-flow-log-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let rec = FlowRecord::try_from(&event()).unwrap();
    let mut log = FlowLog::open(&path).unwrap();
    log.append(&rec).unwrap();
    drop(log);
    FlowLog::open(&path).unwrap().append(&rec).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(v["attacker"], "198.18.0.3:40000");
    assert_eq!(v["nat"], "198.18.1.1:20001");
}

#[test]
fn lists_flow_entries() {
    let k = FlowKey {
        src: v4([198, 18, 1, 2]),
        dst: v4([198, 18, 1, 1]),
        sport: 2222,
        dport: 20001,
        proto: IPPROTO_TCP,
        family: family::V4,
        _pad: [0; 2],
    };
    let v = FlowEntry {
        src: v4([198, 18, 0, 1]),
        dst: v4([198, 18, 0, 3]),
        sport: 22,
        dport: 40000,
        kind: FlowKind::RedirectReverse as u8,
        _pad: [0; 3],
        created_ns: 1_000_000_000,
    };
    let l = ListedFlow::new(&k, &v, 3_500_000_000).unwrap();
    assert_eq!(l.kind, "redirect-reverse");
    assert_eq!(l.src, "198.18.1.2:2222");
    assert_eq!(l.new_dst, "198.18.0.3:40000");
    assert!((l.age_secs - 2.5).abs() < 1e-9);
}
