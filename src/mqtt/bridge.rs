//! The per-Thing fast path between MQTT and the Thing actors: the only part of the MQTT
//! frontend that talks to Things.
//!
//! A client's PUBLISH that [`Topics::parse`] reads as a [`DeviceRequest`] is not routed to
//! subscribers: it goes to the Thing's actor, and the bridge renders the reply *to the
//! requester*: `shadow/get/accepted`, every `.../rejected`, and a command answer's
//! `response/accepted`, in the namespace the request came in on. What the change causes for
//! anyone else (`update/accepted`, the delta, the desired push, command requests, events
//! accepted) is published by the effect sink ([`super::effects`]) from the Thing's side, once
//! the change is durable and before the reply, whatever frontend made it.
//!
//! The bridge also records a Thing's connections and disconnections in its log.
//!
//! **Architecture invariant:** the server's own publications go straight to subscribers through
//! the broker; only PUBLISH packets read from a client socket reach [`Bridge::handle`], so the
//! server can never read its own `shadow/update` back as a device report.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use thinghub_actors::clock::SharedClock;
use thinghub_actors::thing::jobs::{DeviceJobRequest, JobRefusal};
use thinghub_actors::thing::shadow::{client_token_of, parse_json_object};
use thinghub_actors::thing::{
    CommandLimits, CommandResponse, EventLimits, IngestEvent, Limits, Origin, Rejection,
    ShadowLimits, ShadowUpdate,
};
use thinghub_actors::Things;

use super::broker::{Broker, Message};
use super::device::{DeviceRequest, JobsOp, Namespace, ShadowOp, Topics};
use super::DeviceStats;

/// The AWS IoT Commands name of a refusal (`RejectedErrorCode`).
fn aws_error_name(rejection: &Rejection) -> &'static str {
    rejection.kind.aws_error_code()
}

/// The fast path.
pub struct Bridge {
    broker: Arc<Broker>,
    things: Things,
    topics: Topics,
    limits: ShadowLimits,
    event_limits: EventLimits,
    command_limits: CommandLimits,
    /// Counters.
    pub stats: Arc<DeviceStats>,
    clock: SharedClock,
}

impl Bridge {
    /// A bridge for the device requests of `topics`.
    pub fn new(
        broker: Arc<Broker>,
        things: Things,
        topics: Topics,
        limits: &Limits,
        clock: SharedClock,
    ) -> Bridge {
        Bridge {
            broker,
            things,
            topics,
            limits: limits.shadow,
            event_limits: limits.events,
            command_limits: limits.commands,
            stats: Arc::new(DeviceStats::default()),
            clock,
        }
    }

