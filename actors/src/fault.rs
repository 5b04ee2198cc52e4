//! Fault injection, compiled only with the `test-util` feature (the end-to-end tests' server
//! binary has it; release builds do not). Each hook is switched on by an environment variable
//! read once:
//!
//! - `THINGHUB_FAULT_ABORT_BEFORE_EFFECT={effect name}`: the process aborts (no shutdown code
//!   runs, as with kill -9) right after a change causing that effect is durable and before the
//!   effect is delivered.
//! - `THINGHUB_FAULT_HOLD_COMMAND_REPLY_MS={ms}`: a Thing holds its reply to a sent command
//!   that long after the command is durable and its effects are delivered (a slow answer that
//!   the HTTP client gives up on, or that times out).
//! - `THINGHUB_FAULT_SINK_CHECKPOINT_FAILS=1`: every checkpoint of the effect sink fails (storage
//!   that cannot store MQTT sessions), so nothing the broker changes becomes durable.

use std::sync::OnceLock;
use std::time::Duration;

use crate::thing::effects::Effect;
use crate::thing::ThingCommand;
use crate::thing_actor::Request;

/// Aborts between a commit and its effects.
pub const ABORT_BEFORE_EFFECT: &str = "THINGHUB_FAULT_ABORT_BEFORE_EFFECT";
/// Holds the reply to a sent command.
pub const HOLD_COMMAND_REPLY_MS: &str = "THINGHUB_FAULT_HOLD_COMMAND_REPLY_MS";
/// Fails the effect sink's checkpoints.
pub const SINK_CHECKPOINT_FAILS: &str = "THINGHUB_FAULT_SINK_CHECKPOINT_FAILS";

/// Whether the sink's checkpoints are to fail.
pub(crate) fn sink_checkpoint_fails() -> bool {
    static FAILS: OnceLock<bool> = OnceLock::new();
    *FAILS.get_or_init(|| std::env::var(SINK_CHECKPOINT_FAILS).is_ok_and(|v| v == "1"))
}

pub(crate) fn before_effects(thing: &str, effects: &[Effect]) {
    static WANTED: OnceLock<Option<String>> = OnceLock::new();
    let Some(wanted) = WANTED.get_or_init(|| std::env::var(ABORT_BEFORE_EFFECT).ok()) else {
        return;
    };
    if effects.iter().any(|e| e.name() == wanted) {
        tracing::error!(%thing, effect = %wanted, "fault injection: aborting between a commit and its effects");
        std::process::abort();
    }
}

/// How long to hold the reply to `request`, if at all.
pub(crate) fn reply_hold(request: &Request) -> Option<Duration> {
    static HOLD: OnceLock<Option<Duration>> = OnceLock::new();
    let hold = (*HOLD.get_or_init(|| {
        std::env::var(HOLD_COMMAND_REPLY_MS)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
    }))?;
    matches!(request, Request::Command(ThingCommand::SendCommand(_))).then_some(hold)
}
