//! API keys: `key:secret` pairs checked on every management and device HTTP request, each with
//! a role (`admin`, `operator`, `viewer`, `device`) and, for device keys, optionally the Things
//! it may act for.
//!
//! Stored keys live in the `kv` tree as `apikey/{key}` with an argon2id hash of the secret. A key
//! given in `THINGHUB_ADMIN_KEY=key:secret` is an admin key for the life of the process (not
//! stored). On a first start with neither, one admin key is generated, stored hashed, and logged
//! once. Keys made over the API get a generated id and secret; the secret is shown once.
//!
//! argon2 costs tens of milliseconds by design, so after a secret verifies once its SHA-256
//! (bound to the stored hash) is cached in memory and later requests compare digests (in
//! constant time). Every request still reads the key's record, so a deleted or expired key is
//! refused at once, cache or not.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thinghub_storage::{Envelope, StorageError, Store};

const KEY_PREFIX: &str = "apikey/";
const API_KEY_RECORD: &str = "ApiKey";
/// The record version written now (v1 had no name, expiry or Things; it decodes with none).
const API_KEY_VERSION: u16 = 2;
/// Most verified secrets kept in the cache (a bound, not a tuning knob).
const VERIFIED_CACHE_ENTRIES_MAX: usize = 10_000;
/// Longest key name, characters.
pub const KEY_NAME_CHARS_MAX: usize = 128;
/// Most Things one device key may name.
pub const KEY_THINGS_MAX: usize = 1000;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including API keys.
    Admin,
    /// Everything but API keys, MQTT users and authorization rules.
    Operator,
    /// What an operator may read (GET), nothing else.
    Viewer,
    /// Only the device API (`/api/v1/thing-datas/...`), optionally for some Things only.
    Device,
}

impl Role {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Device => "device",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Role> {
        Some(match text {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            "viewer" => Role::Viewer,
            "device" => Role::Device,
            _ => return None,
        })
    }
}

/// Who made a request, once its key verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id.
    pub key: String,
    /// Its role.
    pub role: Role,
    /// For a device key: the only Things it may act for (`None`: any).
    pub things: Option<Vec<String>>,
}

impl Principal {
    /// Whether this key may read or write `thing` through the device API.
    pub fn may_act_for(&self, thing: &str) -> bool {
        self.role != Role::Device
            || self
                .things
                .as_ref()
                .is_none_or(|things| things.iter().any(|t| t == thing))
    }
}

/// Whether `role` may call `method` on `path` (the whole path, `/api/v1/...` or `/metrics`);
/// the refusal says why. Device keys are further limited to their Things by the device
/// handlers ([`Principal::may_act_for`]).
pub fn route_allowed(role: Role, method: &str, path: &str) -> Result<(), String> {
    let admin_only = [
        "/api/v1/api-keys",
        "/api/v1/authentication/",
        "/api/v1/authorization/",
        "/api/v1/webhooks",
        "/api/v1/postgres-sinks",
        "/api/v1/device-registrations",
    ];
    // A Thing's device certificates are credentials: `/api/v1/things/{name}/certificates...`.
    let certificates = {
        let mut segments = path.split('/');
        segments.nth(3) == Some("things") && segments.nth(1) == Some("certificates")
    };
    let is_admin_only = certificates
        || admin_only
            .iter()
            .any(|prefix| path == prefix.trim_end_matches('/') || path.starts_with(prefix));
    let reads = matches!(method, "GET" | "HEAD");
    match role {
        Role::Admin => Ok(()),
        Role::Operator | Role::Viewer if is_admin_only => Err(format!(
            "this API key's role ({}) may not manage API keys, MQTT users, device certificates, device registrations, authorization rules or webhooks",
            role.as_str()
        )),
        Role::Operator => Ok(()),
        Role::Viewer if reads => Ok(()),
        Role::Viewer => Err("this API key's role (viewer) may only read (GET)".into()),
        Role::Device if path.starts_with("/api/v1/thing-datas/") => Ok(()),
        Role::Device => Err(
            "this API key's role (device) may only use the device API (/api/v1/thing-datas/...)"
                .into(),
        ),
    }
}

