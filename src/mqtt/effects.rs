//! The MQTT effect sink: renders what committed changes cause (see
//! `thinghub_actors::outbox`) as publications and session changes, for every enabled
//! namespace. The Thing actor hands effects here after the change is durable and before it
//! replies; after a crash the outbox hands them again from the change feed.
//!
//! | effect | published on (every enabled namespace unless noted) |
//! |---|---|
//! | shadow accepted | `.../shadow/update/accepted` |
//! | desired pushed | `{prefix}/things/{t}/shadow/update` (native only: on AWS that topic is a request; AWS devices use the delta) |
//! | delta | `.../shadow/update/delta` |
//! | documents | `.../shadow/update/documents` (rendered only when someone subscribes) |
//! | shadow deleted | `.../shadow/delete/accepted` |
//! | command requested | `.../commands/things/{t}/executions/{id}/request` (AWS: `.../request/json`); with `--cumulocity`, a `c8y_...` action also as its row on the device's `s/ds` |
//! | event accepted | `{prefix}/things/{t}/events/{type}/accepted`, when someone subscribes |
//! | jobs notify | `.../jobs/notify` (the pending list changed) |
//! | jobs notify-next | `.../jobs/notify-next` (the next execution changed) |
//! | Thing registered | the client id is reserved: a session of it held by anyone else is closed |
//! | Thing deleted | the session acting as the Thing is closed and discarded |
//!
//! A command answer and a command's end (timed out, canceled) publish nothing here: the
//! answering device gets its reply from the bridge, and no device topic announces an end.
//!
//! Everything is published at QoS 1, so a persistent session keeps it while its device is
//! away; [`EffectSink::checkpoint`] stores the sessions before the outbox's cursor moves.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use thinghub_actors::outbox::EffectSink;
use thinghub_actors::thing::effects::Effect;

use super::broker::{Broker, Message};
use super::device::{Namespace, Topics};
use super::persist::Persistence;

/// The sink.
pub struct MqttEffects {
    broker: Arc<Broker>,
    topics: Topics,
    persistence: Arc<Persistence>,
    /// Cumulocity devices are served: an operation (`c8y_...` command) also goes down as its
    /// SmartREST row on the device's `s/ds`, or for a child on the `s/ds` of the device above
    /// it (these links say which).
    cumulocity: Option<crate::cumulocity::children::Children>,
}

impl MqttEffects {
    /// A sink publishing through `broker` on `topics`, storing sessions with `persistence`
    /// (and operations on `s/ds` when `cumulocity`).
    pub fn new(
        broker: Arc<Broker>,
        topics: Topics,
        persistence: Arc<Persistence>,
        cumulocity: Option<crate::cumulocity::children::Children>,
    ) -> MqttEffects {
        MqttEffects {
            broker,
            topics,
            persistence,
            cumulocity,
        }
    }

    fn publish(&self, topic: String, payload: &Value) {
        let _ = self.broker.publish(Message::from_server(topic, payload));
    }

    /// Publishes `payload` on each of `topics`, rendered once.
    fn publish_each(&self, topics: impl Iterator<Item = String>, payload: &Value) {
        self.publish_rendered(topics, Message::render(payload));
    }

    /// Publishes the JSON text `payload` on each of `topics`.
    fn publish_rendered(&self, topics: impl Iterator<Item = String>, payload: Bytes) {
        // The topics are formatted before the broker's lock is taken, then routed under one.
        let messages = topics
            .map(|topic| Message::server_json(topic, payload.clone()))
            .collect();
        self.broker.publish_all(messages);
    }

    /// Publishes `payload` on `shadow/{tail}` in every enabled namespace.
    fn shadow_broadcast(&self, thing: &str, tail: &str, payload: &Value) {
        self.shadow_broadcast_rendered(thing, tail, Message::render(payload));
    }

    /// [`Self::shadow_broadcast`] of a document already rendered.
    fn shadow_broadcast_rendered(&self, thing: &str, tail: &str, payload: Bytes) {
        let namespaces = self.topics.namespaces().iter();
        self.publish_rendered(
            namespaces.map(|namespace| self.topics.shadow(*namespace, thing, tail)),
            payload,
        );
    }

