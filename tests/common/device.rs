//! A real MQTT device (rumqttc v4) for end-to-end tests: connect, subscribe, read the next
//! publish with a bounded wait.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

use super::Server;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Device {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<Packet>,
}

impl Device {
    pub async fn connect(
        server: &Server,
        id: &str,
        user: (&str, &str),
        clean: bool,
    ) -> (Device, bool) {
        let mut options = MqttOptions::new(id, server.mqtt.ip().to_string(), server.mqtt.port());
        options.set_credentials(user.0, user.1);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(clean);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let present = loop {
            match tokio::time::timeout(WAIT, eventloop.poll())
                .await
                .expect("in time")
                .expect("connect")
            {
                Event::Incoming(Packet::ConnAck(ack)) => break ack.session_present,
                _ => continue,
            }
        };
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(packet) = event {
                    if tx.send(packet).is_err() {
                        return;
                    }
                }
            }
        });
        (Device { client, events }, present)
    }

    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("SUBACK in time")
            {
                Some(Packet::SubAck(ack)) => {
                    assert!(
                        matches!(
                            ack.return_codes[0],
                            rumqttc::SubscribeReasonCode::Success(_)
                        ),
                        "{filter}"
                    );
                    return;
                }
                Some(_) => continue,
                None => panic!("connection closed"),
            }
        }
    }

    /// The next publish (bounded wait), as (topic, JSON).
    pub async fn next(&mut self) -> (String, Value) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("a publish in time")
            {
                Some(Packet::Publish(p)) => {
                    return (
                        p.topic.clone(),
                        serde_json::from_slice(&p.payload).expect("JSON payload"),
                    );
                }
                Some(_) => continue,
                None => panic!("connection closed"),
            }
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }
}