/// A stored API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ApiKeyRecord {
    /// argon2id PHC string of the secret.
    secret_hash: String,
    /// Role (`admin` in v1 records).
    role: Role,
    created_at_ms: u64,
    /// A label (v2).
    #[serde(default)]
    name: Option<String>,
    /// Unix ms after which the key is refused (v2).
    #[serde(default)]
    expires_at_ms: Option<u64>,
    /// A device key's Things (v2; `None`: any).
    #[serde(default)]
    things: Option<Vec<String>>,
}

/// A key as the API shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyView {
    /// The key's id (the `key` of `key:secret`).
    pub key: String,
    /// Its label.
    pub name: Option<String>,
    /// Its role.
    pub role: Role,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Unix ms.
    pub expires_at_ms: Option<u64>,
    /// A device key's Things.
    pub things: Option<Vec<String>>,
}

impl ApiKeyView {
    fn of(key: &str, record: &ApiKeyRecord) -> ApiKeyView {
        ApiKeyView {
            key: key.to_owned(),
            name: record.name.clone(),
            role: record.role,
            created_at_ms: record.created_at_ms,
            expires_at_ms: record.expires_at_ms,
            things: record.things.clone(),
        }
    }

    /// The management API's view.
    pub fn to_json(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "key": self.key,
            "role": self.role.as_str(),
            "createdAt": self.created_at_ms,
        });
        if let Some(name) = &self.name {
            body["name"] = name.clone().into();
        }
        if let Some(at) = self.expires_at_ms {
            body["expiresAt"] = at.into();
        }
        if let Some(things) = &self.things {
            body["things"] = serde_json::json!(things);
        }
        body
    }
}

/// A key to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    /// Its label.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Unix ms after which it is refused.
    pub expires_at_ms: Option<u64>,
    /// A device key's Things.
    pub things: Option<Vec<String>>,
}

/// Storage could not be read (logged where it happened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageUnreadable;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRefusal {
    /// Unknown key or wrong secret (the same answer for both).
    Invalid,
    /// The key and secret are right but the key expired at this Unix ms.
    Expired(u64),
}

/// Why a key cannot be managed as asked.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No such key.
    #[error("API key '{0}' not found")]
    NotFound(String),
    /// Deleting it would leave no working admin key.
    #[error("API key '{0}' is the last working admin key; make another admin key first")]
    LastAdmin(String),
    /// Storage or hashing failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl From<StorageError> for KeyError {
    fn from(e: StorageError) -> Self {
        KeyError::Auth(AuthError::Storage(e))
    }
}

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// `THINGHUB_ADMIN_KEY` is not `key:secret`.
    #[error("THINGHUB_ADMIN_KEY must be 'key:secret' with both parts non-empty")]
    MalformedEnvKey,
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Hashing failed.
    #[error("cannot hash secret: {0}")]
    Hash(String),
}

/// Verifies and manages API keys.
pub struct ApiKeys {
    /// Deletions one at a time (the last-admin check and the removal are one step).
    deletes: tokio::sync::Mutex<()>,
    store: Store,
    env_key: Option<(String, [u8; 32])>,
    verified: VerifiedCache,
}

/// argon2id PHC string of `secret` with a fresh salt.
pub fn hash_secret(secret: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Whether `secret` matches an argon2 PHC string (false for an unreadable hash).
fn verify_secret(phc: &str, secret: &str) -> bool {
    PasswordHash::new(phc)
        .map(|hash| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

/// An argon2id hash of a random secret, made once per process with the same parameters as
/// every stored hash.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let secret: [u8; 16] = rand::thread_rng().gen();
        hash_secret(&format!("{secret:?}")).unwrap_or_default()
    })
}

/// Whether `secret` matches the stored hash of a known name; for an unknown name (`None`) the
/// same argon2 verification runs against a dummy hash and the answer is false, so a known name
/// with a wrong secret and an unknown name take the same time (no enumeration by timing).
pub fn verify_known_secret(phc: Option<&str>, secret: &str) -> bool {
    match phc {
        Some(phc) => verify_secret(phc, secret),
        None => {
            let _ = verify_secret(dummy_hash(), secret);
            false
        }
    }
}

