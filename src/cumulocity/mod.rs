//! The Cumulocity-compatible device surface (issue 15): what devices built for Cumulocity's
//! MQTT speak. Here: the SmartREST CSV codec, the static templates (rows decoded into
//! requests, error rows for `s/e`, operation rows for `s/ds`) and the device registrations of
//! the credential bootstrap. The MQTT side is `crate::mqtt::cumulocity`.

pub mod children;
pub mod registrations;
pub mod smartrest;
pub mod templates;
