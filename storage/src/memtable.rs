//! The events an epoch took since its last checkpoint, in memory.
//!
//! An append's events are durable through the write-ahead segments (see [`crate::wal`]) as soon
//! as the group commit syncs them; writing each one into sled as well cost a third of the
//! server's CPU per durable shadow round trip (2026-12-05: 30.5 against 20.3 µs with the insert
//! left out, `shadow --devices 200`). So the epoch that takes appends keeps them here, by Thing
//! and seq, and each checkpoint writes what it holds into the epoch's database as one *run*: a
//! tree in the packed layout (see [`crate::packed`]), written in one go and fsynced before the
//! segments that held its events go. Readers see the runs and this table as one log.
//!
//! A checkpoint *freezes* the table (its events stay readable, new ones go to a fresh table)
//! at the same moment as it closes the segment their write-ahead records went to, and writes
//! the frozen table under that segment's number: a run named `n` holds exactly the epoch's
//! events whose records are in segments up to `n`, which is what an open needs to know to
//! replay only the others. A seal writes everything left under [`FINAL_RUN`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sled::IVec;

use crate::packed::Record;
use crate::StorageError;

/// The run a seal writes: after it, the epoch takes no more events.
pub(crate) const FINAL_RUN: u64 = u64::MAX;

/// What a table counts for one event besides its value: its slot in its Thing's list and the
/// value's allocation header.
const EVENT_OVERHEAD_BYTES: u64 = 48;
/// What a table counts for one Thing besides its key: the map slot and the list's header.
const THING_OVERHEAD_BYTES: u64 = 64;

/// The memory every memory table of a store may hold together (`memtable_bytes_max`). Past it,
/// appends are refused until a checkpoint writes the frozen tables out: without a bound, a disk
/// that keeps failing the checkpoints (full, read-only) would keep every refused append's
/// events in memory until the process ran out.
pub(crate) struct MemBudget {
    used: AtomicU64,
    max: u64,
    /// Appends refused for it since open.
    refused: AtomicU64,
    /// Whether the last append that asked was refused (to log the change, not every refusal).
    refusing: AtomicBool,
}

/// How full the memory tables are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemTableStats {
    /// Bytes held (values plus the fixed overheads counted).
    pub bytes: u64,
    /// The bound (`memtable_bytes_max`).
    pub bytes_max: u64,
    /// Appends refused at the bound since open.
    pub refused: u64,
}

impl MemBudget {
    pub(crate) fn new(max: u64) -> Arc<MemBudget> {
        Arc::new(MemBudget {
            used: AtomicU64::new(0),
            max,
            refused: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
        })
    }

