use std::collections::{BTreeSet, HashMap};

use agent_common::Action;

use super::*;
use crate::sync::policy::DeltaDoc;

/// The kernel as a model: what it holds, and every operation in order.
#[derive(Default)]
struct Model {
    allow: BTreeSet<Net>,
    attackers: HashMap<Net, Want>,
    data_planes: usize,
    ops: Vec<String>,
}

impl Kernel for Model {
    fn allow(&mut self, net: Net) {
        self.allow.insert(net);
        self.ops.push(format!("allow {net}"));
    }
    fn disallow(&mut self, net: Net) {
        self.allow.remove(&net);
        self.ops.push(format!("disallow {net}"));
    }
    fn data_plane(&mut self, _: &DataPlane) {
        self.data_planes += 1;
        self.ops.push("data-plane".into());
    }
    fn block(&mut self, net: Net, want: Want) {
        self.attackers.insert(net, want);
        self.ops.push(format!("block {net} {}", want.action.name()));
    }
    fn unblock(&mut self, net: Net) {
        self.attackers.remove(&net);
        self.ops.push(format!("unblock {net}"));
    }
}

fn net(s: &str) -> Net {
    s.parse().unwrap()
}

fn snapshot(revision: i64, entries: &[(&str, &str)]) -> String {
    let attackers: Vec<serde_json::Value> = entries
        .iter()
        .map(|(n, a)| serde_json::json!({"net": n, "action": a}))
        .collect();
    serde_json::json!({
        "revision": revision,
        "policy": {"group_id": 1, "mode": "firewall", "redirect_model": "preserve-source",
                   "allowlist": ["192.0.2.1"]},
        "attackers": attackers,
    })
    .to_string()
}

fn delta(v: serde_json::Value) -> (i64, Change) {
    let d: DeltaDoc = serde_json::from_value(v).unwrap();
    (d.revision, d.change(Some(1)).unwrap())
}

#[test]
fn a_snapshot_is_a_diff_never_a_refill() {
    let old = PolicyState::from_snapshot(&snapshot(
        1,
        &[
            ("198.18.0.1/32", "drop"),
            ("198.18.0.2/32", "drop"),
            ("198.18.0.3/32", "drop"),
        ],
    ))
    .unwrap();
    let new = PolicyState::from_snapshot(&snapshot(
        2,
        &[
            ("198.18.0.1/32", "drop"),
            ("198.18.0.2/32", "redirect"),
            ("198.18.0.4/32", "drop"),
        ],
    ))
    .unwrap();
    let mut k = Model::default();
    let (written, removed) = diff_attackers(
        &old.state.attackers,
        &new.state.attackers,
        &new.order,
        false,
        &mut k,
    );
    assert_eq!((written, removed), (2, 1));
    // The unchanged entry is never touched; writes come before removals.
    assert_eq!(
        k.ops,
        vec![
            "block 198.18.0.2 redirect",
            "block 198.18.0.4 drop",
            "unblock 198.18.0.3"
        ]
    );
    // A full pass (after a restart) writes everything, still without removing first.
    let mut k = Model::default();
    diff_attackers(
        &HashMap::new(),
        &new.state.attackers,
        &new.order,
        true,
        &mut k,
    );
    assert_eq!(k.attackers.len(), 3);
    assert!(k.ops.iter().all(|o| o.starts_with("block")));
}

#[test]
fn snapshot_keeps_order_and_reports_refusals() {
    let parsed = PolicyState::from_snapshot(&snapshot(
        3,
        &[
            ("198.18.0.9/32", "drop"),
            ("0.0.0.0/0", "drop"),
            ("198.18.0.8/32", "default"),
            ("198.18.0.7/32", "shout"),
        ],
    ))
    .unwrap();
    assert_eq!(parsed.order, vec![net("198.18.0.9"), net("198.18.0.8")]);
    assert_eq!(parsed.refused, 2);
    assert_eq!(parsed.errors.len(), 2);
    assert_eq!(parsed.state.revision, Some(3));
    assert_eq!(parsed.state.group(), Some(1));
    assert!(PolicyState::from_snapshot("{\"revision\": 1}").is_err());
}

