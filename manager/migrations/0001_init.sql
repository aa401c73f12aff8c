-- mirage-manager schema, version 1: every table issue 4 needs, so that later work adds behaviour
-- rather than tables. Conventions:
--   * ids are `bigint GENERATED ALWAYS AS IDENTITY`; times are `timestamptz`;
--   * closed sets (roles, modes, actions, severities) are `text` with a CHECK, not enum types:
--     sqlx reads and binds them as plain strings, and adding a value is one ALTER of a constraint;
--   * addresses are PostgreSQL `inet` (one address) or `cidr` (a range, host bits zero), so
--     containment (`>>=`) and GiST indexes work in the database; the Rust side uses `ipnet`;
--   * secrets (session tokens, agent and service credentials, enrollment tokens) are stored only as
--     SHA-256 digests (`bytea`): they are 256-bit random values, so a fast hash is enough, and a
--     leaked table reveals nothing usable. Passwords are argon2id PHC strings.

-- Identity and access ---------------------------------------------------------------------------

CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Lower-case, validated by the manager.
    username      text        NOT NULL UNIQUE,
    -- argon2id PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash).
    password_hash text        NOT NULL,
    role          text        NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    disabled      boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- SHA-256 of the cookie's token.
    token_hash   bytea       NOT NULL UNIQUE,
    user_id      bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- Sent back in X-CSRF-Token on every state-changing request.
    csrf_token   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    ip           inet,
    user_agent   text
);
CREATE INDEX sessions_user_id ON sessions (user_id);
CREATE INDEX sessions_expires_at ON sessions (expires_at);

