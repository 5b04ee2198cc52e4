//! thinghub: a single-binary IoT device-fleet server.
//!
//! - [`config`]: one `Config` from defaults, a TOML file, `THINGHUB_*` env vars and flags.
//! - [`server`]: wiring: storage -> Thing registry -> frontends, and graceful shutdown.
//! - [`http`]: the axum frontend (management API, device ThingDatas API, health).
//! - [`mqtt`]: the MQTT broker layer on rumqttd's codec.
//! - [`auth`]: admin API keys (argon2-hashed at rest).
//! - [`users`]: MQTT credentials (argon2id-hashed), bound to Things or superusers.
//! - [`throttle`]: failed-authentication backoff per source address and username.
//! - [`tls`]: TLS for the listeners (rustls), client certificates, reload, `certs init`.
//! - [`certificates`]: device certificates registered for Things (X.509 identity).
//! - [`audit`]: `thinghub audit THING`, a Thing's history for people and auditors.
//! - [`check`]: `thinghub check`, every record decoded and every Thing replayed against its
//!   snapshot and indexes.
//!
//! The domain and the actors live in `thinghub-actors`; storage in `thinghub-storage`.

pub mod audit;
pub mod auth;
pub mod certificates;
pub mod check;
pub mod config;
pub mod cumulocity;
pub mod http;
pub mod mqtt;
pub mod server;
pub mod throttle;
pub mod tls;
pub mod users;
pub mod webhooks;
