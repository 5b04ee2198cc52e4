//! The write-ahead file: appends are durable once their bytes are in it, not once sled has
//! flushed them.
//!
//! A group commit that flushed sled paid, for every batch, sled's hand-off of its log buffer
//! to its IO pool (which wakes all seven of the pool's threads), the write, two fsyncs and a
//! listing of the blob directory (2026-12-04 profile: 17% of the server's CPU in a shadow
//! run). Now the feed's combiner, after writing a round's feed block into the epoch's sled
//! `feed` tree and its events into the epoch's memory table (see [`crate::memtable`]), also
//! frames those writes as one record in a shared buffer ([`WalBuffer`]); the group commit
//! writes the buffer to the current segment file and `fdatasync`s it: one write and one fsync
//! per batch. The epochs are written to only at a *checkpoint*: once
//! [`crate::StoreConfig::wal_bytes_max`] bytes went into the segments since the last one or the
//! memory tables hold half their bound, after a write-ahead write or sync failed, when writes
//! were made that no record describes (a record too large to frame, a writer that panicked)
//! and at close, the commit freezes the memory tables as it closes the current segment, starts
//! a new one, writes each frozen table into its epoch as a run named after the closed segment,
//! flushes and fsyncs every epoch that is not sealed, and only then removes the older segments.
//! A routine checkpoint (the first two causes) syncs the closed segment first and leaves the
//! writing and flushing of the epochs to the checkpoint thread (see [`crate::commit`]); the
//! segments go at the first commit after it reports. An epoch's table is also written and its
//! database flushed and fsynced on its own just before it is sealed (checkpoints skip sealed
//! epochs).
//!
//! Only the epochs' `events` and `feed` trees are written ahead; the main database (indexes,
//! snapshots, cursors, sessions, key/values) is still flushed by every commit, after the
//! segment is synced, so an append's index changes are never durable before its events.
//! Removals are not written ahead: a feed block trimmed behind its consumers since the last
//! checkpoint can come back after a crash, below every cursor (no consumer reads it again); it
//! stays in its epoch (which the open seals) as a few dead bytes.
//!
//! Opening the store replays the segments into their epochs before anything reads them
//! ([`replay`]), writes the replayed events of each epoch as one more run, flushes those
//! epochs, recycles the largest segment file as its first segment and removes the others.
//! Events of a record in a segment numbered at or below an epoch's newest run are in that run
//! already and are skipped (a crash between a checkpoint's fsync and its removal of the
//! segments). Replaying is exact otherwise: one combiner writes at a time and frames its writes
//! in the order it made them, and a replayed write puts back the same key and value.
//! A record cut short by a crash (its length or checksum does not hold) ends its segment:
//! nothing after it in that segment was acknowledged, since a batch is acknowledged only once
//! its segment is synced up to its end.
//!
//! Segment files are `wal/{n:020}.wal`; a checkpoint keeps the newest segment it no longer
//! needs as the next one's file (see [`WalFiles::remove_older`]). A record is `payload length
//! (u32 BE) ‖ CRC-32 of the segment number (u64 BE) and the payload (u32 BE) ‖ payload`, so a
//! recycled file's old records end the segment. The payload is `epoch id (u64 BE)` followed
//! by writes, each `tree (u8: 0 events, 1 feed) ‖ key length (u32 BE) ‖ key ‖ value length
//! (u32 BE) ‖ value`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::StorageError;

/// The tree a written-ahead write goes to, in its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WalTree {
    Events,
    Feed,
}

impl WalTree {
    fn byte(self) -> u8 {
        match self {
            WalTree::Events => 0,
            WalTree::Feed => 1,
        }
    }

    fn from_byte(byte: u8) -> Option<WalTree> {
        match byte {
            0 => Some(WalTree::Events),
            1 => Some(WalTree::Feed),
            _ => None,
        }
    }
}

const FRAME_HEADER_BYTES: usize = 8;

/// The writes of one combiner round to one epoch, framed once complete.
pub(crate) struct WalRecord {
    /// Frame header (filled by [`WalBuffer::push`]) then the payload.
    bytes: Vec<u8>,
}

