//! The per-Thing fast path between MQTT and the Thing actors.
//!
//! A client's PUBLISH on `{prefix}/things/{name}/shadow/{update,get,delete}` is a request: it is
//! not routed to subscribers, it goes to the Thing's actor, and the answer (sent only after the
//! change is durable) is published on `.../accepted` or `.../rejected`, plus `update/delta` when
//! desired differs from reported and `update/documents` when anyone listens. Changes made over
//! HTTP publish the same effects (an operator's desired change also goes to the device on
//! `shadow/update`).
//!
//! **Architecture invariant:** the server's own publications go straight to subscribers through
//! the broker; only PUBLISH packets read from a client socket reach [`Bridge::request`], so the
//! server can never read its own `shadow/update` back as a device report.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use thinghub_actors::clock::SharedClock;
use thinghub_actors::thing::shadow::{client_token_of, parse_json_object, ShadowUpdateResult};
use thinghub_actors::thing::{
    CommandExecution, CommandLimits, CommandResponse, ErrorCode, EventIngested, EventLimits,
    IngestEvent, Limits, Origin, Rejection, ShadowLimits, ShadowUpdate,
};
use thinghub_actors::Things;

use super::broker::{Broker, Message};

/// A shadow request read from a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOp {
    /// `shadow/update`.
    Update,
    /// `shadow/get`.
    Get,
    /// `shadow/delete`.
    Delete,
}

impl ShadowOp {
    fn name(self) -> &'static str {
        match self {
            ShadowOp::Update => "update",
            ShadowOp::Get => "get",
            ShadowOp::Delete => "delete",
        }
    }
}

/// `{prefix}/things/{thing}/shadow/{update|get|delete}` -> `(thing, op)`; anything else is not
/// a request (replies such as `.../update/accepted` included).
pub fn parse_shadow_request<'t>(prefix: &str, topic: &'t str) -> Option<(&'t str, ShadowOp)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix("/things/")?;
    let (thing, action) = rest.split_once("/shadow/")?;
    let op = match action {
        "update" => ShadowOp::Update,
        "get" => ShadowOp::Get,
        "delete" => ShadowOp::Delete,
        _ => return None,
    };
    (!thing.is_empty() && !thing.contains('/')).then_some((thing, op))
}

/// The topic prefix of the AWS IoT compatible mode.
pub const AWS_PREFIX: &str = "$aws";

/// Which topic namespace a request came in on (replies to it go back there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// `{prefix}/things/...` (`$emqx` by default).
    Native,
    /// `$aws/things/...` (`--aws-compat`).
    Aws,
}

/// `{prefix}/things/{thing}/events/{eventType}` -> `(thing, eventType)`.
pub fn parse_event_topic<'t>(prefix: &str, topic: &'t str) -> Option<(&'t str, &'t str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix("/things/")?;
    let (thing, event_type) = rest.split_once("/events/")?;
    let one_level = |s: &str| !s.is_empty() && !s.contains('/');
    (one_level(thing) && one_level(event_type)).then_some((thing, event_type))
}

/// `{prefix}/commands/things/{thing}/executions/{id}/response` -> `(thing, id)`; with `aws`
/// also a trailing `/json` (the AWS IoT Commands payload-format suffix).
pub fn parse_command_response<'t>(
    prefix: &str,
    topic: &'t str,
    aws: bool,
) -> Option<(&'t str, &'t str)> {
    let rest = topic
        .strip_prefix(prefix)?
        .strip_prefix("/commands/things/")?;
    let (thing, rest) = rest.split_once("/executions/")?;
    let (execution_id, tail) = rest.split_once('/')?;
    let one_level = |s: &str| !s.is_empty() && !s.contains('/');
    let is_response = tail == "response" || (aws && tail == "response/json");
    (is_response && one_level(thing) && one_level(execution_id)).then_some((thing, execution_id))
}

/// The AWS IoT Commands name of a refusal (`RejectedErrorCode`).
fn aws_error_name(rejection: &Rejection) -> &'static str {
    match rejection.code {
        ErrorCode::BadRequest
            if rejection
                .message
                .starts_with("Payload contains invalid json") =>
        {
            "InvalidJson"
        }
        ErrorCode::BadRequest | ErrorCode::PayloadTooLarge | ErrorCode::UnsupportedEncoding => {
            "InvalidRequest"
        }
        ErrorCode::NotFound => "ResourceNotFound",
        ErrorCode::Conflict => "TerminalStateReached",
        ErrorCode::TooManyRequests => "RequestThrottled",
        _ => "InternalError",
    }
}

