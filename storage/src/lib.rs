//! thinghub's storage: the append-only per-Thing event log, snapshots and indexes, on sled.
//!
//! This is the only crate that knows sled. Everything it stores is an [`Envelope`]
//! (`event_type`, `event_version`, `recorded_at_ms`, payload), see [`codec`].
//!
//! - [`log`]: `events` tree, key = thing key ‖ seq (big-endian), and the group commit that makes
//!   many concurrent appends durable with one write + fsync of a write-ahead segment and one
//!   flush + fsync of the main database.
//! - [`epoch`]: the events and the feed are rolled over several sled databases (`log/{id}/`),
//!   so that an open never replays more than about one epoch of writes.
//! - `wal`: the write-ahead segments (`wal/`) that make appends durable between two checkpoints
//!   of the epochs, replayed into them by the next open after a crash.
//! - `memtable`: the current epoch's events since the last checkpoint, in memory; each
//!   checkpoint writes them into the epoch as one packed run.
//! - [`snapshot`]: `snapshots` tree, one (seq, state) per Thing.
//! - [`index`]: `things` (registry listing), `client_ids` and `deadlines` (timer index) trees, derived from the
//!   log, written right after the events that justify them and repaired by the Thing's owner.
//! - [`packed`]: the block layout of runs and of sealed epochs, rewritten once in key order (disk).
//! - [`feed`]: the change feed (one commit-ordered position per append) and consumer cursors.
//! - [`records`]: MQTT sessions and retained messages kept between runs.
//! - [`kv`]: small durable key/value records (API keys, credentials).
//! - [`integrity`]: named errors for a damaged data directory, and the walks `thinghub check`
//!   makes over every tree.
//!
//! A thing key is `len(name) as u8 ‖ name`, so no Thing's key is a prefix of another's.

pub mod codec;
mod epoch;
pub mod feed;
pub mod index;
pub mod integrity;
pub mod kv;
pub mod log;
mod memtable;
pub use memtable::MemTableStats;
mod packed;
pub mod records;
pub mod snapshot;

mod commit;
mod count;
mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use codec::{CodecError, Envelope};
pub use commit::CommitStats;
pub use epoch::EpochInfo;
pub use feed::FeedEntry;
pub use index::{Claim, DeadlineEntry, IndexOp, OnlineEntry};
pub use kv::KvPage;
pub use log::{AppendBatch, RecordedEvent};
pub use records::{Record, RecordChange, RecordSet};
pub use snapshot::Snapshot;

/// Longest Thing name storage accepts, in bytes (the key length prefix is one byte).
pub const THING_NAME_BYTES_MAX: usize = 255;

/// Everything that can go wrong in storage.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The underlying database failed (I/O, or sled's own corruption report).
    #[error("database error: {0}")]
    Db(String),
    /// A stored record could not be decoded; names the Thing and the sequence number.
    #[error("corrupt record for thing '{thing}' at seq {seq}: {reason}")]
    Corrupt {
        /// The Thing whose record is bad.
        thing: String,
        /// The sequence number of the bad record (0 for a snapshot or index record).
        seq: u64,
        /// What the decoder said.
        reason: String,
    },
    /// An append tried to write a sequence number that already exists (two writers for a Thing).
    #[error("sequence conflict for thing '{thing}': seq {seq} already exists")]
    SequenceConflict {
        /// The Thing being appended to.
        thing: String,
        /// The first sequence number of the rejected append.
        seq: u64,
    },
    /// The Thing name cannot be used as a storage key.
    #[error("invalid thing name for storage: {0}")]
    InvalidName(String),
    /// A record could not be encoded.
    #[error("encode error: {0}")]
    Encode(String),
    /// The group commit failed, so the write is not known to be durable.
    #[error("commit failed, write not durable: {0}")]
    CommitFailed(String),
    /// The data directory is held by another process (a running server).
    #[error(
        "data directory {0} is locked by another process (is a thinghub server running on it?)"
    )]
    Locked(PathBuf),
    /// The store refuses writes for now (nothing was written); says why.
    #[error("storage is refusing writes for now: {0}")]
    Busy(String),
    /// The store is shutting down.
    #[error("storage is shut down")]
    Closed,
    /// A file of the database is damaged: which one, what is wrong, and what to do.
    #[error("the database in {} is damaged: {}: {problem}. What to do: {advice}", dir.display(), file.display())]
    Damaged {
        /// The data directory.
        dir: PathBuf,
        /// The damaged file.
        file: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// What the operator can do.
        advice: String,
    },
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        match e {
            // A record that fails its checksum on a read: name where, as sled gives it.
            sled::Error::Corruption { at, .. } => StorageError::Db(format!(
                "sled found a damaged record ({}); run `thinghub check` with the server stopped",
                match at {
                    Some(sled::DiskPtr::Inline(offset)) => format!("db at byte offset {offset}"),
                    Some(sled::DiskPtr::Blob(_, blob)) => format!("blobs/{blob}"),
                    None => "location unknown".into(),
                }
            )),
            other => StorageError::Db(other.to_string()),
        }
    }
}