#[test]
fn deltas_add_update_and_remove() {
    let mut s = PolicyState::from_snapshot(&snapshot(1, &[])).unwrap().state;
    let mut k = Model::default();
    let (rev, add) = delta(
        serde_json::json!({"revision": 2, "group_id": 1, "op": "add",
        "net": "198.18.0.3/32", "action": "drop", "details": {}}),
    );
    s.apply_change(rev, &add, &mut k);
    assert_eq!(k.attackers[&net("198.18.0.3")].action, Action::Drop);
    let (rev, update) = delta(
        serde_json::json!({"revision": 3, "group_id": 1, "op": "update",
        "net": "198.18.0.3/32", "action": "redirect", "expires_at": "2030-01-01T00:00:00Z",
        "details": {}}),
    );
    s.apply_change(rev, &update, &mut k);
    let w = k.attackers[&net("198.18.0.3")];
    assert_eq!(w.action, Action::Redirect);
    assert!(w.expires > 0);
    let (rev, remove) = delta(
        serde_json::json!({"revision": 4, "group_id": 1, "op": "remove",
        "net": "198.18.0.3/32", "details": {}}),
    );
    s.apply_change(rev, &remove, &mut k);
    assert!(k.attackers.is_empty());
    assert!(s.attackers.is_empty());
    assert_eq!(s.revision, Some(4));
    // Removing what is not there changes nothing.
    s.apply_change(5, &remove, &mut k);
    assert_eq!(k.ops.len(), 3);
}

#[test]
fn a_group_entry_and_a_global_one_for_the_same_address() {
    let mut s = PolicyState::default();
    let mut k = Model::default();
    let (r, global) = delta(
        serde_json::json!({"revision": 1, "group_id": null, "op": "add",
        "net": "198.18.0.3/32", "action": "drop", "details": {}}),
    );
    s.apply_change(r, &global, &mut k);
    let (r, group) = delta(
        serde_json::json!({"revision": 2, "group_id": 1, "op": "add",
        "net": "198.18.0.3/32", "action": "redirect", "details": {}}),
    );
    s.apply_change(r, &group, &mut k);
    // The group's own entry decides.
    assert_eq!(k.attackers[&net("198.18.0.3")].action, Action::Redirect);
    // A later change of the global one does not override it.
    let (r, global2) = delta(
        serde_json::json!({"revision": 3, "group_id": null, "op": "update",
        "net": "198.18.0.3/32", "action": "reflect", "details": {}}),
    );
    s.apply_change(r, &global2, &mut k);
    assert_eq!(k.attackers[&net("198.18.0.3")].action, Action::Redirect);
    // Removing the group's leaves the global one in force.
    let (r, rm) = delta(
        serde_json::json!({"revision": 4, "group_id": 1, "op": "remove",
        "net": "198.18.0.3/32", "details": {}}),
    );
    s.apply_change(r, &rm, &mut k);
    assert_eq!(k.attackers[&net("198.18.0.3")].action, Action::Reflect);
    let (r, rm) = delta(
        serde_json::json!({"revision": 5, "group_id": null, "op": "remove",
        "net": "198.18.0.3/32", "details": {}}),
    );
    s.apply_change(r, &rm, &mut k);
    assert!(k.attackers.is_empty());
}

#[test]
fn snapshot_entries_of_unknown_scope_follow_the_deltas() {
    let mut s = PolicyState::from_snapshot(&snapshot(1, &[("198.18.0.3/32", "drop")]))
        .unwrap()
        .state;
    let mut k = Model::default();
    let (r, upd) = delta(
        serde_json::json!({"revision": 2, "group_id": 1, "op": "update",
        "net": "198.18.0.3/32", "action": "redirect", "details": {}}),
    );
    s.apply_change(r, &upd, &mut k);
    assert_eq!(s.attackers[&net("198.18.0.3")].iter().count(), 1);
    let (r, rm) = delta(
        serde_json::json!({"revision": 3, "group_id": 1, "op": "remove",
        "net": "198.18.0.3/32", "details": {}}),
    );
    s.apply_change(r, &rm, &mut k);
    assert!(s.attackers.is_empty());
    assert_eq!(k.ops.last().unwrap(), "unblock 198.18.0.3");
    // Removing with another scope than the snapshot's row also removes an unknown one.
    let mut s = PolicyState::from_snapshot(&snapshot(1, &[("198.18.0.4/32", "drop")]))
        .unwrap()
        .state;
    let (r, rm) = delta(
        serde_json::json!({"revision": 2, "group_id": null, "op": "remove",
        "net": "198.18.0.4/32", "details": {}}),
    );
    s.apply_change(r, &rm, &mut k);
    assert!(s.attackers.is_empty());
}

