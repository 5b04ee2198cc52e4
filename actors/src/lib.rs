//! thinghub's domain and the actors that host it.
//!
//! - [`thing`]: the pure domain (decide/apply for registration, shadow, events, commands). No IO.
//! - [`codec`]: how domain events and state map to storage envelopes (with upcasting).
//! - [`thing_actor`]: the persistence shell: replay, decide -> durable append -> apply -> reply.
//! - [`registry`]: name -> actor routing, activation, the passivation handshake, supervision.
//! - [`deadlines`]: the one timer that fires command deadlines from the storage index.
//! - [`outbox`]: effects of committed changes to the sink, at least once (the change feed).
//! - [`context`]: what Thing actors share with the node's background tasks.
//! - [`node`]: the registry and its background tasks (sweeper, timer, outbox keeper), one shutdown.
//! - [`service`]: the typed API frontends call (validation, 404 without activation, history).
//! - [`clock`]: the one time source, controllable in tests.
//! - [`alarms`]: offline alarm rules (shared with the actors), their sweeps, the alarm listing.

pub mod alarms;
pub mod clock;
pub mod codec;
pub mod context;
pub mod deadlines;
#[cfg(feature = "test-util")]
pub mod fault;
pub mod groups;
pub mod integration;
pub mod job_manager;
pub mod node;
pub mod outbox;
pub mod registry;
pub mod service;
pub mod thing;
pub mod thing_actor;

pub use context::ThingContext;
pub use node::{Node, NodeConfig};
pub use registry::{Registry, RegistryConfig, RegistryStats};
pub use service::{HistoryEntry, ThingSummary, Things};
pub use thing_actor::{load_state, Request, Response};