impl From<CodecError> for StorageError {
    fn from(e: CodecError) -> Self {
        StorageError::Encode(e.0)
    }
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Directory holding the sled database.
    pub data_dir: PathBuf,
    /// sled page cache size in bytes: half for the main database, half for the current log
    /// epoch; each sealed epoch has a sixteenth more (at least 1 MiB).
    pub cache_bytes: u64,
    /// Most appends made durable by one flush (bounds the latency of a batch).
    pub commit_batch_appends_max: usize,
    /// Appends one log epoch takes before the next one starts (bounds what an open replays).
    pub epoch_appends_max: u64,
    /// Bytes of write-ahead records (`wal/`) after which the group commit starts a new segment
    /// and has the events held in memory written into the log epochs as runs and flushed, on
    /// the checkpoint thread (bounds that memory and what an open replays; the segment files
    /// take up to about twice this on disk).
    pub wal_bytes_max: u64,
    /// Bytes the events held in memory until a checkpoint may take, counted over every epoch
    /// (values plus a fixed overhead per event and per Thing). A group commit also makes a
    /// checkpoint once they hold half of this; past all of it (checkpoints failing, as on a
    /// full disk) appends are refused with [`StorageError::Busy`] before they start, instead
    /// of filling the memory.
    pub memtable_bytes_max: u64,
}

impl StoreConfig {
    /// Defaults for a data directory: 64 MiB cache, batches of up to 4096 appends, epochs of
    /// 2M appends, checkpoints every 16 MiB of write-ahead records, 64 MiB of events in
    /// memory.
    pub fn new(data_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            data_dir: data_dir.into(),
            cache_bytes: 64 * 1024 * 1024,
            commit_batch_appends_max: 4096,
            epoch_appends_max: 2_000_000,
            wal_bytes_max: 16 * 1024 * 1024,
            memtable_bytes_max: 64 * 1024 * 1024,
        }
    }
}

/// The store. Cheap to clone; all clones share one database and one group-commit thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    /// The event log and the feed, over one database per epoch.
    epochs: Arc<epoch::Epochs>,
    snapshots: sled::Tree,
    things: sled::Tree,
    client_ids: sled::Tree,
    deadlines: sled::Tree,
    alarms: sled::Tree,
    online: sled::Tree,
    kv: sled::Tree,
    cursors: sled::Tree,
    sessions: sled::Tree,
    retained: sled::Tree,
    feed_clock: Arc<feed::FeedClock>,
    /// Registered Things (see [`count`]).
    thing_count: Arc<count::ThingCount>,
    committer: commit::GroupCommit,
    data_dir: PathBuf,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.thing_count.stop();
        self.epochs.close();
    }
}

impl Store {
    /// Opens (or creates) the store in `config.data_dir` and starts the group-commit thread.
    pub fn open(config: &StoreConfig) -> Result<Store, StorageError> {
        let started = std::time::Instant::now();
        let db = open_sled(
            &config.data_dir,
            epoch::current_cache_bytes(config.cache_bytes),
        )?;
        let wal_dir = config.data_dir.join("wal");
        let epochs = Arc::new(epoch::Epochs::open(
            &db,
            &config.data_dir,
            config.cache_bytes,
            config.epoch_appends_max,
            &wal_dir,
            memtable::MemBudget::new(config.memtable_bytes_max),
        )?);
        // The segments were replayed into the epochs (and those made durable): start over. A
        // segment holds `wal_bytes_max` and at most one batch more.
        let wal_files = wal::WalFiles::start(&wal_dir, config.wal_bytes_max.saturating_mul(2))?;
        let wal = Arc::new(wal::WalBuffer::default());
        let cursors = db.open_tree("cursors")?;
        let next_position = feed::next_position_after(&epochs.all(), &cursors)?;
        epochs.start_current(next_position)?;
        epochs.pack_sealed_in_background();
        let feed_clock = Arc::new(feed::FeedClock::new(next_position, wal.clone()));
        let committer = commit::GroupCommit::start(
            db.clone(),
            epochs.clone(),
            &config.data_dir,
            commit::WriteAhead {
                files: wal_files,
                buffer: wal.clone(),
                bytes_max: config.wal_bytes_max,
            },
            config.commit_batch_appends_max,
            feed_clock.clone(),
        )?;
        tracing::info!(
            data_dir = %config.data_dir.display(),
            log_epochs = epochs.all().len() - 1,
            open_ms = started.elapsed().as_millis() as u64,
            "opened the store"
        );
        let things = db.open_tree("things")?;
        let thing_count = count::ThingCount::start(things.clone())
            .map_err(|e| StorageError::Db(format!("cannot start counting the Things: {e}")))?;
        Ok(Store {
            inner: Arc::new(Inner {
                thing_count,
                epochs,
                cursors,
                sessions: db.open_tree("sessions")?,
                retained: db.open_tree("retained")?,
                feed_clock,
                snapshots: db.open_tree("snapshots")?,
                things,
                client_ids: db.open_tree("client_ids")?,
                deadlines: db.open_tree("deadlines")?,
                alarms: db.open_tree("alarms")?,
                online: db.open_tree("online")?,
                kv: db.open_tree("kv")?,
                db,
                committer,
                data_dir: config.data_dir.clone(),
            }),
        })
    }

