//! The event log and the change feed, rolled over several sled databases ("epochs") so that
//! opening the store never replays more than a bounded amount of log.
//!
//! sled 0.34 writes its recovery snapshot only while it opens a database: an open replays every
//! log record written since the previous open, so a server that ran for a long time paid for
//! all its writes at its next start (27.5 s after 50M events). Here every append's events and
//! feed entry go to the *current* epoch, `log/{id}/` under the data directory, and once it holds
//! [`crate::StoreConfig::epoch_appends_max`] appends the next one starts. The previous epoch,
//! once everything written to it is durable, is sealed (no more writes) and reopened once in
//! the background, which writes its snapshot: from then on opening it costs what loading its
//! snapshot costs, not a replay. An open therefore replays only the epochs written since they
//! last opened (the one that was current, and any whose sealing a stop or a crash cut short),
//! plus the main database's own writes (indexes, snapshots, cursors, sessions: a small share
//! of the volume).
//!
//! Epoch 0 is the `events` and `feed` trees of the main database, where data directories
//! written before epochs existed keep their log; nothing is written there any more.
//!
//! Crash contract across databases:
//! - an append's feed entry and its events go to the same epoch (the feed's combiner picks the
//!   epoch for a whole block and each append writes its events where its entry went), and its
//!   events reach that database (in a run, at a checkpoint) after its feed entry, so sled's
//!   recovery of a prefix of that database keeps "events on disk have their feed entry";
//! - one Thing's appends run one after another, so its events in a later epoch always have
//!   higher sequence numbers than those in an earlier one;
//! - the group commit syncs the write-ahead segment holding the appends' writes to their epochs
//!   (see [`crate::wal`]; the epochs themselves are written, their memory tables as runs, and
//!   flushed at checkpoints and seals, and an open replays the segments into them first, see
//!   [`crate::memtable`]), then flushes and fsyncs the main database: a
//!   crash during a commit can leave an append's events durable and its index changes (main
//!   database) lost, which the Thing's owner repairs when it activates (the effects
//!   consumer activates it again after the restart, since its position was never passed).
//!   Deadline index entries are written before the events, as before: if sled wrote an epoch's
//!   buffer to its file before the main database's, the same repair and redelivery cover it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::feed::FeedClock;
use crate::memtable::{MemBudget, MemTable, FINAL_RUN};
use crate::packed::{self, EventTree, Record, Records};
use crate::StorageError;

/// How long a reopen waits for sled to let go of a database it just closed (sled releases its
/// file lock from its own threads a moment after the last handle is dropped).
const REOPEN_LOCK_WAIT: Duration = Duration::from_secs(30);

/// The trees of one epoch.
pub(crate) struct EpochTrees {
    /// Events written one by one (by versions before runs), or the packed epoch.
    pub(crate) events: EventTree,
    /// The runs checkpoints wrote (see [`crate::memtable`]), oldest first; none once packed.
    pub(crate) runs: Vec<(u64, EventTree)>,
    pub(crate) feed: sled::Tree,
    /// The epoch's own database (`None` for epoch 0, whose trees are in the main database).
    pub(crate) db: Option<sled::Db>,
}

/// One database of the rolled log.
pub(crate) struct Epoch {
    pub(crate) id: u64,
    /// The first change-feed position recorded in it (0 for epoch 0); set once more when an
    /// empty epoch left by the previous run becomes the current one.
    first_position: AtomicU64,
    /// Its directory (`None` for epoch 0).
    pub(crate) dir: Option<PathBuf>,
    /// `None` only if a reopen failed (the next read tries again).
    trees: RwLock<Option<EpochTrees>>,
    /// The page cache it is (re)opened with.
    cache_bytes: u64,
    /// Nothing is written to it any more and everything in it is durable: the group commit
    /// skips it.
    sealed: AtomicBool,
    /// Held while its database is flushed: by a checkpoint (on the commit thread or the
    /// checkpoint thread) or by its seal, one at a time (sled's concurrent flushes of one
    /// database can deadlock, upstream #1308).
    flushing: std::sync::Mutex<()>,
    /// Its events since the last checkpoint (see [`crate::memtable`]).
    pub(crate) memtable: MemTable,
}

impl Epoch {
    /// Runs `f` on the epoch's trees (waiting while the epoch is being reopened).
    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&EpochTrees) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        f(self.read()?.trees())
    }

    /// Holds the epoch's trees for a longer read. While the epoch is being reopened (sealing)
    /// this waits for it, off the async runtime's workers when called on one; if a reopen
    /// failed, it tries once more.
    pub(crate) fn read(&self) -> Result<EpochRead<'_>, StorageError> {
        let guard = match self.trees.try_read() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                off_the_runtime(|| self.trees.read().unwrap_or_else(|p| p.into_inner()))
            }
        };
        if guard.is_some() {
            return Ok(EpochRead(guard));
        }
        drop(guard);
        off_the_runtime(|| self.open_again())?;
        self.read()
    }

    /// Opens the epoch again after a reopen failed (the write lock keeps readers out meanwhile).
    fn open_again(&self) -> Result<(), StorageError> {
        let mut trees = self.trees.write().unwrap_or_else(|p| p.into_inner());
        if trees.is_some() {
            return Ok(()); // another reader did it
        }
        let dir = self.dir.as_deref().ok_or(StorageError::Closed)?;
        let opened = open_existing_epoch(dir, self.cache_bytes).map_err(|e| {
            StorageError::Db(format!(
                "log epoch {} ({}) cannot be opened: {e}",
                self.id,
                dir.display()
            ))
        })?;
        tracing::info!(
            epoch = self.id,
            "opened a log epoch again after a failed reopen"
        );
        *trees = Some(opened);
        Ok(())
    }

    pub(crate) fn first_position(&self) -> u64 {
        self.first_position.load(Ordering::Acquire)
    }

    /// Whether its events are packed (`false` while it is being swapped for its packed copy).
    pub(crate) fn is_packed(&self) -> bool {
        match self.trees.try_read() {
            Ok(trees) => trees.as_ref().is_some_and(|t| t.events.is_packed()),
            Err(_) => false,
        }
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// One Thing's records with `start ≤ key ≤ end` (both keys of one Thing), in key order or,
    /// with `rev`, newest first, at most `limit`: its database's (events one by one, then the
    /// runs oldest first) and then its memory table's. One Thing's events in a later source
    /// always follow those in an earlier one.
    pub(crate) fn records(
        &self,
        start: &[u8],
        end: &[u8],
        rev: bool,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        self.with(|trees| {
            // The table is read while the trees are held: a checkpoint lists a run it wrote in
            // them before the table lets go of it, so a run the table still holds frozen is
            // skipped here and none is missed.
            let seen = self.memtable.range(start, Some(end), rev, limit);
            let mut sources: Vec<&EventTree> = vec![&trees.events];
            sources.extend(
                trees
                    .runs
                    .iter()
                    .filter(|(id, _)| !seen.frozen_runs.contains(id))
                    .map(|(_, run)| run),
            );
            let mut out = Vec::new();
            if rev {
                out.extend(seen.records.into_iter().take(limit));
                for source in sources.iter().rev() {
                    if out.len() >= limit {
                        break;
                    }
                    for item in source.range_rev(start, end).take(limit - out.len()) {
                        out.push(item?);
                    }
                }
            } else {
                for source in sources {
                    if out.len() >= limit {
                        break;
                    }
                    for item in source.range(start, Some(end)).take(limit - out.len()) {
                        out.push(item?);
                    }
                }
                let room = limit.saturating_sub(out.len());
                out.extend(seen.records.into_iter().take(room));
            }
            Ok(out)
        })
    }

    /// Writes `value` under `key` where the key is (a run, the events written one by one, the
    /// memory table), else in the memory table, or the database of an epoch that takes no
    /// appends (tests of damaged records), then flushes and fsyncs its database, all under its
    /// flush lock (no run is being written meanwhile). Returns whether it went to the memory
    /// table.
    #[cfg(feature = "test-util")]
    pub(crate) fn put_raw(&self, key: &[u8], value: &[u8]) -> Result<bool, StorageError> {
        let _one_flush = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let in_table = self.put_raw_held(key, value)?;
        if let Some(dir) = self.dir.as_deref() {
            let held = self.read()?;
            if let Some(db) = &held.trees().db {
                flush_and_sync(db, dir)?;
            }
        }
        Ok(in_table)
    }

    #[cfg(feature = "test-util")]
    fn put_raw_held(&self, key: &[u8], value: &[u8]) -> Result<bool, StorageError> {
        if self.memtable.replace(key, value) {
            return Ok(true);
        }
        let in_database = self.with(|trees| {
            for (_, run) in trees.runs.iter().rev() {
                if run.range(key, Some(key)).next().transpose()?.is_some() {
                    run.put_raw(key, value)?;
                    return Ok(true);
                }
            }
            let held = trees
                .events
                .range(key, Some(key))
                .next()
                .transpose()?
                .is_some();
            if held || self.dir.is_none() || self.is_sealed() {
                trees.events.put_raw(key, value)?;
                return Ok(true);
            }
            Ok(false)
        })?;
        if !in_database {
            self.memtable.put(key, value);
        }
        Ok(!in_database)
    }

    /// Writes the memory table's frozen parts as runs, then flushes and fsyncs the database
    /// (its feed included). The group commit's checkpoint and the seal call this, one at a time.
    pub(crate) fn persist_frozen(&self) -> Result<(), StorageError> {
        let Some(dir) = self.dir.as_deref() else {
            return Ok(());
        };
        let _one_flush = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let frozen = self.memtable.frozen();
        if frozen.is_empty() && self.is_sealed() {
            return Ok(()); // durable since its seal; a reopen or a pack may be running
        }
        let runs: Vec<u64> = frozen.iter().map(|(run, _)| *run).collect();
        // Held through the flush: a reopen (which flushes too; sled's concurrent flushes of one
        // database can deadlock) or a pack's swap waits for it.
        let held = self.read()?;
        let Some(db) = held.trees().db.as_ref() else {
            return Ok(());
        };
        // A failed flush may have left some of them listed: all are unlisted (at once) before
        // any is rewritten, so no listed run above a cleared one makes an open skip segments
        // that still hold its events.
        packed::unlist_runs(db, &runs)?;
        let mut written = Vec::with_capacity(frozen.len());
        for (run, table) in &frozen {
            written.push((*run, packed::write_run(db, *run, table)?));
        }
        flush_and_sync(db, dir)?;
        drop(held);
        if !written.is_empty() {
            let mut trees = self.trees.write().unwrap_or_else(|p| p.into_inner());
            if let Some(trees) = trees.as_mut() {
                for (run, tree) in written {
                    // A reopen meanwhile found it listed already.
                    if !trees.runs.iter().any(|(id, _)| *id == run) {
                        trees.runs.push((run, EventTree::Packed(tree)));
                    }
                }
                trees.runs.sort_unstable_by_key(|(id, _)| *id);
            }
        }
        for (run, _) in &frozen {
            self.memtable.written(*run);
        }
        Ok(())
    }
}