    /// Whether `topic` is a request to a Thing.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<DeviceRequest<'t>> {
        self.topics.parse(topic)
    }

    fn publish(&self, topic: String, payload: &Value) {
        let _ = self.broker.publish(Message::from_server(topic, payload));
    }

    /// Handles a request read from a client acting as `as_thing` (if any); returns once the
    /// reply is published (for a change: after it is durable and its effects are out).
    pub async fn handle(&self, request: DeviceRequest<'_>, payload: &[u8], as_thing: Option<&str>) {
        match request {
            DeviceRequest::Shadow {
                thing,
                op,
                namespace,
            } => {
                // An update by the Thing's own device reports; anyone else (a backend acting
                // for operators) changes desired.
                let origin = if as_thing == Some(thing) {
                    Origin::Device
                } else {
                    Origin::Operator
                };
                self.shadow(thing, op, namespace, payload, origin).await
            }
            DeviceRequest::Event { thing, event_type } => {
                self.event(thing, event_type, payload).await
            }
            DeviceRequest::CommandResponse {
                thing,
                execution_id,
                namespace,
            } => {
                self.command_response(thing, execution_id, namespace, payload)
                    .await
            }
            DeviceRequest::Jobs {
                thing,
                op,
                namespace,
            } => self.jobs(thing, op, namespace, payload).await,
        }
    }

    /// A job request: answered on `jobs/{...}/accepted` or `jobs/{...}/rejected` (AWS IoT Jobs
    /// payloads in both namespaces) once any change is durable.
    async fn jobs(&self, thing: &str, op: JobsOp<'_>, namespace: Namespace, payload: &[u8]) {
        let mut token = None;
        let outcome = async {
            let body = if payload.iter().all(u8::is_ascii_whitespace) {
                Value::Object(Map::new())
            } else {
                parse_json_object(payload)?
            };
            let body = body.as_object().cloned().unwrap_or_default();
            token = client_token_of(&body, &self.limits)?;
            self.job_op(thing, op, &body).await
        }
        .await;
        let timestamp = self.clock.now_ms() / 1000;
        let (tail, mut reply) = match outcome {
            Ok(mut accepted) => {
                accepted["timestamp"] = timestamp.into();
                ("accepted", accepted)
            }
            Err(refusal) => {
                tracing::debug!(%thing, op = %op.path(), reason = %refusal.rejection.message, "job request refused");
                let mut body = json!({
                    "code": refusal.rejection.kind.aws_jobs_error_code(),
                    "message": refusal.rejection.message,
                    "timestamp": timestamp,
                });
                if let Some(state) = refusal.execution_state {
                    body["executionState"] = state;
                }
                ("rejected", body)
            }
        };
        if let Some(token) = token {
            reply["clientToken"] = token.into();
        }
        let topic = self
            .topics
            .jobs(namespace, thing, &format!("{}/{tail}", op.path()));
        self.publish(topic, &reply);
    }

    async fn job_op(
        &self,
        thing: &str,
        op: JobsOp<'_>,
        body: &Map<String, Value>,
    ) -> Result<Value, JobRefusal> {
        let request = match op {
            JobsOp::Get => DeviceJobRequest::Get,
            JobsOp::StartNext => DeviceJobRequest::StartNext,
            JobsOp::Describe(job_id) => DeviceJobRequest::Describe(job_id),
            JobsOp::Update(job_id) => DeviceJobRequest::Update(job_id),
        };
        self.things.device_job_request(thing, request, body).await
    }

    async fn shadow(
        &self,
        thing: &str,
        op: ShadowOp,
        namespace: Namespace,
        payload: &[u8],
        origin: Origin,
    ) {
        let outcome = match op {
            ShadowOp::Update => {
                async {
                    let update = ShadowUpdate::parse(payload, &self.limits)?;
                    self.things.update_shadow(thing, update, origin).await?;
                    Ok(())
                }
                .await
            }
            ShadowOp::Get => self.get(namespace, thing, payload).await,
            ShadowOp::Delete => {
                async {
                    let token = self.token_of(payload)?;
                    self.things.delete_shadow(thing, token, origin).await?;
                    Ok(())
                }
                .await
            }
        };
        if let Err(rejection) = outcome {
            let mut body = json!({
                "code": rejection.code().as_u16(),
                "message": rejection.message,
                "timestamp": self.clock.now_ms() / 1000,
            });
            if let Some(token) = &rejection.client_token {
                body["clientToken"] = token.clone().into();
            }
            let tail = format!("{}/rejected", op.name());
            self.publish(self.topics.shadow(namespace, thing, &tail), &body);
        }
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
            self.topics.shadow(namespace, thing, "get/accepted"),
            &document.to_json(token.as_deref()),
        );
        Ok(())
    }

    /// Stores a device event; a rejection is answered on `events/{type}/rejected` (the
    /// acceptance is an effect: `events/{type}/accepted`, when anyone listens).
    async fn event(&self, thing: &str, event_type: &str, payload: &[u8]) {
        let stored = async {
            let body = parse_json_object(payload)?;
            let event = IngestEvent::from_json(&body, Some(event_type), &self.event_limits)?;
            self.things.ingest_event(thing, event).await
        }
        .await;
        if let Err(rejection) = stored {
            self.stats.events_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%thing, %event_type, reason = %rejection.message, "event rejected");
            let body = json!({
                "code": rejection.code().as_u16(),
                "message": rejection.message,
                "timestamp": self.clock.now_ms() / 1000,
            });
            self.publish(self.topics.event(thing, event_type, "rejected"), &body);
        }
    }

    /// Applies a device's answer (durable, or refused and recorded, before this returns) and
    /// replies on `.../response/accepted` or `.../response/rejected`.
    async fn command_response(
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
        let topic = |tail| self.topics.execution(namespace, thing, execution_id, tail);
        match (outcome, namespace) {
            (Ok(execution), Namespace::Native) => {
                let topic = topic("response/accepted");
                if self.broker.has_subscribers(&topic) {
                    let body = json!({
                        "executionId": execution.execution_id,
                        "status": execution.status.as_str(),
                        "timestamp": self.clock.now_ms() / 1000,
                    });
                    self.publish(topic, &body);
                }
            }
            (Ok(execution), Namespace::Aws) => {
                self.publish(
                    topic("response/accepted"),
                    &json!({"executionId": execution.execution_id}),
                );
            }
            (Err(rejection), namespace) => {
                self.stats
                    .command_responses_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(%thing, %execution_id, code = rejection.code().as_u16(), reason = %rejection.message, "command response refused");
                let body = match namespace {
                    Namespace::Native => json!({
                        "code": rejection.code().as_u16(),
                        "message": rejection.message,
                        "executionId": execution_id,
                        "timestamp": self.clock.now_ms() / 1000,
                    }),
                    Namespace::Aws => json!({
                        "error": aws_error_name(&rejection),
                        "errorMessage": rejection.message,
                        "executionId": execution_id,
                    }),
                };
                self.publish(topic("response/rejected"), &body);
            }
        }
    }

    /// Records that the device acting as `thing` connected.
    pub async fn connected(&self, thing: &str, client_id: &str, connection_id: u64) {
        if let Err(e) = self
            .things
            .record_connected(thing, client_id, connection_id)
            .await
        {
            tracing::warn!(%thing, %client_id, error = %e, "cannot record the connect");
        }
    }

    /// Records that the device acting as `thing` disconnected, and why.
    pub async fn disconnected(
        &self,
        thing: &str,
        client_id: &str,
        connection_id: u64,
        reason: &str,
    ) {
        if let Err(e) = self
            .things
            .record_disconnected(thing, client_id, connection_id, reason)
            .await
        {
            tracing::warn!(%thing, %client_id, error = %e, "cannot record the disconnect");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::aws_error_name;
    use thinghub_actors::thing::{Rejection, RejectionKind};

    #[test]
    fn aws_error_names_come_from_the_rejection_kind_not_its_message() {
        let name = |kind| aws_error_name(&Rejection::new(kind, "Payload contains invalid json"));
        assert_eq!(name(RejectionKind::InvalidJson), "InvalidJson");
        assert_eq!(name(RejectionKind::InvalidRequest), "InvalidRequest");
        assert_eq!(name(RejectionKind::ExecutionNotFound), "ResourceNotFound");
        assert_eq!(
            name(RejectionKind::TerminalStateReached),
            "TerminalStateReached"
        );
        assert_eq!(name(RejectionKind::TooManyRequests), "RequestThrottled");
        assert_eq!(name(RejectionKind::Unavailable), "InternalError");
    }
}
