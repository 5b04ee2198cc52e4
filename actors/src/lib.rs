//! thinghub's domain and its actors.
//!
//! - [`thing`]: the pure domain (decide/apply for registration and the shadow).
//! - [`codec`]: how domain events and state map to storage envelopes (with upcasting).

pub mod codec;
pub mod thing;
