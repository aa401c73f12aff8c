//! Shared pieces of the benchmark binaries `bench-xdp` (per-packet cost through
//! `BPF_PROG_TEST_RUN`) and `bench-veth` (a UDP flood and a TCP transfer across the lab's veths,
//! and traffic redirected into a sandbox), both run by `cargo xtask bench`.
//!
//! Output contract: one JSON [`Record`] per line on stdout; human-readable progress on stderr.

pub mod flood;
pub mod iperf;
pub mod mechanism;
pub mod redirect;

use std::{fmt::Display, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use serde::Serialize;

/// One measurement, printed as one JSON line.
///
/// `ratio` says how many times better Mirage is than the baseline that ran beside it in the same
/// process: above 1 is better, whatever the direction of the metric.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Which benchmark (`xdp`, `veth`).
    pub bench: &'static str,
    /// What was measured, with its parameter (`drop/1000000`).
    pub case: String,
    /// The unit (`ns_per_packet`, `drops_per_second`...).
    pub metric: &'static str,
    /// Mirage's value.
    pub value: f64,
    /// The mechanism measured beside it, if any.
    pub baseline: Option<&'static str>,
    /// The baseline's value.
    pub baseline_value: Option<f64>,
    /// How many times better Mirage is (above 1 = better).
    pub ratio: Option<f64>,
}

impl Record {
    /// A value without a baseline.
    pub fn alone(
        bench: &'static str,
        case: impl Into<String>,
        metric: &'static str,
        value: f64,
    ) -> Self {
        Self {
            bench,
            case: case.into(),
            metric,
            value: round(value),
            baseline: None,
            baseline_value: None,
            ratio: None,
        }
    }

    /// A cost (lower is better, e.g. nanoseconds): ratio = baseline / value.
    pub fn cost(
        bench: &'static str,
        case: impl Into<String>,
        metric: &'static str,
        value: f64,
        baseline: &'static str,
        baseline_value: f64,
    ) -> Self {
        let ratio = (value > 0.0).then(|| baseline_value / value);
        Self::with(bench, case, metric, value, baseline, baseline_value, ratio)
    }

    /// A rate (higher is better, e.g. packets per second): ratio = value / baseline.
    pub fn rate(
        bench: &'static str,
        case: impl Into<String>,
        metric: &'static str,
        value: f64,
        baseline: &'static str,
        baseline_value: f64,
    ) -> Self {
        let ratio = (baseline_value > 0.0).then(|| value / baseline_value);
        Self::with(bench, case, metric, value, baseline, baseline_value, ratio)
    }

    fn with(
        bench: &'static str,
        case: impl Into<String>,
        metric: &'static str,
        value: f64,
        baseline: &'static str,
        baseline_value: f64,
        ratio: Option<f64>,
    ) -> Self {
        Self {
            bench,
            case: case.into(),
            metric,
            value: round(value),
            baseline: Some(baseline),
            baseline_value: Some(round(baseline_value)),
            ratio: ratio.map(|r| (r * 1000.0).round() / 1000.0),
        }
    }

    /// The JSON line (without the newline).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).context("serializing a record")
    }
}

/// Rounds to one decimal below 1000 and to an integer above: enough for every metric here, and
/// the lines stay readable.
fn round(v: f64) -> f64 {
    if v.abs() >= 1000.0 {
        v.round()
    } else {
        (v * 10.0).round() / 10.0
    }
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `i`-th (from 0) made-up attacker address: 100.64.0.1, 100.64.0.2, ... in 100.64.0.0/10
/// (RFC 6598 shared address space, 4M addresses). They are only map keys and rule operands: no
/// packet is ever sent from or to them.
pub fn attacker_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 1 + i)
}

/// Progress for the reader, on stderr.
#[expect(
    clippy::print_stderr,
    reason = "benchmark progress goes to stderr by contract"
)]
pub fn note(msg: impl Display) {
    eprintln!("{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_is_above_one_when_mirage_is_better() {
        let c = Record::cost("xdp", "drop/1", "ns_per_packet", 10.0, "bare-xdp", 20.0);
        assert_eq!(c.ratio, Some(2.0));
        let r = Record::rate("veth", "x", "drops_per_second", 2000.0, "nft-set", 1000.0);
        assert_eq!(r.ratio, Some(2.0));
    }

    #[test]
    fn line_has_the_contract_shape() {
        let c = Record::cost(
            "xdp",
            "drop/1000000",
            "ns_per_packet",
            31.24,
            "bare-xdp",
            12.0,
        );
        assert_eq!(
            c.to_json().unwrap(),
            r#"{"bench":"xdp","case":"drop/1000000","metric":"ns_per_packet","value":31.2,"baseline":"bare-xdp","baseline_value":12.0,"ratio":0.384}"#
        );
        let a = Record::alone("xdp", "insert/1000000", "entries_per_second", 812345.4);
        assert_eq!(
            a.to_json().unwrap(),
            r#"{"bench":"xdp","case":"insert/1000000","metric":"entries_per_second","value":812345.0,"baseline":null,"baseline_value":null,"ratio":null}"#
        );
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
