//! The MQTT frontend: our own broker layer on rumqttd's protocol codec.
//!
//! - [`topic`]: topic names and filters, the `$` rule, `$share`, the subscription trie.
//! - [`codec`]: the adapter over rumqttd's codec (version detection, private fields, panics).
//! - [`broker`]: sessions, subscriptions, retained messages, delivery and the in-flight window.
//! - [`acl`]: who may publish or subscribe where.
//! - [`device`]: the device contract's topics: typed requests in, reply and effect topics out.
//! - [`bridge`]: the per-Thing fast path: requests to the Thing actor, replies to the requester.
//! - [`effects`]: the effect sink: what committed changes cause, published to subscribers.
//! - [`persist`]: persistent sessions and retained messages kept across restarts.
//! - [`connection`]: one task per connection (CONNECT, authentication, packets, keep-alive).
//! - [`transport`]: the byte streams under it: TCP, TLS, WebSocket (plain or over TLS).
//!
//! [`serve`] accepts connections until shutdown.

pub mod acl;
pub mod bridge;
pub mod broker;
pub mod codec;
pub mod connection;
pub mod cumulocity;
pub mod device;
pub mod effects;
pub mod operator;
pub mod persist;
pub mod tap;
pub mod topic;
pub mod transport;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use acl::{Acl, Action, Identity};
use broker::{Broker, CloseReason, UserChange};
use connection::MqttContext;

use crate::tls::Tls;
use crate::users::MqttUsers;
use transport::{ListenerKind, Transport};

/// Device requests refused, by kind (shown in the metrics).
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Command responses refused over MQTT (malformed, unknown, late or duplicate).
    pub command_responses_refused: AtomicU64,
    /// Device events rejected over MQTT (invalid, or for an unknown Thing).
    pub events_rejected: AtomicU64,
}

/// How often expired persistent sessions are dropped.
const SESSION_SWEEP_PERIOD: Duration = Duration::from_secs(1);
/// How long shutdown waits for connections to finish (their Disconnected events included).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// A user was changed or deleted over the API: its live connections close at once (v5:
/// DISCONNECT 0x87) and its sessions are discarded (deleted, or bound to another Thing) or keep
/// only the subscriptions its new rights allow. Returns the connections closed.
pub fn revoke_user(broker: &Broker, acl: &Acl, users: &MqttUsers, username: &str) -> usize {
    let allowed = |who: &Identity, filter: &str| acl.allows(who, Action::Subscribe, filter);
    let change = match users.rights(username) {
        Ok(Some(rights)) => UserChange::Updated {
            thing: rights.thing_name,
            superuser: rights.superuser,
            allowed: &allowed,
        },
        Ok(None) => UserChange::Deleted,
        Err(e) => {
            // Fail closed: rights that cannot be read are no rights.
            tracing::error!(username, error = %e, "cannot read a changed user; revoking its sessions");
            UserChange::Deleted
        }
    };
    let closed = broker.revoke_user(username, change);
    if closed > 0 {
        tracing::info!(
            username,
            closed,
            "user changed: its MQTT connections were closed"
        );
    }
    closed
}

/// A device certificate of `thing` was revoked: the Thing's connection closes if it was made
/// with that certificate; with no active certificate left (or the records unreadable: fail
/// closed), every certificate session of the Thing goes (as for a deleted user).
pub fn revoke_certificate(
    broker: &Broker,
    acl: &Acl,
    users: &MqttUsers,
    thing: &str,
    fingerprint: &str,
) {
    let owner = crate::certificates::certificate_owner(thing);
    let close = match users.rights(&owner) {
        // Another certificate is still active: only a connection made with this one closes.
        Ok(Some(rights)) => rights
            .thing_client_id
            .and_then(|client_id| broker.client(&client_id))
            .is_some_and(|client| {
                client.connected
                    && client.username.as_deref() == Some(owner.as_str())
                    && client.certificate_fingerprint.as_deref() == Some(fingerprint)
            }),
        Ok(None) | Err(_) => true,
    };
    if close {
        revoke_user(broker, acl, users, &owner);
    }
}

/// The ACL rules changed: subscriptions they no longer allow are removed from every session.
pub fn reauthorize_subscriptions(broker: &Broker, acl: &Acl) -> usize {
    let removed = broker.reauthorize_subscriptions(&|who: &Identity, filter: &str| {
        acl.allows(who, Action::Subscribe, filter)
    });
    if removed > 0 {
        tracing::info!(
            removed,
            "ACL rules changed: subscriptions no longer allowed were removed"
        );
    }
    removed
}

