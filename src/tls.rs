//! TLS for every listener that asks for it (MQTT on 8883, HTTPS, MQTT over secure WebSocket):
//! the certificate files, client-certificate verification, reload on SIGHUP or file change, and
//! the handshake's bounds. Transport-neutral: `src/mqtt` and `src/http` hand it accepted
//! sockets and get back a TLS stream and, when the client showed one, its verified certificate.
//!
//! - rustls only (TLS 1.2 and 1.3, the ring provider), no OpenSSL.
//! - A handshake has `handshake_timeout` to finish, and at most `handshakes_max` run at once
//!   on the device listeners and as many on HTTPS (past it a new socket is closed at once), so
//!   a flood of slow or half-open handshakes cannot starve established connections, nor lock
//!   operators out of HTTPS.
//! - [`Tls::reload`] reads the files again and swaps the configuration in for new handshakes;
//!   established connections keep theirs. A file that fails to load keeps the previous
//!   configuration (logged); at start-up it fails the start with a message naming the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Whether TLS clients must show a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Clients are not asked for a certificate.
    #[default]
    None,
    /// A client may show a certificate (verified against `tls_client_ca_file`); one that does
    /// not logs in with a username and password.
    Optional,
    /// Every TLS client must show a certificate the client CA signed.
    Required,
}

/// Where a client certificate names its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientIdentity {
    /// The subject's common name.
    #[default]
    Cn,
    /// The first DNS name among the subject alternative names.
    San,
}

/// The files and bounds TLS is built from.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The server certificate (PEM; the chain after it).
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The CA client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
    /// Whether clients must show one.
    pub client_auth: ClientAuth,
    /// Where a client certificate names its device.
    pub client_identity: ClientIdentity,
    /// Time a handshake has to finish.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once, on the device listeners (MQTT over TLS, secure
    /// WebSocket) together, and apart from them on HTTPS.
    pub handshakes_max: usize,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds nothing usable.
    #[error("TLS file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The files do not make a configuration (a key that does not match the certificate...).
    #[error("TLS configuration from {cert} and {key}: {message}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        message: String,
    },
}

/// A client certificate rustls verified against the client CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// SHA-256 of the certificate's DER, lower-case hex (what operators register).
    pub fingerprint: String,
    /// The device name it carries (CN or SAN, per `tls_client_identity`), if it has one.
    pub name: Option<String>,
}

/// Handshakes by outcome (metrics).
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes that did not finish within the timeout.
    pub failed_timeout: AtomicU64,
    /// Sockets closed at once because `tls_handshakes_max` were in progress.
    pub failed_busy: AtomicU64,
    /// The client's certificate was refused (unknown CA, expired, not for client auth...).
    pub failed_bad_certificate: AtomicU64,
    /// `tls_client_auth = required` and the client showed no certificate.
    pub failed_no_certificate: AtomicU64,
    /// The client ended the handshake with an alert (it refused our certificate, say).
    pub failed_alert: AtomicU64,
    /// Not TLS, no common version or cipher suite, or the socket closed mid-handshake.
    pub failed_protocol: AtomicU64,
    /// Successful reloads of the files (SIGHUP or a change seen).
    pub reloads: AtomicU64,
    /// Reloads that failed (the previous configuration stays).
    pub reload_failures: AtomicU64,
}

impl TlsStats {
    /// `(reason, count)` of every failed-handshake reason (the metric's label values).
    pub fn failures(&self) -> [(&'static str, u64); 6] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("timeout", load(&self.failed_timeout)),
            ("busy", load(&self.failed_busy)),
            ("bad_certificate", load(&self.failed_bad_certificate)),
            ("no_certificate", load(&self.failed_no_certificate)),
            ("alert", load(&self.failed_alert)),
            ("protocol", load(&self.failed_protocol)),
        ]
    }
}

/// Why one handshake failed (already counted and logged at debug).
#[derive(Debug)]
pub struct HandshakeFailed;

