//! The change feed: one commit-ordered sequence over every Thing's appends (the outbox).
//!
//! Each append takes the next position and its entry `position -> (thing, first seq, count)` is
//! recorded in the `feed` tree *before* its events are written, so events on disk always have
//! their entry (sled recovers a prefix of its log). An entry whose append did not land points
//! at nothing, or at events written later by the same Thing: a consumer then does its work
//! twice, never zero times. The entry becomes durable with the same group commit as the events:
//! no extra fsync.
//!
//! Entries are not inserted one by one: a sled insert costs about as much CPU as the event's
//! own, and a second insert per append cut the group commit's throughput at 1,000 writers to
//! 0.55x. Appends combine (flat combining): the first to register while nobody records becomes
//! the recorder and inserts every entry registered meanwhile as one block (key = first
//! position, value = the entries in order), then puts the events of each of those appends in
//! the epoch's memory table (see [`crate::memtable`]), and hands them to the group commit; the
//! others sleep until their append is durable (one
//! wake-up each). Under load a block holds many entries; alone, an append inserts its own
//! small block and its events inline.
//!
//! The clock knows which positions are still being written; when a group commit starts it reads
//! the lowest of them (or the next position if none): every position below is written, so once
//! the flush succeeds they all are durable ([`Store::feed_durable_end`]). Consumers read the
//! feed only below that bound, so they never act on a change that could still be lost.
//!
//! Consumers keep a named cursor (`cursors` tree), advanced only after their work is done; the
//! feed is trimmed below the slowest cursor (the per-Thing logs are kept whole), whole blocks at
//! a time, always keeping the last block so that positions never restart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use crate::epoch::Epoch;
use crate::wal::{WalBuffer, WalRecord, WalTree};
use crate::{thing_key, AppendBatch, StorageError, Store};

/// Blocks one combiner records before it hands the role to a waiting append (so that no append
/// records others' entries for long).
const COMBINE_ROUNDS_MAX: usize = 4;

/// What a waiting append is told.
pub(crate) enum Turn {
    /// Its events are written and durable (or recording, writing or syncing them failed).
    Done(Result<(), StorageError>),
    /// It records and writes the pending appends itself now (its own included).
    Combine,
}

/// An append registered and not yet written.
struct Pending {
    entry: Vec<u8>,
    batch: AppendBatch,
    /// Dropped once its events are written (or failed): only then is the position written.
    writing: Writing,
    /// Told when it is done; taken to hand the combiner role to it (it puts a new one back).
    done: Option<oneshot::Sender<Turn>>,
}

/// What appends and the group commit share about the feed.
pub(crate) struct FeedClock {
    state: Mutex<ClockState>,
    /// Every position below this is durable.
    pub(crate) durable: watch::Sender<u64>,
    /// Blocks `read_feed` found undecodable and skipped.
    damaged_blocks: std::sync::atomic::AtomicU64,
    /// Where the combiner queues its write-ahead records (asked for a checkpoint if a position
    /// is given up while its writer panics: the writes it made are described by no record).
    pub(crate) wal: Arc<WalBuffer>,
}

struct ClockState {
    /// The next position to hand out.
    next: u64,
    /// Positions from `writing_first` on, in order: whether each is still being written (the
    /// finished ones at the front are dropped, so the front is the lowest still writing).
    writing: VecDeque<bool>,
    writing_first: u64,
    /// Appends registered and not yet written, from position `pending_first` on.
    pending: Vec<Pending>,
    pending_first: u64,
    /// An append is recording entries now.
    combining: bool,
}

/// A position being written; its append is finished when this is dropped (whatever the outcome).
pub(crate) struct Writing {
    clock: Arc<FeedClock>,
    /// The position.
    pub(crate) position: u64,
}

