//! A real browser for the console's tests: Debian's chromium, headless, driven through
//! chromedriver (WebDriver) with fantoccini. `.ci/run` installs both and sets
//! `THINGHUB_REQUIRE_INTEROP=1`; on a machine without them a test says so and does not run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// How long any one wait for the page lasts.
pub const PAGE_WAIT: Duration = Duration::from_secs(15);

/// Whether chromium and chromedriver are installed (a failure under CI if not).
pub fn available() -> bool {
    let found = Command::new("chromedriver")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && std::path::Path::new("/usr/bin/chromium").exists();
    if !found {
        assert!(
            std::env::var_os("THINGHUB_REQUIRE_INTEROP").is_none(),
            "THINGHUB_REQUIRE_INTEROP is set but chromium/chromedriver are not installed (apt-get install chromium chromium-driver)"
        );
        eprintln!("chromium/chromedriver not installed: browser test NOT run (CI installs them)");
    }
    found
}

/// A headless chromium session; its chromedriver is killed on drop.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Browser {
    /// Starts chromedriver on loopback and a headless chromium session of `width`×`height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        Browser::start_with(width, height, true).await
    }

    /// [`Browser::start`] with JavaScript turned off (what a page must be readable without).
    pub async fn start_without_javascript(width: u32, height: u32) -> Browser {
        Browser::start_with(width, height, false).await
    }

    async fn start_with(width: u32, height: u32, javascript: bool) -> Browser {
        let mut tries = 0;
        loop {
            tries += 1;
            let port = free_port();
            let mut driver = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver");
            let url = format!("http://127.0.0.1:{port}");
            let deadline = tokio::time::Instant::now() + PAGE_WAIT;
            let mut last_error = String::new();
            while tokio::time::Instant::now() < deadline {
                let mut builder =
                    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
                let mut capabilities = serde_json::Map::new();
                capabilities.insert(
                    "goog:chromeOptions".into(),
                    json!({
                        "binary": "/usr/bin/chromium",
                        "args": [
                            "--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--no-first-run",
                            format!("--window-size={width},{height}"),
                        ],
                        "prefs": {
                            "profile.managed_default_content_settings.javascript":
                                if javascript { 1 } else { 2 },
                        },
                    }),
                );
                builder.capabilities(capabilities);
                match builder.connect(&url).await {
                    Ok(client) => return Browser { client, driver },
                    Err(e) => last_error = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = driver.kill();
            let _ = driver.wait();
            // Another process may have taken the port between the probe and chromedriver.
            assert!(tries < 3, "no browser session: {last_error}");
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    /// The element, waited for.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element '{css}': {e}"))
    }

    /// Whether an element is on the page now (no wait).
    pub async fn has(&self, css: &str) -> bool {
        self.client
            .find_all(Locator::Css(css))
            .await
            .is_ok_and(|found| !found.is_empty())
    }

    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("text")
    }

    /// Replaces a field's value.
    pub async fn fill(&self, css: &str, value: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("clear");
        field.send_keys(value).await.expect("type");
    }

    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("click");
    }

    /// Clicks something that loads a new page and waits (bounded) until the new page is there,
    /// so nothing is read off the old one.
    pub async fn click_through(&self, css: &str) {
        self.navigating(|| self.click(css)).await;
    }

    /// Runs `act`, which leaves the page, and waits until the new page is there.
    pub async fn navigating<F: std::future::Future<Output = ()>>(&self, act: impl FnOnce() -> F) {
        self.client
            .execute("window.__oldPage = true;", vec![])
            .await
            .expect("mark the page");
        act().await;
        let deadline = tokio::time::Instant::now() + PAGE_WAIT;
        loop {
            let left = self
                .client
                .execute(
                    "return window.__oldPage === undefined && document.readyState === 'complete';",
                    vec![],
                )
                .await
                .is_ok_and(|v| v == serde_json::Value::Bool(true));
            if left {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page did not change after {}",
                std::any::type_name::<F>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reloads `url` until `css`'s text satisfies `want` (bounded).
    pub async fn reload_until(&self, url: &str, css: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + PAGE_WAIT;
        loop {
            self.goto(url).await;
            let text = self.text(css).await;
            if want(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "'{css}' on {url} never became as wanted; last: {text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves a screenshot as a test artifact (`target/tmp/console-screenshots/{name}.png`).
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}