/// Secrets that verified once, as SHA-256, so argon2 runs once per (name, secret), bounded.
///
/// Each entry is bound to the stored hash it verified against (`stored`): once the stored
/// hash changes (a new password), the old secret no longer hits, even if a verification that
/// started before the change remembers it after.
#[derive(Default)]
pub struct VerifiedCache {
    entries: Mutex<HashMap<String, [u8; 32]>>,
}

fn cache_digest(stored: &str, secret: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(stored.as_bytes());
    hasher.update([0]);
    hasher.update(secret.as_bytes());
    hasher.finalize().into()
}

impl VerifiedCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, [u8; 32]>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `name` last verified with exactly `secret` against the stored hash `stored`.
    pub fn hit(&self, name: &str, secret: &str, stored: &str) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|cached| constant_time_eq(cached, &cache_digest(stored, secret)))
    }

    /// Remembers a successful verification of `secret` against `stored`.
    pub fn remember(&self, name: &str, secret: &str, stored: &str) {
        let mut entries = self.lock();
        if entries.len() >= VERIFIED_CACHE_ENTRIES_MAX {
            entries.clear();
        }
        entries.insert(name.to_owned(), cache_digest(stored, secret));
    }

    /// Forgets `name` (its secret changed or it was deleted).
    pub fn forget(&self, name: &str) {
        self.lock().remove(name);
    }
}

fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `kv` key prefix of stored API keys.
pub const API_KEY_PREFIX: &str = KEY_PREFIX;

/// Whether a stored API key record decodes (`thinghub check`).
pub fn check_stored_key(bytes: &[u8]) -> Result<(), String> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| e.0)?;
    if envelope.event_type != API_KEY_RECORD {
        return Err(format!(
            "expected an {API_KEY_RECORD} record, found {}",
            envelope.event_type
        ));
    }
    envelope
        .payload_as::<ApiKeyRecord>()
        .map(|_| ())
        .map_err(|e| e.0)
}

/// Splits `key:secret`.
pub fn split_key(pair: &str) -> Option<(&str, &str)> {
    let (key, secret) = pair.split_once(':')?;
    (!key.is_empty() && !secret.is_empty()).then_some((key, secret))
}

fn random_text(chars: usize) -> String {
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(chars)
        .map(char::from)
        .collect()
}

impl ApiKeys {
    /// Sets up API keys: the env key if given; a generated admin key on a first start without
    /// any key.
    pub async fn init(
        store: Store,
        env_key: Option<&str>,
        now_ms: u64,
    ) -> Result<ApiKeys, AuthError> {
        let env_key = match env_key {
            Some(pair) => {
                let (key, secret) = split_key(pair).ok_or(AuthError::MalformedEnvKey)?;
                Some((key.to_owned(), sha256(secret)))
            }
            None => None,
        };
        let keys = ApiKeys {
            deletes: tokio::sync::Mutex::new(()),
            store,
            env_key,
            verified: VerifiedCache::default(),
        };
        let stored = keys.store.kv_scan_prefix(KEY_PREFIX, 1)?;
        if keys.env_key.is_none() && stored.is_empty() {
            let key = format!("admin-{:08x}", rand::thread_rng().gen::<u32>());
            let secret = random_text(32);
            keys.store_record(
                &key,
                &keys.record(&secret, Role::Admin, None, None, None, now_ms)?,
            )
            .await?;
            tracing::warn!(
                admin_key = %format!("{key}:{secret}"),
                "generated the admin API key on first start; it is shown only this once \
                 (use it as HTTP Basic credentials; set THINGHUB_ADMIN_KEY to use your own)"
            );
        }
        Ok(keys)
    }

    fn record(
        &self,
        secret: &str,
        role: Role,
        name: Option<String>,
        expires_at_ms: Option<u64>,
        things: Option<Vec<String>>,
        now_ms: u64,
    ) -> Result<ApiKeyRecord, AuthError> {
        Ok(ApiKeyRecord {
            secret_hash: hash_secret(secret)?,
            role,
            created_at_ms: now_ms,
            name,
            expires_at_ms,
            things,
        })
    }

    async fn store_record(&self, key: &str, record: &ApiKeyRecord) -> Result<bool, AuthError> {
        let bytes = Envelope::new(
            API_KEY_RECORD,
            API_KEY_VERSION,
            record.created_at_ms,
            record,
        )
        .and_then(|e| e.to_bytes())
        .map_err(|e| AuthError::Hash(e.0))?;
        Ok(self
            .store
            .kv_insert_new(&format!("{KEY_PREFIX}{key}"), bytes)
            .await?)
    }