/// An epoch's trees, held for reading.
pub(crate) struct EpochRead<'a>(std::sync::RwLockReadGuard<'a, Option<EpochTrees>>);

impl EpochRead<'_> {
    pub(crate) fn trees(&self) -> &EpochTrees {
        self.0.as_ref().expect("checked when taken")
    }
}

/// Every epoch, oldest first; the last is the current one.
pub(crate) struct Epochs {
    /// `log/` under the data directory.
    dir: PathBuf,
    cache_bytes: u64,
    /// Appends an epoch takes before the next one starts.
    appends_max: u64,
    list: RwLock<Vec<Arc<Epoch>>>,
    /// Seals running now, and whether the store is closing.
    gate: Arc<SealGate>,
    /// Held while an epoch is packed: one at a time (each is a few seconds of one core).
    packing: std::sync::Mutex<()>,
    /// What the epochs' memory tables may hold together.
    budget: Arc<MemBudget>,
}

/// Seals running now, and whether the store is closing (then no seal starts). Shared with the
/// running seals, so that one can let go of the store before it says it is done.
#[derive(Default)]
struct SealGate {
    state: std::sync::Mutex<(usize, bool)>,
    done: std::sync::Condvar,
}

impl SealGate {
    /// Whether the store is closing (no seal starts, a running pack stops).
    fn closing(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

/// Counts a running seal; done (whatever happens, a panic included) when dropped.
struct Sealing(Arc<SealGate>);

impl Drop for Sealing {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 -= 1;
        self.0.done.notify_all();
    }
}

/// The page cache of the current epoch: half of the store's (the main database has the other
/// half).
pub(crate) fn current_cache_bytes(cache_bytes: u64) -> u64 {
    cache_bytes / 2
}

/// The page cache of a sealed epoch: a sixteenth of the store's (at least 1 MiB). Sealed epochs
/// are read when a Thing that was idle since activates, or a history reaches back.
fn sealed_cache_bytes(cache_bytes: u64) -> u64 {
    (cache_bytes / 16).max(1 << 20)
}

fn epoch_dir(log_dir: &Path, id: u64) -> PathBuf {
    log_dir.join(format!("{id:010}"))
}

impl EpochTrees {
    /// Whether this is a whole packed copy (see [`packed::is_complete`]).
    fn is_complete_pack(&self) -> bool {
        self.events.is_packed() && self.db.as_ref().is_some_and(packed::is_complete)
    }

    /// Whether its database holds no event.
    fn holds_no_event(&self) -> bool {
        self.events.is_empty() && self.runs.iter().all(|(_, run)| run.is_empty())
    }

    /// Every event in its database, in key order (the runs named in `skip` left out).
    pub(crate) fn all_records(&self, skip: &[u64]) -> Records<'_> {
        let mut sources = vec![self.events.range(&[], None)];
        for (id, run) in &self.runs {
            if !skip.contains(id) {
                sources.push(run.range(&[], None));
            }
        }
        packed::merged(sources)
    }

    /// The highest run written (0 if none).
    fn last_run(&self) -> u64 {
        self.runs.last().map_or(0, |(id, _)| *id)
    }
}

/// Opens `dir` as a sled database the way the store does (see [`crate::open_sled`]).
fn open_epoch_trees(dir: &Path, cache_bytes: u64) -> Result<EpochTrees, StorageError> {
    let db = crate::open_sled(dir, cache_bytes)?;
    // A packed database is only ever put in an epoch's place complete.
    let events = if db
        .tree_names()
        .iter()
        .any(|name| name.as_ref() == b"packed")
    {
        EventTree::Packed(db.open_tree("packed")?)
    } else {
        EventTree::Plain(db.open_tree("events")?)
    };
    Ok(EpochTrees {
        events,
        runs: packed::open_runs(&db)?,
        feed: db.open_tree("feed")?,
        db: Some(db),
    })
}

/// Runs `wait`, which may block for long (a sled open), without holding up the async runtime's
/// workers when called on one of them (`block_in_place` on a multi-threaded runtime).
fn off_the_runtime<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        _ => wait(),
    }
}

