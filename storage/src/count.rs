//! The number of registered Things, exact, without a scan before the store serves.
//!
//! Counting the `things` index is O(n) (sled keeps no length: ~0.3 s per million keys on the
//! development machine), too slow for start-up. So a thread counts it after open while
//! registrations and deletions go on, and each change decides, under the same lock as the
//! scanner's steps, whether the scan has passed its key: a change behind the scan's cursor is
//! added to the count, one ahead of it will be seen (or not) by the scan itself. Once the scan
//! ends every change is added directly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Keys counted per step of the scan, under the lock that writers of the index take.
const SCAN_CHUNK_KEYS: usize = 256;

/// The count and how far the scan has come.
#[derive(Debug, Default)]
struct State {
    counted: u64,
    /// The last key the scan counted (None: none yet).
    cursor: Option<Vec<u8>>,
    done: bool,
}

/// Registered Things, counted from the index in the background and kept by its writers.
#[derive(Debug, Default)]
pub(crate) struct ThingCount {
    state: Mutex<State>,
    stop: AtomicBool,
}

impl ThingCount {
    /// Starts counting `things` on a thread of its own.
    pub(crate) fn start(things: sled::Tree) -> std::io::Result<Arc<ThingCount>> {
        let count = Arc::new(ThingCount::default());
        let scanner = count.clone();
        std::thread::Builder::new()
            .name("thinghub-thing-count".into())
            .spawn(move || scanner.scan(&things))?;
        Ok(count)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn scan(&self, things: &sled::Tree) {
        loop {
            if self.stop.load(Ordering::Relaxed) || !self.step(things, SCAN_CHUNK_KEYS) {
                return;
            }
        }
    }

    /// Counts up to `chunk` more keys from a fresh read past the cursor (an iterator made
    /// earlier would not see keys inserted since); false once the scan has ended (or failed).
    fn step(&self, things: &sled::Tree, chunk: usize) -> bool {
        let mut state = self.lock();
        let keys = match &state.cursor {
            Some(cursor) => things.range::<&[u8], _>((
                std::ops::Bound::Excluded(cursor.as_slice()),
                std::ops::Bound::Unbounded,
            )),
            None => things.iter(),
        };
        let mut read = 0;
        for key in keys.keys().take(chunk) {
            match key {
                Ok(key) => {
                    state.counted += 1;
                    state.cursor = Some(key.to_vec());
                    read += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot count the registered Things");
                    return false;
                }
            }
        }
        if read < chunk {
            state.done = true;
            tracing::debug!(things = state.counted, "registered Things counted");
            return false;
        }
        true
    }

    /// Applies `change` (an insert or removal of `key` in the index that returns whether the
    /// key was new, resp. present) and counts it unless the scan will.
    pub(crate) fn change<E>(
        &self,
        key: &[u8],
        delta: i64,
        change: impl FnOnce() -> Result<bool, E>,
    ) -> Result<(), E> {
        let mut state = self.lock();
        let changed = change()?;
        let behind_scan = state.done || state.cursor.as_deref().is_some_and(|c| key <= c);
        if changed && behind_scan {
            state.counted = state.counted.saturating_add_signed(delta);
        }
        Ok(())
    }

    /// The count, once the scan has ended.
    pub(crate) fn get(&self) -> Option<u64> {
        let state = self.lock();
        state.done.then_some(state.counted)
    }

    /// Ends the scan early (the store is closing).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever registrations and deletions happen while the scan runs, and wherever they
        /// fall relative to its cursor, the count it ends with is the number of keys.
        #[test]
        fn the_count_is_exact_whatever_changes_race_the_scan(
            initial in proptest::collection::btree_set(0u8..40, 0..30),
            ops in proptest::collection::vec((any::<bool>(), 0u8..40, 0usize..3), 0..80),
            chunk in 1usize..4,
        ) {
            let db = sled::Config::new().temporary(true).open().expect("db");
            let things = db.open_tree("things").expect("tree");
            for key in &initial {
                things.insert([*key], &[]).expect("insert");
            }
            let count = ThingCount::default();
            let mut scanning = true;
            for (put, key, steps) in ops {
                if put {
                    count
                        .change(&[key], 1, || things.insert([key], &[]).map(|p| p.is_none()))
                        .expect("put");
                } else {
                    count
                        .change(&[key], -1, || things.remove([key]).map(|p| p.is_some()))
                        .expect("remove");
                }
                for _ in 0..steps {
                    scanning = scanning && count.step(&things, chunk);
                }
            }
            while scanning {
                scanning = count.step(&things, chunk);
            }
            prop_assert_eq!(count.get(), Some(things.len() as u64));
        }
    }
}
