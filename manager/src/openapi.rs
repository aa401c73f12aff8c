//! The OpenAPI 3.1 document of the JSON API, served at `GET /api/v1/openapi.json` (no login:
//! it describes the interface, not data).
//!
//! Written here by hand, as data, rather than derived with `utoipa` annotations on every handler
//! and type: the document is one reviewable place, and `tests/openapi.rs` keeps it honest in
//! both directions: every route the router serves is documented (read from `routes/mod.rs`), and
//! every documented operation is served (each is called and must not answer 404/405).

use std::sync::OnceLock;

use axum::{Json, http::header, response::IntoResponse};
use serde_json::{Map, Value, json};

/// `GET /api/v1/openapi.json`.
pub async fn serve() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Json(document().clone()),
    )
}

/// The document (built once).
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

/// Who may call an operation.
#[derive(Clone, Copy)]
enum Auth {
    /// No credential (login, enrollment with its token, health).
    None,
    /// A session cookie of a user with at least this role; state-changing calls also need the
    /// `X-CSRF-Token` header.
    User(&'static str),
    /// An agent's bearer credential.
    Agent,
    /// A `mirage-server` (or sandbox) service credential.
    Service,
}

/// One operation.
struct Op {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    auth: Auth,
    /// Query parameters: (name, type, description).
    query: &'static [(&'static str, &'static str, &'static str)],
    /// Request body schema.
    body: Option<Value>,
    /// Success status and its schema (`None`: no body).
    ok: (u16, Option<Value>),
}

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn array(items: Value) -> Value {
    json!({ "type": "array", "items": items })
}

/// An object schema from (name, schema, required) triples.
fn object(fields: &[(&str, Value, bool)]) -> Value {
    let mut props = Map::new();
    let mut required = Vec::new();
    for (name, schema, req) in fields {
        props.insert((*name).to_owned(), schema.clone());
        if *req {
            required.push(Value::from(*name));
        }
    }
    json!({ "type": "object", "properties": props, "required": required, "additionalProperties": false })
}

fn s() -> Value {
    json!({ "type": "string" })
}
fn int() -> Value {
    json!({ "type": "integer", "format": "int64" })
}
fn boolean() -> Value {
    json!({ "type": "boolean" })
}
fn time() -> Value {
    json!({ "type": "string", "format": "date-time" })
}
fn opt(schema: Value) -> Value {
    json!({ "oneOf": [schema, { "type": "null" }] })
}
fn net() -> Value {
    json!({ "type": "string", "description": "An address or CIDR range (IPv4 or IPv6)." })
}
fn en(values: &[&str]) -> Value {
    json!({ "type": "string", "enum": values })
}
fn any_object() -> Value {
    json!({ "type": "object" })
}

const PAGE: &[(&str, &str, &str)] = &[
    ("limit", "integer", "Page size."),
    ("before", "integer", "Only ids below this (keyset paging)."),
];

