//! Admin API keys: `key:secret` pairs checked on every management and device HTTP request.
//!
//! Stored keys live in the `kv` tree as `apikey/{key}` with an argon2id hash of the secret. A key
//! given in `THINGHUB_ADMIN_KEY=key:secret` is valid for the life of the process (not stored).
//! On a first start with neither, one key is generated, stored hashed, and logged once.
//!
//! argon2 costs tens of milliseconds by design, so after a secret verifies once its SHA-256 is
//! cached in memory and later requests compare digests (in constant time).

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
/// Most verified secrets kept in the cache (a bound, not a tuning knob).
const VERIFIED_CACHE_ENTRIES_MAX: usize = 10_000;

/// A stored API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ApiKeyRecord {
    /// argon2id PHC string of the secret.
    secret_hash: String,
    /// Role (only `admin` exists so far).
    role: String,
    created_at_ms: u64,
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

/// Verifies admin credentials.
pub struct AdminKeys {
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

impl AdminKeys {
    /// Sets up admin keys: the env key if given; a generated one on a first start without any.
    pub async fn init(
        store: Store,
        env_key: Option<&str>,
        now_ms: u64,
    ) -> Result<AdminKeys, AuthError> {
        let env_key = match env_key {
            Some(pair) => {
                let (key, secret) = split_key(pair).ok_or(AuthError::MalformedEnvKey)?;
                Some((key.to_owned(), sha256(secret)))
            }
            None => None,
        };
        let keys = AdminKeys {
            store,
            env_key,
            verified: VerifiedCache::default(),
        };
        let stored = keys.store.kv_scan_prefix(KEY_PREFIX, 1)?;
        if keys.env_key.is_none() && stored.is_empty() {
            let key = format!("admin-{:08x}", rand::thread_rng().gen::<u32>());
            let secret: String = rand::thread_rng()
                .sample_iter(&rand::distributions::Alphanumeric)
                .take(32)
                .map(char::from)
                .collect();
            keys.create(&key, &secret, now_ms).await?;
            tracing::warn!(
                admin_key = %format!("{key}:{secret}"),
                "generated the admin API key on first start; it is shown only this once \
                 (use it as HTTP Basic credentials; set THINGHUB_ADMIN_KEY to use your own)"
            );
        }
        Ok(keys)
    }

    /// Stores a new key with an argon2id hash of its secret.
    pub async fn create(&self, key: &str, secret: &str, now_ms: u64) -> Result<(), AuthError> {
        let secret_hash = hash_secret(secret)?;
        let record = ApiKeyRecord {
            secret_hash,
            role: "admin".into(),
            created_at_ms: now_ms,
        };
        let bytes = Envelope::new(API_KEY_RECORD, 1, now_ms, &record)
            .and_then(|e| e.to_bytes())
            .map_err(|e| AuthError::Hash(e.0))?;
        self.store
            .kv_put(&format!("{KEY_PREFIX}{key}"), bytes)
            .await?;
        Ok(())
    }

    /// Whether `key:secret` is the env key or verified before: no argon2, cheap enough for async
    /// code, and not subject to throttling (an attacker failing on a key must not lock out the
    /// operator who holds its secret).
    pub fn verify_cached(&self, key: &str, secret: &str) -> bool {
        if let Some((env_key, env_digest)) = &self.env_key {
            if env_key == key && constant_time_eq(env_digest, &sha256(secret)) {
                return true;
            }
        }
        // Stored keys cannot be changed over the API: the cache needs no stored-hash binding.
        self.verified.hit(key, secret, "")
    }

    /// Whether `key:secret` is a valid admin credential (argon2 on a cache miss: call it off
    /// the async workers).
    pub fn verify(&self, key: &str, secret: &str) -> bool {
        if self.verify_cached(key, secret) {
            return true;
        }
        let record = match self.store.kv_get(&format!("{KEY_PREFIX}{key}")) {
            Ok(Some(bytes)) => match Envelope::from_bytes(&bytes).and_then(|e| e.payload_as()) {
                Ok(record) => Some::<ApiKeyRecord>(record),
                Err(e) => {
                    tracing::error!(key, error = %e, "stored API key record is unreadable");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read API key");
                None
            }
        };
        let valid = verify_known_secret(record.as_ref().map(|r| r.secret_hash.as_str()), secret);
        if valid {
            self.verified.remember(key, secret, "");
        }
        valid
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
        let keys = AdminKeys::init(store.clone(), Some("ops:s3cret"), 0)
            .await
            .expect("init");
        assert!(keys.verify("ops", "s3cret"));
        assert!(!keys.verify("ops", "wrong"));
        assert!(
            store
                .kv_scan_prefix(KEY_PREFIX, 10)
                .expect("scan")
                .is_empty(),
            "env key is not stored"
        );
        keys.create("stored", "pw", 0).await.expect("create");
        assert!(keys.verify("stored", "pw"));
        assert!(keys.verify("stored", "pw"), "second time from the cache");
        assert!(!keys.verify("stored", "pW"));
        assert!(!keys.verify("nobody", "pw"));
    }

    #[tokio::test]
    async fn a_first_start_without_env_key_generates_and_stores_one_hashed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        AdminKeys::init(store.clone(), None, 0).await.expect("init");
        let stored = store.kv_scan_prefix(KEY_PREFIX, 10).expect("scan");
        assert_eq!(stored.len(), 1);
        let record: ApiKeyRecord = Envelope::from_bytes(&stored[0].1)
            .and_then(|e| e.payload_as())
            .expect("record");
        assert!(record.secret_hash.starts_with("$argon2id$"));
        AdminKeys::init(store.clone(), None, 0)
            .await
            .expect("second start");
        assert_eq!(
            store.kv_scan_prefix(KEY_PREFIX, 10).expect("scan").len(),
            1,
            "not regenerated"
        );
    }

    #[test]
    fn malformed_env_keys_are_refused() {
        for bad in ["nocolon", ":secret", "key:"] {
            assert!(split_key(bad).is_none(), "{bad}");
        }
    }
}
