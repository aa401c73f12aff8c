-- New redirected or reflected flows reported by agents (from the kernel's ring buffer), kept so
-- a sandbox session seen from a full-NAT address and port can be attributed to the attacker
-- whose flow was translated to it. Pruned after a week by the retention sweep.
CREATE TABLE agent_flows (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    agent_id      bigint      NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    kind          text        NOT NULL CHECK (kind IN ('redirect', 'reflect')),
    model         text        NOT NULL CHECK (model IN ('preserve-source', 'full-nat')),
    proto         text        NOT NULL CHECK (proto IN ('tcp', 'udp')),
    attacker_addr inet        NOT NULL,
    attacker_port integer     NOT NULL CHECK (attacker_port BETWEEN 0 AND 65535),
    orig_dst      text        NOT NULL,
    target        text        NOT NULL,
    nat_addr      inet        NOT NULL,
    nat_port      integer     NOT NULL CHECK (nat_port BETWEEN 0 AND 65535),
    seen_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_flows_nat ON agent_flows (nat_addr, nat_port, seen_at DESC);
CREATE INDEX agent_flows_seen_at ON agent_flows (seen_at);