/// File modification times the watcher compares against.
type Stamps = Vec<Option<SystemTime>>;

/// Whom a listener asks for a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// Devices (MQTT): as `tls_client_auth` says.
    Devices,
    /// Operators and devices with API keys (HTTPS): never asked, so `required` cannot lock an
    /// operator out; offers HTTP/1.1 by ALPN.
    ApiClients,
}

/// The configurations handshakes are made with, swapped whole on reload.
struct Configs {
    devices: Arc<ServerConfig>,
    api_clients: Arc<ServerConfig>,
}

/// TLS for the server's listeners.
pub struct Tls {
    settings: TlsSettings,
    current: RwLock<Arc<Configs>>,
    stamps: Mutex<Stamps>,
    /// Handshakes in progress, devices' and API clients' apart: a flood on the device port
    /// cannot lock operators out of HTTPS.
    device_handshakes: Arc<Semaphore>,
    api_handshakes: Arc<Semaphore>,
    /// Handshake outcomes.
    pub stats: TlsStats,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // Read first, so a missing file says so rather than "no certificate".
    let pem = std::fs::read(path).map_err(|e| file_error(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no CERTIFICATE block"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            file_error(path, "holds no PRIVATE KEY block (PKCS#8, PKCS#1 or SEC1)")
        }
        other => file_error(path, format!("not a valid PEM private key: {other}")),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads the files and builds the configuration; errors name the file at fault.
    pub fn load(settings: TlsSettings) -> Result<Arc<Tls>, TlsError> {
        let config = build_both(&settings)?;
        let stamps = stamps(&settings);
        Ok(Arc::new(Tls {
            device_handshakes: Arc::new(Semaphore::new(settings.handshakes_max)),
            api_handshakes: Arc::new(Semaphore::new(settings.handshakes_max)),
            settings,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
            stats: TlsStats::default(),
        }))
    }

    /// Reads the files again; on success new handshakes use them (established connections keep
    /// theirs), on failure the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = stamps(&self.settings);
        match build_both(&self.settings) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
                *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // Not again until a file changes once more.
                *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Whether a file changed (or appeared, or went) since it was last read.
    fn changed(&self) -> bool {
        stamps(&self.settings) != *self.stamps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn config(&self, peers: Peers) -> Arc<ServerConfig> {
        let configs = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match peers {
            Peers::Devices => configs.devices.clone(),
            Peers::ApiClients => configs.api_clients.clone(),
        }
    }

    /// Runs the server side of a handshake on `stream` (bounded in time and concurrency) and
    /// returns the TLS stream with the client's verified certificate, if it showed one.
    pub async fn accept(
        &self,
        listener: &'static str,
        peers: Peers,
        stream: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, Option<PeerCertificate>), HandshakeFailed> {
        let peer = stream.peer_addr().ok();
        let handshakes = match peers {
            Peers::Devices => &self.device_handshakes,
            Peers::ApiClients => &self.api_handshakes,
        };
        let Ok(_permit) = handshakes.clone().try_acquire_owned() else {
            self.stats.failed_busy.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                ?peer,
                listener,
                "too many TLS handshakes in progress; closing"
            );
            return Err(HandshakeFailed);
        };
        let acceptor = TlsAcceptor::from(self.config(peers));
        let handshake = acceptor.accept(stream);
        let stream = match tokio::time::timeout(self.settings.handshake_timeout, handshake).await {
            Err(_) => {
                self.stats.failed_timeout.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?peer, listener, "TLS handshake timed out");
                return Err(HandshakeFailed);
            }
            Ok(Err(e)) => {
                let counter = match e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    Some(rustls::Error::InvalidCertificate(_)) => {
                        &self.stats.failed_bad_certificate
                    }
                    Some(rustls::Error::NoCertificatesPresented) => {
                        &self.stats.failed_no_certificate
                    }
                    Some(rustls::Error::AlertReceived(_)) => &self.stats.failed_alert,
                    _ => &self.stats.failed_protocol,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?peer, listener, error = %e, "TLS handshake failed");
                return Err(HandshakeFailed);
            }
            Ok(Ok(stream)) => stream,
        };
        self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
        let certificate = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| peer_certificate(leaf.as_ref(), self.settings.client_identity));
        Ok((stream, certificate))
    }
}

