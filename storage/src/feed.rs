//! The change feed: one commit-ordered sequence over every Thing's appends (the outbox).
//!
//! Each append takes the next position and records `position -> (thing, first seq, count)` in
//! the `feed` tree, written *before* its events (so events on disk always have their feed
//! entry; a feed entry whose append did not land points at nothing, or at events written
//! later by the same Thing: a consumer then does its work twice, never zero times). The entry
//! becomes durable with the same group commit as the events: no extra fsync.
//!
//! Positions are handed out under a shared gate that the group commit takes exclusively for an
//! instant when a batch starts: every position below the value it reads then is written, so
//! once the batch is durable they all are ([`Store::feed_durable_end`]). Consumers read the
//! feed only below that bound, so they never act on a change that could still be lost.
//!
//! Consumers keep a named cursor (`cursors` tree), advanced only after their work is done; the
//! feed is trimmed below the slowest cursor (the per-Thing logs are kept whole), always keeping
//! its last entry so that positions never restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use tokio::sync::watch;

use crate::{thing_key, StorageError, Store};

/// What appends and the group commit share about the feed.
pub(crate) struct FeedClock {
    /// Appends hold it shared while they take a position and write; the group commit takes it
    /// exclusively for an instant to read a bound below which every position is written.
    pub(crate) gate: RwLock<()>,
    /// The next position to hand out.
    pub(crate) next: AtomicU64,
    /// Every position below this is durable.
    pub(crate) durable: watch::Sender<u64>,
}

impl FeedClock {
    pub(crate) fn new(next: u64) -> FeedClock {
        FeedClock {
            gate: RwLock::new(()),
            next: AtomicU64::new(next),
            durable: watch::Sender::new(next),
        }
    }

    /// Called by the group commit before it flushes: every position below the value returned
    /// is written, so it will be durable once the flush succeeds.
    pub(crate) fn written_end(&self) -> u64 {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.next.load(Ordering::Acquire)
    }

    /// The flush that started at `end` succeeded.
    pub(crate) fn durable_to(&self, end: u64) {
        self.durable.send_if_modified(|durable| {
            let moved = end > *durable;
            if moved {
                *durable = end;
            }
            moved
        });
    }
}

/// Where one append landed in the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    /// Its position (strictly increasing, commit-ordered).
    pub position: u64,
    /// The Thing appended to.
    pub thing: String,
    /// The sequence number of its first event.
    pub first_seq: u64,
    /// How many events it appended.
    pub count: u32,
}

pub(crate) fn encode_entry(thing_key: &[u8], first_seq: u64, count: u32) -> Vec<u8> {
    let mut value = Vec::with_capacity(thing_key.len() + 12);
    value.extend_from_slice(thing_key);
    value.extend_from_slice(&first_seq.to_be_bytes());
    value.extend_from_slice(&count.to_be_bytes());
    value
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<FeedEntry, StorageError> {
    let corrupt = |reason: &str| StorageError::Corrupt {
        thing: String::new(),
        seq: 0,
        reason: format!("change feed: {reason}"),
    };
    let position: [u8; 8] = key.try_into().map_err(|_| corrupt("malformed key"))?;
    let len = *value.first().ok_or_else(|| corrupt("empty entry"))? as usize;
    let name = value
        .get(1..1 + len)
        .ok_or_else(|| corrupt("truncated thing name"))?;
    let tail = value
        .get(1 + len..)
        .ok_or_else(|| corrupt("truncated entry"))?;
    let first_seq: [u8; 8] = tail
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("truncated seq"))?;
    let count: [u8; 4] = tail
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("truncated count"))?;
    Ok(FeedEntry {
        position: u64::from_be_bytes(position),
        thing: String::from_utf8(name.to_vec()).map_err(|_| corrupt("thing name not UTF-8"))?,
        first_seq: u64::from_be_bytes(first_seq),
        count: u32::from_be_bytes(count),
    })
}

