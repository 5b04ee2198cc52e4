//! Publishing for the operator (the management API's `POST /api/v1/publish`): routed through
//! the broker exactly as a superuser's MQTT publish (retained, queued for persistent sessions,
//! v5 properties forwarded), but never taken as device input: a publish on a Thing's request
//! topics reaches subscribers only, as the server's own publications do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;

use super::broker::{Broker, Message, PublishRefusal};
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
}

/// Publishes `message` for the operator; returns how many sessions it was delivered or queued
/// to.
pub fn publish(broker: &Broker, message: OperatorPublish) -> Result<usize, OperatorPublishError> {
    topic::validate_topic_name(&message.topic).map_err(|e| OperatorPublishError::Topic {
        topic: message.topic.clone(),
        why: e.to_string(),
    })?;
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
    broker
        .publish(Message {
            topic: Arc::from(message.topic),
            payload: Bytes::from(message.payload),
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
        })
}