/// The fingerprint and device name of a DER certificate.
fn peer_certificate(der: &[u8], identity: ClientIdentity) -> PeerCertificate {
    PeerCertificate {
        fingerprint: fingerprint(der),
        name: certificate_name(der, identity),
    }
}

/// SHA-256 of a certificate's DER, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The device name a certificate carries: its subject CN or first DNS SAN.
pub fn certificate_name(der: &[u8], identity: ClientIdentity) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    match identity {
        ClientIdentity::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        ClientIdentity::San => {
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
        }
    }
}

/// Reads a PEM certificate (the first one in `pem`) as DER.
pub fn certificate_der_from_pem(pem: &str) -> Result<Vec<u8>, String> {
    let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
    match certs.next() {
        Some(Ok(cert)) => Ok(cert.as_ref().to_vec()),
        Some(Err(e)) => Err(format!("not valid PEM: {e}")),
        None => Err("holds no CERTIFICATE block".into()),
    }
}

fn stamps(settings: &TlsSettings) -> Stamps {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut stamps = vec![modified(&settings.cert_file), modified(&settings.key_file)];
    if let Some(ca) = &settings.client_ca_file {
        stamps.push(modified(ca));
    }
    stamps
}

fn build_both(settings: &TlsSettings) -> Result<Configs, TlsError> {
    let devices = build(settings, settings.client_auth)?;
    let mut api_clients = build(settings, ClientAuth::None)?;
    api_clients.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Configs {
        devices: Arc::new(devices),
        api_clients: Arc::new(api_clients),
    })
}

fn build(settings: &TlsSettings, client_auth: ClientAuth) -> Result<ServerConfig, TlsError> {
    let certs = read_certificates(&settings.cert_file)?;
    let key = read_key(&settings.key_file)?;
    let config_error = |message: String| TlsError::Config {
        cert: settings.cert_file.clone(),
        key: settings.key_file.clone(),
        message,
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| config_error(e.to_string()))?;
    let builder = match (client_auth, &settings.client_ca_file) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => {
            return Err(config_error(
                "tls_client_auth needs tls_client_ca_file (the CA device certificates chain to)"
                    .into(),
            ))
        }
        (mode, Some(ca_file)) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(ca_file)? {
                roots.add(cert).map_err(|e| {
                    file_error(ca_file, format!("not a usable CA certificate: {e}"))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if mode == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| file_error(ca_file, format!("cannot verify with it: {e}")))?,
            )
        }
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|e| config_error(e.to_string()))
}

/// SIGHUPs, listened for from the moment this is called (from then on one no longer ends the
/// process). `None` where signals cannot be listened for.
#[cfg(unix)]
pub type Hangups = Option<tokio::signal::unix::Signal>;
/// SIGHUPs (none on this platform).
#[cfg(not(unix))]
pub type Hangups = Option<()>;

/// Starts listening for SIGHUP: call it before the server says it is listening, so a SIGHUP
/// sent as soon as it is never meets the default action (the end of the process).
pub fn hangups() -> Hangups {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files reload on change only");
            None
        }
    }
    #[cfg(not(unix))]
    None
}

