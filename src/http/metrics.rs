//! What operators and the load-test harness read: process, Things, storage, MQTT and timer
//! counters, as JSON (`GET /api/v1/metrics`) and in the Prometheus text format (`GET /metrics`).
//! Every value is a cheap read (counters and atomics); nothing walks the database.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

#[allow(unused_imports)]
use super::schema as s;
use super::AppState;
use crate::mqtt::codec::PACKET_TYPES;

/// One metric: Prometheus name, type, help, value, and where it goes in the JSON.
struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: f64,
    group: &'static str,
    key: &'static str,
    /// A Prometheus label (`name{label="value"}`) for a family of metrics under one name.
    label: Option<(&'static str, &'static str)>,
}

/// The process's resident set size, bytes (0 where /proc is not available).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Every counter now, by (group, key): what the statistics sampler keeps.
pub(super) fn counters(state: &AppState) -> Vec<(&'static str, &'static str, f64)> {
    collect(state)
        .into_iter()
        .filter(|m| m.kind == "counter")
        .map(|m| (m.group, m.key, m.value))
        .collect()
}

/// Every metric now as `{group: {key: value}}` (the body of `GET /api/v1/metrics`).
pub(super) fn current(state: &AppState) -> Value {
    let mut body = json!({});
    for metric in collect(state) {
        let value = if metric.value.fract() == 0.0 && metric.value >= 0.0 {
            json!(metric.value as u64)
        } else {
            json!(metric.value)
        };
        body[metric.group][metric.key] = value;
    }
    body
}

