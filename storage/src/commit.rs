//! Group commit: one thread makes every pending write durable with one write + fsync of the
//! write-ahead segment and one flush + fsync of the main database.
//!
//! Writers write to memory (an epoch's memory table, the main database's sled trees), then
//! hand the committer a waiter and await it (an append's waiter is handed over by whoever
//! wrote it, see `feed`; the feed's combiner has framed the append's writes to its log epoch
//! as write-ahead records by then, see `wal`). The thread takes
//! every waiter queued so far (up to the batch bound), writes the queued write-ahead records to
//! the current segment and `fdatasync`s it, then flushes the main database (indexes, snapshots,
//! sessions, cursors, key/values), `fsync`ing its database file and any new blob files (sled's
//! flush only issues `sync_file_range`, which is not a durability barrier, and it never syncs
//! blobs), then wakes them all. The main database is fsynced even when the flush wrote nothing:
//! sled writes a full buffer to its file on its own, without an fsync.
//!
//! The log epochs are flushed only at a checkpoint: once `wal_bytes_max` bytes of records were
//! written since the last one, once the memory tables hold half of `memtable_bytes_max`, when
//! a write-ahead write or sync failed (a failed fsync leaves the file's state unknown), when an
//! append was refused at that bound, and at the end. A checkpoint that failed is tried again
//! by the next commit, or, if none comes, by the thread itself after a wait that doubles from
//! 100 ms to 5 s while the attempts keep failing (the refused appends cannot start one). A checkpoint freezes the epochs' memory tables as
//! it closes the segment, starts a new one, writes each frozen table into its epoch as a run and
//! flushes and fsyncs every epoch that is not sealed (oldest first, see `memtable`), and then
//! removes the older segments. A routine checkpoint (the segment or the tables at their share of
//! the bounds) syncs the closed segment and leaves the writing and flushing to a second thread,
//! so the commits after it do not wait for the epochs; one runs at a time, and a commit waits
//! for it only when the next segment is full too. A checkpoint asked for (after a failure, for a
//! refused append, at the end) runs inline, after any background one.
//! Writes that arrive during a commit form the next batch, so the cost is one commit per batch,
//! not per write. Exactly one flush of a database is ever in flight (sled's concurrent
//! `flush_async` deadlocks, upstream issue #1308; a seal's flush of its epoch takes the
//! epoch's flush lock).

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::epoch::{Epoch, Epochs};
use crate::feed::{FeedClock, Turn};
use crate::wal::{WalBuffer, WalFiles};
use crate::StorageError;

/// Told `Turn::Done` once everything written before it was handed over is durable.
pub(crate) type Waiter = oneshot::Sender<Turn>;

/// How long the commit thread first waits, with nothing to commit, before it tries again a
/// checkpoint that failed; each failed try doubles the wait, up to
/// [`CHECKPOINT_RETRY_INTERVAL_MAX`] (a failing disk is not hammered with rewrites of every
/// frozen table), and a success resets it.
const CHECKPOINT_RETRY_INTERVAL_MIN: std::time::Duration = std::time::Duration::from_millis(100);
/// The longest wait between two tries of a failing checkpoint with nothing else to commit.
const CHECKPOINT_RETRY_INTERVAL_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Counters of the group commit since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Flush + fsync rounds completed.
    pub batches: u64,
    /// Waiters made durable (appends and explicit syncs).
    pub waiters: u64,
    /// Total time spent in flush + fsync, microseconds.
    pub flush_us_total: u64,
    /// Checkpoints completed (memory tables written into the log epochs as runs, the epochs
    /// flushed, older write-ahead segments removed).
    pub checkpoints: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    waiters: AtomicU64,
    flush_us_total: AtomicU64,
    checkpoints: AtomicU64,
}

/// The write-ahead side of the group commit (see [`crate::wal`]).
pub(crate) struct WriteAhead {
    pub(crate) files: WalFiles,
    pub(crate) buffer: Arc<WalBuffer>,
    /// Bytes written to segments after which a commit is a checkpoint.
    pub(crate) bytes_max: u64,
}