/// How often failed authentications are summarized in the log.
const AUTH_REPORT_PERIOD: Duration = Duration::from_secs(10);
/// Things whose connection a crash left open, ended at once.
const RESTART_DISCONNECTS_CONCURRENCY: usize = 64;
/// Online-index entries read at a time.
const RESTART_DISCONNECTS_PAGE: usize = 1024;
/// Longest wait between attempts to record one (a Thing busy or failing).
const RESTART_DISCONNECT_RETRY_MAX: Duration = Duration::from_secs(30);

/// Records the end of every connection the `online` index holds from an earlier run of the
/// server (its id is below this run's first): those a crash (kill -9, power loss) left open, so
/// their Things show offline, their offline alarms are watched and their connection history is
/// closed (reason `server_restart`). A device that reconnected meanwhile has a new connection
/// id, which the Thing keeps. Runs in the background from start, retrying each Thing (as
/// background work, never refused for being busy) until it is recorded, the Thing is gone or
/// the server stops.
pub fn spawn_restart_disconnects(
    node: &mut thinghub_actors::Node,
    broker: Arc<Broker>,
    things: thinghub_actors::Things,
    store: thinghub_storage::Store,
) {
    node.spawn("connections left open", move |stop| async move {
        let first_of_this_run = broker.first_connection_id();
        let mut after: Option<String> = None;
        let mut ended = 0u64;
        loop {
            let page = match store.online_things(after.as_deref(), RESTART_DISCONNECTS_PAGE) {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the online index; connections a crash left open stay open until their Things reconnect");
                    return;
                }
            };
            let Some(last) = page.last() else { break };
            after = Some(last.thing.clone());
            let full = page.len() == RESTART_DISCONNECTS_PAGE;
            let mut ending = tokio::task::JoinSet::new();
            for entry in page {
                if entry.connection_id >= first_of_this_run {
                    continue;
                }
                while ending.len() >= RESTART_DISCONNECTS_CONCURRENCY {
                    ending.join_next().await;
                }
                let things = things.clone();
                let mut stop = stop.clone();
                ending.spawn(async move {
                    let mut wait = Duration::from_millis(100);
                    loop {
                        match things
                            .end_connection_left_open(
                                &entry.thing,
                                &entry.client_id,
                                entry.connection_id,
                            )
                            .await
                        {
                            Ok(()) => return true,
                            Err(e) if e.kind == thinghub_actors::thing::RejectionKind::ThingNotFound => {
                                return false
                            }
                            Err(e) => {
                                tracing::warn!(thing = %entry.thing, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot record the end of a connection a crash left open; retrying");
                            }
                        }
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            _ = stop.wait_for(|s| *s) => return false,
                        }
                        wait = (wait * 2).min(RESTART_DISCONNECT_RETRY_MAX);
                    }
                });
            }
            while let Some(done) = ending.join_next().await {
                ended += u64::from(done.unwrap_or(false));
            }
            if !full || *stop.borrow() {
                break;
            }
        }
        if ended > 0 {
            tracing::info!(
                things = ended,
                "connections an earlier run left open were recorded as ended (server_restart)"
            );
        }
    });
}

/// Hands the MQTT frontend's background tasks to the node (stopped at its shutdown): the
/// session sweeper (expired sessions, delayed wills) and the failed-authentication report.
pub fn spawn_background(node: &mut thinghub_actors::Node, ctx: &Arc<MqttContext>) {
    let broker = ctx.broker.clone();
    node.spawn("MQTT session sweeper", move |mut stop| async move {
        let mut ticker = tokio::time::interval(SESSION_SWEEP_PERIOD);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let expired = broker.expire_sessions();
                    if expired > 0 {
                        tracing::debug!(expired, "expired persistent MQTT sessions");
                    }
                }
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    });
    let throttle = ctx.throttle.clone();
    node.spawn("authentication report", move |mut stop| async move {
        let mut ticker = tokio::time::interval(AUTH_REPORT_PERIOD);
        loop {
            tokio::select! {
                _ = ticker.tick() => throttle.report(AUTH_REPORT_PERIOD),
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    });
}

/// One MQTT listener: its socket, what runs on it under MQTT, and TLS where it needs it.
pub struct MqttListener {
    /// The bound socket.
    pub socket: TcpListener,
    /// TCP, TLS, WebSocket or WebSocket over TLS.
    pub kind: ListenerKind,
    /// The TLS configuration (`tls` and `wss` listeners).
    pub tls: Option<Arc<Tls>>,
}

/// Accepts MQTT connections on every listener until `shutdown` resolves, then closes them all.
/// `connections_max` bounds the connections of all listeners together.
pub async fn serve(
    listeners: Vec<MqttListener>,
    ctx: Arc<MqttContext>,
    connections_max: usize,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(connections_max));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        loops.spawn(accept_loop(
            listener,
            ctx.clone(),
            permits.clone(),
            stop_rx.clone(),
        ));
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    while loops.join_next().await.is_some() {}
    ctx.broker.close_all(CloseReason::ServerShutdown);
    // Every live connection holds a permit: all permits back = all connections finished.
    let all = u32::try_from(connections_max).unwrap_or(u32::MAX);
    if tokio::time::timeout(SHUTDOWN_DRAIN, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("some MQTT connections did not finish within {SHUTDOWN_DRAIN:?}");
    }
}