fn ops() -> Vec<Op> {
    let action = en(&["default", "drop", "redirect", "reflect"]);
    vec![
        Op {
            method: "get",
            path: "/healthz",
            summary: "Liveness and database reachability.",
            auth: Auth::None,
            query: &[],
            body: None,
            ok: (200, Some(any_object())),
        },
        Op {
            method: "get",
            path: "/metrics",
            summary: "Prometheus metrics (text exposition format).",
            auth: Auth::None,
            query: &[],
            body: None,
            ok: (200, Some(s())),
        },
        Op {
            method: "get",
            path: "/api/v1/openapi.json",
            summary: "This document.",
            auth: Auth::None,
            query: &[],
            body: None,
            ok: (200, Some(any_object())),
        },
        Op {
            method: "post",
            path: "/api/v1/login",
            summary: "Log in: sets the session cookie, returns the CSRF token. Throttled per \
                      username and per client address (429 with Retry-After).",
            auth: Auth::None,
            query: &[],
            body: Some(object(&[("username", s(), true), ("password", s(), true)])),
            ok: (200, Some(r("Session"))),
        },
        Op {
            method: "post",
            path: "/api/v1/logout",
            summary: "Ends the session.",
            auth: Auth::User("viewer"),
            query: &[],
            body: None,
            ok: (204, None),
        },
        Op {
            method: "get",
            path: "/api/v1/me",
            summary: "The logged-in user and the session's CSRF token.",
            auth: Auth::User("viewer"),
            query: &[],
            body: None,
            ok: (200, Some(r("Session"))),
        },
        Op {
            method: "get",
            path: "/api/v1/users",
            summary: "Every user.",
            auth: Auth::User("admin"),
            query: &[],
            body: None,
            ok: (200, Some(array(r("User")))),
        },
        Op {
            method: "post",
            path: "/api/v1/users",
            summary: "Creates a user; without `password` a random one is generated and returned \
                      once.",
            auth: Auth::User("admin"),
            query: &[],
            body: Some(object(&[
                ("username", s(), true),
                ("role", en(&["admin", "operator", "viewer"]), true),
                ("password", s(), false),
            ])),
            ok: (
                201,
                Some(object(&[
                    ("user", r("User"), true),
                    ("password", opt(s()), false),
                ])),
            ),
        },
        Op {
            method: "patch",
            path: "/api/v1/users/{id}",
            summary: "Changes a user's role, disabled flag or password (ends its sessions when \
                      disabling or changing the password). The last enabled admin cannot be \
                      demoted or disabled.",
            auth: Auth::User("admin"),
            query: &[],
            body: Some(object(&[
                ("role", en(&["admin", "operator", "viewer"]), false),
                ("disabled", boolean(), false),
                ("password", s(), false),
            ])),
            ok: (200, Some(r("User"))),
        },
        Op {
            method: "delete",
            path: "/api/v1/users/{id}",
            summary: "Deletes a user (not the last enabled admin).",
            auth: Auth::User("admin"),
            query: &[],
            body: None,
            ok: (204, None),
        },
        Op {
            method: "get",
            path: "/api/v1/audit-log",
            summary: "Who changed what, newest first.",
            auth: Auth::User("admin"),
            query: PAGE,
            body: None,
            ok: (200, Some(array(r("AuditEntry")))),
        },
        Op {
            method: "post",
            path: "/api/v1/enrollment-tokens",
            summary: "A one-time agent enrollment token (shown once).",
            auth: Auth::User("operator"),
            query: &[],
            body: Some(object(&[("group", s(), false), ("ttl_secs", int(), false)])),
            ok: (
                201,
                Some(object(&[
                    ("id", int(), true),
                    ("token", s(), true),
                    ("group", s(), true),
                    ("expires_at", time(), true),
                ])),
            ),
        },
        Op {
            method: "post",
            path: "/api/v1/agent/enroll",
            summary: "Trades an enrollment token for the agent's credential (shown once, stored \
                      hashed).",
            auth: Auth::None,
            query: &[],
            body: Some(object(&[
                ("token", s(), true),
                ("hostname", s(), true),
                ("addresses", array(s()), false),
                ("version", s(), false),
            ])),
            ok: (
                201,
                Some(object(&[
                    ("agent_id", int(), true),
                    ("name", s(), true),
                    ("credential", s(), true),
                ])),
            ),
        },
        Op {
            method: "post",
            path: "/api/v1/agent/flows",
            summary: "New redirected or reflected flows from the agent's kernel program (its \
                      flow log lines), up to 1000 per report. A sandbox session whose \
                      `nat_mapping.nat` is a flow's `nat` is attributed to that flow's attacker.",
            auth: Auth::Agent,
            query: &[],
            body: Some(object(&[(
                "flows",
                json!({ "type": "array", "minItems": 1, "maxItems": 1000, "items": object(&[
                    ("kind", en(&["redirect", "reflect"]), true),
                    ("model", en(&["preserve-source", "full-nat"]), true),
                    ("proto", en(&["tcp", "udp"]), true),
                    ("attacker", s(), true),
                    ("orig_dst", s(), true),
                    ("target", s(), true),
                    ("nat", s(), true),
                    ("ts_ns", int(), false),
                ]) }),
                true,
            )])),
            ok: (200, Some(object(&[("accepted", int(), true)]))),
        },
        Op {
            method: "post",
            path: "/api/v1/agent/heartbeat",
            summary: "The agent's state and kernel counters (what `mirage-agent top --json` \
                      prints: global counters and up to 1000 top sources with packets and bytes \
                      per action). Every field is optional; a heartbeat without `counters` keeps \
                      the last report.",
            auth: Auth::Agent,
            query: &[],
            body: Some(object(&[
                (
                    "mode",
                    en(&["honeypot", "unreal", "reflect", "firewall"]),
                    false,
                ),
                ("version", s(), false),
                ("applied_revision", int(), false),
                (
                    "counters",
                    object(&[
                        (
                            "global",
                            json!({ "type": "object", "additionalProperties": { "type": "integer" } }),
                            false,
                        ),
                        (
                            "sources",
                            json!({ "type": "array", "maxItems": 1000, "items": object(&[
                            ("addr", s(), true),
                            ("packets", r("PerAction"), false),
                            ("bytes", r("PerAction"), false),
                            ("total_packets", int(), false),
                            ("total_bytes", int(), false),
                            ("last_seen_secs_ago", json!({ "type": "number", "minimum": 0 }), false),
                        ]) }),
                            false,
                        ),
                    ]),
                    false,
                ),
            ])),
            ok: (200, Some(r("Agent"))),
        },
        Op {
            method: "get",
            path: "/api/v1/agent/stream",
            summary: "Server-sent events: a `snapshot` (or the `delta`s after `Last-Event-ID` / \
                      `since` while the log holds them), then one `delta` per revision. Each \
                      event's id is its revision.",
            auth: Auth::Agent,
            query: &[("since", "integer", "The last revision applied.")],
            body: None,
            ok: (200, Some(s())),
        },
        Op {
            method: "post",
            path: "/api/v1/agent/policy",
            summary: "The poll interface: a snapshot, or the deltas after `since`.",
            auth: Auth::Agent,
            query: &[],
            body: Some(object(&[("since", int(), false)])),
            ok: (200, Some(r("Update"))),
        },
        Op {
            method: "get",
            path: "/api/v1/agents",
            summary: "Every agent with its state and last reported counters.",
            auth: Auth::User("viewer"),
            query: &[],
            body: None,
            ok: (200, Some(array(r("Agent")))),
        },
        Op {
            method: "delete",
            path: "/api/v1/agents/{id}",
            summary: "Revokes an agent's credential (ends its streams on every replica).",
            auth: Auth::User("operator"),
            query: &[],
            body: None,
            ok: (204, None),
        },
        Op {
            method: "get",
            path: "/api/v1/attackers",
            summary: "Attacker entries, newest first; `q` finds entries overlapping an address \
                      or range.",
            auth: Auth::User("viewer"),
            query: &[
                ("q", "string", "Address or range."),
                ("limit", "integer", "Page size (≤ 1000)."),
                ("before", "integer", "Only ids below this."),
            ],
            body: None,
            ok: (200, Some(array(r("Attacker")))),
        },
        Op {
            method: "post",
            path: "/api/v1/attackers",
            summary: "Blocks an address or range (or changes the entry for it). Refused if it \
                      overlaps the allowlist; ranges broader than /16 (IPv4) or /32 (IPv6) need \
                      `force` (admin).",
            auth: Auth::User("operator"),
            query: &[],
            body: Some(object(&[
                ("net", net(), true),
                ("action", action.clone(), false),
                ("ttl_secs", int(), false),
                ("reason", s(), false),
                ("group", s(), false),
                ("force", boolean(), false),
            ])),
            ok: (201, Some(r("Attacker"))),
        },
        Op {
            method: "delete",
            path: "/api/v1/attackers/{id}",
            summary: "Unblocks an entry.",
            auth: Auth::User("operator"),
            query: &[],
            body: None,
            ok: (204, None),
        },
        Op {
            method: "post",
            path: "/api/v1/allowlist",
            summary: "Adds a range to a group's allowlist (every group's when `group` is \
                      absent). Allowlisted sources are never dropped, redirected or reflected.",
            auth: Auth::User("operator"),
            query: &[],
            body: Some(object(&[
                ("net", net(), true),
                ("group", s(), false),
                ("force", boolean(), false),
            ])),
            ok: (200, Some(any_object())),
        },
        Op {
            method: "delete",
            path: "/api/v1/allowlist",
            summary: "Removes a range from a group's allowlist.",
            auth: Auth::User("operator"),
            query: &[],
            body: Some(object(&[
                ("net", net(), true),
                ("group", s(), false),
                ("force", boolean(), false),
            ])),
            ok: (200, Some(any_object())),
        },
        Op {
            method: "get",
            path: "/api/v1/allowlists",
            summary: "The union of every group's allowlist (deduplicated, sorted) and the \
                      policy head revision it was read at: the sources a mirage-server never \
                      flags.",
            auth: Auth::Service,
            query: &[],
            body: None,
            ok: (
                200,
                Some(object(&[
                    ("networks", array(net()), true),
                    ("revision", int(), true),
                ])),
            ),
        },
        Op {
            method: "get",
            path: "/api/v1/attackers/{id}",
            summary: "One entry with the evidence that caught it and what it did in the sandbox \
                      (detections and sessions with its id or from an address inside it; up to \
                      200 each, newest first).",
            auth: Auth::User("viewer"),
            query: &[],
            body: None,
            ok: (
                200,
                Some(object(&[
                    ("attacker", r("Attacker"), true),
                    ("detections", array(r("Detection")), true),
                    ("sessions", array(r("SandboxSession")), true),
                ])),
            ),
        },
        Op {
            method: "post",
            path: "/api/v1/verdicts",
            summary: "A batch of 1 to 1000 detections from a mirage-server, idempotent on `id` \
                      (a retried batch stores nothing twice and takes no revision). Each new \
                      detection adds or extends an automatic attacker entry for its address or \
                      IPv6 prefix (never one overlapping any allowlist; a manual entry only gets \
                      its counters bumped). The whole \
                      batch is validated first: one bad item is a 400 naming it, and nothing is \
                      stored.",
            auth: Auth::Service,
            query: &[],
            body: Some(object(&[("verdicts", array(r("Verdict")), true)])),
            ok: (
                200,
                Some(object(&[
                    ("accepted", int(), true),
                    ("duplicates", int(), true),
                    ("allowlisted", int(), true),
                    ("revision", int(), true),
                ])),
            ),
        },
        Op {
            method: "get",
            path: "/api/v1/detections",
            summary: "The attack log, newest first.",
            auth: Auth::User("viewer"),
            query: &[
                ("attacker_id", "integer", "Only this attacker entry's."),
                ("addr", "string", "Only from this address or range."),
                ("service", "string", "Only this service's."),
                ("rule", "string", "Only this rule's."),
                ("limit", "integer", "Page size (default 100, at most 1000)."),
                ("before", "integer", "Only ids below this."),
            ],
            body: None,
            ok: (200, Some(array(r("Detection")))),
        },
        Op {
            method: "get",
            path: "/api/v1/events",
            summary: "Server-sent events for live views: `event: detection` (id = detection id) \
                      for each new detection, resuming after `Last-Event-ID` or `since`.",
            auth: Auth::User("viewer"),
            query: &[("since", "integer", "The last detection id seen.")],
            body: None,
            ok: (200, Some(s())),
        },
        Op {
            method: "get",
            path: "/api/v1/sandbox-sessions",
            summary: "Sandbox session records, newest first.",
            auth: Auth::User("viewer"),
            query: &[
                ("attacker_id", "integer", "Only this attacker entry's."),
                ("addr", "string", "Only from this address or range."),
                ("limit", "integer", "Page size."),
                ("before", "integer", "Only ids below this."),
            ],
            body: None,
            ok: (200, Some(array(r("SandboxSession")))),
        },
        Op {
            method: "post",
            path: "/api/v1/sandbox-sessions",
            summary: "Up to 500 session records from a sandbox; idempotent on `id` (a repeated \
                      id replaces the record: sessions are reported while still open).",
            auth: Auth::Service,
            query: &[],
            body: Some(object(&[("sessions", array(r("SessionReport")), true)])),
            ok: (
                200,
                Some(object(&[
                    ("inserted", int(), true),
                    ("updated", int(), true),
                ])),
            ),
        },
        Op {
            method: "get",
            path: "/api/v1/stats",
            summary: "Dashboard figures over the last `hours` (1 to 720): detections per hour, \
                      top attackers, per service and severity, agent health, live entries.",
            auth: Auth::User("viewer"),
            query: &[("hours", "integer", "Window (default 24).")],
            body: None,
            ok: (200, Some(any_object())),
        },
        Op {
            method: "get",
            path: "/api/v1/settings/retention",
            summary: "How many days each kind of record is kept.",
            auth: Auth::User("viewer"),
            query: &[],
            body: None,
            ok: (200, Some(r("Retention"))),
        },
        Op {
            method: "put",
            path: "/api/v1/settings/retention",
            summary: "Changes retention (each 1 to 3650 days; keys left out keep their value).",
            auth: Auth::User("admin"),
            query: &[],
            body: Some(r("Retention")),
            ok: (200, Some(r("Retention"))),
        },
        Op {
            method: "get",
            path: "/api/v1/alert-channels",
            summary: "Every alert channel; secrets (SMTP password, webhook secret) shown as \
                      `********`.",
            auth: Auth::User("viewer"),
            query: &[],
            body: None,
            ok: (200, Some(array(r("AlertChannel")))),
        },
        Op {
            method: "post",
            path: "/api/v1/alert-channels",
            summary: "A new channel: `email` (SMTP), `webhook` (generic JSON, optional HMAC \
                      signature) or `slack` (Slack-compatible webhook). See docs/alerts.md.",
            auth: Auth::User("admin"),
            query: &[],
            body: Some(r("NewAlertChannel")),
            ok: (201, Some(r("AlertChannel"))),
        },
        Op {
            method: "patch",
            path: "/api/v1/alert-channels/{id}",
            summary: "Changes a channel; a redacted secret sent back unchanged keeps the stored \
                      one.",
            auth: Auth::User("admin"),
            query: &[],
            body: Some(any_object()),
            ok: (200, Some(r("AlertChannel"))),
        },
        Op {
            method: "delete",
            path: "/api/v1/alert-channels/{id}",
            summary: "Deletes a channel and its delivery log.",
            auth: Auth::User("admin"),
            query: &[],
            body: None,
            ok: (204, None),
        },
        Op {
            method: "post",
            path: "/api/v1/alert-channels/{id}/test",
            summary: "Sends a test message now; the answer is the recorded delivery (`sent`, or \
                      `failed` with `last_error`).",
            auth: Auth::User("admin"),
            query: &[],
            body: None,
            ok: (200, Some(any_object())),
        },
        Op {
            method: "get",
            path: "/api/v1/alert-deliveries",
            summary: "The alert message log, newest first: status, how many detections each \
                      message or digest covers, attempts, last error.",
            auth: Auth::User("viewer"),
            query: &[
                ("channel_id", "integer", "Only this channel's."),
                ("limit", "integer", "Page size."),
                ("before", "integer", "Only ids below this."),
            ],
            body: None,
            ok: (200, Some(array(any_object()))),
        },
        Op {
            method: "get",
            path: "/api/v1/groups",
            summary: "Every agent group with its agent counts and its policy.",
            auth: Auth::User("viewer"),
            query: &[],
            body: None,
            ok: (200, Some(array(r("Group")))),
        },
        Op {
            method: "post",
            path: "/api/v1/groups",
            summary: "Creates a group with the default policy.",
            auth: Auth::User("admin"),
            query: &[],
            body: Some(object(&[("name", s(), true), ("description", s(), false)])),
            ok: (201, Some(r("Group"))),
        },
        Op {
            method: "delete",
            path: "/api/v1/groups/{name}",
            summary: "Deletes a group; 409 for `default` and while agents or unused enrollment \
                      tokens belong to it.",
            auth: Auth::User("admin"),
            query: &[],
            body: None,
            ok: (204, None),
        },
        Op {
            method: "get",
            path: "/api/v1/groups/{name}/policy",
            summary: "A group's policy.",
            auth: Auth::User("viewer"),
            query: &[],
            body: None,
            ok: (200, Some(r("PolicyView"))),
        },
        Op {
            method: "put",
            path: "/api/v1/groups/{name}/policy",
            summary: "Replaces a group's whole policy (validated; see docs/policies.md). A change \
                      takes a policy revision that the group's agents receive as a delta; an \
                      unchanged PUT takes none. `expected_revision` gives optimistic \
                      concurrency (409 when the policy changed since).",
            auth: Auth::User("operator"),
            query: &[],
            body: Some(r("PolicyBody")),
            ok: (
                200,
                Some(object(&[
                    ("policy", r("PolicyView"), true),
                    ("changed", boolean(), true),
                    ("changes", any_object(), true),
                    ("shadowed", array(any_object()), true),
                ])),
            ),
        },
        Op {
            method: "get",
            path: "/api/v1/service-credentials",
            summary: "mirage-server and sandbox credentials (never the secrets).",
            auth: Auth::User("admin"),
            query: &[],
            body: None,
            ok: (200, Some(array(r("ServiceCredential")))),
        },
        Op {
            method: "post",
            path: "/api/v1/service-credentials",
            summary: "Creates a service credential (shown once, stored hashed).",
            auth: Auth::User("admin"),
            query: &[],
            body: Some(object(&[("name", s(), true)])),
            ok: (201, Some(any_object())),
        },
        Op {
            method: "delete",
            path: "/api/v1/service-credentials/{id}",
            summary: "Revokes a service credential.",
            auth: Auth::User("admin"),
            query: &[],
            body: None,
            ok: (204, None),
        },
    ]
}

