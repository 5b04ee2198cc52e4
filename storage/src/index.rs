//! Indexes kept beside the log: `things` (the registry listing), `client_ids` (which Thing an
//! MQTT client id belongs to), `deadlines` (timers) and `alarms` (the fleet-wide alarm listing,
//! keyed `{thing}/{type}`).
//!
//! Both are derived from the log: they change in an [`AppendBatch`](crate::AppendBatch), written
//! right after its events (a new deadline right before them), and become durable in the same
//! group commit. A crash between the writes leaves the `things` index one change behind the log
//! (never behind an acknowledged change) and at worst an extra deadline entry (which fires,
//! finds nothing due, and is removed); the Thing's actor repairs its entries on activation.

use crate::{thing_key, StorageError, Store};

/// An index change carried by an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexOp {
    /// Insert or replace the Thing's registry record (opaque bytes, domain-encoded).
    PutThing(Vec<u8>),
    /// Remove the Thing from the registry listing.
    RemoveThing,
    /// Register a deadline for the Thing at `at_ms` (Unix ms).
    PutDeadline {
        /// When it is due, Unix milliseconds.
        at_ms: u64,
    },
    /// Remove a deadline registered earlier.
    RemoveDeadline {
        /// The `at_ms` it was registered with.
        at_ms: u64,
    },
    /// Record that this MQTT client id belongs to the Thing (the `client_ids` index).
    PutClientId(String),
    /// Forget that this MQTT client id belongs to the Thing (only if it still does).
    RemoveClientId(String),
    /// Insert or replace the Thing's alarm of a type (opaque bytes, domain-encoded).
    PutAlarm {
        /// The alarm's type.
        alarm_type: String,
        /// The record.
        record: Vec<u8>,
    },
    /// Remove the Thing's alarm of a type from the fleet-wide listing.
    RemoveAlarm {
        /// The alarm's type.
        alarm_type: String,
    },
    /// The Thing's device is connected (the `online` index: what a crash left connected).
    PutOnline {
        /// Its MQTT client id.
        client_id: String,
        /// The broker's id of the connection.
        connection_id: u64,
    },
    /// The Thing's device is not connected.
    RemoveOnline,
}

/// A Thing the `online` index holds as connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineEntry {
    /// The Thing.
    pub thing: String,
    /// Its MQTT client id.
    pub client_id: String,
    /// The broker's id of the connection.
    pub connection_id: u64,
}

/// The outcome of [`Store::claim_client_id`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The id was free and is now the Thing's.
    Claimed,
    /// The entry already named the Thing.
    Held,
    /// Another Thing's entry holds it (possibly stale: check that Thing's registry record).
    HeldBy(String),
}

/// A deadline read from the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlineEntry {
    /// When it is due, Unix milliseconds.
    pub at_ms: u64,
    /// The Thing that owns it.
    pub thing: String,
}

/// The `alarms` key of a Thing's alarm: `{thing}/{type}` (neither may hold a `/`).
pub(crate) fn alarm_key(thing: &str, alarm_type: &str) -> Vec<u8> {
    format!("{thing}/{alarm_type}").into_bytes()
}

pub(crate) fn deadline_key(at_ms: u64, thing_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + thing_key.len());
    key.extend_from_slice(&at_ms.to_be_bytes());
    key.extend_from_slice(thing_key);
    key
}

