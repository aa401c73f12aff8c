//! Alert channel configuration: one typed form per kind, validated on input, stored as JSON in
//! `alert_channels.config`, and shown by the API with its secrets redacted.
//!
//! Secrets (the SMTP password, the webhook's HMAC secret, and a Slack webhook URL's path, which
//! *is* the credential there) are stored **as given**, not hashed: the manager must replay the
//! password to the SMTP server and use the secret as the HMAC key. Whoever can read the database
//! can read them; the API never shows them (`"********"`), and a PATCH that sends the redacted
//! value back keeps the stored one. See `docs/alerts.md`.

use std::net::IpAddr;

use lettre::message::Mailbox;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the API shows instead of a secret.
pub const REDACTED: &str = "********";
/// Most recipients of one e-mail channel.
pub const MAX_RECIPIENTS: usize = 50;
/// Longest URL.
const MAX_URL: usize = 2048;

/// Channel kinds.
pub const KINDS: [&str; 3] = ["email", "webhook", "slack"];

/// Why a channel configuration was refused: the field (`config.port`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {reason}")]
pub struct ConfigError {
    /// The field.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text (a local relay only: credentials are refused unless the host is loopback).
    None,
    /// Plain connection upgraded with STARTTLS, which is required (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// `email` channel configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// SMTP server host name or address.
    pub host: String,
    /// SMTP port.
    pub port: i64,
    /// `none`, `starttls` or `tls`.
    pub tls: SmtpTls,
    /// SMTP AUTH user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// SMTP AUTH password (stored as given, see the module documentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Sender: `alerts@example.org` or `Mirage <alerts@example.org>`.
    pub from: String,
    /// Recipients.
    pub to: Vec<String>,
}

/// `webhook` channel configuration: a JSON POST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// HMAC-SHA256 key: each POST carries `X-Mirage-Signature: sha256=<hex of the HMAC of the
    /// body>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `slack` channel configuration: a Slack-compatible incoming webhook (`{"text": ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// The incoming-webhook URL (its path is the credential).
    pub url: String,
}

/// A channel's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelConfig {
    /// E-mail over SMTP.
    Email(EmailConfig),
    /// Generic JSON webhook.
    Webhook(WebhookConfig),
    /// Slack-compatible webhook.
    Slack(SlackConfig),
}

