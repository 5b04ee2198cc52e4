//! Whole-record state kept by a frontend between runs: MQTT sessions (`sessions` tree, by
//! client id) and retained messages (`retained` tree, by topic). The values are the caller's
//! encoding; this module only keeps them.
//!
//! Writes are written through (one sled batch per call) and become durable with the next group
//! commit ([`Store::sync`]): the caller decides when it needs them durable.

use crate::{StorageError, Store};

/// Which set of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordSet {
    /// MQTT sessions by client id.
    MqttSessions,
    /// MQTT retained messages by topic.
    MqttRetained,
}

/// A change to one record: `Some` puts the value, `None` removes the key.
pub type RecordChange = (Vec<u8>, Option<Vec<u8>>);

/// One stored record: key and value.
pub type Record = (Vec<u8>, Vec<u8>);

impl Store {
    fn record_tree(&self, set: RecordSet) -> &sled::Tree {
        match set {
            RecordSet::MqttSessions => &self.inner.sessions,
            RecordSet::MqttRetained => &self.inner.retained,
        }
    }

    /// Applies `changes` to `set` all at once (not durable until the next group commit).
    pub fn write_records(
        &self,
        set: RecordSet,
        changes: Vec<RecordChange>,
    ) -> Result<(), StorageError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (key, value) in changes {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        self.record_tree(set).apply_batch(batch)?;
        Ok(())
    }

    /// Every record of `set`, in key order (read once at start-up).
    pub fn read_records(&self, set: RecordSet) -> Result<Vec<Record>, StorageError> {
        self.record_tree(set)
            .iter()
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(StorageError::from)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::RecordSet;
    use crate::{Store, StoreConfig};

    #[tokio::test]
    async fn records_are_put_removed_and_kept_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        store
            .write_records(
                RecordSet::MqttSessions,
                vec![
                    (b"a".to_vec(), Some(b"1".to_vec())),
                    (b"b".to_vec(), Some(b"2".to_vec())),
                ],
            )
            .expect("write");
        store
            .write_records(RecordSet::MqttSessions, vec![(b"a".to_vec(), None)])
            .expect("remove");
        store
            .write_records(
                RecordSet::MqttRetained,
                vec![(b"t".to_vec(), Some(b"3".to_vec()))],
            )
            .expect("write");
        store.sync().await.expect("sync");
        drop(store);
        let store = crate::reopen(dir.path());
        assert_eq!(
            store.read_records(RecordSet::MqttSessions).expect("read"),
            [(b"b".to_vec(), b"2".to_vec())]
        );
        assert_eq!(
            store
                .read_records(RecordSet::MqttRetained)
                .expect("read")
                .len(),
            1
        );
    }
}
