//! Device registrations: Cumulocity's credential bootstrap (step 0). An operator registers a
//! device id; the device, connected with the bootstrap user, asks for credentials on `s/ucr`
//! (WAITING_FOR_CONNECTION -> PENDING_ACCEPTANCE); the operator accepts (ACCEPTED); the next
//! request is answered once with new credentials (`credentialsIssuedAt` set). Stored in the
//! `kv` tree as `c8yreg/{id}`; each change is durable before it is answered.

use serde::{Deserialize, Serialize};
use thinghub_storage::{Envelope, StorageError, Store};

/// The `kv` key prefix of stored registrations.
pub const PREFIX: &str = "c8yreg/";
const RECORD: &str = "DeviceRegistration";

/// Where a registration is in the bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RegistrationStatus {
    /// Registered; the device has not asked for credentials yet.
    WaitingForConnection,
    /// The device asked; an operator has to accept it.
    PendingAcceptance,
    /// Accepted: the device's next request gets its credentials (once).
    Accepted,
}

impl RegistrationStatus {
    /// Parses the API's spelling.
    pub fn parse(text: &str) -> Option<RegistrationStatus> {
        match text {
            "WAITING_FOR_CONNECTION" => Some(RegistrationStatus::WaitingForConnection),
            "PENDING_ACCEPTANCE" => Some(RegistrationStatus::PendingAcceptance),
            "ACCEPTED" => Some(RegistrationStatus::Accepted),
            _ => None,
        }
    }
}

/// One device registration (stored and shown as is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// The device id: its MQTT client id (plain or `d:{id}`) and its Thing's name.
    pub id: String,
    /// Where it is in the bootstrap.
    pub status: RegistrationStatus,
    /// Unix ms of the registration.
    pub created_at: u64,
    /// Unix ms of the device's first credentials request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<u64>,
    /// The address that request came from (is it the device you expect?).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_from: Option<String>,
    /// Unix ms of the acceptance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<u64>,
    /// Unix ms the credentials were sent; none are sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_issued_at: Option<u64>,
    /// The MQTT user the credentials are for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The address the credentials were sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_to: Option<String>,
}

/// What a device's credentials request (`s/ucr`) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// No registration for this id: nothing is sent.
    Unknown,
    /// Not accepted yet (the request moved it to PENDING_ACCEPTANCE if it was waiting).
    Pending,
    /// Accepted, credentials not issued: issue them.
    Issue,
    /// Accepted, but this request comes from another address than the one the operator
    /// accepted: the registration is pending again, showing the new address.
    Moved,
    /// Credentials were issued already: nothing is sent.
    Issued,
}

/// Why a registration operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// A registration with that id exists.
    #[error("a device registration for '{0}' exists already")]
    Exists(String),
    /// `cumulocity_registrations_max` registrations exist.
    #[error("{0} device registrations exist already (cumulocity_registrations_max)")]
    Full(usize),
    /// No such registration.
    #[error("no device registration for '{0}'")]
    NotFound(String),
    /// Accepting a device that has not asked yet.
    #[error("device '{0}' has not asked for credentials yet (status WAITING_FOR_CONNECTION): accept it once it is PENDING_ACCEPTANCE")]
    NotRequested(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Whether a stored registration decodes (`thinghub check`).
pub fn check_stored_registration(bytes: &[u8]) -> Result<(), String> {
    decode(bytes).map(|_| ())
}

fn decode(bytes: &[u8]) -> Result<Registration, String> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| e.0)?;
    if envelope.event_type != RECORD {
        return Err(format!(
            "expected a {RECORD} record, found {}",
            envelope.event_type
        ));
    }
    envelope.payload_as::<Registration>().map_err(|e| e.0)
}

/// The registrations, with their count (bounded by `cumulocity_registrations_max`).
pub struct Registrations {
    store: Store,
    max: usize,
    /// How many are stored; held across each read-modify-write so changes do not interleave.
    count: tokio::sync::Mutex<usize>,
}

impl Registrations {
    /// The registrations kept in `store` (counted once here).
    pub fn open(store: Store, max: usize) -> Result<Registrations, StorageError> {
        let count = store.kv_keys_prefix(PREFIX, usize::MAX)?.len();
        Ok(Registrations {
            store,
            max,
            count: tokio::sync::Mutex::new(count),
        })
    }

    fn key(id: &str) -> String {
        format!("{PREFIX}{id}")
    }

