//! The append-only per-Thing event log (`events` tree) and durable appends (each recorded in
//! the change feed, see [`crate::feed`]).
//!
//! Key = thing key ‖ seq (u64 big-endian), so one Thing's events are contiguous and in order.
//! Value = an [`Envelope`]. Sequence numbers start at 1 and are never reused. An append whose
//! first key is taken among the appends since the last checkpoint (the epoch's memory table)
//! is refused ([`StorageError::SequenceConflict`]): two writers for one Thing start from the
//! same last seq, so the second one's first append collides with the first one's. (Before the
//! memory table the check covered the current epoch's sled tree; it never covered older
//! epochs.)

use crate::epoch::Epoch;
use crate::index::{alarm_key, deadline_key, IndexOp};
use crate::memtable::Refused;
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

/// The key of event `seq` of the Thing whose key is `prefix` (see [`crate::thing_key`]).
pub(crate) fn event_key(prefix: &[u8], seq: u64) -> Vec<u8> {
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

/// Reads `thing`'s records with `start ≤ key ≤ end` from `epochs`, in the order given (newest
/// key first within each with `rev`), and decodes up to `limit` of them.
fn read_epochs<'a>(
    thing: &str,
    prefix_len: usize,
    epochs: impl Iterator<Item = &'a std::sync::Arc<Epoch>>,
    (start, end): (&[u8], &[u8]),
    rev: bool,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StorageError> {
    let mut out = Vec::new();
    for epoch in epochs {
        if out.len() >= limit {
            break;
        }
        for record in epoch.records(start, end, rev, limit - out.len())? {
            out.push(decode_record(thing, prefix_len, record)?);
        }
    }
    Ok(out)
}

impl Store {
    /// Appends `batch` and returns its change-feed position once it is durable (group commit:
    /// flush + fsync; the feed entry is durable with it). Refused with [`StorageError::Busy`],
    /// before anything is written, while the events waiting in memory for a checkpoint hold
    /// `memtable_bytes_max`.
    pub async fn append(&self, batch: AppendBatch) -> Result<u64, StorageError> {
        self.admit()?;
        // The feed entry is recorded before the events (events on disk always have one); the
        // position counts as being written until the events are, so the group commit knows
        // which positions a flush covers.
        let entry = crate::feed::entry_for(&batch.thing, batch.first_seq, batch.events.len())?;
        self.inner.feed_clock.append(self, entry, batch).await
    }

    /// Refuses an append before it takes a change-feed position (so it leaves nothing behind)
    /// while the events waiting in memory for a checkpoint hold `memtable_bytes_max`.
    fn admit(&self) -> Result<(), StorageError> {
        let full = match self.inner.epochs.budget().admits() {
            Ok(()) => return Ok(()),
            Err(full) => full,
        };
        if full.first || !self.inner.feed_clock.wal.checkpoint_requested() {
            // Only a checkpoint frees that memory, and only a group commit makes one: ask for
            // both, as no admitted append may be left to start a commit (asked again whenever
            // no request is pending: a checkpoint may have run before the last admitted
            // appends went in). While checkpoints fail, the commit thread tries again on its
            // own (see `commit`).
            self.inner.feed_clock.wal.request_checkpoint();
            self.inner.committer.wake();
        }
        Err(StorageError::Busy(format!(
            "{} bytes of events wait in memory to be written to the database, at the bound of \
             {} (memtable_bytes_max); checkpoints are failing or behind, see the server log",
            full.used, full.max
        )))
    }

    /// Writes a batch without waiting for durability: its events to the memory table of
    /// `epoch` (see [`crate::memtable`]; durable through the write-ahead record they are
    /// described in, `ahead`), its index changes to the main database. Index changes are
    /// written after the events (new deadlines before them): indexes are derived from the log,
    /// and the owner of a Thing repairs them on activation if a crash fell between the writes.
    pub(crate) fn write_batch(
        &self,
        epoch: &Epoch,
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
        Self::insert_events(epoch, batch, writes, ahead)?;
        for op in &batch.index {
            if !matches!(op, IndexOp::PutDeadline { .. }) {
                self.apply_index_op(&batch.thing, &prefix, op)?;
            }
        }
        Ok(())
    }

    /// Puts one append's events in the epoch's memory table, refusing a sequence number taken
    /// there already (the appends since the last checkpoint: a second writer for one Thing
    /// collides with the first within moments), and describes them in `ahead`.
    fn insert_events(
        epoch: &Epoch,
        batch: &AppendBatch,
        writes: Vec<(Vec<u8>, Vec<u8>)>,
        ahead: &mut WalRecord,
    ) -> Result<(), StorageError> {
        if epoch.dir.is_none() {
            return Err(StorageError::Db("log epoch 0 takes no more events".into()));
        }
        match epoch.memtable.insert_new(&writes) {
            Ok(()) => {}
            Err(Refused::Taken) => {
                return Err(StorageError::SequenceConflict {
                    thing: batch.thing.clone(),
                    seq: batch.first_seq,
                })
            }
            Err(Refused::Malformed) => {
                return Err(StorageError::Corrupt {
                    thing: batch.thing.clone(),
                    seq: batch.first_seq,
                    reason: "an event key that is not one".into(),
                })
            }
        }
        for (key, value) in &writes {
            ahead.put(WalTree::Events, key, value);
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
            let first = match epoch.records(&start_of_thing, &end, false, 1)?.first() {
                Some((key, _)) => seq_of(prefix.len(), key),
                None => None,
            };
            if first.is_some_and(|seq| seq <= from_seq) {
                first_epoch = i;
                break;
            }
        }
        read_epochs(
            thing,
            prefix.len(),
            epochs[first_epoch..].iter(),
            (&start, &end),
            false,
            limit,
        )
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
        let epochs = self.inner.epochs.all();
        read_epochs(
            thing,
            prefix.len(),
            epochs.iter().rev(),
            (&start, &end),
            true,
            limit,
        )
    }

    /// The highest sequence number in `thing`'s log (0 when it has none).
    pub fn last_seq(&self, thing: &str) -> Result<u64, StorageError> {
        let prefix = thing_key(thing)?;
        let (first, last) = (event_key(&prefix, 0), event_key(&prefix, u64::MAX));
        for epoch in self.inner.epochs.all().iter().rev() {
            if let Some((key, _)) = epoch.records(&first, &last, true, 1)?.first() {
                return seq_of(prefix.len(), key).ok_or_else(|| StorageError::Corrupt {
                    thing: thing.to_owned(),
                    seq: 0,
                    reason: "malformed event key".into(),
                });
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
            if !epoch.records(&key, &key, false, 1)?.is_empty() {
                holder = epoch.clone();
            }
        }
        // A write to the epoch's database is flushed here (the group commit does not flush a
        // sealed epoch); one to its memory table is written ahead like an append's.
        // Under the round lock, as a combiner's write: a checkpoint freezes the table with the
        // record or without either.
        let round = self.inner.feed_clock.wal.round();
        let in_table = holder.put_raw(&key, bytes)?;
        if in_table {
            let mut ahead = WalRecord::new(holder.id);
            ahead.put(WalTree::Events, &key, bytes);
            self.inner.feed_clock.wal.push(ahead);
        }
        drop(round);
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

    /// Given an acknowledged event at seq 1, when an append at seq 1 (of one event or several)
    /// is refused, then its write-ahead record describes nothing and the log still reads the
    /// acknowledged event.
    #[tokio::test]
    async fn a_refused_append_writes_nothing() {
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
        for refused in [batch(1, 1), batch(1, 2)] {
            let mut ahead = WalRecord::new(epoch.id);
            let result = store.write_batch(&epoch, &refused, &mut ahead);
            assert!(
                matches!(result, Err(StorageError::SequenceConflict { seq: 1, .. })),
                "{result:?}"
            );
            assert_eq!(ahead.writes(), vec![]);
        }
        let events = store.read_events("a", 1, 10).expect("read");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].envelope, envelope(1));
    }

    /// Given a store whose checkpoints fail (the next write-ahead segment cannot be created:
    /// a directory is in its place), when a Thing keeps appending, then the appends whose
    /// commit failed stay in memory until the tables hold `memtable_bytes_max`, and the next
    /// append is refused as busy, naming the bound, before it takes a change-feed position.
    /// Once segments can be created again, the commit thread's retry makes the checkpoint (no
    /// append is needed to start it), appends go in again, and every event written reads back.
    #[tokio::test]
    async fn appends_past_the_memory_bound_are_refused_until_a_checkpoint_frees_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig {
            wal_bytes_max: 1 << 30,
            memtable_bytes_max: 4096,
            ..StoreConfig::new(dir.path())
        })
        .expect("open");
        let wal = dir.path().join("wal");
        let current = std::fs::read_dir(&wal)
            .expect("wal")
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".wal")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .expect("a segment");
        let blocker = crate::wal::segment_path(&wal, current + 1);
        std::fs::create_dir(&blocker).expect("block the next segment");
        let append = |seq: u64| AppendBatch {
            thing: "a".into(),
            first_seq: seq,
            events: vec![envelope(seq)],
            index: vec![],
        };
        let (mut seq, mut failed) = (1, 0);
        let refusal = loop {
            match store.append(append(seq)).await {
                Ok(_) => {}
                // Written, outcome unknown to the caller: the seq is taken.
                Err(StorageError::CommitFailed(_)) => failed += 1,
                Err(e) => break e,
            }
            seq += 1;
            assert!(seq < 1000, "never refused");
        };
        assert!(
            matches!(&refusal, StorageError::Busy(why) if why.contains("memtable_bytes_max")),
            "{refusal}"
        );
        assert!(failed > 0, "the checkpoints failed");
        let position = store.inner.feed_clock.next();
        assert!(matches!(
            store.append(append(seq)).await,
            Err(StorageError::Busy(_))
        ));
        assert_eq!(
            store.inner.feed_clock.next(),
            position,
            "no feed position taken"
        );
        assert!(store.memtable_stats().refused >= 2);
        std::fs::remove_dir(&blocker).expect("unblock");
        // Bounded polling: the commit thread tries the checkpoint again on its own.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match store.append(append(seq)).await {
                Ok(_) => break,
                Err(StorageError::Busy(_)) => {
                    assert!(std::time::Instant::now() < deadline, "still refused");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(store.commit_stats().checkpoints >= 1);
        let events = store.read_events("a", 1, 10_000).expect("read");
        assert_eq!(events.len() as u64, seq);
        assert!(events
            .iter()
            .zip(1..)
            .all(|(e, n)| e.seq == n && e.envelope == envelope(n)));
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
