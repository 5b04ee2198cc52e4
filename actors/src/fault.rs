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

use std::sync::OnceLock;
use std::time::Duration;

use crate::thing::effects::Effect;
use crate::thing::ThingCommand;
use crate::thing_actor::Request;

/// Aborts between a commit and its effects.
pub const ABORT_BEFORE_EFFECT: &str = "THINGHUB_FAULT_ABORT_BEFORE_EFFECT";
/// Holds the reply to a sent command.
pub const HOLD_COMMAND_REPLY_MS: &str = "THINGHUB_FAULT_HOLD_COMMAND_REPLY_MS";

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
