//! The web UI: `GET /` serves the single-page shell and `GET /ui/{path}` its assets (one
//! stylesheet, vanilla JavaScript modules, an icon), all compiled into the binary with
//! `include_bytes!`. There is no build step and nothing is fetched from elsewhere, so the UI works
//! on an air-gapped management network exactly as it was tested.
//!
//! The UI displays attacker-controlled text (log lines, usernames and passwords tried, commands), so
//! every response here carries a strict Content-Security-Policy: scripts and styles only from this
//! origin, no inline script or event handler, no `eval`, no framing. The scripts insert API values
//! with `textContent` only (a unit test below keeps HTML-parsing sinks out of the assets); the CSP
//! is the second line if that ever slips.

use axum::{
    extract::Path,
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

/// The policy on every UI response. `img-src data:` allows inline SVG data URLs only;
/// `form-action 'self'` and `base-uri 'none'` close the two gaps `default-src` leaves.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

/// One embedded file.
struct Asset {
    /// Path under `/ui/`.
    path: &'static str,
    /// `Content-Type`.
    content_type: &'static str,
    /// The bytes.
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:expr) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_bytes!(concat!("../../ui/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every asset under `/ui/` (the shell, `index.html`, is served at `/`).
static ASSETS: &[Asset] = &[
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
    asset!("js/api.js", JS),
    asset!("js/app.js", JS),
    asset!("js/chart.js", JS),
    asset!("js/dom.js", JS),
    asset!("js/pages/agents.js", JS),
    asset!("js/pages/alerts.js", JS),
    asset!("js/pages/attacker.js", JS),
    asset!("js/pages/attackers.js", JS),
    asset!("js/pages/audit.js", JS),
    asset!("js/pages/dashboard.js", JS),
    asset!("js/pages/log.js", JS),
    asset!("js/pages/login.js", JS),
    asset!("js/pages/policies.js", JS),
    asset!("js/pages/settings.js", JS),
    asset!("js/pages/users.js", JS),
];

/// The shell.
const INDEX: &[u8] = include_bytes!("../../ui/index.html");

/// A response with the security headers every UI file carries.
fn serve(content_type: &'static str, body: &'static [u8]) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
        // The assets change with the binary; `no-cache` revalidates instead of serving a stale
        // script against a newer API.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, body).into_response()
}

/// `GET /`: the single-page shell (routing is in the URL fragment).
pub async fn index() -> Response {
    serve("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/{*path}`: an embedded asset, or 404.
pub async fn asset(Path(path): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.path == path) {
        Some(a) => serve(a.content_type, a.body),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.js`/`.css` file on disk is embedded (a new page module that is not listed would
    /// 404 in the browser only).
    #[test]
    fn embeds_every_file() {
        fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
                let path = entry.map(|e| e.path()).unwrap_or_default();
                if path.is_dir() {
                    walk(&path, base, out);
                } else if let Ok(rel) = path.strip_prefix(base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
        let mut files = Vec::new();
        walk(&base, &base, &mut files);
        for file in files.iter().filter(|f| *f != "index.html") {
            assert!(
                ASSETS.iter().any(|a| a.path == file),
                "manager/ui/{file} is not in ASSETS"
            );
        }
    }

    /// No HTML-parsing sink and no string evaluation anywhere in the scripts: API values go in
    /// with `textContent` and `createElement` only.
    #[test]
    fn scripts_use_no_html_sinks() {
        let sinks = [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "setAttribute('on",
            "srcdoc",
        ];
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let text = std::str::from_utf8(a.body).unwrap_or_default();
            for sink in sinks {
                assert!(!text.contains(sink), "{} uses `{sink}`", a.path);
            }
        }
        let html = std::str::from_utf8(INDEX).unwrap_or_default();
        assert!(!html.contains("<script>"), "inline script in index.html");
        let handler = html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        });
        assert!(!handler, "inline event handler in index.html");
        assert!(!html.contains("style="), "inline style in index.html");
    }
}