/// Opens an existing epoch whose previous handle was just dropped, waiting (at most
/// [`REOPEN_LOCK_WAIT`]) while sled still holds its file lock.
fn open_after_close(dir: &Path, cache_bytes: u64) -> Result<EpochTrees, StorageError> {
    let deadline = Instant::now() + REOPEN_LOCK_WAIT;
    loop {
        match open_existing_epoch(dir, cache_bytes) {
            Err(StorageError::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Opens an epoch that must already exist: a missing database is an error, never a new empty
/// one in its place.
fn open_existing_epoch(dir: &Path, cache_bytes: u64) -> Result<EpochTrees, StorageError> {
    if !dir.join("db").is_file() {
        return Err(StorageError::Db(format!(
            "{} holds no database file (db)",
            dir.display()
        )));
    }
    open_epoch_trees(dir, cache_bytes)
}

/// fsyncs a directory, so that a file or directory created in it survives a power loss.
fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::Db(format!("fsync {}: {e}", dir.display())))
}

/// Where an epoch is packed before it takes the epoch's place.
fn packing_dir(epoch_dir: &Path) -> PathBuf {
    epoch_dir.with_extension("packed")
}

/// Where an epoch's unpacked database goes while its packed one takes its place.
fn replaced_dir(epoch_dir: &Path) -> PathBuf {
    epoch_dir.with_extension("old")
}

fn remove_dir(dir: &Path) -> Result<(), StorageError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StorageError::Db(format!("remove {}: {e}", dir.display())))
        }
        _ => Ok(()),
    }
}