impl Drop for Writing {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Before the position counts as written: a commit that sees it written is then a
            // checkpoint, which writes whatever the memory tables hold into the epochs.
            self.clock.wal.request_checkpoint();
        }
        let mut state = self.clock.lock();
        let index = (self.position - state.writing_first) as usize;
        if let Some(flag) = state.writing.get_mut(index) {
            *flag = false;
        }
        while state.writing.front() == Some(&false) {
            state.writing.pop_front();
            state.writing_first += 1;
        }
    }
}

/// The recording role as one append holds it (or may be handed it). If the append's future is
/// dropped (a timeout or a `select!` around it, an actor killed mid-handler) while it holds the
/// role, or after the role was handed to it and before it looked, nobody else would ever write
/// the pending appends: every later append would wait for good. Dropping this writes them.
struct Role<'a> {
    clock: &'a Arc<FeedClock>,
    store: &'a Store,
    combining: bool,
    turn: Option<oneshot::Receiver<Turn>>,
}

impl Drop for Role<'_> {
    fn drop(&mut self) {
        if let Some(mut turn) = self.turn.take() {
            // Closing first: the current combiner's handover then fails and it picks another
            // append, unless it already sent the role here.
            turn.close();
            if let Ok(Turn::Combine) = turn.try_recv() {
                self.combining = true;
            }
        }
        if self.combining {
            self.clock.combine(self.store);
        }
    }
}