    /// Registered Things now, once counted after open (`None` meanwhile: about 0.3 s per
    /// million Things).
    pub fn registered_things(&self) -> Option<u64> {
        self.inner.thing_count.get()
    }

    /// The data directory this store lives in.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// Waits until every write made before this call is durable (one group commit).
    pub async fn sync(&self) -> Result<(), StorageError> {
        self.inner.committer.wait_durable().await
    }

    /// Group-commit counters since open.
    pub fn commit_stats(&self) -> CommitStats {
        self.inner.committer.stats()
    }

    /// How full the memory tables (the events waiting for a checkpoint) are.
    pub fn memtable_stats(&self) -> MemTableStats {
        self.inner.epochs.budget().stats()
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk_bytes(&self) -> Result<u64, StorageError> {
        Ok(self.inner.db.size_on_disk()?
            + self.inner.epochs.size_on_disk_bytes()?
            + wal::WalFiles::size_on_disk_bytes(&self.inner.data_dir.join("wal")))
    }
}

/// Opens (or creates) the sled database in `dir`: the main one, or one epoch of the log.
/// A lock held by another handle is [`StorageError::Locked`]; damage is named by
/// [`integrity::diagnose`].
pub(crate) fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StorageError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StorageError::Db(format!("create {}: {e}", dir.display())))?;
    // sled panics instead of failing on some damage: the panic is a damaged file too.
    let opened = std::panic::catch_unwind(|| {
        sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // Durability is ours (group commit); sled's background flusher only adds IO.
            .flush_every_ms(None)
            .open()
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(io)))
            if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") =>
        {
            Err(StorageError::Locked(dir.to_owned()))
        }
        Ok(Err(e)) => Err(integrity::diagnose(dir, Some(&e)).unwrap_or_else(|| e.into())),
        Err(_) => Err(integrity::diagnose(dir, None)
            .unwrap_or_else(|| StorageError::Db("sled failed while opening".into()))),
    }
}

/// The key prefix of a Thing: `len ‖ name`.
pub(crate) fn thing_key(name: &str) -> Result<Vec<u8>, StorageError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > THING_NAME_BYTES_MAX {
        return Err(StorageError::InvalidName(format!(
            "'{name}' must be 1..={THING_NAME_BYTES_MAX} bytes"
        )));
    }
    let mut key = Vec::with_capacity(1 + bytes.len() + 8);
    key.push(bytes.len() as u8);
    key.extend_from_slice(bytes);
    Ok(key)
}

/// Opens the store in `dir` again in the same process, waiting (bounded) while the previous
/// handle's lock is still held: sled releases its file lock from its own threads once the last
/// handle is gone, a moment after `drop` returns.
#[cfg(test)]
pub(crate) fn reopen(dir: &Path) -> Store {
    Store::reopen_in_process(&StoreConfig::new(dir)).expect("reopen")
}

impl Store {
    /// Opens a store this process just closed, waiting (at most 5 s) while sled still holds
    /// the previous handle's file lock: sled releases it from its own threads a moment after
    /// the last handle is dropped. For tests that restart in one process.
    #[cfg(any(test, feature = "test-util"))]
    pub fn reopen_in_process(config: &StoreConfig) -> Result<Store, StorageError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(config) {
                Err(StorageError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                opened => return opened,
            }
        }
    }
}