fn rename(from: &Path, to: &Path) -> Result<(), StorageError> {
    std::fs::rename(from, to).map_err(|e| {
        StorageError::Db(format!(
            "rename {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })
}

/// Puts the unpacked epoch (`{id}.old`) back in place of a packed copy at `dir` that is not
/// whole, and removes that copy.
fn put_back_unpacked(dir: &Path) -> Result<(), StorageError> {
    let failed = packing_dir(dir);
    rename(dir, &failed)?;
    rename(&replaced_dir(dir), dir)?;
    sync_dir(dir.parent().unwrap_or(dir))?;
    let _ = remove_dir(&failed);
    Ok(())
}

/// Finishes what a stop cut short while an epoch was being packed (see [`pack_in_place`]): an
/// epoch moved aside (`{id}.old`) whose packed database did not take its place yet is put back
/// (packed again later); a packed database that never took its place (`{id}.packed`) is
/// removed. Returns the ids whose packed database did take its place, with the unpacked one
/// still beside it: that one is removed once the packed one opens, else put back.
fn finish_interrupted_packs(log_dir: &Path) -> Result<Vec<u64>, StorageError> {
    let entries = std::fs::read_dir(log_dir)
        .map_err(|e| StorageError::Db(format!("read {}: {e}", log_dir.display())))?;
    let mut aside = Vec::new();
    let mut unfinished = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .and_then(|stem| stem.parse::<u64>().ok())
            .filter(|id| epoch_dir(log_dir, *id).with_extension("") == path.with_extension(""))
        else {
            continue;
        };
        if path == replaced_dir(&epoch_dir(log_dir, id)) {
            aside.push(id);
        } else if path == packing_dir(&epoch_dir(log_dir, id)) {
            unfinished.push(path);
        }
    }
    let mut replaced = Vec::new();
    for id in aside {
        let (dir, old) = (
            epoch_dir(log_dir, id),
            replaced_dir(&epoch_dir(log_dir, id)),
        );
        if dir.exists() {
            replaced.push(id);
        } else {
            tracing::warn!(
                epoch = id,
                "a log epoch was being packed: putting it back as it was"
            );
            rename(&old, &dir)?;
            sync_dir(log_dir)?;
        }
    }
    for path in unfinished {
        tracing::info!(dir = %path.display(), "removing an unfinished packed log epoch");
        remove_dir(&path)?;
    }
    Ok(replaced)
}

impl Epochs {
    /// Opens epoch 0 (the main database's trees) and every epoch under `data_dir/log/`. Every
    /// epoch found is sealed (the open just wrote its snapshot). The caller then calls
    /// [`Epochs::start_current`] once it knows the next feed position.
    pub(crate) fn open(
        main: &sled::Db,
        data_dir: &Path,
        cache_bytes: u64,
        appends_max: u64,
        wal_dir: &Path,
        budget: Arc<MemBudget>,
    ) -> Result<Epochs, StorageError> {
        let dir = data_dir.join("log");
        std::fs::create_dir_all(&dir)
            .map_err(|e| StorageError::Db(format!("create {}: {e}", dir.display())))?;
        let replaced = finish_interrupted_packs(&dir)?;
        let mut ids = Vec::new();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| StorageError::Db(format!("read {}: {e}", dir.display())))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| StorageError::Db(format!("read {}: {e}", dir.display())))?;
            // Only directories named as this store names them: `0000000001`, not `1` or `+1`.
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let id = entry.file_name().to_str().and_then(|name| {
                name.parse::<u64>()
                    .ok()
                    .filter(|id| epoch_dir(&dir, *id) == entry.path())
            });
            match id {
                Some(id) if id > 0 && is_dir => ids.push(id),
                _ => tracing::warn!(entry = ?entry.path(), "not a log epoch; left alone"),
            }
        }
        ids.sort_unstable();
        let sealed_cache = sealed_cache_bytes(cache_bytes);
        let open_one = |id: u64| -> Result<_, StorageError> {
            let path = epoch_dir(&dir, id);
            let opened = open_epoch_trees(&path, sealed_cache);
            // A packed copy swapped in before a stop must open whole (sled opens a damaged log
            // as what it can recover of it), else the unpacked epoch beside it goes back.
            let trees = match opened {
                Err(StorageError::Locked(dir)) => return Err(StorageError::Locked(dir)),
                Ok(trees) if !replaced.contains(&id) || trees.is_complete_pack() => trees,
                Err(e) if !replaced.contains(&id) => return Err(e),
                not_whole => {
                    let why = match &not_whole {
                        Err(e) => e.to_string(),
                        Ok(_) => "its completion record is missing".to_owned(),
                    };
                    drop(not_whole);
                    tracing::error!(epoch = id, error = %why, "the packed copy of a log epoch is not whole; putting the unpacked one back");
                    put_back_unpacked(&path)?;
                    open_epoch_trees(&path, sealed_cache)?
                }
            };
            let first_position = first_position_of(&trees.feed)?;
            Ok((id, path, trees, first_position))
        };
        // Opening a sealed epoch is loading its snapshot (CPU and reads): one thread per core.
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(ids.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&id) = ids.get(i) else {
                                return mine;
                            };
                            mine.push((i, open_one(id)));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        if results.len() != ids.len() {
            return Err(StorageError::Db("opening a log epoch panicked".into()));
        }
        results.sort_unstable_by_key(|(i, _)| *i);
        let mut opened = results
            .into_iter()
            .map(|(_, result)| result)
            .collect::<Result<Vec<_>, _>>()?;
        replay_written_ahead(&dir, wal_dir, sealed_cache, &mut opened)?;
        // Every packed copy swapped in before a stop opened: the unpacked epochs can go.
        for id in replaced {
            let old = replaced_dir(&epoch_dir(&dir, id));
            if old.exists() {
                tracing::info!(
                    epoch = id,
                    "removing the unpacked copy of a packed log epoch"
                );
                remove_dir(&old)?;
            }
        }
        // An epoch with no feed entry holds nothing (an append records its entry before its
        // events; it was created just before a stop): it starts where the next one does, so that
        // reads skip it. The newest one, if empty, goes on taking appends (`start_current`).
        let mut following = u64::MAX;
        let mut firsts = vec![0; opened.len()];
        for (i, (_, _, _, first)) in opened.iter().enumerate().rev() {
            firsts[i] = first.unwrap_or(following);
            following = firsts[i];
        }
        let mut list = vec![Arc::new(Epoch {
            id: 0,
            first_position: AtomicU64::new(0),
            dir: None,
            trees: RwLock::new(Some(EpochTrees {
                events: EventTree::Plain(main.open_tree("events")?),
                runs: Vec::new(),
                feed: main.open_tree("feed")?,
                db: None,
            })),
            cache_bytes: 0,
            sealed: AtomicBool::new(true),
            flushing: std::sync::Mutex::new(()),
            memtable: MemTable::new(budget.clone()),
        })];
        for ((id, path, trees, _), first_position) in opened.into_iter().zip(firsts) {
            list.push(Arc::new(Epoch {
                id,
                first_position: AtomicU64::new(first_position),
                dir: Some(path),
                trees: RwLock::new(Some(trees)),
                cache_bytes: sealed_cache,
                sealed: AtomicBool::new(true),
                flushing: std::sync::Mutex::new(()),
                memtable: MemTable::new(budget.clone()),
            }));
        }
        Ok(Epochs {
            dir,
            cache_bytes,
            appends_max: appends_max.max(1),
            list: RwLock::new(list),
            gate: Arc::default(),
            packing: std::sync::Mutex::new(()),
            budget,
        })
    }

    /// What the epochs' memory tables may hold together, and hold now.
    pub(crate) fn budget(&self) -> &MemBudget {
        &self.budget
    }

    /// Every epoch, oldest first.
    pub(crate) fn all(&self) -> Vec<Arc<Epoch>> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The epoch appends go to now.
    pub(crate) fn current(&self) -> Arc<Epoch> {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        list.last().cloned().expect("epoch 0 is always there")
    }

    /// Starts the epoch appends go to after an open, at `next_position`: the newest epoch if it
    /// holds nothing (a start without appends; reopened with a writer's cache), else a new one,
    /// so that the epochs just opened (whose snapshots the open wrote) stay sealed.
    pub(crate) fn start_current(&self, next_position: u64) -> Result<(), StorageError> {
        let current = self.current();
        let empty = current.dir.is_some()
            && current.memtable.is_empty()
            && current.with(|t| Ok(t.feed.is_empty() && t.holds_no_event()))?;
        if let (true, Some(dir)) = (empty, current.dir.as_deref()) {
            let mut trees = current.trees.write().unwrap_or_else(|p| p.into_inner());
            drop(trees.take());
            *trees = Some(open_after_close(
                dir,
                current_cache_bytes(self.cache_bytes),
            )?);
            current
                .first_position
                .store(next_position, Ordering::Release);
            current.sealed.store(false, Ordering::Release);
            return Ok(());
        }
        let id = current
            .id
            .checked_add(1)
            .ok_or_else(|| StorageError::Db("log epoch ids are exhausted".into()))?;
        self.push_new(id, next_position).map(|_| ())
    }

    fn push_new(&self, id: u64, first_position: u64) -> Result<Arc<Epoch>, StorageError> {
        let path = epoch_dir(&self.dir, id);
        let trees = open_epoch_trees(&path, current_cache_bytes(self.cache_bytes))?;
        sync_new_epoch(&path, &self.dir)?;
        let epoch = Arc::new(Epoch {
            id,
            first_position: AtomicU64::new(first_position),
            dir: Some(path),
            trees: RwLock::new(Some(trees)),
            // Once sealed and reopened, a reader's cache.
            cache_bytes: sealed_cache_bytes(self.cache_bytes),
            sealed: AtomicBool::new(false),
            flushing: std::sync::Mutex::new(()),
            memtable: MemTable::new(self.budget.clone()),
        });
        self.list
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(epoch.clone());
        tracing::info!(
            epoch = id,
            first_position,
            "the event log continues in a new epoch"
        );
        Ok(epoch)
    }

    /// The epoch a feed block starting at `first` goes to: the current one, or a new one if the
    /// current is full. Only the feed's combiner calls this (one at a time, in position order).
    /// A new epoch's predecessor is sealed and reopened in the background once every position
    /// before `first` is durable.
    pub(crate) fn for_block(
        self: &Arc<Self>,
        first: u64,
        clock: &Arc<FeedClock>,
    ) -> Result<Arc<Epoch>, StorageError> {
        let current = self.current();
        if current.dir.is_some()
            && first.saturating_sub(current.first_position()) < self.appends_max
        {
            return Ok(current);
        }
        let id = current
            .id
            .checked_add(1)
            .ok_or_else(|| StorageError::Db("log epoch ids are exhausted".into()))?;
        let next = self.push_new(id, first)?;
        let epochs = Arc::downgrade(self);
        let gate = self.gate.clone();
        // Weak references and a receiver only: if the store goes away first, so does this task.
        let mut durable = clock.durable.subscribe();
        let sealing = Arc::downgrade(&current);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    // Every position of the sealed epoch is below `first`.
                    if durable.wait_for(|end| *end >= first).await.is_ok() {
                        let _ = tokio::task::spawn_blocking(move || seal(&gate, &epochs, &sealing))
                            .await;
                    }
                });
            }
            // No runtime (tools that append synchronously do not exist today): the epoch stays
            // unsealed, so the group commit keeps flushing it; the next open writes its snapshot.
            Err(_) => tracing::warn!(epoch = current.id, "no runtime to seal the previous epoch"),
        }
        Ok(next)
    }

    /// Packs, one after another in the background, the sealed epochs an open found unpacked
    /// (sealed by a stop before they were packed, or written by a version that did not pack).
    pub(crate) fn pack_sealed_in_background(self: &Arc<Self>) {
        let unpacked: Vec<Weak<Epoch>> = self
            .all()
            .iter()
            .filter(|e| e.dir.is_some() && e.is_sealed() && !e.is_packed())
            .map(Arc::downgrade)
            .collect();
        if unpacked.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // packed by the next open that has a runtime
        };
        let (epochs, gate) = (Arc::downgrade(self), self.gate.clone());
        runtime.spawn_blocking(move || {
            for epoch in &unpacked {
                seal(&gate, &epochs, epoch);
            }
        });
    }

    /// Holds off packing (waiting for a pack that runs) while the guard lives: for writes to a
    /// sealed epoch, which only tests of damaged records make.
    #[cfg(feature = "test-util")]
    pub(crate) fn packing_paused(&self) -> std::sync::MutexGuard<'_, ()> {
        off_the_runtime(|| self.packing.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Epochs the group commit must flush (not sealed), oldest first.
    pub(crate) fn unsealed(&self) -> Vec<Arc<Epoch>> {
        self.list
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| !e.is_sealed())
            .cloned()
            .collect()
    }

    /// Stops new seals and waits for the running ones, so that no epoch database stays open
    /// after the store is dropped (its file lock would refuse the next open).
    pub(crate) fn close(&self) {
        let mut state = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 = true;
        while state.0 > 0 {
            state = self
                .gate
                .done
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Bytes on disk of every epoch's own database.
    pub(crate) fn size_on_disk_bytes(&self) -> Result<u64, StorageError> {
        let mut total = 0;
        for epoch in self.all() {
            total += epoch.with(|t| match &t.db {
                Some(db) => Ok(db.size_on_disk()?),
                None => Ok(0),
            })?;
        }
        Ok(total)
    }
}

/// Makes a new epoch database's directory entries durable: sled writes its `conf` without an
/// fsync.
fn sync_new_epoch(path: &Path, log_dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(path.join("conf"))
        .and_then(|conf| conf.sync_all())
        .map_err(|e| StorageError::Db(format!("fsync {}: {e}", path.join("conf").display())))?;
    sync_dir(path)?;
    sync_dir(log_dir)
}

/// Flushes an epoch's database and fsyncs its files (sled's flush alone is no barrier).
fn flush_and_sync(db: &sled::Db, dir: &Path) -> Result<(), StorageError> {
    db.flush()?;
    crate::commit::DbFiles::open(dir)
        .and_then(|mut files| files.sync())
        .map_err(|e| StorageError::Db(format!("fsync {}: {e}", dir.display())))
}

/// An opened epoch: id, directory, trees, first feed position recorded in it.
type Opened = (u64, PathBuf, EpochTrees, Option<u64>);

fn first_position_of(feed: &sled::Tree) -> Result<Option<u64>, StorageError> {
    Ok(match feed.first()? {
        Some((key, _)) => <[u8; 8]>::try_from(key.as_ref())
            .map(u64::from_be_bytes)
            .ok(),
        None => None,
    })
}

/// Puts back into the epochs what the write-ahead segments hold (see [`crate::wal`]), then
/// flushes and fsyncs every epoch written to, so that the segments can go. A packed epoch is
/// skipped: it was packed from its database after that was made durable. An epoch named by a
/// record and missing (its directory lost with a power cut) is created again.
fn replay_written_ahead(
    log_dir: &Path,
    wal_dir: &Path,
    cache_bytes: u64,
    opened: &mut Vec<Opened>,
) -> Result<(), StorageError> {
    let started = Instant::now();
    let mut touched: Vec<u64> = Vec::new();
    let mut writes = 0u64;
    let mut last_segment = 0u64;
    // Events for each epoch's new run, by epoch id.
    let mut tables: std::collections::BTreeMap<u64, crate::memtable::Table> = Default::default();
    let records = crate::wal::replay(wal_dir, |write| {
        let index = match opened.binary_search_by_key(&write.epoch, |(id, ..)| *id) {
            Ok(index) => index,
            Err(index) => {
                if write.epoch == 0 {
                    return Err(StorageError::Db(
                        "a write-ahead record names log epoch 0, which takes no writes".into(),
                    ));
                }
                let path = epoch_dir(log_dir, write.epoch);
                tracing::warn!(
                    epoch = write.epoch,
                    "a write-ahead record names a log epoch that is missing; creating it again"
                );
                let trees = open_epoch_trees(&path, cache_bytes)?;
                sync_new_epoch(&path, log_dir)?;
                opened.insert(index, (write.epoch, path, trees, None));
                index
            }
        };
        last_segment = last_segment.max(write.segment);
        let trees = &opened[index].2;
        let EventTree::Plain(events) = &trees.events else {
            return Ok(()); // packed: whole already
        };
        match write.tree {
            crate::wal::WalTree::Feed => {
                trees.feed.insert(write.key, write.value)?;
            }
            // In a run already.
            crate::wal::WalTree::Events if write.segment <= trees.last_run() => return Ok(()),
            // Written one by one by a version before runs: put back the same way.
            crate::wal::WalTree::Events if trees.runs.is_empty() && !events.is_empty() => {
                events.insert(write.key, write.value)?;
            }
            crate::wal::WalTree::Events => {
                tables
                    .entry(write.epoch)
                    .or_default()
                    .insert(write.key, sled::IVec::from(write.value))?;
            }
        }
        writes += 1;
        if !touched.contains(&write.epoch) {
            touched.push(write.epoch);
        }
        Ok(())
    })?;
    for (id, path, trees, first) in opened.iter_mut() {
        if !touched.contains(id) {
            continue;
        }
        if let Some(db) = &trees.db {
            // The replayed events become a run named after the newest segment replayed, which
            // holds them all (the segments written from now on have higher numbers).
            if let Some(table) = tables.remove(id) {
                let run = packed::write_run(db, last_segment, &table)?;
                trees.runs.push((last_segment, EventTree::Packed(run)));
            }
            flush_and_sync(db, path)?;
        }
        *first = first_position_of(&trees.feed)?;
    }
    if records > 0 {
        tracing::info!(
            records,
            writes,
            epochs = touched.len(),
            replay_ms = started.elapsed().as_millis() as u64,
            "replayed the write-ahead segments into the log"
        );
    }
    Ok(())
}

/// Seals `epoch` (everything in it is durable and nothing more will be written) and packs it
/// ([`pack_or_reopen`]), unless the store is closing.
fn seal(gate: &Arc<SealGate>, epochs: &Weak<Epochs>, epoch: &Weak<Epoch>) {
    // Counted before taking any handle, so declared first and dropped last on every path (an
    // early return, a panic): `close` returns only once this seal has let go of the store.
    let _sealing = {
        let mut state = gate.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.1 {
            return; // closing: the next open writes the snapshot
        }
        state.0 += 1;
        Sealing(gate.clone())
    };
    let Some(epochs) = epochs.upgrade() else {
        return; // the store is closed: the next open writes the snapshot
    };
    if epochs.gate.closing() {
        return;
    }
    if let Some(epoch) = epoch.upgrade() {
        // Its appends were durable through the write-ahead segments; from now on nothing else
        // (checkpoints skip it, a pack reads it) may rely on them. It takes no more events:
        // what its memory table holds is its last run.
        epoch.memtable.freeze(FINAL_RUN);
        if let Err(e) = epoch.persist_frozen() {
            tracing::error!(epoch = epoch.id, error = %e, "cannot flush a log epoch to seal and pack it; left as it is (checkpoints flush it while it is unsealed; the next open packs it)");
            return;
        }
        epoch.sealed.store(true, Ordering::Release);
        pack_or_reopen(&epochs, &epoch);
    }
}

/// Packs a sealed epoch (see [`crate::packed`]) and puts the packed database in its place, whose
/// snapshot is written before: from then on opening it is loading that. If packing fails, the
/// epoch is reopened as it is instead, which writes its snapshot.
fn pack_or_reopen(epochs: &Epochs, epoch: &Epoch) {
    let Some(dir) = epoch.dir.clone() else {
        return;
    };
    let _one_at_a_time = epochs.packing.lock().unwrap_or_else(|p| p.into_inner());
    if epochs.gate.closing() {
        return; // closing (while waiting for another pack): the next open packs it
    }
    let started = Instant::now();
    match pack_in_place(epochs, epoch, &dir) {
        Ok(Some(counts)) => tracing::info!(
            epoch = epoch.id,
            records = counts.records,
            blocks = counts.blocks,
            pack_ms = started.elapsed().as_millis() as u64,
            "sealed a log epoch and packed it"
        ),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(epoch = epoch.id, error = %e, "cannot pack a sealed log epoch; reopening it as it is");
            let _ = remove_dir(&packing_dir(&dir));
            reopen(epoch);
        }
    }
}

