//! `agent_flows`: the new rewritten flows agents report, for sandbox-session attribution.

use std::net::IpAddr;

use ipnet::IpNet;
use sqlx::{PgExecutor, Row as _};
use time::OffsetDateTime;

/// Validated flows of one report, column-wise.
#[derive(Debug, Default, Clone)]
pub struct NewFlows {
    /// `redirect` or `reflect`.
    pub kinds: Vec<String>,
    /// `preserve-source` or `full-nat`.
    pub models: Vec<String>,
    /// `tcp` or `udp`.
    pub protos: Vec<String>,
    /// The attacker's address.
    pub attacker_addrs: Vec<IpNet>,
    /// The attacker's port.
    pub attacker_ports: Vec<i32>,
    /// Original destination, `addr:port`.
    pub orig_dsts: Vec<String>,
    /// Where the flow went, `addr:port`.
    pub targets: Vec<String>,
    /// Source address the target saw.
    pub nat_addrs: Vec<IpNet>,
    /// Source port the target saw.
    pub nat_ports: Vec<i32>,
}

/// Inserts one agent's flows; returns how many.
pub async fn insert(
    ex: impl PgExecutor<'_>,
    agent_id: i64,
    f: &NewFlows,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO agent_flows (agent_id, kind, model, proto, attacker_addr, attacker_port, \
         orig_dst, target, nat_addr, nat_port) \
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::inet[], $6::int[], \
                                  $7::text[], $8::text[], $9::inet[], $10::int[])",
    )
    .bind(agent_id)
    .bind(&f.kinds)
    .bind(&f.models)
    .bind(&f.protos)
    .bind(&f.attacker_addrs)
    .bind(&f.attacker_ports)
    .bind(&f.orig_dsts)
    .bind(&f.targets)
    .bind(&f.nat_addrs)
    .bind(&f.nat_ports)
    .execute(ex)
    .await?
    .rows_affected())
}

/// For each `(nat address, nat port, session start)`, the attacker of the newest flow
/// translated to that address and port in the hour before the start (a minute after it is
/// tolerated for clock skew between agent and sandbox).
pub async fn attackers_behind(
    ex: impl PgExecutor<'_>,
    nats: &[(IpAddr, u16, OffsetDateTime)],
) -> Result<Vec<Option<IpAddr>>, sqlx::Error> {
    let mut out = vec![None; nats.len()];
    if nats.is_empty() {
        return Ok(out);
    }
    let addrs: Vec<IpNet> = nats.iter().map(|(a, _, _)| IpNet::from(*a)).collect();
    let ports: Vec<i32> = nats.iter().map(|(_, p, _)| i32::from(*p)).collect();
    let starts: Vec<OffsetDateTime> = nats.iter().map(|(_, _, s)| *s).collect();
    let rows = sqlx::query(
        "SELECT n.i, (SELECT f.attacker_addr FROM agent_flows f \
                      WHERE f.nat_addr = n.a AND f.nat_port = n.p \
                        AND f.seen_at > n.s - interval '1 hour' \
                        AND f.seen_at <= n.s + interval '1 minute' \
                      ORDER BY f.seen_at DESC LIMIT 1) \
         FROM unnest($1::inet[], $2::int[], $3::timestamptz[]) WITH ORDINALITY AS n(a, p, s, i)",
    )
    .bind(&addrs)
    .bind(&ports)
    .bind(&starts)
    .fetch_all(ex)
    .await?;
    for row in rows {
        let i: i64 = row.try_get(0)?;
        let addr: Option<IpNet> = row.try_get(1)?;
        if let (Some(slot), Some(addr)) = (
            usize::try_from(i - 1).ok().and_then(|i| out.get_mut(i)),
            addr,
        ) {
            *slot = Some(addr.addr());
        }
    }
    Ok(out)
}

/// Deletes flows seen before `before`; returns how many.
pub async fn prune(ex: impl PgExecutor<'_>, before: OffsetDateTime) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM agent_flows WHERE seen_at < $1")
        .bind(before)
        .execute(ex)
        .await?
        .rows_affected())
}
