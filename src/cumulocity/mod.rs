//! The Cumulocity-compatible device surface (issue 15): what devices built for Cumulocity's
//! MQTT speak. Built so far: the SmartREST CSV codec.

pub mod smartrest;
