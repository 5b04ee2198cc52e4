//! The MQTT frontend: our own broker layer on rumqttd's protocol codec.
//!
//! - [`topic`]: topic names and filters, the `$` rule, `$share`, the subscription trie.

pub mod topic;
