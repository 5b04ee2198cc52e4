//! The append-only per-Thing event log (`events` tree) and durable appends (each recorded in
//! the change feed, see [`crate::feed`]).
//!
//! Key = thing key ‖ seq (u64 big-endian), so one Thing's events are contiguous and in order.
//! Value = an [`Envelope`]. Sequence numbers start at 1 and are never reused: an append whose
//! first key already exists is refused ([`StorageError::SequenceConflict`]), which catches two
//! writers for one Thing.

use crate::index::{alarm_key, deadline_key, IndexOp};
use crate::wal::{WalRecord, WalTree};
use crate::{thing_key, Envelope, StorageError, Store};

/// Events to append to one Thing's log (all or nothing), with the index changes they imply.
#[derive(Debug, Clone)]
pub struct AppendBatch {
    /// The Thing whose log is appended to.
    pub thing: String,
    /// Sequence number of the first event (the Thing's last seq + 1).
    pub first_seq: u64,
    /// The events, in order; event `i` gets seq `first_seq + i`.
    pub events: Vec<Envelope>,
    /// Index changes: deadline insertions are written before the events, the rest after
    /// (see [`Store::append`]).
    pub index: Vec<IndexOp>,
}

/// An event read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// Its sequence number in the Thing's log.
    pub seq: u64,
    /// The stored record.
    pub envelope: Envelope,
}

