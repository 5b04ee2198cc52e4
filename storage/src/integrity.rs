//! What an operator needs when the data directory is damaged: a named error (which file, what
//! is wrong with it, what to do) instead of sled's bare "Read corrupted data at file offset
//! None", and full walks of every tree for `thinghub check`.
//!
//! A sled 0.34 directory holds `conf` (a few text settings and a CRC-32), `db` (the log: every
//! tree page, checksummed per record), `snap.*` (a cache of the page table, rebuilt from `db`
//! when absent) and `blobs/` (large values, one checksummed file each). sled has no read-only
//! open: opening replays and rewrites. So `check` copies the directory first (holding the
//! database lock, so a server cannot start meanwhile) and opens the copy.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use crate::{Envelope, StorageError, Store};

/// What to tell an operator whose snapshot file is damaged.
const ADVICE_SNAPSHOT: &str = "sled's snapshot is only a cache of its log: with the server \
    stopped, move every snap.* file out of that database's directory (renaming inside it is not \
    enough: sled reads every file whose name starts with snap.) and start again; sled rebuilds \
    the snapshot from its log (slow for a large log). Then run `thinghub check`.";
const ADVICE_CONF: &str = "conf only holds sled's settings: with the server stopped, move it out \
    of that database's directory and start again; sled writes it anew with the same defaults.";
const ADVICE_RESTORE: &str = "the log itself is damaged: restore the data directory from a \
    backup (the whole data directory, the log epochs under log/ and the write-ahead segments \
    under wal/ included, copied together with \
    the server stopped). On a copy you \
    may try moving snap.* aside and running `thinghub check` on it to see what is still \
    readable.";

/// Reads a little-endian u32 (sled's CRC layout).
fn le_u32(bytes: &[u8]) -> u32 {
    let mut arr = [0u8; 4];
    arr.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(arr)
}

/// The snapshot file sled would read: the greatest name starting with `snap.`, except files
/// being moved (sled's own rule).
fn snapshot_candidate(data_dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snap.") && !n.ends_with(".in___motion"))
        })
        .collect();
    candidates.sort();
    candidates.pop()
}

/// Checks `conf` the way sled reads it; `Some(problem)` if it is damaged.
fn check_conf(data_dir: &Path) -> Option<String> {
    let bytes = std::fs::read(data_dir.join("conf")).ok()?;
    if bytes.len() <= 8 {
        return None; // sled treats it as absent and writes it anew
    }
    let (text, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(text) != le_u32(crc) {
        return Some("its checksum does not match its contents".into());
    }
    let text = match std::str::from_utf8(text) {
        Ok(text) => text,
        Err(_) => return Some("it is not text".into()),
    };
    for key in ["segment_size", "use_compression", "version"] {
        if !text
            .lines()
            .any(|line| line.starts_with(&format!("{key}: ")))
        {
            return Some(format!("its '{key}' setting is missing"));
        }
    }
    None
}

/// Checks the snapshot file sled would read; `Some((file, problem))` if it is damaged.
fn check_snapshot(data_dir: &Path) -> Option<(PathBuf, String)> {
    let path = snapshot_candidate(data_dir)?;
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => return Some((path, format!("it cannot be read: {e}"))),
    };
    if bytes.len() <= 12 {
        return Some((path, format!("it is truncated ({} bytes)", bytes.len())));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 12);
    if crc32fast::hash(body) != le_u32(&tail[8..]) {
        return Some((path, "its checksum does not match its contents".into()));
    }
    None
}

/// Names what is damaged, after sled refused to open `data_dir` with `error` (or panicked,
/// `error` = `None`). Returns `None` when the error is not about damaged data (I/O, locks).
pub(crate) fn diagnose(data_dir: &Path, error: Option<&sled::Error>) -> Option<StorageError> {
    let damaged = |file: PathBuf, problem: String, advice: &str| StorageError::Damaged {
        dir: data_dir.to_owned(),
        file,
        problem,
        advice: advice.to_owned(),
    };
    match error {
        Some(sled::Error::Io(_)) | Some(sled::Error::CollectionNotFound(_)) => None,
        Some(sled::Error::Corruption {
            at: Some(sled::DiskPtr::Inline(offset)),
            ..
        }) => Some(damaged(
            data_dir.join("db"),
            format!("the record at byte offset {offset} fails its checksum"),
            ADVICE_RESTORE,
        )),
        Some(sled::Error::Corruption {
            at: Some(sled::DiskPtr::Blob(_, blob)),
            ..
        }) => Some(damaged(
            data_dir.join("blobs").join(blob.to_string()),
            "this large-value file fails its checksum".into(),
            ADVICE_RESTORE,
        )),
        other => {
            // sled does not say which file: check the ones it reads first, as it reads them.
            if let Some(problem) = check_conf(data_dir) {
                return Some(damaged(data_dir.join("conf"), problem, ADVICE_CONF));
            }
            if let Some(sled::Error::Unsupported(message)) = other {
                return Some(damaged(
                    data_dir.join("conf"),
                    format!("sled refuses its settings: {message}"),
                    ADVICE_CONF,
                ));
            }
            if let Some((file, problem)) = check_snapshot(data_dir) {
                return Some(damaged(file, problem, ADVICE_SNAPSHOT));
            }
            let what = match other {
                Some(e) => format!("sled reports: {e}"),
                None => "sled failed while reading it".into(),
            };
            Some(damaged(
                data_dir.join("db"),
                format!("the log does not match its snapshot ({what})"),
                ADVICE_RESTORE,
            ))
        }
    }
}