async fn accept_loop(
    listener: MqttListener,
    ctx: Arc<MqttContext>,
    permits: Arc<Semaphore>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.socket.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let permit = permits.clone().try_acquire_owned().ok();
                let opened = ctx.listeners.opened(listener.kind);
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                }
                if listener.kind == ListenerKind::Tcp {
                    // Spawned as it is: no wrapper future in every TCP connection's task.
                    tokio::spawn(connection::serve(
                        Transport::tcp(stream),
                        opened,
                        None,
                        peer,
                        ctx.clone(),
                        permit,
                        tokio::time::Instant::now(),
                    ));
                } else {
                    tokio::spawn(open(
                        stream,
                        peer,
                        opened,
                        listener.tls.clone(),
                        ctx.clone(),
                        permit,
                        stop.clone(),
                    ));
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                tracing::warn!(listener = listener.kind.as_str(), error = %e, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs what a listener puts under MQTT (TLS handshake, WebSocket upgrade), then the MQTT
/// connection. Past the connection limit these clients are closed before their handshake,
/// which would cost more than the answer (a TCP client is told so in a CONNACK).
async fn open(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    opened: transport::OpenGuard,
    tls: Option<Arc<Tls>>,
    ctx: Arc<MqttContext>,
    permit: Option<OwnedSemaphorePermit>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let accepted_at = tokio::time::Instant::now();
    let kind = opened.kind();
    if permit.is_none() {
        tracing::warn!(%peer, listener = kind.as_str(), "connection limit reached; closing before the handshake");
        return;
    }
    // Boxed: the handshakes' state is gone once the connection runs. A shutdown ends it (the
    // broker's close reaches only connections past CONNECT).
    let opening = Box::pin(handshake(stream, peer, kind, tls, &ctx, accepted_at));
    let opened_io = tokio::select! {
        opened_io = opening => opened_io,
        _ = stop.wait_for(|stop| *stop) => return,
    };
    let Some((io, certificate)) = opened_io else {
        return;
    };
    connection::serve(io, opened, certificate, peer, ctx, permit, accepted_at).await;
}

/// The TLS handshake and/or WebSocket upgrade of a new socket (bounded in time).
async fn handshake(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    kind: ListenerKind,
    tls: Option<Arc<Tls>>,
    ctx: &MqttContext,
    accepted_at: tokio::time::Instant,
) -> Option<(Transport, Option<crate::tls::PeerCertificate>)> {
    let (stream, certificate): (Box<dyn transport::Io>, _) = match (kind, tls) {
        (ListenerKind::Tls | ListenerKind::Wss, Some(tls)) => {
            let (stream, certificate) = tls
                .accept(kind.as_str(), crate::tls::Peers::Devices, stream)
                .await
                .ok()?;
            (Box::new(stream), certificate)
        }
        (ListenerKind::Tls | ListenerKind::Wss, None) => {
            tracing::error!(
                listener = kind.as_str(),
                "a TLS listener without TLS settings"
            );
            return None;
        }
        _ => (Box::new(stream), None),
    };
    if kind == ListenerKind::Tls {
        return Some((Transport::Stream(stream), certificate));
    }
    // The upgrade counts against the time a client has to send CONNECT (from the accept).
    let upgrade = transport::accept_websocket(
        stream,
        &ctx.config.ws_path,
        // A message may hold a whole packet and a bit of the next.
        ctx.config.packet_bytes_max.saturating_mul(2),
    );
    match tokio::time::timeout_at(accepted_at + ctx.config.connect_timeout, upgrade).await {
        Ok(Ok((ws, origin))) => {
            // A browser presents its certificate to any page's WebSocket: from a page whose
            // origin is not allowed, the certificate is no identity (its user logs in).
            let certificate = match (certificate, origin) {
                (Some(cert), Some(origin)) if !ctx.config.ws_origins_allowed.contains(&origin) => {
                    tracing::info!(%peer, %origin, fingerprint = %cert.fingerprint, "client certificate from a browser page of an origin not in mqtt_ws_origins_allowed: not used as the identity");
                    None
                }
                (certificate, _) => certificate,
            };
            Some((Transport::WebSocket(Box::new(ws)), certificate))
        }
        Ok(Err(e)) => {
            ctx.listeners
                .ws_upgrades_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%peer, listener = kind.as_str(), error = %e, "WebSocket upgrade refused");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, listener = kind.as_str(), "no WebSocket upgrade within the connect timeout");
            None
        }
    }
}