fn event_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn seq_of(prefix_len: usize, key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(prefix_len..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// Decodes one stored event; errors name the Thing and the seq.
fn decode_record(
    thing: &str,
    prefix_len: usize,
    (key, value): (sled::IVec, sled::IVec),
) -> Result<RecordedEvent, StorageError> {
    let seq = seq_of(prefix_len, &key).ok_or_else(|| StorageError::Corrupt {
        thing: thing.to_owned(),
        seq: 0,
        reason: format!("malformed event key of {} bytes", key.len()),
    })?;
    let envelope = Envelope::from_bytes(&value).map_err(|e| StorageError::Corrupt {
        thing: thing.to_owned(),
        seq,
        reason: e.0,
    })?;
    Ok(RecordedEvent { seq, envelope })
}

/// Decodes records from `items` into `out` until it holds `limit`.
fn decode_into(
    thing: &str,
    prefix_len: usize,
    items: impl Iterator<Item = Result<(sled::IVec, sled::IVec), StorageError>>,
    limit: usize,
    out: &mut Vec<RecordedEvent>,
) -> Result<(), StorageError> {
    for item in items.take(limit.saturating_sub(out.len())) {
        out.push(decode_record(thing, prefix_len, item?)?);
    }
    Ok(())
}

impl Store {
    /// Appends `batch` and returns its change-feed position once it is durable (group commit:
    /// flush + fsync; the feed entry is durable with it).
    pub async fn append(&self, batch: AppendBatch) -> Result<u64, StorageError> {
        // The feed entry is recorded before the events (events on disk always have one); the
        // position counts as being written until the events are, so the group commit knows
        // which positions a flush covers.
        let entry = crate::feed::entry_for(&batch.thing, batch.first_seq, batch.events.len())?;
        self.inner.feed_clock.append(self, entry, batch).await
    }

    /// Writes a batch to the database without waiting for durability.
    ///
    /// Events go in with plain inserts, never `apply_batch` or a transaction: those take sled's
    /// global write guard, which waits for any flush in progress (a flush holds the read guard
    /// through its IO) and then routes every later operation through the lock. Only an append
    /// of several events uses `apply_batch`, to keep them all-or-nothing. Index changes are
    /// written after the events (new deadlines before them): indexes are derived from the log,
    /// and the owner of a Thing repairs them on activation if a crash fell between the writes.
    pub(crate) fn write_batch(
        &self,
        events: &sled::Tree,
        batch: &AppendBatch,
        ahead: &mut WalRecord,
    ) -> Result<(), StorageError> {
        let prefix = thing_key(&batch.thing)?;
        // A new deadline goes in *before* the events that set it: a crash in between leaves an
        // entry with nothing due (the timer activates the Thing, which removes it), never a
        // pending deadline that no index entry will ever fire.
        for op in &batch.index {
            if matches!(op, IndexOp::PutDeadline { .. }) {
                self.apply_index_op(&batch.thing, &prefix, op)?;
            }
        }
        let mut writes = Vec::with_capacity(batch.events.len());
        for (i, envelope) in batch.events.iter().enumerate() {
            let seq = batch.first_seq + i as u64;
            writes.push((event_key(&prefix, seq), envelope.to_bytes()?));
        }
        Self::insert_events(events, batch, writes, ahead)?;
        for op in &batch.index {
            if !matches!(op, IndexOp::PutDeadline { .. }) {
                self.apply_index_op(&batch.thing, &prefix, op)?;
            }
        }
        Ok(())
    }

    /// Inserts one append's events, refusing a sequence number already taken, and describes in
    /// `ahead` (the write-ahead record) what it left in the tree.
    fn insert_events(
        events: &sled::Tree,
        batch: &AppendBatch,
        mut writes: Vec<(Vec<u8>, Vec<u8>)>,
        ahead: &mut WalRecord,
    ) -> Result<(), StorageError> {
        let conflict = || StorageError::SequenceConflict {
            thing: batch.thing.clone(),
            seq: batch.first_seq,
        };
        let mark = ahead.mark();
        for (key, value) in &writes {
            ahead.put(WalTree::Events, key, value);
        }
        if writes.len() == 1 {
            if let Some((key, value)) = writes.pop() {
                // Detect a reused sequence number from the insert itself (no second lookup on the
                // hot path); put the old record back before reporting it. The put-back is written
                // ahead too: sled may have written the refused record to its file already.
                let inserted = events.insert(key.as_slice(), value);
                match inserted {
                    Ok(None) => {}
                    Ok(Some(previous)) => {
                        ahead.rewind(mark);
                        ahead.put(WalTree::Events, &key, &previous);
                        events.insert(key, previous)?;
                        return Err(conflict());
                    }
                    Err(e) => {
                        ahead.rewind(mark);
                        return Err(e.into());
                    }
                }
            }
        } else if let Some((first_key, _)) = writes.first() {
            let refused = match events.contains_key(first_key) {
                Ok(true) => Some(conflict()),
                Ok(false) => None,
                Err(e) => Some(e.into()),
            };
            if let Some(e) = refused {
                ahead.rewind(mark);
                return Err(e);
            }
            let mut sled_batch = sled::Batch::default();
            for (key, value) in writes {
                sled_batch.insert(key, value);
            }
            if let Err(e) = events.apply_batch(sled_batch) {
                ahead.rewind(mark);
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn apply_index_op(&self, thing: &str, prefix: &[u8], op: &IndexOp) -> Result<(), StorageError> {
        match op {
            IndexOp::PutThing(record) => {
                self.inner.thing_count.change(thing.as_bytes(), 1, || {
                    let previous = self
                        .inner
                        .things
                        .insert(thing.as_bytes(), record.as_slice())?;
                    Ok::<_, StorageError>(previous.is_none())
                })?;
            }
            IndexOp::RemoveThing => {
                self.inner.thing_count.change(thing.as_bytes(), -1, || {
                    let removed = self.inner.things.remove(thing.as_bytes())?;
                    Ok::<_, StorageError>(removed.is_some())
                })?;
            }
            IndexOp::PutDeadline { at_ms } => {
                self.inner
                    .deadlines
                    .insert(deadline_key(*at_ms, prefix), &[])?;
            }
            IndexOp::RemoveDeadline { at_ms } => {
                self.inner.deadlines.remove(deadline_key(*at_ms, prefix))?;
            }
            IndexOp::PutClientId(client_id) => {
                self.inner
                    .client_ids
                    .insert(client_id.as_bytes(), thing.as_bytes())?;
            }
            IndexOp::PutAlarm { alarm_type, record } => {
                self.inner
                    .alarms
                    .insert(alarm_key(thing, alarm_type), record.as_slice())?;
            }
            IndexOp::PutOnline {
                client_id,
                connection_id,
            } => {
                let mut value = Vec::with_capacity(8 + client_id.len());
                value.extend_from_slice(&connection_id.to_be_bytes());
                value.extend_from_slice(client_id.as_bytes());
                self.inner.online.insert(thing.as_bytes(), value)?;
            }
            IndexOp::RemoveOnline => {
                self.inner.online.remove(thing.as_bytes())?;
            }
            IndexOp::RemoveAlarm { alarm_type } => {
                self.inner.alarms.remove(alarm_key(thing, alarm_type))?;
            }
            IndexOp::RemoveClientId(client_id) => {
                // Only if it is still this Thing's: another Thing may have taken it since.
                let _ = self.inner.client_ids.compare_and_swap(
                    client_id.as_bytes(),
                    Some(thing.as_bytes()),
                    None as Option<&[u8]>,
                )?;
            }
        }
        Ok(())
    }

    /// Applies index changes outside an append (repairs by the Thing's owner); durable with the
    /// next group commit.
    pub fn repair_index(&self, thing: &str, ops: &[IndexOp]) -> Result<(), StorageError> {
        let prefix = thing_key(thing)?;
        for op in ops {
            self.apply_index_op(thing, &prefix, op)?;
        }
        Ok(())
    }

    /// Reads up to `limit` events of `thing` with seq ≥ `from_seq`, in order.
    ///
    /// A record that does not decode is an error naming the Thing and its seq. The log spans
    /// epochs: one Thing's events in a later epoch always follow those in an earlier one.
    pub fn read_events(
        &self,
        thing: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StorageError> {
        let prefix = thing_key(thing)?;
        let start = event_key(&prefix, from_seq);
        let end = event_key(&prefix, u64::MAX);
        let start_of_thing = event_key(&prefix, 0);
        let epochs = self.inner.epochs.all();
        // Older epochs hold only lower seqs: walking back from the newest, the first epoch whose
        // first event of this Thing is at or before `from_seq` is where the read starts, so a
        // Thing that wrote lately reads only the last epochs (and does not wait for an older
        // one being sealed). A Thing with no event at all reads every epoch.
        let mut first_epoch = 0;
        for (i, epoch) in epochs.iter().enumerate().rev() {
            let first = epoch.with(|trees| {
                match trees.events.range(&start_of_thing, Some(&end)).next() {
                    Some(item) => Ok(seq_of(prefix.len(), &item?.0)),
                    None => Ok(None),
                }
            })?;
            if first.is_some_and(|seq| seq <= from_seq) {
                first_epoch = i;
                break;
            }
        }
        let mut out = Vec::new();
        for epoch in &epochs[first_epoch..] {
            if out.len() >= limit {
                break;
            }
            epoch.with(|trees| {
                let items = trees.events.range(&start, Some(&end));
                decode_into(thing, prefix.len(), items, limit, &mut out)
            })?;
        }
        Ok(out)
    }

    /// Reads up to `limit` events of `thing` with seq ≤ `until_seq`, newest first.
    pub fn read_events_rev(
        &self,
        thing: &str,
        until_seq: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StorageError> {
        let prefix = thing_key(thing)?;
        let start = event_key(&prefix, 0);
        let end = event_key(&prefix, until_seq);
        let mut out = Vec::new();
        for epoch in self.inner.epochs.all().iter().rev() {
            if out.len() >= limit {
                break;
            }
            epoch.with(|trees| {
                let items = trees.events.range_rev(&start, &end);
                decode_into(thing, prefix.len(), items, limit, &mut out)
            })?;
        }
        Ok(out)
    }

    /// The highest sequence number in `thing`'s log (0 when it has none).
    pub fn last_seq(&self, thing: &str) -> Result<u64, StorageError> {
        let prefix = thing_key(thing)?;
        let (first, last) = (event_key(&prefix, 0), event_key(&prefix, u64::MAX));
        for epoch in self.inner.epochs.all().iter().rev() {
            let last = epoch.with(|trees| match trees.events.range_rev(&first, &last).next() {
                None => Ok(None),
                Some(item) => {
                    let (key, _) = item?;
                    seq_of(prefix.len(), &key)
                        .map(Some)
                        .ok_or_else(|| StorageError::Corrupt {
                            thing: thing.to_owned(),
                            seq: 0,
                            reason: "malformed event key".into(),
                        })
                }
            })?;
            if let Some(seq) = last {
                return Ok(seq);
            }
        }
        Ok(0)
    }

    /// Writes raw bytes as an event record, bypassing encoding (tests of corruption handling).
    #[cfg(feature = "test-util")]
    pub async fn inject_raw_event(
        &self,
        thing: &str,
        seq: u64,
        bytes: &[u8],
    ) -> Result<(), StorageError> {
        let key = event_key(&thing_key(thing)?, seq);
        // No epoch is packed meanwhile (a pack copying the epoch would miss this write).
        let packing = self.inner.epochs.packing_paused();
        // Over the record where it is (any epoch), else into the current epoch.
        let epochs = self.inner.epochs.all();
        let mut holder = epochs.last().cloned().ok_or(StorageError::Closed)?;
        for epoch in &epochs {
            let found = epoch.with(|trees| match trees.events.range(&key, Some(&key)).next() {
                Some(item) => item.map(|_| true),
                None => Ok(false),
            })?;
            if found {
                holder = epoch.clone();
            }
        }
        // A sealed epoch is not flushed by the group commit any more: flush it here. The write
        // is written ahead too (epoch 0, the main database's, takes no write-ahead records),
        // else an open would replay the record it replaces over it.
        holder.with(|trees| trees.events.put_raw(&key, bytes))?;
        holder.make_durable()?;
        if holder.id > 0 {
            let mut ahead = WalRecord::new(holder.id);
            ahead.put(WalTree::Events, &key, bytes);
            self.inner.feed_clock.wal.push(ahead);
        }
        drop(packing);
        self.sync().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreConfig;

    fn envelope(n: u64) -> Envelope {
        Envelope::new("Tested", 1, n, &n).expect("envelope")
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&StoreConfig::new(dir.path())).expect("open")
    }

    /// Given an acknowledged event at seq 1, when an append at seq 1 is refused, then the
    /// write-ahead record describes the acknowledged event put back (sled may have written the
    /// refused one to its file before the put-back), and a refused append of several events
    /// describes nothing.
    #[tokio::test]
    async fn a_refused_append_writes_ahead_the_event_it_put_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let batch = |first_seq: u64, n: u64| AppendBatch {
            thing: "a".into(),
            first_seq,
            events: (0..n).map(|i| envelope(100 + i)).collect(),
            index: vec![],
        };
        store
            .append(AppendBatch {
                events: vec![envelope(1)],
                ..batch(1, 1)
            })
            .await
            .expect("append");
        let epoch = store.inner.epochs.current();
        for (refused, expected) in [
            (
                batch(1, 1),
                vec![(
                    WalTree::Events,
                    event_key(&thing_key("a").expect("key"), 1),
                    envelope(1).to_bytes().expect("bytes"),
                )],
            ),
            (batch(1, 2), vec![]),
        ] {
            let mut ahead = WalRecord::new(epoch.id);
            let result = epoch
                .with(|trees| store.write_batch(trees.events.for_writing()?, &refused, &mut ahead));
            assert!(
                matches!(result, Err(StorageError::SequenceConflict { seq: 1, .. })),
                "{result:?}"
            );
            assert_eq!(ahead.writes(), expected);
        }
        let events = store.read_events("a", 1, 10).expect("read");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].envelope, envelope(1));
    }

    #[tokio::test]
    async fn appended_events_read_back_in_order_per_thing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        for (thing, n) in [("a", 3u64), ("ab", 2), ("b", 1)] {
            store
                .append(AppendBatch {
                    thing: thing.into(),
                    first_seq: 1,
                    events: (1..=n).map(envelope).collect(),
                    index: vec![],
                })
                .await
                .expect("append");
        }
        let a = store.read_events("a", 1, 100).expect("read");
        assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(store.read_events("ab", 2, 100).expect("read").len(), 1);
        assert_eq!(store.last_seq("a").expect("seq"), 3);
        assert_eq!(store.last_seq("b").expect("seq"), 1);
        assert_eq!(store.last_seq("none").expect("seq"), 0);
        let rev = store.read_events_rev("a", u64::MAX, 2).expect("rev");
        assert_eq!(rev.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 2]);
    }

    #[tokio::test]
    async fn reusing_a_sequence_number_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let batch = AppendBatch {
            thing: "t".into(),
            first_seq: 1,
            events: vec![envelope(1)],
            index: vec![],
        };
        store.append(batch.clone()).await.expect("first");
        let err = store.append(batch).await.expect_err("second");
        assert!(matches!(err, StorageError::SequenceConflict { seq: 1, .. }));
    }

    #[tokio::test]
    async fn appends_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = open(&dir);
            store
                .append(AppendBatch {
                    thing: "t".into(),
                    first_seq: 1,
                    events: vec![envelope(1), envelope(2)],
                    index: vec![IndexOp::PutThing(b"rec".to_vec())],
                })
                .await
                .expect("append");
        }
        let store = open(&dir);
        assert_eq!(store.last_seq("t").expect("seq"), 2);
        assert_eq!(
            store.list_things(None, 10).expect("list"),
            vec![("t".to_owned(), b"rec".to_vec())]
        );
    }

    #[tokio::test]
    async fn many_concurrent_appends_share_few_flushes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let mut tasks = Vec::new();
        for writer in 0..200u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for seq in 1..=5u64 {
                    store
                        .append(AppendBatch {
                            thing: format!("w{writer}"),
                            first_seq: seq,
                            events: vec![envelope(seq)],
                            index: vec![],
                        })
                        .await
                        .expect("append");
                }
            }));
        }
        for task in tasks {
            task.await.expect("join");
        }
        let stats = store.commit_stats();
        assert_eq!(stats.waiters, 1000);
        assert!(
            stats.batches < stats.waiters,
            "expected batching, got {stats:?}"
        );
        assert_eq!(store.last_seq("w199").expect("seq"), 5);
    }
}