fn schemas() -> Value {
    let action = en(&["default", "drop", "redirect", "reflect", "pass"]);
    json!({
        "Error": object(&[("error", s(), true)]),
        "User": object(&[
            ("id", int(), true),
            ("username", s(), true),
            ("role", en(&["admin", "operator", "viewer"]), true),
            ("disabled", boolean(), true),
            ("created_at", time(), true),
            ("updated_at", time(), true),
        ]),
        "Session": object(&[
            ("user", r("User"), true),
            ("csrf_token", s(), true),
            ("expires_at", time(), true),
        ]),
        "AuditEntry": object(&[
            ("id", int(), true),
            ("actor_user_id", opt(int()), true),
            ("actor", s(), true),
            ("action", s(), true),
            ("target", opt(s()), true),
            ("details", any_object(), true),
            ("ip", opt(s()), true),
            ("at", time(), true),
        ]),
        "Agent": object(&[
            ("id", int(), true),
            ("group_id", int(), true),
            ("name", s(), true),
            ("hostname", s(), true),
            ("addresses", array(s()), true),
            ("mode", opt(s()), true),
            ("version", opt(s()), true),
            ("enrolled_at", time(), true),
            ("revoked_at", opt(time()), true),
            ("last_heartbeat", opt(time()), true),
            ("applied_revision", opt(int()), true),
            ("counters_at", opt(time()), true),
            ("counters", json!({ "type": "object", "description": "GET /api/v1/agents only: {global: {name: n}, sources: [{addr, actions: {drop: {packets, bytes}, ...}, total_packets, total_bytes, last_seen}]}" }), false),
        ]),
        "PerAction": object(&[
            ("pass", int(), false),
            ("drop", int(), false),
            ("redirect", int(), false),
            ("reflect", int(), false),
        ]),
        "ServiceCredential": object(&[
            ("id", int(), true),
            ("name", s(), true),
            ("created_at", time(), true),
            ("revoked_at", opt(time()), true),
            ("last_used_at", opt(time()), true),
        ]),
        "Attacker": object(&[
            ("id", int(), true),
            ("group_id", opt(int()), true),
            ("net", net(), true),
            ("action", action.clone(), true),
            ("reason", s(), true),
            ("rule", opt(s()), true),
            ("service", opt(s()), true),
            ("evidence_count", int(), true),
            ("first_seen", time(), true),
            ("last_seen", time(), true),
            ("expires_at", opt(time()), true),
            ("manual", boolean(), true),
            ("reported_by", array(s()), true),
            ("revision", int(), true),
        ]),
        "Policy": object(&[
            ("group_id", int(), true),
            ("mode", en(&["honeypot", "unreal", "reflect", "firewall"]), true),
            ("redirect_model", en(&["preserve-source", "full-nat"]), true),
            ("allowlist", array(net()), true),
            ("allowlisted_ports", array(json!({ "type": "string", "description": "`tcp/22`, `udp/53`" })), true),
            ("sandbox_targets", array(r("SandboxTarget")), true),
            ("nat", r("Nat"), true),
            ("default_ttl_secs", opt(int()), true),
            ("default_action", action.clone(), true),
            ("revision", int(), true),
        ]),
        "PolicyView": {
            "allOf": [r("Policy"), object(&[
                ("group", s(), true),
                ("updated_at", time(), true),
                ("updated_by", opt(s()), true),
            ])]
        },
        "PolicyBody": object(&[
            ("mode", en(&["honeypot", "unreal", "reflect", "firewall"]), true),
            ("redirect_model", en(&["preserve-source", "full-nat"]), true),
            ("allowlist", array(net()), true),
            ("allowlisted_ports", array(s()), true),
            ("sandbox_targets", array(r("SandboxTarget")), true),
            ("nat", r("Nat"), true),
            ("default_ttl_secs", opt(int()), true),
            ("default_action", action.clone(), true),
            ("expected_revision", int(), false),
            ("force", boolean(), false),
        ]),
        "SandboxTarget": object(&[
            ("proto", en(&["tcp", "udp"]), false),
            ("port", json!({ "type": "integer", "minimum": 1, "maximum": 65535 }), false),
            ("target", json!({ "type": "string", "description": "`ADDR` or `ADDR:PORT` (IPv6 as `[ADDR]:PORT`); without proto/port: the default target" }), true),
        ]),
        "Nat": object(&[
            ("snat_v4", opt(s()), false),
            ("snat_v6", opt(s()), false),
            ("nat_ports", opt(json!({ "description": "`LOW-HIGH` or [LOW, HIGH]" })), false),
            ("reflect_pps", opt(int()), false),
        ]),
        "Group": any_object(),
        "AlertChannel": object(&[
            ("id", int(), true),
            ("name", s(), true),
            ("kind", en(&["email", "webhook", "slack"]), true),
            ("config", any_object(), true),
            ("min_severity", en(&["info", "low", "medium", "high", "critical"]), true),
            ("enabled", boolean(), true),
            ("dedup_window_secs", int(), true),
            ("max_per_hour", int(), true),
            ("created_at", time(), true),
            ("updated_at", time(), true),
        ]),
        "NewAlertChannel": object(&[
            ("name", s(), true),
            ("kind", en(&["email", "webhook", "slack"]), true),
            ("config", json!({ "type": "object", "description": "email: {host, port, tls: none|starttls|tls, username?, password?, from, to: [...]}; webhook: {url, secret?}; slack: {url}" }), true),
            ("min_severity", en(&["info", "low", "medium", "high", "critical"]), false),
            ("enabled", boolean(), false),
            ("dedup_window_secs", int(), false),
            ("max_per_hour", int(), false),
        ]),
        "Verdict": object(&[
            ("id", json!({ "type": "string", "minLength": 1, "maxLength": 128, "description": "Idempotency key chosen by the server." }), true),
            ("addr", json!({ "type": "string", "description": "One unicast address (IPv4-mapped IPv6 is folded to IPv4), or an IPv6 prefix of /48 to /128 with its host bits zero (`2001:db8:1:2::/64`) for rules that aggregate IPv6 sources: its entry is the prefix, refused as allowlisted if it overlaps any allowlist entry, and its detection records the prefix's first address. IPv4 only as a single address or /32." }), true),
            ("rule", s(), true),
            ("service", s(), true),
            ("severity", en(&["info", "low", "medium", "high", "critical"]), true),
            ("action", en(&["default", "drop", "redirect", "reflect"]), false),
            ("count", json!({ "type": "integer", "minimum": 1 }), false),
            ("evidence", json!({ "type": "array", "maxItems": 100, "items": { "type": "string", "maxLength": 4096 } }), false),
            ("at", time(), true),
            ("group", s(), false),
        ]),
        "Detection": object(&[
            ("id", int(), true),
            ("key", s(), true),
            ("server", s(), true),
            ("addr", s(), true),
            ("attacker_id", opt(int()), true),
            ("rule", s(), true),
            ("service", s(), true),
            ("severity", en(&["info", "low", "medium", "high", "critical"]), true),
            ("action", opt(s()), true),
            ("count", int(), true),
            ("evidence", array(s()), true),
            ("group", opt(s()), true),
            ("allowlisted", boolean(), true),
            ("at", time(), true),
            ("received_at", time(), true),
        ]),
        "SessionReport": object(&[
            ("id", s(), true),
            ("sandbox", s(), true),
            ("addr", s(), true),
            ("service", s(), true),
            ("credentials", array(object(&[("user", s(), true), ("password", s(), true), ("at", time(), true)])), false),
            ("commands", array(object(&[("input", s(), true), ("at", time(), true)])), false),
            ("files", array(object(&[("path", s(), true), ("sha256", s(), true), ("size", int(), true), ("at", time(), true)])), false),
            ("nat_mapping", any_object(), false),
            ("started_at", time(), true),
            ("ended_at", time(), false),
        ]),
        "SandboxSession": object(&[
            ("id", int(), true),
            ("key", opt(s()), true),
            ("sandbox", s(), true),
            ("addr", s(), true),
            ("attacker_id", opt(int()), true),
            ("service", s(), true),
            ("credentials", array(any_object()), true),
            ("commands", array(any_object()), true),
            ("files", array(any_object()), true),
            ("nat_mapping", opt(any_object()), true),
            ("started_at", time(), true),
            ("ended_at", opt(time()), true),
        ]),
        "Retention": object(&[
            ("detections_days", int(), false),
            ("sandbox_sessions_days", int(), false),
            ("audit_log_days", int(), false),
            ("login_attempts_days", int(), false),
            ("policy_revisions_days", int(), false),
        ]),
        "Revision": object(&[
            ("revision", int(), true),
            ("group_id", opt(int()), true),
            ("op", en(&["add", "remove", "update", "policy"]), true),
            ("net", opt(net()), false),
            ("action", opt(action.clone()), false),
            ("expires_at", opt(time()), false),
            ("details", any_object(), true),
        ]),
        "Update": {
            "oneOf": [
                object(&[
                    ("kind", en(&["snapshot"]), true),
                    ("revision", int(), true),
                    ("policy", any_object(), true),
                    ("attackers", array(object(&[
                        ("net", net(), true),
                        ("action", action, true),
                        ("expires_at", time(), false),
                        ("group_id", opt(int()), true),
                    ])), true),
                ]),
                object(&[
                    ("kind", en(&["deltas"]), true),
                    ("revision", int(), true),
                    ("deltas", array(r("Revision")), true),
                ]),
            ]
        },
    })
}

