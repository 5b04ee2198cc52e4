//! Snapshots (`snapshots` tree): the latest (seq, state) of a Thing, an optimisation only.
//!
//! Replay = snapshot + the events after its seq. The log alone must rebuild the same state, so
//! a snapshot is written without waiting for durability (the next group commit carries it), and
//! a snapshot that fails to decode is reported, never trusted.

use serde::{Deserialize, Serialize};

use crate::{thing_key, Envelope, StorageError, Store};

/// A Thing's state as of a sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The last event included in `state`.
    pub seq: u64,
    /// The state, as a versioned envelope (`event_type` names the state shape).
    pub state: Envelope,
}

impl Store {
    /// Replaces `thing`'s snapshot (durable with the next group commit).
    pub fn put_snapshot(&self, thing: &str, snapshot: &Snapshot) -> Result<(), StorageError> {
        let bytes = crate::codec::encode(snapshot)?;
        self.inner.snapshots.insert(thing_key(thing)?, bytes)?;
        Ok(())
    }

    /// `thing`'s latest snapshot, if one was written.
    pub fn get_snapshot(&self, thing: &str) -> Result<Option<Snapshot>, StorageError> {
        match self.inner.snapshots.get(thing_key(thing)?)? {
            None => Ok(None),
            Some(bytes) => {
                crate::codec::decode(&bytes)
                    .map(Some)
                    .map_err(|e| StorageError::Corrupt {
                        thing: thing.to_owned(),
                        seq: 0,
                        reason: format!("snapshot: {}", e.0),
                    })
            }
        }
    }

    /// Removes `thing`'s snapshot (replay then starts from the log's beginning).
    pub fn delete_snapshot(&self, thing: &str) -> Result<(), StorageError> {
        self.inner.snapshots.remove(thing_key(thing)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreConfig;

    #[tokio::test]
    async fn snapshot_round_trips_and_is_per_thing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        let snapshot = Snapshot {
            seq: 9,
            state: Envelope::new("S", 1, 5, &"state").expect("env"),
        };
        store.put_snapshot("a", &snapshot).expect("put");
        assert_eq!(store.get_snapshot("a").expect("get"), Some(snapshot));
        assert_eq!(store.get_snapshot("ab").expect("get"), None);
        store.delete_snapshot("a").expect("delete");
        assert_eq!(store.get_snapshot("a").expect("get"), None);
    }
}