impl WalRecord {
    pub(crate) fn new(epoch: u64) -> WalRecord {
        let mut bytes = Vec::with_capacity(1024);
        bytes.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
        bytes.extend_from_slice(&epoch.to_be_bytes());
        WalRecord { bytes }
    }

    pub(crate) fn put(&mut self, tree: WalTree, key: &[u8], value: &[u8]) {
        self.bytes.reserve(9 + key.len() + value.len());
        self.bytes.push(tree.byte());
        self.bytes
            .extend_from_slice(&(key.len() as u32).to_be_bytes());
        self.bytes.extend_from_slice(key);
        self.bytes
            .extend_from_slice(&(value.len() as u32).to_be_bytes());
        self.bytes.extend_from_slice(value);
    }

    /// The writes it holds: (tree, key, value).
    #[cfg(test)]
    pub(crate) fn writes(&self) -> Vec<(WalTree, Vec<u8>, Vec<u8>)> {
        parse_payload(0, &self.bytes[FRAME_HEADER_BYTES..])
            .expect("a record built here parses")
            .into_iter()
            .map(|w| (w.tree, w.key.to_vec(), w.value.to_vec()))
            .collect()
    }

    fn has_writes(&self) -> bool {
        self.bytes.len() > FRAME_HEADER_BYTES + 8
    }
}

/// Records framed and not yet handed to a segment: filled by the feed's combiner, taken by the
/// group commit.
#[derive(Default)]
pub(crate) struct WalBuffer {
    pending: Mutex<Vec<u8>>,
    /// Some write is not vouched for by a synced record (none describes it, or writing or
    /// syncing the segment failed), or an append was refused because the memory tables hold
    /// their bound: the next commit is a checkpoint, which writes the epochs' memory tables
    /// into them and flushes them. While it is set and nothing comes to commit, the commit
    /// thread makes that checkpoint on its own after a wait (see `commit`).
    checkpoint_requested: AtomicBool,
    /// Held by the feed's combiner from its round's first write to an epoch's memory table
    /// until the round's record is queued, and by a checkpoint while it takes the queued
    /// records and freezes the tables: so a frozen table holds exactly the events of the
    /// records written before it (see [`crate::memtable`]).
    round: Mutex<()>,
}

impl WalBuffer {
    /// See the `round` field.
    pub(crate) fn round(&self) -> std::sync::MutexGuard<'_, ()> {
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frames `record` and queues it for the next commit (nothing if it holds no write). Its
    /// checksum is filled in when it is written, since it covers the segment it goes to. A
    /// record too large to frame (over 4 GiB) asks for a checkpoint instead, which makes its
    /// writes durable in the epochs themselves.
    pub(crate) fn push(&self, mut record: WalRecord) {
        if !record.has_writes() {
            return;
        }
        let payload_len = record.bytes.len() - FRAME_HEADER_BYTES;
        let Ok(len) = u32::try_from(payload_len) else {
            tracing::warn!(
                payload_len,
                "a write-ahead record is too large to frame; the next commit is a checkpoint"
            );
            self.request_checkpoint();
            return;
        };
        record.bytes[..4].copy_from_slice(&len.to_be_bytes());
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.is_empty() {
            // Hand over the record's own allocation instead of copying it.
            *pending = record.bytes;
        } else {
            pending.extend_from_slice(&record.bytes);
        }
    }

    /// Makes the next commit a checkpoint.
    pub(crate) fn request_checkpoint(&self) {
        self.checkpoint_requested.store(true, Ordering::Release);
    }

    /// Whether a checkpoint is asked for (without taking the request).
    pub(crate) fn checkpoint_requested(&self) -> bool {
        self.checkpoint_requested.load(Ordering::Acquire)
    }

    /// Whether a checkpoint was asked for since the last call.
    pub(crate) fn take_checkpoint_request(&self) -> bool {
        self.checkpoint_requested.swap(false, Ordering::AcqRel)
    }

