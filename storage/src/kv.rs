//! Small durable records by string key (`kv` tree): API keys, MQTT credentials, ACL rules.
//!
//! Keys are namespaced by the caller (`apikey/{id}`). Writes return once durable.

use crate::{StorageError, Store};

/// A cursor page of `kv` records ([`Store::kv_page`]).
#[derive(Debug, Default)]
pub struct KvPage {
    /// (key without the prefix, value), in key order.
    pub items: Vec<(String, Vec<u8>)>,
    /// The cursor of the next page; `None` at the end.
    pub next: Option<String>,
}

impl Store {
    /// The record at `key`, if any.
    pub fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.inner.kv.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Stores `value` at `key` and waits until it is durable.
    pub async fn kv_put(&self, key: &str, value: Vec<u8>) -> Result<(), StorageError> {
        self.inner.kv.insert(key.as_bytes(), value)?;
        self.sync().await
    }

    /// Stores `value` at `key`, durable with the next group commit (the caller syncs or lets
    /// someone else's commit cover it).
    pub fn kv_put_behind(&self, key: &str, value: Vec<u8>) -> Result<(), StorageError> {
        self.inner.kv.insert(key.as_bytes(), value)?;
        Ok(())
    }

    /// Applies `changes` (`None` removes) all at once, durable with the next group commit.
    pub fn kv_apply_behind(
        &self,
        changes: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for (key, value) in changes {
            match value {
                Some(value) => batch.insert(key.as_bytes(), value),
                None => batch.remove(key.as_bytes()),
            }
        }
        self.inner.kv.apply_batch(batch)?;
        Ok(())
    }

    /// Stores `value` at `key` only if `key` is absent; `false` if it was present.
    pub async fn kv_insert_new(&self, key: &str, value: Vec<u8>) -> Result<bool, StorageError> {
        let swapped =
            self.inner
                .kv
                .compare_and_swap(key.as_bytes(), None as Option<&[u8]>, Some(value))?;
        if swapped.is_err() {
            return Ok(false);
        }
        self.sync().await?;
        Ok(true)
    }

    /// Removes `key` and waits until that is durable; `true` if it existed.
    pub async fn kv_remove(&self, key: &str) -> Result<bool, StorageError> {
        let existed = self.inner.kv.remove(key.as_bytes())?.is_some();
        self.sync().await?;
        Ok(existed)
    }

    /// The keys (not the values) under `prefix`, in order, at most `limit`.
    pub fn kv_keys_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        for key in self
            .inner
            .kv
            .scan_prefix(prefix.as_bytes())
            .keys()
            .take(limit)
        {
            out.push(String::from_utf8_lossy(&key?).into_owned());
        }
        Ok(out)
    }

    /// Records whose key starts with `prefix` and sorts after `after` (a whole key), in key
    /// order, at most `limit`: a page that reads only what it returns.
    pub fn kv_scan_prefix_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let start: Vec<u8> = match after {
            Some(after) => {
                let mut key = after.as_bytes().to_vec();
                key.push(0);
                key
            }
            None => prefix.as_bytes().to_vec(),
        };
        let mut out = Vec::new();
        for item in self.inner.kv.range(start..) {
            let (key, value) = item?;
            if !key.starts_with(prefix.as_bytes()) || out.len() == limit {
                break;
            }
            out.push((String::from_utf8_lossy(&key).into_owned(), value.to_vec()));
        }
        Ok(out)
    }

    /// A cursor page of the records under `prefix`: at most `limit` after the one whose key
    /// is `prefix` + `after`, as (key without the prefix, value) in key order, and the cursor
    /// of the next page (the last key read without the prefix; `None` when this page is the
    /// end).
    pub fn kv_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KvPage, StorageError> {
        let after = after.map(|a| format!("{prefix}{a}"));
        let page = self.kv_scan_prefix_after(prefix, after.as_deref(), limit)?;
        let items: Vec<(String, Vec<u8>)> = page
            .into_iter()
            .map(|(key, value)| (key[prefix.len()..].to_owned(), value))
            .collect();
        let next = (items.len() == limit)
            .then(|| items.last().map(|(key, _)| key.clone()))
            .flatten();
        Ok(KvPage { items, next })
    }

    /// All records whose key starts with `prefix`, in key order, at most `limit`.
    pub fn kv_scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        for item in self.inner.kv.scan_prefix(prefix.as_bytes()).take(limit) {
            let (key, value) = item?;
            out.push((String::from_utf8_lossy(&key).into_owned(), value.to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreConfig};

    #[tokio::test]
    async fn kv_put_get_insert_new_remove_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        assert!(store
            .kv_insert_new("k/a", b"1".to_vec())
            .await
            .expect("new"));
        assert!(!store
            .kv_insert_new("k/a", b"2".to_vec())
            .await
            .expect("dup"));
        store.kv_put("k/b", b"3".to_vec()).await.expect("put");
        store.kv_put("other", b"4".to_vec()).await.expect("put");
        assert_eq!(store.kv_get("k/a").expect("get"), Some(b"1".to_vec()));
        let scanned = store.kv_scan_prefix("k/", 10).expect("scan");
        assert_eq!(scanned.len(), 2);
        assert!(store.kv_remove("k/a").await.expect("rm"));
        assert!(!store.kv_remove("k/a").await.expect("rm again"));
    }
}