    fn read(&self, id: &str) -> Result<Option<Registration>, RegistrationError> {
        match self.store.kv_get(&Self::key(id))? {
            None => Ok(None),
            Some(bytes) => decode(&bytes).map(Some).map_err(|reason| {
                RegistrationError::Storage(StorageError::Corrupt {
                    thing: id.to_owned(),
                    seq: 0,
                    reason: format!("device registration: {reason}"),
                })
            }),
        }
    }

    async fn write(
        &self,
        registration: &Registration,
        now_ms: u64,
    ) -> Result<(), RegistrationError> {
        let bytes = Envelope::new(RECORD, 1, now_ms, registration)
            .and_then(|e| e.to_bytes())
            .map_err(|e| RegistrationError::Invalid(e.0))?;
        self.store
            .kv_put(&Self::key(&registration.id), bytes)
            .await?;
        Ok(())
    }

    /// Registers `id` (a valid Thing name) as WAITING_FOR_CONNECTION.
    pub async fn create(&self, id: &str, now_ms: u64) -> Result<Registration, RegistrationError> {
        thinghub_actors::thing::validate_thing_name(id)
            .map_err(|r| RegistrationError::Invalid(format!("id: {}", r.message)))?;
        let mut count = self.count.lock().await;
        if self.read(id)?.is_some() {
            return Err(RegistrationError::Exists(id.to_owned()));
        }
        if *count >= self.max {
            return Err(RegistrationError::Full(self.max));
        }
        let registration = Registration {
            id: id.to_owned(),
            status: RegistrationStatus::WaitingForConnection,
            created_at: now_ms,
            requested_at: None,
            requested_from: None,
            accepted_at: None,
            credentials_issued_at: None,
            username: None,
            issued_to: None,
        };
        self.write(&registration, now_ms).await?;
        *count += 1;
        Ok(registration)
    }

    /// One registration.
    pub fn get(&self, id: &str) -> Result<Registration, RegistrationError> {
        self.read(id)?
            .ok_or_else(|| RegistrationError::NotFound(id.to_owned()))
    }

    /// A page in id order after `after`: at most `limit` registrations are read, those with
    /// `status` (if given) returned, and the cursor to go on with (`None` at the end).
    pub fn list(
        &self,
        status: Option<RegistrationStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Registration>, Option<String>), RegistrationError> {
        let page = self.store.kv_page(PREFIX, after, limit)?;
        let mut items = Vec::with_capacity(page.items.len());
        for (id, bytes) in page.items {
            let registration = decode(&bytes).map_err(|reason| {
                RegistrationError::Storage(StorageError::Corrupt {
                    thing: id,
                    seq: 0,
                    reason: format!("device registration: {reason}"),
                })
            })?;
            if status.is_none_or(|s| s == registration.status) {
                items.push(registration);
            }
        }
        let next = page.next;
        Ok((items, next))
    }

    /// Accepts a device that asked (PENDING_ACCEPTANCE -> ACCEPTED); accepting again changes
    /// nothing.
    pub async fn accept(&self, id: &str, now_ms: u64) -> Result<Registration, RegistrationError> {
        let _count = self.count.lock().await;
        let mut registration = self.get(id)?;
        match registration.status {
            RegistrationStatus::WaitingForConnection => {
                Err(RegistrationError::NotRequested(id.to_owned()))
            }
            RegistrationStatus::Accepted => Ok(registration),
            RegistrationStatus::PendingAcceptance => {
                registration.status = RegistrationStatus::Accepted;
                registration.accepted_at = Some(now_ms);
                self.write(&registration, now_ms).await?;
                Ok(registration)
            }
        }
    }

    /// Deletes a registration (credentials already issued stay valid: delete their user).
    pub async fn delete(&self, id: &str) -> Result<(), RegistrationError> {
        let mut count = self.count.lock().await;
        if !self.store.kv_remove(&Self::key(id)).await? {
            return Err(RegistrationError::NotFound(id.to_owned()));
        }
        *count = count.saturating_sub(1);
        Ok(())
    }

