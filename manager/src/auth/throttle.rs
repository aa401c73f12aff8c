//! Login throttling: failures per username and per client address in a sliding window, counted
//! in `login_attempts` so that every replica sees the same counts.

use std::{net::IpAddr, time::Duration};

use sqlx::PgPool;

use crate::{config::LoginThrottleConfig, db::login_attempts};

/// Whether a login may be tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allow,
    /// Refuse; this many seconds until a failure leaves the window.
    Refuse {
        /// Seconds to wait (at least 1).
        retry_after: u64,
    },
}

/// Checks the failures recorded for `username` and `ip` against the limits.
pub async fn check(
    pool: &PgPool,
    config: &LoginThrottleConfig,
    username: &str,
    ip: Option<IpAddr>,
) -> Result<Verdict, sqlx::Error> {
    let mut worst: Option<f64> = None;
    let by_user = login_attempts::failures_for_username(pool, username, config.window).await?;
    let by_ip = match ip {
        Some(ip) => Some(login_attempts::failures_for_ip(pool, ip, config.window).await?),
        None => None,
    };
    for window in [Some(by_user), by_ip].into_iter().flatten() {
        if window.count >= i64::from(config.max_failures) {
            let wait = window.seconds_until_oldest_leaves.unwrap_or(0.0);
            worst = Some(worst.map_or(wait, |w: f64| w.max(wait)));
        }
    }
    Ok(match worst {
        None => Verdict::Allow,
        Some(wait) => Verdict::Refuse {
            retry_after: retry_after_secs(wait),
        },
    })
}

/// Whole seconds, rounded up, at least 1 (`Retry-After: 0` would invite an immediate retry).
fn retry_after_secs(wait: f64) -> u64 {
    let ceil = wait.ceil();
    if ceil.is_finite() && ceil >= 1.0 {
        Duration::from_secs_f64(ceil).as_secs()
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_retry_after_up() {
        assert_eq!(retry_after_secs(0.2), 1);
        assert_eq!(retry_after_secs(-3.0), 1);
        assert_eq!(retry_after_secs(899.01), 900);
        assert_eq!(retry_after_secs(f64::NAN), 1);
    }
}
