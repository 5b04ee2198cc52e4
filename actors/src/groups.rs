//! Thing groups: named sets of Things that jobs can target.
//!
//! Stored in `kv`: `group/{name}` (the [`GroupRecord`], an envelope `ThingGroup` v1),
//! `groupmember/{group}/{thing}` and its mirror `thinggroup/{thing}/{group}` (empty values),
//! written together in one atomic batch and synced before the answer. A group's membership is
//! its own: deleting a Thing leaves it listed (a job targeting the group skips Things that
//! are not registered), re-registering it keeps its groups.

use serde::{Deserialize, Serialize};
use thinghub_storage::{Envelope, StorageError, Store};

use crate::thing::{validate_thing_name, Rejection, RejectionKind};

const GROUP_PREFIX: &str = "group/";
const MEMBER_PREFIX: &str = "groupmember/";
const OF_THING_PREFIX: &str = "thinggroup/";
/// `event_type` of a stored group.
pub const THING_GROUP: &str = "ThingGroup";
/// Longest group name, bytes (as AWS IoT).
pub const GROUP_NAME_BYTES_MAX: usize = 128;
/// Longest description, bytes.
pub const GROUP_DESCRIPTION_BYTES_MAX: usize = 2028;
/// Records a listing reads from storage at a time.
const SCAN_PAGE: usize = 256;

/// A group as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Its name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Unix ms.
    pub created_at_ms: u64,
}

impl GroupRecord {
    /// The management API's view.
    pub fn to_json(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "groupName": self.name,
            "createdAt": self.created_at_ms,
        });
        if let Some(description) = &self.description {
            body["description"] = description.clone().into();
        }
        body
    }
}

/// `thinghub check`: a stored group decodes.
pub fn decode_group(bytes: &[u8]) -> Result<GroupRecord, String> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| e.0)?;
    match (envelope.event_type.as_str(), envelope.event_version) {
        (THING_GROUP, 1) => envelope.payload_as().map_err(|e| e.0),
        (other, version) => Err(format!("unknown record {other} v{version}")),
    }
}

/// Key prefixes of the group records (for `thinghub check`).
pub const PREFIXES: [&str; 3] = [GROUP_PREFIX, MEMBER_PREFIX, OF_THING_PREFIX];

/// The groups of a node (cheap to clone).
#[derive(Clone)]
pub struct Groups {
    store: Store,
}

fn storage(e: StorageError) -> Rejection {
    tracing::error!(error = %e, "group storage failed");
    Rejection::new(RejectionKind::Unavailable, format!("storage failed: {e}"))
}

/// Checks a group name: 1..=128 characters of `[a-zA-Z0-9:_-]` (as AWS IoT).
pub fn validate_group_name(name: &str) -> Result<(), Rejection> {
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
    if name.is_empty() || name.len() > GROUP_NAME_BYTES_MAX || !valid {
        return Err(Rejection::bad_request(format!(
            "invalid groupName '{name}': 1..={GROUP_NAME_BYTES_MAX} characters of [a-zA-Z0-9:_-]"
        )));
    }
    Ok(())
}

fn not_found(name: &str) -> Rejection {
    Rejection::new(
        RejectionKind::ThingNotFound,
        format!("thing group '{name}' not found"),
    )
}