/// Copies the sealed `epoch` packed into `{id}.packed`, writes that database's snapshot, then
/// swaps the directories (`{id}` -> `{id}.old`, `{id}.packed` -> `{id}`, fsync of `log/`) while
/// readers wait, opens the packed one and removes the old one. A stop at any point leaves
/// either the old epoch or the complete packed one in place ([`finish_interrupted_packs`]).
/// `None`: nothing done (packed already, or the store is closing).
fn pack_in_place(
    epochs: &Epochs,
    epoch: &Epoch,
    dir: &Path,
) -> Result<Option<packed::PackCounts>, StorageError> {
    let closing = || epochs.gate.closing();
    let new_dir = packing_dir(dir);
    remove_dir(&new_dir)?;
    let counts = {
        let held = epoch.read()?;
        let trees = held.trees();
        if trees.events.is_packed() {
            return Ok(None);
        }
        let db = crate::open_sled(&new_dir, epoch.cache_bytes)?;
        let counts = packed::pack(trees.all_records(&[]), &trees.feed, &db, &closing)?;
        drop(db);
        match counts {
            Some(counts) => counts,
            None => {
                // Closing: the next open removes what was written (its lock may still be held).
                return Ok(None);
            }
        }
    };
    if closing() {
        return Ok(None); // the next open removes the copy
    }
    // Opening it once writes its snapshot (replaying what was just written, off the readers'
    // way); sled writes its `conf` without an fsync.
    drop(open_after_close(&new_dir, epoch.cache_bytes)?);
    // Its db file and blobs (sled fsyncs neither blobs nor their directory), then its `conf`:
    // the unpacked epoch is removed once this one is in place.
    crate::commit::DbFiles::open(&new_dir)
        .and_then(|mut files| files.sync())
        .and_then(|()| std::fs::File::open(new_dir.join("conf")))
        .and_then(|conf| conf.sync_all())
        .map_err(|e| StorageError::Db(format!("fsync {}: {e}", new_dir.display())))?;
    sync_dir(&new_dir)?;
    let old_dir = replaced_dir(dir);
    let log_dir = dir.parent().unwrap_or(dir);
    let mut trees = epoch.trees.write().unwrap_or_else(|p| p.into_inner());
    drop(trees.take());
    let swapped = rename(dir, &old_dir).and_then(|()| match rename(&new_dir, dir) {
        Ok(()) => sync_dir(log_dir),
        Err(e) => {
            rename(&old_dir, dir)?;
            Err(e)
        }
    });
    if let Err(e) = swapped {
        // The old database is back in place (or, if even that failed, the next open puts it
        // back): reopen it for the readers.
        *trees = open_after_close(dir, epoch.cache_bytes).ok();
        return Err(e);
    }
    let opened = open_after_close(dir, epoch.cache_bytes).and_then(|opened| {
        if opened.is_complete_pack() {
            Ok(opened)
        } else {
            Err(StorageError::Db("its completion record is missing".into()))
        }
    });
    match opened {
        Ok(opened) => *trees = Some(opened),
        Err(e) => {
            // The packed copy goes; a later open packs again.
            let back = put_back_unpacked(dir);
            *trees = open_after_close(dir, epoch.cache_bytes).ok();
            back?;
            return Err(StorageError::Db(format!(
                "the packed copy of log epoch {} does not open ({e}); the epoch is kept unpacked",
                epoch.id
            )));
        }
    }
    drop(trees);
    if let Err(e) = remove_dir(&old_dir) {
        tracing::warn!(epoch = epoch.id, error = %e, "cannot remove an unpacked log epoch; the next open does");
    }
    Ok(Some(counts))
}