    /// The device `id` asked for credentials: what to do about it. A first request moves a
    /// waiting registration to PENDING_ACCEPTANCE (written only then: a device polling every
    /// few seconds costs no writes).
    pub async fn requested(
        &self,
        id: &str,
        now_ms: u64,
        from: &str,
        subscribed: bool,
    ) -> Result<Request, RegistrationError> {
        let _count = self.count.lock().await;
        let Some(mut registration) = self.read(id)? else {
            return Ok(Request::Unknown);
        };
        Ok(match registration.status {
            RegistrationStatus::WaitingForConnection => {
                registration.status = RegistrationStatus::PendingAcceptance;
                registration.requested_at = Some(now_ms);
                registration.requested_from = Some(from.to_owned());
                self.write(&registration, now_ms).await?;
                Request::Pending
            }
            // The address an operator reviews stays the first one asking: anyone with the
            // shared bootstrap password could otherwise put theirs there just before the
            // acceptance (and make a write per request). A device that moved meanwhile is
            // pending again after the acceptance, showing its new address.
            RegistrationStatus::PendingAcceptance => Request::Pending,
            RegistrationStatus::Accepted if registration.credentials_issued_at.is_some() => {
                Request::Issued
            }
            RegistrationStatus::Accepted
                if ip_of(registration.requested_from.as_deref()) != ip_of(Some(from)) =>
            {
                // Whoever knows the shared bootstrap password may ask for any id: the
                // credentials go only to the address the operator saw when accepting. Only a
                // connection that could receive them moves the registration back.
                if !subscribed {
                    return Ok(Request::Moved);
                }
                registration.status = RegistrationStatus::PendingAcceptance;
                registration.requested_from = Some(from.to_owned());
                registration.requested_at = Some(now_ms);
                registration.accepted_at = None;
                self.write(&registration, now_ms).await?;
                Request::Moved
            }
            RegistrationStatus::Accepted => Request::Issue,
        })
    }

    /// Records (durably) that `id`'s credentials, for `username`, are being sent: `false` if
    /// the registration was deleted or its credentials issued meanwhile (then send nothing).
    pub async fn issued(
        &self,
        id: &str,
        username: &str,
        to: &str,
        now_ms: u64,
    ) -> Result<bool, RegistrationError> {
        let _count = self.count.lock().await;
        let Some(mut registration) = self.read(id)? else {
            return Ok(false);
        };
        if registration.status != RegistrationStatus::Accepted
            || registration.credentials_issued_at.is_some()
        {
            return Ok(false);
        }
        registration.credentials_issued_at = Some(now_ms);
        registration.username = Some(username.to_owned());
        registration.issued_to = Some(to.to_owned());
        self.write(&registration, now_ms).await?;
        Ok(true)
    }

    /// Takes back an issuance whose credentials could not be made (nothing was sent): the
    /// device's next request tries again.
    pub async fn unissue(&self, id: &str, now_ms: u64) -> Result<(), RegistrationError> {
        let _count = self.count.lock().await;
        let Some(mut registration) = self.read(id)? else {
            return Ok(());
        };
        registration.credentials_issued_at = None;
        registration.username = None;
        registration.issued_to = None;
        self.write(&registration, now_ms).await
    }
}

