//! Real MQTT clients for end-to-end tests: rumqttc v3.1.1 and v5 with their event loops in a
//! task, and a raw v5 socket for what rumqttc will not send (DISCONNECT properties, protocol
//! violations). Every wait is bounded by [`WAIT`].

#![allow(dead_code)]

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::Packet as P5;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Server;

/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A v3.1.1 client whose event loop runs in a task; events arrive on a channel.
pub struct Client {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<Result<Packet, String>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Client {
    pub async fn connect(
        server: &Server,
        id: &str,
        credentials: Option<(&str, &str)>,
        setup: impl FnOnce(&mut MqttOptions),
    ) -> Result<(Client, bool), ConnectionError> {
        Client::connect_to(
            &server.mqtt.ip().to_string(),
            server.mqtt.port(),
            id,
            credentials,
            setup,
        )
        .await
    }

    /// [`Client::connect`] to `host:port` (or, over WebSocket, the URL in `host`).
    pub async fn connect_to(
        host: &str,
        port: u16,
        id: &str,
        credentials: Option<(&str, &str)>,
        setup: impl FnOnce(&mut MqttOptions),
    ) -> Result<(Client, bool), ConnectionError> {
        let mut options = MqttOptions::new(id, host, port);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        setup(&mut options);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let session_present = loop {
            match tokio::time::timeout(WAIT, eventloop.poll())
                .await
                .expect("connect in time")?
            {
                Event::Incoming(Packet::ConnAck(ack)) => break ack.session_present,
                _ => continue,
            }
        };
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Ok((
            Client {
                client,
                events,
                task,
            },
            session_present,
        ))
    }

    /// Waits for the next packet matching `want` (bounded), skipping others.
    pub async fn expect<T>(&mut self, what: &str, mut want: impl FnMut(&Packet) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
            match next {
                Some(Ok(packet)) => {
                    if let Some(found) = want(&packet) {
                        return found;
                    }
                }
                Some(Err(e)) => panic!("connection ended while waiting for {what}: {e}"),
                None => panic!("event loop stopped while waiting for {what}"),
            }
        }
    }

    /// The topic of the next publish (bounded wait).
    pub async fn next_topic(&mut self, what: &str) -> String {
        self.expect(what, |p| match p {
            Packet::Publish(p) => Some(p.topic.clone()),
            _ => None,
        })
        .await
    }

