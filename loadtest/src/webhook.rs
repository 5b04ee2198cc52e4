//! A webhook receiver on loopback for the `shadow --webhook` phase: it accepts every batch,
//! counts the records and the lag of each (its arrival minus the record's `at`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use hdrhistogram::Histogram;

/// What the receiver saw.
pub struct Received {
    /// Records received.
    pub records: u64,
    /// Lag per record, µs.
    pub lag: Histogram<u64>,
}

/// A running receiver.
pub struct Receiver {
    /// Where it listens (`http://.../hook`).
    pub url: String,
    state: Arc<Mutex<Received>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn receive(State(state): State<Arc<Mutex<Received>>>, body: Bytes) -> StatusCode {
    let Ok(records) = serde_json::from_slice::<Vec<serde_json::Value>>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let now = now_ms();
    let mut received = state.lock().unwrap_or_else(|p| p.into_inner());
    for record in &records {
        let at = record["at"].as_u64().unwrap_or(now);
        received
            .lag
            .saturating_record(now.saturating_sub(at).max(1) * 1000);
    }
    received.records += records.len() as u64;
    StatusCode::OK
}

impl Receiver {
    /// Starts one on 127.0.0.1.
    pub async fn start() -> Result<Receiver> {
        let state = Arc::new(Mutex::new(Received {
            records: 0,
            lag: crate::histogram(),
        }));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the webhook receiver")?;
        let addr: SocketAddr = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "webhook receiver stopped");
            }
        });
        Ok(Receiver {
            url: format!("http://{addr}/hook"),
            state,
        })
    }

    /// Records received so far.
    pub fn records(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).records
    }

    /// What it saw so far.
    pub fn snapshot(&self) -> (u64, Histogram<u64>) {
        let received = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (received.records, received.lag.clone())
    }
}