fn reopen(epoch: &Epoch) {
    let Some(dir) = epoch.dir.clone() else {
        return;
    };
    epoch.sealed.store(true, Ordering::Release);
    let started = Instant::now();
    let mut trees = epoch.trees.write().unwrap_or_else(|p| p.into_inner());
    if let Some(old) = trees.take() {
        if let Some(db) = &old.db {
            if let Err(e) = db.flush() {
                tracing::error!(epoch = epoch.id, error = %e, "flush before reopening a sealed epoch failed");
            }
        }
        drop(old);
    }
    let reopened = open_after_close(&dir, epoch.cache_bytes);
    match reopened {
        Ok(opened) => {
            *trees = Some(opened);
            tracing::info!(
                epoch = epoch.id,
                reopen_ms = started.elapsed().as_millis() as u64,
                "sealed a log epoch and wrote its recovery snapshot"
            );
        }
        Err(e) => {
            tracing::error!(epoch = epoch.id, error = %e, "cannot reopen a sealed log epoch; the next read that needs it tries again");
        }
    }
}

/// One epoch of the event log as [`crate::Store::log_epochs`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochInfo {
    /// Its id (0: the trees in the main database that data directories written before epochs
    /// existed keep).
    pub id: u64,
    /// The first change-feed position recorded in it.
    pub first_position: u64,
    /// Sealed: nothing more is written to it, and its recovery snapshot is written (or being
    /// written).
    pub sealed: bool,
    /// Packed: its events rewritten into blocks in key order (see the `packed` module).
    pub packed: bool,
}

impl crate::Store {
    /// The epochs of the event log, oldest first; the last takes the appends.
    pub fn log_epochs(&self) -> Vec<EpochInfo> {
        self.inner
            .epochs
            .all()
            .iter()
            .map(|e| EpochInfo {
                id: e.id,
                first_position: e.first_position(),
                sealed: e.is_sealed(),
                packed: e.is_packed(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;
    use std::time::{Duration, Instant};

    use crate::{AppendBatch, Envelope, IndexOp, Store, StoreConfig};

    fn config(dir: &std::path::Path, appends_max: u64) -> StoreConfig {
        StoreConfig {
            epoch_appends_max: appends_max,
            ..StoreConfig::new(dir)
        }
    }

    fn envelope(n: u64) -> Envelope {
        Envelope::new("Tested", 1, n, &n).expect("envelope")
    }

    async fn append(store: &Store, thing: &str, first_seq: u64, n: u64) -> u64 {
        store
            .append(AppendBatch {
                thing: thing.into(),
                first_seq,
                events: (first_seq..first_seq + n).map(envelope).collect(),
                index: vec![],
            })
            .await
            .expect("append")
    }

    /// Waits (at most 10 s) until every epoch but the current one is sealed and reopened.
    async fn sealed_behind(store: &Store) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let epochs = store.log_epochs();
            if epochs[..epochs.len() - 1].iter().all(|e| e.sealed) {
                // Sealed is set before the reopen: a read waits for it to finish.
                store.last_seq("a").expect("readable after the reopen");
                return;
            }
            assert!(Instant::now() < deadline, "not sealed: {epochs:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (at most 30 s) until every epoch but epoch 0 and the current one is packed and
    /// nothing but epochs is left under `log/` in `dir`.
    async fn packed_behind(store: &Store, dir: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let epochs = store.log_epochs();
            if epochs[1..epochs.len() - 1].iter().all(|e| e.packed) && leftovers(dir).is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "not packed: {epochs:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Names under `log/` that are not epochs.
    fn leftovers(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir.join("log"))
            .expect("log dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains('.'))
            .collect()
    }

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).expect("create");
        for entry in std::fs::read_dir(from).expect("read") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).expect("copy");
            }
        }
    }

    fn seqs(events: &[crate::RecordedEvent]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    /// Given epochs of 3 appends, when two Things append 10 times each (one of them two events
    /// at a time), then the log spans several epochs, the previous ones get sealed, and every
    /// read (forward with a limit, newest first, the last seq, the feed, the check's walk)
    /// sees one Thing's events in order across them, before and after a reopen.
    #[tokio::test]
    async fn a_log_rolled_over_epochs_reads_as_one_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&config(dir.path(), 3)).expect("open");
        let mut positions = Vec::new();
        for i in 0..10u64 {
            positions.push(append(&store, "a", 1 + 2 * i, 2).await);
            positions.push(append(&store, "b", 1 + i, 1).await);
        }
        let epochs = store.log_epochs();
        assert_eq!(
            epochs.len(),
            1 + 7,
            "epoch 0 and 20 appends in epochs of 3: {epochs:?}"
        );
        assert!(!epochs.last().expect("current").sealed);
        sealed_behind(&store).await;

        let check = |store: &Store| {
            let a = store.read_events("a", 1, 100).expect("a");
            assert_eq!(seqs(&a), (1..=20).collect::<Vec<_>>());
            assert_eq!(a[6].envelope, envelope(7));
            assert_eq!(
                seqs(&store.read_events("a", 5, 7).expect("page")),
                (5..=11).collect::<Vec<_>>()
            );
            assert_eq!(
                seqs(&store.read_events_rev("a", 12, 4).expect("rev")),
                [12, 11, 10, 9]
            );
            assert_eq!(store.last_seq("a").expect("a"), 20);
            assert_eq!(store.last_seq("b").expect("b"), 10);
            assert_eq!(store.last_seq("c").expect("c"), 0);
            let feed = store.read_feed(0, 100).expect("feed");
            assert_eq!(
                feed.iter().map(|e| e.position).collect::<Vec<_>>(),
                positions
            );
            assert_eq!(
                store
                    .read_feed(positions[7], 3)
                    .expect("from the middle")
                    .iter()
                    .map(|e| e.position)
                    .collect::<Vec<_>>(),
                positions[8..11]
            );
            let mut walked = Vec::new();
            store
                .walk_events(|e| {
                    walked.push((e.thing.expect("name"), e.seq));
                    ControlFlow::Continue(())
                })
                .expect("walk");
            let expected: Vec<(String, u64)> = (1..=20)
                .map(|s| ("a".to_owned(), s))
                .chain((1..=10).map(|s| ("b".to_owned(), s)))
                .collect();
            assert_eq!(walked, expected);
        };
        check(&store);
        packed_behind(&store, dir.path()).await;
        check(&store);
        drop(store);

        let store = Store::reopen_in_process(&config(dir.path(), 3)).expect("reopen");
        check(&store);
        let epochs = store.log_epochs();
        assert!(
            epochs[..epochs.len() - 1].iter().all(|e| e.sealed),
            "{epochs:?}"
        );
        assert!(
            epochs[1..epochs.len() - 2].iter().all(|e| e.packed),
            "packed epochs open packed: {epochs:?}"
        );
        // The epoch that was current is packed in the background.
        packed_behind(&store, dir.path()).await;
        check(&store);
        let next = append(&store, "a", 21, 1).await;
        assert!(next > *positions.last().expect("last"), "positions go on");
        assert_eq!(store.read_events("a", 20, 10).expect("tail").len(), 2);
    }