    pub async fn publish_on(&mut self, topic: &str) -> rumqttc::Publish {
        let topic = topic.to_owned();
        self.expect(&format!("a publish on {topic}"), move |p| match p {
            Packet::Publish(publish) if publish.topic == topic => Some(publish.clone()),
            _ => None,
        })
        .await
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        self.expect("SUBACK", |p| match p {
            Packet::SubAck(ack) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await
    }

    /// Whether the connection gets closed by the server (bounded wait).
    pub async fn closed_by_server(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(Packet::Disconnect))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Drops the TCP connection without DISCONNECT.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// A v5 client (rumqttc::v5) whose event loop runs in a task.
pub struct Client5 {
    pub client: rumqttc::v5::AsyncClient,
    pub events: mpsc::UnboundedReceiver<Result<P5, String>>,
    pub connack: rumqttc::v5::mqttbytes::v5::ConnAck,
    pub task: tokio::task::JoinHandle<()>,
}

impl Client5 {
    pub fn options(server: &Server, id: &str, user: (&str, &str)) -> rumqttc::v5::MqttOptions {
        let mut options =
            rumqttc::v5::MqttOptions::new(id, server.mqtt.ip().to_string(), server.mqtt.port());
        options.set_credentials(user.0, user.1);
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    pub async fn connect(
        options: rumqttc::v5::MqttOptions,
    ) -> Result<Client5, rumqttc::v5::ConnectionError> {
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
        let connack = loop {
            match tokio::time::timeout(WAIT, eventloop.poll())
                .await
                .expect("connect in time")?
            {
                rumqttc::v5::Event::Incoming(P5::ConnAck(ack)) => break ack,
                _ => continue,
            }
        };
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::v5::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:?}")));
                        return;
                    }
                }
            }
        });
        Ok(Client5 {
            client,
            events,
            connack,
            task,
        })
    }

    /// Waits for the next packet matching `want` (bounded), skipping others.
    pub async fn expect<T>(&mut self, what: &str, mut want: impl FnMut(&P5) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
            match next {
                Some(Ok(packet)) => {
                    if let Some(found) = want(&packet) {
                        return found;
                    }
                }
                Some(Err(e)) => panic!("connection ended while waiting for {what}: {e}"),
                None => panic!("event loop stopped while waiting for {what}"),
            }
        }
    }

    /// The next PUBLISH (bounded wait).
    pub async fn next_publish(&mut self, what: &str) -> rumqttc::v5::mqttbytes::v5::Publish {
        self.expect(what, |p| match p {
            P5::Publish(publish) => Some(publish.clone()),
            _ => None,
        })
        .await
    }

    /// Subscribes and returns the SUBACK's reason codes.
    pub async fn subscribe(
        &mut self,
        filter: &str,
    ) -> Vec<rumqttc::v5::mqttbytes::v5::SubscribeReasonCode> {
        self.client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        self.expect("SUBACK", |p| match p {
            P5::SubAck(ack) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await
    }

    /// How the server ended the connection: `Some(error text)` (a server DISCONNECT shows its
    /// reason code there), or `None` if it stayed open for the whole wait.
    pub async fn ended(&mut self) -> Option<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return None,
                Ok(None) => return Some("event loop stopped".into()),
                Ok(Some(Err(e))) => return Some(e),
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// A raw MQTT socket: bytes out, v5 packets (decoded by rumqttc's codec) in.
pub struct Raw {
    pub stream: tokio::net::TcpStream,
    buffer: BytesMut,
}

impl Raw {
    pub async fn open(server: &Server) -> Raw {
        let stream = tokio::net::TcpStream::connect(server.mqtt)
            .await
            .expect("tcp connect");
        Raw {
            stream,
            buffer: BytesMut::new(),
        }
    }

    /// Connects with a v5 CONNECT built by rumqttc's codec; returns the CONNACK.
    pub async fn connect_v5(
        server: &Server,
        connect: rumqttc::v5::mqttbytes::v5::Connect,
        login: Option<(&str, &str)>,
    ) -> (Raw, rumqttc::v5::mqttbytes::v5::ConnAck) {
        let mut raw = Raw::open(server).await;
        let login = login.map(|(user, pass)| rumqttc::v5::mqttbytes::v5::Login::new(user, pass));
        raw.send5(P5::Connect(connect, None, login)).await;
        match raw.recv5().await {
            Some(P5::ConnAck(ack)) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// A socket with a small receive buffer: a client that stops reading fills it fast, so
    /// the server's writes stall after kilobytes, not megabytes.
    pub async fn open_slow_reader(server: &Server) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(server.mqtt).await.expect("tcp connect");
        Raw {
            stream,
            buffer: BytesMut::new(),
        }
    }

    /// Sends a hand-written 3.1.1 CONNECT (clean session, username and password) without
    /// waiting for the CONNACK.
    pub async fn send_connect_v311(&mut self, client_id: &str, user: (&str, &str)) {
        let mut packet = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0010, 0, 60];
        for field in [client_id, user.0, user.1] {
            packet.extend_from_slice(&(field.len() as u16).to_be_bytes());
            packet.extend_from_slice(field.as_bytes());
        }
        assert!(packet.len() - 2 < 128, "single-byte remaining length");
        packet[1] = (packet.len() - 2) as u8;
        self.send_bytes(&packet).await;
    }

    /// Sends a hand-written 3.1.1 SUBSCRIBE (packet id 1, QoS 0) without waiting for the SUBACK.
    pub async fn send_subscribe_v311(&mut self, filter: &str) {
        let mut packet = vec![0x82, 0, 0, 1];
        packet.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        packet.extend_from_slice(filter.as_bytes());
        packet.push(0);
        assert!(packet.len() - 2 < 128, "single-byte remaining length");
        packet[1] = (packet.len() - 2) as u8;
        self.send_bytes(&packet).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    pub async fn send5(&mut self, packet: P5) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).expect("encode");
        self.send_bytes(&out).await;
    }

    /// The next v5 packet, or `None` once the server closed the socket (bounded wait).
    pub async fn recv5(&mut self) -> Option<P5> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match P5::read(&mut self.buffer, None) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("undecodable packet from the server: {e}"),
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buffer))
                .await
                .expect("the server answered or closed in time");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Whether the server closes the socket (bounded wait), skipping what it sends first.
    pub async fn closed_by_server(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut sink = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// A v5 CONNECT with the given client id and session expiry.
pub fn connect5(
    client_id: &str,
    clean_start: bool,
    expiry_s: Option<u32>,
) -> rumqttc::v5::mqttbytes::v5::Connect {
    let mut properties = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
    properties.session_expiry_interval = expiry_s;
    rumqttc::v5::mqttbytes::v5::Connect {
        keep_alive: 30,
        client_id: client_id.into(),
        clean_start,
        properties: Some(properties),
    }
}
