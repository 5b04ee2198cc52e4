//! The operator's messaging (the management API's `/api/v1/publish` and proxy subscriptions).
//!
//! A publish is routed through the broker exactly as a superuser's MQTT publish (the same ACL:
//! nobody but the server publishes on its reply topics; retained, queued for persistent
//! sessions, v5 properties forwarded), but it is never device input: a Thing's request topics
//! (shadow update, events, command responses, jobs) are refused, so nobody can make backends
//! see a device event or command answer the server never recorded.
//!
//! A proxy subscription changes a client's session (connected, or persistent and offline) as
//! its own SUBSCRIBE would: the ACL of the session's user decides, so an operator cannot grant
//! a device what it could not subscribe to itself; on a persistent session the answer waits
//! until the change is durable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;

use super::acl::{Acl, Action, Identity};
use super::bridge::Bridge;
use super::broker::{Broker, Message, ProxyRefusal, PublishRefusal, SubOptions};
use super::topic;

/// A message the operator publishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperatorPublish {
    /// Topic name (no wildcards).
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// 0, 1 or 2.
    pub qos: u8,
    /// Retain it.
    pub retain: bool,
    /// v5 message expiry, seconds.
    pub message_expiry_interval_s: Option<u32>,
    /// v5 content type.
    pub content_type: Option<String>,
    /// v5 payload format indicator (0 bytes, 1 UTF-8).
    pub payload_format_indicator: Option<u8>,
    /// v5 response topic.
    pub response_topic: Option<String>,
    /// v5 correlation data.
    pub correlation_data: Option<Vec<u8>>,
    /// v5 user properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// Why an operator's publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorPublishError {
    /// The topic is not a valid topic name.
    #[error("topic '{topic}' is not a valid topic name: {why}")]
    Topic {
        /// The topic.
        topic: String,
        /// Why.
        why: String,
    },
    /// The response topic is not a valid topic name.
    #[error("properties.responseTopic '{0}' is not a valid topic name")]
    ResponseTopic(String),
    /// QoS out of range.
    #[error("qos must be 0, 1 or 2")]
    Qos,
    /// Payload format indicator 1 with a payload that is not UTF-8.
    #[error("properties.payloadFormatIndicator is 1 but the payload is not UTF-8")]
    NotUtf8,
    /// The retained store is full.
    #[error("the retained message store is full; the message was not published")]
    RetainedFull,
    /// A Thing's request topic: only its device sends on it.
    #[error("topic '{0}' is a Thing's request topic: only its device sends on it (over MQTT or /api/v1/thing-datas); change Things through the management routes")]
    RequestTopic(String),
    /// A topic only the server publishes on (replies, deltas, notifications).
    #[error("topic '{0}' is published only by the server (replies, deltas, notifications)")]
    ServerTopic(String),
}

/// Publishes `message` for the operator; returns how many sessions it was delivered or queued
/// to.
pub fn publish(
    broker: &Broker,
    bridge: &Bridge,
    acl: &Acl,
    message: OperatorPublish,
) -> Result<usize, OperatorPublishError> {
    topic::validate_topic_name(&message.topic).map_err(|e| OperatorPublishError::Topic {
        topic: message.topic.clone(),
        why: e.to_string(),
    })?;
    if bridge.parse(&message.topic).is_some() {
        return Err(OperatorPublishError::RequestTopic(message.topic));
    }
    let operator = Identity {
        client_id: String::new(),
        username: None,
        thing: None,
        superuser: true,
        bootstrap: false,
    };
    if !acl.allows(&operator, Action::Publish, &message.topic) {
        broker
            .stats
            .acl_denied
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(OperatorPublishError::ServerTopic(message.topic));
    }
    if message.qos > 2 {
        return Err(OperatorPublishError::Qos);
    }
    if let Some(response) = &message.response_topic {
        if topic::validate_topic_name(response).is_err() {
            return Err(OperatorPublishError::ResponseTopic(response.clone()));
        }
    }
    if message.payload_format_indicator == Some(1) && std::str::from_utf8(&message.payload).is_err()
    {
        return Err(OperatorPublishError::NotUtf8);
    }
    let properties = PublishProperties {
        payload_format_indicator: message.payload_format_indicator,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: message.response_topic,
        correlation_data: message.correlation_data.map(Bytes::from),
        user_properties: message.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: message.content_type,
    };
    let forwarded = (properties.payload_format_indicator.is_some()
        || properties.response_topic.is_some()
        || properties.correlation_data.is_some()
        || !properties.user_properties.is_empty()
        || properties.content_type.is_some())
    .then(|| Arc::new(properties));
    broker
        .stats
        .messages_in
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let topic: Arc<str> = Arc::from(message.topic);
    let payload = Bytes::from(message.payload);
    let (qos, retain) = (message.qos, message.retain);
    let routed = broker
        .publish(Message {
            topic: topic.clone(),
            payload: payload.clone(),
            qos: message.qos,
            retain: message.retain,
            publisher: None,
            properties: forwarded,
            expires_at: message
                .message_expiry_interval_s
                .map(|s| Instant::now() + Duration::from_secs(u64::from(s))),
        })
        .map_err(|e| match e {
            PublishRefusal::RetainedQuotaExceeded => OperatorPublishError::RetainedFull,
        })?;
    broker
        .tap
        .message(None, &topic, qos, retain, &payload, "http");
    Ok(routed)
}