/// Reloads `tls` on SIGHUP and whenever a file's modification time changes (checked every
/// `check_interval`), until `stop`. Without TLS, a SIGHUP is logged and otherwise ignored.
pub async fn watch(
    tls: Option<Arc<Tls>>,
    mut hangup: Hangups,
    check_interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(check_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = {
            let _ = &mut hangup;
            std::future::pending::<()>()
        };
        let why = tokio::select! {
            () = hup => "SIGHUP",
            _ = ticker.tick() => {
                if !tls.as_ref().is_some_and(|tls| tls.changed()) {
                    continue;
                }
                "a file changed"
            }
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(tls) = &tls else {
            tracing::info!(why, "nothing to reload: no TLS listener is configured");
            continue;
        };
        match tls.reload() {
            Ok(()) => tracing::info!(why, "TLS certificates reloaded"),
            Err(e) => {
                tracing::error!(why, error = %e, "TLS certificates NOT reloaded; the previous ones stay in use")
            }
        }
    }
}

/// What `thinghub certs init` wrote.
#[derive(Debug)]
pub struct InitReport {
    /// Files written, in order.
    pub files: Vec<PathBuf>,
    /// The device certificate's fingerprint (to register for its Thing).
    pub device_fingerprint: String,
}

/// Writes a local CA (`ca.pem`, `ca.key`), a server certificate for `hosts` signed by it
/// (`server.pem`, `server.key`) and a device certificate whose CN is `device` (`device.pem`,
/// `device.key`) into `dir`. Refuses to overwrite existing files.
pub fn init_certificates(dir: &Path, hosts: &[String], device: &str) -> Result<InitReport, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    if hosts.is_empty() {
        return Err("--hosts needs at least one host name or address".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let names = [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "device.pem",
        "device.key",
    ];
    for name in names {
        let path = dir.join(name);
        if path.exists() {
            return Err(format!(
                "{} exists; not overwriting (choose another --dir)",
                path.display()
            ));
        }
    }
    let err = |e: rcgen::Error| e.to_string();
    let named = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "thinghub local");
        dn.push(DnType::CommonName, cn);
        dn
    };
    let (year, month, day) = civil_date_yesterday();
    let not_before = rcgen::date_time_ymd(year, month, day);
    // The 28th at most, so the same day exists in the year of expiry.
    let expiring = |years: i32| rcgen::date_time_ymd(year + years, month, day.min(28));
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.distinguished_name = named("thinghub local CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before;
    ca_params.not_after = expiring(CA_VALIDITY_YEARS);
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);

    let mut server_params = CertificateParams::new(hosts.to_vec()).map_err(err)?;
    server_params.distinguished_name = named(&hosts[0]);
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.not_before = not_before;
    server_params.not_after = expiring(LEAF_VALIDITY_YEARS);
    let server_key = KeyPair::generate().map_err(err)?;
    let server_cert = server_params.signed_by(&server_key, &issuer).map_err(err)?;

    let mut device_params = CertificateParams::new(vec![device.to_owned()]).map_err(err)?;
    device_params.distinguished_name = named(device);
    device_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    device_params.not_before = not_before;
    device_params.not_after = expiring(LEAF_VALIDITY_YEARS);
    let device_key = KeyPair::generate().map_err(err)?;
    let device_cert = device_params.signed_by(&device_key, &issuer).map_err(err)?;

    let contents = [
        ca_cert.pem(),
        ca_key.serialize_pem(),
        server_cert.pem(),
        server_key.serialize_pem(),
        device_cert.pem(),
        device_key.serialize_pem(),
    ];
    let mut files = Vec::new();
    for (name, text) in names.iter().zip(contents) {
        let path = dir.join(name);
        write_new(&path, text.as_bytes(), name.ends_with(".key"))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        files.push(path);
    }
    Ok(InitReport {
        files,
        device_fingerprint: fingerprint(device_cert.der()),
    })
}

/// The local CA's lifetime.
const CA_VALIDITY_YEARS: i32 = 10;
/// The server and device certificates' lifetime.
const LEAF_VALIDITY_YEARS: i32 = 2;

/// Yesterday's UTC date, so a verifying clock a little behind still accepts the certificates.
fn civil_date_yesterday() -> (i32, u8, u8) {
    let days = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let (year, month, day) = crate::audit::civil_from_days(days - 1);
    (year as i32, month as u8, day as u8)
}

/// Creates `path` (never overwriting); private keys are readable by their owner only.
fn write_new(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
