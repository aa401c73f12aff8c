//! Counting state shared through PostgreSQL (`[state] database_url`).
//!
//! Every server writes its matches to `mirage_server.hits` and decides crossings by counting
//! the rows of all servers, so two servers that each saw half of an attack reach the verdict one
//! server would. Correctness under concurrency: a batch first takes a transaction-scoped
//! advisory lock per (rule, source) it touches (in ascending lock-id order, so two servers never
//! deadlock), then inserts and counts. Another server's batch for the same pair waits for the
//! commit and then sees these rows; a crossing is therefore seen by exactly one server, and the
//! flag row it writes (`mirage_server.flags`) keeps the others from reporting it again within the
//! window. Session bindings (pid or connection id → address) are shared the same way, so a line
//! naming only a pid resolves whichever server saw the line that bound it.
//!
//! The tables live in their own schema, so the manager's database can host them.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use sha2::{Digest as _, Sha256};
use sqlx::{PgPool, Postgres, Row as _, Transaction, postgres::PgPoolOptions};

use super::{
    state::{EVIDENCE_LINES, Flag, Hit, RuleMeta, StateError, dependents, group},
    window,
};

/// Schema, created at start (idempotent; serialized by an advisory lock so two servers starting
/// together do not race on `CREATE`).
const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS mirage_server;
CREATE TABLE IF NOT EXISTS mirage_server.hits (
    rule   text   NOT NULL,
    source inet   NOT NULL,
    ts     bigint NOT NULL,
    line   text   NOT NULL
);
CREATE INDEX IF NOT EXISTS hits_rule_source_ts ON mirage_server.hits (rule, source, ts);
CREATE INDEX IF NOT EXISTS hits_ts ON mirage_server.hits (ts);
CREATE TABLE IF NOT EXISTS mirage_server.flags (
    rule       text   NOT NULL,
    source     inet   NOT NULL,
    flagged_at bigint NOT NULL,
    PRIMARY KEY (rule, source, flagged_at)
);
CREATE TABLE IF NOT EXISTS mirage_server.sessions (
    scope   text   NOT NULL,
    session text   NOT NULL,
    addr    inet   NOT NULL,
    ts      bigint NOT NULL,
    PRIMARY KEY (scope, session)
);
CREATE INDEX IF NOT EXISTS sessions_ts ON mirage_server.sessions (ts);
";

/// Advisory lock id of schema creation (any constant not used elsewhere).
const SCHEMA_LOCK: i64 = 0x6d69_7261_6765_0001;
/// Session bindings older than this (seconds before the watermark) are swept.
const SESSION_KEEP: i64 = 86_400;
/// Most match rows one decision reads for a pair (a flood beyond it is decided on the newest).
const MAX_WINDOW_ROWS: i64 = 20_000;

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> StateError {
    move |source| StateError::Database { what, source }
}

/// The shared backend.
#[derive(Debug, Clone)]
pub struct PgState {
    pool: PgPool,
}