/// The commit thread's queue, shared with the thread itself: a background checkpoint takes a
/// sender from it to wake the thread when it ends, and the store's close empties it.
type Queue = Arc<std::sync::Mutex<Option<mpsc::Sender<Vec<Waiter>>>>>;

pub(crate) struct GroupCommit {
    /// A combiner round's waiters go over as one message (one wake-up of the thread at most).
    tx: Queue,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    counters: Arc<Counters>,
}

impl GroupCommit {
    pub(crate) fn start(
        db: sled::Db,
        epochs: Arc<Epochs>,
        data_dir: &Path,
        wal: WriteAhead,
        batch_waiters_max: usize,
        feed: Arc<FeedClock>,
    ) -> Result<GroupCommit, StorageError> {
        let main = DbFiles::open(data_dir)
            .map_err(|e| StorageError::Db(format!("open db file for fsync: {e}")))?;
        let (tx, rx) = mpsc::channel::<Vec<Waiter>>();
        let tx: Queue = Arc::new(std::sync::Mutex::new(Some(tx)));
        let persister = Persister::start(tx.clone())
            .map_err(|e| StorageError::Db(format!("spawn checkpoint thread: {e}")))?;
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("thinghub-commit".into())
            .spawn(move || {
                let mut syncer = Syncer {
                    db,
                    main,
                    epochs,
                    wal,
                    persister,
                    counters: thread_counters,
                };
                run(rx, &mut syncer, batch_waiters_max.max(1), &feed);
            })
            .map_err(|e| StorageError::Db(format!("spawn commit thread: {e}")))?;
        Ok(GroupCommit {
            tx,
            thread: std::sync::Mutex::new(Some(thread)),
            counters,
        })
    }

    /// Resolves once every write made before the call is durable.
    pub(crate) async fn wait_durable(&self) -> Result<(), StorageError> {
        let (waiter, done) = oneshot::channel();
        self.enqueue(vec![waiter]);
        match done.await {
            Ok(Turn::Done(result)) => result,
            Ok(Turn::Combine) | Err(_) => Err(StorageError::Closed),
        }
    }

    /// Starts a group commit even if no write waits for one (one that needs a checkpoint).
    pub(crate) fn wake(&self) {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = guard.as_ref() {
            let _ = tx.send(Vec::new());
        }
    }

    /// Hands `waiters` over: each is told once every write made before this call is durable
    /// (or at once that the store is closed).
    pub(crate) fn enqueue(&self, waiters: Vec<Waiter>) {
        if waiters.is_empty() {
            return;
        }
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let refused = match guard.as_ref() {
            Some(tx) => match tx.send(waiters) {
                Ok(()) => Vec::new(),
                Err(mpsc::SendError(waiters)) => waiters,
            },
            None => waiters,
        };
        drop(guard);
        for waiter in refused {
            let _ = waiter.send(Turn::Done(Err(StorageError::Closed)));
        }
    }