#[test]
fn allowlist_diff_keeps_protected_entries() {
    let old: BTreeSet<Net> = [net("192.0.2.1"), net("192.0.2.2"), net("192.0.2.3")].into();
    let new: BTreeSet<Net> = [net("192.0.2.1"), net("192.0.2.4")].into();
    let protected: BTreeSet<Net> = [net("192.0.2.3")].into();
    let mut k = Model::default();
    add_allowlist(&old, &new, false, &mut k);
    remove_allowlist(&old, &new, &protected, &mut k);
    assert_eq!(k.ops, vec!["allow 192.0.2.4", "disallow 192.0.2.2"]);
    let mut k = Model::default();
    add_allowlist(&old, &new, true, &mut k);
    assert_eq!(k.ops, ["allow 192.0.2.1", "allow 192.0.2.4"]);
}

#[test]
fn state_file_round_trip() {
    let mut s = PolicyState::from_snapshot(&snapshot(
        7,
        &[("198.18.0.3/32", "drop"), ("2001:db8::/48", "default")],
    ))
    .unwrap()
    .state;
    let mut k = Model::default();
    let (r, c) = delta(
        serde_json::json!({"revision": 8, "group_id": null, "op": "add",
        "net": "198.18.0.3/32", "action": "reflect", "expires_at": "2031-02-03T04:05:06.789Z",
        "details": {}}),
    );
    // The snapshot's row becomes the global one; add the group's next to it.
    s.apply_change(r, &c, &mut k);
    let (r, c) = delta(
        serde_json::json!({"revision": 9, "group_id": 1, "op": "add",
        "net": "198.18.0.3/32", "action": "drop", "details": {}}),
    );
    s.apply_change(r, &c, &mut k);
    assert_eq!(s.attackers[&net("198.18.0.3")].iter().count(), 2);
    let mut buf = Vec::new();
    encode(&s, &mut buf).unwrap();
    let back = decode(buf.as_slice()).unwrap();
    assert_eq!(back, s);
    // Cut anywhere before the end line: refused.
    let text = String::from_utf8(buf.clone()).unwrap();
    let cut = text.rfind("end").unwrap();
    assert!(matches!(decode(&buf[..cut]), Err(DecodeError::Truncated)));
    let wrong = text.replace("end 3", "end 4");
    assert!(matches!(
        decode(wrong.as_bytes()),
        Err(DecodeError::Line { .. })
    ));
    assert!(decode(&b"{\"format\": 99}\nend 0\n"[..]).is_err());
    // An empty state.
    let mut buf = Vec::new();
    encode(&PolicyState::default(), &mut buf).unwrap();
    assert_eq!(decode(buf.as_slice()).unwrap(), PolicyState::default());
}

#[test]
fn journal_replay_skips_old_and_stops_at_a_torn_line() {
    let mut s = PolicyState::from_snapshot(&snapshot(5, &[("198.18.0.3/32", "drop")]))
        .unwrap()
        .state;
    let lines = [
        serde_json::json!({"revision": 4, "group_id": 1, "op": "remove",
            "net": "198.18.0.3/32", "details": {}})
        .to_string(),
        serde_json::json!({"revision": 6, "group_id": 1, "op": "add",
            "net": "198.18.0.4/32", "action": "drop", "details": {}})
        .to_string(),
        serde_json::json!({"revision": 7, "group_id": 1, "op": "policy",
            "details": {"group_id": 1, "mode": "unreal", "redirect_model": "preserve-source"}})
        .to_string(),
        "{\"revision\": 8, \"op\": \"add\", \"net\": \"198.18".to_owned(),
    ];
    let journal = lines.join("\n");
    let mut k = Model::default();
    assert_eq!(replay(&mut s, journal.as_bytes(), &mut k), 2);
    assert_eq!(s.revision, Some(7));
    assert_eq!(s.entries(), 2);
    assert_eq!(s.policy.as_ref().unwrap().mode, "unreal");
}