/// An operator's subscription for a client's session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxySubscription {
    /// The filter (`$share/{group}/...` allowed).
    pub filter: String,
    /// Maximum QoS.
    pub qos: u8,
    /// v5 no local.
    pub no_local: bool,
    /// v5 retain as published.
    pub retain_as_published: bool,
    /// v5 retain handling (0, 1, 2).
    pub retain_handling: u8,
}

/// Why a proxy subscription change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Not a valid filter.
    #[error("topic '{filter}' is not a valid topic filter: {why}")]
    Filter {
        /// The filter.
        filter: String,
        /// Why.
        why: String,
    },
    /// QoS out of range.
    #[error("qos must be 0, 1 or 2")]
    Qos,
    /// Retain handling out of range.
    #[error("retainHandling must be 0, 1 or 2")]
    RetainHandling,
    /// No such session.
    #[error("no session with client id '{0}' (connected or persistent)")]
    NoSession(String),
    /// The session's user may not subscribe to it.
    #[error("the user of session '{client_id}' is not authorized to subscribe to '{filter}'")]
    NotAuthorized {
        /// The session.
        client_id: String,
        /// The filter.
        filter: String,
    },
    /// A persistent session's subscription could not be made durable in time (undone).
    #[error("the subscription could not be made durable in time and was undone; retry")]
    NotDurable,
    /// A persistent session's unsubscription is done in memory but not durable yet.
    #[error("unsubscribed, but not durable yet: a crash now may bring the subscription back; retry to confirm")]
    UnsubscribeNotDurable,
    /// The session holds as many subscriptions as it may.
    #[error("session '{client_id}' already holds {max} subscriptions (mqtt_session_subscriptions_max); unsubscribe one first")]
    TooManySubscriptions {
        /// The session.
        client_id: String,
        /// The bound.
        max: usize,
    },
}

/// Subscribes `client_id`'s session to `subscription`; returns whether it is new.
pub async fn subscribe(
    broker: &Broker,
    acl: &Acl,
    client_id: &str,
    subscription: ProxySubscription,
    durable_wait: Duration,
) -> Result<bool, ProxyError> {
    let parsed = topic::parse_filter(&subscription.filter).map_err(|e| ProxyError::Filter {
        filter: subscription.filter.clone(),
        why: e.to_string(),
    })?;
    if subscription.qos > 2 {
        return Err(ProxyError::Qos);
    }
    if subscription.retain_handling > 2 {
        return Err(ProxyError::RetainHandling);
    }
    let options = SubOptions {
        qos: subscription.qos,
        no_local: subscription.no_local,
        retain_as_published: subscription.retain_as_published,
        retain_handling: subscription.retain_handling,
        subscription_id: None,
    };
    let filter = parsed.filter.clone();
    let outcome = broker.proxy_subscribe(
        client_id,
        &subscription.filter,
        parsed,
        options,
        &|identity| acl.allows(identity, Action::Subscribe, &filter),
    );
    let (previous, persistent) = match outcome {
        Ok(done) => done,
        Err(ProxyRefusal::NoSession) => return Err(ProxyError::NoSession(client_id.to_owned())),
        Err(ProxyRefusal::NotAuthorized) => {
            broker
                .stats
                .acl_denied
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ProxyError::NotAuthorized {
                client_id: client_id.to_owned(),
                filter: subscription.filter,
            });
        }
        Err(ProxyRefusal::TooManySubscriptions(max)) => {
            return Err(ProxyError::TooManySubscriptions {
                client_id: client_id.to_owned(),
                max,
            })
        }
    };
    if persistent && !broker.wait_durable(durable_wait).await {
        broker.proxy_undo(client_id, &subscription.filter, options, previous);
        tracing::error!(%client_id, filter = %subscription.filter, "proxy subscription could not be made durable in time; undone");
        return Err(ProxyError::NotDurable);
    }
    tracing::info!(%client_id, filter = %subscription.filter, "subscribed by the operator");
    Ok(previous.is_none())
}

/// Removes `filter` from `client_id`'s session; returns whether it was there.
pub async fn unsubscribe(
    broker: &Broker,
    client_id: &str,
    filter: &str,
    durable_wait: Duration,
) -> Result<bool, ProxyError> {
    let (removed, persistent) = broker
        .proxy_unsubscribe(client_id, filter)
        .map_err(|_| ProxyError::NoSession(client_id.to_owned()))?;
    if removed && persistent && !broker.wait_durable(durable_wait).await {
        // Removed in memory (no message reaches it any more); a crash before the next
        // checkpoint may bring it back, which the answer says.
        return Err(ProxyError::UnsubscribeNotDurable);
    }
    if removed {
        tracing::info!(%client_id, %filter, "unsubscribed by the operator");
    }
    Ok(removed)
}