impl PgState {
    /// Connects and creates the schema if needed.
    ///
    /// # Errors
    ///
    /// If the database cannot be reached or the schema not created.
    pub async fn connect(url: &str) -> Result<Self, StateError> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(url)
            .await
            .map_err(db("connecting"))?;
        Self::with_pool(pool).await
    }

    /// Uses an existing pool and creates the schema if needed.
    ///
    /// # Errors
    ///
    /// If the schema cannot be created.
    pub async fn with_pool(pool: PgPool) -> Result<Self, StateError> {
        let mut tx = pool.begin().await.map_err(db("creating the schema"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEMA_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db("creating the schema"))?;
        sqlx::raw_sql(SCHEMA)
            .execute(&mut *tx)
            .await
            .map_err(db("creating the schema"))?;
        tx.commit().await.map_err(db("creating the schema"))?;
        Ok(Self { pool })
    }

    pub(super) async fn record(
        &self,
        meta: &[RuleMeta],
        hits: Vec<Hit>,
    ) -> Result<Vec<Flag>, StateError> {
        let deps = dependents(meta);
        let mut work = group(meta, hits);
        if work.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        // Lock every pair this batch may count, read the gate of, or re-examine.
        let mut locks = BTreeSet::new();
        for (rule, key) in work.keys() {
            let mut stack = vec![*rule];
            while let Some(r) = stack.pop() {
                locks.insert(lock_id(&meta[r].id, key));
                if let Some(q) = meta[r].requires {
                    locks.insert(lock_id(&meta[q].id, key));
                }
                stack.extend(deps.get(r).into_iter().flatten().copied());
            }
        }
        let locks: Vec<i64> = locks.into_iter().collect();
        sqlx::query("SELECT count(pg_advisory_xact_lock(l)) FROM unnest($1::bigint[]) AS l")
            .bind(&locks)
            .execute(&mut *tx)
            .await
            .map_err(db("locking"))?;

        let mut flags = Vec::new();
        while let Some(((rule, key), (new, gate_changed))) = work.pop_first() {
            let found = examine(&mut tx, meta, rule, key, new, gate_changed).await?;
            if !found.is_empty() {
                for &d in deps.get(rule).map_or(&[][..], Vec::as_slice) {
                    work.entry((d, key)).or_default().1 = true;
                }
            }
            flags.extend(found);
        }
        tx.commit().await.map_err(db("commit"))?;
        flags.sort_by_key(|f| f.at);
        Ok(flags)
    }

    pub(super) async fn sweep(&self, meta: &[RuleMeta], watermark: i64) -> Result<u64, StateError> {
        let rules: Vec<&str> = meta.iter().map(|m| m.id.as_str()).collect();
        let horizons: Vec<i64> = meta
            .iter()
            .map(|m| watermark.saturating_sub(m.keep))
            .collect();
        let hits = sqlx::query(
            "DELETE FROM mirage_server.hits h USING unnest($1::text[], $2::bigint[]) AS r(rule, horizon) \
             WHERE h.rule = r.rule AND h.ts <= r.horizon",
        )
        .bind(&rules)
        .bind(&horizons)
        .execute(&self.pool)
        .await
        .map_err(db("sweeping matches"))?
        .rows_affected();
        sqlx::query(
            "DELETE FROM mirage_server.flags f USING unnest($1::text[], $2::bigint[]) AS r(rule, horizon) \
             WHERE f.rule = r.rule AND f.flagged_at <= r.horizon",
        )
        .bind(&rules)
        .bind(&horizons)
        .execute(&self.pool)
        .await
        .map_err(db("sweeping flags"))?;
        sqlx::query("DELETE FROM mirage_server.sessions WHERE ts <= $1")
            .bind(watermark.saturating_sub(SESSION_KEEP))
            .execute(&self.pool)
            .await
            .map_err(db("sweeping sessions"))?;
        Ok(hits)
    }

    pub(super) async fn bind_sessions(
        &self,
        binds: Vec<(String, String, IpAddr, i64)>,
    ) -> Result<(), StateError> {
        if binds.is_empty() {
            return Ok(());
        }
        // The latest binding of a (scope, session) in the batch wins, as in the local cache.
        let mut latest: HashMap<(String, String), (IpAddr, i64)> = HashMap::new();
        for (scope, session, addr, ts) in binds {
            latest.insert((scope, session), (addr, ts));
        }
        let mut scopes = Vec::with_capacity(latest.len());
        let mut sessions = Vec::with_capacity(latest.len());
        let mut addrs = Vec::with_capacity(latest.len());
        let mut times = Vec::with_capacity(latest.len());
        for ((scope, session), (addr, ts)) in latest {
            scopes.push(scope);
            sessions.push(session);
            addrs.push(IpNet::from(addr));
            times.push(ts);
        }
        sqlx::query(
            "INSERT INTO mirage_server.sessions (scope, session, addr, ts) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::inet[], $4::bigint[]) \
             ON CONFLICT (scope, session) DO UPDATE SET addr = EXCLUDED.addr, ts = EXCLUDED.ts \
             WHERE mirage_server.sessions.ts <= EXCLUDED.ts",
        )
        .bind(&scopes)
        .bind(&sessions)
        .bind(&addrs)
        .bind(&times)
        .execute(&self.pool)
        .await
        .map_err(db("binding sessions"))?;
        Ok(())
    }

    pub(super) async fn lookup_sessions(
        &self,
        keys: Vec<(String, String)>,
    ) -> Result<HashMap<(String, String), IpAddr>, StateError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let (scopes, sessions): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
        let rows = sqlx::query(
            "SELECT s.scope, s.session, s.addr FROM mirage_server.sessions s \
             JOIN unnest($1::text[], $2::text[]) AS k(scope, session) \
               ON s.scope = k.scope AND s.session = k.session",
        )
        .bind(&scopes)
        .bind(&sessions)
        .fetch_all(&self.pool)
        .await
        .map_err(db("looking up sessions"))?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let scope: String = row.try_get(0).map_err(db("looking up sessions"))?;
            let session: String = row.try_get(1).map_err(db("looking up sessions"))?;
            let addr: IpNet = row.try_get(2).map_err(db("looking up sessions"))?;
            out.insert((scope, session), addr.addr());
        }
        Ok(out)
    }

    /// The pool (tests read the tables through it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A 64-bit advisory lock id for one (rule, source) pair.
