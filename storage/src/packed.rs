//! Sealed epochs, packed: their events rewritten once, in key order, into blocks of
//! consecutive records, so that a sealed epoch takes a fraction of the disk it took while it
//! was written.
//!
//! While an epoch takes appends, every event is its own sled entry, inserted in whatever order
//! Things write: sled rewrites a leaf (at most 16 entries) each time it changes and reclaims a
//! log segment only once half of it is dead, so a small event costs about 5x its bytes on
//! disk. Once the epoch is sealed nothing changes in it any more: its records are copied, in
//! key order, into a new database as blocks of at least [`PACKED_BLOCK_BYTES_MIN`] (key = the
//! block's first record key; value = the records, each key stored as what it does not share
//! with the previous one), and the new database takes the old one's place (see
//! [`crate::epoch`]). A read seeks the block at or before its first key and decodes forward.
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

    /// The tree appends write to (never a packed epoch: only the current epoch takes appends,
    /// and only sealed ones are packed).
    pub(crate) fn for_writing(&self) -> Result<&sled::Tree, StorageError> {
        match self {
            EventTree::Plain(tree) => Ok(tree),
            EventTree::Packed(_) => Err(StorageError::Db(
                "a packed log epoch takes no more events".into(),
            )),
        }
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
    events: &EventTree,
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
    for record in events.range(&[], None) {
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
            let (_plain_dir, plain_db) = temp_db();
            let plain = plain_db.open_tree("events").expect("tree");
            for ((thing, seq), value) in &events {
                plain.insert(key(*thing, *seq), value.as_slice()).expect("insert");
            }
            let plain = EventTree::Plain(plain);
            let (_packed_dir, packed_db) = temp_db();
            let feed = plain_db.open_tree("feed").expect("tree");
            let counts = pack(&plain, &feed, &packed_db, &|| false)
                .expect("pack")
                .expect("not cancelled");
            prop_assert_eq!(counts.records, events.len() as u64);
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