fn collect(state: &AppState) -> Vec<Metric> {
    let registry = state.things.registry();
    let things = registry.stats();
    let timer = registry.deadline_stats();
    let commit = registry.context().store.commit_stats();
    let memtable = registry.context().store.memtable_stats();
    // Epoch 0 (the main database's trees from before epochs) is not a database of its own.
    let epochs: Vec<_> = registry
        .context()
        .store
        .log_epochs()
        .into_iter()
        .filter(|e| e.id > 0)
        .collect();
    let broker = &state.broker.stats;
    let counts = state.broker.counts();
    let (sessions, connections) = (counts.sessions, counts.connected);
    let traffic = &broker.traffic;
    let (retained, retained_bytes) = state.broker.retained_counts();
    let auth = &state.throttle.stats;
    let outbox = &registry.context().outbox;
    let persist = &state.persistence.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    let m = |name, kind, help, value: f64, group, key| Metric {
        name,
        kind,
        help,
        value,
        group,
        key,
        label: None,
    };
    let mut metrics = vec![
        m(
            "thinghub_process_resident_memory_bytes",
            "gauge",
            "Resident set size of the server process.",
            rss_bytes() as f64,
            "process",
            "rssBytes",
        ),
        m(
            "thinghub_process_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            state.started.elapsed().as_secs_f64(),
            "process",
            "uptimeSeconds",
        ),
        m(
            "thinghub_things_active",
            "gauge",
            "Thing actors alive now.",
            things.active_things as f64,
            "things",
            "activeActors",
        ),
        m(
            "thinghub_thing_activations_total",
            "counter",
            "Thing actors started (replays).",
            things.activations as f64,
            "things",
            "activations",
        ),
        m(
            "thinghub_thing_passivations_total",
            "counter",
            "Thing actors stopped after idling.",
            things.passivations as f64,
            "things",
            "passivations",
        ),
        m(
            "thinghub_thing_failures_total",
            "counter",
            "Thing actors that died unexpectedly.",
            things.failures as f64,
            "things",
            "failures",
        ),
        m(
            "thinghub_storage_commits_total",
            "counter",
            "Group commits (write-ahead fsync, main database flush + fsync).",
            commit.batches as f64,
            "storage",
            "commits",
        ),
        m(
            "thinghub_storage_durable_writes_total",
            "counter",
            "Appends and syncs made durable.",
            commit.waiters as f64,
            "storage",
            "durableWrites",
        ),
        m(
            "thinghub_storage_commit_seconds_total",
            "counter",
            "Time spent in group commits (write-ahead sync, flush + fsync).",
            commit.flush_us_total as f64 / 1e6,
            "storage",
            "commitSecondsTotal",
        ),
        m(
            "thinghub_storage_checkpoints_total",
            "counter",
            "Checkpoints ended: the in-memory events written into the log epochs and flushed (on the checkpoint thread, or inline in a group commit), older write-ahead segments dropped.",
            commit.checkpoints as f64,
            "storage",
            "checkpoints",
        ),
        m(
            "thinghub_storage_memtable_bytes",
            "gauge",
            "Bytes of events held in memory until a checkpoint writes them into the log epochs (counted against storage_memtable_bytes_max).",
            memtable.bytes as f64,
            "storage",
            "memtableBytes",
        ),
        m(
            "thinghub_storage_writes_refused_total",
            "counter",
            "Appends refused because the events waiting in memory reached storage_memtable_bytes_max (checkpoints failing or behind).",
            memtable.refused as f64,
            "storage",
            "writesRefused",
        ),
        m(
            "thinghub_storage_log_epochs",
            "gauge",
            "Log epochs (one sled database each under log/).",
            epochs.len() as f64,
            "storage",
            "logEpochs",
        ),
        m(
            "thinghub_storage_log_epochs_unsealed",
            "gauge",
            "Log epochs still flushed by the group commit: the current one, and any whose earlier positions are not yet durable.",
            epochs.iter().filter(|e| !e.sealed).count() as f64,
            "storage",
            "logEpochsUnsealed",
        ),
        m(
            "thinghub_storage_log_epochs_packed",
            "gauge",
            "Sealed log epochs rewritten into blocks of records in key order (what a sealed epoch becomes once packed in the background).",
            epochs.iter().filter(|e| e.packed).count() as f64,
            "storage",
            "logEpochsPacked",
        ),
        m(
            "thinghub_mqtt_connections",
            "gauge",
            "Connected MQTT clients.",
            connections as f64,
            "mqtt",
            "connections",
        ),
        m(
            "thinghub_mqtt_sessions",
            "gauge",
            "MQTT sessions, connected or persistent.",
            sessions as f64,
            "mqtt",
            "sessions",
        ),
        m(
            "thinghub_mqtt_messages_in_total",
            "counter",
            "PUBLISH packets received from clients.",
            load(&broker.messages_in),
            "mqtt",
            "messagesIn",
        ),
        m(
            "thinghub_mqtt_messages_out_total",
            "counter",
            "PUBLISH packets handed to connections.",
            load(&broker.messages_out),
            "mqtt",
            "messagesOut",
        ),
        m(
            "thinghub_mqtt_messages_dropped_total",
            "counter",
            "Messages dropped by a bound (queue length or bytes, a full outbound channel).",
            load(&broker.messages_dropped),
            "mqtt",
            "messagesDropped",
        ),
        m(
            "thinghub_mqtt_messages_expired_total",
            "counter",
            "Messages whose v5 expiry passed undelivered.",
            load(&broker.messages_expired),
            "mqtt",
            "messagesExpired",
        ),
        m(
            "thinghub_mqtt_acl_denied_total",
            "counter",
            "Publishes and subscriptions refused by the ACL.",
            load(&broker.acl_denied),
            "mqtt",
            "aclDenied",
        ),
        m(
            "thinghub_mqtt_queued_bytes",
            "gauge",
            "Bytes (topic + payload) queued or in flight for MQTT sessions.",
            load(&broker.queued_bytes),
            "mqtt",
            "queuedBytes",
        ),
        m(
            "thinghub_mqtt_outbound_bytes",
            "gauge",
            "Bytes handed to MQTT connections and not yet written.",
            load(&broker.outbound_bytes),
            "mqtt",
            "outboundBytes",
        ),
        m(
            "thinghub_mqtt_retained_messages",
            "gauge",
            "Retained messages.",
            retained as f64,
            "mqtt",
            "retainedMessages",
        ),
        m(
            "thinghub_mqtt_retained_bytes",
            "gauge",
            "Bytes (topic + payload) of retained messages.",
            retained_bytes as f64,
            "mqtt",
            "retainedBytes",
        ),
        m(
            "thinghub_mqtt_retained_refused_total",
            "counter",
            "Retained publishes refused by a retained bound.",
            load(&broker.retained_refused),
            "mqtt",
            "retainedRefused",
        ),
        m(
            "thinghub_mqtt_sessions_refused_total",
            "counter",
            "CONNECTs refused because mqtt_sessions_max sessions exist.",
            load(&broker.sessions_refused),
            "mqtt",
            "sessionsRefused",
        ),
        m(
            "thinghub_mqtt_sessions_not_owner_total",
            "counter",
            "CONNECTs refused because the client id's session belongs to another user.",
            load(&broker.sessions_not_owner),
            "mqtt",
            "sessionsNotOwner",
        ),
        m(
            "thinghub_mqtt_slow_consumers_total",
            "counter",
            "Connections closed because they could not keep up.",
            load(&broker.slow_consumers),
            "mqtt",
            "slowConsumers",
        ),
        m(
            "thinghub_mqtt_revoked_total",
            "counter",
            "Connections closed because their user was deleted or changed.",
            load(&broker.revoked),
            "mqtt",
            "revoked",
        ),
        m(
            "thinghub_mqtt_subscriptions_revoked_total",
            "counter",
            "Subscriptions removed because the ACL no longer allows them.",
            load(&broker.subscriptions_revoked),
            "mqtt",
            "subscriptionsRevoked",
        ),
        m(
            "thinghub_auth_mqtt_failures_total",
            "counter",
            "Failed MQTT authentications.",
            load(&auth.mqtt_failures),
            "auth",
            "mqttFailures",
        ),
        m(
            "thinghub_auth_http_failures_total",
            "counter",
            "Failed HTTP authentications.",
            load(&auth.http_failures),
            "auth",
            "httpFailures",
        ),
        m(
            "thinghub_auth_throttled_total",
            "counter",
            "Authentications refused while their address or name was backing off.",
            load(&auth.throttled),
            "auth",
            "throttled",
        ),
        m(
            "thinghub_device_events_rejected_total",
            "counter",
            "Device events rejected over MQTT.",
            load(&state.device_stats.events_rejected),
            "mqtt",
            "eventsRejected",
        ),
        m(
            "thinghub_command_responses_refused_total",
            "counter",
            "Command answers refused over MQTT.",
            load(&state.device_stats.command_responses_refused),
            "mqtt",
            "commandResponsesRefused",
        ),
        m(
            "thinghub_effects_delivered_total",
            "counter",
            "Committed changes whose effects their Thing handed to the sink as it made them.",
            load(&outbox.stats.delivered),
            "effects",
            "delivered",
        ),
        m(
            "thinghub_effects_recovered_total",
            "counter",
            "Committed changes whose effects were delivered again from the change feed (after a crash, or a straggler).",
            load(&outbox.stats.recovered),
            "effects",
            "recovered",
        ),
        m(
            "thinghub_effects_abandoned_total",
            "counter",
            "Committed changes whose effects were given up after their Thing failed to deliver them again effects_recover_attempts_max times in a row (each logged).",
            load(&outbox.stats.abandoned),
            "effects",
            "abandoned",
        ),
        m(
            "thinghub_effects_feed_damaged_blocks_total",
            "counter",
            "Change-feed blocks found undecodable and skipped (each logged).",
            registry.context().store.feed_damaged_blocks() as f64,
            "effects",
            "feedDamagedBlocks",
        ),
        m(
            "thinghub_effects_sink_writes_synced_total",
            "counter",
            "Checkpoints of MQTT sessions and retained messages made durable (compare with thinghub_mqtt_checkpoints_written_total).",
            load(&outbox.stats.sink_writes_synced),
            "effects",
            "sinkWritesSynced",
        ),
        m(
            "thinghub_mqtt_checkpoints_written_total",
            "counter",
            "Checkpoints that wrote MQTT sessions or retained messages to storage.",
            load(&persist.checkpoints_written),
            "mqtt",
            "checkpointsWritten",
        ),
        m(
            "thinghub_mqtt_unstored_changes",
            "gauge",
            "Sessions and retained topics changed since the last checkpoint (written behind).",
            // A checkpoint in progress holds changes taken from the broker and not written yet.
            (state.broker.unstored_changes() as u64
                + state.persistence.stats.checkpointing.load(Ordering::SeqCst))
                as f64,
            "mqtt",
            "unstoredChanges",
        ),
        m(
            "thinghub_effects_cursor",
            "gauge",
            "Change-feed position up to which every change's effects are handled.",
            outbox.handled_through() as f64,
            "effects",
            "cursor",
        ),
        m(
            "thinghub_effects_lag",
            "gauge",
            "Durable changes whose effects are not handled yet.",
            registry
                .context()
                .store
                .feed_durable_end()
                .saturating_sub(1)
                .saturating_sub(outbox.handled_through()) as f64,
            "effects",
            "lag",
        ),
        m(
            "thinghub_mqtt_sessions_written_total",
            "counter",
            "Persistent session records written to storage (put or removed).",
            load(&persist.sessions_written),
            "mqtt",
            "sessionsWritten",
        ),
        m(
            "thinghub_mqtt_retained_written_total",
            "counter",
            "Retained message records written to storage (put or removed).",
            load(&persist.retained_written),
            "mqtt",
            "retainedWritten",
        ),
        m(
            "thinghub_mqtt_persist_failures_total",
            "counter",
            "Checkpoints of MQTT state that failed (retried).",
            load(&persist.failures),
            "mqtt",
            "persistFailures",
        ),
        m(
            "thinghub_mqtt_sessions_restored",
            "gauge",
            "Persistent sessions restored at start-up.",
            load(&persist.sessions_restored),
            "mqtt",
            "sessionsRestored",
        ),
        m(
            "thinghub_mqtt_restore_dropped",
            "gauge",
            "Sessions, messages and retained messages not restored at start-up (expired, revoked, past a bound, unreadable).",
            load(&persist.restore_dropped),
            "mqtt",
            "restoreDropped",
        ),
        m(
            "thinghub_deadline_fires_total",
            "counter",
            "Deadline fires sent to Things.",
            timer.fires as f64,
            "deadlines",
            "fires",
        ),
        m(
            "thinghub_deadline_timed_out_total",
            "counter",
            "Command executions timed out by the timer.",
            timer.timed_out as f64,
            "deadlines",
            "timedOut",
        ),
        m(
            "thinghub_deadline_retries_total",
            "counter",
            "Deadline fires that failed and were retried.",
            timer.retries as f64,
            "deadlines",
            "retries",
        ),
        m(
            "thinghub_deadline_fires_in_flight",
            "gauge",
            "Deadline fires in flight.",
            timer.in_flight as f64,
            "deadlines",
            "inFlight",
        ),
    ];
    metrics.extend([
        m(
            "thinghub_mqtt_sessions_persistent",
            "gauge",
            "MQTT sessions that outlive their connection (connected or not).",
            counts.persistent as f64,
            "mqtt",
            "sessionsPersistent",
        ),
        m(
            "thinghub_mqtt_subscriptions",
            "gauge",
            "Subscriptions of every MQTT session.",
            counts.subscriptions as f64,
            "mqtt",
            "subscriptions",
        ),
        m(
            "thinghub_mqtt_shared_subscriptions",
            "gauge",
            "Shared subscriptions ($share/{group}/...) of every MQTT session.",
            counts.shared_subscriptions as f64,
            "mqtt",
            "sharedSubscriptions",
        ),
        m(
            "thinghub_mqtt_received_bytes_total",
            "counter",
            "Bytes read from MQTT clients.",
            load(&traffic.bytes_in),
            "mqtt",
            "bytesIn",
        ),
        m(
            "thinghub_mqtt_sent_bytes_total",
            "counter",
            "Bytes written to MQTT clients.",
            load(&traffic.bytes_out),
            "mqtt",
            "bytesOut",
        ),
    ]);
    let webhooks = &state.webhooks.totals;
    for (name, help, counter, key) in [
        (
            "thinghub_webhook_records_delivered_total",
            "Records webhooks delivered (2xx).",
            &webhooks.delivered,
            "delivered",
        ),
        (
            "thinghub_webhook_retries_total",
            "Webhook requests retried (connection error, timeout, 408, 429, 5xx).",
            &webhooks.retried,
            "retried",
        ),
        (
            "thinghub_webhook_records_failed_total",
            "Records dead-lettered (a 4xx other than 408 and 429).",
            &webhooks.failed,
            "failed",
        ),
        (
            "thinghub_webhook_broker_events_dropped_total",
            "Broker events (subscriptions, messages) not delivered: a webhook's queue was full (webhook_broker_queue_bytes_max) or it stopped.",
            &state.broker.tap.dropped,
            "brokerEventsDropped",
        ),
    ] {
        metrics.push(m(name, "counter", help, load(counter), "webhooks", key));
    }
    let counters = &registry.context().counters;
    if let Some(registered) = registry.context().store.registered_things() {
        metrics.push(m(
            "thinghub_things_registered",
            "gauge",
            "Things registered now (counted after start, then kept; absent until counted).",
            registered as f64,
            "things",
            "registered",
        ));
    }
    metrics.push(m(
        "thinghub_things_online",
        "gauge",
        "Things with a live MQTT connection.",
        counts.things_online as f64,
        "things",
        "online",
    ));
    metrics.push(m(
        "thinghub_thing_registrations_total",
        "counter",
        "Things registered since start.",
        load(&counters.registered),
        "things",
        "registrations",
    ));
    metrics.push(m(
        "thinghub_thing_deletions_total",
        "counter",
        "Things deleted since start.",
        load(&counters.deleted),
        "things",
        "deletions",
    ));
    metrics.push(m(
        "thinghub_thing_connections_total",
        "counter",
        "Device connections recorded by Things.",
        load(&counters.connected),
        "things",
        "connectionsTotal",
    ));
    metrics.push(m(
        "thinghub_thing_disconnections_total",
        "counter",
        "Device disconnections recorded by Things.",
        load(&counters.disconnected),
        "things",
        "disconnectionsTotal",
    ));
    metrics.push(m(
        "thinghub_shadow_updates_total",
        "counter",
        "Shadow updates accepted (durable).",
        load(&counters.shadow_updates),
        "things",
        "shadowUpdates",
    ));
    metrics.push(m(
        "thinghub_shadow_deletes_total",
        "counter",
        "Shadows deleted (durable).",
        load(&counters.shadow_deletes),
        "things",
        "shadowDeletes",
    ));
    metrics.push(m(
        "thinghub_shadow_refused_total",
        "counter",
        "Shadow updates and deletions a Thing refused.",
        load(&counters.shadow_refused),
        "things",
        "shadowRefused",
    ));
    metrics.push(m(
        "thinghub_events_ingested_total",
        "counter",
        "Device events stored (durable).",
        load(&counters.events_ingested),
        "things",
        "eventsIngested",
    ));
    metrics.push(m(
        "thinghub_events_refused_total",
        "counter",
        "Device events a Thing refused.",
        load(&counters.events_refused),
        "things",
        "eventsRefused",
    ));
    for (counter, key, label) in [
        (&counters.commands_sent, "sent", "sent"),
        (&counters.commands_refused, "refused", "refused"),
        (&counters.commands_in_progress, "inProgress", "in_progress"),
        (&counters.commands_succeeded, "succeeded", "succeeded"),
        (&counters.commands_failed, "failed", "failed"),
        (&counters.commands_rejected, "rejected", "rejected"),
        (&counters.commands_timed_out, "timedOut", "timed_out"),
        (&counters.commands_canceled, "canceled", "canceled"),
    ] {
        metrics.push(Metric {
            name: "thinghub_commands_total",
            kind: "counter",
            help: "Commands by what happened to them: sent, refused when sent, then in progress and their outcome.",
            value: load(counter),
            group: "commands",
            key,
            label: Some(("outcome", label)),
        });
    }
    metrics.push(m(
        "thinghub_measurements_recorded_total",
        "counter",
        "Device measurements stored (durable).",
        load(&counters.measurements_recorded),
        "things",
        "measurementsRecorded",
    ));
    for (counter, key, label) in [
        (&counters.alarms_raised, "raised", "raised"),
        (&counters.alarms_cleared, "cleared", "cleared"),
    ] {
        metrics.push(Metric {
            name: "thinghub_alarms_total",
            kind: "counter",
            help: "Alarms raised and cleared (durable).",
            value: load(counter),
            group: "alarms",
            key,
            label: Some(("outcome", label)),
        });
    }
    let jobs = state.jobs.counts();
    for (counter, key, label) in [
        (&jobs.in_progress, "inProgress", "in_progress"),
        (&jobs.completed, "completed", "completed"),
        (&jobs.canceled, "canceled", "canceled"),
    ] {
        metrics.push(Metric {
            name: "thinghub_jobs",
            kind: "gauge",
            help: "Jobs by status (counted at start, kept as jobs are created and end).",
            value: load(counter),
            group: "jobs",
            key,
            label: Some(("status", label)),
        });
    }
    for (number, name) in PACKET_TYPES.iter().enumerate().skip(1) {
        metrics.push(Metric {
            name: "thinghub_mqtt_packets_received_total",
            kind: "counter",
            help: "MQTT control packets read, by type.",
            value: load(&traffic.received[number]),
            group: "mqttPacketsReceived",
            key: name,
            label: Some(("type", name)),
        });
    }
    for (number, name) in PACKET_TYPES.iter().enumerate().skip(1) {
        metrics.push(Metric {
            name: "thinghub_mqtt_packets_sent_total",
            kind: "counter",
            help: "MQTT control packets written, by type.",
            value: load(&traffic.sent[number]),
            group: "mqttPacketsSent",
            key: name,
            label: Some(("type", name)),
        });
    }
    for (qos, (key, label)) in [("qos0", "0"), ("qos1", "1"), ("qos2", "2")]
        .into_iter()
        .enumerate()
    {
        metrics.push(Metric {
            name: "thinghub_mqtt_publish_received_total",
            kind: "counter",
            help: "PUBLISH packets read from clients, by QoS.",
            value: load(&traffic.publish_in[qos]),
            group: "mqttPublishReceived",
            key,
            label: Some(("qos", label)),
        });
        metrics.push(Metric {
            name: "thinghub_mqtt_publish_sent_total",
            kind: "counter",
            help: "PUBLISH packets written to clients, by QoS.",
            value: load(&traffic.publish_out[qos]),
            group: "mqttPublishSent",
            key,
            label: Some(("qos", label)),
        });
    }
    transport_metrics(state, &mut metrics);
    metrics
}