    fn load(&self, key: &str) -> Option<ApiKeyRecord> {
        self.load_checked(key).ok().flatten()
    }

    /// The stored record; `Err` when storage could not be read (a record that does not decode
    /// is logged and read as absent).
    fn load_checked(&self, key: &str) -> Result<Option<ApiKeyRecord>, StorageUnreadable> {
        match self.store.kv_get(&format!("{KEY_PREFIX}{key}")) {
            Ok(Some(bytes)) => match Envelope::from_bytes(&bytes).and_then(|e| e.payload_as()) {
                Ok(record) => Ok(Some(record)),
                Err(e) => {
                    tracing::error!(key, error = %e, "stored API key record is unreadable");
                    Ok(None)
                }
            },
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::error!(error = %e, "cannot read API key");
                Err(StorageUnreadable)
            }
        }
    }

    fn principal(key: &str, record: &ApiKeyRecord, now_ms: u64) -> Result<Principal, KeyRefusal> {
        if let Some(expired) = record.expires_at_ms.filter(|at| *at <= now_ms) {
            return Err(KeyRefusal::Expired(expired));
        }
        Ok(Principal {
            key: key.to_owned(),
            role: record.role,
            things: record.things.clone(),
        })
    }

    /// The env key, or a stored key whose secret verified before: no argon2, cheap enough for
    /// async code, and not subject to throttling (an attacker failing on a key must not lock
    /// out the operator who holds its secret). `None`: not known this cheaply.
    pub fn authenticate_cached(
        &self,
        key: &str,
        secret: &str,
        now_ms: u64,
    ) -> Option<Result<Principal, KeyRefusal>> {
        if let Some((env_key, env_digest)) = &self.env_key {
            if env_key == key && constant_time_eq(env_digest, &sha256(secret)) {
                return Some(Ok(Principal {
                    key: key.to_owned(),
                    role: Role::Admin,
                    things: None,
                }));
            }
        }
        let record = self.load(key)?;
        self.verified
            .hit(key, secret, &record.secret_hash)
            .then(|| Self::principal(key, &record, now_ms))
    }

    /// What a sign-in holds to notice its key later revoked, replaced or expired without its
    /// secret: a digest of the stored secret hash (new at every creation), or a mark for the
    /// env key. `None`: the key is gone or expired; `Err`: storage could not tell.
    pub fn stamp(&self, key: &str, now_ms: u64) -> Result<Option<String>, StorageUnreadable> {
        // A stored key of the env key's name is checked as stored (its deletion must count).
        let Some(record) = self.load_checked(key)? else {
            return Ok(self
                .env_key
                .as_ref()
                .is_some_and(|(env_key, _)| env_key == key)
                .then(|| "env".into()));
        };
        if Self::principal(key, &record, now_ms).is_err() {
            return Ok(None);
        }
        // A digest: the session need not hold the hash itself.
        Ok(Some(
            sha256(&record.secret_hash)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        ))
    }

    /// Verifies `key:secret` (argon2 on a cache miss: call it off the async workers). An
    /// expired key is told apart only once its secret verified.
    pub fn authenticate(
        &self,
        key: &str,
        secret: &str,
        now_ms: u64,
    ) -> Result<Principal, KeyRefusal> {
        if let Some(known) = self.authenticate_cached(key, secret, now_ms) {
            return known;
        }
        let record = self.load(key);
        if !verify_known_secret(record.as_ref().map(|r| r.secret_hash.as_str()), secret) {
            return Err(KeyRefusal::Invalid);
        }
        let Some(record) = record else {
            return Err(KeyRefusal::Invalid);
        };
        // argon2 took tens of ms: a key deleted (or replaced) meanwhile must not pass.
        if self
            .load(key)
            .is_none_or(|now| now.secret_hash != record.secret_hash)
        {
            return Err(KeyRefusal::Invalid);
        }
        self.verified.remember(key, secret, &record.secret_hash);
        Self::principal(key, &record, now_ms)
    }

    /// Makes a key with a generated id and secret (durable before this returns); returns it
    /// and its secret, which is not kept anywhere.
    pub async fn create(
        &self,
        new: NewApiKey,
        now_ms: u64,
    ) -> Result<(ApiKeyView, String), KeyError> {
        let secret = random_text(40);
        let record = self.record(
            &secret,
            new.role,
            Some(new.name),
            new.expires_at_ms,
            new.things,
            now_ms,
        )?;
        loop {
            let key = format!("k-{:016x}", rand::thread_rng().gen::<u64>());
            if self.store_record(&key, &record).await? {
                tracing::info!(%key, role = record.role.as_str(), "API key created");
                return Ok((ApiKeyView::of(&key, &record), secret));
            }
        }
    }

    /// Stored keys in id order after `after`, at most `limit`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<ApiKeyView>, KeyError> {
        let from = after.map(|a| format!("{KEY_PREFIX}{a}"));
        let page = self
            .store
            .kv_scan_prefix_after(KEY_PREFIX, from.as_deref(), limit)?;
        Ok(page
            .iter()
            .filter_map(|(key, bytes)| {
                let record: ApiKeyRecord = Envelope::from_bytes(bytes)
                    .and_then(|e| e.payload_as())
                    .ok()?;
                Some(ApiKeyView::of(&key[KEY_PREFIX.len()..], &record))
            })
            .collect())
    }

    /// One stored key.
    pub fn get(&self, key: &str) -> Result<ApiKeyView, KeyError> {
        self.load(key)
            .map(|record| ApiKeyView::of(key, &record))
            .ok_or_else(|| KeyError::NotFound(key.to_owned()))
    }

    /// Deletes a key: refused from the next request on (durable before this returns). The last
    /// admin key cannot go unless the env key exists.
    pub async fn delete(&self, key: &str, now_ms: u64) -> Result<(), KeyError> {
        let _one_at_a_time = self.deletes.lock().await;
        let record = self
            .load(key)
            .ok_or_else(|| KeyError::NotFound(key.to_owned()))?;
        if record.role == Role::Admin && self.env_key.is_none() {
            // Admin keys that still work, other than this one.
            let others = self
                .store
                .kv_scan_prefix(KEY_PREFIX, usize::MAX)?
                .iter()
                .filter(|(id, bytes)| {
                    &id[KEY_PREFIX.len()..] != key
                        && Envelope::from_bytes(bytes)
                            .and_then(|e| e.payload_as::<ApiKeyRecord>())
                            .is_ok_and(|r| {
                                r.role == Role::Admin
                                    && r.expires_at_ms.is_none_or(|at| at > now_ms)
                            })
                })
                .count();
            if others == 0 {
                return Err(KeyError::LastAdmin(key.to_owned()));
            }
        }
        self.store.kv_remove(&format!("{KEY_PREFIX}{key}")).await?;
        self.verified.forget(key);
        tracing::info!(%key, "API key deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinghub_storage::StoreConfig;

    #[tokio::test]
    async fn env_key_and_stored_keys_verify_and_wrong_secrets_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        let keys = ApiKeys::init(store.clone(), Some("ops:s3cret"), 0)
            .await
            .expect("init");
        assert_eq!(
            keys.authenticate("ops", "s3cret", 0).map(|p| p.role),
            Ok(Role::Admin)
        );
        assert_eq!(
            keys.authenticate("ops", "wrong", 0),
            Err(KeyRefusal::Invalid)
        );
        assert!(
            store
                .kv_scan_prefix(KEY_PREFIX, 10)
                .expect("scan")
                .is_empty(),
            "env key is not stored"
        );
        let new = NewApiKey {
            name: "ci".into(),
            role: Role::Viewer,
            expires_at_ms: Some(1_000),
            things: None,
        };
        let (view, secret) = keys.create(new, 0).await.expect("create");
        let key = view.key.as_str();
        assert_eq!(
            keys.authenticate(key, &secret, 0).map(|p| p.role),
            Ok(Role::Viewer)
        );
        assert!(
            keys.authenticate_cached(key, &secret, 0).is_some(),
            "second time from the cache"
        );
        assert_eq!(keys.authenticate(key, "wrong", 0), Err(KeyRefusal::Invalid));
        assert_eq!(
            keys.authenticate("nobody", &secret, 0),
            Err(KeyRefusal::Invalid)
        );
        assert_eq!(
            keys.authenticate(key, &secret, 1_000),
            Err(KeyRefusal::Expired(1_000))
        );
        keys.delete(key, 0).await.expect("delete");
        assert!(
            keys.authenticate_cached(key, &secret, 0).is_none(),
            "revoked, cache included"
        );
        assert_eq!(keys.authenticate(key, &secret, 0), Err(KeyRefusal::Invalid));
    }

    #[tokio::test]
    async fn a_first_start_without_env_key_generates_and_stores_one_hashed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        let keys = ApiKeys::init(store.clone(), None, 0).await.expect("init");
        let stored = store.kv_scan_prefix(KEY_PREFIX, 10).expect("scan");
        assert_eq!(stored.len(), 1);
        let record: ApiKeyRecord = Envelope::from_bytes(&stored[0].1)
            .and_then(|e| e.payload_as())
            .expect("record");
        assert!(record.secret_hash.starts_with("$argon2id$"));
        ApiKeys::init(store.clone(), None, 0)
            .await
            .expect("second start");
        assert_eq!(
            store.kv_scan_prefix(KEY_PREFIX, 10).expect("scan").len(),
            1,
            "not regenerated"
        );
        // Without an env key the last admin key stays.
        let only = keys.list(None, 10).expect("list").remove(0).key;
        assert!(matches!(
            keys.delete(&only, 0).await,
            Err(KeyError::LastAdmin(_))
        ));
        // An expired admin key does not count as another one.
        let expiring = NewApiKey {
            name: "spare".into(),
            role: Role::Admin,
            expires_at_ms: Some(1_000),
            things: None,
        };
        keys.create(expiring, 0).await.expect("create");
        assert!(matches!(
            keys.delete(&only, 2_000).await,
            Err(KeyError::LastAdmin(_))
        ));
        keys.delete(&only, 500)
            .await
            .expect("another admin key works at 500");
    }

    #[test]
    fn roles_reach_their_routes_only() {
        use Role::*;
        let cases = [
            (Admin, "DELETE", "/api/v1/api-keys/k-1", true),
            (Operator, "POST", "/api/v1/api-keys", false),
            (Operator, "GET", "/api/v1/api-keys", false),
            (Operator, "POST", "/api/v1/authentication/users", false),
            (Operator, "PUT", "/api/v1/authorization/rules/1", false),
            (Operator, "POST", "/api/v1/jobs", true),
            (Operator, "DELETE", "/api/v1/things/t1", true),
            (Viewer, "GET", "/api/v1/things/t1", true),
            (Viewer, "GET", "/metrics", true),
            (Viewer, "POST", "/api/v1/things", false),
            (Viewer, "GET", "/api/v1/authentication/users", false),
            (Operator, "POST", "/api/v1/things/t1/certificates", false),
            (Viewer, "GET", "/api/v1/things/t1/certificates", false),
            (
                Operator,
                "POST",
                "/api/v1/things/t1/certificates/ab/revoke",
                false,
            ),
            (Admin, "POST", "/api/v1/things/t1/certificates", true),
            (Operator, "GET", "/api/v1/things/certificates/shadow", true),
            (Device, "POST", "/api/v1/thing-datas/shadow/reported", true),
            (Device, "GET", "/api/v1/thing-datas/t1/jobs", true),
            (Device, "GET", "/api/v1/things/t1/shadow", false),
            (Device, "GET", "/api/v1/thing-datas", false),
            (Device, "GET", "/metrics", false),
        ];
        for (role, method, path, allowed) in cases {
            assert_eq!(
                route_allowed(role, method, path).is_ok(),
                allowed,
                "{role:?} {method} {path}"
            );
        }
        let scoped = Principal {
            key: "k".into(),
            role: Device,
            things: Some(vec!["pump-1".into()]),
        };
        assert!(scoped.may_act_for("pump-1"));
        assert!(!scoped.may_act_for("pump-2"));
        let operator = Principal {
            role: Operator,
            things: None,
            ..scoped
        };
        assert!(operator.may_act_for("pump-2"));
    }

    #[test]
    fn malformed_env_keys_are_refused() {
        for bad in ["nocolon", ":secret", "key:"] {
            assert!(split_key(bad).is_none(), "{bad}");
        }
    }
}
