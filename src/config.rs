//! One `Config` for the server: defaults < TOML file (`--config`) < `THINGHUB_*` env < flags.
//!
//! clap resolves "flag, else env var" for each option; the TOML file sits under both. Every bound
//! is a named field with its unit in the name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tls::{ClientAuth, ClientIdentity};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The server's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory of the database.
    pub data_dir: PathBuf,
    /// HTTP listen address (management API, device ThingDatas API, health).
    pub http_listen: SocketAddr,
    /// MQTT listen address.
    pub mqtt_listen: SocketAddr,
    /// Serve plain MQTT on `mqtt_listen` (off: only the TLS or WebSocket listeners).
    pub mqtt_plain_enabled: bool,
    /// Serve plain HTTP on `http_listen` (off: only `http_tls_listen`).
    pub http_plain_enabled: bool,
    /// MQTT over TLS listen address (e.g. `0.0.0.0:8883`); unset: none.
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// HTTPS listen address (e.g. `0.0.0.0:8443`); unset: none.
    pub http_tls_listen: Option<SocketAddr>,
    /// MQTT over WebSocket listen address (e.g. `0.0.0.0:8083`); unset: none.
    pub mqtt_ws_listen: Option<SocketAddr>,
    /// MQTT over secure WebSocket listen address (e.g. `0.0.0.0:8084`); unset: none.
    pub mqtt_wss_listen: Option<SocketAddr>,
    /// The HTTP path of MQTT over WebSocket.
    pub mqtt_ws_path: String,
    /// Web origins (`https://console.example.com`) whose pages may have a browser's client
    /// certificate taken as a device's identity over WebSocket; from any other page (an upgrade
    /// with an `Origin` header) the certificate is ignored and the client must log in.
    pub mqtt_ws_origins_allowed: Vec<String>,
    /// The server certificate, PEM (the chain may follow it in the file).
    pub tls_cert_file: Option<PathBuf>,
    /// The server certificate's private key, PEM.
    pub tls_key_file: Option<PathBuf>,
    /// The CA (PEM) device client certificates must chain to.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Whether TLS clients must show a certificate: `none`, `optional` or `required`.
    pub tls_client_auth: ClientAuth,
    /// Where a client certificate names its Thing: `cn` (subject common name) or `san` (first
    /// DNS subject alternative name).
    pub tls_client_identity: ClientIdentity,
    /// Time a TLS handshake has to finish, milliseconds.
    pub tls_handshake_timeout_ms: u64,
    /// TLS handshakes in progress at once (all listeners); past it new sockets close at once.
    pub tls_handshakes_max: usize,
    /// How often the TLS files are checked for a change (then reloaded), milliseconds; SIGHUP
    /// reloads at once.
    pub tls_reload_check_interval_ms: u64,
    /// Device certificates one Thing may have registered (revoked ones count).
    pub thing_certificates_max: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `thinghub=debug`.
    pub log_filter: String,
    /// A Thing with no request for this long is passivated (its actor stopped).
    pub thing_idle_ms: u64,
    /// A snapshot is written after this many events since the last one.
    pub snapshot_every_events: u64,
    /// Registry shards (each a map and a supervisor actor).
    pub registry_shards: usize,
    /// How long a request waits for its Thing's answer before a 503.
    pub request_timeout_ms: u64,
    /// Requests one Thing may have in flight; more are refused with 429.
    pub thing_requests_in_flight_max: u32,
    /// Largest HTTP request body accepted.
    pub http_body_bytes_max: usize,
    /// Largest shadow state (desired + reported) after an update.
    pub shadow_state_bytes_max: usize,
    /// Deepest nesting inside desired/reported.
    pub shadow_depth_max: usize,
    /// Longest clientToken.
    pub client_token_bytes_max: usize,
    /// Largest device event `data`, bytes.
    pub event_data_bytes_max: usize,
    /// Largest page of a listing.
    pub list_limit_max: usize,
    /// Most lines one bulk registration (`POST /api/v1/things/bulk`) reads.
    pub bulk_lines_max: usize,
    /// Command TTL when the request names none, seconds.
    pub command_ttl_default_s: u64,
    /// Longest command TTL accepted, seconds (the shortest is 1).
    pub command_ttl_max_s: u64,
    /// Longest command `action`, bytes.
    pub command_action_bytes_max: usize,
    /// Largest command `params` and device `result` (compact JSON), bytes.
    pub command_params_bytes_max: usize,
    /// Command executions one Thing may have pending; more are refused with 429.
    pub command_pending_max: usize,
    /// Finished command executions kept in a Thing's state (all stay in its log).
    pub command_finished_kept_max: u32,
    /// Largest job document, bytes.
    pub job_document_bytes_max: usize,
    /// Largest job execution `statusDetails` from a device, bytes.
    pub job_status_details_bytes_max: usize,
    /// Job executions one Thing may have pending (queued or in progress).
    pub job_pending_max: usize,
    /// Finished job executions kept in a Thing's state (all stay in its log).
    pub job_finished_kept_max: u32,
    /// Most Things one job may target.
    pub job_targets_max: usize,
    /// Executions a job's rollout is queuing at once (fewer when its rate is lower).
    pub job_rollout_in_flight_max: usize,
    /// Most publishes in one `POST /api/v1/publish/bulk`.
    pub publish_bulk_max: usize,
    /// How often `/api/v1/stats` samples the counters for its rates, milliseconds.
    pub stats_sample_interval_ms: u64,
    /// Serve the operator console at `/console`.
    pub console_enabled: bool,
    /// Console sign-ins held at once (each in memory until it expires or signs out).
    pub console_sessions_max: usize,
    /// Console sign-ins of one API key held at once (its oldest ends past it).
    pub console_sessions_per_key_max: usize,
    /// How long a console sign-in lasts, milliseconds.
    pub console_session_ttl_ms: u64,
    /// Things whose deadlines are being fired at once by the deadline timer.
    pub deadline_fire_concurrency_max: usize,
    /// Longest sleep of the deadline timer between index scans, milliseconds.
    pub deadline_scan_interval_max_ms: u64,
    /// sled page cache.
    pub storage_cache_bytes: u64,
    /// Most appends made durable by one group commit.
    pub commit_batch_appends_max: usize,
    /// Appends one log epoch (one sled database under `log/`) takes before the next starts:
    /// bounds what opening the store replays.
    pub storage_epoch_appends_max: u64,
    /// Bytes of write-ahead records (`wal/`) after which the group commit writes the events
    /// held in memory into the log epochs as runs, flushes them and starts a new segment
    /// (a checkpoint): bounds that memory and what opening the store after a crash replays.
    pub storage_wal_bytes_max: u64,
    /// Bytes the events waiting in memory for a checkpoint may take (values plus a fixed
    /// overhead per event and per Thing). A group commit also starts a checkpoint once they
    /// hold half of this, and waits for a running one at three quarters; past all of it, as
    /// when checkpoints keep failing on a full disk, changes are refused (503) instead of
    /// filling the memory. At least twice `storage_wal_bytes_max`.
    pub storage_memtable_bytes_max: u64,
    /// How long graceful shutdown waits for Things to stop.
    pub shutdown_timeout_ms: u64,
    /// How often the effects cursor is saved and the MQTT sessions and retained messages are
    /// stored (what devices publish to each other is written behind by at most this much).
    pub effects_checkpoint_interval_ms: u64,
    /// Longest a persistent session's SUBACK waits for its subscriptions to be durable; past it
    /// the new ones are refused, milliseconds (0: never wait, so a persistent session can add
    /// none).
    pub mqtt_subscribe_durable_wait_ms: u64,
    /// Longest the stored "server alive at" mark may go unwritten while nothing else is stored,
    /// milliseconds: a persistent session connected when the server dies counts its expiry
    /// from that mark plus this interval, so it expires at most this much late, never early.
    pub mqtt_alive_mark_interval_ms: u64,
    /// How long a committed change's effects may stay undelivered (an actor that failed
    /// between its commit and its delivery) before its Thing is asked to deliver them again.
    pub effects_straggler_grace_ms: u64,
    /// How many times in a row the keeper asks a Thing to deliver its owed effects again when
    /// it fails (its log unreadable, say) before giving those effects up (logged and counted
    /// in `effects.abandoned`) so the cursor can move for everyone else. The wait between
    /// attempts doubles from `effects_checkpoint_interval_ms` up to 256 times it.
    pub effects_recover_attempts_max: u32,
    /// System topic prefix (`$emqx/things/...`).
    pub topic_prefix: String,
    /// Accept MQTT clients without credentials (development only).
    pub allow_anonymous: bool,
    /// AWS IoT compatible mode: Things also answer on `$aws/things/{name}/shadow/...`.
    pub aws_compat: bool,
    /// Serve Cumulocity's `s/...` topics (SmartREST static templates) on the MQTT port.
    pub cumulocity: bool,
    /// The Cumulocity tenant: a username may carry it as `{tenant}/{user}` (another tenant is
    /// refused).
    pub cumulocity_tenant: String,
    /// Children (101) one Cumulocity device may create.
    pub cumulocity_children_max: usize,
    /// The Cumulocity bootstrap user's name: devices connect with it to ask for their
    /// credentials (`s/ucr`), and it can do nothing else. Unset: no bootstrap.
    pub cumulocity_bootstrap_username: Option<String>,
    /// The bootstrap user's password (hashed at start-up).
    pub cumulocity_bootstrap_password: Option<String>,
    /// Most device registrations stored at once.
    pub cumulocity_registrations_max: usize,
    /// Most simultaneous connections of the bootstrap user (devices asking for credentials);
    /// beyond: CONNACK quota exceeded.
    pub cumulocity_bootstrap_connections_max: usize,
    /// Most simultaneous MQTT connections (beyond: CONNACK "server busy").
    pub mqtt_connections_max: usize,
    /// Largest MQTT packet accepted, bytes.
    pub mqtt_packet_bytes_max: usize,
    /// Outbound QoS 1/2 messages in flight per session (a v5 client's receive maximum can lower it).
    pub mqtt_inflight_max: usize,
    /// Messages queued per session (offline or beyond the window); the oldest is dropped past it.
    pub mqtt_session_queue_max: usize,
    /// Longest a disconnected persistent session is kept, seconds.
    pub mqtt_session_expiry_max_s: u64,
    /// Most retained messages.
    pub mqtt_retained_max: usize,
    /// Time a new connection has to send CONNECT.
    pub mqtt_connect_timeout_ms: u64,
    /// Outbound packets buffered per connection before it counts as a slow consumer.
    pub mqtt_outbound_queue_max: usize,
    /// Topic aliases a v5 client may use.
    pub mqtt_topic_alias_max: u16,
    /// Longest MQTT client id, bytes.
    pub mqtt_client_id_bytes_max: usize,
    /// Longest MQTT keep-alive accepted, seconds (0 = the client's choice); v5 clients asking
    /// for more, or for none, are told this value (server keep-alive).
    pub mqtt_keep_alive_max_s: u16,
    /// MQTT sessions (connected or persistent) in total; a CONNECT that needs a new one past it
    /// is refused (3.1.1: server unavailable, v5: quota exceeded).
    pub mqtt_sessions_max: usize,
    /// Bytes (topic + payload) queued or in flight per MQTT session; the oldest is dropped past it.
    pub mqtt_session_queue_bytes_max: usize,
    /// Bytes queued or in flight over all MQTT sessions; the receiving session's oldest message
    /// is dropped past it.
    pub mqtt_queued_bytes_max: usize,
    /// Bytes (topic + payload) of retained messages; a retained publish past it is refused
    /// (v5: PUBACK 0x97).
    pub mqtt_retained_bytes_max: usize,
    /// QoS 1/2 publishes a v5 client may have unacknowledged (its Receive Maximum); more closes
    /// the connection (0x93).
    pub mqtt_inbound_inflight_max: u16,
    /// A write to an MQTT client that makes no progress for this long closes the connection as
    /// a slow consumer, milliseconds.
    pub mqtt_write_stall_max_ms: u64,
    /// Bytes (topic + payload) handed to one MQTT connection and not yet written; past it the
    /// connection is closed as a slow consumer.
    pub mqtt_outbound_bytes_max: usize,
    /// Sessions one plain user may own (a Thing's user has one client id; superusers are
    /// trusted backends and not counted); a CONNECT needing one more is refused (3.1.1: server
    /// unavailable, v5: quota exceeded).
    pub mqtt_user_sessions_max: usize,
    /// Subscriptions one session may hold (MQTT SUBSCRIBE and operator proxy subscriptions
    /// alike), so one client cannot grow the broker's memory without bound; one more is
    /// refused (3.1.1: 0x80, v5: quota exceeded, HTTP: 409).
    pub mqtt_session_subscriptions_max: usize,
    /// Longest one webhook delivery request may take, milliseconds.
    pub webhook_request_timeout_ms: u64,
    /// First delay before a failed webhook delivery is retried, milliseconds (doubles per
    /// failure, with jitter).
    pub webhook_retry_base_ms: u64,
    /// Longest delay between webhook delivery retries, milliseconds.
    pub webhook_retry_max_ms: u64,
    /// Most records in one webhook POST (a webhook's batchMax is at most this).
    pub webhook_batch_max: usize,
    /// Failed batches kept per webhook; the oldest is dropped past it.
    pub webhook_dead_letters_max: usize,
    /// Webhooks in all.
    pub webhooks_max: usize,
    /// Bytes of broker events (subscriptions, messages) waiting for one webhook in memory;
    /// past it new ones are dropped and counted.
    pub webhook_broker_queue_bytes_max: usize,
    /// Offline alarm rules in all.
    pub alarm_rules_max: usize,
    /// Alarm index entries one page of `GET /api/v1/alarms` reads (bounds a filtered listing).
    pub alarm_list_scan_max: usize,
    /// Failed authentications per source address or username before backoff starts.
    pub auth_failures_free: u32,
    /// The first backoff after the free failures, milliseconds (it doubles per failure).
    pub auth_backoff_base_ms: u64,
    /// The longest backoff, milliseconds.
    pub auth_backoff_max_ms: u64,
    /// Source addresses and usernames the authentication throttle tracks at once.
    pub auth_throttle_entries_max: usize,
    /// Simultaneous HTTP connections; past it a client gets 503 and the socket closes.
    pub http_connections_max: usize,
    /// Time a request's headers have to arrive, counted from when the connection is ready for
    /// a request (just accepted, or after the previous response), milliseconds.
    pub http_header_read_timeout_ms: u64,
    /// An HTTP keep-alive connection with no request for this long is closed, milliseconds
    /// (at most `http_header_read_timeout_ms`, which also bounds an idle connection).
    pub http_keep_alive_idle_ms: u64,
    /// Time a request body has to arrive once its headers did, milliseconds (408 beyond); for
    /// the streamed bulk registration, the longest the body may pause or its reader stop.
    pub http_body_read_timeout_ms: u64,
    /// A write of a response that makes no progress for this long closes the connection,
    /// milliseconds.
    pub http_write_stall_max_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            mqtt_listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            mqtt_plain_enabled: true,
            http_plain_enabled: true,
            mqtt_tls_listen: None,
            http_tls_listen: None,
            mqtt_ws_listen: None,
            mqtt_wss_listen: None,
            mqtt_ws_path: "/mqtt".into(),
            mqtt_ws_origins_allowed: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            tls_client_auth: ClientAuth::None,
            tls_client_identity: ClientIdentity::Cn,
            tls_handshake_timeout_ms: 10_000,
            tls_handshakes_max: 1024,
            tls_reload_check_interval_ms: 5_000,
            thing_certificates_max: crate::users::THING_CERTIFICATES_MAX_DEFAULT,
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            thing_idle_ms: 60_000,
            snapshot_every_events: 500,
            registry_shards: 64,
            request_timeout_ms: 10_000,
            thing_requests_in_flight_max: 10,
            http_body_bytes_max: 64 * 1024,
            shadow_state_bytes_max: 8 * 1024,
            shadow_depth_max: 6,
            client_token_bytes_max: 64,
            event_data_bytes_max: 4 * 1024,
            list_limit_max: 1000,
            bulk_lines_max: 1_000_000,
            command_ttl_default_s: 60,
            command_ttl_max_s: 7 * 24 * 3600,
            command_action_bytes_max: 128,
            command_params_bytes_max: 8 * 1024,
            command_pending_max: 100,
            command_finished_kept_max: 100,
            job_document_bytes_max: 32 * 1024,
            job_status_details_bytes_max: 4 * 1024,
            job_pending_max: 50,
            job_finished_kept_max: 50,
            job_targets_max: 100_000,
            job_rollout_in_flight_max: 64,
            publish_bulk_max: 100,
            stats_sample_interval_ms: 5_000,
            console_enabled: true,
            console_sessions_max: 1024,
            console_sessions_per_key_max: 16,
            console_session_ttl_ms: 8 * 60 * 60 * 1000,
            deadline_fire_concurrency_max: 512,
            deadline_scan_interval_max_ms: 1_000,
            storage_cache_bytes: 64 * 1024 * 1024,
            commit_batch_appends_max: 4096,
            storage_epoch_appends_max: 2_000_000,
            storage_wal_bytes_max: 16 * 1024 * 1024,
            storage_memtable_bytes_max: 64 * 1024 * 1024,
            shutdown_timeout_ms: 10_000,
            effects_checkpoint_interval_ms: 200,
            effects_straggler_grace_ms: 10_000,
            effects_recover_attempts_max: 20,
            mqtt_subscribe_durable_wait_ms: 10_000,
            mqtt_alive_mark_interval_ms: 10_000,
            topic_prefix: "$emqx".into(),
            allow_anonymous: false,
            aws_compat: false,
            cumulocity: false,
            cumulocity_tenant: "thinghub".into(),
            cumulocity_children_max: 1000,
            cumulocity_bootstrap_username: None,
            cumulocity_bootstrap_password: None,
            cumulocity_registrations_max: 10_000,
            cumulocity_bootstrap_connections_max: 1000,
            mqtt_connections_max: 100_000,
            mqtt_packet_bytes_max: 256 * 1024,
            mqtt_inflight_max: 32,
            mqtt_session_queue_max: 1000,
            mqtt_session_expiry_max_s: 2 * 3600,
            mqtt_retained_max: 100_000,
            mqtt_connect_timeout_ms: 10_000,
            mqtt_outbound_queue_max: 1024,
            mqtt_topic_alias_max: 16,
            mqtt_client_id_bytes_max: 256,
            mqtt_keep_alive_max_s: 0,
            mqtt_sessions_max: 1_000_000,
            mqtt_session_queue_bytes_max: 4 * 1024 * 1024,
            mqtt_queued_bytes_max: 1024 * 1024 * 1024,
            mqtt_retained_bytes_max: 64 * 1024 * 1024,
            mqtt_inbound_inflight_max: 32,
            mqtt_write_stall_max_ms: 30_000,
            mqtt_outbound_bytes_max: 8 * 1024 * 1024,
            mqtt_user_sessions_max: 1000,
            mqtt_session_subscriptions_max: 1000,
            webhook_request_timeout_ms: 10_000,
            webhook_retry_base_ms: 500,
            webhook_retry_max_ms: 60_000,
            webhook_batch_max: 1000,
            webhook_dead_letters_max: 100,
            webhooks_max: 100,
            webhook_broker_queue_bytes_max: 16 * 1024 * 1024,
            alarm_rules_max: 100,
            alarm_list_scan_max: 10_000,
            auth_failures_free: 5,
            auth_backoff_base_ms: 200,
            auth_backoff_max_ms: 30_000,
            auth_throttle_entries_max: 100_000,
            http_connections_max: 10_000,
            http_header_read_timeout_ms: 10_000,
            http_keep_alive_idle_ms: 10_000,
            http_body_read_timeout_ms: 30_000,
            http_write_stall_max_ms: 30_000,
        }
    }
}

