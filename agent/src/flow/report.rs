//! Reporting the kernel's new-flow events beyond this host.
//!
//! Every new redirected or reflected flow goes
//!
//! - to the server, as a `mirage-flow` log line (the flow log's JSON object) through the
//!   shipper's durable queue: the server's `mirage` rule pack makes any such touch an alert
//!   (in honeypot mode: any connection from outside the allowlist);
//! - to the manager (`POST /api/v1/agent/flows`), which keeps them for a week so a sandbox
//!   session seen from a full-NAT address and port is attributed to the attacker behind it.
//!
//! The ring buffer is drained on the agent's event loop, which must never wait on the network:
//! records are handed over with `try_send` to a bounded channel ([`CHANNEL`]); a task batches
//! them. When the channel is full, records are dropped and counted
//! (`mirage_agent_flow_reports_dropped_total`); the local flow log (`run --flow-log`) still has
//! them. The manager side retries a batch a few times, then drops it (counted): attribution is
//! best effort, while the server's copy is durable.

use std::{path::PathBuf, time::Duration};

use reqwest::header::{AUTHORIZATION, HeaderValue};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, warn};

use super::FlowRecord;
use crate::{
    config::AgentConfig,
    logs::{LogLine, Sink},
    sync::client,
};

/// Records waiting between the event loop and the reporter.
pub const CHANNEL: usize = 16_384;
/// Most records per batch (the manager's limit).
const BATCH: usize = 1000;
/// How long a batch may wait to fill.
const BATCH_WAIT: Duration = Duration::from_millis(200);
/// Attempts per batch to the manager.
const ATTEMPTS: u32 = 4;
/// The service name of flow lines (the server's `mirage-flow` rules).
pub const SERVICE: &str = "mirage-flow";

/// The manager end: client, endpoint and credential file.
struct ManagerEnd {
    client: reqwest::Client,
    url: String,
    credential: PathBuf,
}

/// Hands flow records to the reporting task.
#[derive(Debug)]
pub struct FlowReporter {
    tx: mpsc::Sender<FlowRecord>,
    task: JoinHandle<()>,
}

impl FlowReporter {
    /// Starts the reporter when there is somewhere to report to (`sink`: the shipper, if
    /// `[server]` is configured; the manager, if `[manager]` is).
    ///
    /// # Errors
    ///
    /// If the manager's URL or CA is invalid.
    pub fn start(
        cfg: &AgentConfig,
        sink: Option<Sink>,
    ) -> Result<Option<Self>, client::ClientError> {
        let manager = match &cfg.manager {
            Some(m) => {
                let base = client::manager_url(&m.url)?;
                Some(ManagerEnd {
                    client: client::client(m.ca.as_deref())?,
                    url: client::endpoint(&base, "api/v1/agent/flows"),
                    credential: m
                        .credential_file
                        .clone()
                        .unwrap_or_else(|| cfg.state_dir.join("credential")),
                })
            }
            None => None,
        };
        if manager.is_none() && sink.is_none() {
            return Ok(None);
        }
        let (tx, rx) = mpsc::channel(CHANNEL);
        let task = tokio::spawn(run(rx, sink, manager));
        Ok(Some(Self { tx, task }))
    }

    /// Queues one record without waiting (dropped and counted when the reporter is behind).
    pub fn offer(&self, record: &FlowRecord) {
        if self.tx.try_send(record.clone()).is_err() {
            metrics::counter!("mirage_agent_flow_reports_dropped_total").increment(1);
        }
    }

    /// Lets the task send what it has (briefly) and stops it.
    pub async fn shutdown(self) {
        drop(self.tx);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

async fn run(mut rx: mpsc::Receiver<FlowRecord>, sink: Option<Sink>, manager: Option<ManagerEnd>) {
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let deadline = tokio::time::sleep(BATCH_WAIT);
        tokio::pin!(deadline);
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                () = &mut deadline => break,
            }
        }
        if let Some(sink) = &sink {
            let now = crate::logs::unix_now();
            let lines: Vec<LogLine> = batch
                .iter()
                .filter_map(|r| serde_json::to_string(r).ok())
                .map(|line| LogLine {
                    service: SERVICE.to_owned(),
                    source: "kernel:flows".to_owned(),
                    line,
                    read_at: now,
                })
                .collect();
            if let Err(err) = sink.send(lines).await {
                warn!(error = %err, "Flow events could not be queued for the server.");
            }
        }
        if let Some(m) = &manager {
            post(m, &batch).await;
        }
    }
}

async fn post(m: &ManagerEnd, batch: &[FlowRecord]) {
    let body = serde_json::json!({ "flows": batch });
    for attempt in 1..=ATTEMPTS {
        let auth: HeaderValue = match client::bearer(&m.credential) {
            Ok(v) => v,
            Err(err) => {
                debug!(error = %err, "No manager credential yet; flow report skipped.");
                metrics::counter!("mirage_agent_flow_reports_dropped_total")
                    .increment(batch.len() as u64);
                return;
            }
        };
        match m
            .client
            .post(&m.url)
            .header(AUTHORIZATION, auth)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                metrics::counter!("mirage_agent_flow_reports_total").increment(batch.len() as u64);
                return;
            }
            Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                warn!(status = %r.status(), "The manager refused a flow report; dropped.");
                break;
            }
            Ok(r) => debug!(status = %r.status(), attempt, "Flow report failed; retrying."),
            Err(err) => debug!(error = %err, attempt, "Flow report failed; retrying."),
        }
        tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
    }
    metrics::counter!("mirage_agent_flow_reports_dropped_total").increment(batch.len() as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(attacker: &str) -> FlowRecord {
        FlowRecord {
            kind: "redirect",
            model: "full-nat",
            proto: "tcp",
            attacker: attacker.to_owned(),
            orig_dst: "192.0.2.10:22".to_owned(),
            target: "198.18.0.2:22".to_owned(),
            nat: "198.18.0.1:20001".to_owned(),
            ts_ns: 42,
        }
    }

    #[tokio::test]
    async fn flows_become_lines_the_server_rules_flag() {
        let (sink, mut rx) = Sink::channel(8);
        let cfg = AgentConfig::default();
        let reporter = FlowReporter::start(&cfg, Some(sink)).unwrap().unwrap();
        reporter.offer(&record("203.0.113.9:40001"));
        reporter.offer(&record("[2001:db8::66]:40002"));
        let (lines, done) = rx.recv().await.unwrap();
        done.send(Ok(())).unwrap();
        assert_eq!(lines.len(), 2);
        let rules = server::RuleSet::builtin().unwrap();
        let flagged: Vec<String> = lines
            .iter()
            .map(|l| {
                assert_eq!(l.service, SERVICE);
                let m = rules.evaluate(&l.line);
                assert_eq!(m.len(), 1, "{}", l.line);
                assert_eq!(rules.rules()[m[0].rule].config.id, "mirage-flow-touch");
                match &m[0].addr {
                    server::rules::Extracted::Addr(a) => a.to_string(),
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        assert_eq!(flagged, vec!["203.0.113.9", "2001:db8::66"]);
        reporter.shutdown().await;
    }

    #[tokio::test]
    async fn nowhere_to_report_is_no_reporter() {
        assert!(
            FlowReporter::start(&AgentConfig::default(), None)
                .unwrap()
                .is_none()
        );
    }
}
