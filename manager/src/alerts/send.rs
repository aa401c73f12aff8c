//! The transports: e-mail through lettre's async SMTP client (tokio, rustls), and webhooks
//! through reqwest (rustls). Every send is bounded by one timeout, so a stuck receiver costs its
//! own channel that long and nothing else.

use std::time::Duration;

use hmac::{Hmac, Mac as _};
use lettre::{
    AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor,
    message::{Mailbox, header::ContentType},
    transport::smtp::authentication::Credentials,
};
use sha2::Sha256;

use super::{
    channel::{ChannelConfig, EmailConfig, SmtpTls},
    message::Message,
};

/// Header carrying the webhook body's HMAC-SHA256: `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-mirage-signature";
/// Header carrying the delivery id (receivers can de-duplicate retries with it).
pub const DELIVERY_HEADER: &str = "x-mirage-delivery";
/// Most bytes of an error response body kept in `last_error`.
const MAX_ERROR_BODY: usize = 200;

/// Why a message was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// An address in the configuration does not parse (validated on input, so only if the
    /// stored configuration was edited by hand).
    #[error("invalid e-mail address `{address}`")]
    Address {
        /// The address.
        address: String,
        /// The cause.
        #[source]
        source: lettre::address::AddressError,
    },
    /// The e-mail could not be built.
    #[error("building the e-mail")]
    Build(#[source] lettre::error::Error),
    /// The SMTP exchange failed.
    #[error("SMTP to {host}:{port} failed")]
    Smtp {
        /// The server.
        host: String,
        /// Its port.
        port: i64,
        /// The cause.
        #[source]
        source: lettre::transport::smtp::Error,
    },
    /// The SMTP port is out of range (only if edited by hand).
    #[error("SMTP port {0} is not a port")]
    Port(i64),
    /// The HTTP client could not be built.
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    /// The HTTP request failed (connection, TLS, timeout).
    #[error("POST to {host} failed")]
    Http {
        /// The URL's host.
        host: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The receiver answered with an error status.
    #[error("{host} answered HTTP {status}: {body}")]
    Status {
        /// The URL's host.
        host: String,
        /// The status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The whole send took longer than the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The body could not be serialized.
    #[error("serializing the body")]
    Json(#[source] serde_json::Error),
}

impl SendError {
    /// The error with its causes, for `last_error`.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(err) = source {
            out.push_str(": ");
            out.push_str(&err.to_string());
            source = err.source();
        }
        out
    }
}

/// Sends rendered messages.
#[derive(Debug, Clone)]
pub struct Sender {
    http: reqwest::Client,
    timeout: Duration,
}

impl Sender {
    /// A sender whose every send gives up after `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, SendError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // A webhook that redirects is misconfigured; following it could also turn an
            // admin-configured URL into a request somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("mirage-manager/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(SendError::Client)?;
        Ok(Self { http, timeout })
    }

    /// Sends `message` through a channel; `delivery` is the delivery row's id.
    pub async fn send(
        &self,
        config: &ChannelConfig,
        message: &Message,
        delivery: i64,
    ) -> Result<(), SendError> {
        let send = async {
            match config {
                ChannelConfig::Email(c) => self.email(c, message).await,
                ChannelConfig::Webhook(c) => {
                    let body = serde_json::to_vec(&message.json).map_err(SendError::Json)?;
                    self.post(&c.url, body, c.secret.as_deref(), delivery).await
                }
                ChannelConfig::Slack(c) => {
                    let body = serde_json::to_vec(&message.slack()).map_err(SendError::Json)?;
                    self.post(&c.url, body, None, delivery).await
                }
            }
        };
        // The HTTP client and each SMTP command time out on their own; this bounds the whole
        // exchange (an SMTP server answering every command just in time).
        let limit = self.timeout * 2;
        tokio::time::timeout(limit, send)
            .await
            .map_err(|_| SendError::Timeout(limit))?
    }

    async fn email(&self, c: &EmailConfig, message: &Message) -> Result<(), SendError> {
        let mailbox = |address: &str| {
            address
                .parse::<Mailbox>()
                .map_err(|source| SendError::Address {
                    address: address.to_owned(),
                    source,
                })
        };
        let mut builder = lettre::Message::builder()
            .from(mailbox(&c.from)?)
            .subject(message.subject.clone())
            .header(ContentType::TEXT_PLAIN);
        for to in &c.to {
            builder = builder.to(mailbox(to)?);
        }
        let email = builder
            .body(message.text.clone())
            .map_err(SendError::Build)?;
        let smtp = |source| SendError::Smtp {
            host: c.host.clone(),
            port: c.port,
            source,
        };
        let port = u16::try_from(c.port).map_err(|_| SendError::Port(c.port))?;
        let builder = match c.tls {
            // Validation allows this only without credentials or toward a loopback relay.
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&c.host),
            SmtpTls::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&c.host).map_err(smtp)?
            }
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&c.host).map_err(smtp)?,
        };
        let mut builder = builder.port(port).timeout(Some(self.timeout));
        if let Some(username) = &c.username {
            builder = builder.credentials(Credentials::new(
                username.clone(),
                c.password.clone().unwrap_or_default(),
            ));
        }
        builder.build().send(email).await.map_err(smtp)?;
        Ok(())
    }

    async fn post(
        &self,
        url: &str,
        body: Vec<u8>,
        secret: Option<&str>,
        delivery: i64,
    ) -> Result<(), SendError> {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        let mut request = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(DELIVERY_HEADER, delivery.to_string());
        if let Some(secret) = secret {
            request = request.header(SIGNATURE_HEADER, format!("sha256={}", sign(secret, &body)));
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|source| SendError::Http {
                host: host.clone(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let mut end = text.len().min(MAX_ERROR_BODY);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Err(SendError::Status {
            host,
            status: status.as_u16(),
            body: text[..end].trim().to_owned(),
        })
    }
}

/// Lower-case hex of HMAC-SHA256(`secret`, `body`).
pub fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    crate::auth::hex(&mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_rfc_4231() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
