//! Wiring of `thinghub serve`: open storage, restore the stored MQTT state, start the node (the
//! Thing registry and its background tasks; it first delivers what the change feed still owes),
//! set up admin keys, serve HTTP and MQTT until the shutdown signal, then drain: stop accepting,
//! close connections, and shut the node down (every Thing writes its snapshot, the MQTT state
//! is stored, one sync).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thinghub_actors::clock::{Clock, SystemClock};
use thinghub_actors::context::DeadlineWake;
use thinghub_actors::deadlines::DeadlineConfig;
use thinghub_actors::groups::Groups;
use thinghub_actors::job_manager::{JobManager, JobManagerConfig};
use thinghub_actors::outbox::{Outbox, OutboxConfig};
use thinghub_actors::thing::jobs::JobLimits;
use thinghub_actors::thing::{CommandLimits, EventLimits, Limits, ShadowLimits};
use thinghub_actors::{Node, NodeConfig, RegistryConfig, ThingContext, Things};
use thinghub_storage::{StorageError, Store, StoreConfig};
use tokio::net::TcpListener;

use crate::auth::{ApiKeys, AuthError};
use crate::config::Config;
use crate::http::listener::{HttpListener, HttpListenerStats};
use crate::http::{self, AppState, HttpLimits};
use crate::mqtt::transport::{ListenerKind, ListenerStats};
use crate::mqtt::{
    self,
    acl::{Acl, Action, Identity},
    bridge::Bridge,
    broker::{Broker, BrokerLimits},
    connection::{ConnectionConfig, MqttContext},
    device::Topics,
    effects::MqttEffects,
    persist::{Persistence, StoredSession},
};
use crate::throttle::{AuthThrottle, ThrottleConfig};
use crate::tls::{Tls, TlsSettings};
use crate::users::MqttUsers;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Storage could not be opened.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// Admin keys could not be set up.
    #[error("admin keys: {0}")]
    Auth(#[from] AuthError),
    /// The ACL rules could not be loaded.
    #[error("ACL rules: {0}")]
    Acl(String),
    /// The actor system could not start.
    #[error("actor system: {0}")]
    Actors(String),
    /// The configuration cannot be served (found at start-up).
    #[error("configuration: {0}")]
    Config(String),
    /// The stored MQTT sessions could not be checked against the users and the registry.
    #[error("stored MQTT sessions: {0}")]
    MqttRestore(String),
    /// A listener could not be bound or failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the server (HTTP and MQTT) until `shutdown` resolves, then drains and flushes.
pub async fn serve(
    config: Config,
    admin_key: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let store = Store::open(&StoreConfig {
        data_dir: config.data_dir.clone(),
        cache_bytes: config.storage_cache_bytes,
        commit_batch_appends_max: config.commit_batch_appends_max,
        epoch_appends_max: config.storage_epoch_appends_max,
        wal_bytes_max: config.storage_wal_bytes_max,
        memtable_bytes_max: config.storage_memtable_bytes_max,
    })?;
    // Before any Thing is activated (the deadline timer activates some at once).
    let backfilled = thinghub_actors::service::backfill_client_ids(&store).await?;
    if backfilled > 0 {
        tracing::info!(
            things = backfilled,
            "indexed the MQTT client ids of Things registered before the client id index existed"
        );
    }
    let clock = Arc::new(SystemClock);
    let shadow_limits = ShadowLimits {
        state_bytes_max: config.shadow_state_bytes_max,
        depth_max: config.shadow_depth_max,
        client_token_bytes_max: config.client_token_bytes_max,
    };
    let event_limits = EventLimits {
        data_bytes_max: config.event_data_bytes_max,
        ..EventLimits::default()
    };
    let command_limits = CommandLimits {
        action_bytes_max: config.command_action_bytes_max,
        params_bytes_max: config.command_params_bytes_max,
        result_bytes_max: config.command_params_bytes_max,
        ttl_s_default: config.command_ttl_default_s,
        ttl_s_min: 1,
        ttl_s_max: config.command_ttl_max_s,
        pending_max: config.command_pending_max,
        finished_kept_max: config.command_finished_kept_max,
    };
    let limits = Limits {
        shadow: shadow_limits,
        events: event_limits,
        commands: command_limits,
        jobs: JobLimits {
            document_bytes_max: config.job_document_bytes_max,
            status_details_bytes_max: config.job_status_details_bytes_max,
            pending_max: config.job_pending_max,
            finished_kept_max: config.job_finished_kept_max,
        },
    };
    // The broker and its stored state come first: the Things' effects go to it.
    let broker = Arc::new(Broker::new(BrokerLimits {
        inflight_max: config.mqtt_inflight_max,
        session_queue_max: config.mqtt_session_queue_max,
        session_queue_bytes_max: config.mqtt_session_queue_bytes_max,
        outbound_bytes_max: config.mqtt_outbound_bytes_max,
        queued_bytes_max: config.mqtt_queued_bytes_max,
        sessions_max: config.mqtt_sessions_max,
        user_sessions_max: config.mqtt_user_sessions_max,
        bootstrap_sessions_max: config.cumulocity_bootstrap_connections_max,
        session_subscriptions_max: config.mqtt_session_subscriptions_max,
        session_expiry_max: Duration::from_secs(config.mqtt_session_expiry_max_s),
        retained_max: config.mqtt_retained_max,
        retained_bytes_max: config.mqtt_retained_bytes_max,
    }));
    let users = MqttUsers::new(store.clone()).with_certificates_max(config.thing_certificates_max);
    let users = Arc::new(match &config.cumulocity_bootstrap_username {
        // Only with Cumulocity served: the user exists for its `s/ucr` alone.
        Some(username) if config.cumulocity => {
            let password = config
                .cumulocity_bootstrap_password
                .as_deref()
                .unwrap_or("");
            tracing::info!(%username, "Cumulocity bootstrap user configured");
            users
                .with_bootstrap(username, password)
                .map_err(|e| ServeError::Config(format!("cumulocity_bootstrap_username: {e}")))?
        }
        Some(_) => {
            tracing::warn!("cumulocity_bootstrap_username is set but Cumulocity is not served (--cumulocity): no bootstrap user");
            users
        }
        None => users,
    });
    let registrations = Arc::new(crate::cumulocity::registrations::Registrations::open(
        store.clone(),
        config.cumulocity_registrations_max,
    )?);
    let acl = Acl::load(&config.topic_prefix, config.aws_compat, store.clone())
        .map_err(|e| ServeError::Acl(e.to_string()))?;
    let persistence = Arc::new(Persistence::new(
        store.clone(),
        broker.clone(),
        Duration::from_millis(config.mqtt_alive_mark_interval_ms),
    ));
    restore_mqtt(&persistence, &users, &acl, config.allow_anonymous)?;
    let topics = Topics::new(&config.topic_prefix, config.aws_compat);
    // One set of child links (their writes share a lock).
    let children = crate::cumulocity::children::Children::new(store.clone());
    let sink = Arc::new(MqttEffects::new(
        broker.clone(),
        topics.clone(),
        persistence.clone(),
        config.cumulocity.then(|| children.clone()),
    ));
    let outbox = Arc::new(Outbox::new(&store, sink)?);
    // Loaded before the deadline timer starts: a watch that comes due finds its rule (one whose
    // rule is missing is dropped).
    let alarm_rules = Arc::new(thinghub_actors::alarms::AlarmRuleSet::load(
        &store,
        clock.now_ms(),
    )?);
    let context = Arc::new(ThingContext {
        store: store.clone(),
        clock: clock.clone(),
        limits,
        snapshot_every_events: config.snapshot_every_events,
        deadlines: DeadlineWake::new(),
        outbox: outbox.clone(),
        counters: Default::default(),
        alarm_rules: alarm_rules.clone(),
    });
    // The node delivers what the change feed still owes (a crash between a commit and its
    // publication) before it returns, so before any client can connect.
    let mut node = Node::start(
        context,
        NodeConfig {
            registry: RegistryConfig {
                shards: config.registry_shards,
                thing_idle_ms: config.thing_idle_ms,
                request_timeout_ms: config.request_timeout_ms,
                requests_in_flight_max: config.thing_requests_in_flight_max,
            },
            deadlines: DeadlineConfig {
                fire_concurrency_max: config.deadline_fire_concurrency_max,
                scan_interval_max_ms: config.deadline_scan_interval_max_ms,
                ..DeadlineConfig::default()
            },
            outbox: OutboxConfig {
                checkpoint_interval: Duration::from_millis(config.effects_checkpoint_interval_ms),
                straggler_grace: Duration::from_millis(config.effects_straggler_grace_ms),
                recover_attempts_max: config.effects_recover_attempts_max,
                ..OutboxConfig::default()
            },
        },
    )
    .await
    .map_err(|e| ServeError::Actors(e.to_string()))?;
    let registry = node.registry().clone();
    let keys = ApiKeys::init(store.clone(), admin_key.as_deref(), clock.now_ms()).await?;
    let things = Things::new(registry.clone());
    let groups = Groups::new(store.clone());
    let alarms = thinghub_actors::alarms::Alarms::start(
        store.clone(),
        registry.clone(),
        alarm_rules,
        config.alarm_rules_max,
        config.alarm_list_scan_max,
    )?;
    let jobs = JobManager::new(
        store.clone(),
        things.clone(),
        groups.clone(),
        clock.clone(),
        JobManagerConfig {
            targets_max: config.job_targets_max,
            rollout_in_flight_max: config.job_rollout_in_flight_max,
            ..JobManagerConfig::default()
        },
    );
    // A rollout or a cancellation cut short by the last stop goes on.
    jobs.resume(jobs.recover()?);
    node.spawn("job counter", {
        let jobs = jobs.clone();
        move |stop| jobs.run_counter(stop)
    });
    let webhooks = crate::webhooks::Webhooks::new(
        store.clone(),
        broker.tap.clone(),
        crate::webhooks::WebhookLimits {
            request_timeout: Duration::from_millis(config.webhook_request_timeout_ms),
            retry_base: Duration::from_millis(config.webhook_retry_base_ms),
            retry_max: Duration::from_millis(config.webhook_retry_max_ms),
            batch_max: config.webhook_batch_max,
            dead_letters_max: config.webhook_dead_letters_max,
            webhooks_max: config.webhooks_max,
            feed_batch_max: config.webhook_batch_max,
            broker_queue_bytes_max: config.webhook_broker_queue_bytes_max,
        },
    )
    .map_err(|e| ServeError::Actors(format!("webhook client: {e}")))?;
    webhooks.start()?;
    node.spawn("webhooks", {
        let webhooks = webhooks.clone();
        move |mut stop| async move {
            let _ = stop.wait_for(|s| *s).await;
            webhooks.stop_all();
        }
    });
    let throttle = Arc::new(AuthThrottle::new(ThrottleConfig {
        failures_free: config.auth_failures_free,
        backoff_base: Duration::from_millis(config.auth_backoff_base_ms),
        backoff_max: Duration::from_millis(config.auth_backoff_max_ms),
        entries_max: config.auth_throttle_entries_max,
    }));
    let bridge = Arc::new(Bridge::new(
        broker.clone(),
        things.clone(),
        topics,
        &limits,
        clock.clone(),
    ));
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert_file), Some(key_file)) if config.tls_needed() => Some(
            Tls::load(TlsSettings {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
                client_ca_file: config.tls_client_ca_file.clone(),
                client_auth: config.tls_client_auth,
                client_identity: config.tls_client_identity,
                handshake_timeout: Duration::from_millis(config.tls_handshake_timeout_ms),
                handshakes_max: config.tls_handshakes_max,
            })
            .map_err(|e| ServeError::Config(e.to_string()))?,
        ),
        _ => None,
    };
    let mqtt_listener_stats = Arc::new(ListenerStats::default());
    let http_listener_stats = Arc::new(HttpListenerStats::default());
    let state = AppState {
        things: things.clone(),
        jobs,
        groups,
        alarms: alarms.clone(),
        webhooks: webhooks.clone(),
        device_stats: bridge.stats.clone(),
        outbox: outbox.clone(),
        persistence: persistence.clone(),
        broker: broker.clone(),
        bridge: bridge.clone(),
        stats: Arc::default(),
        keys: Arc::new(keys),
        users: users.clone(),
        registrations: registrations.clone(),
        children: children.clone(),
        throttle: throttle.clone(),
        acl: acl.clone(),
        limits: HttpLimits {
            body_bytes_max: config.http_body_bytes_max,
            list_limit_max: config.list_limit_max,
            shadow: shadow_limits,
            events: event_limits,
            commands: command_limits,
            jobs: limits.jobs,
            bulk_lines_max: config.bulk_lines_max,
            publish_bulk_max: config.publish_bulk_max,
            subscribe_durable_wait: Duration::from_millis(config.mqtt_subscribe_durable_wait_ms),
            cumulocity: config.cumulocity,
            console: config
                .console_enabled
                .then_some(crate::http::console::ConsoleLimits {
                    sessions_max: config.console_sessions_max,
                    sessions_per_key_max: config.console_sessions_per_key_max,
                    session_ttl: Duration::from_millis(config.console_session_ttl_ms),
                    refresh_every: Duration::from_millis(config.stats_sample_interval_ms),
                }),
        },
        started: std::time::Instant::now(),
        transports: crate::http::Transports {
            mqtt: mqtt_listener_stats.clone(),
            http: http_listener_stats.clone(),
            tls: tls.clone(),
            client_identity: config.tls_client_identity,
        },
    };
    node.spawn("stats sampler", {
        let state = state.clone();
        let interval = Duration::from_millis(config.stats_sample_interval_ms);
        move |stop| crate::http::stats::run_sampler(state, interval, stop)
    });

    let bound = |addr: Option<SocketAddr>| async move {
        match addr {
            None => Ok(None),
            Some(addr) => bind(addr).await.map(Some),
        }
    };
    let http_plain = bound(config.http_plain_enabled.then_some(config.http_listen)).await?;
    let https = bound(config.http_tls_listen).await?;
    let mqtt_plain = bound(config.mqtt_plain_enabled.then_some(config.mqtt_listen)).await?;
    let mqtt_tls = bound(config.mqtt_tls_listen).await?;
    let mqtt_ws = bound(config.mqtt_ws_listen).await?;
    let mqtt_wss = bound(config.mqtt_wss_listen).await?;
    let shown = |listener: &Option<(TcpListener, SocketAddr)>| {
        listener
            .as_ref()
            .map_or_else(|| "off".to_owned(), |(_, addr)| addr.to_string())
    };
    let listening = [
        shown(&http_plain),
        shown(&https),
        shown(&mqtt_plain),
        shown(&mqtt_tls),
        shown(&mqtt_ws),
        shown(&mqtt_wss),
    ];
    if config.allow_anonymous {
        tracing::warn!("MQTT accepts ANONYMOUS clients (--allow-anonymous): for development only");
    }
    if config.cumulocity {
        tracing::info!(tenant = %config.cumulocity_tenant, "serving Cumulocity devices' s/... topics");
    }
    let cumulocity = config.cumulocity.then(|| {
        Arc::new(crate::mqtt::cumulocity::Cumulocity::new(
            crate::mqtt::cumulocity::CumulocityParts {
                broker: broker.clone(),
                things: things.clone(),
                users: users.clone(),
                acl: acl.clone(),
                registrations,
                children: children.clone(),
                alarms: alarms.clone(),
                tenant: config.cumulocity_tenant.clone(),
                children_max: config.cumulocity_children_max,
                shadow_limits,
                event_limits,
            },
        ))
    });
    let mqtt = Arc::new(MqttContext {
        cumulocity,
        broker: broker.clone(),
        bridge: bridge.clone(),
        users,
        throttle,
        acl,
        config: ConnectionConfig {
            allow_anonymous: config.allow_anonymous,
            connect_timeout: Duration::from_millis(config.mqtt_connect_timeout_ms),
            packet_bytes_max: config.mqtt_packet_bytes_max,
            outbound_queue_max: config.mqtt_outbound_queue_max,
            topic_alias_max: config.mqtt_topic_alias_max,
            client_id_bytes_max: config.mqtt_client_id_bytes_max,
            keep_alive_max_s: config.mqtt_keep_alive_max_s,
            inbound_inflight_max: config.mqtt_inbound_inflight_max,
            write_stall_max: Duration::from_millis(config.mqtt_write_stall_max_ms),
            subscribe_durable_wait: Duration::from_millis(config.mqtt_subscribe_durable_wait_ms),
            ws_path: config.mqtt_ws_path.clone(),
            ws_origins_allowed: config.mqtt_ws_origins_allowed.clone(),
        },
        listeners: mqtt_listener_stats.clone(),
    });

    let hangups = crate::tls::hangups();
    let [http_addr, https_addr, mqtt_addr, mqtts_addr, ws_addr, wss_addr] = listening;
    tracing::info!(
        http = %http_addr,
        https = %https_addr,
        mqtt = %mqtt_addr,
        mqtt_tls = %mqtts_addr,
        mqtt_ws = %ws_addr,
        mqtt_wss = %wss_addr,
        tls_client_auth = ?config.tls_client_auth,
        data_dir = %config.data_dir.display(),
        "listening"
    );
    // One shutdown signal, fanned out to both frontends.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    {
        // Also without TLS: a SIGHUP is then logged, not the end of the server.
        let tls = tls.clone();
        let interval = Duration::from_millis(config.tls_reload_check_interval_ms);
        node.spawn("TLS reload", move |stop| {
            crate::tls::watch(tls, hangups, interval, stop)
        });
    }
    mqtt::spawn_background(&mut node, &mqtt);
    mqtt::spawn_restart_disconnects(&mut node, broker.clone(), things.clone(), store.clone());
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mqtt_listeners = [
        (mqtt_plain, ListenerKind::Tcp),
        (mqtt_tls, ListenerKind::Tls),
        (mqtt_ws, ListenerKind::Ws),
        (mqtt_wss, ListenerKind::Wss),
    ]
    .into_iter()
    .filter_map(|(bound, kind)| {
        bound.map(|(socket, _)| mqtt::MqttListener {
            socket,
            kind,
            tls: matches!(kind, ListenerKind::Tls | ListenerKind::Wss)
                .then(|| tls.clone())
                .flatten(),
        })
    })
    .collect();
    let mqtt_task = tokio::spawn(mqtt::serve(
        mqtt_listeners,
        mqtt.clone(),
        config.mqtt_connections_max,
        stopped(stop_rx.clone()),
    ));
    let http_listeners = [(http_plain, None), (https, tls.clone())]
        .into_iter()
        .filter_map(|(bound, tls)| bound.map(|(socket, _)| HttpListener { socket, tls }))
        .collect();
    http::listener::serve(
        http_listeners,
        http::app(state),
        http::listener::ListenerConfig {
            connections_max: config.http_connections_max,
            header_read_timeout: Duration::from_millis(config.http_header_read_timeout_ms),
            keep_alive_idle: Duration::from_millis(config.http_keep_alive_idle_ms),
            body_read_timeout: Duration::from_millis(config.http_body_read_timeout_ms),
            write_stall: Duration::from_millis(config.http_write_stall_max_ms),
            drain_timeout: Duration::from_millis(config.shutdown_timeout_ms),
        },
        http_listener_stats,
        stopped(stop_rx),
    )
    .await;
    let _ = mqtt_task.await;

    tracing::info!("shutting down: passivating things, storing MQTT state and flushing");
    node.shutdown(Duration::from_millis(config.shutdown_timeout_ms))
        .await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Binds a listening socket.
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr, source })?;
    Ok((listener, local))
}