fn build() -> Value {
    let mut paths = Map::new();
    for op in ops() {
        let mut o = Map::new();
        o.insert("summary".into(), op.summary.into());
        let mut params: Vec<Value> = op
            .query
            .iter()
            .map(|(name, ty, desc)| {
                json!({ "name": name, "in": "query", "required": false,
                        "description": desc, "schema": { "type": ty } })
            })
            .collect();
        for segment in op.path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let schema = if name == "id" { int() } else { s() };
                params.push(
                    json!({ "name": name, "in": "path", "required": true, "schema": schema }),
                );
            }
        }
        if !params.is_empty() {
            o.insert("parameters".into(), params.into());
        }
        if let Some(body) = op.body {
            o.insert(
                "requestBody".into(),
                json!({ "required": true, "content": { "application/json": { "schema": body } } }),
            );
        }
        let (status, schema) = op.ok;
        let mut responses = Map::new();
        let content_type = match op.path {
            "/metrics" => "text/plain",
            "/api/v1/agent/stream" => "text/event-stream",
            _ => "application/json",
        };
        responses.insert(
            status.to_string(),
            match schema {
                Some(schema) => json!({ "description": "Success.",
                    "content": { content_type: { "schema": schema } } }),
                None => json!({ "description": "Success (no body)." }),
            },
        );
        let error = json!({ "content": { "application/json": { "schema": r("Error") } } });
        let mut err = |code: &str, desc: &str| {
            let mut e = error.clone();
            e["description"] = desc.into();
            responses.insert(code.into(), e);
        };
        err(
            "400",
            "Invalid input: the message says which field and why.",
        );
        match op.auth {
            Auth::None => {}
            Auth::User(role) => {
                o.insert("security".into(), json!([{ "session": [] }]));
                o.insert("x-min-role".into(), role.into());
                err("401", "No valid session.");
                err(
                    "403",
                    "The role is too low, or the CSRF token is missing or wrong.",
                );
            }
            Auth::Agent => {
                o.insert("security".into(), json!([{ "agent": [] }]));
                err("401", "Missing, unknown or revoked agent credential.");
            }
            Auth::Service => {
                o.insert("security".into(), json!([{ "service": [] }]));
                err("401", "Missing, unknown or revoked service credential.");
            }
        }
        o.insert("responses".into(), responses.into());
        let entry = paths
            .entry(op.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[op.method] = Value::Object(o);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "mirage-manager API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The control plane of Mirage: users, agents, policies, attackers, \
                evidence and alerts. Browser clients authenticate with the session cookie from \
                /api/v1/login and send the session's CSRF token in X-CSRF-Token on every \
                state-changing request; agents and servers send Authorization: Bearer <credential>. \
                Errors are {\"error\": \"...\"}.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "session": { "type": "apiKey", "in": "cookie", "name": "__Host-mirage_session",
                    "description": "Named mirage_session when cookie_secure = false." },
                "agent": { "type": "http", "scheme": "bearer", "description": "Agent credential from enrollment." },
                "service": { "type": "http", "scheme": "bearer", "description": "Service credential (mirage-server, sandbox)." },
            },
            "schemas": schemas(),
        },
    })
}

/// Every documented `(METHOD, path)` (for the tests).
pub fn operations() -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(paths) = document()["paths"].as_object() {
        for (path, item) in paths {
            if let Some(item) = item.as_object() {
                for method in item.keys() {
                    out.push((method.to_uppercase(), path.clone()));
                }
            }
        }
    }
    out
}