fn lock_id(rule: &str, key: &IpNet) -> i64 {
    let digest = Sha256::new()
        .chain_update(rule.as_bytes())
        .chain_update([0])
        .chain_update(key.to_string().as_bytes())
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(b)
}

/// Inserts one pair's new matches, reads what the decision needs of every server's rows, and
/// writes and returns the pair's new flags.
async fn examine(
    tx: &mut Transaction<'_, Postgres>,
    meta: &[RuleMeta],
    rule: usize,
    key: IpNet,
    new: Vec<(i64, String)>,
    gate_changed: bool,
) -> Result<Vec<Flag>, StateError> {
    let m = &meta[rule];
    if !new.is_empty() {
        let times: Vec<i64> = new.iter().map(|(t, _)| *t).collect();
        let lines: Vec<&str> = new.iter().map(|(_, l)| l.as_str()).collect();
        sqlx::query(
            "INSERT INTO mirage_server.hits (rule, source, ts, line) \
             SELECT $1, $2, t, l FROM unnest($3::bigint[], $4::text[]) AS x(t, l)",
        )
        .bind(&m.id)
        .bind(key)
        .bind(&times)
        .bind(&lines)
        .execute(&mut **tx)
        .await
        .map_err(db("inserting matches"))?;
    }
    let gate: Option<Vec<i64>> = match m.requires {
        Some(q) => Some(
            sqlx::query_scalar(
                "SELECT flagged_at FROM mirage_server.flags WHERE rule = $1 AND source = $2",
            )
            .bind(&meta[q].id)
            .bind(key)
            .fetch_all(&mut **tx)
            .await
            .map_err(db("reading the gate"))?,
        ),
        None => None,
    };
    // The windows that can hold a new match, or, when the gate changed, every kept match.
    let (lo, hi) = if gate_changed || new.is_empty() {
        (i64::MIN, i64::MAX)
    } else {
        let min = new.iter().map(|(t, _)| *t).min().unwrap_or(0);
        let max = new.iter().map(|(t, _)| *t).max().unwrap_or(0);
        (min.saturating_sub(m.window), max.saturating_add(m.window))
    };
    let rows: Vec<i64> = sqlx::query_scalar(
        "SELECT ts FROM mirage_server.hits WHERE rule = $1 AND source = $2 \
           AND ts > $3 AND ts < $4 ORDER BY ts DESC LIMIT $5",
    )
    .bind(&m.id)
    .bind(key)
    .bind(lo)
    .bind(hi)
    .bind(MAX_WINDOW_ROWS)
    .fetch_all(&mut **tx)
    .await
    .map_err(db("counting"))?;
    let stored: Vec<i64> = sqlx::query_scalar(
        "SELECT flagged_at FROM mirage_server.flags WHERE rule = $1 AND source = $2",
    )
    .bind(&m.id)
    .bind(key)
    .fetch_all(&mut **tx)
    .await
    .map_err(db("reading flags"))?;
    // Rows are all old except the new ones (equal times: mark as many as are new).
    let mut fresh: HashMap<i64, usize> = HashMap::new();
    for (t, _) in &new {
        *fresh.entry(*t).or_default() += 1;
    }
    let times: Vec<(i64, bool)> = rows
        .into_iter()
        .map(|t| {
            let is_new = gate_changed
                || fresh.get_mut(&t).is_some_and(|n| {
                    let hit = *n > 0;
                    *n = n.saturating_sub(1);
                    hit
                });
            (t, is_new)
        })
        .collect();
    let found = window::crossings(&times, &stored, m.threshold, m.window, gate.as_deref());
    let mut flags = Vec::with_capacity(found.len());
    for c in found {
        sqlx::query(
            "INSERT INTO mirage_server.flags (rule, source, flagged_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&m.id)
        .bind(key)
        .bind(c.at)
        .execute(&mut **tx)
        .await
        .map_err(db("flagging"))?;
        let lines: Vec<String> = sqlx::query_scalar(
            "SELECT line FROM mirage_server.hits WHERE rule = $1 AND source = $2 \
               AND ts > $3 AND ts <= $4 ORDER BY ts DESC LIMIT $5",
        )
        .bind(&m.id)
        .bind(key)
        .bind(c.at.saturating_sub(m.window))
        .bind(c.at)
        .bind(i64::try_from(EVIDENCE_LINES).unwrap_or(20))
        .fetch_all(&mut **tx)
        .await
        .map_err(db("reading evidence"))?;
        flags.push(Flag {
            rule,
            key,
            count: c.count,
            at: c.at,
            first: c.first,
            evidence: lines.into_iter().rev().collect(),
        });
    }
    Ok(flags)
}
