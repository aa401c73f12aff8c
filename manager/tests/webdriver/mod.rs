//! Headless Chromium through chromedriver for the web UI tests: the driver runs as a child process
//! in its own process group, held by [`ChromeDriver`], which kills that group (the driver and the
//! browser it started) on drop, also when a test panics. [`Browser`] connects fantoccini to it
//! with a throw-away profile.

#![allow(
    dead_code,
    reason = "helpers for the browser test binary; not every test uses each"
)]

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The Debian `chromium` package's launcher.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The Debian `chromium-driver` package's driver.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a wait for the page lasts before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);
/// How often a wait looks again.
pub const POLL: Duration = Duration::from_millis(40);

/// Panics (fails the test, never skips it) when the browser or the driver is missing.
pub fn require_browser() {
    for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: the web UI tests need the Debian packages `chromium` and \
             `chromium-driver`; run `cargo xtask setup` (it installs {package})"
        );
    }
}

/// A free loopback port (bound and released; the driver binds it right after).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("picking a free loopback port")
}

/// A running chromedriver; dropping it kills its process group by id.
pub struct ChromeDriver {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl ChromeDriver {
    /// Starts chromedriver on a free loopback port and waits until it accepts connections.
    pub fn start() -> Self {
        require_browser();
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that drop can kill the browser it starts too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {CHROMEDRIVER}: {e}; try `cargo xtask setup`"));
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {addr} within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let Ok(pid) = i32::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) with a negative pid signals the process group we created for our own
        // child (process_group(0) made its pgid its pid); it touches no memory.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A headless Chromium session with its own profile directory.
pub struct Browser {
    /// The WebDriver client.
    pub client: Client,
    // Field order is drop order: the driver (and browser) die before the profile is removed.
    _driver: ChromeDriver,
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium at 1366×768.
    pub async fn start() -> Self {
        let driver = ChromeDriver::start();
        let profile = tempfile::Builder::new()
            .prefix("mirage-ui-chromium-")
            .tempdir()
            .expect("a temporary profile directory");
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    // CI runs as root, where the sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1366,768",
                    "--hide-scrollbars",
                    "--no-proxy-server",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--lang=en-US",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        // Both ring and aws-lc-rs are linked (see the workspace Cargo.toml), so rustls needs to be
        // told; a second install (another test in this process) is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = ClientBuilder::rustls()
            .expect("rustls connector")
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .unwrap_or_else(|e| panic!("starting headless Chromium through chromedriver: {e}"));
        Self {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    /// Ends the WebDriver session (the browser exits); the driver dies on drop.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Waits for an element matching the CSS selector.
    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(WAIT)
            .every(POLL)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("waiting for `{css}`: {e}"))
    }

    /// How many elements match the CSS selector now.
    pub async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(Locator::Css(css))
            .await
            .map(|v| v.len())
            .unwrap_or_else(|e| panic!("finding `{css}`: {e}"))
    }

    /// Runs a script (`return …;`) in the page and returns its value.
    pub async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("running `{script}`: {e}"))
    }

    /// Polls `script` until it returns a truthy value; panics with `what` and the page's text
    /// after [`WAIT`].
    pub async fn wait_js(&self, script: &str, what: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let text = self.js("return document.body.innerText;").await;
                panic!(
                    "waited {WAIT:?} for {what}; the page shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the page's visible text contains `text`.
    pub async fn wait_text(&self, text: &str) {
        let script = format!(
            "return document.body.innerText.includes({});",
            serde_json::to_string(text).unwrap_or_default()
        );
        self.wait_js(&script, &format!("the text {text:?}")).await;
    }

    /// Types into the element matching `css` (after clearing it).
    pub async fn fill(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        el.clear()
            .await
            .unwrap_or_else(|e| panic!("clearing `{css}`: {e}"));
        el.send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("typing into `{css}`: {e}"));
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking `{css}`: {e}"));
    }

    /// Selects the option with `value` in the `<select>` matching `css`.
    pub async fn choose(&self, css: &str, value: &str) {
        self.find(css)
            .await
            .select_by_value(value)
            .await
            .unwrap_or_else(|e| panic!("choosing {value:?} in `{css}`: {e}"));
    }

    /// Saves a PNG of the viewport as `screenshot_dir()/NAME.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        // Let fonts, transitions and the live-row highlight settle.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("writing {path:?}: {e}"));
        path
    }
}

/// `target/ui-screenshots` of this workspace (`CARGO_TARGET_DIR` when set).
pub fn screenshot_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    target.join("ui-screenshots")
}