/// Options of `thinghub serve` (each flag also reads `THINGHUB_<NAME>`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "THINGHUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Database directory [default: ./data].
    #[arg(long, env = "THINGHUB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "THINGHUB_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// MQTT listen address [default: 0.0.0.0:1883].
    #[arg(long, env = "THINGHUB_MQTT_LISTEN")]
    pub mqtt_listen: Option<SocketAddr>,
    /// Serve plain MQTT on --mqtt-listen [default: true].
    #[arg(long, env = "THINGHUB_MQTT_PLAIN_ENABLED")]
    pub mqtt_plain_enabled: Option<bool>,
    /// Serve plain HTTP on --http-listen [default: true].
    #[arg(long, env = "THINGHUB_HTTP_PLAIN_ENABLED")]
    pub http_plain_enabled: Option<bool>,
    /// MQTT over TLS listen address, e.g. 0.0.0.0:8883 [default: none].
    #[arg(long, env = "THINGHUB_MQTT_TLS_LISTEN")]
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// HTTPS listen address, e.g. 0.0.0.0:8443 [default: none].
    #[arg(long, env = "THINGHUB_HTTP_TLS_LISTEN")]
    pub http_tls_listen: Option<SocketAddr>,
    /// MQTT over WebSocket listen address, e.g. 0.0.0.0:8083 [default: none].
    #[arg(long, env = "THINGHUB_MQTT_WS_LISTEN")]
    pub mqtt_ws_listen: Option<SocketAddr>,
    /// MQTT over secure WebSocket listen address, e.g. 0.0.0.0:8084 [default: none].
    #[arg(long, env = "THINGHUB_MQTT_WSS_LISTEN")]
    pub mqtt_wss_listen: Option<SocketAddr>,
    /// Server certificate, PEM [default: none].
    #[arg(long, env = "THINGHUB_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// Server private key, PEM [default: none].
    #[arg(long, env = "THINGHUB_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// CA device certificates chain to, PEM [default: none].
    #[arg(long, env = "THINGHUB_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Client certificates: none, optional or required [default: none].
    #[arg(long, env = "THINGHUB_TLS_CLIENT_AUTH")]
    pub tls_client_auth: Option<ClientAuth>,
    /// Where a client certificate names its Thing: cn or san [default: cn].
    #[arg(long, env = "THINGHUB_TLS_CLIENT_IDENTITY")]
    pub tls_client_identity: Option<ClientIdentity>,
    /// Log format [default: text].
    #[arg(long, env = "THINGHUB_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter [default: info].
    #[arg(long, env = "THINGHUB_LOG_FILTER")]
    pub log_filter: Option<String>,
    /// Passivate a Thing after this many idle milliseconds [default: 60000].
    #[arg(long, env = "THINGHUB_THING_IDLE_MS")]
    pub thing_idle_ms: Option<u64>,
    /// Snapshot every N events [default: 500].
    #[arg(long, env = "THINGHUB_SNAPSHOT_EVERY_EVENTS")]
    pub snapshot_every_events: Option<u64>,
    /// Request timeout in milliseconds [default: 10000].
    #[arg(long, env = "THINGHUB_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Largest HTTP body in bytes [default: 65536].
    #[arg(long, env = "THINGHUB_HTTP_BODY_BYTES_MAX")]
    pub http_body_bytes_max: Option<usize>,
    /// Accept MQTT clients without credentials (development only; logged loudly).
    #[arg(long, env = "THINGHUB_ALLOW_ANONYMOUS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_anonymous: Option<bool>,
    /// AWS IoT compatible mode: also serve `$aws/things/{name}/shadow/...`.
    #[arg(long, env = "THINGHUB_AWS_COMPAT", num_args = 0..=1, default_missing_value = "true")]
    pub aws_compat: Option<bool>,
    /// Serve Cumulocity's `s/...` topics (SmartREST) on the MQTT port [default: false].
    #[arg(long, env = "THINGHUB_CUMULOCITY", num_args = 0..=1, default_missing_value = "true")]
    pub cumulocity: Option<bool>,
    /// The Cumulocity tenant usernames may be prefixed with (`{tenant}/{user}`) [default: thinghub].
    #[arg(long, env = "THINGHUB_CUMULOCITY_TENANT")]
    pub cumulocity_tenant: Option<String>,
    /// The Cumulocity bootstrap user's name (devices ask for credentials with it) [default: none].
    #[arg(long, env = "THINGHUB_CUMULOCITY_BOOTSTRAP_USERNAME")]
    pub cumulocity_bootstrap_username: Option<String>,
    /// The bootstrap user's password (prefer the environment variable to the flag).
    #[arg(
        long,
        env = "THINGHUB_CUMULOCITY_BOOTSTRAP_PASSWORD",
        hide_env_values = true
    )]
    pub cumulocity_bootstrap_password: Option<String>,
    /// System topic prefix [default: $emqx].
    #[arg(long, env = "THINGHUB_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
    /// Most simultaneous MQTT connections [default: 100000].
    #[arg(long, env = "THINGHUB_MQTT_CONNECTIONS_MAX")]
    pub mqtt_connections_max: Option<usize>,
}

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for `Config`.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Builds the configuration from the file (if any) and the flags/env.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let mut config = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if args.cumulocity_bootstrap_username.is_some() {
            config.cumulocity_bootstrap_username = args.cumulocity_bootstrap_username.clone();
        }
        if args.cumulocity_bootstrap_password.is_some() {
            config.cumulocity_bootstrap_password = args.cumulocity_bootstrap_password.clone();
        }
        macro_rules! overlay {
            ($($field:ident),*) => {$(
                if let Some(value) = &args.$field {
                    config.$field = value.clone();
                }
            )*};
        }
        macro_rules! overlay_some {
            ($($field:ident),*) => {$(
                if let Some(value) = &args.$field {
                    config.$field = Some(value.clone());
                }
            )*};
        }
        overlay_some!(
            mqtt_tls_listen,
            http_tls_listen,
            mqtt_ws_listen,
            mqtt_wss_listen,
            tls_cert_file,
            tls_key_file,
            tls_client_ca_file
        );
        overlay!(
            data_dir,
            http_listen,
            mqtt_listen,
            mqtt_plain_enabled,
            http_plain_enabled,
            tls_client_auth,
            tls_client_identity,
            log_format,
            log_filter,
            thing_idle_ms,
            snapshot_every_events,
            request_timeout_ms,
            http_body_bytes_max,
            allow_anonymous,
            aws_compat,
            cumulocity,
            cumulocity_tenant,
            topic_prefix,
            mqtt_connections_max
        );
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("thing_idle_ms", self.thing_idle_ms),
            ("snapshot_every_events", self.snapshot_every_events),
            ("request_timeout_ms", self.request_timeout_ms),
            (
                "thing_requests_in_flight_max",
                u64::from(self.thing_requests_in_flight_max),
            ),
            ("registry_shards", self.registry_shards as u64),
            ("http_body_bytes_max", self.http_body_bytes_max as u64),
            ("shadow_state_bytes_max", self.shadow_state_bytes_max as u64),
            ("shadow_depth_max", self.shadow_depth_max as u64),
            ("list_limit_max", self.list_limit_max as u64),
            ("bulk_lines_max", self.bulk_lines_max as u64),
            ("event_data_bytes_max", self.event_data_bytes_max as u64),
            ("command_ttl_default_s", self.command_ttl_default_s),
            ("command_ttl_max_s", self.command_ttl_max_s),
            (
                "command_action_bytes_max",
                self.command_action_bytes_max as u64,
            ),
            (
                "command_params_bytes_max",
                self.command_params_bytes_max as u64,
            ),
            ("command_pending_max", self.command_pending_max as u64),
            (
                "command_finished_kept_max",
                u64::from(self.command_finished_kept_max),
            ),
            ("job_document_bytes_max", self.job_document_bytes_max as u64),
            (
                "job_status_details_bytes_max",
                self.job_status_details_bytes_max as u64,
            ),
            ("job_pending_max", self.job_pending_max as u64),
            ("job_targets_max", self.job_targets_max as u64),
            (
                "job_rollout_in_flight_max",
                self.job_rollout_in_flight_max as u64,
            ),
            ("publish_bulk_max", self.publish_bulk_max as u64),
            ("stats_sample_interval_ms", self.stats_sample_interval_ms),
            ("console_sessions_max", self.console_sessions_max as u64),
            (
                "console_sessions_per_key_max",
                self.console_sessions_per_key_max as u64,
            ),
            ("console_session_ttl_ms", self.console_session_ttl_ms),
            (
                "deadline_fire_concurrency_max",
                self.deadline_fire_concurrency_max as u64,
            ),
            (
                "deadline_scan_interval_max_ms",
                self.deadline_scan_interval_max_ms,
            ),
            (
                "commit_batch_appends_max",
                self.commit_batch_appends_max as u64,
            ),
            ("storage_epoch_appends_max", self.storage_epoch_appends_max),
            ("storage_wal_bytes_max", self.storage_wal_bytes_max),
            (
                "storage_memtable_bytes_max",
                self.storage_memtable_bytes_max,
            ),
            (
                "effects_checkpoint_interval_ms",
                self.effects_checkpoint_interval_ms,
            ),
            (
                "effects_straggler_grace_ms",
                self.effects_straggler_grace_ms,
            ),
            (
                "mqtt_alive_mark_interval_ms",
                self.mqtt_alive_mark_interval_ms,
            ),
            (
                "effects_recover_attempts_max",
                u64::from(self.effects_recover_attempts_max),
            ),
            ("mqtt_connections_max", self.mqtt_connections_max as u64),
            ("mqtt_packet_bytes_max", self.mqtt_packet_bytes_max as u64),
            ("mqtt_inflight_max", self.mqtt_inflight_max as u64),
            ("mqtt_session_queue_max", self.mqtt_session_queue_max as u64),
            (
                "mqtt_outbound_queue_max",
                self.mqtt_outbound_queue_max as u64,
            ),
            (
                "mqtt_client_id_bytes_max",
                self.mqtt_client_id_bytes_max as u64,
            ),
            ("mqtt_sessions_max", self.mqtt_sessions_max as u64),
            (
                "mqtt_session_queue_bytes_max",
                self.mqtt_session_queue_bytes_max as u64,
            ),
            ("mqtt_queued_bytes_max", self.mqtt_queued_bytes_max as u64),
            (
                "mqtt_retained_bytes_max",
                self.mqtt_retained_bytes_max as u64,
            ),
            (
                "mqtt_inbound_inflight_max",
                u64::from(self.mqtt_inbound_inflight_max),
            ),
            ("mqtt_write_stall_max_ms", self.mqtt_write_stall_max_ms),
            (
                "mqtt_outbound_bytes_max",
                self.mqtt_outbound_bytes_max as u64,
            ),
            ("mqtt_user_sessions_max", self.mqtt_user_sessions_max as u64),
            (
                "mqtt_session_subscriptions_max",
                self.mqtt_session_subscriptions_max as u64,
            ),
            (
                "webhook_request_timeout_ms",
                self.webhook_request_timeout_ms,
            ),
            ("webhook_retry_base_ms", self.webhook_retry_base_ms),
            ("webhook_retry_max_ms", self.webhook_retry_max_ms),
            ("webhook_batch_max", self.webhook_batch_max as u64),
            (
                "webhook_dead_letters_max",
                self.webhook_dead_letters_max as u64,
            ),
            ("webhooks_max", self.webhooks_max as u64),
            (
                "cumulocity_children_max",
                self.cumulocity_children_max as u64,
            ),
            (
                "cumulocity_registrations_max",
                self.cumulocity_registrations_max as u64,
            ),
            (
                "cumulocity_bootstrap_connections_max",
                self.cumulocity_bootstrap_connections_max as u64,
            ),
            (
                "webhook_broker_queue_bytes_max",
                self.webhook_broker_queue_bytes_max as u64,
            ),
            ("alarm_rules_max", self.alarm_rules_max as u64),
            ("alarm_list_scan_max", self.alarm_list_scan_max as u64),
            ("auth_backoff_base_ms", self.auth_backoff_base_ms),
            ("auth_backoff_max_ms", self.auth_backoff_max_ms),
            (
                "auth_throttle_entries_max",
                self.auth_throttle_entries_max as u64,
            ),
            ("http_connections_max", self.http_connections_max as u64),
            (
                "http_header_read_timeout_ms",
                self.http_header_read_timeout_ms,
            ),
            ("http_keep_alive_idle_ms", self.http_keep_alive_idle_ms),
            ("http_body_read_timeout_ms", self.http_body_read_timeout_ms),
            ("http_write_stall_max_ms", self.http_write_stall_max_ms),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            ("tls_handshakes_max", self.tls_handshakes_max as u64),
            (
                "tls_reload_check_interval_ms",
                self.tls_reload_check_interval_ms,
            ),
            ("thing_certificates_max", self.thing_certificates_max as u64),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be greater than 0"
                )));
            }
        }
        if self.command_ttl_default_s > self.command_ttl_max_s {
            return Err(ConfigError::Invalid(format!(
                "command_ttl_default_s ({}) must not exceed command_ttl_max_s ({})",
                self.command_ttl_default_s, self.command_ttl_max_s
            )));
        }
        if self.http_keep_alive_idle_ms > self.http_header_read_timeout_ms {
            return Err(ConfigError::Invalid(format!(
                "http_keep_alive_idle_ms ({}) must not exceed http_header_read_timeout_ms ({}): \
                 an idle connection is also waiting for a request's headers",
                self.http_keep_alive_idle_ms, self.http_header_read_timeout_ms
            )));
        }
        if self.storage_memtable_bytes_max < self.storage_wal_bytes_max.saturating_mul(2) {
            return Err(ConfigError::Invalid(format!(
                "storage_memtable_bytes_max ({}) must be at least twice storage_wal_bytes_max \
                 ({}): the events of a checkpoint being written and of the next one are held \
                 in memory together",
                self.storage_memtable_bytes_max, self.storage_wal_bytes_max
            )));
        }
        if self.console_session_ttl_ms < 1000 {
            return Err(ConfigError::Invalid(format!(
                "console_session_ttl_ms ({}) must be at least 1000: the cookie's lifetime is whole seconds",
                self.console_session_ttl_ms
            )));
        }
        if self.auth_backoff_base_ms > self.auth_backoff_max_ms {
            return Err(ConfigError::Invalid(format!(
                "auth_backoff_base_ms ({}) must not exceed auth_backoff_max_ms ({})",
                self.auth_backoff_base_ms, self.auth_backoff_max_ms
            )));
        }
        let tenant = &self.cumulocity_tenant;
        if tenant.is_empty()
            || tenant.len() > 64
            || !tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::Invalid(format!(
                "cumulocity_tenant '{tenant}' must be 1..=64 characters of [a-zA-Z0-9_-]"
            )));
        }
        if self.cumulocity_bootstrap_username.is_some()
            != self.cumulocity_bootstrap_password.is_some()
        {
            return Err(ConfigError::Invalid(
                "cumulocity_bootstrap_username and cumulocity_bootstrap_password go together: set both or neither"
                    .into(),
            ));
        }
        self.validate_transports()?;
        let prefix = &self.topic_prefix;
        if !prefix.starts_with('$') || prefix.len() < 2 || prefix.contains(['+', '#', '/']) {
            return Err(ConfigError::Invalid(format!(
                "topic_prefix '{prefix}' must be one topic level starting with $, without wildcards"
            )));
        }
        Ok(())
    }

    /// Whether any listener needs the TLS files.
    pub fn tls_needed(&self) -> bool {
        self.mqtt_tls_listen.is_some()
            || self.http_tls_listen.is_some()
            || self.mqtt_wss_listen.is_some()
    }

    fn validate_transports(&self) -> Result<(), ConfigError> {
        let invalid = |message: &str| Err(ConfigError::Invalid(message.into()));
        if self.tls_needed() && (self.tls_cert_file.is_none() || self.tls_key_file.is_none()) {
            return invalid(
                "mqtt_tls_listen, http_tls_listen and mqtt_wss_listen need tls_cert_file and tls_key_file \
                 (`thinghub certs init` writes a local set to try)",
            );
        }
        if self.tls_client_auth != ClientAuth::None && self.tls_client_ca_file.is_none() {
            return invalid(
                "tls_client_auth = optional or required needs tls_client_ca_file (the CA device certificates chain to)",
            );
        }
        let other_mqtt = self.mqtt_tls_listen.is_some()
            || self.mqtt_ws_listen.is_some()
            || self.mqtt_wss_listen.is_some();
        if !self.mqtt_plain_enabled && !other_mqtt {
            return invalid(
                "mqtt_plain_enabled = false leaves no MQTT listener: set mqtt_tls_listen, mqtt_ws_listen or mqtt_wss_listen",
            );
        }
        if !self.http_plain_enabled && self.http_tls_listen.is_none() {
            return invalid(
                "http_plain_enabled = false leaves no HTTP listener: set http_tls_listen",
            );
        }
        if !self.mqtt_ws_path.starts_with('/') || self.mqtt_ws_path.contains(['?', '#']) {
            return Err(ConfigError::Invalid(format!(
                "mqtt_ws_path '{}' must be a path starting with /",
                self.mqtt_ws_path
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("thinghub.toml");
        std::fs::write(
            &path,
            "data_dir = \"/from/file\"\nthing_idle_ms = 5\nhttp_listen = \"127.0.0.1:9000\"\n",
        )
        .expect("write");
        let args = ServeArgs {
            config: Some(path),
            thing_idle_ms: Some(7),
            ..ServeArgs::default()
        };
        let config = Config::load(&args).expect("load");
        assert_eq!(config.data_dir, PathBuf::from("/from/file"));
        assert_eq!(config.thing_idle_ms, 7, "flag/env beats file");
        assert_eq!(config.http_listen, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(config.snapshot_every_events, 500, "default kept");
    }

    #[test]
    fn unknown_keys_and_zero_bounds_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "thing_idle = 5\n").expect("write");
        let err = Config::from_file(&path).expect_err("unknown key");
        assert!(err.to_string().contains("thing_idle"), "{err}");
        let args = ServeArgs {
            snapshot_every_events: Some(0),
            ..ServeArgs::default()
        };
        assert!(Config::load(&args).is_err());
    }

    #[test]
    fn the_memory_bound_of_the_log_must_hold_two_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("thinghub.toml");
        let write = |memtable: u64| {
            std::fs::write(
                &path,
                format!("storage_wal_bytes_max = 1000\nstorage_memtable_bytes_max = {memtable}\n"),
            )
            .expect("write");
            Config::load(&ServeArgs {
                config: Some(path.clone()),
                ..ServeArgs::default()
            })
        };
        let err = write(1999).expect_err("under twice the checkpoint size");
        assert!(
            err.to_string()
                .contains("storage_memtable_bytes_max (1999)"),
            "{err}"
        );
        assert_eq!(write(2000).expect("load").storage_memtable_bytes_max, 2000);
    }

    #[test]
    fn tls_listeners_need_their_files_and_a_server_needs_a_listener() {
        let tls = ServeArgs {
            mqtt_tls_listen: Some("127.0.0.1:8883".parse().expect("addr")),
            ..ServeArgs::default()
        };
        let err = Config::load(&tls).expect_err("no files");
        assert!(err.to_string().contains("tls_cert_file"), "{err}");
        let client_auth = ServeArgs {
            tls_client_auth: Some(ClientAuth::Required),
            ..ServeArgs::default()
        };
        let err = Config::load(&client_auth).expect_err("no CA");
        assert!(err.to_string().contains("tls_client_ca_file"), "{err}");
        let no_mqtt = ServeArgs {
            mqtt_plain_enabled: Some(false),
            ..ServeArgs::default()
        };
        let err = Config::load(&no_mqtt).expect_err("no MQTT listener");
        assert!(err.to_string().contains("no MQTT listener"), "{err}");
        let files = ServeArgs {
            mqtt_tls_listen: Some("127.0.0.1:8883".parse().expect("addr")),
            tls_cert_file: Some("server.pem".into()),
            tls_key_file: Some("server.key".into()),
            mqtt_plain_enabled: Some(false),
            ..ServeArgs::default()
        };
        let config = Config::load(&files).expect("TLS only");
        assert!(!config.mqtt_plain_enabled && config.tls_needed());
    }
}
