//! MQTT credentials: users with argon2id-hashed passwords, optionally bound to a Thing or marked
//! superuser. Stored in the `kv` tree as `mqttuser/{username}`; managed over
//! `/api/v1/authentication/users`; checked on every MQTT CONNECT.

use serde::{Deserialize, Serialize};
use thinghub_storage::{Envelope, StorageError, Store};

use crate::auth::{hash_secret, verify_known_secret, AuthError, VerifiedCache};
use crate::certificates::{certificate_owner_thing, CertificateError, DeviceCertificates};

const USER_PREFIX: &str = "mqttuser/";
const USER_RECORD: &str = "MqttUser";
/// Longest username or password, in bytes.
pub const CREDENTIAL_BYTES_MAX: usize = 256;
/// Most users returned by one listing.
pub const USERS_LIST_MAX: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserRecord {
    password_hash: String,
    #[serde(default)]
    thing_name: Option<String>,
    #[serde(default)]
    superuser: bool,
    created_at_ms: u64,
}

/// The `kv` key prefix of stored MQTT users.
pub const MQTT_USER_PREFIX: &str = USER_PREFIX;

/// Whether a stored user record decodes (`thinghub check`).
pub fn check_stored_user(bytes: &[u8]) -> Result<(), String> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| e.0)?;
    if envelope.event_type != USER_RECORD {
        return Err(format!(
            "expected a {USER_RECORD} record, found {}",
            envelope.event_type
        ));
    }
    envelope
        .payload_as::<UserRecord>()
        .map(|_| ())
        .map_err(|e| e.0)
}

/// A user as the API shows it (never the hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UserView {
    /// Username.
    pub username: String,
    /// The Thing this user connects as, if bound explicitly.
    #[serde(rename = "thingName", skip_serializing_if = "Option::is_none")]
    pub thing_name: Option<String>,
    /// Whether the user may use any topic.
    pub superuser: bool,
    /// Unix ms of creation.
    #[serde(rename = "createdAt")]
    pub created_at_ms: u64,
}

/// Who a CONNECT authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The Thing bound to the user (explicitly, or by a username equal to a registered Thing).
    pub thing_name: Option<String>,
    /// The bound Thing's `mqttClientId`: the only client id the user may connect with. `None`
    /// when the user is bound to a Thing that is not registered.
    pub thing_client_id: Option<String>,
    /// Superuser.
    pub superuser: bool,
    /// The Cumulocity bootstrap user (`cumulocity_bootstrap_username`): it may only ask for
    /// device credentials (`s/ucr`, `s/dcr`).
    pub bootstrap: bool,
    /// Identifies the user record these rights were read from (password hash, binding,
    /// superuser): a CONNECT compares it again after registering its session, so a change made
    /// while it was authenticating is not missed.
    pub fingerprint: [u8; 32],
}

/// Why a user operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A user with that name exists.
    #[error("user '{0}' already exists")]
    Exists(String),
    /// The configured Cumulocity bootstrap user: not managed over the API.
    #[error("user '{0}' is the Cumulocity bootstrap user: it comes from the configuration (cumulocity_bootstrap_username) and is not managed over the API")]
    Reserved(String),
    /// No such user.
    #[error("user '{0}' not found")]
    NotFound(String),
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Hashing failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

fn fingerprint(record: &UserRecord) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(record.password_hash.as_bytes());
    hasher.update([0]);
    hasher.update(record.thing_name.as_deref().unwrap_or("").as_bytes());
    hasher.update([
        0,
        u8::from(record.thing_name.is_some()),
        u8::from(record.superuser),
    ]);
    hasher.finalize().into()
}

/// The user store.
pub struct MqttUsers {
    store: Store,
    verified: VerifiedCache,
    /// One argon2 verification at a time: each allocates ~19 MiB and burns tens of ms of CPU, so
    /// a reconnect storm of one user must not run thousands in parallel (measured: 89 KB of RSS
    /// per connection at 2,000 simultaneous CONNECTs without this gate).
    argon2_gate: std::sync::Mutex<()>,
    /// The Cumulocity bootstrap user, from the configuration (hashed at start-up, never
    /// stored, not managed over the API).
    bootstrap: Option<(String, UserRecord)>,
    /// Device certificates: the rights of a Thing's certificate connections
    /// ([`crate::certificates::certificate_owner`]) come from them.
    certificates: DeviceCertificates,
}