impl ChannelConfig {
    /// Parses and validates `config` for `kind`.
    pub fn parse(kind: &str, config: &Value) -> Result<Self, ConfigError> {
        let de = |e: serde_json::Error| invalid("config", e.to_string());
        let parsed = match kind {
            "email" => Self::Email(serde_json::from_value(config.clone()).map_err(de)?),
            "webhook" => Self::Webhook(serde_json::from_value(config.clone()).map_err(de)?),
            "slack" => Self::Slack(serde_json::from_value(config.clone()).map_err(de)?),
            other => {
                return Err(invalid(
                    "kind",
                    format!("unknown kind `{other}` (email, webhook or slack)"),
                ));
            }
        };
        parsed.validate()?;
        Ok(parsed)
    }

    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Email(_) => "email",
            Self::Webhook(_) => "webhook",
            Self::Slack(_) => "slack",
        }
    }

    /// The stored form.
    pub fn to_value(&self) -> Value {
        let value = match self {
            Self::Email(c) => serde_json::to_value(c),
            Self::Webhook(c) => serde_json::to_value(c),
            Self::Slack(c) => serde_json::to_value(c),
        };
        value.unwrap_or_default()
    }

    /// The form the API shows: secrets replaced by [`REDACTED`], a Slack URL cut to its origin.
    pub fn redacted(&self) -> Value {
        let mut value = self.to_value();
        match self {
            Self::Email(c) if c.password.is_some() => value["password"] = REDACTED.into(),
            Self::Webhook(c) if c.secret.is_some() => value["secret"] = REDACTED.into(),
            Self::Slack(c) => value["url"] = redact_url(&c.url).into(),
            _ => {}
        }
        value
    }

    /// `new` (a configuration sent by a PATCH) with every secret that was sent back redacted
    /// replaced by the stored one; a redacted value with nothing stored is an error.
    pub fn restore_secrets(&self, mut new: Value) -> Result<Value, ConfigError> {
        let placeholder = |field: &str| {
            invalid(
                format!("config.{field}"),
                format!(
                    "`{REDACTED}` stands for a stored secret, and none is stored; send the value"
                ),
            )
        };
        match self {
            Self::Email(c) => {
                if new.get("password").and_then(Value::as_str) == Some(REDACTED) {
                    new["password"] = c
                        .password
                        .clone()
                        .ok_or_else(|| placeholder("password"))?
                        .into();
                }
            }
            Self::Webhook(c) => {
                if new.get("secret").and_then(Value::as_str) == Some(REDACTED) {
                    new["secret"] = c
                        .secret
                        .clone()
                        .ok_or_else(|| placeholder("secret"))?
                        .into();
                }
            }
            Self::Slack(c) => {
                if new.get("url").and_then(Value::as_str) == Some(redact_url(&c.url).as_str()) {
                    new["url"] = c.url.clone().into();
                }
            }
        }
        if let Some(obj) = new.as_object() {
            for (field, value) in obj {
                if value.as_str() == Some(REDACTED) {
                    return Err(placeholder(field));
                }
            }
        }
        Ok(new)
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Self::Email(c) => validate_email(c),
            Self::Webhook(c) => {
                check_url("config.url", &c.url)?;
                if let Some(secret) = &c.secret
                    && !(16..=1024).contains(&secret.len())
                {
                    return Err(invalid(
                        "config.secret",
                        "must be 16 to 1024 bytes (a random string, shared with the receiver)",
                    ));
                }
                Ok(())
            }
            Self::Slack(c) => check_url("config.url", &c.url),
        }
    }
}

/// `scheme://host[:port]/********`: enough to recognise where it goes, not enough to post there.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}/{REDACTED}",
                u.scheme(),
                u.host_str().unwrap_or_default()
            )
        }
        Err(_) => REDACTED.to_owned(),
    }
}