/// Open connections per listener, and TLS handshakes by outcome.
fn transport_metrics(state: &AppState, metrics: &mut Vec<Metric>) {
    let transports = &state.transports;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    for (listener, open, accepted) in transports.mqtt.per_listener() {
        metrics.push(Metric {
            name: "thinghub_mqtt_listener_connections",
            kind: "gauge",
            help: "Open sockets on each MQTT listener (tcp, tls, ws, wss), CONNECT done or not.",
            value: open as f64,
            group: "mqttListenerConnections",
            key: listener,
            label: Some(("listener", listener)),
        });
        metrics.push(Metric {
            name: "thinghub_mqtt_listener_accepted_total",
            kind: "counter",
            help: "Sockets accepted on each MQTT listener.",
            value: accepted as f64,
            group: "mqttListenerAccepted",
            key: listener,
            label: Some(("listener", listener)),
        });
    }
    metrics.push(Metric {
        name: "thinghub_mqtt_ws_upgrades_refused_total",
        kind: "counter",
        help: "WebSocket upgrades refused (wrong path or subprotocol, not a WebSocket request).",
        value: load(&transports.mqtt.ws_upgrades_refused),
        group: "mqtt",
        key: "wsUpgradesRefused",
        label: None,
    });
    for (listener, gauge) in [
        ("http", &transports.http.http_open),
        ("https", &transports.http.https_open),
    ] {
        metrics.push(Metric {
            name: "thinghub_http_listener_connections",
            kind: "gauge",
            help: "Open connections on each HTTP listener (http, https).",
            value: load(gauge),
            group: "httpListenerConnections",
            key: listener,
            label: Some(("listener", listener)),
        });
    }
    let Some(tls) = &transports.tls else {
        return;
    };
    let m = |name, kind, help, value, key| Metric {
        name,
        kind,
        help,
        value,
        group: "tls",
        key,
        label: None,
    };
    metrics.push(m(
        "thinghub_tls_handshakes_total",
        "counter",
        "TLS handshakes completed (every TLS listener).",
        load(&tls.stats.handshakes),
        "handshakes",
    ));
    metrics.push(m(
        "thinghub_tls_reloads_total",
        "counter",
        "TLS certificate files reloaded (SIGHUP or a change seen).",
        load(&tls.stats.reloads),
        "reloads",
    ));
    metrics.push(m(
        "thinghub_tls_reload_failures_total",
        "counter",
        "TLS reloads that failed (the previous certificates stay in use).",
        load(&tls.stats.reload_failures),
        "reloadFailures",
    ));
    for (reason, count) in tls.stats.failures() {
        metrics.push(Metric {
            name: "thinghub_tls_handshake_failures_total",
            kind: "counter",
            help: "TLS handshakes that failed, by reason.",
            value: count as f64,
            group: "tlsHandshakeFailures",
            key: reason,
            label: Some(("reason", reason)),
        });
    }
}

