//! Device certificates: X.509 client certificates an operator registered for a Thing, the
//! identity a device connects with over TLS instead of a password.
//!
//! A certificate is accepted at CONNECT when rustls verified it against `tls_client_ca_file`,
//! the name it carries (subject CN or DNS SAN, `tls_client_identity`) is a Thing's, and its
//! SHA-256 fingerprint is registered for that Thing and not revoked. Records live in the `kv`
//! tree as `mqttcert/{thing}/{fingerprint}`; a revoked one stays (status `REVOKED`, with when)
//! so the history of a device's credentials can be read back, and is never active again.
//!
//! Connections with a certificate are owned by [`certificate_owner`] of their Thing (one owner
//! per Thing, whichever of its certificates was used, so a device keeps its persistent session
//! across a certificate rotation). The name cannot be a username (`/` is not allowed in those).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thinghub_storage::{Envelope, StorageError, Store};

const CERT_PREFIX: &str = "mqttcert/";
const CERT_RECORD: &str = "DeviceCertificate";
/// The owner name of a Thing's certificate connections: `x509/{thing}`.
const OWNER_PREFIX: &str = "x509/";
/// Length of a SHA-256 fingerprint in hex.
const FINGERPRINT_HEX_LEN: usize = 64;

/// The `kv` key prefix of device certificates (`thinghub check`).
pub const DEVICE_CERTIFICATE_PREFIX: &str = CERT_PREFIX;

/// The session owner of the connections made with `thing`'s certificates.
pub fn certificate_owner(thing: &str) -> String {
    format!("{OWNER_PREFIX}{thing}")
}

/// The Thing whose certificate connections `username` names, if it is such an owner.
pub fn certificate_owner_thing(username: &str) -> Option<&str> {
    username.strip_prefix(OWNER_PREFIX)
}

/// Whether a certificate is still accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum CertificateStatus {
    /// Accepted.
    Active,
    /// Refused for good.
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CertificateRecord {
    status: CertificateStatus,
    created_at_ms: u64,
    #[serde(default)]
    revoked_at_ms: Option<u64>,
    /// The name the certificate carried when it was registered from its PEM.
    #[serde(default)]
    subject_name: Option<String>,
}

/// A registered certificate as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CertificateView {
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub fingerprint: String,
    /// The Thing it identifies.
    #[serde(rename = "thingName")]
    pub thing_name: String,
    /// `ACTIVE` or `REVOKED`.
    pub status: CertificateStatus,
    /// The name (CN or SAN) the certificate carried, when it was registered from its PEM.
    #[serde(rename = "subjectName", skip_serializing_if = "Option::is_none")]
    pub subject_name: Option<String>,
    /// Unix ms of the registration.
    #[serde(rename = "createdAt")]
    pub created_at_ms: u64,
    /// Unix ms of the revocation.
    #[serde(rename = "revokedAt", skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// Registered already (active or revoked: a revoked certificate is never active again).
    #[error("certificate {fingerprint} is registered for '{thing}' already ({status:?})")]
    Exists {
        /// The Thing.
        thing: String,
        /// The fingerprint.
        fingerprint: String,
        /// Its status.
        status: CertificateStatus,
    },
    /// Not registered for this Thing.
    #[error("no certificate {fingerprint} is registered for '{thing}'")]
    NotFound {
        /// The Thing.
        thing: String,
        /// The fingerprint.
        fingerprint: String,
    },
    /// The Thing has as many certificates as it may.
    #[error("'{0}' has {1} certificates registered, the most a Thing may (thing_certificates_max; revoked ones count)")]
    Full(String, usize),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What a CONNECT's certificate is, for its Thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Registered and active.
    Active,
    /// Registered, then revoked.
    Revoked,
    /// Not registered for that Thing.
    Unknown,
}

/// The registry of device certificates.
#[derive(Clone)]
pub struct DeviceCertificates {
    store: Store,
    per_thing_max: usize,
    /// Registrations and removals one at a time (with the Thing check or deletion that goes
    /// with them), so neither the per-Thing bound nor a Thing's deletion can be raced.
    edits: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// Records read per page when all of a Thing's certificates are read.
const SCAN_PAGE: usize = 256;

/// Checks a fingerprint's form: 64 hex digits (any case; stored lower-case), `:` separators
/// allowed as `openssl x509 -fingerprint -sha256` prints them.
pub fn normalize_fingerprint(fingerprint: &str) -> Result<String, CertificateError> {
    let hex: String = fingerprint
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() != FINGERPRINT_HEX_LEN || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CertificateError::Invalid(format!(
            "a fingerprint is the SHA-256 of the certificate's DER as 64 hex digits, not '{fingerprint}'"
        )));
    }
    Ok(hex)
}

impl DeviceCertificates {
    /// The registry over `store`, at most `per_thing_max` certificates per Thing.
    pub fn new(store: Store, per_thing_max: usize) -> DeviceCertificates {
        DeviceCertificates {
            store,
            per_thing_max,
            edits: std::sync::Arc::default(),
        }
    }

    /// Holds off every other registration and removal while the guard lives: a caller checks
    /// that the Thing exists (or deletes it) under it.
    pub async fn edit(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.edits.clone().lock_owned().await
    }

