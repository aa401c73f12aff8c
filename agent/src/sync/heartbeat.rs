//! Heartbeats: every `heartbeat_secs`, `POST /api/v1/agent/heartbeat` with the effective mode,
//! the applied revision and the kernel counters (global ones and the busiest sources), in the
//! shape the manager validates (`manager/src/routes/agents.rs`: at most 1,000 sources, counter
//! names of `a-z 0-9 _`). A failed heartbeat is logged and the next one is sent on time; it never
//! affects enforcement.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::{DataPathConfig, Mode};
use reqwest::StatusCode;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{Status, client};
use crate::maps::{Maps, SourceStats};

/// Most sources one heartbeat carries (the manager's limit).
pub const MAX_SOURCES: usize = 1000;
/// How long one heartbeat request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The heartbeat body.
#[derive(Debug, Serialize)]
pub struct Heartbeat {
    /// The effective mode (`None` while the data path is not configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    /// This agent's version.
    pub version: &'static str,
    /// The last policy revision applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<i64>,
    /// The kernel counters.
    pub counters: Counters,
}

/// Global counters and the busiest sources (what `mirage-agent top --json` prints).
#[derive(Debug, Serialize)]
pub struct Counters {
    /// Global counters by name.
    pub global: BTreeMap<&'static str, u64>,
    /// The busiest sources, most packets first.
    pub sources: Vec<SourceStats>,
}

/// Builds the body from what the maps say. Pure.
pub fn body(
    config: Option<DataPathConfig>,
    applied_revision: Option<i64>,
    global: BTreeMap<&'static str, u64>,
    mut sources: Vec<SourceStats>,
) -> Heartbeat {
    let mode = config
        .filter(|c| c.flags & DataPathConfig::ENABLED != 0)
        .and_then(|c| Mode::try_from(c.mode).ok())
        .map(Mode::name);
    // `Maps::sources` sorts by packets already; keep the top and keep values in the range the
    // manager accepts.
    sources.truncate(MAX_SOURCES);
    for s in &mut sources {
        if !s.last_seen_secs_ago.is_finite() {
            s.last_seen_secs_ago = 0.0;
        }
        s.last_seen_secs_ago = s.last_seen_secs_ago.clamp(0.0, 1e9);
    }
    Heartbeat {
        mode,
        version: env!("CARGO_PKG_VERSION"),
        applied_revision,
        counters: Counters { global, sources },
    }
}

/// Reads the counters (blocking: a full pass over the per-source map).
fn read(maps: &Maps, applied_revision: Option<i64>) -> Heartbeat {
    let config = maps
        .config()
        .map_err(|err| debug!(error = %err, "Reading CONFIG for the heartbeat failed."))
        .ok();
    let global = maps.global().unwrap_or_else(|err| {
        warn!(error = %err, "Reading the global counters failed.");
        BTreeMap::new()
    });
    let sources = maps.sources().unwrap_or_else(|err| {
        warn!(error = %err, "Reading the per-source counters failed.");
        Vec::new()
    });
    body(config, applied_revision, global, sources)
}

/// Sends a heartbeat every `every` until aborted.
pub async fn run(
    http: reqwest::Client,
    url: String,
    credential: PathBuf,
    pin_dir: PathBuf,
    every: Duration,
    status: watch::Receiver<Status>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut maps: Option<Maps> = None;
    loop {
        tick.tick().await;
        let revision = status.borrow().revision;
        let dir = pin_dir.clone();
        let taken = maps.take();
        // The per-source map may hold tens of thousands of entries: read it off the runtime.
        let read = tokio::task::spawn_blocking(move || {
            let maps = match taken {
                Some(m) => m,
                None => Maps::open_pinned(&dir)?,
            };
            let hb = read(&maps, revision);
            Ok::<_, crate::maps::MapsError>((maps, hb))
        })
        .await;
        let hb = match read {
            Ok(Ok((m, hb))) => {
                maps = Some(m);
                hb
            }
            Ok(Err(err)) => {
                warn!(error = %err, "Opening the pinned maps for the heartbeat failed.");
                continue;
            }
            Err(err) => {
                warn!(error = %err, "The heartbeat's counter reader failed.");
                continue;
            }
        };
        send(&http, &url, &credential, &hb).await;
    }
}

async fn send(http: &reqwest::Client, url: &str, credential: &Path, hb: &Heartbeat) {
    let auth = match client::bearer(credential) {
        Ok(v) => v,
        Err(err) => {
            debug!(error = %err, "No heartbeat without a credential.");
            return;
        }
    };
    let result = http
        .post(url)
        .header(reqwest::header::AUTHORIZATION, auth)
        .timeout(TIMEOUT)
        .json(hb)
        .send()
        .await;
    match result {
        Ok(resp) if resp.status().is_success() => {
            debug!(revision = hb.applied_revision, "Heartbeat sent.");
        }
        Ok(resp)
            if matches!(
                resp.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) =>
        {
            warn!(
                status = %resp.status(),
                "The manager refused the heartbeat's credential (revoked? enroll again)."
            );
        }
        Ok(resp) => {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            warn!(%status, body = %text.chars().take(200).collect::<String>(), "Heartbeat refused.");
        }
        Err(err) => debug!(error = %err, "Heartbeat not sent (manager unreachable)."),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::maps::PerAction;

    fn source(addr: &str, packets: u64, ago: f64) -> SourceStats {
        SourceStats {
            addr: addr.parse::<IpAddr>().unwrap(),
            packets: PerAction {
                drop: packets,
                ..PerAction::default()
            },
            bytes: PerAction::default(),
            total_packets: packets,
            total_bytes: 0,
            last_seen_secs_ago: ago,
        }
    }

    #[test]
    fn the_body_has_the_shape_the_manager_validates() {
        let cfg = DataPathConfig {
            mode: Mode::Firewall as u8,
            flags: DataPathConfig::ENABLED,
            ..DataPathConfig::default()
        };
        let sources: Vec<SourceStats> = (0..1500)
            .map(|i| source(&format!("198.18.{}.{}", i / 256, i % 256), 2000 - i, -1.0))
            .collect();
        let global = BTreeMap::from([("drop", 5u64), ("pass", 7)]);
        let hb = body(Some(cfg), Some(42), global, sources);
        assert_eq!(hb.counters.sources.len(), MAX_SOURCES);
        let v = serde_json::to_value(&hb).unwrap();
        assert_eq!(v["mode"], "firewall");
        assert_eq!(v["applied_revision"], 42);
        assert_eq!(v["counters"]["global"]["drop"], 5);
        let first = &v["counters"]["sources"][0];
        assert_eq!(first["addr"], "198.18.0.0");
        assert_eq!(first["packets"]["drop"], 2000);
        assert_eq!(first["last_seen_secs_ago"], 0.0);
        for key in ["bytes", "total_packets", "total_bytes"] {
            assert!(first.get(key).is_some(), "{key}");
        }
        // Every global counter name is one the manager accepts: at most 64 of them, `a-z0-9_`.
        assert!(agent_common::Counter::ALL.len() <= 64);
        for c in agent_common::Counter::ALL {
            let name = c.name();
            assert!(
                !name.is_empty()
                    && name.len() <= 64
                    && name
                        .chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'),
                "{name}"
            );
        }
    }

    #[test]
    fn no_mode_until_the_data_path_is_configured() {
        let hb = body(
            Some(DataPathConfig::default()),
            None,
            BTreeMap::new(),
            Vec::new(),
        );
        let v = serde_json::to_value(&hb).unwrap();
        assert!(v.get("mode").is_none());
        assert!(v.get("applied_revision").is_none());
    }
}
