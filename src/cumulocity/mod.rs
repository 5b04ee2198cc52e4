//! The Cumulocity-compatible device surface (issue 15): what devices built for Cumulocity's
//! MQTT speak. Built so far: the SmartREST CSV codec and the static templates (rows decoded
//! into requests, error rows for `s/e`, operation rows for `s/ds`). Not wired to MQTT yet.

pub mod smartrest;
pub mod templates;