-- Every login attempt, for throttling (failures per username and per address in a window) and
-- for the record. `throttled` attempts were refused before the password was checked.
CREATE TABLE login_attempts (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username  text        NOT NULL,
    ip        inet,
    outcome   text        NOT NULL CHECK (outcome IN ('success', 'failure', 'throttled')),
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_attempts_username_at ON login_attempts (username, at) WHERE outcome = 'failure';
CREATE INDEX login_attempts_ip_at ON login_attempts (ip, at) WHERE outcome = 'failure';
CREATE INDEX login_attempts_at ON login_attempts (at);

-- Who changed what, when. `actor` is a snapshot (the username, or `system`, `cli`, `agent:NAME`,
-- `server:NAME`) so that rows stay readable after the user is deleted.
CREATE TABLE audit_log (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor_user_id bigint      REFERENCES users (id) ON DELETE SET NULL,
    actor         text        NOT NULL,
    action        text        NOT NULL,
    target        text,
    details       jsonb       NOT NULL DEFAULT '{}',
    ip            inet,
    at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_actor_user_id ON audit_log (actor_user_id);

-- Agents and their policy -----------------------------------------------------------------------

CREATE TABLE agent_groups (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    description text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One policy per group: what its agents enforce besides the attacker list.
CREATE TABLE policies (
    group_id          bigint      PRIMARY KEY REFERENCES agent_groups (id) ON DELETE CASCADE,
    mode              text        NOT NULL DEFAULT 'unreal'
                                  CHECK (mode IN ('honeypot', 'unreal', 'reflect', 'firewall')),
    redirect_model    text        NOT NULL DEFAULT 'preserve-source'
                                  CHECK (redirect_model IN ('preserve-source', 'full-nat')),
    -- Sources never dropped, redirected or reflected.
    allowlist         cidr[]      NOT NULL DEFAULT '{}',
    -- Honeypot mode: ports left to the real services, as `tcp/22`, `udp/53`.
    allowlisted_ports text[]      NOT NULL DEFAULT '{}',
    -- [{"port": 22, "proto": "tcp", "target": "198.18.1.2:2222"}, {"target": "198.18.1.2"}]
    sandbox_targets   jsonb       NOT NULL DEFAULT '[]',
    -- full-nat source addresses and ports, reflect cap: {"snat_v4": ..., "reflect_pps": 100}.
    nat               jsonb       NOT NULL DEFAULT '{}',
    -- Lifetime of automatic attacker entries; NULL = until removed.
    default_ttl_secs  bigint      CHECK (default_ttl_secs > 0),
    -- Action for automatic attacker entries: `default` = the mode's.
    default_action    text        NOT NULL DEFAULT 'default'
                                  CHECK (default_action IN ('default', 'drop', 'redirect', 'reflect', 'pass')),
    -- The policy_revisions revision of the last change to this row.
    revision          bigint      NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    updated_by        bigint      REFERENCES users (id) ON DELETE SET NULL
);

CREATE TABLE agents (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    group_id         bigint      NOT NULL REFERENCES agent_groups (id),
    name             text        NOT NULL UNIQUE,
    hostname         text        NOT NULL DEFAULT '',
    addresses        inet[]      NOT NULL DEFAULT '{}',
    -- As reported by the agent (its effective mode), which may lag the policy.
    mode             text,
    version          text,
    -- SHA-256 of the per-agent credential issued at enrollment.
    credential_hash  bytea       NOT NULL UNIQUE,
    enrolled_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz,
    last_heartbeat   timestamptz,
    -- The last policy revision the agent reported applied.
    applied_revision bigint,
    -- Latest report: global counters and top sources with packets/bytes per action.
    counters         jsonb       NOT NULL DEFAULT '{}',
    counters_at      timestamptz
);
CREATE INDEX agents_group_id ON agents (group_id);
CREATE INDEX agents_last_heartbeat ON agents (last_heartbeat);

CREATE TABLE enrollment_tokens (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash     bytea       NOT NULL UNIQUE,
    group_id       bigint      NOT NULL REFERENCES agent_groups (id) ON DELETE CASCADE,
    created_by     bigint      REFERENCES users (id) ON DELETE SET NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,
    used_by_agent  bigint      REFERENCES agents (id) ON DELETE SET NULL
);
CREATE INDEX enrollment_tokens_expires_at ON enrollment_tokens (expires_at) WHERE used_at IS NULL;

-- Credentials of mirage-server instances (verdict ingestion).
CREATE TABLE service_credentials (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text        NOT NULL UNIQUE,
    credential_hash bytea       NOT NULL UNIQUE,
    created_by      bigint      REFERENCES users (id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    last_used_at    timestamptz
);

-- Attackers and the policy change log ------------------------------------------------------------

CREATE TABLE attackers (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- NULL: every group.
    group_id       bigint      REFERENCES agent_groups (id) ON DELETE CASCADE,
    -- One address (/32, /128) or a range. The manager refuses over-broad ranges on input; this
    -- CHECK is the last line against a 0.0.0.0/0-style entry.
    net            cidr        NOT NULL
                               CHECK (masklen(net) >= CASE family(net) WHEN 4 THEN 8 ELSE 16 END),
    action         text        NOT NULL DEFAULT 'default'
                               CHECK (action IN ('default', 'drop', 'redirect', 'reflect', 'pass')),
    reason         text        NOT NULL DEFAULT '',
    rule           text,
    service        text,
    evidence_count bigint      NOT NULL DEFAULT 0,
    first_seen     timestamptz NOT NULL DEFAULT now(),
    last_seen      timestamptz NOT NULL DEFAULT now(),
    -- NULL: until removed. Swept through attackers_expires_at, never by a full scan.
    expires_at     timestamptz,
    manual         boolean     NOT NULL DEFAULT false,
    -- Names of the servers/agents that reported it.
    reported_by    text[]      NOT NULL DEFAULT '{}',
    created_by     bigint      REFERENCES users (id) ON DELETE SET NULL,
    -- The policy_revisions revision of the last change to this row.
    revision       bigint      NOT NULL DEFAULT 0,
    UNIQUE NULLS NOT DISTINCT (group_id, net)
);
CREATE INDEX attackers_expires_at ON attackers (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX attackers_net ON attackers USING gist (net inet_ops);
CREATE INDEX attackers_last_seen ON attackers (last_seen);

-- The head of the policy change log. Writers take the next revision with
--   UPDATE policy_head SET revision = revision + 1 RETURNING revision
-- inside their transaction: the row lock serializes them until commit, so revisions are gapless
-- and become visible in order. (A sequence would not do: a reader could see revision 11 committed
-- before 10, resume from 11 and miss 10 for good.)
CREATE TABLE policy_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    revision  bigint  NOT NULL DEFAULT 0
);
INSERT INTO policy_head DEFAULT VALUES;

-- The change log agents resume from: one row per change, in revision order.
CREATE TABLE policy_revisions (
    revision    bigint      PRIMARY KEY,
    -- NULL: every group.
    group_id    bigint      REFERENCES agent_groups (id) ON DELETE CASCADE,
    -- add/remove/update: an attacker entry; policy: the group's policy row changed.
    op          text        NOT NULL CHECK (op IN ('add', 'remove', 'update', 'policy')),
    net         cidr,
    action      text        CHECK (action IN ('default', 'drop', 'redirect', 'reflect', 'pass')),
    expires_at  timestamptz,
    details     jsonb       NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL DEFAULT now(),
    CHECK (op = 'policy' OR net IS NOT NULL)
);
CREATE INDEX policy_revisions_at ON policy_revisions (at);

-- Evidence ---------------------------------------------------------------------------------------

CREATE TABLE detections (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Chosen by the reporting server; a retried batch inserts nothing twice.
    idempotency_key text        NOT NULL UNIQUE,
    server_name     text        NOT NULL,
    attacker_addr   inet        NOT NULL,
    attacker_id     bigint      REFERENCES attackers (id) ON DELETE SET NULL,
    rule            text        NOT NULL,
    service         text        NOT NULL,
    severity        text        NOT NULL
                                CHECK (severity IN ('info', 'low', 'medium', 'high', 'critical')),
    -- The raw log lines that matched.
    evidence        text[]      NOT NULL DEFAULT '{}',
    -- When it happened (server clock) and when the manager got it.
    at              timestamptz NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX detections_at ON detections (at);
CREATE INDEX detections_attacker_addr ON detections USING gist (attacker_addr inet_ops);
CREATE INDEX detections_attacker_id ON detections (attacker_id);

CREATE TABLE sandbox_sessions (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key text        UNIQUE,
    sandbox_name    text        NOT NULL DEFAULT '',
    attacker_addr   inet        NOT NULL,
    attacker_id     bigint      REFERENCES attackers (id) ON DELETE SET NULL,
    service         text        NOT NULL,
    -- [{"user": "root", "password": "123456", "at": "..."}]
    credentials     jsonb       NOT NULL DEFAULT '[]',
    -- [{"input": "uname -a", "at": "..."}]
    commands        jsonb       NOT NULL DEFAULT '[]',
    -- [{"path": "/tmp/x", "sha256": "...", "size": 1234, "at": "..."}]
    files           jsonb       NOT NULL DEFAULT '[]',
    -- full-nat: {"nat": "198.18.1.1:20001", "orig_dst": "...", "target": "..."} to attribute it.
    nat_mapping     jsonb,
    started_at      timestamptz NOT NULL,
    ended_at        timestamptz
);
CREATE INDEX sandbox_sessions_started_at ON sandbox_sessions (started_at);
CREATE INDEX sandbox_sessions_attacker_addr ON sandbox_sessions USING gist (attacker_addr inet_ops);
CREATE INDEX sandbox_sessions_attacker_id ON sandbox_sessions (attacker_id);

-- Alerts -----------------------------------------------------------------------------------------

CREATE TABLE alert_channels (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name              text        NOT NULL UNIQUE,
    kind              text        NOT NULL CHECK (kind IN ('email', 'webhook', 'slack')),
    -- email: {"smtp": "...", "from": "...", "to": [...]}; webhook/slack: {"url": "..."}.
    config            jsonb       NOT NULL DEFAULT '{}',
    min_severity      text        NOT NULL DEFAULT 'medium'
                                  CHECK (min_severity IN ('info', 'low', 'medium', 'high', 'critical')),
    enabled           boolean     NOT NULL DEFAULT true,
    -- The same (rule, attacker) within this window is one alert.
    dedup_window_secs integer     NOT NULL DEFAULT 600 CHECK (dedup_window_secs >= 0),
    -- At most this many messages per hour; beyond it, detections wait for the next digest.
    max_per_hour      integer     NOT NULL DEFAULT 12 CHECK (max_per_hour > 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE alert_deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id       bigint      NOT NULL REFERENCES alert_channels (id) ON DELETE CASCADE,
    dedup_key        text        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'sent', 'failed', 'suppressed')),
    -- How many detections this message (or digest) covers.
    detection_count  integer     NOT NULL DEFAULT 1,
    first_detection  bigint      REFERENCES detections (id) ON DELETE SET NULL,
    payload          jsonb       NOT NULL DEFAULT '{}',
    attempts         integer     NOT NULL DEFAULT 0,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz
);
CREATE INDEX alert_deliveries_channel_key ON alert_deliveries (channel_id, dedup_key, created_at);
CREATE INDEX alert_deliveries_pending ON alert_deliveries (created_at) WHERE status = 'pending';

-- Settings ---------------------------------------------------------------------------------------

CREATE TABLE settings (
    key        text        PRIMARY KEY,
    value      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by bigint      REFERENCES users (id) ON DELETE SET NULL
);

-- Seed data --------------------------------------------------------------------------------------

INSERT INTO agent_groups (name, description) VALUES ('default', 'Agents enrolled without a group');
INSERT INTO policies (group_id) SELECT id FROM agent_groups WHERE name = 'default';
INSERT INTO settings (key, value) VALUES
    ('retention', '{"detections_days": 90, "sandbox_sessions_days": 90, "audit_log_days": 365, "login_attempts_days": 30, "policy_revisions_days": 30}');