fn check_url(field: &str, url: &str) -> Result<(), ConfigError> {
    if url.len() > MAX_URL {
        return Err(invalid(field, format!("longer than {MAX_URL} bytes")));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(field, format!("`{url}`: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(
            field,
            format!(
                "`{}` URLs are not allowed; use http or https",
                parsed.scheme()
            ),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid(field, "the URL has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            field,
            "credentials in the URL are not allowed (they would be shown in the API); use `secret`",
        ));
    }
    Ok(())
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn validate_email(c: &EmailConfig) -> Result<(), ConfigError> {
    let host_ok = !c.host.is_empty()
        && c.host.len() <= 253
        && c.host
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ".-:[]".contains(ch));
    if !host_ok {
        return Err(invalid(
            "config.host",
            format!("`{}` is not a host name or address", c.host),
        ));
    }
    if !(1..=65535).contains(&c.port) {
        return Err(invalid(
            "config.port",
            format!("{} is not a port (1-65535)", c.port),
        ));
    }
    match (&c.username, &c.password) {
        (None, Some(_)) => {
            return Err(invalid("config.username", "a password needs a username"));
        }
        (Some(u), _) if u.is_empty() || u.len() > 256 => {
            return Err(invalid("config.username", "must be 1 to 256 bytes"));
        }
        (Some(_), Some(p)) if p.len() > 1024 => {
            return Err(invalid("config.password", "longer than 1024 bytes"));
        }
        _ => {}
    }
    if c.tls == SmtpTls::None && c.username.is_some() && !is_loopback_host(&c.host) {
        return Err(invalid(
            "config.tls",
            "`none` would send the SMTP credentials in clear to a remote host; use `starttls` or \
             `tls` (plain text is accepted only for a relay on localhost)",
        ));
    }
    c.from
        .parse::<Mailbox>()
        .map_err(|e| invalid("config.from", format!("`{}`: {e}", c.from)))?;
    if c.to.is_empty() || c.to.len() > MAX_RECIPIENTS {
        return Err(invalid(
            "config.to",
            format!("needs 1 to {MAX_RECIPIENTS} recipients"),
        ));
    }
    for (i, to) in c.to.iter().enumerate() {
        to.parse::<Mailbox>()
            .map_err(|e| invalid(format!("config.to[{i}]"), format!("`{to}`: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn email(patch: Value) -> Value {
        let mut base = json!({
            "host": "smtp.example.org", "port": 587, "tls": "starttls",
            "username": "mirage", "password": "hunter2", "from": "Mirage <alerts@example.org>",
            "to": ["soc@example.org"],
        });
        for (k, v) in patch.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    #[test]
    fn validates_naming_the_field() {
        for (kind, config, field) in [
            ("email", email(json!({ "port": 0 })), "config.port"),
            ("email", email(json!({ "port": 70000 })), "config.port"),
            ("email", email(json!({ "host": "a b" })), "config.host"),
            ("email", email(json!({ "tls": "none" })), "config.tls"),
            ("email", email(json!({ "tls": "ssl" })), "config"),
            ("email", email(json!({ "from": "nobody" })), "config.from"),
            ("email", email(json!({ "to": [] })), "config.to"),
            (
                "email",
                email(json!({ "to": ["a@b.c", "bad"] })),
                "config.to[1]",
            ),
            ("email", email(json!({ "cc": [] })), "config"),
            (
                "webhook",
                json!({ "url": "ftp://x.example/" }),
                "config.url",
            ),
            ("webhook", json!({ "url": "not a url" }), "config.url"),
            (
                "webhook",
                json!({ "url": "https://u:p@x.example/" }),
                "config.url",
            ),
            (
                "webhook",
                json!({ "url": "https://x.example/", "secret": "short" }),
                "config.secret",
            ),
            (
                "slack",
                json!({ "url": "file:///etc/passwd" }),
                "config.url",
            ),
            ("pager", json!({}), "kind"),
        ] {
            let err = ChannelConfig::parse(kind, &config).unwrap_err();
            assert_eq!(err.field, field, "{config}: {err}");
        }
        // Plain SMTP with credentials is fine toward a local relay.
        ChannelConfig::parse(
            "email",
            &email(json!({ "tls": "none", "host": "127.0.0.1" })),
        )
        .unwrap();
        ChannelConfig::parse(
            "email",
            &email(json!({ "tls": "none", "username": null, "password": null })),
        )
        .unwrap();
    }

    #[test]
    fn redacts_and_restores_secrets() {
        let stored = ChannelConfig::parse("email", &email(json!({}))).unwrap();
        let shown = stored.redacted();
        assert_eq!(shown["password"], REDACTED);
        assert_eq!(shown["username"], "mirage");
        let back = stored.restore_secrets(shown).unwrap();
        assert_eq!(back["password"], "hunter2");

        let hook = ChannelConfig::parse(
            "webhook",
            &json!({ "url": "https://hooks.example/x", "secret": "0123456789abcdef" }),
        )
        .unwrap();
        assert_eq!(hook.redacted()["secret"], REDACTED);
        assert_eq!(hook.redacted()["url"], "https://hooks.example/x");

        let slack = ChannelConfig::parse(
            "slack",
            &json!({ "url": "https://hooks.slack.com/services/T/B/X" }),
        )
        .unwrap();
        let shown = slack.redacted();
        assert_eq!(shown["url"], "https://hooks.slack.com/********");
        assert_eq!(
            slack.restore_secrets(shown).unwrap()["url"],
            "https://hooks.slack.com/services/T/B/X"
        );
        // A placeholder with nothing behind it.
        let bare =
            ChannelConfig::parse("webhook", &json!({ "url": "https://hooks.example/x" })).unwrap();
        let err = bare
            .restore_secrets(json!({ "url": "https://hooks.example/x", "secret": REDACTED }))
            .unwrap_err();
        assert_eq!(err.field, "config.secret");
    }
}