/// `GET /api/v1/metrics`: `{process, things, storage, mqtt, auth, effects, deadlines}`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    summary = "Every metric now",
    responses(
        (status = 200, description = "Metrics by group", body = s::Metrics)
    )
)]
pub async fn json(State(state): State<AppState>) -> Json<Value> {
    Json(current(&state))
}

/// `GET /metrics`: the Prometheus text exposition format (version 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    summary = "Every metric now, Prometheus text format",
    responses(
        (status = 200, description = "Prometheus exposition", body = String, content_type = "text/plain")
    )
)]
pub async fn prometheus(State(state): State<AppState>) -> impl IntoResponse {
    let mut metrics = collect(&state);
    // A family's samples together, under one HELP and TYPE.
    metrics.sort_by_key(|metric| metric.name);
    let mut text = String::new();
    let mut previous = "";
    for metric in metrics {
        if metric.name != previous {
            let _ = writeln!(text, "# HELP {} {}", metric.name, metric.help);
            let _ = writeln!(text, "# TYPE {} {}", metric.name, metric.kind);
            previous = metric.name;
        }
        match metric.label {
            Some((label, value)) => {
                let _ = writeln!(
                    text,
                    "{}{{{label}=\"{value}\"}} {}",
                    metric.name, metric.value
                );
            }
            None => {
                let _ = writeln!(text, "{} {}", metric.name, metric.value);
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