    /// Given a data directory written before epochs (its events and feed in the main
    /// database), when the store opens it, then those events are epoch 0, readable with the
    /// new ones, and new appends go to a new epoch.
    #[tokio::test]
    async fn a_data_directory_from_before_epochs_keeps_its_log_as_epoch_0() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = crate::open_sled(dir.path(), 1 << 20).expect("sled");
            let events = db.open_tree("events").expect("events");
            let feed = db.open_tree("feed").expect("feed");
            let prefix = crate::thing_key("old").expect("key");
            for seq in 1..=3u64 {
                let mut key = prefix.clone();
                key.extend_from_slice(&seq.to_be_bytes());
                events
                    .insert(key, envelope(seq).to_bytes().expect("bytes"))
                    .expect("insert");
            }
            let mut block = 1u32.to_be_bytes().to_vec();
            block.extend_from_slice(&crate::feed::entry_for("old", 1, 3).expect("entry"));
            feed.insert(1u64.to_be_bytes(), block).expect("feed");
            db.flush().expect("flush");
        }
        let store = Store::reopen_in_process(&config(dir.path(), 100)).expect("open");
        assert_eq!(store.last_seq("old").expect("seq"), 3);
        let position = append(&store, "old", 4, 1).await;
        assert_eq!(position, 2, "positions go on after the old feed");
        assert_eq!(
            seqs(&store.read_events("old", 1, 10).expect("read")),
            [1, 2, 3, 4]
        );
        let epochs = store.log_epochs();
        assert_eq!(
            epochs.iter().map(|e| (e.id, e.sealed)).collect::<Vec<_>>(),
            [(0, true), (1, false)]
        );
        assert!(dir
            .path()
            .join("log")
            .join("0000000001")
            .join("db")
            .exists());
        assert_eq!(store.read_feed(0, 10).expect("feed").len(), 2);
    }

    /// Given an epoch left empty by previous runs (started, then stopped before any append),
    /// when the store opens, then appends go on in it instead of starting another one; an index
    /// change lands in the main database; entries under `log/` not named like an epoch, or not
    /// directories, are left alone.
    #[tokio::test]
    async fn an_empty_newest_epoch_is_reused_at_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(&config(dir.path(), 100)).expect("open"));
        drop(Store::reopen_in_process(&config(dir.path(), 100)).expect("reopen"));
        std::fs::create_dir_all(dir.path().join("log").join("7")).expect("stray dir");
        std::fs::write(dir.path().join("log").join("0000000009"), b"x").expect("stray file");
        let store = Store::reopen_in_process(&config(dir.path(), 100)).expect("reopen");
        let ids: Vec<u64> = store.log_epochs().iter().map(|e| e.id).collect();
        assert_eq!(ids, [0, 1], "epoch 1 held nothing: appends go on in it");
        assert!(!store.log_epochs()[1].sealed);
        assert!(dir.path().join("log").join("7").exists(), "left alone");
        store
            .append(AppendBatch {
                thing: "t".into(),
                first_seq: 1,
                events: vec![envelope(1)],
                index: vec![IndexOp::PutThing(b"rec".to_vec())],
            })
            .await
            .expect("append");
        drop(store);
        let store = Store::reopen_in_process(&config(dir.path(), 100)).expect("reopen");
        let ids: Vec<u64> = store.log_epochs().iter().map(|e| e.id).collect();
        assert_eq!(ids, [0, 1, 2], "epoch 1 holds an append: a new one starts");
        assert_eq!(store.list_things(None, 10).expect("list").len(), 1);
        assert_eq!(store.last_seq("t").expect("seq"), 1);
        assert_eq!(store.read_feed(0, 10).expect("feed").len(), 1);
    }

    /// Given a log whose sealed epochs are packed, when a stop had cut short packing in each
    /// way it can (a packed copy not yet in place; an epoch moved aside before its packed copy
    /// took its place; the unpacked copy left beside a packed epoch that opens, or beside one
    /// that does not), then the next open puts the epoch back or removes the leftover, every event reads as before, and the epochs that
    /// were put back get packed again.
    #[tokio::test]
    async fn a_pack_cut_short_is_finished_or_undone_at_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&config(dir.path(), 2)).expect("open");
        for seq in 1..=10u64 {
            append(&store, "a", seq, 1).await;
        }
        sealed_behind(&store).await;
        packed_behind(&store, dir.path()).await;
        let expected = seqs(&store.read_events("a", 1, 100).expect("read"));
        assert_eq!(expected, (1..=10).collect::<Vec<_>>());
        let epochs = store.log_epochs();
        drop(store);

        let log = dir.path().join("log");
        let name = |id: u64| format!("{id:010}");
        // Epoch 1: a packed copy was being written.
        copy_dir(&log.join(name(1)), &log.join(format!("{}.packed", name(1))));
        // Epoch 2: moved aside; its packed copy (here: a damaged one) not yet in place.
        std::fs::rename(log.join(name(2)), log.join(format!("{}.old", name(2)))).expect("aside");
        std::fs::create_dir_all(log.join(format!("{}.packed", name(2)))).expect("mkdir");
        std::fs::write(
            log.join(format!("{}.packed", name(2))).join("db"),
            b"partial",
        )
        .expect("write");
        // Epoch 3: packed and in place, its unpacked copy not removed yet.
        copy_dir(&log.join(name(3)), &log.join(format!("{}.old", name(3))));
        // Epoch 4: its packed copy swapped in, but it does not open (damaged).
        std::fs::rename(log.join(name(4)), log.join(format!("{}.old", name(4)))).expect("aside");
        std::fs::create_dir_all(log.join(name(4))).expect("mkdir");
        std::fs::write(log.join(name(4)).join("db"), vec![0xA5; 4096]).expect("write");

        let store = Store::reopen_in_process(&config(dir.path(), 2)).expect("reopen");
        // (The epoch that was current may be being packed now.)
        let left = leftovers(dir.path());
        for name in ["1.packed", "2.packed", "2.old", "3.old", "4.old"] {
            assert!(
                !left.iter().any(|l| l.ends_with(name)),
                "{name} left: {left:?}"
            );
        }
        assert_eq!(
            seqs(&store.read_events("a", 1, 100).expect("read")),
            expected
        );
        assert_eq!(
            seqs(&store.read_events_rev("a", 10, 100).expect("rev")),
            (1..=10).rev().collect::<Vec<_>>()
        );
        assert_eq!(
            store.log_epochs().len(),
            epochs.len() + 1,
            "a new current epoch"
        );
        packed_behind(&store, dir.path()).await;
        assert_eq!(
            seqs(&store.read_events("a", 1, 100).expect("read")),
            expected
        );
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    fn segments_in(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("wal"))
            .map(|entries| entries.count())
            .unwrap_or(0)
    }

    /// Given appends acknowledged while sled never wrote them (no checkpoint yet), when
    /// the data directory is copied as it is on disk and opened, then every acknowledged event
    /// and feed entry is there: the write-ahead segments were replayed into the epoch, which
    /// then holds them on its own (the copy opens whole a second time). Without its `wal/` the
    /// same copy lacks them, so it is the segments that carried them.
    #[tokio::test]
    async fn appends_acknowledged_before_any_checkpoint_are_replayed_from_the_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&config(dir.path(), 1_000)).expect("open");
        // Appends of several events first: sled writes its buffer for each `apply_batch`.
        append(&store, "b", 1, 3).await;
        append(&store, "b", 4, 2).await;
        for seq in 1..=20 {
            append(&store, "a", seq, 1).await;
        }
        assert_eq!(store.commit_stats().checkpoints, 0);
        let copy = tempfile::tempdir().expect("tempdir");
        copy_dir(dir.path(), copy.path());
        let without_wal = tempfile::tempdir().expect("tempdir");
        copy_dir(dir.path(), without_wal.path());
        std::fs::remove_dir_all(without_wal.path().join("wal")).expect("remove wal");
        {
            let bare = Store::open(&config(without_wal.path(), 1_000)).expect("open bare");
            let bare_seq = bare.last_seq("a").expect("last seq");
            assert!(
                bare_seq < 20,
                "sled wrote the appends itself ({bare_seq}): the test shows nothing"
            );
        }
        for open in 0..2 {
            let copied = Store::open(&config(copy.path(), 1_000)).expect("open the copy");
            let a = copied.read_events("a", 1, 100).expect("read a");
            // (The first open appends a 21st.)
            assert_eq!(seqs(&a), (1..=20 + open).collect::<Vec<_>>(), "open {open}");
            assert_eq!(a[4].envelope, envelope(5));
            let b = copied.read_events("b", 1, 100).expect("read b");
            assert_eq!(seqs(&b), vec![1, 2, 3, 4, 5], "open {open}");
            let feed = copied.read_feed(0, 100).expect("feed");
            assert_eq!(feed.len(), 22 + open as usize, "open {open}");
            // The replayed segments are gone; one new one takes the next appends.
            assert_eq!(segments_in(copy.path()), 1);
            assert_eq!(append(&copied, "a", 21 + open, 1).await, 23 + open);
        }
    }

    /// Given appends written ahead in a segment and then, at the store's close, into a run
    /// named after that segment, when the data directory is opened with that segment back in
    /// `wal/` (a crash after the run was made durable and before the segment was removed), then
    /// its events are not replayed a second time: every seq reads once, forwards and back.
    #[tokio::test]
    async fn a_segment_whose_events_are_in_a_run_is_not_replayed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&config(dir.path(), 1_000)).expect("open");
        for seq in 1..=5 {
            append(&store, "a", seq, 1).await;
        }
        append(&store, "b", 1, 3).await;
        assert_eq!(store.commit_stats().checkpoints, 0);
        let early_wal = tempfile::tempdir().expect("tempdir");
        copy_dir(&dir.path().join("wal"), early_wal.path());
        drop(store); // checkpoints: the events go to a run
        let copy = tempfile::tempdir().expect("tempdir");
        copy_dir(dir.path(), copy.path());
        std::fs::remove_dir_all(copy.path().join("wal")).expect("remove wal");
        copy_dir(early_wal.path(), &copy.path().join("wal"));
        let copied = Store::open(&config(copy.path(), 1_000)).expect("open the copy");
        assert_eq!(
            seqs(&copied.read_events("a", 1, 100).expect("read")),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(
            seqs(&copied.read_events_rev("a", 100, 100).expect("rev")),
            vec![5, 4, 3, 2, 1]
        );
        assert_eq!(
            seqs(&copied.read_events("b", 1, 100).expect("read")),
            vec![1, 2, 3]
        );
        let mut walked = 0;
        copied
            .walk_events(|_| {
                walked += 1;
                std::ops::ControlFlow::Continue(())
            })
            .expect("walk");
        assert_eq!(walked, 8);
    }

    /// Given checkpoints after every commit (`wal_bytes_max` of 1 byte), when Things append,
    /// then the epochs are flushed into sled and the older segments removed: a copy of the
    /// directory without its `wal/` still holds every acknowledged event.
    #[tokio::test]
    async fn checkpoints_flush_the_epochs_and_remove_older_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig {
            wal_bytes_max: 1,
            ..config(dir.path(), 1_000)
        };
        let store = Store::open(&config).expect("open");
        for seq in 1..=10 {
            append(&store, "a", seq, 1).await;
        }
        // Routine checkpoints end in the background (bounded polling). Then only the current
        // segment is left: the others are over twice `wal_bytes_max`, so removed rather than
        // recycled.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.commit_stats().checkpoints < 10 || segments_in(dir.path()) != 1 {
            assert!(Instant::now() < deadline, "checkpoints still running");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let copy = tempfile::tempdir().expect("tempdir");
        copy_dir(dir.path(), copy.path());
        std::fs::remove_dir_all(copy.path().join("wal")).expect("remove wal");
        let copied = Store::open(&StoreConfig::new(copy.path())).expect("open the copy");
        assert_eq!(copied.last_seq("a").expect("last seq"), 10);
    }

    fn segment_files(dir: &std::path::Path) -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = std::fs::read_dir(dir.join("wal"))
            .expect("wal")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        names
    }

    /// Given a routine checkpoint (the memory table at half its bound) whose writing into the
    /// epoch is held up (the test holds the epoch's flush lock), when the Thing goes on
    /// appending, then each append is acknowledged meanwhile (durable in the synced segments),
    /// a copy of the directory taken then (a crash) holds every one of them, and once the
    /// checkpoint may go on it ends in the background and its segment is removed.
    #[tokio::test]
    // Held across the appends on purpose: only the checkpoint thread takes this lock.
    #[allow(clippy::await_holding_lock)]
    async fn appends_do_not_wait_for_a_routine_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig {
            wal_bytes_max: 1 << 30,
            memtable_bytes_max: 64 * 1024,
            ..config(dir.path(), 1_000_000)
        })
        .expect("open");
        let epoch = store.inner.epochs.unsealed().pop().expect("current epoch");
        let first = segment_files(dir.path());
        assert_eq!(first.len(), 1);
        // Bounded: an append that waited for the held-up checkpoint would wait for good.
        let acknowledged = |seq| {
            let store = &store;
            async move {
                tokio::time::timeout(Duration::from_secs(10), append(store, "a", seq, 1))
                    .await
                    .expect("acknowledged while the checkpoint is held up")
            }
        };
        let held = epoch.flushing.lock().expect("flush lock");
        let mut seq = 0;
        while segment_files(dir.path()) == first {
            seq += 1;
            assert!(seq < 10_000, "no checkpoint started");
            acknowledged(seq).await;
        }
        let started_at = seq;
        for _ in 0..50 {
            seq += 1;
            acknowledged(seq).await;
        }
        assert_eq!(
            store.commit_stats().checkpoints,
            0,
            "the checkpoint is held up"
        );
        assert!(segment_files(dir.path()).contains(&first[0]));
        let copy = tempfile::tempdir().expect("tempdir");
        copy_dir(dir.path(), copy.path());
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.commit_stats().checkpoints < 1 || segment_files(dir.path()).contains(&first[0])
        {
            assert!(Instant::now() < deadline, "the checkpoint did not end");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            seqs(&store.read_events("a", 1, 10_000).expect("read")),
            (1..=seq).collect::<Vec<_>>()
        );
        drop(store);
        let copied = Store::open(&StoreConfig::new(copy.path())).expect("open the copy");
        assert_eq!(
            seqs(&copied.read_events("a", 1, 10_000).expect("read the copy")),
            (1..=seq).collect::<Vec<_>>(),
            "acknowledged while the checkpoint (from seq {started_at}) was held up"
        );
    }
}