/// One event record as `check` sees it: its key decoded as far as it goes, its envelope or why
/// it does not decode.
#[derive(Debug, Clone)]
pub struct WalkedEvent {
    /// The Thing (or why the key does not name one).
    pub thing: Result<String, String>,
    /// Its sequence number (0 if the key is malformed).
    pub seq: u64,
    /// The stored envelope, or the decoder's complaint.
    pub envelope: Result<Envelope, String>,
}

/// Splits an events key into (thing name, seq).
fn split_event_key(key: &[u8]) -> Result<(String, u64), String> {
    let len = *key.first().ok_or("empty key")? as usize;
    let name = key
        .get(1..1 + len)
        .ok_or("key shorter than its name length")?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| "thing name not UTF-8")?;
    let seq: [u8; 8] = key
        .get(1 + len..)
        .and_then(|tail| tail.try_into().ok())
        .ok_or("key does not end with an 8-byte sequence number")?;
    Ok((name, u64::from_be_bytes(seq)))
}

impl Store {
    /// Visits every event record of every Thing in key order (one Thing's events together, in
    /// sequence order). Stops when `visit` breaks; a sled read error ends the walk with it.
    pub fn walk_events(
        &self,
        mut visit: impl FnMut(WalkedEvent) -> ControlFlow<()>,
    ) -> Result<(), StorageError> {
        // One Thing's events may span epochs: merge the epochs' walks by key (keys are unique
        // across epochs). Every epoch stays held for the walk: `check` runs with the server
        // stopped, where nothing seals an epoch meanwhile.
        let epochs = self.inner.epochs.all();
        let held = epochs
            .iter()
            .map(|epoch| epoch.read())
            .collect::<Result<Vec<_>, _>>()?;
        let mut walks: Vec<_> = held
            .iter()
            .zip(&epochs)
            .map(|(trees, epoch)| {
                // Its database's events and its memory table's (a run written meanwhile is
                // left out of the database's, as a read does).
                let table = epoch.memtable.range(&[], None, false, usize::MAX);
                let in_table: crate::packed::Records<'_> =
                    Box::new(table.records.into_iter().map(Ok));
                crate::packed::merged(vec![
                    trees.trees().all_records(&table.frozen_runs),
                    in_table,
                ])
                .peekable()
            })
            .collect();
        loop {
            let mut next: Option<(usize, sled::IVec)> = None;
            for (i, walk) in walks.iter_mut().enumerate() {
                match walk.peek() {
                    None => {}
                    Some(Err(_)) => {
                        next = Some((i, sled::IVec::default()));
                        break;
                    }
                    Some(Ok((key, _))) if next.as_ref().is_none_or(|(_, least)| key < least) => {
                        next = Some((i, key.clone()));
                    }
                    Some(Ok(_)) => {}
                }
            }
            let Some((i, _)) = next else {
                break;
            };
            let Some(item) = walks[i].next() else {
                break;
            };
            let (key, value) = item?;
            let (thing, seq) = match split_event_key(&key) {
                Ok((thing, seq)) => (Ok(thing), seq),
                Err(why) => (Err(format!("{why} ({} bytes)", key.len())), 0),
            };
            let envelope = Envelope::from_bytes(&value).map_err(|e| e.0);
            if visit(WalkedEvent {
                thing,
                seq,
                envelope,
            })
            .is_break()
            {
                break;
            }
        }
        Ok(())
    }

    /// The names of the Things that have a snapshot (or why a key does not name one).
    pub fn snapshot_names(&self) -> Result<Vec<Result<String, String>>, StorageError> {
        let mut names = Vec::new();
        for item in self.inner.snapshots.iter() {
            let (key, _) = item?;
            let len = key.first().copied().unwrap_or(0) as usize;
            names.push(
                key.get(1..1 + len)
                    .filter(|name| 1 + name.len() == key.len())
                    .and_then(|name| String::from_utf8(name.to_vec()).ok())
                    .ok_or_else(|| format!("malformed snapshot key of {} bytes", key.len())),
            );
        }
        Ok(names)
    }