impl FeedClock {
    pub(crate) fn new(next: u64, wal: Arc<WalBuffer>) -> FeedClock {
        FeedClock {
            state: Mutex::new(ClockState {
                next,
                writing: VecDeque::new(),
                writing_first: next,
                pending: Vec::new(),
                pending_first: next,
                combining: false,
            }),
            durable: watch::Sender::new(next),
            damaged_blocks: std::sync::atomic::AtomicU64::new(0),
            wal,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `batch` (its feed entry `entry`) and returns its position once it is durable.
    ///
    /// The append registers; the first to register while nobody records becomes the combiner
    /// (flat combining) and, for every append registered meanwhile, records the entries as one
    /// block, writes each append's events after it into the block's epoch and hands each to the
    /// group commit. The others sleep until the group commit (or a failure) wakes them: one
    /// wake-up per append, where recording the entry and waiting for durability were two.
    pub(crate) async fn append(
        self: &Arc<Self>,
        store: &Store,
        entry: Vec<u8>,
        batch: AppendBatch,
    ) -> Result<u64, StorageError> {
        let (done, rx) = oneshot::channel();
        let (position, combining) = {
            let mut state = self.lock();
            let position = state.next;
            state.next += 1;
            if state.writing.is_empty() {
                state.writing_first = position;
            }
            state.writing.push_back(true);
            if state.pending.is_empty() {
                state.pending_first = position;
            }
            state.pending.push(Pending {
                entry,
                batch,
                writing: Writing {
                    clock: self.clone(),
                    position,
                },
                done: Some(done),
            });
            let combining = !state.combining;
            state.combining = true;
            (position, combining)
        };
        let mut role = Role {
            clock: self,
            store,
            combining,
            turn: Some(rx),
        };
        loop {
            if role.combining {
                // Let the appends that are ready to run register first: under load the block
                // then holds many; alone, this costs one trip through the scheduler.
                tokio::task::yield_now().await;
                role.combining = false;
                self.combine(store);
            }
            let Some(turn) = role.turn.as_mut() else {
                return Err(StorageError::Closed);
            };
            let told = turn.await;
            match told {
                Ok(Turn::Done(result)) => {
                    role.turn = None;
                    return result.map(|()| position);
                }
                Ok(Turn::Combine) => {
                    // The role came with this append's own sender: put a new one in its place
                    // (nobody else touches the pending appends while this one holds the role).
                    let (done, rx) = oneshot::channel();
                    {
                        let mut state = self.lock();
                        let index = position.checked_sub(state.pending_first);
                        if let Some(own) = index.and_then(|i| state.pending.get_mut(i as usize)) {
                            own.done = Some(done);
                        }
                    }
                    role.turn = Some(rx);
                    role.combining = true;
                }
                Err(_) => {
                    role.turn = None;
                    return Err(StorageError::Closed);
                }
            }
        }
    }

    /// Writes the pending appends in blocks: each block's entries into the feed of the epoch
    /// [`Epochs::for_block`] picks, then each append's events into that epoch, then hands each
    /// append to the group commit (or tells it why it failed). Hands the role over after
    /// [`COMBINE_ROUNDS_MAX`] blocks.
    fn combine(self: &Arc<Self>, store: &Store) {
        for round in 0.. {
            let (first, pending) = {
                let mut state = self.lock();
                if state.pending.is_empty() {
                    state.combining = false;
                    break;
                }
                if round >= COMBINE_ROUNDS_MAX {
                    // The oldest waiting append still listening writes the rest (its own
                    // included); if none listens any more, this one goes on.
                    let handed_over = state
                        .pending
                        .iter_mut()
                        .filter_map(|p| p.done.take())
                        .any(|next| next.send(Turn::Combine).is_ok());
                    if handed_over {
                        break;
                    }
                }
                let first = state.pending_first;
                state.pending_first += state.pending.len() as u64;
                (first, std::mem::take(&mut state.pending))
            };
            // Outside the lock from here: dropping a `Writing` takes it.
            let mut block =
                Vec::with_capacity(4 + pending.iter().map(|p| p.entry.len()).sum::<usize>());
            block.extend_from_slice(&(pending.len() as u32).to_be_bytes());
            for p in &pending {
                block.extend_from_slice(&p.entry);
            }
            // The round's writes to its epoch, framed as one write-ahead record (see `wal`);
            // no checkpoint freezes the epoch's memory table until the record is queued.
            let round = self.wal.round();
            let mut recorded = store.inner.epochs.for_block(first, self).and_then(|epoch| {
                let key = first.to_be_bytes();
                let mut ahead = WalRecord::new(epoch.id);
                ahead.put(WalTree::Feed, &key, &block);
                epoch.with(|trees| Ok(trees.feed.insert(key, block)?))?;
                Ok((epoch, ahead))
            });
            if let Err(e) = &recorded {
                tracing::error!(error = %e, first, "cannot record change-feed entries; their appends fail");
            }
            let mut written = Vec::with_capacity(pending.len());
            let mut writings = Vec::with_capacity(pending.len());
            for p in pending {
                let result = match &mut recorded {
                    Ok((epoch, ahead)) => store.write_batch(epoch, &p.batch, ahead),
                    Err(e) => Err(e.clone()),
                };
                writings.push(p.writing);
                match (result, p.done) {
                    (Ok(()), Some(done)) => written.push(done),
                    (Err(e), Some(done)) => {
                        let _ = done.send(Turn::Done(Err(e)));
                    }
                    (_, None) => {}
                }
            }
            // The record is queued before the positions count as written: a commit that sees
            // them written also writes their record.
            if let Ok((_, ahead)) = recorded {
                self.wal.push(ahead);
            }
            drop(round);
            // The positions are written (whatever the outcome) before the group commit looks.
            drop(writings);
            store.inner.committer.enqueue(written);
        }
    }

    /// The next position to hand out.
    pub(crate) fn next(&self) -> u64 {
        self.lock().next
    }

    /// Called by the group commit before it flushes: every position below the value returned
    /// is written, so it will be durable once the flush succeeds.
    pub(crate) fn written_end(&self) -> u64 {
        let state = self.lock();
        if state.writing.is_empty() {
            state.next
        } else {
            state.writing_first
        }
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

/// The entry of an append: thing key ‖ first seq ‖ count (self-delimiting: the thing key
/// starts with its length).
pub(crate) fn entry_for(
    thing: &str,
    first_seq: u64,
    count: usize,
) -> Result<Vec<u8>, StorageError> {
    let key = thing_key(thing)?;
    let mut value = Vec::with_capacity(key.len() + 12);
    value.extend_from_slice(&key);
    value.extend_from_slice(&first_seq.to_be_bytes());
    value.extend_from_slice(&(count as u32).to_be_bytes());
    Ok(value)
}

fn corrupt(reason: &str) -> StorageError {
    StorageError::Corrupt {
        thing: String::new(),
        seq: 0,
        reason: format!("change feed: {reason}"),
    }
}

/// The entries of one block.
fn decode_block(key: &[u8], value: &[u8]) -> Result<Vec<FeedEntry>, StorageError> {
    let first: [u8; 8] = key.try_into().map_err(|_| corrupt("malformed key"))?;
    let first = u64::from_be_bytes(first);
    let count: [u8; 4] = value
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("truncated block"))?;
    let count = u32::from_be_bytes(count) as usize;
    let mut rest = &value[4..];
    // An entry takes at least 14 bytes: a damaged count must not ask for a huge allocation.
    let mut entries = Vec::with_capacity(count.min(rest.len() / 14));
    for i in 0..count {
        let len = *rest.first().ok_or_else(|| corrupt("truncated entry"))? as usize;
        let name = rest
            .get(1..1 + len)
            .ok_or_else(|| corrupt("truncated thing name"))?;
        let tail = rest
            .get(1 + len..1 + len + 12)
            .ok_or_else(|| corrupt("truncated entry"))?;
        let first_seq = u64::from_be_bytes(tail[..8].try_into().map_err(|_| corrupt("seq"))?);
        let n = u32::from_be_bytes(tail[8..12].try_into().map_err(|_| corrupt("count"))?);
        entries.push(FeedEntry {
            position: first
                .checked_add(i as u64)
                .ok_or_else(|| corrupt("position overflow"))?,
            thing: String::from_utf8(name.to_vec()).map_err(|_| corrupt("thing name not UTF-8"))?,
            first_seq,
            count: n,
        });
        rest = &rest[1 + len + 12..];
    }
    Ok(entries)
}

/// The first position of a block key.
fn block_first(key: &[u8]) -> Result<u64, StorageError> {
    let first: [u8; 8] = key.try_into().map_err(|_| corrupt("malformed key"))?;
    Ok(u64::from_be_bytes(first))
}

impl Store {
    /// Feed entries with positions after `after` and below the durable end, in order, at most
    /// `limit`.
    pub fn read_feed(&self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, StorageError> {
        let end = self.feed_durable_end();
        let start = after.saturating_add(1);
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let epochs = self.inner.epochs.all();
        let mut out = Vec::new();
        for (i, epoch) in epochs.iter().enumerate() {
            // Positions of epoch i are below where epoch i + 1 starts.
            if epochs
                .get(i + 1)
                .is_some_and(|next| next.first_position() <= start)
            {
                continue;
            }
            // An epoch starting at or after the end holds nothing readable yet.
            if epoch.first_position() >= end {
                continue;
            }
            let done = epoch
                .with(|trees| self.read_feed_blocks(&trees.feed, start, end, limit, &mut out))?;
            if done {
                break;
            }
        }
        Ok(out)
    }

    /// Reads one epoch's entries in `start..end` into `out`; true once it holds `limit`.
    fn read_feed_blocks(
        &self,
        feed: &sled::Tree,
        start: u64,
        end: u64,
        limit: usize,
        out: &mut Vec<FeedEntry>,
    ) -> Result<bool, StorageError> {
        // The block holding `start` begins at or before it.
        // (A malformed key there: scan from the first block; the loop below skips it.)
        let from = match feed.range(..=start.to_be_bytes()).next_back() {
            Some(item) => block_first(&item?.0).unwrap_or(0),
            None => 0,
        };
        for item in feed.range(from.to_be_bytes()..end.to_be_bytes()) {
            let (key, value) = item?;
            let block = match decode_block(&key, &value) {
                Ok(block) => block,
                Err(e) => {
                    // Its positions cannot name their Things: skipping them is all a reader can
                    // do (the events themselves are in their logs); not skipping would stop
                    // every consumer here for good.
                    self.inner
                        .feed_clock
                        .damaged_blocks
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(key = ?key.as_ref(), error = %e, "a change-feed block is damaged; its entries are skipped");
                    continue;
                }
            };
            for entry in block {
                if entry.position >= start && entry.position < end {
                    out.push(entry);
                    if out.len() == limit {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Feed blocks found damaged (and skipped) by `read_feed` since the store opened.
    pub fn feed_damaged_blocks(&self) -> u64 {
        self.inner
            .feed_clock
            .damaged_blocks
            .load(std::sync::atomic::Ordering::Relaxed)
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
        self.inner.feed_clock.next()
    }

    /// A consumer's cursor: every position up to it has been handled (0 = none yet).
    pub fn cursor(&self, consumer: &str) -> Result<u64, StorageError> {
        Ok(self.cursor_stored(consumer)?.unwrap_or(0))
    }

    /// A consumer's cursor as stored: `None` when it was never set (a stored 0 is a cursor
    /// before the first position, which is not the same for a consumer that starts at the end).
    pub fn cursor_stored(&self, consumer: &str) -> Result<Option<u64>, StorageError> {
        Ok(self
            .inner
            .cursors
            .get(consumer.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    /// Moves a consumer's cursor (durable with the next group commit; call it only once the
    /// work up to `position` is done).
    pub fn set_cursor(&self, consumer: &str, position: u64) -> Result<(), StorageError> {
        self.inner
            .cursors
            .insert(consumer.as_bytes(), &position.to_be_bytes())?;
        Ok(())
    }

    /// Forgets a consumer's cursor (the consumer is gone: it no longer holds the feed).
    pub fn remove_cursor(&self, consumer: &str) -> Result<(), StorageError> {
        self.inner.cursors.remove(consumer.as_bytes())?;
        Ok(())
    }

    /// Removes feed blocks whose every entry is at or below every consumer's cursor, at most
    /// `limit` blocks, always keeping the last block. Returns how many went. Only the current
    /// epoch is trimmed: a sealed epoch is never written again (its blocks stay, about 20
    /// bytes per append; its events are kept anyway).
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
        // A block can go when the next block starts at or below slowest + 1 (all its entries
        // are handled); the last block always stays.
        self.inner
            .epochs
            .current()
            .with(|trees| trim_blocks(&trees.feed, slowest, limit))
    }

    /// Entries in the feed now (walks it: O(n); tests and `check`).
    pub fn feed_len(&self) -> Result<usize, StorageError> {
        let mut n = 0;
        for epoch in self.inner.epochs.all() {
            epoch.with(|trees| {
                for item in trees.feed.iter() {
                    let (key, value) = item?;
                    n += decode_block(&key, &value)?.len();
                }
                Ok(())
            })?;
        }
        Ok(n)
    }
}

fn trim_blocks(feed: &sled::Tree, slowest: u64, limit: usize) -> Result<usize, StorageError> {
    let mut removable = Vec::new();
    let mut previous: Option<sled::IVec> = None;
    for key in feed.iter().keys() {
        let key = key?;
        let next_first = block_first(&key)?;
        match previous.take() {
            Some(prev) if next_first <= slowest.saturating_add(1) => removable.push(prev),
            Some(_) => break,
            None => {}
        }
        if removable.len() >= limit {
            break;
        }
        previous = Some(key);
    }
    for key in &removable {
        feed.remove(key)?;
    }
    Ok(removable.len())
}

/// Where an open resumes: after the feed's last entry (1 for an empty feed) and after every
/// consumer's cursor, so a position a consumer has passed is never handed out again (the last
/// positions may have no entry: an append that failed or was cancelled before recording it).
/// A damaged last block is skipped past by the count it claims, bounded by its size.
pub(crate) fn next_position_after(
    epochs: &[Arc<Epoch>],
    cursors: &sled::Tree,
) -> Result<u64, StorageError> {
    let mut last = None;
    for epoch in epochs.iter().rev() {
        last = epoch.with(|trees| Ok(trees.feed.last()?))?;
        if last.is_some() {
            break;
        }
    }
    let mut next = match last {
        Some((key, value)) => {
            let first = block_first(&key)?;
            let count = match decode_block(&key, &value) {
                Ok(entries) => entries.len() as u64,
                Err(e) => {
                    let claimed = value
                        .get(..4)
                        .and_then(|b| <[u8; 4]>::try_from(b).ok())
                        .map_or(0, u32::from_be_bytes);
                    tracing::error!(first, error = %e, "the last change-feed block is damaged; positions resume after what it claims");
                    u64::from(claimed).min(value.len() as u64)
                }
            };
            first.saturating_add(count.max(1))
        }
        None => 1,
    };
    for item in cursors.iter() {
        let (_, value) = item?;
        if let Ok(bytes) = <[u8; 8]>::try_from(value.as_ref()) {
            next = next.max(u64::from_be_bytes(bytes).saturating_add(1));
        }
    }
    Ok(next)
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

    /// An append dropped while it held the recording role (here: at its yield, by a `select!`
    /// that finished first) must not leave every later append waiting for a recorder.
    #[tokio::test]
    async fn an_append_cancelled_while_recording_does_not_stop_the_next_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        tokio::select! {
            biased;
            _ = store.append(batch("cancelled", 1, 1)) => panic!("finished in one poll"),
            () = std::future::ready(()) => {}
        }
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            store.append(batch("next", 1, 1)),
        )
        .await
        .expect("not stuck behind the cancelled append")
        .expect("append");
        assert!(store.feed_durable_end() > next);
    }

    /// A position a consumer has passed is never handed out again, even when the last
    /// positions have no entry; a damaged last block (a count of 4 billion) neither stops the
    /// open nor asks for a huge allocation.
    #[tokio::test]
    async fn an_open_resumes_after_every_cursor_and_past_a_damaged_last_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
            store.append(batch("a", 1, 1)).await.expect("append");
            store.set_cursor("x", 10).expect("cursor");
            store.sync().await.expect("sync");
        }
        let store = crate::reopen(dir.path());
        let position = store.append(batch("a", 2, 1)).await.expect("append");
        assert_eq!(position, 11, "after the cursor");
        store
            .inner
            .epochs
            .current()
            .with(|t| {
                Ok(t.feed
                    .insert(20u64.to_be_bytes(), &b"\xff\xff\xff\xffdamaged"[..])?)
            })
            .expect("damage");
        store.sync().await.expect("sync");
        drop(store);
        let store = crate::reopen(dir.path());
        assert!(store.read_feed(0, 100).is_ok());
        let position = store.append(batch("a", 3, 1)).await.expect("append");
        assert!(position > 20, "past the damaged block: {position}");
    }

    #[tokio::test]
    async fn a_damaged_block_is_skipped_and_counted_instead_of_stopping_every_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        let a = store.append(batch("a", 1, 1)).await.expect("a");
        let b = store.append(batch("b", 1, 1)).await.expect("b");
        let c = store.append(batch("c", 1, 1)).await.expect("c");
        store
            .inner
            .epochs
            .current()
            .with(|t| {
                Ok(t.feed
                    .insert(b.to_be_bytes(), &b"\x00\x00\x00\x05truncated"[..])?)
            })
            .expect("damage");
        let read: Vec<u64> = store
            .read_feed(0, 10)
            .expect("read")
            .iter()
            .map(|e| e.position)
            .collect();
        assert_eq!(read, [a, c]);
        assert_eq!(store.feed_damaged_blocks(), 1);
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
        assert_eq!(store.feed_len().expect("len"), 1, "the last block stays");
        drop(store);

        // Positions never restart.
        let store = crate::reopen(dir.path());
        let d = store.append(batch("b", 2, 1)).await.expect("d");
        assert!(d > c);
        assert_eq!(store.cursor("slow").expect("cursor"), c);
        assert_eq!(store.cursor("new").expect("cursor"), 0);
    }
}
