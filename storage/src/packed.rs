//! Sealed epochs, packed: their events rewritten once, in key order, into blocks of
//! consecutive records, so that a sealed epoch takes a fraction of the disk it took while it
//! was written.
//!
//! While an epoch takes appends, its events reach its database in *runs*: each checkpoint
//! writes the events of its memory table (see [`crate::memtable`]) as one tree of blocks in this
//! layout. Versions before runs inserted every event as its own sled entry, in whatever order
//! Things wrote: sled rewrites a leaf (at most 16 entries) each time it changes and reclaims a
//! log segment only once half of it is dead, so a small event cost about 5x its bytes on disk
//! (such epochs still read and pack). Once the epoch is sealed nothing changes in it any more:
//! its records (those entries and the runs, merged by key) are copied, in key order, into a new
//! database as blocks of at least [`PACKED_BLOCK_BYTES_MIN`] (key = the block's first record
//! key; value = the records, each key stored as what it does not share with the previous one),
//! and the new database takes the old one's place (see [`crate::epoch`]). A read seeks the
//! block at or before its first key and decodes forward; a read of one Thing's events reads
//! the runs one after another (a Thing's events in a later run follow those in an earlier one).
//!
//! Block format (version 1): one byte `1`, then per record: varint shared-prefix length,
//! varint suffix length, the suffix, varint value length, the value. The first record's key is
//! the block's key.

use std::collections::VecDeque;
use std::ops::Bound;

use sled::IVec;

use crate::StorageError;

/// A block is closed once its records take at least this many bytes (one sled entry per block
/// instead of per event: measured 179 B per 103-byte record at 64 records a block against 417
/// B one by one, in key order).
pub(crate) const PACKED_BLOCK_BYTES_MIN: usize = 8 * 1024;

/// Blocks written between two flushes of the new database while packing (bounds what sled
/// buffers in memory).
const PACKED_FLUSH_BLOCKS: usize = 1024;

const BLOCK_FORMAT: u8 = 1;

/// One stored event record: its key (thing key ‖ seq) and its value.
pub(crate) type Record = (IVec, IVec);

/// Records read from an epoch, in key order (or reverse).
pub(crate) type Records<'a> = Box<dyn Iterator<Item = Result<Record, StorageError>> + 'a>;

/// An epoch's events: one entry per event (while the epoch is written, and sealed epochs not
/// packed yet), or packed blocks.
pub(crate) enum EventTree {
    Plain(sled::Tree),
    Packed(sled::Tree),
}

impl EventTree {
    pub(crate) fn is_packed(&self) -> bool {
        matches!(self, EventTree::Packed(_))
    }

    pub(crate) fn is_empty(&self) -> bool {
        match self {
            EventTree::Plain(tree) | EventTree::Packed(tree) => tree.is_empty(),
        }
    }

    /// Records with `start ≤ key ≤ end` (no upper bound if `end` is `None`), in key order.
    pub(crate) fn range<'a>(&'a self, start: &[u8], end: Option<&[u8]>) -> Records<'a> {
        match self {
            EventTree::Plain(tree) => {
                let upper = end.map_or(Bound::Unbounded, Bound::Included);
                Box::new(
                    tree.range::<&[u8], _>((Bound::Included(start), upper))
                        .map(|item| item.map_err(StorageError::from)),
                )
            }
            EventTree::Packed(tree) => Box::new(Forward {
                tree,
                start: start.to_vec(),
                end: end.map(<[u8]>::to_vec),
                buffered: VecDeque::new(),
                last_block: None,
                done: false,
            }),
        }
    }

    /// Records with `start ≤ key ≤ end`, newest key first.
    pub(crate) fn range_rev<'a>(&'a self, start: &[u8], end: &[u8]) -> Records<'a> {
        match self {
            EventTree::Plain(tree) => Box::new(
                tree.range(start..=end)
                    .rev()
                    .map(|item| item.map_err(StorageError::from)),
            ),
            EventTree::Packed(tree) => Box::new(Backward {
                tree,
                start: start.to_vec(),
                end: end.to_vec(),
                buffered: Vec::new(),
                block_before: None,
                done: false,
            }),
        }
    }

    /// Writes `value` under `key` whatever is there (tests of corruption handling): in a packed
    /// epoch, the block that holds or would hold the key is rewritten.
    #[cfg(feature = "test-util")]
    pub(crate) fn put_raw(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        let tree = match self {
            EventTree::Plain(tree) => {
                tree.insert(key, value)?;
                return Ok(());
            }
            EventTree::Packed(tree) => tree,
        };
        let holder = match tree.range(..=key).next_back() {
            Some(item) => Some(item?),
            None => tree.first()?,
        };
        let mut records = match &holder {
            Some((block_key, block)) => decode_block(block_key, block)?,
            None => Vec::new(),
        };
        match records.binary_search_by(|(k, _)| k.as_ref().cmp(key)) {
            Ok(i) => records[i].1 = IVec::from(value),
            Err(i) => records.insert(i, (IVec::from(key), IVec::from(value))),
        }
        let mut writer = BlockWriter::default();
        for (k, v) in &records {
            writer.push(k, v);
        }
        if let Some((block_key, _)) = holder {
            tree.remove(block_key)?;
        }
        if let Some((block_key, block)) = writer.finish() {
            tree.insert(block_key, block)?;
        }
        Ok(())
    }
}