/// Reads names stored as the last level of keys under `prefix`, after `after`, in pages.
fn names_under(
    store: &Store,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StorageError> {
    let mut out = Vec::new();
    let mut from = after.map(|a| format!("{prefix}{a}"));
    while out.len() < limit {
        let page = store.kv_scan_prefix_after(prefix, from.as_deref(), SCAN_PAGE.min(limit))?;
        let Some((last, _)) = page.last() else { break };
        from = Some(last.clone());
        out.extend(
            page.iter()
                .map(|(key, _)| key[prefix.len()..].to_owned())
                .take(limit - out.len()),
        );
    }
    Ok(out)
}

/// Whether `thing` is a member of `group`.
pub fn is_member(store: &Store, group: &str, thing: &str) -> Result<bool, StorageError> {
    Ok(store
        .kv_get(&format!("{MEMBER_PREFIX}{group}/{thing}"))?
        .is_some())
}

/// Up to `limit` members of `group` after `after`, in name order.
pub fn members_after(
    store: &Store,
    group: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StorageError> {
    names_under(store, &format!("{MEMBER_PREFIX}{group}/"), after, limit)
}

impl Groups {
    /// The groups stored in `store`.
    pub fn new(store: Store) -> Groups {
        Groups { store }
    }

    /// Creates a group: 409 if it exists.
    pub async fn create(
        &self,
        name: &str,
        description: Option<String>,
        now_ms: u64,
    ) -> Result<GroupRecord, Rejection> {
        validate_group_name(name)?;
        if description
            .as_ref()
            .is_some_and(|d| d.len() > GROUP_DESCRIPTION_BYTES_MAX)
        {
            return Err(Rejection::bad_request(format!(
                "description must be at most {GROUP_DESCRIPTION_BYTES_MAX} bytes"
            )));
        }
        let record = GroupRecord {
            name: name.to_owned(),
            description,
            created_at_ms: now_ms,
        };
        let bytes = Envelope::new(THING_GROUP, 1, now_ms, &record)
            .and_then(|e| e.to_bytes())
            .map_err(|e| Rejection::new(RejectionKind::Internal, e.0))?;
        let created = self
            .store
            .kv_insert_new(&format!("{GROUP_PREFIX}{name}"), bytes)
            .await
            .map_err(storage)?;
        if !created {
            return Err(Rejection::new(
                RejectionKind::AlreadyExists,
                format!("thing group '{name}' already exists"),
            ));
        }
        Ok(record)
    }

    /// One group.
    pub fn get(&self, name: &str) -> Result<GroupRecord, Rejection> {
        validate_group_name(name)?;
        let bytes = self
            .store
            .kv_get(&format!("{GROUP_PREFIX}{name}"))
            .map_err(storage)?
            .ok_or_else(|| not_found(name))?;
        decode_group(&bytes).map_err(|e| {
            Rejection::new(
                RejectionKind::Unavailable,
                format!("thing group '{name}' cannot be read: {e}"),
            )
        })
    }

    /// Groups in name order after `after`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<GroupRecord>, Rejection> {
        let names = names_under(&self.store, GROUP_PREFIX, after, limit).map_err(storage)?;
        names.iter().map(|name| self.get(name)).collect()
    }

    /// Deletes a group and its memberships (the Things stay).
    pub async fn delete(&self, name: &str) -> Result<(), Rejection> {
        self.get(name)?;
        let members = names_under(
            &self.store,
            &format!("{MEMBER_PREFIX}{name}/"),
            None,
            usize::MAX,
        )
        .map_err(storage)?;
        let mut changes: Vec<(String, Option<Vec<u8>>)> = members
            .iter()
            .flat_map(|thing| {
                [
                    (format!("{MEMBER_PREFIX}{name}/{thing}"), None),
                    (format!("{OF_THING_PREFIX}{thing}/{name}"), None),
                ]
            })
            .collect();
        changes.push((format!("{GROUP_PREFIX}{name}"), None));
        self.store.kv_apply_behind(changes).map_err(storage)?;
        self.store.sync().await.map_err(storage)
    }

    /// Adds `thing` to the group; returns whether it was not a member yet.
    pub async fn add(&self, group: &str, thing: &str) -> Result<bool, Rejection> {
        self.get(group)?;
        validate_thing_name(thing)?;
        let key = format!("{MEMBER_PREFIX}{group}/{thing}");
        if self.store.kv_get(&key).map_err(storage)?.is_some() {
            return Ok(false);
        }
        self.store
            .kv_apply_behind(vec![
                (key, Some(Vec::new())),
                (
                    format!("{OF_THING_PREFIX}{thing}/{group}"),
                    Some(Vec::new()),
                ),
            ])
            .map_err(storage)?;
        self.store.sync().await.map_err(storage)?;
        Ok(true)
    }

    /// Removes `thing` from the group (404 if it is not a member).
    pub async fn remove(&self, group: &str, thing: &str) -> Result<(), Rejection> {
        self.get(group)?;
        let key = format!("{MEMBER_PREFIX}{group}/{thing}");
        if self.store.kv_get(&key).map_err(storage)?.is_none() {
            return Err(Rejection::new(
                RejectionKind::ThingNotFound,
                format!("thing '{thing}' is not in group '{group}'"),
            ));
        }
        self.store
            .kv_apply_behind(vec![
                (key, None),
                (format!("{OF_THING_PREFIX}{thing}/{group}"), None),
            ])
            .map_err(storage)?;
        self.store.sync().await.map_err(storage)
    }

    /// A group's Things in name order after `after`.
    pub fn members(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, Rejection> {
        self.get(group)?;
        names_under(
            &self.store,
            &format!("{MEMBER_PREFIX}{group}/"),
            after,
            limit,
        )
        .map_err(storage)
    }

    /// The groups `thing` is in, in name order.
    pub fn of_thing(&self, thing: &str, limit: usize) -> Result<Vec<String>, Rejection> {
        names_under(
            &self.store,
            &format!("{OF_THING_PREFIX}{thing}/"),
            None,
            limit,
        )
        .map_err(storage)
    }
}
