//! The thinghub a network scenario drives: a running one (`--mqtt --http --admin-key`), or one
//! it starts itself on free loopback ports with a temporary data dir. Loopback only.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};

use crate::mqtt::{ChildServer, ADMIN};

/// Where the server is (every network scenario takes these).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TargetArgs {
    /// MQTT address of a running thinghub (loopback); without it one is started.
    #[arg(long, requires_all = ["http", "admin_key"])]
    pub mqtt: Option<SocketAddr>,
    /// HTTP address of the running thinghub (loopback).
    #[arg(long, requires_all = ["mqtt", "admin_key"])]
    pub http: Option<SocketAddr>,
    /// Its admin key, `KEY:SECRET`.
    #[arg(long, requires_all = ["mqtt", "http"])]
    pub admin_key: Option<String>,
}

/// A server to drive.
pub struct Target {
    /// HTTP address.
    pub http: SocketAddr,
    /// MQTT address.
    pub mqtt: SocketAddr,
    /// Admin key and secret.
    pub admin: (String, String),
    /// The server this run started (killed when the run ends), if any.
    pub child: Option<ChildServer>,
    client: reqwest::Client,
}

impl Target {
    /// Connects to the server named by `args`, or starts one.
    pub async fn open(args: &TargetArgs) -> Result<Target> {
        let client = reqwest::Client::new();
        match (&args.mqtt, &args.http, &args.admin_key) {
            (Some(mqtt), Some(http), Some(key)) => {
                for addr in [mqtt, http] {
                    if !addr.ip().is_loopback() {
                        bail!(
                            "{addr} is not a loopback address: load tests target 127.0.0.0/8 only"
                        );
                    }
                }
                let (key, secret) = key
                    .split_once(':')
                    .context("--admin-key must be KEY:SECRET")?;
                Ok(Target {
                    http: *http,
                    mqtt: *mqtt,
                    admin: (key.to_owned(), secret.to_owned()),
                    child: None,
                    client,
                })
            }
            _ => {
                let child = ChildServer::start().await?;
                Ok(Target {
                    http: child.http,
                    mqtt: child.mqtt,
                    admin: (ADMIN.0.to_owned(), ADMIN.1.to_owned()),
                    child: Some(child),
                    client,
                })
            }
        }
    }

    /// An admin request to `path`.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.requester().request(method, path)
    }

    /// What makes admin requests, for tasks of their own.
    pub fn requester(&self) -> Requester {
        Requester {
            client: self.client.clone(),
            http: self.http,
            admin: self.admin.clone(),
        }
    }

    /// `GET /api/v1/metrics`.
    pub async fn metrics(&self) -> Result<serde_json::Value> {
        let response = self
            .request(reqwest::Method::GET, "/api/v1/metrics")
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("GET /api/v1/metrics: {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// The server's resident set size, bytes (from its metrics).
    pub async fn rss_bytes(&self) -> Result<u64> {
        Ok(self.metrics().await?["process"]["rssBytes"]
            .as_u64()
            .unwrap_or(0))
    }

    /// Where devices connect: the plain MQTT listener, or with `tls` the TLS one of a server
    /// this run started (whose CA it knows).
    pub fn endpoint(&self, tls: bool) -> Result<crate::device::Endpoint> {
        if !tls {
            return Ok(self.mqtt.into());
        }
        let Some((addr, ca)) = self.child.as_ref().and_then(|c| c.mqtt_tls.clone()) else {
            bail!("--tls needs a server this run starts (it writes that server's certificates)");
        };
        Ok(crate::device::Endpoint {
            addr,
            tls: Some(crate::device::ClientTls::trusting(&ca, "127.0.0.1")?),
        })
    }

    /// The server's pid: the child this run started, else the process listening on the MQTT
    /// port (if this user may see it).
    pub fn server_pid(&self) -> Option<u32> {
        match &self.child {
            Some(child) => child.pid(),
            None => crate::cpu::pid_listening_on(self.mqtt.port()),
        }
    }

    /// Bytes on disk of the data directory, when this run started the server.
    pub fn disk_bytes(&self) -> Option<u64> {
        self.child.as_ref().map(|c| dir_bytes(c.data_dir()))
    }
}

/// Admin requests to a server (cheap to clone: the client's pool is shared).
#[derive(Clone)]
pub struct Requester {
    client: reqwest::Client,
    http: SocketAddr,
    admin: (String, String),
}

impl Requester {
    /// An admin request to `path`.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("http://{}{path}", self.http))
            .basic_auth(&self.admin.0, Some(&self.admin.1))
    }
}

/// Total size of the files under `dir`.
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