/// Builds one block.
#[derive(Default)]
struct BlockWriter {
    first: Option<Vec<u8>>,
    previous: Vec<u8>,
    bytes: Vec<u8>,
}

impl BlockWriter {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        if self.first.is_none() {
            self.first = Some(key.to_vec());
            self.bytes.push(BLOCK_FORMAT);
            self.previous.clear();
        }
        let shared = self
            .previous
            .iter()
            .zip(key)
            .take_while(|(a, b)| a == b)
            .count();
        put_varint(&mut self.bytes, shared as u64);
        put_varint(&mut self.bytes, (key.len() - shared) as u64);
        self.bytes.extend_from_slice(&key[shared..]);
        put_varint(&mut self.bytes, value.len() as u64);
        self.bytes.extend_from_slice(value);
        self.previous.clear();
        self.previous.extend_from_slice(key);
    }

    fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The block's key and value, if it holds any record; the writer starts a new block.
    fn finish(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        let first = self.first.take()?;
        Some((first, std::mem::take(&mut self.bytes)))
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

/// The records of a block, in key order (a whole-block read: tests and the test-util writer).
#[cfg(any(test, feature = "test-util"))]
pub(crate) fn decode_block(block_key: &[u8], block: &[u8]) -> Result<Vec<Record>, StorageError> {
    Ok(decode_block_range(block_key, block, &[], None)?.0)
}

/// The records of a block with `start ≤ key ≤ end`, in key order (only those are copied out),
/// and whether the block holds a key after `end`.
fn decode_block_range(
    block_key: &[u8],
    block: &[u8],
    start: &[u8],
    end: Option<&[u8]>,
) -> Result<(Vec<Record>, bool), StorageError> {
    let damaged = |why: &str| {
        StorageError::Db(format!(
            "packed log block at key {block_key:02x?} is damaged: {why}"
        ))
    };
    if block.first() != Some(&BLOCK_FORMAT) {
        return Err(damaged("unknown block format"));
    }
    let mut at = 1;
    let mut records: Vec<Record> = Vec::new();
    let mut key: Vec<u8> = Vec::new();
    let mut first = true;
    while at < block.len() {
        let shared = get_varint(block, &mut at).ok_or_else(|| damaged("truncated"))? as usize;
        let suffix = get_varint(block, &mut at).ok_or_else(|| damaged("truncated"))? as usize;
        if shared > key.len() {
            return Err(damaged("a key shares more than the previous one has"));
        }
        let end_of_key = at
            .checked_add(suffix)
            .filter(|e| *e <= block.len())
            .ok_or_else(|| damaged("truncated key"))?;
        let suffix_bytes = &block[at..end_of_key];
        // Keys rise strictly: past the shared prefix, the new key is longer or its first
        // different byte is higher.
        let rises = match (key.get(shared), suffix_bytes.first()) {
            (Some(old), Some(new)) => new > old,
            (None, Some(_)) => true,
            (_, None) => false,
        };
        if !first && !rises {
            return Err(damaged("keys out of order"));
        }
        key.truncate(shared);
        key.extend_from_slice(suffix_bytes);
        at = end_of_key;
        let len = get_varint(block, &mut at).ok_or_else(|| damaged("truncated"))? as usize;
        let end_of_value = at
            .checked_add(len)
            .filter(|e| *e <= block.len())
            .ok_or_else(|| damaged("truncated value"))?;
        if first && key.as_slice() != block_key {
            return Err(damaged("its first record is not its key"));
        }
        first = false;
        if end.is_some_and(|end| key.as_slice() > end) {
            return Ok((records, true));
        }
        if key.as_slice() >= start {
            records.push((
                IVec::from(key.as_slice()),
                IVec::from(&block[at..end_of_value]),
            ));
        }
        at = end_of_value;
    }
    if first {
        return Err(damaged("no record"));
    }
    Ok((records, false))
}

/// The block a walk goes on with; `None` (the walk is over, `done` set) if there is none, an
/// error (also ending the walk) if it cannot be read.
fn ended_unless_found(
    block: Option<sled::Result<Record>>,
    done: &mut bool,
) -> Option<Result<Record, StorageError>> {
    match block {
        Some(Ok(block)) => Some(Ok(block)),
        other => {
            *done = true;
            other.map(|read| read.map_err(StorageError::from))
        }
    }
}

/// Forward over a packed tree: the block at or before `start`, then the following ones until
/// a block starts after `end`.
struct Forward<'a> {
    tree: &'a sled::Tree,
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    buffered: VecDeque<Record>,
    /// The key of the last block decoded.
    last_block: Option<IVec>,
    done: bool,
}

