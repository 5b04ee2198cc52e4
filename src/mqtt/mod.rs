//! The MQTT frontend: our own broker layer on rumqttd's protocol codec.
//!
//! - [`broker`]: sessions, subscriptions, retained messages, delivery and the in-flight window.
//! - [`codec`]: the adapter over rumqttd's codec (version detection, private fields, panics).
//! - [`topic`]: topic names and filters, the `$` rule, `$share`, the subscription trie.

pub mod broker;
pub mod codec;
pub mod topic;
