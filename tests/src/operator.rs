//! A logged-in admin of a manager under benchmark: the user is created straight in the
//! database (the benches own it), then the session cookie and CSRF token come from a real login.
//! Shared by `bench-manager` and `bench-agent`.

use anyhow::{Context as _, Result, ensure};
use manager::{
    auth::{Role, password},
    db,
};
use serde_json::{Value, json};

/// The bench user's password.
const PASSWORD: &str = "bench password, long enough";

/// A logged-in admin.
pub struct Operator {
    http: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
}

impl Operator {
    /// Creates the user `bench` (admin) in `pool` and logs in at `base`.
    pub async fn login(http: &reqwest::Client, base: &str, pool: &sqlx::PgPool) -> Result<Self> {
        let hash = password::hash(PASSWORD).context("hashing")?;
        db::users::insert(pool, "bench", &hash, Role::Admin)
            .await
            .context("creating the bench user")?;
        let resp = http
            .post(format!("{base}/api/v1/login"))
            .json(&json!({ "username": "bench", "password": PASSWORD }))
            .send()
            .await?;
        ensure!(resp.status().is_success(), "login: {}", resp.status());
        let cookie = resp
            .headers()
            .get(reqwest::header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .context("no session cookie")?
            .to_owned();
        let body: Value = resp.json().await?;
        let csrf = body["csrf_token"]
            .as_str()
            .context("no csrf_token")?
            .to_owned();
        Ok(Self {
            http: http.clone(),
            base: base.to_owned(),
            cookie,
            csrf,
        })
    }

    /// The HTTP client (for requests with other credentials).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The manager's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST path` with the session and CSRF token; the JSON reply (an error unless 2xx).
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, &self.cookie)
            .header("x-csrf-token", &self.csrf)
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        ensure!(status.is_success(), "POST {path}: {status}: {body}");
        Ok(body)
    }

    /// `GET path` with the session.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, &self.cookie)
            .send()
            .await?;
        ensure!(resp.status().is_success(), "GET {path}: {}", resp.status());
        Ok(resp.json().await?)
    }

    /// A one-time enrollment token.
    pub async fn token(&self) -> Result<String> {
        let t = self.post("/api/v1/enrollment-tokens", &json!({})).await?;
        Ok(t["token"].as_str().context("no token")?.to_owned())
    }

    /// Enrolls a made-up agent named `hostname` over the API; returns its credential.
    pub async fn enroll(&self, hostname: &str) -> Result<String> {
        let token = self.token().await?;
        let resp = self
            .http
            .post(format!("{}/api/v1/agent/enroll", self.base))
            .json(&json!({
                "token": token, "hostname": hostname, "addresses": [], "version": "bench",
            }))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        ensure!(status.is_success(), "enroll: {status}: {body}");
        Ok(body["credential"]
            .as_str()
            .context("no credential")?
            .to_owned())
    }

    /// Blocks `addr`; returns the revision of the change once the API has answered.
    pub async fn block(&self, addr: &str) -> Result<i64> {
        let attacker = self
            .post(
                "/api/v1/attackers",
                &json!({ "net": addr, "reason": "bench" }),
            )
            .await?;
        attacker["revision"].as_i64().context("no revision")
    }
}