impl Iterator for Forward<'_> {
    type Item = Result<Record, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.buffered.pop_front() {
                return Some(Ok(record));
            }
            if self.done {
                return None;
            }
            let block = match &self.last_block {
                None => match self.tree.range(..=self.start.as_slice()).next_back() {
                    Some(block) => Some(block),
                    None => self.tree.range(self.start.as_slice()..).next(),
                },
                Some(last) => self
                    .tree
                    .range::<&[u8], _>((Bound::Excluded(last.as_ref()), Bound::Unbounded))
                    .next(),
            };
            let (key, value) = match ended_unless_found(block, &mut self.done)? {
                Ok(block) => block,
                Err(e) => return Some(Err(e)),
            };
            if self
                .end
                .as_ref()
                .is_some_and(|end| key.as_ref() > end.as_slice())
            {
                self.done = true;
                return None;
            }
            match decode_block_range(&key, &value, &self.start, self.end.as_deref()) {
                Ok((records, past_end)) => {
                    self.buffered.extend(records);
                    self.done = past_end;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            self.last_block = Some(key);
        }
    }
}

/// Backward over a packed tree: the block at or before `end`, then the ones before it until
/// one starts at or before `start`.
struct Backward<'a> {
    tree: &'a sled::Tree,
    start: Vec<u8>,
    end: Vec<u8>,
    /// Records of the current block still to yield (the last one next).
    buffered: Vec<Record>,
    /// The key of the last block decoded.
    block_before: Option<IVec>,
    done: bool,
}

impl Iterator for Backward<'_> {
    type Item = Result<Record, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.buffered.pop() {
                return Some(Ok(record));
            }
            if self.done {
                return None;
            }
            let block = match &self.block_before {
                None => self.tree.range(..=self.end.as_slice()).next_back(),
                Some(before) => self.tree.range(..before.as_ref()).next_back(),
            };
            let (key, value) = match ended_unless_found(block, &mut self.done)? {
                Ok(block) => block,
                Err(e) => return Some(Err(e)),
            };
            match decode_block_range(&key, &value, &self.start, Some(&self.end)) {
                Ok((records, _)) => self.buffered = records,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            // No earlier block holds a key at or after `start`.
            if key.as_ref() <= self.start.as_slice() {
                self.done = true;
            }
            self.block_before = Some(key);
        }
    }
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackCounts {
    pub(crate) records: u64,
    pub(crate) blocks: u64,
}