    /// Every deadline entry (or why its key is malformed), earliest first.
    pub fn all_deadlines(&self) -> Result<Vec<Result<crate::DeadlineEntry, String>>, StorageError> {
        let mut entries = Vec::new();
        for item in self.inner.deadlines.iter() {
            let (key, _) = item?;
            entries.push(crate::index::parse_deadline_key(&key).map_err(|e| e.to_string()));
        }
        Ok(entries)
    }

    /// The names of every tree in the database (sled's own default tree included).
    pub fn tree_names(&self) -> Vec<String> {
        self.inner
            .db
            .tree_names()
            .iter()
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect()
    }
}

/// Copies the database in `data_dir` into `scratch` (which must not exist or be empty) so it can
/// be opened without touching the original. Holds the database lock while copying: refused with
/// [`StorageError::Locked`] while a server runs on `data_dir`.
pub fn copy_for_check(data_dir: &Path, scratch: &Path) -> Result<(), StorageError> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        StorageError::Db(format!("{what} {}: {e}", path.display()))
    };
    let db = data_dir.join("db");
    if !db.exists() {
        return Err(StorageError::Db(format!(
            "{} holds no thinghub database (no db file)",
            data_dir.display()
        )));
    }
    let lock = std::fs::File::open(&db).map_err(|e| io("open", &db, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(StorageError::Locked(data_dir.to_owned()))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", &db, e)),
    }
    std::fs::create_dir_all(scratch).map_err(|e| io("create", scratch, e))?;
    copy_tree(data_dir, scratch).map_err(|e| io("copy", data_dir, e))?;
    drop(lock);
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreConfig;

    fn filled(dir: &Path) {
        let store = Store::open(&StoreConfig::new(dir)).expect("open");
        store
            .put_snapshot(
                "t",
                &crate::Snapshot {
                    seq: 1,
                    state: Envelope::new("S", 1, 0, &1u8).expect("envelope"),
                },
            )
            .expect("snapshot");
        drop(store);
        // A second open writes sled's snapshot file.
        drop(crate::reopen(dir));
    }

    fn flip_last_byte(path: &Path) {
        let mut bytes = std::fs::read(path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(path, bytes).expect("write");
    }

    #[test]
    fn a_damaged_snapshot_file_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        filled(dir.path());
        let snap = snapshot_candidate(dir.path()).expect("sled wrote a snapshot");
        flip_last_byte(&snap);
        let error = Store::open(&StoreConfig::new(dir.path()))
            .err()
            .expect("refused");
        let text = error.to_string();
        assert!(
            matches!(&error, StorageError::Damaged { file, .. } if *file == snap),
            "{text}"
        );
        assert!(text.contains("move every snap.* file"), "{text}");
        // Following the advice works: sled rebuilds it from the log.
        let aside = dir.path().parent().expect("parent").join(format!(
            "{}-snap-aside",
            dir.path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("x")
        ));
        std::fs::rename(&snap, &aside).expect("move aside");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("opens again");
        assert!(store.get_snapshot("t").expect("read").is_some());
        let _ = std::fs::remove_file(aside);
    }

    #[test]
    fn a_damaged_conf_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        filled(dir.path());
        std::fs::write(dir.path().join("conf"), b"segment_size: banana\nxxxxxxxx").expect("write");
        let error = Store::open(&StoreConfig::new(dir.path()))
            .err()
            .expect("refused");
        assert!(
            matches!(&error, StorageError::Damaged { file, .. } if file.ends_with("conf")),
            "{error}"
        );
    }

    #[test]
    fn a_copy_is_refused_while_the_database_is_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let scratch = tempfile::tempdir().expect("scratch");
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        assert!(matches!(
            copy_for_check(dir.path(), &scratch.path().join("copy")),
            Err(StorageError::Locked(_))
        ));
        drop(store);
        copy_for_check(dir.path(), &scratch.path().join("copy")).expect("copied once closed");
        Store::open(&StoreConfig::new(scratch.path().join("copy"))).expect("the copy opens");
    }

    #[test]
    fn event_keys_split_into_thing_and_seq() {
        let mut key = vec![3];
        key.extend_from_slice(b"abc");
        key.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(split_event_key(&key), Ok(("abc".into(), 7)));
        assert!(split_event_key(&key[..6]).is_err());
        assert!(split_event_key(&[]).is_err());
    }
}