/// The fast path.
pub struct Bridge {
    broker: Arc<Broker>,
    things: Things,
    prefix: String,
    aws_compat: bool,
    limits: ShadowLimits,
    event_limits: EventLimits,
    command_limits: CommandLimits,
    /// Command responses refused over MQTT (malformed, unknown, late or duplicate).
    pub command_responses_refused: std::sync::atomic::AtomicU64,
    /// Device events rejected over MQTT (invalid, or for an unknown Thing).
    pub events_rejected: std::sync::atomic::AtomicU64,
    clock: SharedClock,
}

impl Bridge {
    /// A bridge for system topics under `prefix`.
    pub fn new(
        broker: Arc<Broker>,
        things: Things,
        prefix: &str,
        limits: &Limits,
        aws_compat: bool,
        clock: SharedClock,
    ) -> Bridge {
        Bridge {
            broker,
            things,
            prefix: prefix.to_owned(),
            aws_compat,
            limits: limits.shadow,
            event_limits: limits.events,
            command_limits: limits.commands,
            command_responses_refused: std::sync::atomic::AtomicU64::new(0),
            events_rejected: std::sync::atomic::AtomicU64::new(0),
            clock,
        }
    }

    /// Whether `topic` is a shadow request: `(thing, op, namespace)`.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<(&'t str, ShadowOp, Namespace)> {
        if let Some((thing, op)) = parse_shadow_request(&self.prefix, topic) {
            return Some((thing, op, Namespace::Native));
        }
        if self.aws_compat {
            if let Some((thing, op)) = parse_shadow_request(AWS_PREFIX, topic) {
                return Some((thing, op, Namespace::Aws));
            }
        }
        None
    }

    fn namespaces(&self) -> &'static [Namespace] {
        if self.aws_compat {
            &[Namespace::Native, Namespace::Aws]
        } else {
            &[Namespace::Native]
        }
    }

    fn topic_in(&self, namespace: Namespace, thing: &str, tail: &str) -> String {
        let prefix = match namespace {
            Namespace::Native => self.prefix.as_str(),
            Namespace::Aws => AWS_PREFIX,
        };
        format!("{prefix}/things/{thing}/shadow/{tail}")
    }

    fn topic(&self, thing: &str, tail: &str) -> String {
        self.topic_in(Namespace::Native, thing, tail)
    }

    /// Publishes `payload` on `tail` in every enabled namespace.
    fn broadcast(&self, thing: &str, tail: &str, payload: &Value) {
        for namespace in self.namespaces() {
            self.publish(self.topic_in(*namespace, thing, tail), payload);
        }
    }

    fn publish(&self, topic: String, payload: &Value) {
        // Never retained, so never refused by a retained bound.
        let _ = self.broker.publish(Message {
            topic: Arc::from(topic),
            payload: Bytes::from(payload.to_string()),
            qos: 1,
            retain: false,
            publisher: None,
            properties: None,
            expires_at: None,
        });
    }

    fn rejected(&self, namespace: Namespace, thing: &str, op: ShadowOp, rejection: &Rejection) {
        let mut body = json!({
            "code": rejection.code.as_u16(),
            "message": rejection.message,
            "timestamp": self.clock.now_ms() / 1000,
        });
        if let Some(token) = &rejection.client_token {
            body["clientToken"] = token.clone().into();
        }
        self.publish(
            self.topic_in(namespace, thing, &format!("{}/rejected", op.name())),
            &body,
        );
    }

    /// Handles a request from a client; returns once the answer has been published (for an
    /// update: after the change is durable).
    pub async fn request(
        &self,
        thing: &str,
        op: ShadowOp,
        namespace: Namespace,
        payload: &[u8],
        origin: Origin,
    ) {
        let outcome = match op {
            ShadowOp::Update => self.update(thing, payload, origin).await,
            ShadowOp::Get => self.get(namespace, thing, payload).await,
            ShadowOp::Delete => self.delete(thing, payload, origin).await,
        };
        if let Err(rejection) = outcome {
            self.rejected(namespace, thing, op, &rejection);
        }
    }

    async fn update(&self, thing: &str, payload: &[u8], origin: Origin) -> Result<(), Rejection> {
        let update = ShadowUpdate::parse(payload, &self.limits)?;
        let want_documents = self.wants_documents(thing);
        let result = self
            .things
            .update_shadow(thing, update, origin, want_documents)
            .await?;
        self.shadow_updated(thing, &result);
        Ok(())
    }

    /// Publishes what an accepted update produced: `update/accepted`, the desired change to the
    /// device (operator updates), `update/delta` and `update/documents`.
    pub fn shadow_updated(&self, thing: &str, result: &ShadowUpdateResult) {
        self.broadcast(thing, "update/accepted", &result.accepted);
        if let Some(desired) = &result.desired_published {
            // EMQX Fleets devices take cloud-side desired changes on shadow/update; on AWS that
            // topic is a request, so AWS devices rely on update/delta alone.
            self.publish(self.topic(thing, "update"), desired);
        }
        if let Some(delta) = &result.delta {
            self.broadcast(thing, "update/delta", delta);
        }
        if let Some(documents) = &result.documents {
            self.broadcast(thing, "update/documents", documents);
        }
    }

    /// Whether `update/documents` of `thing` has a subscriber (so it is worth rendering).
    pub fn wants_documents(&self, thing: &str) -> bool {
        self.namespaces().iter().any(|namespace| {
            self.broker
                .has_subscribers(&self.topic_in(*namespace, thing, "update/documents"))
        })
    }

    fn token_of(&self, payload: &[u8]) -> Result<Option<String>, Rejection> {
        if payload.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let body = parse_json_object(payload)?;
        client_token_of(body.as_object().unwrap_or(&Map::new()), &self.limits)
    }

    async fn get(
        &self,
        namespace: Namespace,
        thing: &str,
        payload: &[u8],
    ) -> Result<(), Rejection> {
        let token = self.token_of(payload)?;
        let document = self
            .things
            .get_shadow(thing)
            .await
            .map_err(|r| r.with_token(token.clone()))?;
        self.publish(
            self.topic_in(namespace, thing, "get/accepted"),
            &document.to_json(token.as_deref()),
        );
        Ok(())
    }

    async fn delete(&self, thing: &str, payload: &[u8], origin: Origin) -> Result<(), Rejection> {
        let token = self.token_of(payload)?;
        let reply = self.things.delete_shadow(thing, token, origin).await?;
        self.shadow_deleted(thing, &reply);
        Ok(())
    }

    /// Whether `topic` is a device event: `(thing, eventType)`.
    pub fn parse_event<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        parse_event_topic(&self.prefix, topic)
    }

    /// Stores a device event published over MQTT; answers on `events/{type}/rejected` (always)
    /// or `events/{type}/accepted` (when anyone listens).
    pub async fn event(&self, thing: &str, event_type: &str, payload: &[u8]) {
        let stored = async {
            let body = parse_json_object(payload)?;
            let event = IngestEvent::from_json(&body, Some(event_type), &self.event_limits)?;
            self.things.ingest_event(thing, event).await
        }
        .await;
        let topic =
            |tail: &str| format!("{}/things/{thing}/events/{event_type}/{tail}", self.prefix);
        match stored {
            Ok(stored) => self.event_stored(thing, &stored),
            Err(rejection) => {
                self.events_rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(%thing, %event_type, reason = %rejection.message, "event rejected");
                let body = json!({
                    "code": rejection.code.as_u16(),
                    "message": rejection.message,
                    "timestamp": self.clock.now_ms() / 1000,
                });
                self.publish(topic("rejected"), &body);
            }
        }
    }

    /// Publishes `events/{type}/accepted` with the stored event, if anyone listens.
    pub fn event_stored(&self, thing: &str, stored: &EventIngested) {
        let topic = format!(
            "{}/things/{thing}/events/{}/accepted",
            self.prefix, stored.event_type
        );
        if self.broker.has_subscribers(&topic) {
            self.publish(topic, &stored.to_json(None));
        }
    }

    /// Whether `topic` is a device's answer to a command: `(thing, executionId, namespace)`.
    pub fn parse_command_response<'t>(
        &self,
        topic: &'t str,
    ) -> Option<(&'t str, &'t str, Namespace)> {
        if let Some((thing, id)) = parse_command_response(&self.prefix, topic, false) {
            return Some((thing, id, Namespace::Native));
        }
        if self.aws_compat {
            if let Some((thing, id)) = parse_command_response(AWS_PREFIX, topic, true) {
                return Some((thing, id, Namespace::Aws));
            }
        }
        None
    }

    fn execution_topic(&self, namespace: Namespace, thing: &str, id: &str, tail: &str) -> String {
        match namespace {
            Namespace::Native => {
                format!(
                    "{}/commands/things/{thing}/executions/{id}/{tail}",
                    self.prefix
                )
            }
            // AWS IoT Commands topics end with the payload format.
            Namespace::Aws => {
                format!("{AWS_PREFIX}/commands/things/{thing}/executions/{id}/{tail}/json")
            }
        }
    }

    /// Publishes a durable command's request to the device (QoS 1; a persistent session keeps
    /// it while the device is away).
    pub fn command_sent(&self, thing: &str, execution: &CommandExecution) {
        let request = execution.request_json();
        for namespace in self.namespaces() {
            let topic = self.execution_topic(*namespace, thing, &execution.execution_id, "request");
            self.publish(topic, &request);
        }
    }

    /// Applies a device's answer (durable, or refused and recorded, before this returns) and
    /// replies on `.../response/accepted` or `.../response/rejected`.
    pub async fn command_response(
        &self,
        thing: &str,
        execution_id: &str,
        namespace: Namespace,
        payload: &[u8],
    ) {
        let outcome = async {
            let body = parse_json_object(payload)?;
            let response = CommandResponse::from_json(execution_id, &body, &self.command_limits)?;
            self.things.respond_command(thing, response).await
        }
        .await;
        let timestamp = self.clock.now_ms() / 1000;
        match (outcome, namespace) {
            (Ok(execution), Namespace::Native) => {
                let topic =
                    self.execution_topic(namespace, thing, execution_id, "response/accepted");
                if self.broker.has_subscribers(&topic) {
                    let body = json!({
                        "executionId": execution.execution_id,
                        "status": execution.status.as_str(),
                        "timestamp": timestamp,
                    });
                    self.publish(topic, &body);
                }
            }
            (Ok(execution), Namespace::Aws) => {
                let topic =
                    self.execution_topic(namespace, thing, execution_id, "response/accepted");
                self.publish(topic, &json!({"executionId": execution.execution_id}));
            }
            (Err(rejection), namespace) => {
                self.command_responses_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(%thing, %execution_id, code = rejection.code.as_u16(), reason = %rejection.message, "command response refused");
                let body = match namespace {
                    Namespace::Native => json!({
                        "code": rejection.code.as_u16(),
                        "message": rejection.message,
                        "executionId": execution_id,
                        "timestamp": timestamp,
                    }),
                    Namespace::Aws => json!({
                        "error": aws_error_name(&rejection),
                        "errorMessage": rejection.message,
                        "executionId": execution_id,
                    }),
                };
                let topic =
                    self.execution_topic(namespace, thing, execution_id, "response/rejected");
                self.publish(topic, &body);
            }
        }
    }

    /// Publishes `delete/accepted` for a deletion made anywhere.
    pub fn shadow_deleted(&self, thing: &str, reply: &Value) {
        self.broadcast(thing, "delete/accepted", reply);
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_command_response, parse_event_topic, parse_shadow_request, ShadowOp};

    #[test]
    fn command_response_topics_name_one_thing_and_one_execution() {
        let native = |topic| parse_command_response("$emqx", topic, false);
        assert_eq!(
            native("$emqx/commands/things/t1/executions/e-1/response"),
            Some(("t1", "e-1"))
        );
        for not_a_response in [
            "$emqx/commands/things/t1/executions/e-1/request",
            "$emqx/commands/things/t1/executions/e-1/response/json",
            "$emqx/commands/things/t1/executions/e-1/response/accepted",
            "$emqx/commands/things//executions/e-1/response",
            "$emqx/commands/things/t1/executions//response",
            "$emqx/things/t1/executions/e-1/response",
        ] {
            assert_eq!(native(not_a_response), None, "{not_a_response}");
        }
        let aws = |topic| parse_command_response("$aws", topic, true);
        assert_eq!(
            aws("$aws/commands/things/t1/executions/e-1/response/json"),
            Some(("t1", "e-1"))
        );
        assert_eq!(
            aws("$aws/commands/things/t1/executions/e-1/response"),
            Some(("t1", "e-1"))
        );
        assert_eq!(
            aws("$aws/commands/things/t1/executions/e-1/response/accepted/json"),
            None
        );
    }

    #[test]
    fn event_topics_name_one_thing_and_one_type() {
        assert_eq!(
            parse_event_topic("$emqx", "$emqx/things/t1/events/overheat"),
            Some(("t1", "overheat"))
        );
        for not_an_event in [
            "$emqx/things/t1/events/overheat/accepted",
            "$emqx/things/t1/events/",
            "$emqx/things//events/x",
            "$emqx/things/t1/shadow/update",
        ] {
            assert_eq!(
                parse_event_topic("$emqx", not_an_event),
                None,
                "{not_an_event}"
            );
        }
    }

    #[test]
    fn only_exact_shadow_request_topics_are_requests() {
        let parse = |topic| parse_shadow_request("$emqx", topic);
        assert_eq!(
            parse("$emqx/things/t1/shadow/update"),
            Some(("t1", ShadowOp::Update))
        );
        assert_eq!(
            parse("$emqx/things/t1/shadow/get"),
            Some(("t1", ShadowOp::Get))
        );
        assert_eq!(
            parse("$emqx/things/t1/shadow/delete"),
            Some(("t1", ShadowOp::Delete))
        );
        for not_a_request in [
            "$emqx/things/t1/shadow/update/accepted",
            "$emqx/things/t1/shadow/update/delta",
            "$emqx/things/t1/events/x",
            "$emqx/things//shadow/update",
            "$emqx/things/a/b/shadow/update",
            "$aws/things/t1/shadow/update",
            "$emqxx/things/t1/shadow/update",
        ] {
            assert_eq!(parse(not_a_request), None, "{not_a_request}");
        }
    }
}
