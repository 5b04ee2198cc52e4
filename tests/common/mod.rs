//! Test harness: the real `thinghub` binary on 127.0.0.1 port 0 with a temporary data dir.

#![allow(dead_code)]

pub mod browser;
pub mod device;
pub mod mqtt;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const ADMIN_KEY: &str = "ops";
pub const ADMIN_SECRET: &str = "test-secret";
/// Longest a server may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Kills and reaps the child when dropped, whatever path the test takes.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Server {
    child: ChildGuard,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub data_dir: PathBuf,
    logs: mpsc::Receiver<String>,
    /// The fields of the listening line (every listener's address, or "off").
    listening: serde_json::Value,
}

impl Server {
    /// Starts a server on `data_dir` and waits (bounded) for its listening line.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Server {
        Server::start_with_env(data_dir, extra_args, &[])
    }

    /// [`Server::start`] with extra environment variables (fault injection).
    pub fn start_with_env(data_dir: &Path, extra_args: &[&str], envs: &[(&str, &str)]) -> Server {
        let child = Command::new(env!("CARGO_BIN_EXE_thinghub"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
            ])
            .args(["--log-format", "json"])
            .args(extra_args)
            .env("THINGHUB_ADMIN_KEY", format!("{ADMIN_KEY}:{ADMIN_SECRET}"))
            .env_remove("THINGHUB_CONFIG")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn thinghub");
        let mut child = ChildGuard(child);
        let stderr = child.0.stderr.take().expect("stderr");
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = logs.recv_timeout(left).unwrap_or_else(|_| {
                panic!("server did not report listening within {STARTUP_TIMEOUT:?}")
            });
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if value["fields"]["message"] == "listening" {
                // "off" for a listener turned off: 0.0.0.0:0, which nothing answers.
                let addr = |key: &str| -> SocketAddr {
                    value["fields"][key]
                        .as_str()
                        .expect("listening address")
                        .parse()
                        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
                };
                return Server {
                    child,
                    http: addr("http"),
                    mqtt: addr("mqtt"),
                    data_dir: data_dir.to_owned(),
                    logs,
                    listening: value["fields"].clone(),
                };
            }
        }
    }

    /// Starts a server whose configuration file holds `toml`, with its data in `dir/data`.
    pub fn start_configured(dir: &Path, toml: &str) -> Server {
        let config = dir.join("thinghub.toml");
        std::fs::write(&config, toml).expect("write the config file");
        let config = config.to_str().expect("UTF-8 path").to_owned();
        Server::start(&dir.join("data"), &["--config", &config])
    }

    /// The address of listener `key` (`https`, `mqtt_tls`, `mqtt_ws`, `mqtt_wss`...).
    pub fn listener(&self, key: &str) -> SocketAddr {
        self.listening[key]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {key} listener: {}", self.listening))
    }

    /// Sends SIGHUP (TLS files reload).
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Waits (bounded) for the process to end by itself (an injected abort); returns whether
    /// it did.
    pub fn exited(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.0.try_wait().expect("try_wait").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Log lines printed so far (JSON).
    pub fn logs(&self) -> Vec<String> {
        self.logs.try_iter().collect()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.child.0.kill().expect("kill -9");
        self.child.0.wait().expect("reap");
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns the exit status and the log lines.
    pub fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let exit = loop {
            if let Some(exit) = self.child.0.try_wait().expect("try_wait") {
                break exit;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let lines = self.logs.try_iter().collect();
        (exit, lines)
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Sends a request with admin credentials; returns (status, JSON body or Null).
pub async fn call(
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    call_as((ADMIN_KEY, ADMIN_SECRET), method, url, body).await
}

/// Sends a request with the API key `key:secret`; returns (status, JSON body or Null).
pub async fn call_as(
    (key, secret): (&str, &str),
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut request = client().request(method, url).basic_auth(key, Some(secret));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// The superuser the MQTT tests use as their backend application.
pub const BACKEND: (&str, &str) = ("backend", "backend-pw");

/// A server configured with `toml`, with the [`BACKEND`] superuser created.
pub async fn start_with_backend(toml: &str) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_configured(dir.path(), toml);
    create(
        &server,
        "/api/v1/authentication/users",
        serde_json::json!({"username": BACKEND.0, "password": BACKEND.1, "superuser": true}),
    )
    .await;
    (dir, server)
}

/// Registers Thing `name` and an MQTT user of the same name (so bound to it) with `password`.
pub async fn register_device(server: &Server, name: &str, password: &str) {
    create(
        server,
        "/api/v1/things",
        serde_json::json!({"thingName": name}),
    )
    .await;
    create(
        server,
        "/api/v1/authentication/users",
        serde_json::json!({"username": name, "password": password}),
    )
    .await;
}

/// POSTs `body` to `path` with admin credentials and requires 201; returns the created body.
pub async fn create(server: &Server, path: &str, body: serde_json::Value) -> serde_json::Value {
    let (status, created) =
        call(reqwest::Method::POST, &server.url(path), Some(body.clone())).await;
    assert_eq!(status, 201, "POST {path} {body} -> {created}");
    created
}

/// The `code` of every answer of a bulk reply, in order.
pub fn codes(answers: &serde_json::Value) -> Vec<u64> {
    answers
        .as_array()
        .expect("answers")
        .iter()
        .map(|a| a["code"].as_u64().expect("code"))
        .collect()
}

/// Runs `thinghub check` on the (stopped) server's data directory and requires it to report
/// no problem.
#[allow(dead_code)]
pub fn assert_check_finds_no_problem(data_dir: &Path) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_thinghub"))
        .args(["check", "--data-dir"])
        .arg(data_dir)
        .env_remove("THINGHUB_CONFIG")
        .output()
        .expect("run thinghub check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("no problems"),
        "{stdout}"
    );
}