    /// Publishes `payload` on `jobs/{tail}` in every enabled namespace.
    fn jobs_broadcast(&self, thing: &str, tail: &str, payload: &Value) {
        let namespaces = self.topics.namespaces().iter();
        self.publish_each(
            namespaces.map(|namespace| self.topics.jobs(*namespace, thing, tail)),
            payload,
        );
    }

    fn render(&self, thing: &str, effect: &Effect) {
        match effect {
            Effect::ThingRegistered { mqtt_client_id } => {
                if self.broker.reserve_client_id(mqtt_client_id, thing) {
                    tracing::info!(%thing, client_id = %mqtt_client_id, "a session of the newly reserved client id was closed");
                }
            }
            Effect::ThingDeleted { mqtt_client_id } => {
                if self.broker.thing_deleted(thing, mqtt_client_id) {
                    tracing::info!(%thing, client_id = %mqtt_client_id, "Thing deleted: its MQTT session was closed");
                }
            }
            Effect::ShadowAccepted(accepted) => self.shadow_broadcast_rendered(
                thing,
                "update/accepted",
                Bytes::copy_from_slice(accepted.as_bytes()),
            ),
            Effect::DesiredPushed(desired) => self.publish(
                self.topics.shadow(Namespace::Native, thing, "update"),
                desired,
            ),
            Effect::Delta(delta) => self.shadow_broadcast(thing, "update/delta", delta),
            Effect::Documents(documents) => {
                self.shadow_broadcast(thing, "update/documents", documents)
            }
            Effect::ShadowDeleted(reply) => self.shadow_broadcast(thing, "delete/accepted", reply),
            Effect::CommandRequested(execution) => {
                let topics = self.topics.namespaces().iter().map(|namespace| {
                    let id = &execution.execution_id;
                    self.topics.execution(*namespace, thing, id, "request")
                });
                self.publish_each(topics, &execution.request_json());
                if let Some(children) = self
                    .cumulocity
                    .as_ref()
                    .filter(|_| execution.action.starts_with("c8y_"))
                {
                    let (device, id) = super::cumulocity::route(children, thing);
                    match super::cumulocity::operation_row(&id, execution) {
                        Some(Ok(row)) => {
                            super::cumulocity::send_rows(&self.broker, &device, "s/ds", &[row])
                        }
                        Some(Err(why)) => {
                            tracing::warn!(%thing, execution = %execution.execution_id, %why, "operation not sent on s/ds")
                        }
                        None => {}
                    }
                }
            }
            Effect::EventAccepted(stored) => {
                let topic = self.topics.event(thing, &stored.event_type, "accepted");
                if self.broker.has_subscribers(&topic) {
                    self.publish(topic, &stored.to_json(None));
                }
            }
            Effect::JobsNotify(notify) => self.jobs_broadcast(thing, "notify", notify),
            Effect::JobsNotifyNext(next) => self.jobs_broadcast(thing, "notify-next", next),
            Effect::CommandAnswered { .. } | Effect::CommandEnded { .. } => {}
        }
    }
}

impl EffectSink for MqttEffects {
    fn wants_documents(&self, thing: &str) -> bool {
        // Nobody subscribes to any `.../documents` in most fleets: known without a topic.
        if !self.broker.may_have_subscribers_ending("documents") {
            return false;
        }
        self.topics.namespaces().iter().any(|namespace| {
            self.broker
                .has_subscribers(&self.topics.shadow(*namespace, thing, "update/documents"))
        })
    }

    fn deliver(&self, thing: &str, effects: &[Effect]) {
        for effect in effects {
            self.render(thing, effect);
        }
    }

    fn checkpoint(&self) -> Result<bool, String> {
        self.persistence.checkpoint()
    }

    fn synced(&self) {
        self.persistence.synced();
    }

    fn unsynced(&self) -> bool {
        self.persistence.unsynced()
    }

    fn hurry(&self) -> Arc<tokio::sync::Notify> {
        self.broker.checkpoint_wanted()
    }
}