/// The IP address of `host:port` (the port changes with every connection), an IPv4-mapped
/// IPv6 address as its IPv4 one.
fn ip_of(address: Option<&str>) -> Option<String> {
    let address = address?;
    Some(match address.parse::<std::net::SocketAddr>() {
        Ok(socket) => socket.ip().to_canonical().to_string(),
        Err(_) => address
            .rsplit_once(':')
            .map_or(address, |(ip, _)| ip)
            .to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinghub_storage::StoreConfig;

    async fn ask(registrations: &Registrations, id: &str, at: u64, from: &str) -> Request {
        registrations
            .requested(id, at, from, true)
            .await
            .expect("ask")
    }

    fn open(dir: &std::path::Path, max: usize) -> Registrations {
        Registrations::open(Store::open(&StoreConfig::new(dir)).expect("open"), max)
            .expect("registrations")
    }

    #[tokio::test]
    async fn a_registration_goes_waiting_pending_accepted_issued_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registrations = open(dir.path(), 10);
        // Given a registered device that has not asked yet
        registrations.create("dev-1", 1).await.expect("create");
        assert!(matches!(
            registrations.accept("dev-1", 2).await,
            Err(RegistrationError::NotRequested(_))
        ));
        // When it asks, it is pending; asking again changes nothing
        assert_eq!(
            ask(&registrations, "dev-1", 3, "127.0.0.1:5000").await,
            Request::Pending
        );
        assert_eq!(
            ask(&registrations, "dev-1", 4, "127.0.0.1:5000").await,
            Request::Pending
        );
        let pending = registrations.get("dev-1").expect("get");
        assert_eq!(pending.status, RegistrationStatus::PendingAcceptance);
        assert_eq!(pending.requested_at, Some(3));
        assert_eq!(pending.requested_from.as_deref(), Some("127.0.0.1:5000"));
        // Then accepted, its next request issues credentials, once
        let accepted = registrations.accept("dev-1", 5).await.expect("accept");
        assert_eq!(accepted.status, RegistrationStatus::Accepted);
        assert_eq!(
            registrations.accept("dev-1", 6).await.expect("again"),
            accepted
        );
        assert_eq!(
            ask(&registrations, "dev-1", 7, "127.0.0.1:5000").await,
            Request::Issue
        );
        assert!(registrations
            .issued("dev-1", "device_dev-1", "127.0.0.1:5001", 8)
            .await
            .expect("issue"));
        assert!(!registrations
            .issued("dev-1", "device_dev-1", "127.0.0.1:5001", 9)
            .await
            .expect("twice"));
        assert_eq!(
            ask(&registrations, "dev-1", 10, "127.0.0.1:5000").await,
            Request::Issued
        );
        let issued = registrations.get("dev-1").expect("get");
        assert_eq!(issued.credentials_issued_at, Some(8));
        assert_eq!(issued.username.as_deref(), Some("device_dev-1"));
        assert_eq!(issued.issued_to.as_deref(), Some("127.0.0.1:5001"));
        // An unknown device's request finds nothing
        assert_eq!(
            ask(&registrations, "ghost", 11, "127.0.0.1:5000").await,
            Request::Unknown
        );
        assert!(!registrations
            .issued("ghost", "device_ghost", "127.0.0.1:5001", 12)
            .await
            .expect("issue"));
        // An issuance taken back is tried again by the next request
        registrations.unissue("dev-1", 13).await.expect("unissue");
        assert_eq!(
            ask(&registrations, "dev-1", 14, "127.0.0.1:5002").await,
            Request::Issue
        );
        // A request from another address after the acceptance is pending again, showing it
        assert_eq!(
            ask(&registrations, "dev-1", 15, "10.9.9.9:4000").await,
            Request::Moved
        );
        let moved = registrations.get("dev-1").expect("get");
        assert_eq!(moved.status, RegistrationStatus::PendingAcceptance);
        assert_eq!(moved.requested_from.as_deref(), Some("10.9.9.9:4000"));
        // While pending, the address an operator reviews is the first one asking (the same
        // IP in its IPv4-mapped form is the same address)
        ask(&registrations, "dev-1", 16, "[::ffff:10.9.9.9]:4100").await;
        ask(&registrations, "dev-1", 17, "10.7.7.7:4000").await;
        assert_eq!(
            registrations
                .get("dev-1")
                .expect("get")
                .requested_from
                .as_deref(),
            Some("10.9.9.9:4000")
        );
        registrations.accept("dev-1", 18).await.expect("accept");
        assert_eq!(
            ask(&registrations, "dev-1", 18, "[::ffff:10.9.9.9]:4100").await,
            Request::Issue
        );
        // Accepted, a request from elsewhere by a connection that could not receive the
        // answer changes nothing
        assert_eq!(
            registrations
                .requested("dev-1", 19, "10.6.6.6:1", false)
                .await
                .expect("ask"),
            Request::Moved
        );
        assert_eq!(
            registrations.get("dev-1").expect("get").status,
            RegistrationStatus::Accepted
        );
    }

    #[tokio::test]
    async fn registrations_are_bounded_unique_valid_listed_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let registrations = open(dir.path(), 3);
            for id in ["a", "b", "c"] {
                registrations.create(id, 1).await.expect("create");
            }
            assert!(matches!(
                registrations.create("a", 1).await,
                Err(RegistrationError::Exists(_))
            ));
            assert!(matches!(
                registrations.create("d", 1).await,
                Err(RegistrationError::Full(3))
            ));
            for bad in ["", "a/b", "x y", "+"] {
                assert!(
                    matches!(
                        registrations.create(bad, 1).await,
                        Err(RegistrationError::Invalid(_))
                    ),
                    "{bad:?}"
                );
            }
            ask(&registrations, "b", 2, "127.0.0.1:5000").await;
        }
        // The count and the records survive a reopen
        let registrations = open(dir.path(), 3);
        assert!(matches!(
            registrations.create("d", 1).await,
            Err(RegistrationError::Full(3))
        ));
        let (page, next) = registrations.list(None, None, 2).expect("list");
        assert_eq!(
            page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let (rest, end) = registrations.list(None, next.as_deref(), 2).expect("list");
        assert_eq!(
            rest.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(end, None);
        let (pending, _) = registrations
            .list(Some(RegistrationStatus::PendingAcceptance), None, 10)
            .expect("list");
        assert_eq!(
            pending.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        registrations.delete("a").await.expect("delete");
        assert!(matches!(
            registrations.delete("a").await,
            Err(RegistrationError::NotFound(_))
        ));
        registrations.create("d", 1).await.expect("room again");
    }
}