/// Copies a sealed epoch's events (packed, into tree `packed`) and its feed (as it is) into the
/// new database `into`, and flushes it. Returns `None` if `cancelled` said so meanwhile (the
/// store is closing; the new database is then incomplete and must be thrown away).
pub(crate) fn pack(
    events: Records<'_>,
    feed: &sled::Tree,
    into: &sled::Db,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<PackCounts>, StorageError> {
    let packed = into.open_tree("packed")?;
    let feed_copy = into.open_tree("feed")?;
    let mut counts = PackCounts {
        records: 0,
        blocks: 0,
    };
    let mut writer = BlockWriter::default();
    let put = |block: Option<(Vec<u8>, Vec<u8>)>,
               counts: &mut PackCounts|
     -> Result<bool, StorageError> {
        let Some((key, value)) = block else {
            return Ok(true);
        };
        packed.insert(key, value)?;
        counts.blocks += 1;
        if counts.blocks.is_multiple_of(PACKED_FLUSH_BLOCKS as u64) {
            if cancelled() {
                return Ok(false);
            }
            into.flush()?;
        }
        Ok(true)
    };
    for record in events {
        let (key, value) = record?;
        writer.push(&key, &value);
        counts.records += 1;
        if writer.len_bytes() >= PACKED_BLOCK_BYTES_MIN && !put(writer.finish(), &mut counts)? {
            return Ok(None);
        }
    }
    if !put(writer.finish(), &mut counts)? {
        return Ok(None);
    }
    for entry in feed.iter() {
        let (key, value) = entry?;
        feed_copy.insert(key, value)?;
    }
    if cancelled() {
        return Ok(None);
    }
    // Written last: sled recovers a prefix of its log, so with this everything else is there.
    into.open_tree(COMPLETE_TREE)?
        .insert(COMPLETE_KEY, &counts.records.to_be_bytes())?;
    into.flush()?;
    Ok(Some(counts))
}

/// The tree that lists an epoch's runs (see [`crate::memtable`]): key = run (u64 BE), value =
/// its record count (u64 BE). A run's tree counts only once listed here.
const RUNS_TREE: &str = "runs";

fn run_tree_name(run: u64) -> String {
    format!("run.{run:020}")
}

/// Writes `table` as run `run` of the epoch database `db`: its records in blocks, then its
/// entry in the list of runs (sled recovers a prefix of its log, so a listed run is whole).
/// The run must not be listed (see [`unlist_runs`]). Not flushed: the caller flushes and
/// fsyncs the database.
pub(crate) fn write_run(
    db: &sled::Db,
    run: u64,
    table: &crate::memtable::Table,
) -> Result<sled::Tree, StorageError> {
    let tree = db.open_tree(run_tree_name(run))?;
    // Whatever an attempt that failed midway left.
    tree.clear()?;
    let mut writer = BlockWriter::default();
    table.for_each_sorted(|key, value| {
        writer.push(key, value);
        if writer.len_bytes() >= PACKED_BLOCK_BYTES_MIN {
            if let Some((key, block)) = writer.finish() {
                tree.insert(key, block)?;
            }
        }
        Ok::<(), StorageError>(())
    })?;
    if let Some((key, block)) = writer.finish() {
        tree.insert(key, block)?;
    }
    db.open_tree(RUNS_TREE)?
        .insert(run.to_be_bytes(), &(table.len() as u64).to_be_bytes())?;
    Ok(tree)
}

/// Removes the listings of `runs` in one atomic batch (see [`crate::epoch::Epoch::persist_frozen`]).
pub(crate) fn unlist_runs(db: &sled::Db, runs: &[u64]) -> Result<(), StorageError> {
    if runs.is_empty() {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    for run in runs {
        batch.remove(&run.to_be_bytes());
    }
    db.open_tree(RUNS_TREE)?.apply_batch(batch)?;
    Ok(())
}

/// The runs of an epoch database, oldest first; a run's tree that is not listed (its writing
/// was cut short) is dropped.
pub(crate) fn open_runs(db: &sled::Db) -> Result<Vec<(u64, EventTree)>, StorageError> {
    let listed = db.open_tree(RUNS_TREE)?;
    let mut runs = Vec::new();
    for item in listed.iter() {
        let (key, _) = item?;
        let run = <[u8; 8]>::try_from(key.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StorageError::Db(format!("malformed run key {key:02x?}")))?;
        runs.push(run);
    }
    for name in db.tree_names() {
        let Some(run) = std::str::from_utf8(&name)
            .ok()
            .and_then(|name| name.strip_prefix("run."))
            .and_then(|run| run.parse::<u64>().ok())
        else {
            continue;
        };
        if !runs.contains(&run) {
            tracing::info!(run, "dropping a log run whose writing was cut short");
            db.drop_tree(&name)?;
        }
    }
    runs.iter()
        .map(|run| Ok((*run, EventTree::Packed(db.open_tree(run_tree_name(*run))?))))
        .collect()
}

/// Merges sources, each in key order with keys no other one holds, into one walk in key order.
pub(crate) fn merged(sources: Vec<Records<'_>>) -> Records<'_> {
    if sources.len() == 1 {
        return sources.into_iter().next().expect("one source");
    }
    let heads = sources.iter().map(|_| None).collect();
    Box::new(Merged {
        sources,
        heads,
        started: false,
    })
}

struct Merged<'a> {
    sources: Vec<Records<'a>>,
    heads: Vec<Option<Record>>,
    started: bool,
}

impl Iterator for Merged<'_> {
    type Item = Result<Record, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.started {
            self.started = true;
            for (i, source) in self.sources.iter_mut().enumerate() {
                match source.next() {
                    Some(Ok(record)) => self.heads[i] = Some(record),
                    Some(Err(e)) => return Some(Err(e)),
                    None => {}
                }
            }
        }
        let least = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, head)| head.as_ref().map(|(key, _)| (i, key)))
            .min_by(|a, b| a.1.cmp(b.1))
            .map(|(i, _)| i)?;
        let record = self.heads[least].take();
        match self.sources[least].next() {
            Some(Ok(next)) => self.heads[least] = Some(next),
            Some(Err(e)) => return Some(Err(e)),
            None => {}
        }
        record.map(Ok)
    }
}