impl Store {
    /// Lists up to `limit` registry records with names after `after`, in name order.
    pub fn list_things(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let iter = match after {
            Some(after) => self.inner.things.range::<&[u8], _>((
                std::ops::Bound::Excluded(after.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.inner.things.iter(),
        };
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (key, value) = item?;
            let name = String::from_utf8(key.to_vec()).map_err(|_| StorageError::Corrupt {
                thing: String::from_utf8_lossy(&key).into_owned(),
                seq: 0,
                reason: "registry key is not UTF-8".into(),
            })?;
            out.push((name, value.to_vec()));
        }
        Ok(out)
    }

    /// The registry record of one Thing, if it is registered.
    pub fn get_thing(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.inner.things.get(name.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Alarm records in key order (`{thing}/{type}`) after the key `after`, reading at most
    /// `scan_max` entries and keeping those `keep` accepts, up to `limit`. Returns them and the
    /// key to go on from (`None` at the end of the index).
    #[allow(clippy::type_complexity)]
    pub fn scan_alarms(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
        scan_max: usize,
        limit: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<(Vec<(String, Vec<u8>)>, Option<String>), StorageError> {
        let start = match (after, prefix) {
            (Some(after), _) => std::ops::Bound::Excluded(after.as_bytes().to_vec()),
            (None, Some(prefix)) => std::ops::Bound::Included(prefix.as_bytes().to_vec()),
            (None, None) => std::ops::Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut scanned = 0;
        for item in self
            .inner
            .alarms
            .range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded))
        {
            let (key, value) = item?;
            if prefix.is_some_and(|p| !key.starts_with(p.as_bytes())) {
                return Ok((out, None));
            }
            let key = String::from_utf8(key.to_vec()).map_err(|_| StorageError::Corrupt {
                thing: String::from_utf8_lossy(&key).into_owned(),
                seq: 0,
                reason: "alarm index key is not UTF-8".into(),
            })?;
            scanned += 1;
            let kept = keep(&value);
            if out.len() + usize::from(kept) >= limit || scanned >= scan_max {
                if kept {
                    out.push((key.clone(), value.to_vec()));
                }
                return Ok((out, Some(key)));
            }
            if kept {
                out.push((key, value.to_vec()));
            }
        }
        Ok((out, None))
    }

    /// Up to `limit` Things the `online` index holds as connected, in name order after `after`.
    pub fn online_things(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<OnlineEntry>, StorageError> {
        let iter = match after {
            Some(after) => self.inner.online.range::<&[u8], _>((
                std::ops::Bound::Excluded(after.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.inner.online.iter(),
        };
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (key, value) = item?;
            let corrupt = |reason: &str| StorageError::Corrupt {
                thing: String::from_utf8_lossy(&key).into_owned(),
                seq: 0,
                reason: format!("online index: {reason}"),
            };
            let thing = String::from_utf8(key.to_vec()).map_err(|_| corrupt("key is not UTF-8"))?;
            let (id, client) = value
                .split_first_chunk::<8>()
                .ok_or_else(|| corrupt("value too short"))?;
            out.push(OnlineEntry {
                thing,
                client_id: String::from_utf8(client.to_vec())
                    .map_err(|_| corrupt("client id is not UTF-8"))?,
                connection_id: u64::from_be_bytes(*id),
            });
        }
        Ok(out)
    }

    /// The `online` entry of one Thing.
    pub fn online_entry(&self, thing: &str) -> Result<Option<(String, u64)>, StorageError> {
        Ok(self.inner.online.get(thing.as_bytes())?.and_then(|value| {
            let (id, client) = value.split_first_chunk::<8>()?;
            Some((
                String::from_utf8_lossy(client).into_owned(),
                u64::from_be_bytes(*id),
            ))
        }))
    }

    /// Number of registered Things (walks the index: O(n)).
    pub fn count_things(&self) -> usize {
        self.inner.things.len()
    }

    /// Deadlines due at or before `until_ms`, earliest first, at most `limit`.
    pub fn due_deadlines(
        &self,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<DeadlineEntry>, StorageError> {
        let end = (until_ms.saturating_add(1)).to_be_bytes();
        let mut out = Vec::new();
        for item in self.inner.deadlines.range(..end.as_slice()).take(limit) {
            let (key, _) = item?;
            out.push(parse_deadline_key(&key)?);
        }
        Ok(out)
    }

    /// The Thing the `client_ids` index names for an MQTT client id. The index is derived from
    /// the log and may lag it after a crash: check the Thing's registry record before trusting it.
    pub fn client_id_owner(&self, client_id: &str) -> Result<Option<String>, StorageError> {
        match self.inner.client_ids.get(client_id.as_bytes())? {
            None => Ok(None),
            Some(name) => {
                String::from_utf8(name.to_vec())
                    .map(Some)
                    .map_err(|_| StorageError::Corrupt {
                        thing: String::new(),
                        seq: 0,
                        reason: format!("client id index: the owner of '{client_id}' is not UTF-8"),
                    })
            }
        }
    }

    /// Claims `client_id` for `thing` if no entry holds it. Atomic, so two registrations
    /// cannot both claim one id.
    pub fn claim_client_id(&self, client_id: &str, thing: &str) -> Result<Claim, StorageError> {
        match self.inner.client_ids.compare_and_swap(
            client_id.as_bytes(),
            None as Option<&[u8]>,
            Some(thing.as_bytes()),
        )? {
            Ok(()) => Ok(Claim::Claimed),
            Err(conflict) => {
                let owner = conflict
                    .current
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default();
                Ok(if owner == thing {
                    Claim::Held
                } else {
                    Claim::HeldBy(owner)
                })
            }
        }
    }

    /// Moves `client_id` from `from` to `to` if `from` still holds it; returns whether it did.
    pub fn take_over_client_id(
        &self,
        client_id: &str,
        from: &str,
        to: &str,
    ) -> Result<bool, StorageError> {
        Ok(self
            .inner
            .client_ids
            .compare_and_swap(
                client_id.as_bytes(),
                Some(from.as_bytes()),
                Some(to.as_bytes()),
            )?
            .is_ok())
    }

    /// Gives `client_id` up if `thing` still holds it.
    pub fn release_client_id(&self, client_id: &str, thing: &str) -> Result<(), StorageError> {
        let _ = self.inner.client_ids.compare_and_swap(
            client_id.as_bytes(),
            Some(thing.as_bytes()),
            None as Option<&[u8]>,
        )?;
        Ok(())
    }

    /// The earliest deadline in the index, if any.
    pub fn next_deadline(&self) -> Result<Option<DeadlineEntry>, StorageError> {
        match self.inner.deadlines.first()? {
            None => Ok(None),
            Some((key, _)) => Ok(Some(parse_deadline_key(&key)?)),
        }
    }

    /// The first `limit` deadlines of the index, earliest first (due or not).
    pub fn first_deadlines(&self, limit: usize) -> Result<Vec<DeadlineEntry>, StorageError> {
        let mut out = Vec::new();
        for item in self.inner.deadlines.iter().take(limit) {
            let (key, _) = item?;
            out.push(parse_deadline_key(&key)?);
        }
        Ok(out)
    }

    /// Whether the index holds the deadline `at_ms` of `thing`.
    pub fn has_deadline(&self, thing: &str, at_ms: u64) -> Result<bool, StorageError> {
        let prefix = thing_key(thing)?;
        Ok(self
            .inner
            .deadlines
            .contains_key(deadline_key(at_ms, &prefix))?)
    }

    /// Number of deadlines in the index (walks it: O(n)).
    pub fn count_deadlines(&self) -> usize {
        self.inner.deadlines.len()
    }

    /// Checks that `name` can be a storage key (length bounds).
    pub fn validate_thing_name(name: &str) -> Result<(), StorageError> {
        thing_key(name).map(|_| ())
    }
}

pub(crate) fn parse_deadline_key(key: &[u8]) -> Result<DeadlineEntry, StorageError> {
    let corrupt = |reason: &str| StorageError::Corrupt {
        thing: String::new(),
        seq: 0,
        reason: format!("deadline index: {reason}"),
    };
    let at: [u8; 8] = key
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("short key"))?;
    let len = *key.get(8).ok_or_else(|| corrupt("missing thing key"))? as usize;
    let name = key
        .get(9..9 + len)
        .ok_or_else(|| corrupt("truncated thing key"))?;
    Ok(DeadlineEntry {
        at_ms: u64::from_be_bytes(at),
        thing: String::from_utf8(name.to_vec()).map_err(|_| corrupt("thing name not UTF-8"))?,
    })
}

#[cfg(test)]
mod tests {
    use crate::{AppendBatch, Envelope, IndexOp, Store, StoreConfig};

    #[tokio::test]
    async fn registry_listing_pages_in_name_order_and_deadlines_sort_by_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        for (i, name) in ["c", "a", "b", "d"].iter().enumerate() {
            store
                .append(AppendBatch {
                    thing: (*name).into(),
                    first_seq: 1,
                    events: vec![Envelope::new("X", 1, 0, &()).expect("env")],
                    index: vec![
                        IndexOp::PutThing(name.as_bytes().to_vec()),
                        IndexOp::PutDeadline {
                            at_ms: 100 - i as u64,
                        },
                    ],
                })
                .await
                .expect("append");
        }
        let page1 = store.list_things(None, 2).expect("list");
        assert_eq!(
            page1.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let page2 = store.list_things(Some("b"), 10).expect("list");
        assert_eq!(
            page2.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["c", "d"]
        );
        let due = store.due_deadlines(98, 10).expect("due");
        assert_eq!(
            due.iter()
                .map(|d| (d.at_ms, d.thing.as_str()))
                .collect::<Vec<_>>(),
            [(97, "d"), (98, "b")]
        );
        assert_eq!(
            store.next_deadline().expect("next").map(|d| d.at_ms),
            Some(97)
        );
    }
}
