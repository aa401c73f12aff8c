//! The legitimate client's TCP throughput, measured with iperf3 across the lab.

use std::{
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::lab::{HOST_V4, Lab};

/// The iperf3 port on the host.
const PORT: &str = "5201";

/// Runs an iperf3 server in the host namespace (one test, then it exits) and a client in the
/// legitimate client's namespace for `seconds` (after one omitted second of slow start); returns
/// the bits per second the server received.
pub fn legit_throughput(lab: &mut Lab, seconds: u32) -> Result<f64> {
    let host = HOST_V4.to_string();
    let mut server = lab.host.command("iperf3");
    server
        .args(["-s", "-1", "-B", &host, "-p", PORT])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.host.spawn(server)?;
    // The server needs a moment to listen; a refused connection leaves it waiting, so retry.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab
            .legit
            .command("iperf3")
            .args([
                "-c",
                &host,
                "-p",
                PORT,
                "-t",
                &seconds.to_string(),
                "-O",
                "1",
                "-J",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .context("running iperf3; install it with `apt-get install -y iperf3`")?;
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = doc
            .pointer("/end/sum_received/bits_per_second")
            .and_then(serde_json::Value::as_f64)
        {
            return Ok(bps);
        }
        if Instant::now() > deadline {
            bail!(
                "iperf3 client failed ({}): {}",
                out.status,
                doc.get("error").map(|e| e.to_string()).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}