    /// Takes what is queued, leaving `spare` (emptied) in its place.
    fn take(&self, spare: &mut Vec<u8>) {
        spare.clear();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut *pending, spare);
    }
}

/// A record's checksum: CRC-32 of the segment number and the payload, so that records left
/// from a recycled file's previous segment never pass for records of its current one.
fn checksum(segment: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment.to_be_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Fills in the checksum of every framed record in `frames`, for `segment`.
fn seal_frames(segment: u64, frames: &mut [u8]) {
    let mut at = 0;
    while at + FRAME_HEADER_BYTES <= frames.len() {
        let len = u32::from_be_bytes(frames[at..at + 4].try_into().expect("4 bytes")) as usize;
        let end = at + FRAME_HEADER_BYTES + len;
        let crc = checksum(segment, &frames[at + FRAME_HEADER_BYTES..end]);
        frames[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
        at = end;
    }
}

pub(crate) fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.wal"))
}

/// Segment numbers in `dir`, in order (files named otherwise are left alone, with a warning).
fn segments(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::Db(format!("read {}: {e}", dir.display()))),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::Db(format!("read {}: {e}", dir.display())))?;
        let segment = entry
            .file_name()
            .to_str()
            .and_then(|name| name.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| segment_path(dir, *n) == entry.path());
        match segment {
            Some(n) => found.push(n),
            None => tracing::warn!(entry = ?entry.path(), "not a write-ahead segment; left alone"),
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One write read back from a segment.
pub(crate) struct Replayed<'a> {
    /// The segment the record was in.
    pub(crate) segment: u64,
    pub(crate) epoch: u64,
    pub(crate) tree: WalTree,
    pub(crate) key: &'a [u8],
    pub(crate) value: &'a [u8],
}

/// Calls `apply` on every write of every segment in `dir`, oldest first. A segment ends at its
/// first record cut short or damaged (logged with what was ignored). Returns how many records
/// were replayed.
pub(crate) fn replay(
    dir: &Path,
    mut apply: impl FnMut(Replayed<'_>) -> Result<(), StorageError>,
) -> Result<u64, StorageError> {
    let mut records = 0;
    for segment in segments(dir)? {
        let path = segment_path(dir, segment);
        let bytes = std::fs::read(&path)
            .map_err(|e| StorageError::Db(format!("read {}: {e}", path.display())))?;
        let mut at = 0;
        while at < bytes.len() {
            match framed_payload(segment, &bytes[at..]) {
                Some(payload) => {
                    // Its checksum holds, so it is what was written: a record this code cannot
                    // read is not skipped (acknowledged appends would go with it).
                    let writes = parse_payload(segment, payload).ok_or_else(|| {
                        StorageError::Db(format!(
                            "write-ahead segment {} holds a record at offset {at} that its \
                             checksum vouches for but that does not parse (written by another \
                             version?); keep the data directory and report it",
                            path.display()
                        ))
                    })?;
                    for write in writes {
                        apply(write)?;
                    }
                    records += 1;
                    at += FRAME_HEADER_BYTES + payload.len();
                }
                None => {
                    tracing::info!(segment = %path.display(), offset = at, ignored_bytes = bytes.len() - at, "write-ahead segment read up to its last whole record (the rest: a write a stop cut short, or what a recycled file held before)");
                    break;
                }
            }
        }
    }
    Ok(records)
}

/// The payload of the record at the start of `bytes`, if it is whole and its checksum holds for
/// `segment`.
fn framed_payload(segment: u64, bytes: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(bytes.get(4..8)?.try_into().ok()?);
    let payload = bytes.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES.checked_add(len)?)?;
    (len >= 8 && checksum(segment, payload) == crc).then_some(payload)
}

fn parse_payload(segment: u64, payload: &[u8]) -> Option<Vec<Replayed<'_>>> {
    let epoch = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let mut rest = &payload[8..];
    let mut writes = Vec::new();
    while let Some((&tree, after)) = rest.split_first() {
        let tree = WalTree::from_byte(tree)?;
        let (key, after) = length_prefixed(after)?;
        let (value, after) = length_prefixed(after)?;
        rest = after;
        writes.push(Replayed {
            segment,
            epoch,
            tree,
            key,
            value,
        });
    }
    Some(writes)
}