    pub(crate) fn stats(&self) -> CommitStats {
        CommitStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            waiters: self.counters.waiters.load(Ordering::Relaxed),
            flush_us_total: self.counters.flush_us_total.load(Ordering::Relaxed),
            checkpoints: self.counters.checkpoints.load(Ordering::Relaxed),
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        // Closing the channel lets the thread finish its last batch and exit.
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

/// The files of one sled database that a commit fsyncs.
pub(crate) struct DbFiles {
    db_file: File,
    blobs_dir: PathBuf,
    synced_blobs: HashSet<std::ffi::OsString>,
}

impl DbFiles {
    pub(crate) fn open(dir: &Path) -> std::io::Result<DbFiles> {
        Ok(DbFiles {
            db_file: File::open(dir.join("db"))?,
            blobs_dir: dir.join("blobs"),
            synced_blobs: HashSet::new(),
        })
    }

    pub(crate) fn sync(&mut self) -> std::io::Result<()> {
        self.db_file.sync_all()?;
        self.sync_new_blobs()
    }

    /// sled writes values larger than a segment fraction to `blobs/` without any fsync.
    fn sync_new_blobs(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut synced_any = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                File::open(entry.path())?.sync_all()?;
                synced_any = true;
            }
            present.insert(name);
        }
        if synced_any {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

struct Syncer {
    db: sled::Db,
    main: DbFiles,
    epochs: Arc<Epochs>,
    /// The write-ahead segments and the records queued for them.
    wal: WriteAhead,
    /// Writes a routine checkpoint's frozen tables into their epochs off this thread.
    persister: Persister,
    /// Where the checkpoints that end (inline or in the background) are counted.
    counters: Arc<Counters>,
}

impl Syncer {
    /// Makes everything written before the call durable; a checkpoint inline if `checkpoint` or
    /// one was asked for.
    fn make_durable(&mut self, checkpoint: bool) -> std::io::Result<()> {
        self.reap(false);
        let written_ahead = self.write_ahead(checkpoint);
        if written_ahead.is_err() {
            // Whatever was written to the segment may be lost in part: from now on only a
            // checkpoint (the epochs' own runs, flushed) vouches for those appends.
            self.wal.buffer.request_checkpoint();
        }
        let inline = written_ahead?;
        // The main database last: an append's index changes are written after its events.
        self.db.flush().map_err(std::io::Error::other)?;
        self.main.sync()?;
        if inline {
            // Everything is durable in sled now.
            self.checkpoint_ended();
        }
        Ok(())
    }

    /// The appends' records made durable: synced in the segment, or (an inline checkpoint)
    /// flushed in the epochs themselves, with later records going to a new segment. Returns
    /// whether it made an inline checkpoint.
    ///
    /// A checkpoint that is due only because the segment or the memory tables reached their
    /// share of the bounds runs in the background: the records are synced in the segment
    /// first, so the appends waiting on this commit (and the ones after it) do not wait for the
    /// epochs' writes and fsyncs (80-130 ms every 3 s at 37k appends/s, 2026-12-05), which
    /// were the p99.9 of every request. One such checkpoint runs at a time; a commit waits for
    /// it only once the new segment is full as well (what bounds the segments on disk) or the
    /// tables hold three quarters of their bound (rather than refuse appends at it). A
    /// checkpoint asked for (a failed write or sync, a write no record describes, a refused
    /// append, the close) is made inline, after any background one ends: its appends have no
    /// synced record to rely on.
    fn write_ahead(&mut self, checkpoint: bool) -> std::io::Result<bool> {
        if checkpoint || self.wal.buffer.take_checkpoint_request() {
            self.reap(true);
            self.checkpoint_inline()?;
            return Ok(true);
        }
        self.wal.files.write_pending(&self.wal.buffer)?;
        let segment_full = self.wal.files.since_checkpoint_bytes() >= self.wal.bytes_max;
        let budget = self.epochs.budget();
        if !segment_full && !budget.wants_checkpoint() {
            self.wal.files.sync()?;
            return Ok(false);
        }
        if self.persister.running {
            if !segment_full && !budget.nearly_full() {
                // The running checkpoint frees the tables' memory when it ends.
                self.wal.files.sync()?;
                return Ok(false);
            }
            // Waiting here, not refusing appends at the bound (which would wait for it too).
            self.reap(true);
            if self.wal.buffer.checkpoint_requested() {
                // It failed: its tables are still frozen, and an inline one writes them.
                self.checkpoint_inline()?;
                return Ok(true);
            }
        }
        let unsealed = self.freeze_tables()?;
        // The frozen tables' records are all in this segment: synced, they vouch for them
        // until the background checkpoint has written the tables into the epochs.
        self.wal.files.sync()?;
        self.wal.files.rotate()?;
        if let Err(unsealed) = self.persister.start_job(unsealed) {
            // Its thread is gone (it panicked): inline, as before there was one.
            tracing::error!("the checkpoint thread stopped; checkpoints are made inline");
            persist(&unsealed).map_err(std::io::Error::other)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A checkpoint on this thread: the tables frozen, the next segment started instead of
    /// syncing this one, the frozen tables written and their epochs flushed and fsynced. The
    /// caller removes the older segments once the main database is synced too. It also writes
    /// whatever a failed background checkpoint left frozen, so it takes that one's request.
    fn checkpoint_inline(&mut self) -> std::io::Result<()> {
        self.wal.buffer.take_checkpoint_request();
        let unsealed = self.freeze_tables()?;
        // If this fails, the next checkpoint writes to the same segment and freezes under the
        // same number: the tables merge (see `MemTable::freeze`).
        self.wal.files.rotate()?;
        persist(&unsealed).map_err(std::io::Error::other)
    }

    /// Writes the queued records to the current segment and freezes every unsealed epoch's
    /// memory table under its number, while no combiner is between a table write and its
    /// record (see `memtable`): each frozen table holds exactly the events those records
    /// describe. The epochs are listed under the lock too: a combiner may be creating one.
    fn freeze_tables(&mut self) -> std::io::Result<Vec<Arc<Epoch>>> {
        let _round = self.wal.buffer.round();
        let unsealed = self.epochs.unsealed();
        self.wal.files.write_pending(&self.wal.buffer)?;
        let segment = self.wal.files.segment();
        for epoch in &unsealed {
            epoch.memtable.freeze(segment);
        }
        Ok(unsealed)
    }

    /// Takes the outcome of the background checkpoint if it ended (waits for it with `wait`):
    /// once its tables are in the epochs the older segments go; if it failed, the next commit
    /// makes one inline.
    fn reap(&mut self, wait: bool) {
        match self.persister.outcome(wait) {
            None => {}
            Some(Ok(())) => self.checkpoint_ended(),
            Some(Err(e)) => {
                tracing::error!(error = %e, "a checkpoint failed to write the memory tables into the log epochs; the next commit tries again");
                self.wal.buffer.request_checkpoint();
            }
        }
    }

    /// A checkpoint's tables are durable in the epochs: the older segments go, and it counts.
    fn checkpoint_ended(&mut self) {
        // A segment left behind is only replayed again.
        if let Err(e) = self.wal.files.remove_older() {
            tracing::warn!(error = %e, "cannot remove the write-ahead segments a checkpoint made unnecessary; trying again at the next one");
        }
        self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes the frozen tables of `epochs` into them, oldest first; each also flushes and fsyncs
/// its database (its feed blocks).
fn persist(epochs: &[Arc<Epoch>]) -> Result<(), StorageError> {
    epochs.iter().try_for_each(|epoch| epoch.persist_frozen())
}

/// A checkpoint's epochs to write out, and a sender to wake the commit thread once done.
struct PersistJob {
    epochs: Vec<Arc<Epoch>>,
    wake: Option<mpsc::Sender<Vec<Waiter>>>,
}

/// The thread that writes a routine checkpoint's frozen tables into their epochs, flushes
/// and fsyncs them (`Epoch::persist_frozen`; a seal's flush of the same epoch waits on its
/// flush lock), while the commit thread goes on syncing segments.
struct Persister {
    jobs: Option<mpsc::Sender<PersistJob>>,
    outcomes: mpsc::Receiver<Result<(), StorageError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The commit thread's queue (a sender is taken from it per job, see [`Queue`]).
    queue: Queue,
    /// A job was started and its outcome not taken yet.
    running: bool,
}

impl Persister {
    fn start(queue: Queue) -> std::io::Result<Persister> {
        let (jobs, job_rx) = mpsc::channel::<PersistJob>();
        let (outcome_tx, outcomes) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("thinghub-checkpoint".into())
            .spawn(move || {
                for job in job_rx {
                    let started = Instant::now();
                    let outcome = persist(&job.epochs);
                    tracing::debug!(
                        epochs = job.epochs.len(),
                        checkpoint_ms = started.elapsed().as_millis() as u64,
                        ok = outcome.is_ok(),
                        "checkpoint wrote the memory tables into the log epochs"
                    );
                    if outcome_tx.send(outcome).is_err() {
                        break;
                    }
                    // After the outcome: the commit it starts takes it.
                    if let Some(wake) = job.wake {
                        let _ = wake.send(Vec::new());
                    }
                }
            })?;
        Ok(Persister {
            jobs: Some(jobs),
            outcomes,
            thread: Some(thread),
            queue,
            running: false,
        })
    }

    /// Hands `epochs` to the thread, or gives them back if it is gone.
    fn start_job(&mut self, epochs: Vec<Arc<Epoch>>) -> Result<(), Vec<Arc<Epoch>>> {
        let wake = self.queue.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(jobs) = self.jobs.as_ref() else {
            return Err(epochs);
        };
        match jobs.send(PersistJob { epochs, wake }) {
            Ok(()) => {
                self.running = true;
                Ok(())
            }
            Err(mpsc::SendError(job)) => Err(job.epochs),
        }
    }

    /// The running job's outcome if it ended (or, with `wait`, once it ends); `None` if none
    /// runs or it has not ended.
    fn outcome(&mut self, wait: bool) -> Option<Result<(), StorageError>> {
        if !self.running {
            return None;
        }
        let outcome = if wait {
            self.outcomes.recv().map_err(|_| ())
        } else {
            match self.outcomes.try_recv() {
                Ok(outcome) => Ok(outcome),
                Err(mpsc::TryRecvError::Empty) => return None,
                Err(mpsc::TryRecvError::Disconnected) => Err(()),
            }
        };
        self.running = false;
        Some(outcome.unwrap_or_else(|()| {
            Err(StorageError::Db(
                "the checkpoint thread stopped before it ended its checkpoint".into(),
            ))
        }))
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        // Closing its queue ends the thread once its job is done.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    rx: mpsc::Receiver<Vec<Waiter>>,
    syncer: &mut Syncer,
    batch_waiters_max: usize,
    feed: &FeedClock,
) {
    let counters = syncer.counters.clone();
    let mut batch: Vec<Waiter> = Vec::with_capacity(batch_waiters_max);
    // Waiters received and not in a batch yet (a round's may not all fit in one).
    let mut queued: VecDeque<Waiter> = VecDeque::new();
    let mut retry_after = CHECKPOINT_RETRY_INTERVAL_MIN;
    loop {
        if queued.is_empty() {
            // A checkpoint that failed is asked for again; while nothing else comes it is
            // tried again now and then, so the memory it would free (appends are refused
            // past `memtable_bytes_max`) does not wait for an append that cannot come.
            let received = if syncer.wal.buffer.checkpoint_requested() {
                match rx.recv_timeout(retry_after) {
                    Ok(waiters) => Ok(waiters),
                    Err(mpsc::RecvTimeoutError::Timeout) => Ok(Vec::new()),
                    Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
                }
            } else {
                rx.recv().map_err(drop)
            };
            match received {
                Ok(waiters) => queued.extend(waiters),
                Err(()) => break,
            }
        }
        while queued.len() < batch_waiters_max {
            match rx.try_recv() {
                Ok(waiters) => queued.extend(waiters),
                Err(_) => break,
            }
        }
        let taken = queued.len().min(batch_waiters_max);
        batch.extend(queued.drain(..taken));
        let started = Instant::now();
        // Every feed position below this is written now, so durable once the flush succeeds.
        let feed_end = feed.written_end();
        let result = match syncer.make_durable(false) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; writes in this batch are not durable");
                Err(StorageError::CommitFailed(e.to_string()))
            }
        };
        counters
            .flush_us_total
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if result.is_ok() {
            feed.durable_to(feed_end);
            retry_after = CHECKPOINT_RETRY_INTERVAL_MIN;
        } else {
            retry_after = (retry_after * 2).min(CHECKPOINT_RETRY_INTERVAL_MAX);
        }
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters
            .waiters
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for waiter in batch.drain(..) {
            let _ = waiter.send(Turn::Done(result.clone()));
        }
    }
    // Channel closed: make anything written since the last batch durable in sled itself before
    // exiting (the next open then has no segment to replay).
    let feed_end = feed.written_end();
    match syncer.make_durable(true) {
        Ok(()) => feed.durable_to(feed_end),
        Err(e) => tracing::error!(error = %e, "final flush at shutdown failed"),
    }
}