    pub(crate) fn stats(&self) -> MemTableStats {
        MemTableStats {
            bytes: self.used.load(Ordering::Relaxed),
            bytes_max: self.max,
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Whether an append may start, checked before it takes a change-feed position (so a
    /// refused append leaves nothing behind); logs when that changes. The appends already
    /// admitted may take the tables past the bound by at most what they hold.
    pub(crate) fn admits(&self) -> Result<(), Full> {
        let used = self.used.load(Ordering::Relaxed);
        if used < self.max {
            if self.refusing.swap(false, Ordering::Relaxed) {
                tracing::info!(
                    used,
                    max = self.max,
                    "events in memory are under their bound again; appends are accepted"
                );
            }
            return Ok(());
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        let first = !self.refusing.swap(true, Ordering::Relaxed);
        if first {
            tracing::warn!(used, max = self.max, "events waiting in memory for a checkpoint reached memtable_bytes_max; appends are refused until a checkpoint writes them out");
        }
        Err(Full {
            used,
            max: self.max,
            first,
        })
    }

    fn grow(&self, bytes: i64) {
        if bytes >= 0 {
            self.used.fetch_add(bytes as u64, Ordering::Relaxed);
        } else {
            self.release(bytes.unsigned_abs());
        }
    }

    fn release(&self, bytes: u64) {
        let before = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            })
            .unwrap_or_default();
        debug_assert!(before >= bytes, "released {bytes} of {before} bytes held");
    }

    /// Whether the tables hold half their bound: the next group commit makes a checkpoint, or
    /// while one runs in the background, goes on until [`MemBudget::nearly_full`] (the
    /// tables count a fixed overhead per event, so they may fill faster than the write-ahead
    /// records that trigger checkpoints). The bound itself is then reached only when
    /// checkpoints fail or fall behind (or one admitted append is larger than a quarter of it).
    pub(crate) fn wants_checkpoint(&self) -> bool {
        self.used.load(Ordering::Relaxed) >= self.max / 2
    }

    /// Whether the tables hold three quarters of their bound: a commit then waits for a
    /// checkpoint running in the background (whose frozen tables still count here) rather than
    /// let appends reach the bound and be refused.
    pub(crate) fn nearly_full(&self) -> bool {
        self.used.load(Ordering::Relaxed) >= self.max - self.max / 4
    }
}

/// An event key: the Thing's key (its length first, then its name) and the seq.
fn split(key: &[u8]) -> Option<(&[u8], u64)> {
    let name_len = usize::from(*key.first()?);
    if key.len() != 1 + name_len + 8 {
        return None;
    }
    let (thing, seq) = key.split_at(1 + name_len);
    Some((thing, u64::from_be_bytes(seq.try_into().ok()?)))
}

fn join(thing: &[u8], seq: u64, key: &mut Vec<u8>) {
    key.clear();
    key.extend_from_slice(thing);
    key.extend_from_slice(&seq.to_be_bytes());
}

fn event_bytes(value: &[u8]) -> u64 {
    value.len() as u64 + EVENT_OVERHEAD_BYTES
}

/// One Thing's events in a table, by seq.
type Events = Vec<(u64, IVec)>;

/// Events by Thing, each Thing's in seq order. A map of Things rather than one ordered map of
/// keys: an append is a hash lookup and a push at the end of its Thing's list, where an ordered
/// map compared long shared key prefixes at every level (3.4% of the server's CPU per durable
/// shadow round trip, 2026-12-05). Key order is only needed when a table is written as a run
/// (off the request path) and by whole-table reads.
#[derive(Default, Clone)]
pub(crate) struct Table {
    things: HashMap<Box<[u8]>, Events>,
    len: usize,
    bytes: u64,
}

impl Table {
    /// Events held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Inserts (or replaces) the event under `key`, which must be an event key.
    pub(crate) fn insert(&mut self, key: &[u8], value: IVec) -> Result<(), StorageError> {
        let (thing, seq) = split(key).ok_or_else(|| StorageError::Corrupt {
            thing: String::new(),
            seq: 0,
            reason: format!("malformed event key of {} bytes", key.len()),
        })?;
        self.put(thing, seq, value);
        Ok(())
    }

    fn contains(&self, thing: &[u8], seq: u64) -> bool {
        self.things
            .get(thing)
            .is_some_and(|events| match events.last() {
                // An append's first seq follows the Thing's last: one look at the end of its list
                // (a search touched a cache line per step, 3% of a shadow round trip's CPU).
                Some((last, _)) if *last < seq => false,
                _ => events.binary_search_by_key(&seq, |(seq, _)| *seq).is_ok(),
            })
    }

    /// Puts the event in; returns how many bytes the table grew by (0 for a replacement of a
    /// value of the same length).
    fn put(&mut self, thing: &[u8], seq: u64, value: IVec) -> i64 {
        let mut grown = 0u64;
        let events = match self.things.get_mut(thing) {
            Some(events) => events,
            None => {
                grown += thing.len() as u64 + THING_OVERHEAD_BYTES;
                self.things.entry(thing.into()).or_default()
            }
        };
        let added = event_bytes(&value);
        match events.last() {
            Some((last, _)) if *last >= seq => {
                match events.binary_search_by_key(&seq, |(seq, _)| *seq) {
                    Ok(at) => {
                        let old = std::mem::replace(&mut events[at].1, value);
                        self.bytes = self.bytes + added - event_bytes(&old);
                        return added as i64 - event_bytes(&old) as i64 + grown as i64;
                    }
                    Err(at) => events.insert(at, (seq, value)),
                }
            }
            _ => events.push((seq, value)),
        }
        self.len += 1;
        grown += added;
        self.bytes += grown;
        grown as i64
    }

    /// Moves every event of `other` in (of two events under one key, `other`'s stays); returns
    /// the bytes the two counted and this one no longer does (a Thing in both is one Thing now,
    /// an event replaced is gone).
    fn append(&mut self, other: Table) -> u64 {
        let mut freed = 0;
        let mut len = other.len;
        for (thing, mut events) in other.things {
            match self.things.get_mut(&thing) {
                Some(mine) => {
                    // One Thing's list now, counted once.
                    freed += thing.len() as u64 + THING_OVERHEAD_BYTES;
                    mine.append(&mut events);
                    // Stable: of two events under one seq the later one stays (as the ordered
                    // map's `append` kept it), in the earlier one's place.
                    mine.sort_by_key(|(seq, _)| *seq);
                    mine.dedup_by(|later, earlier| {
                        let same = later.0 == earlier.0;
                        if same {
                            std::mem::swap(&mut later.1, &mut earlier.1);
                            freed += event_bytes(&later.1);
                            len -= 1;
                        }
                        same
                    });
                }
                None => {
                    self.things.insert(thing, events);
                }
            }
        }
        self.len += len;
        self.bytes = self.bytes + other.bytes - freed;
        freed
    }

    /// The Things' keys in key order, with their events.
    fn sorted(&self) -> Vec<(&[u8], &Events)> {
        let mut things: Vec<(&[u8], &Events)> = self
            .things
            .iter()
            .map(|(thing, events)| (thing.as_ref(), events))
            .collect();
        // Thing keys start with their length, so none is a prefix of another: ordering them
        // orders their event keys.
        things.sort_unstable_by(|a, b| a.0.cmp(b.0));
        things
    }

    /// Calls `each` with every event in key order (the key in a buffer reused between calls).
    pub(crate) fn for_each_sorted<E>(
        &self,
        mut each: impl FnMut(&[u8], &IVec) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut key = Vec::new();
        for (thing, events) in self.sorted() {
            for (seq, value) in events {
                join(thing, *seq, &mut key);
                each(&key, value)?;
            }
        }
        Ok(())
    }

    /// Records with `start ≤ key ≤ end`, in key order or newest first with `rev`, at most
    /// `limit`, added to `out`.
    fn range_into(
        &self,
        (start, end): (&[u8], Option<&[u8]>),
        rev: bool,
        limit: usize,
        out: &mut Vec<Record>,
    ) {
        let record = |thing: &[u8], seq: u64, value: &IVec| {
            (IVec::from(crate::log::event_key(thing, seq)), value.clone())
        };
        // One Thing's range (every read but a whole-table walk): its list only.
        if let (Some((thing, first)), Some((end_thing, last))) = (split(start), end.and_then(split))
        {
            if thing == end_thing {
                let events = self.things.get(thing).map_or(&[][..], Vec::as_slice);
                let from = events.partition_point(|(seq, _)| *seq < first);
                let to = events.partition_point(|(seq, _)| *seq <= last);
                let within = events.get(from..to.max(from)).unwrap_or(&[]);
                let taken = |(seq, value): &(u64, IVec)| record(thing, *seq, value);
                if rev {
                    out.extend(within.iter().rev().take(limit).map(taken));
                } else {
                    out.extend(within.iter().take(limit).map(taken));
                }
                return;
            }
        }
        let mut key = Vec::new();
        let mut within = Vec::new();
        for (thing, events) in self.sorted() {
            for (seq, value) in events {
                join(thing, *seq, &mut key);
                if key.as_slice() >= start && end.is_none_or(|end| key.as_slice() <= end) {
                    within.push(record(thing, *seq, value));
                }
            }
        }
        if rev {
            out.extend(within.into_iter().rev().take(limit));
        } else {
            out.extend(within.into_iter().take(limit));
        }
    }
}

/// A frozen table and the run it becomes.
pub(crate) type Frozen = (u64, Arc<Table>);

#[derive(Default)]
struct State {
    active: Table,
    /// Frozen tables not written yet, oldest first (usually none or one).
    frozen: Vec<Frozen>,
}

/// One epoch's events not yet in its database.
pub(crate) struct MemTable {
    state: Mutex<State>,
    budget: Arc<MemBudget>,
}

impl Default for MemTable {
    /// A table with no bound of its own (tests, and epoch 0, which takes no appends).
    fn default() -> MemTable {
        MemTable::new(MemBudget::new(u64::MAX))
    }
}

impl Drop for MemTable {
    fn drop(&mut self) {
        let state = self.lock();
        let held = state.active.bytes + state.frozen.iter().map(|(_, t)| t.bytes).sum::<u64>();
        drop(state);
        self.budget.release(held);
    }
}

/// The tables of a store hold their bound: `used` of `max` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full {
    /// Bytes held.
    pub(crate) used: u64,
    /// The bound.
    pub(crate) max: u64,
    /// Whether the appends before were admitted (the first refusal after them).
    pub(crate) first: bool,
}

/// Why [`MemTable::insert_new`] put nothing in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The first key is taken already.
    Taken,
    /// A key is not an event key.
    Malformed,
}