const COMPLETE_TREE: &str = "packed_meta";
const COMPLETE_KEY: &str = "records";

/// Whether `db` is a whole packed copy (its completion record, written last, is there).
pub(crate) fn is_complete(db: &sled::Db) -> bool {
    db.tree_names()
        .iter()
        .any(|name| name.as_ref() == COMPLETE_TREE.as_bytes())
        && db
            .open_tree(COMPLETE_TREE)
            .and_then(|tree| tree.get(COMPLETE_KEY))
            .is_ok_and(|record| record.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn temp_db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .open()
            .expect("open sled");
        (dir, db)
    }

    fn key(thing: u8, seq: u64) -> Vec<u8> {
        let mut key = vec![1, b'a' + thing];
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }

    fn collect(records: Records<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
        records
            .map(|r| r.expect("readable"))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Law: any forward or backward range of a packed tree reads exactly what the same
        /// range of the plain tree it was packed from reads.
        #[test]
        fn a_packed_tree_reads_as_the_plain_one(
            events in proptest::collection::btree_map(
                (0u8..6, 0u64..400),
                proptest::collection::vec(any::<u8>(), 0..900),
                0..300,
            ),
            ranges in proptest::collection::vec(((0u8..7, 0u64..420), (0u8..7, 0u64..420)), 8),
        ) {
            // The epoch's events: some one by one in its plain tree, some in a run (one key in
            // one place only, as appends leave them); packing merges both.
            let (_plain_dir, plain_db) = temp_db();
            let plain = plain_db.open_tree("events").expect("tree");
            let all: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = events
                .iter()
                .map(|((thing, seq), value)| (key(*thing, *seq), value.clone()))
                .collect();
            let mut in_run = crate::memtable::Table::default();
            for (i, (k, value)) in all.iter().enumerate() {
                if i % 3 == 1 {
                    in_run.insert(k, IVec::from(value.as_slice())).expect("an event key");
                } else {
                    plain.insert(k.as_slice(), value.as_slice()).expect("insert");
                }
            }
            let run = write_run(&plain_db, 9, &in_run).expect("run");
            let runs = open_runs(&plain_db).expect("runs");
            prop_assert_eq!(runs.len(), 1);
            prop_assert_eq!(
                collect(runs[0].1.range(&[], None)).len(),
                in_run.len()
            );
            drop(run);
            let plain = EventTree::Plain(plain);
            let (_packed_dir, packed_db) = temp_db();
            let feed = plain_db.open_tree("feed").expect("tree");
            let counts = pack(
                merged(vec![plain.range(&[], None), runs[0].1.range(&[], None)]),
                &feed,
                &packed_db,
                &|| false,
            )
            .expect("pack")
            .expect("not cancelled");
            prop_assert_eq!(counts.records, all.len() as u64);
            // The plain tree with every event, to read the packed copy against.
            let whole = plain_db.open_tree("events").expect("tree");
            in_run
                .for_each_sorted(|k, value| whole.insert(k, value).map(drop))
                .expect("insert");
            let packed = EventTree::Packed(packed_db.open_tree("packed").expect("tree"));
            prop_assert_eq!(collect(packed.range(&[], None)), collect(plain.range(&[], None)));
            for ((a_thing, a_seq), (b_thing, b_seq)) in ranges {
                let (start, end) = (key(a_thing, a_seq), key(b_thing, b_seq));
                prop_assert_eq!(
                    collect(packed.range(&start, Some(&end))),
                    collect(plain.range(&start, Some(&end)))
                );
                prop_assert_eq!(
                    collect(packed.range_rev(&start, &end)),
                    collect(plain.range_rev(&start, &end))
                );
            }
        }
    }

    #[test]
    fn a_damaged_block_is_an_error_not_a_panic() {
        let mut writer = BlockWriter::default();
        writer.push(&key(0, 1), b"one");
        writer.push(&key(0, 2), b"two");
        let (block_key, block) = writer.finish().expect("a block");
        assert_eq!(decode_block(&block_key, &block).expect("whole").len(), 2);
        for cut in 0..block.len() {
            let read = decode_block(&block_key, &block[..cut]);
            assert!(read.map_or(true, |r| r.len() < 2), "cut at {cut}");
        }
        assert!(decode_block(&key(0, 2), &block).is_err(), "wrong block key");
        let mut bad = block.clone();
        bad[0] = 9;
        assert!(decode_block(&block_key, &bad).is_err(), "unknown format");
    }
}