/// A `u32 BE length ‖ bytes` field at the start of `bytes`, and what follows it.
fn length_prefixed(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    Some((bytes.get(4..end)?, bytes.get(end..)?))
}

/// The segment files, written only by the group commit's thread.
pub(crate) struct WalFiles {
    dir: PathBuf,
    file: File,
    segment: u64,
    /// Segments before the current one, removed once a checkpoint has written their events
    /// into the epochs.
    older: Vec<u64>,
    /// Bytes written to segments since the last checkpoint.
    since_checkpoint_bytes: u64,
    /// Written to the current segment and not yet synced.
    unsynced: bool,
    spare: Vec<u8>,
    /// Larger segment files are removed, not recycled (one huge batch does not keep a huge
    /// file for good).
    recycle_bytes_max: u64,
}

impl WalFiles {
    /// Starts writing in `dir` once an open replayed its segments (their writes are durable in
    /// the epochs now): the largest, unless over `recycle_bytes_max`, is recycled as the first
    /// segment of this run; the others are removed.
    pub(crate) fn start(dir: &Path, recycle_bytes_max: u64) -> Result<WalFiles, StorageError> {
        let db_error = |what: &str, e: std::io::Error| {
            StorageError::Db(format!("{what} {}: {e}", dir.display()))
        };
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| db_error("create", e))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent).map_err(|e| db_error("fsync the parent of", e))?;
            }
        }
        let existing = segments(dir)?;
        let segment = existing.last().map_or(1, |last| last + 1);
        let size = |s: u64| std::fs::metadata(segment_path(dir, s)).map_or(0, |m| m.len());
        let recycled = existing
            .iter()
            .copied()
            .filter(|s| size(*s) <= recycle_bytes_max)
            .max_by_key(|s| size(*s));
        for old in existing {
            let path = segment_path(dir, old);
            if Some(old) == recycled {
                std::fs::rename(&path, segment_path(dir, segment))
                    .map_err(|e| db_error("recycle a segment of", e))?;
            } else {
                std::fs::remove_file(&path).map_err(|e| db_error("remove a segment of", e))?;
            }
        }
        let file = open_segment(dir, segment).map_err(|e| db_error("create a segment in", e))?;
        sync_dir(dir).map_err(|e| db_error("fsync", e))?;
        Ok(WalFiles {
            dir: dir.to_owned(),
            file,
            segment,
            older: Vec::new(),
            since_checkpoint_bytes: 0,
            unsynced: false,
            spare: Vec::new(),
            recycle_bytes_max,
        })
    }

    /// Writes the queued records to the current segment (not synced).
    pub(crate) fn write_pending(&mut self, buffer: &WalBuffer) -> std::io::Result<()> {
        buffer.take(&mut self.spare);
        if self.spare.is_empty() {
            return Ok(());
        }
        seal_frames(self.segment, &mut self.spare);
        self.file.write_all(&self.spare)?;
        self.since_checkpoint_bytes += self.spare.len() as u64;
        self.unsynced = true;
        // Keep a moderate buffer for the next batch, not the largest one ever seen.
        if self.spare.capacity() > 4 * 1024 * 1024 {
            self.spare = Vec::new();
        }
        Ok(())
    }

    /// Makes what was written to the current segment durable.
    pub(crate) fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// The segment records are written to now.
    pub(crate) fn segment(&self) -> u64 {
        self.segment
    }

    pub(crate) fn since_checkpoint_bytes(&self) -> u64 {
        self.since_checkpoint_bytes
    }

    /// First step of a checkpoint: later records go to the next segment. Once every epoch is
    /// durable in sled (inline or on the checkpoint thread) the commit thread calls
    /// [`WalFiles::remove_older`].
    pub(crate) fn rotate(&mut self) -> std::io::Result<()> {
        let next = self.segment + 1;
        let file = open_segment(&self.dir, next)?;
        sync_dir(&self.dir)?;
        self.older.push(self.segment);
        self.file = file;
        self.segment = next;
        self.unsynced = false;
        self.since_checkpoint_bytes = 0;
        Ok(())
    }

    /// Last step of a checkpoint: the segments before the current one are no longer needed.
    /// The newest of them becomes the next segment's file: overwriting blocks a file already
    /// has makes an `fdatasync` cheaper than growing a file (2026-12-04, ext4: 50 against 78
    /// µs of CPU, 102 against 180 µs of wall time per 4 KiB write + sync). A segment that cannot
    /// be removed is tried again at the next checkpoint (an open meanwhile replays it again,
    /// which writes what the epochs hold already).
    pub(crate) fn remove_older(&mut self) -> std::io::Result<()> {
        let Some(&newest) = self.older.last() else {
            return Ok(());
        };
        let next = segment_path(&self.dir, self.segment + 1);
        let newest_path = segment_path(&self.dir, newest);
        let small =
            std::fs::metadata(&newest_path).is_ok_and(|m| m.len() <= self.recycle_bytes_max);
        if small && !next.exists() && std::fs::rename(&newest_path, &next).is_ok() {
            self.older.pop();
        }
        let mut failed = None;
        self.older.retain(|segment| {
            match std::fs::remove_file(segment_path(&self.dir, *segment)) {
                Ok(()) => false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => {
                    failed.get_or_insert(e);
                    true
                }
            }
        });
        sync_dir(&self.dir)?;
        failed.map_or(Ok(()), Err)
    }

    /// Bytes in the segment files now.
    pub(crate) fn size_on_disk_bytes(dir: &Path) -> u64 {
        segments(dir)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|s| std::fs::metadata(segment_path(dir, s)).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Opens segment `segment` for writing from its start: a recycled file if one was put there
/// (its old records stay behind the new ones and fail their checksum), else a new file.
fn open_segment(dir: &Path, segment: u64) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(segment_path(dir, segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: u64, writes: &[(WalTree, &[u8], &[u8])]) -> WalRecord {
        let mut record = WalRecord::new(epoch);
        for (tree, key, value) in writes {
            record.put(*tree, key, value);
        }
        record
    }

    fn replayed(dir: &Path) -> Vec<(u64, WalTree, Vec<u8>, Vec<u8>)> {
        let mut seen = Vec::new();
        replay(dir, |w| {
            seen.push((w.epoch, w.tree, w.key.to_vec(), w.value.to_vec()));
            Ok(())
        })
        .expect("replay");
        seen
    }

    #[test]
    fn records_written_and_synced_replay_in_order_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer = WalBuffer::default();
        let mut files = WalFiles::start(dir.path(), u64::MAX).expect("start");
        buffer.push(record(
            3,
            &[
                (WalTree::Feed, b"f1", b"block"),
                (WalTree::Events, b"e1", b"one"),
            ],
        ));
        files.write_pending(&buffer).expect("write");
        files.sync().expect("sync");
        files.rotate().expect("rotate");
        buffer.push(record(4, &[(WalTree::Events, b"e2", b"")]));
        // A record with no write is not framed at all.
        buffer.push(WalRecord::new(9));
        files.write_pending(&buffer).expect("write");
        files.sync().expect("sync");
        assert_eq!(
            replayed(dir.path()),
            vec![
                (3, WalTree::Feed, b"f1".to_vec(), b"block".to_vec()),
                (3, WalTree::Events, b"e1".to_vec(), b"one".to_vec()),
                (4, WalTree::Events, b"e2".to_vec(), Vec::new()),
            ]
        );
        // The checkpoint's last step leaves the current segment, and the one before it waiting
        // as the next one's file: its records fail their checksum there.
        files.remove_older().expect("remove");
        assert!(segment_path(dir.path(), 3).exists());
        assert_eq!(
            replayed(dir.path()),
            vec![(4, WalTree::Events, b"e2".to_vec(), Vec::new())]
        );
        // The next segment overwrites the recycled file from its start; what it held before
        // (longer than the new record) is not read back.
        files.rotate().expect("rotate into the recycled file");
        buffer.push(record(5, &[(WalTree::Events, b"x", b"")]));
        files.write_pending(&buffer).expect("write");
        files.sync().expect("sync");
        assert_eq!(
            replayed(dir.path()),
            vec![
                (4, WalTree::Events, b"e2".to_vec(), Vec::new()),
                (5, WalTree::Events, b"x".to_vec(), Vec::new()),
            ]
        );
        // Starting again recycles what was replayed as a new segment after it.
        drop(files);
        let files = WalFiles::start(dir.path(), u64::MAX).expect("start again");
        assert!(replayed(dir.path()).is_empty());
        assert_eq!(files.segment, 4);
        assert_eq!(segments(dir.path()).expect("segments"), vec![4]);
    }

    #[test]
    fn a_record_cut_short_or_damaged_ends_its_segment_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer = WalBuffer::default();
        let mut files = WalFiles::start(dir.path(), u64::MAX).expect("start");
        buffer.push(record(1, &[(WalTree::Events, b"a", b"kept")]));
        buffer.push(record(1, &[(WalTree::Events, b"b", b"cut short")]));
        files.write_pending(&buffer).expect("write");
        files.rotate().expect("rotate");
        buffer.push(record(2, &[(WalTree::Events, b"c", b"next segment")]));
        files.write_pending(&buffer).expect("write");
        files.sync().expect("sync");
        let first = segment_path(dir.path(), 1);
        let whole = std::fs::read(&first).expect("read");
        for cut in [whole.len() - 1, whole.len() - 5, whole.len() - 12] {
            std::fs::write(&first, &whole[..cut]).expect("cut");
            assert_eq!(
                replayed(dir.path()),
                vec![
                    (1, WalTree::Events, b"a".to_vec(), b"kept".to_vec()),
                    (2, WalTree::Events, b"c".to_vec(), b"next segment".to_vec()),
                ],
                "cut at {cut}"
            );
        }
        let mut damaged = whole.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        std::fs::write(&first, &damaged).expect("damage");
        assert_eq!(replayed(dir.path()).len(), 2);
        // Zeros where a record should be (a preallocated or half-written tail) end it too.
        let mut zeros = whole[..whole.len() / 2].to_vec();
        zeros.resize(whole.len(), 0);
        std::fs::write(&first, &zeros).expect("zeros");
        let seen = replayed(dir.path());
        assert_eq!(seen.last().map(|w| w.0), Some(2));
    }

    #[test]
    fn a_segment_over_the_recycling_bound_is_removed_not_recycled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer = WalBuffer::default();
        let mut files = WalFiles::start(dir.path(), 64).expect("start");
        buffer.push(record(1, &[(WalTree::Events, b"k", &[7; 100])]));
        files.write_pending(&buffer).expect("write");
        files.sync().expect("sync");
        files.rotate().expect("rotate");
        files.remove_older().expect("remove");
        assert_eq!(segments(dir.path()).expect("segments"), vec![2]);
        drop(files);
        // Nor at a start.
        std::fs::write(segment_path(dir.path(), 2), [0; 100]).expect("fill");
        let files = WalFiles::start(dir.path(), 64).expect("start");
        assert_eq!(files.segment, 3);
        let file_len = std::fs::metadata(segment_path(dir.path(), 3))
            .expect("metadata")
            .len();
        assert_eq!(file_len, 0);
    }

    #[test]
    fn a_record_its_checksum_vouches_for_that_does_not_parse_stops_the_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut payload = 5u64.to_be_bytes().to_vec();
        payload.push(7); // no such tree
        payload.extend_from_slice(&[0; 8]);
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&checksum(1, &payload).to_be_bytes());
        frame.extend_from_slice(&payload);
        std::fs::write(segment_path(dir.path(), 1), &frame).expect("write");
        let error = replay(dir.path(), |_| Ok(())).expect_err("refused");
        assert!(error.to_string().contains("does not parse"), "{error}");
    }
}