/// What a reader saw of the table: the runs it holds frozen (the reader skips those runs in the
/// database if they were written meanwhile) and the records in range.
pub(crate) struct Seen {
    pub(crate) frozen_runs: Vec<u64>,
    pub(crate) records: Vec<Record>,
}

impl MemTable {
    /// An empty table counting what it holds against `budget`.
    pub(crate) fn new(budget: Arc<MemBudget>) -> MemTable {
        MemTable {
            state: Mutex::default(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts one append's events (event keys, in seq order) unless its first key is taken
    /// already; then nothing is inserted. Counts them against the store's bound (checked
    /// before the append started: [`MemBudget::admits`]).
    pub(crate) fn insert_new(&self, writes: &[(Vec<u8>, Vec<u8>)]) -> Result<(), Refused> {
        let Some((first, _)) = writes.first() else {
            return Ok(());
        };
        if !writes.iter().all(|(key, _)| split(key).is_some()) {
            return Err(Refused::Malformed);
        }
        let (thing, seq) = split(first).ok_or(Refused::Malformed)?;
        let mut state = self.lock();
        let taken = state.active.contains(thing, seq)
            || state
                .frozen
                .iter()
                .any(|(_, table)| table.contains(thing, seq));
        if taken {
            return Err(Refused::Taken);
        }
        let mut grown = 0i64;
        for (key, value) in writes {
            if let Some((thing, seq)) = split(key) {
                grown += state.active.put(thing, seq, IVec::from(value.as_slice()));
            }
        }
        drop(state);
        self.budget.grow(grown);
        Ok(())
    }

    /// Puts a record in whatever it replaces (tests of damaged records).
    #[cfg(feature = "test-util")]
    pub(crate) fn put(&self, key: &[u8], value: &[u8]) {
        let (thing, seq) = split(key).expect("an event key");
        let grown = self.lock().active.put(thing, seq, IVec::from(value));
        self.budget.grow(grown);
    }

    /// Whether `key` is here and, if so, replaces its value (tests of damaged records).
    #[cfg(feature = "test-util")]
    pub(crate) fn replace(&self, key: &[u8], value: &[u8]) -> bool {
        let (thing, seq) = split(key).expect("an event key");
        let mut state = self.lock();
        let state = &mut *state;
        let tables = state
            .frozen
            .iter_mut()
            .map(|(_, table)| Arc::make_mut(table))
            .chain(std::iter::once(&mut state.active));
        for table in tables {
            if table.contains(thing, seq) {
                self.budget.grow(table.put(thing, seq, IVec::from(value)));
                return true;
            }
        }
        false
    }

    /// Freezes what the table holds as run `run` (nothing if it holds nothing). A checkpoint
    /// that could not start its next segment freezes again under the same number: the two
    /// tables become one run.
    pub(crate) fn freeze(&self, run: u64) {
        let mut state = self.lock();
        if state.active.is_empty() {
            return;
        }
        let table = std::mem::take(&mut state.active);
        match state.frozen.last_mut() {
            Some((last, frozen)) if *last == run => {
                let merged = Arc::make_mut(frozen).append(table);
                self.budget.release(merged);
            }
            _ => state.frozen.push((run, Arc::new(table))),
        }
    }

    /// The frozen tables, oldest first (to be written as runs).
    pub(crate) fn frozen(&self) -> Vec<Frozen> {
        self.lock().frozen.clone()
    }

    /// The frozen table of run `run` is in the database now.
    pub(crate) fn written(&self, run: u64) {
        let mut state = self.lock();
        let mut released = 0;
        state.frozen.retain(|(id, table)| {
            let keep = *id != run;
            if !keep {
                released += table.bytes;
            }
            keep
        });
        drop(state);
        self.budget.release(released);
    }

    pub(crate) fn is_empty(&self) -> bool {
        let state = self.lock();
        state.active.is_empty() && state.frozen.is_empty()
    }

    /// Records with `start ≤ key ≤ end` (no upper bound if `end` is `None`), in key order or,
    /// with `rev`, newest key first, at most `limit`. The frozen tables and the active one hold
    /// disjoint keys as appends leave them (one writer per Thing, and an append whose first
    /// key is taken is refused).
    pub(crate) fn range(&self, start: &[u8], end: Option<&[u8]>, rev: bool, limit: usize) -> Seen {
        let state = self.lock();
        let mut records: Vec<Record> = Vec::new();
        let tables = state
            .frozen
            .iter()
            .map(|(_, table)| table.as_ref())
            .chain(std::iter::once(&state.active));
        for table in tables {
            table.range_into((start, end), rev, limit, &mut records);
        }
        if !state.frozen.is_empty() {
            // Several tables: merge, then keep the first `limit`.
            records.sort_unstable_by(|a, b| if rev { b.0.cmp(&a.0) } else { a.0.cmp(&b.0) });
            records.truncate(limit);
        }
        Seen {
            frozen_runs: state.frozen.iter().map(|(id, _)| *id).collect(),
            records,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of event `seq` of Thing `thing` (a one-letter name).
    fn key(thing: u8, seq: u64) -> Vec<u8> {
        let mut key = vec![1, thing];
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }

    fn one(thing: u8, seq: u64, value: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![(key(thing, seq), value.to_vec())]
    }

    fn keys(seen: &Seen) -> Vec<Vec<u8>> {
        seen.records.iter().map(|(k, _)| k.to_vec()).collect()
    }

    fn all(table: &MemTable) -> Seen {
        table.range(&[], None, false, usize::MAX)
    }

    #[test]
    fn a_taken_first_key_is_refused_in_the_active_and_the_frozen_tables() {
        let table = MemTable::default();
        assert_eq!(table.insert_new(&one(b'a', 1, b"x")), Ok(()));
        assert_eq!(table.insert_new(&one(b'a', 1, b"y")), Err(Refused::Taken));
        table.freeze(7);
        assert_eq!(table.insert_new(&one(b'a', 1, b"z")), Err(Refused::Taken));
        let two = vec![(key(b'a', 2), b"y".to_vec()), (key(b'a', 3), b"z".to_vec())];
        assert_eq!(table.insert_new(&two), Ok(()));
        let seen = all(&table);
        assert_eq!(seen.frozen_runs, vec![7]);
        assert_eq!(keys(&seen), vec![key(b'a', 1), key(b'a', 2), key(b'a', 3)]);
        assert_eq!(seen.records[0].1.as_ref(), b"x");
    }

    #[test]
    fn a_written_run_leaves_the_table() {
        let table = MemTable::default();
        table.insert_new(&one(b'b', 1, b"12345")).expect("in");
        table.freeze(3);
        table.insert_new(&one(b'a', 1, b"1")).expect("in");
        assert_eq!(keys(&all(&table)), vec![key(b'a', 1), key(b'b', 1)]);
        table.written(3);
        let seen = all(&table);
        assert!(seen.frozen_runs.is_empty());
        assert_eq!(keys(&seen), vec![key(b'a', 1)]);
        table.freeze(4);
        table.written(4);
        assert!(table.is_empty());
    }

    /// Given a table frozen as run 5 (a checkpoint whose next segment could not start), when
    /// more events are frozen under 5 again, then run 5 holds both: one table, never two
    /// tables of one run (writing the second would replace the first).
    #[test]
    fn freezing_again_under_the_same_run_merges_the_tables() {
        let budget = MemBudget::new(u64::MAX);
        let table = MemTable::new(budget.clone());
        table.insert_new(&one(b'a', 1, b"x")).expect("in");
        table.freeze(5);
        table.insert_new(&one(b'a', 2, b"y")).expect("in");
        table.freeze(5);
        let frozen = table.frozen();
        assert_eq!(frozen.len(), 1);
        assert_eq!(frozen[0].1.len(), 2);
        table.insert_new(&one(b'a', 3, b"z")).expect("in");
        table.freeze(6);
        assert_eq!(table.frozen().len(), 2);
        table.written(5);
        table.written(6);
        assert_eq!(budget.stats().bytes, 0, "the merge counts its Thing once");
    }

    #[test]
    fn a_range_is_bounded_and_reads_backwards_across_tables() {
        let table = MemTable::default();
        for run in [1, 2] {
            table.insert_new(&one(b'a', run, b"v")).expect("in");
            table.freeze(run);
        }
        table.insert_new(&one(b'a', 3, b"v")).expect("in");
        table.insert_new(&one(b'b', 1, b"v")).expect("in");
        let (first, last) = (key(b'a', 0), key(b'a', u64::MAX));
        let newest = table.range(&first, Some(&last), true, 2);
        assert_eq!(keys(&newest), vec![key(b'a', 3), key(b'a', 2)]);
        let oldest = table.range(&first, Some(&last), false, 1);
        assert_eq!(keys(&oldest), vec![key(b'a', 1)]);
        let middle = table.range(&key(b'a', 2), Some(&key(b'a', 2)), false, 9);
        assert_eq!(keys(&middle), vec![key(b'a', 2)]);
        let across = table.range(&key(b'a', 3), Some(&key(b'b', 0)), false, 9);
        assert_eq!(keys(&across), vec![key(b'a', 3)]);
    }

    /// Given tables of a store holding their bound, when an append asks, then it is refused
    /// (the first refusal of a run says so, to start a checkpoint), whatever epoch's table
    /// holds the bytes; once a run is written, appends are admitted again.
    #[test]
    fn appends_are_refused_while_the_tables_hold_their_bound() {
        let budget = MemBudget::new(300);
        let (older, newer) = (MemTable::new(budget.clone()), MemTable::new(budget.clone()));
        older.insert_new(&one(b'a', 1, &[7; 100])).expect("in");
        older.freeze(1);
        assert_eq!(budget.admits(), Ok(()));
        assert!(budget.wants_checkpoint(), "half the bound");
        assert!(!budget.nearly_full(), "{} of 300", budget.stats().bytes);
        newer
            .insert_new(&one(b'b', 1, &[7; 10]))
            .expect("admitted before");
        assert!(budget.wants_checkpoint());
        assert!(budget.nearly_full());
        let used = budget.stats().bytes;
        assert!(used >= 300);
        assert_eq!(
            budget.admits(),
            Err(Full {
                used,
                max: 300,
                first: true
            })
        );
        assert!(matches!(budget.admits(), Err(Full { first: false, .. })));
        assert_eq!(budget.stats().refused, 2);
        older.written(1);
        assert_eq!(budget.admits(), Ok(()));
        drop(newer);
        assert_eq!(
            budget.stats().bytes,
            0,
            "a dropped table gives its bytes back"
        );
    }

    /// Given two tables frozen under one run that both hold a seq (a conflict the check did not
    /// see), when they merge, then the later event stays, once, and the bytes counted shrink
    /// by the one that went.
    #[test]
    fn a_merge_keeps_the_later_of_two_events_under_one_key() {
        let (mut first, mut second) = (Table::default(), Table::default());
        // The replaced event is larger than all `second` adds (its removal must not be
        // taken from `second`'s count alone).
        let old = vec![b'o'; 200];
        first
            .insert(&key(b'a', 1), IVec::from(old.as_slice()))
            .expect("in");
        first
            .insert(&key(b'a', 2), IVec::from(&b"two"[..]))
            .expect("in");
        second
            .insert(&key(b'a', 1), IVec::from(&b"new"[..]))
            .expect("in");
        let (before, second_bytes) = (first.bytes, second.bytes);
        let merged_away = first.append(second);
        assert_eq!(first.len(), 2);
        let mut seen = Vec::new();
        first
            .for_each_sorted(|k, v| {
                seen.push((k.to_vec(), v.to_vec()));
                Ok::<(), ()>(())
            })
            .expect("walk");
        assert_eq!(
            seen,
            vec![
                (key(b'a', 1), b"new".to_vec()),
                (key(b'a', 2), b"two".to_vec())
            ]
        );
        assert_eq!(first.bytes + merged_away, before + second_bytes);
        assert_eq!(merged_away, 2 + THING_OVERHEAD_BYTES + event_bytes(&old));
    }

    proptest::proptest! {
        /// Law: whatever events go in (in any order), are frozen and written, any range of
        /// the table reads what the same range of one ordered map of the events still held
        /// reads, and the budget counts what the tables hold.
        #[test]
        fn a_table_reads_as_an_ordered_map_of_its_events(
            steps in proptest::collection::vec((0u8..4, 0u8..3, 0u64..40, 0u8..8), 1..120),
            ranges in proptest::collection::vec(((0u8..4, 0u64..45), (0u8..4, 0u64..45), proptest::bool::ANY), 6),
        ) {
            let budget = MemBudget::new(u64::MAX);
            let table = MemTable::new(budget.clone());
            let mut model = std::collections::BTreeMap::new();
            let mut frozen: Vec<(u64, Vec<Vec<u8>>)> = Vec::new();
            let mut active: Vec<Vec<u8>> = Vec::new();
            let mut run = 0;
            for (op, thing, seq, len) in steps {
                let thing = b'a' + thing;
                match op {
                    0 | 1 => {
                        let k = key(thing, seq);
                        if table.insert_new(&one(thing, seq, &vec![len; len as usize])).is_ok() {
                            proptest::prop_assert!(!model.contains_key(&k));
                            model.insert(k.clone(), vec![len; len as usize]);
                            active.push(k);
                        } else {
                            proptest::prop_assert!(model.contains_key(&k));
                        }
                    }
                    2 => {
                        run += 1;
                        table.freeze(run);
                        if !active.is_empty() {
                            frozen.push((run, std::mem::take(&mut active)));
                        }
                    }
                    _ => {
                        if let Some((id, gone)) = (!frozen.is_empty()).then(|| frozen.remove(0)) {
                            table.written(id);
                            for k in gone {
                                model.remove(&k);
                            }
                        }
                    }
                }
            }
            for ((a, s), (b, e), rev) in ranges {
                let (start, end) = (key(b'a' + a, s), key(b'a' + b, e));
                let seen = table.range(&start, Some(&end), rev, 5);
                let mut want: Vec<Vec<u8>> = model
                    .range(start.clone()..)
                    .take_while(|(k, _)| **k <= end)
                    .map(|(k, _)| k.clone())
                    .collect();
                if rev {
                    want.reverse();
                }
                want.truncate(5);
                proptest::prop_assert_eq!(keys(&seen), want);
            }
            let whole: Vec<Vec<u8>> = model.keys().cloned().collect();
            proptest::prop_assert_eq!(keys(&all(&table)), whole);
            let values: Vec<Vec<u8>> = all(&table).records.iter().map(|(_, v)| v.to_vec()).collect();
            let want: Vec<Vec<u8>> = model.values().cloned().collect();
            proptest::prop_assert_eq!(values, want);
            let counted: u64 = model.values().map(|v| event_bytes(v)).sum::<u64>();
            proptest::prop_assert!(budget.stats().bytes >= counted);
            drop(table);
            proptest::prop_assert_eq!(budget.stats().bytes, 0);
        }
    }
}