    /// Every record of `thing` (all of them, whatever the bound is now), by key.
    fn records(&self, thing: &str) -> Result<Vec<(String, Vec<u8>)>, CertificateError> {
        let prefix = Self::prefix(thing);
        let mut all = Vec::new();
        loop {
            let after = all.last().map(|(key, _): &(String, Vec<u8>)| key.clone());
            let page = self
                .store
                .kv_scan_prefix_after(&prefix, after.as_deref(), SCAN_PAGE)?;
            let full = page.len() == SCAN_PAGE;
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    fn key(thing: &str, fingerprint: &str) -> String {
        format!("{CERT_PREFIX}{thing}/{fingerprint}")
    }

    fn prefix(thing: &str) -> String {
        format!("{CERT_PREFIX}{thing}/")
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<CertificateRecord, CertificateError> {
        Envelope::from_bytes(bytes)
            .and_then(|e| e.payload_as())
            .map_err(|e| {
                CertificateError::Storage(StorageError::Corrupt {
                    thing: String::new(),
                    seq: 0,
                    reason: format!("device certificate record '{key}': {}", e.0),
                })
            })
    }

    fn encode(record: &CertificateRecord) -> Result<Vec<u8>, CertificateError> {
        Envelope::new(CERT_RECORD, 1, record.created_at_ms, record)
            .and_then(|e| e.to_bytes())
            .map_err(|e| CertificateError::Invalid(e.0))
    }

    fn view(thing: &str, fingerprint: &str, record: &CertificateRecord) -> CertificateView {
        CertificateView {
            fingerprint: fingerprint.to_owned(),
            thing_name: thing.to_owned(),
            status: record.status,
            subject_name: record.subject_name.clone(),
            created_at_ms: record.created_at_ms,
            revoked_at_ms: record.revoked_at_ms,
        }
    }

    fn read(
        &self,
        thing: &str,
        fingerprint: &str,
    ) -> Result<Option<CertificateRecord>, CertificateError> {
        let key = Self::key(thing, fingerprint);
        match self.store.kv_get(&key)? {
            None => Ok(None),
            Some(bytes) => Self::decode(&key, &bytes).map(Some),
        }
    }

    /// Registers `fingerprint` for `thing` (the caller holds [`Self::edit`] and checked that
    /// the Thing exists).
    pub async fn register(
        &self,
        thing: &str,
        fingerprint: &str,
        subject_name: Option<String>,
        now_ms: u64,
    ) -> Result<CertificateView, CertificateError> {
        let fingerprint = normalize_fingerprint(fingerprint)?;
        if let Some(existing) = self.read(thing, &fingerprint)? {
            return Err(CertificateError::Exists {
                thing: thing.to_owned(),
                fingerprint,
                status: existing.status,
            });
        }
        if self.records(thing)?.len() >= self.per_thing_max {
            return Err(CertificateError::Full(thing.to_owned(), self.per_thing_max));
        }
        let record = CertificateRecord {
            status: CertificateStatus::Active,
            created_at_ms: now_ms,
            revoked_at_ms: None,
            subject_name,
        };
        let key = Self::key(thing, &fingerprint);
        if !self
            .store
            .kv_insert_new(&key, Self::encode(&record)?)
            .await?
        {
            // Registered by a concurrent request meanwhile.
            let status = self
                .read(thing, &fingerprint)?
                .map_or(CertificateStatus::Active, |r| r.status);
            return Err(CertificateError::Exists {
                thing: thing.to_owned(),
                fingerprint,
                status,
            });
        }
        Ok(Self::view(thing, &fingerprint, &record))
    }

    /// Revokes `fingerprint` of `thing` (durably); revoking a revoked one changes nothing. The
    /// flag says whether this call revoked it.
    pub async fn revoke(
        &self,
        thing: &str,
        fingerprint: &str,
        now_ms: u64,
    ) -> Result<(CertificateView, bool), CertificateError> {
        let fingerprint = normalize_fingerprint(fingerprint)?;
        let Some(mut record) = self.read(thing, &fingerprint)? else {
            return Err(CertificateError::NotFound {
                thing: thing.to_owned(),
                fingerprint,
            });
        };
        let active = record.status == CertificateStatus::Active;
        if active {
            record.status = CertificateStatus::Revoked;
            record.revoked_at_ms = Some(now_ms);
            self.store
                .kv_put(&Self::key(thing, &fingerprint), Self::encode(&record)?)
                .await?;
        }
        Ok((Self::view(thing, &fingerprint, &record), active))
    }

    /// One certificate of `thing`.
    pub fn get(&self, thing: &str, fingerprint: &str) -> Result<CertificateView, CertificateError> {
        let fingerprint = normalize_fingerprint(fingerprint)?;
        self.read(thing, &fingerprint)?
            .map(|record| Self::view(thing, &fingerprint, &record))
            .ok_or_else(|| CertificateError::NotFound {
                thing: thing.to_owned(),
                fingerprint,
            })
    }

    /// Every certificate of `thing`, by fingerprint.
    pub fn list(&self, thing: &str) -> Result<Vec<CertificateView>, CertificateError> {
        let prefix = Self::prefix(thing);
        self.records(thing)?
            .into_iter()
            .map(|(key, bytes)| {
                let record = Self::decode(&key, &bytes)?;
                let fingerprint = key.trim_start_matches(&prefix);
                Ok(Self::view(thing, fingerprint, &record))
            })
            .collect()
    }

    /// Where the certificate with `fingerprint` stands for `thing`.
    pub fn standing(&self, thing: &str, fingerprint: &str) -> Result<Standing, CertificateError> {
        Ok(match self.read(thing, fingerprint)? {
            Some(r) if r.status == CertificateStatus::Active => Standing::Active,
            Some(_) => Standing::Revoked,
            None => Standing::Unknown,
        })
    }

    /// A digest of `thing`'s active certificates (`None` when it has none): what a CONNECT
    /// compares again after registering its session, so a revocation racing it is not missed.
    pub fn active_digest(&self, thing: &str) -> Result<Option<[u8; 32]>, CertificateError> {
        let mut digest = Sha256::new();
        let mut any = false;
        for view in self.list(thing)? {
            if view.status == CertificateStatus::Active {
                digest.update(view.fingerprint.as_bytes());
                any = true;
            }
        }
        Ok(any.then(|| digest.finalize().into()))
    }

    /// Removes every certificate of `thing` (it is being deleted; the caller holds
    /// [`Self::edit`]); returns how many.
    pub async fn remove_all(&self, thing: &str) -> Result<usize, CertificateError> {
        let keys: Vec<String> = self
            .records(thing)?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        for key in &keys {
            self.store.kv_remove(key).await?;
        }
        Ok(keys.len())
    }
}

/// Whether a stored certificate record decodes (`thinghub check`).
pub fn check_stored_certificate(bytes: &[u8]) -> Result<(), String> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| e.0)?;
    if envelope.event_type != CERT_RECORD {
        return Err(format!(
            "expected a {CERT_RECORD} record, found {}",
            envelope.event_type
        ));
    }
    envelope
        .payload_as::<CertificateRecord>()
        .map(|_| ())
        .map_err(|e| e.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinghub_storage::StoreConfig;

    fn registry() -> (tempfile::TempDir, DeviceCertificates) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        (dir, DeviceCertificates::new(store, 3))
    }

    const FP: &str = "AB:cd:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd";

    #[tokio::test]
    async fn a_registered_certificate_is_active_until_revoked_and_never_again() {
        let (_dir, certs) = registry();
        let fp = normalize_fingerprint(FP).expect("valid");
        assert_eq!(fp.len(), 64);
        assert_eq!(
            certs.standing("dev-1", &fp).expect("read"),
            Standing::Unknown
        );
        let view = certs
            .register("dev-1", FP, None, 10)
            .await
            .expect("register");
        assert_eq!(view.status, CertificateStatus::Active);
        assert_eq!(view.fingerprint, fp, "stored lower-case, without colons");
        assert_eq!(
            certs.standing("dev-1", &fp).expect("read"),
            Standing::Active
        );
        assert_eq!(
            certs.standing("dev-2", &fp).expect("read"),
            Standing::Unknown,
            "registered for one Thing only"
        );
        let before = certs.active_digest("dev-1").expect("digest");
        assert!(before.is_some());
        let (revoked, changed) = certs.revoke("dev-1", &fp, 20).await.expect("revoke");
        assert!(changed);
        assert_eq!(revoked.status, CertificateStatus::Revoked);
        let (_, again) = certs.revoke("dev-1", &fp, 21).await.expect("revoke again");
        assert!(!again, "revoking a revoked certificate changes nothing");
        assert_eq!(revoked.revoked_at_ms, Some(20));
        assert_eq!(
            certs.standing("dev-1", &fp).expect("read"),
            Standing::Revoked
        );
        assert_eq!(certs.active_digest("dev-1").expect("digest"), None);
        let again = certs.register("dev-1", &fp, None, 30).await;
        assert!(
            matches!(
                again,
                Err(CertificateError::Exists {
                    status: CertificateStatus::Revoked,
                    ..
                })
            ),
            "{again:?}"
        );
        assert_eq!(
            certs.list("dev-1").expect("list").len(),
            1,
            "the revoked one is kept"
        );
    }

    #[tokio::test]
    async fn bad_fingerprints_and_too_many_certificates_are_refused() {
        let (_dir, certs) = registry();
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65)] {
            assert!(matches!(
                certs.register("dev-1", bad, None, 1).await,
                Err(CertificateError::Invalid(_))
            ));
        }
        for i in 0..3u8 {
            let fp = format!("{i:02x}").repeat(32);
            certs.register("dev-1", &fp, None, 1).await.expect("room");
        }
        let full = certs.register("dev-1", &"ff".repeat(32), None, 1).await;
        assert!(
            matches!(full, Err(CertificateError::Full(_, 3))),
            "{full:?}"
        );
        assert_eq!(certs.remove_all("dev-1").await.expect("remove"), 3);
        assert!(certs.list("dev-1").expect("list").is_empty());
    }
}