/// Loads the stored MQTT sessions and retained messages, each session only if its owner still
/// holds it: its user exists and is bound to the same Thing, and that Thing still holds the
/// client id (anonymous sessions only while anonymous clients are allowed, and never on a
/// Thing's client id); subscriptions only where the ACL still allows them.
fn restore_mqtt(
    persistence: &Persistence,
    users: &MqttUsers,
    acl: &Acl,
    allow_anonymous: bool,
) -> Result<(), ServeError> {
    // A read error must not count as "revoked": the session would be deleted for good. Start-up
    // fails instead, with the sessions still stored.
    let unreadable: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
    let owner_holds = |stored: &StoredSession| -> Option<Identity> {
        // The same rule as at CONNECT: a Thing's session needs the client id its Thing
        // reserves; anyone else's, a client id no Thing reserves.
        let reserved_by = match users.client_id_reserved_by(&stored.client_id) {
            Ok(owner) => owner,
            Err(e) => {
                unreadable.borrow_mut().get_or_insert(e.to_string());
                return None;
            }
        };
        let (thing, superuser) = match &stored.username {
            Some(username) => match users.rights(username) {
                Ok(Some(rights)) => (rights.thing_name, rights.superuser),
                Ok(None) => return None,
                Err(e) => {
                    unreadable.borrow_mut().get_or_insert(e.to_string());
                    return None;
                }
            },
            None if allow_anonymous => (None, false),
            None => return None,
        };
        if thing != stored.thing || reserved_by != thing {
            return None;
        }
        Some(Identity {
            client_id: stored.client_id.clone(),
            username: stored.username.clone(),
            thing,
            superuser,
            bootstrap: false,
        })
    };
    let allowed = |who: &Identity, filter: &str| acl.allows(who, Action::Subscribe, filter);
    let report = persistence.restore(&owner_holds, &allowed)?;
    if let Some(e) = unreadable.into_inner() {
        return Err(ServeError::MqttRestore(format!(
            "cannot read the users or the client-id index to verify them: {e}"
        )));
    }
    tracing::info!(
        sessions = report.sessions,
        retained = report.retained,
        expired = report.sessions_expired,
        revoked = report.sessions_revoked,
        over_bound = report.sessions_over_bound,
        messages_dropped = report.messages_dropped,
        subscriptions_dropped = report.subscriptions_dropped,
        retained_dropped = report.retained_dropped,
        unreadable = report.unreadable,
        "restored stored MQTT state"
    );
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}