impl Store {
    /// Feed entries with positions after `after` and below the durable end, in order, at most
    /// `limit`.
    pub fn read_feed(&self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, StorageError> {
        let end = self.feed_durable_end();
        let start = after.saturating_add(1);
        if start >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for item in self
            .inner
            .feed
            .range(start.to_be_bytes()..end.to_be_bytes())
            .take(limit)
        {
            let (key, value) = item?;
            out.push(decode_entry(&key, &value)?);
        }
        Ok(out)
    }

    /// Every position below this is durable (with its events); the feed may be read up to it.
    pub fn feed_durable_end(&self) -> u64 {
        *self.inner.feed_clock.durable.borrow()
    }

    /// Resolves when the durable end moves past `than` (or at once if it already has).
    pub async fn feed_grown(&self, than: u64) {
        let mut durable = self.inner.feed_clock.durable.subscribe();
        let _ = durable.wait_for(|end| *end > than).await;
    }

    /// The next position an append will take.
    pub fn feed_next_position(&self) -> u64 {
        self.inner.feed_clock.next.load(Ordering::Acquire)
    }

    /// A consumer's cursor: every position up to it has been handled (0 = none yet).
    pub fn cursor(&self, consumer: &str) -> Result<u64, StorageError> {
        Ok(self
            .inner
            .cursors
            .get(consumer.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Moves a consumer's cursor (durable with the next group commit; call it only once the
    /// work up to `position` is done).
    pub fn set_cursor(&self, consumer: &str, position: u64) -> Result<(), StorageError> {
        self.inner
            .cursors
            .insert(consumer.as_bytes(), &position.to_be_bytes())?;
        Ok(())
    }

    /// Removes feed entries below every consumer's cursor, at most `limit` of them, always
    /// keeping the last entry. Returns how many went.
    pub fn trim_feed(&self, limit: usize) -> Result<usize, StorageError> {
        let mut slowest = u64::MAX;
        for item in self.inner.cursors.iter() {
            let (_, value) = item?;
            if let Ok(bytes) = <[u8; 8]>::try_from(value.as_ref()) {
                slowest = slowest.min(u64::from_be_bytes(bytes));
            }
        }
        if slowest == u64::MAX {
            return Ok(0); // no consumer yet: keep everything
        }
        let last = match self.inner.feed.last()? {
            Some((key, _)) => <[u8; 8]>::try_from(key.as_ref()).map_or(0, u64::from_be_bytes),
            None => return Ok(0),
        };
        // Entries at or below the slowest cursor are handled by everyone; keep the last one.
        let below = slowest.saturating_add(1).min(last);
        let keys: Vec<sled::IVec> = self
            .inner
            .feed
            .range(..below.to_be_bytes())
            .keys()
            .take(limit)
            .collect::<Result<_, _>>()?;
        for key in &keys {
            self.inner.feed.remove(key)?;
        }
        Ok(keys.len())
    }

    /// Entries in the feed now (walks it: O(n); tests and `check`).
    pub fn feed_len(&self) -> usize {
        self.inner.feed.len()
    }
}

/// The position after the feed's last entry (1 for an empty feed): where an open resumes.
pub(crate) fn next_position_after(feed: &sled::Tree) -> Result<u64, StorageError> {
    Ok(match feed.last()? {
        Some((key, _)) => <[u8; 8]>::try_from(key.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StorageError::Corrupt {
                thing: String::new(),
                seq: 0,
                reason: "change feed: malformed key".into(),
            })?
            .saturating_add(1),
        None => 1,
    })
}

/// The thing key of a feed entry (for writers).
pub(crate) fn entry_for(
    thing: &str,
    first_seq: u64,
    count: usize,
) -> Result<Vec<u8>, StorageError> {
    Ok(encode_entry(&thing_key(thing)?, first_seq, count as u32))
}

#[cfg(test)]
mod tests {
    use crate::{AppendBatch, Envelope, Store, StoreConfig};

    fn batch(thing: &str, first_seq: u64, n: usize) -> AppendBatch {
        AppendBatch {
            thing: thing.into(),
            first_seq,
            events: (0..n)
                .map(|i| Envelope::new("Tested", 1, i as u64, &i).expect("envelope"))
                .collect(),
            index: Vec::new(),
        }
    }

    #[tokio::test]
    async fn appends_take_increasing_positions_readable_once_durable_and_trimmed_behind_cursors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        let a = store.append(batch("a", 1, 2)).await.expect("a");
        let b = store.append(batch("b", 1, 1)).await.expect("b");
        let c = store.append(batch("a", 3, 1)).await.expect("a again");
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(store.feed_durable_end() > c, "durable once append returned");
        let entries = store.read_feed(0, 10).expect("read");
        let summary: Vec<(u64, &str, u64, u32)> = entries
            .iter()
            .map(|e| (e.position, e.thing.as_str(), e.first_seq, e.count))
            .collect();
        assert_eq!(summary, [(a, "a", 1, 2), (b, "b", 1, 1), (c, "a", 3, 1)]);
        assert_eq!(store.read_feed(a, 10).expect("after a").len(), 2);

        // Trimming waits for every consumer and keeps the last entry.
        assert_eq!(store.trim_feed(100).expect("trim"), 0, "no consumer yet");
        store.set_cursor("fast", c).expect("cursor");
        store.set_cursor("slow", a).expect("cursor");
        assert_eq!(
            store.trim_feed(100).expect("trim"),
            1,
            "only a is behind both"
        );
        store.set_cursor("slow", c).expect("cursor");
        store.trim_feed(100).expect("trim");
        assert_eq!(store.feed_len(), 1, "the last entry stays");
        drop(store);

        // Positions never restart.
        let store = Store::open(&StoreConfig::new(dir.path())).expect("reopen");
        let d = store.append(batch("b", 2, 1)).await.expect("d");
        assert!(d > c);
        assert_eq!(store.cursor("slow").expect("cursor"), c);
        assert_eq!(store.cursor("new").expect("cursor"), 0);
    }
}