/// Certificates one Thing may have registered, unless configured otherwise.
pub const THING_CERTIFICATES_MAX_DEFAULT: usize = 10;

/// Characters a username may not contain: ACL placeholders (`${username}`) put the username
/// into topic filters, where these would widen what a rule grants.
const USERNAME_FORBIDDEN_CHARS: [char; 3] = ['+', '#', '/'];

fn check_username(username: &str) -> Result<(), UserError> {
    check_credential("username", username)?;
    if username.contains(USERNAME_FORBIDDEN_CHARS) {
        return Err(UserError::Invalid(format!(
            "username must not contain '+', '#' or '/' (they are topic wildcards and separators): '{username}'"
        )));
    }
    Ok(())
}

fn check_credential(what: &str, value: &str) -> Result<(), UserError> {
    if value.is_empty() || value.len() > CREDENTIAL_BYTES_MAX {
        return Err(UserError::Invalid(format!(
            "{what} must be 1..={CREDENTIAL_BYTES_MAX} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(UserError::Invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(())
}

impl MqttUsers {
    /// The users kept in `store`.
    pub fn new(store: Store) -> MqttUsers {
        MqttUsers {
            certificates: DeviceCertificates::new(store.clone(), THING_CERTIFICATES_MAX_DEFAULT),
            store,
            verified: VerifiedCache::default(),
            argon2_gate: std::sync::Mutex::new(()),
            bootstrap: None,
        }
    }

    /// At most `max` certificates per Thing (`thing_certificates_max`).
    pub fn with_certificates_max(mut self, max: usize) -> Self {
        self.certificates = DeviceCertificates::new(self.store.clone(), max);
        self
    }

    /// The device certificates.
    pub fn certificates(&self) -> &DeviceCertificates {
        &self.certificates
    }

    /// The rights of `thing`'s certificate connections: those of a user bound to it, while it
    /// has an active certificate (`None` once it has none). The fingerprint is a digest of its
    /// active certificates, so revoking any of them counts as a change.
    fn certificate_rights(&self, thing: &str) -> Result<Option<Authenticated>, UserError> {
        let digest = self
            .certificates
            .active_digest(thing)
            .map_err(|e| match e {
                CertificateError::Storage(e) => UserError::Storage(e),
                other => UserError::Invalid(other.to_string()),
            })?;
        Ok(digest.map(|fingerprint| Authenticated {
            thing_name: Some(thing.to_owned()),
            thing_client_id: self.thing_client_id(thing),
            superuser: false,
            bootstrap: false,
            fingerprint,
        }))
    }

    /// Adds the Cumulocity bootstrap user (`cumulocity_bootstrap_username` and `_password`):
    /// its password is hashed here and the plain text not kept. Refused if a stored user has
    /// that name (it would be hidden).
    pub fn with_bootstrap(mut self, username: &str, password: &str) -> Result<Self, UserError> {
        check_username(username)?;
        check_credential("password", password)?;
        if self.read(username)?.is_some() {
            return Err(UserError::Invalid(format!(
                "an MQTT user named '{username}' is stored, and cumulocity_bootstrap_username names it: \
                 delete that user or configure another bootstrap username"
            )));
        }
        let record = UserRecord {
            password_hash: hash_secret(password)?,
            thing_name: None,
            superuser: false,
            created_at_ms: 0,
        };
        self.bootstrap = Some((username.to_owned(), record));
        Ok(self)
    }

    /// Whether `username` is the Cumulocity bootstrap user.
    pub fn is_bootstrap(&self, username: &str) -> bool {
        self.bootstrap
            .as_ref()
            .is_some_and(|(name, _)| name == username)
    }

    /// Refuses changing the bootstrap user over the API (it comes from the configuration).
    fn check_managed(&self, username: &str) -> Result<(), UserError> {
        if self.is_bootstrap(username) {
            return Err(UserError::Reserved(username.to_owned()));
        }
        Ok(())
    }

    fn key(username: &str) -> String {
        format!("{USER_PREFIX}{username}")
    }

    fn read(&self, username: &str) -> Result<Option<UserRecord>, UserError> {
        if let Some((name, record)) = &self.bootstrap {
            if name == username {
                return Ok(Some(record.clone()));
            }
        }
        match self.store.kv_get(&Self::key(username))? {
            None => Ok(None),
            Some(bytes) => Envelope::from_bytes(&bytes)
                .and_then(|e| e.payload_as())
                .map(Some)
                .map_err(|e| {
                    UserError::Storage(StorageError::Corrupt {
                        thing: String::new(),
                        seq: 0,
                        reason: format!("user record '{username}': {}", e.0),
                    })
                }),
        }
    }

    fn encode(record: &UserRecord) -> Result<Vec<u8>, UserError> {
        Envelope::new(USER_RECORD, 1, record.created_at_ms, record)
            .and_then(|e| e.to_bytes())
            .map_err(|e| UserError::Invalid(e.0))
    }

    fn view(username: &str, record: &UserRecord) -> UserView {
        UserView {
            username: username.to_owned(),
            thing_name: record.thing_name.clone(),
            superuser: record.superuser,
            created_at_ms: record.created_at_ms,
        }
    }

    /// Creates a user; 409-style error if it exists.
    pub async fn create(
        &self,
        username: &str,
        password: &str,
        thing_name: Option<String>,
        superuser: bool,
        now_ms: u64,
    ) -> Result<UserView, UserError> {
        check_username(username)?;
        check_credential("password", password)?;
        self.check_managed(username)?;
        if let Some(thing) = &thing_name {
            thinghub_actors::thing::validate_thing_name(thing)
                .map_err(|r| UserError::Invalid(r.message))?;
        }
        let record = UserRecord {
            password_hash: hash_secret(password)?,
            thing_name,
            superuser,
            created_at_ms: now_ms,
        };
        if !self
            .store
            .kv_insert_new(&Self::key(username), Self::encode(&record)?)
            .await?
        {
            return Err(UserError::Exists(username.to_owned()));
        }
        Ok(Self::view(username, &record))
    }

    /// Checks that `username` and `password` would make a new user (valid, and the name free)
    /// without hashing anything.
    pub fn check_new(&self, username: &str, password: &str) -> Result<(), UserError> {
        check_username(username)?;
        check_credential("password", password)?;
        self.check_managed(username)?;
        match self.read(username)? {
            Some(_) => Err(UserError::Exists(username.to_owned())),
            None => Ok(()),
        }
    }

    /// One user.
    pub fn get(&self, username: &str) -> Result<UserView, UserError> {
        self.read(username)?
            .map(|record| Self::view(username, &record))
            .ok_or_else(|| UserError::NotFound(username.to_owned()))
    }

    /// All users, in name order (bounded).
    pub fn list(&self) -> Result<Vec<UserView>, UserError> {
        let mut out = Vec::new();
        for (key, bytes) in self.store.kv_scan_prefix(USER_PREFIX, USERS_LIST_MAX)? {
            let username = key.trim_start_matches(USER_PREFIX);
            match Envelope::from_bytes(&bytes).and_then(|e| e.payload_as::<UserRecord>()) {
                Ok(record) => out.push(Self::view(username, &record)),
                Err(e) => tracing::error!(username, error = %e, "unreadable user record skipped"),
            }
        }
        Ok(out)
    }

    /// Changes a user's password, binding or superuser flag (each only if given).
    pub async fn update(
        &self,
        username: &str,
        password: Option<&str>,
        thing_name: Option<Option<String>>,
        superuser: Option<bool>,
    ) -> Result<UserView, UserError> {
        self.check_managed(username)?;
        let mut record = self
            .read(username)?
            .ok_or_else(|| UserError::NotFound(username.to_owned()))?;
        if let Some(password) = password {
            check_credential("password", password)?;
            record.password_hash = hash_secret(password)?;
        }
        if let Some(thing_name) = thing_name {
            if let Some(thing) = &thing_name {
                thinghub_actors::thing::validate_thing_name(thing)
                    .map_err(|r| UserError::Invalid(r.message))?;
            }
            record.thing_name = thing_name;
        }
        if let Some(superuser) = superuser {
            record.superuser = superuser;
        }
        self.store
            .kv_put(&Self::key(username), Self::encode(&record)?)
            .await?;
        self.verified.forget(username);
        Ok(Self::view(username, &record))
    }

    /// Deletes a user.
    pub async fn delete(&self, username: &str) -> Result<(), UserError> {
        self.check_managed(username)?;
        let existed = self.store.kv_remove(&Self::key(username)).await?;
        self.verified.forget(username);
        if existed {
            Ok(())
        } else {
            Err(UserError::NotFound(username.to_owned()))
        }
    }

    /// Checks credentials against the verified-secret cache only (no argon2): `Some` when the
    /// user exists and this exact password verified before. Cheap enough for async code.
    pub fn authenticate_cached(&self, username: &str, password: &str) -> Option<Authenticated> {
        let record = self.read(username).ok().flatten()?;
        if !self.verified.hit(username, password, &record.password_hash) {
            return None;
        }
        Some(self.authenticated(username, record))
    }

    /// Whether `thing` is registered.
    pub fn thing_registered(&self, thing: &str) -> Result<bool, UserError> {
        Ok(self.store.get_thing(thing)?.is_some())
    }

    /// The registered Thing's `mqttClientId`, if it is registered (and its record readable).
    fn thing_client_id(&self, thing: &str) -> Option<String> {
        let bytes = self.store.get_thing(thing).ok().flatten()?;
        match thinghub_actors::codec::decode_index_record(thing, &bytes) {
            Ok(record) => Some(record.mqtt_client_id),
            Err(e) => {
                tracing::error!(thing, error = %e, "unreadable registry record");
                None
            }
        }
    }

    fn authenticated(&self, username: &str, record: UserRecord) -> Authenticated {
        let fingerprint = fingerprint(&record);
        let bootstrap = self.is_bootstrap(username);
        let (thing_name, thing_client_id) = match record.thing_name {
            // The bootstrap user is no Thing's, whatever Thing shares its name.
            _ if bootstrap => (None, None),
            Some(thing) => {
                let client_id = self.thing_client_id(&thing);
                (Some(thing), client_id)
            }
            // A username equal to a registered Thing's name connects as that Thing.
            None => match self.thing_client_id(username) {
                Some(client_id) => (Some(username.to_owned()), Some(client_id)),
                None => (None, None),
            },
        };
        Authenticated {
            thing_name,
            thing_client_id,
            superuser: record.superuser,
            bootstrap,
            fingerprint,
        }
    }

    /// The fingerprint of `username`'s record now (`None` once deleted); see
    /// [`Authenticated::fingerprint`].
    pub fn fingerprint(&self, username: &str) -> Result<Option<[u8; 32]>, UserError> {
        if let Some(thing) = certificate_owner_thing(username) {
            return Ok(self.certificate_rights(thing)?.map(|a| a.fingerprint));
        }
        Ok(self.read(username)?.as_ref().map(fingerprint))
    }

    /// The registered Thing whose `mqttClientId` is `client_id`, if any: that client id is
    /// reserved for the users bound to that Thing.
    /// An error when the index cannot be read: callers refuse rather than guess.
    pub fn client_id_reserved_by(&self, client_id: &str) -> Result<Option<String>, UserError> {
        thinghub_actors::service::client_id_owner(&self.store, client_id).map_err(|e| {
            tracing::error!(%client_id, error = %e, "cannot read the client id index");
            UserError::Storage(e)
        })
    }

    /// The rights `username` has now (`None` once deleted), without checking a password: what
    /// revocation re-evaluates live sessions against.
    pub fn rights(&self, username: &str) -> Result<Option<Authenticated>, UserError> {
        if let Some(thing) = certificate_owner_thing(username) {
            return self.certificate_rights(thing);
        }
        Ok(self
            .read(username)?
            .map(|record| self.authenticated(username, record)))
    }

    /// Checks CONNECT credentials (argon2 on a cache miss: call it off the async workers).
    /// `None` for an unknown user or a wrong password.
    /// An unknown user costs the same argon2 verification as a wrong password (against a dummy
    /// hash), so usernames cannot be told apart by timing.
    pub fn authenticate(&self, username: &str, password: &str) -> Option<Authenticated> {
        let record = match self.read(username) {
            Ok(record) => record,
            Err(e) => {
                tracing::error!(username, error = %e, "cannot read user");
                None
            }
        };
        let hash = record.as_ref().map(|r| r.password_hash.as_str());
        let cached =
            |hash: Option<&str>| hash.is_some_and(|h| self.verified.hit(username, password, h));
        if !cached(hash) {
            let _gate = self.argon2_gate.lock().unwrap_or_else(|p| p.into_inner());
            // Someone else may have verified the same secret while we waited.
            if !cached(hash) {
                if !verify_known_secret(hash, password) {
                    return None;
                }
                if let Some(hash) = hash {
                    self.verified.remember(username, password, hash);
                }
            }
        }
        record.map(|record| self.authenticated(username, record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinghub_storage::StoreConfig;

    #[tokio::test]
    async fn users_are_created_once_verified_updated_and_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let users = MqttUsers::new(Store::open(&StoreConfig::new(dir.path())).expect("open"));
        users
            .create("dev1", "pw1", Some("pump-1".into()), false, 0)
            .await
            .expect("create");
        assert!(matches!(
            users.create("dev1", "x", None, false, 0).await,
            Err(UserError::Exists(_))
        ));
        assert_eq!(
            users.authenticate("dev1", "pw1"),
            Some(Authenticated {
                thing_name: Some("pump-1".into()),
                thing_client_id: None,
                superuser: false,
                bootstrap: false,
                fingerprint: users.fingerprint("dev1").expect("read").expect("exists"),
            }),
            "bound to a Thing that is not registered: no client id to connect with"
        );
        assert_eq!(users.authenticate("dev1", "nope"), None);
        assert_eq!(users.authenticate("ghost", "pw1"), None);
        users
            .update("dev1", Some("pw2"), None, Some(true))
            .await
            .expect("update");
        assert_eq!(
            users.authenticate("dev1", "pw1"),
            None,
            "the cached old password is forgotten"
        );
        assert!(
            users
                .authenticate("dev1", "pw2")
                .expect("new password")
                .superuser
        );
        assert_eq!(users.list().expect("list").len(), 1);
        // A verification that started before the password change and remembers the old
        // password after it cannot make the old password work again.
        let old_hash = hash_secret("pw1").expect("hash");
        users.verified.remember("dev1", "pw1", &old_hash);
        assert_eq!(users.authenticate_cached("dev1", "pw1"), None);
        users.delete("dev1").await.expect("delete");
        assert_eq!(users.authenticate("dev1", "pw2"), None);
        assert!(matches!(
            users.delete("dev1").await,
            Err(UserError::NotFound(_))
        ));
        for bad in ["", "a/b", "#", "dev+1"] {
            assert!(
                matches!(
                    users.create(bad, "pw", None, false, 0).await,
                    Err(UserError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_bootstrap_user_authenticates_as_bootstrap_and_is_not_managed_over_the_api() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        MqttUsers::new(store.clone())
            .create("taken", "pw", None, false, 0)
            .await
            .expect("create");
        assert!(
            matches!(
                MqttUsers::new(store.clone()).with_bootstrap("taken", "boot"),
                Err(UserError::Invalid(_))
            ),
            "a stored user of that name would be hidden"
        );
        let users = MqttUsers::new(store)
            .with_bootstrap("boot", "boot-pw")
            .expect("bootstrap");
        let auth = users
            .authenticate("boot", "boot-pw")
            .expect("authenticates");
        assert!(auth.bootstrap && !auth.superuser && auth.thing_name.is_none());
        assert_eq!(users.authenticate("boot", "wrong"), None);
        assert!(!users.authenticate("taken", "pw").expect("plain").bootstrap);
        assert!(matches!(
            users.create("boot", "x", None, false, 0).await,
            Err(UserError::Reserved(_))
        ));
        assert!(matches!(
            users.update("boot", None, None, Some(true)).await,
            Err(UserError::Reserved(_))
        ));
        assert!(matches!(
            users.delete("boot").await,
            Err(UserError::Reserved(_))
        ));
        assert!(users
            .list()
            .expect("list")
            .iter()
            .all(|u| u.username != "boot"));
    }
}
