//! `thinghub check --data-dir D`: is everything on disk readable, and does every Thing's log
//! rebuild the state its snapshot and indexes claim? (The design's `replay --verify`.)
//!
//! sled cannot open a database read-only (opening replays and rewrites its files), so by
//! default the directory is copied to a scratch directory, holding the database lock so that no
//! server starts meanwhile, and the copy is checked; `--in-place` skips the copy (sled then
//! does to the original what a server start would do).
//!
//! What is checked, in one pass over the log:
//! - every stored record decodes (events, snapshots, registry index, deadline index, API keys,
//!   MQTT users, ACL rules), and sled can read every page;
//! - each Thing's sequence numbers run 1, 2, 3, ... without a gap;
//! - replaying the log from its start gives the state the snapshot holds at the snapshot's seq;
//! - the registry, client id and deadline indexes agree with the replayed state.
//!
//! Every problem is printed with the Thing (or record) it concerns; the exit status says whether
//! there were any.

use std::collections::HashSet;
use std::io::Write;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

use thinghub_actors::codec::{self, ThingIndexRecord};
use thinghub_actors::thing::{self, ThingState};
use thinghub_storage::integrity::{copy_for_check, WalkedEvent};
use thinghub_storage::{RecordedEvent, StorageError, Store, StoreConfig};

/// How to run a check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The data directory to check.
    pub data_dir: PathBuf,
    /// Where the copy goes (a fresh directory is made inside it).
    pub scratch_dir: PathBuf,
    /// Open the data directory itself instead of a copy.
    pub in_place: bool,
}

/// Why a check could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The directory cannot be copied or opened (a running server, a damaged file, ...).
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// Writing the report failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Things with a log.
    pub things: u64,
    /// Event records read.
    pub events: u64,
    /// Snapshots compared with their replayed log.
    pub snapshots: u64,
    /// Registry index records, deadline entries and `kv` records read.
    pub records: u64,
    /// Problems, each `(what, detail)`.
    pub problems: Vec<(String, String)>,
}

/// Removes the scratch copy when the check ends, whatever way.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the check and prints each problem, then a summary, to `out`.
pub fn run(options: &CheckOptions, out: &mut impl Write) -> Result<CheckReport, CheckError> {
    let (_scratch, dir) = if options.in_place {
        (None, options.data_dir.clone())
    } else {
        let copy = options
            .scratch_dir
            .join(format!("thinghub-check-{}", std::process::id()));
        let scratch = Scratch(copy.clone());
        copy_for_check(&options.data_dir, &copy)?;
        (Some(scratch), copy)
    };
    let store = match Store::open(&StoreConfig::new(&dir)) {
        Ok(store) => store,
        // Name the original file, not the copy.
        Err(StorageError::Damaged {
            file,
            problem,
            advice,
            ..
        }) => {
            let file = file
                .strip_prefix(&dir)
                .map(|f| options.data_dir.join(f))
                .unwrap_or(file);
            return Err(CheckError::Storage(StorageError::Damaged {
                dir: options.data_dir.clone(),
                file,
                problem,
                advice,
            }));
        }
        Err(e) => return Err(e.into()),
    };
    let mut report = CheckReport::default();
    check_store(&store, &mut report);
    for (what, detail) in &report.problems {
        writeln!(out, "PROBLEM {what}: {detail}")?;
    }
    writeln!(
        out,
        "checked {} things ({} events, {} snapshots) and {} other records in {}: {}",
        report.things,
        report.events,
        report.snapshots,
        report.records,
        options.data_dir.display(),
        match report.problems.len() {
            0 => "no problems".to_owned(),
            1 => "1 problem".to_owned(),
            n => format!("{n} problems"),
        }
    )?;
    Ok(report)
}

/// The Thing being replayed during the walk over the log.
struct Replay {
    name: String,
    state: ThingState,
    /// The snapshot, decoded (or why not), and its seq.
    snapshot: Option<(u64, Result<ThingState, String>)>,
    /// Once a record is unreadable, the rest of this Thing's log is only counted.
    broken: bool,
}

fn problem(report: &mut CheckReport, what: impl Into<String>, detail: impl Into<String>) {
    report.problems.push((what.into(), detail.into()));
}

fn thing_subject(name: &str) -> String {
    format!("thing '{name}'")
}

fn check_store(store: &Store, report: &mut CheckReport) {
    const KNOWN_TREES: [&str; 13] = [
        "__sled__default",
        "feed",
        "cursors",
        "sessions",
        "retained",
        "events",
        "snapshots",
        "things",
        "client_ids",
        "deadlines",
        "alarms",
        "online",
        "kv",
    ];
    for tree in store.tree_names() {
        if !KNOWN_TREES.contains(&tree.as_str()) {
            problem(report, "database", format!("unknown tree '{tree}'"));
        }
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut current: Option<Replay> = None;
    let walked = store.walk_events(|event| {
        step(store, report, &mut current, &mut seen, event);
        ControlFlow::Continue(())
    });
    if let Some(replay) = current.take() {
        finish(store, report, replay);
    }
    if let Err(e) = walked {
        problem(
            report,
            "events",
            format!("the log cannot be read to its end: {e}"),
        );
    }
    check_snapshots(store, report, &seen);
    check_registry_index(store, report, &seen);
    check_deadline_index(store, report, &seen);
    check_alarm_index(store, report, &seen);
    check_online_index(store, report, &seen);
    check_kv(store, report);
}

fn step(
    store: &Store,
    report: &mut CheckReport,
    current: &mut Option<Replay>,
    seen: &mut HashSet<String>,
    event: WalkedEvent,
) {
    report.events += 1;
    let name = match event.thing {
        Ok(name) => name,
        Err(why) => {
            problem(
                report,
                "events",
                format!("record with a malformed key: {why}"),
            );
            return;
        }
    };
    if current.as_ref().map(|r| r.name.as_str()) != Some(name.as_str()) {
        if let Some(done) = current.take() {
            finish(store, report, done);
        }
        report.things += 1;
        seen.insert(name.clone());
        let snapshot = match store.get_snapshot(&name) {
            Ok(Some(snapshot)) => Some((
                snapshot.seq,
                codec::decode_state(&name, &snapshot.state)
                    .map(|mut state| {
                        state.last_seq = snapshot.seq;
                        state
                    })
                    .map_err(|e| e.to_string()),
            )),
            Ok(None) => None,
            Err(e) => Some((0, Err(e.to_string()))),
        };
        *current = Some(Replay {
            state: ThingState::new(name.clone()),
            name,
            snapshot,
            broken: false,
        });
    }
    let Some(replay) = current.as_mut() else {
        return;
    };
    if replay.broken {
        return;
    }
    let subject = thing_subject(&replay.name);
    let expected = replay.state.last_seq + 1;
    if event.seq != expected {
        problem(
            report,
            &subject,
            format!(
                "seq {} follows seq {}: the log has a gap; replay stops here",
                event.seq, replay.state.last_seq
            ),
        );
        replay.broken = true;
        return;
    }
    let envelope = match event.envelope {
        Ok(envelope) => envelope,
        Err(why) => {
            problem(
                report,
                &subject,
                format!(
                    "seq {}: the record does not decode ({why}); replay stops here",
                    event.seq
                ),
            );
            replay.broken = true;
            return;
        }
    };
    let recorded = RecordedEvent {
        seq: event.seq,
        envelope,
    };
    let applied = codec::decode_event(&replay.name, &recorded)
        .map_err(|e| e.to_string())
        .and_then(|decoded| {
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                thing::apply(&mut replay.state, &decoded)
            }))
            .map_err(|_| "applying it panicked".to_owned())
        });
    if let Err(why) = applied {
        problem(
            report,
            &subject,
            format!("seq {}: {why}; replay stops here", event.seq),
        );
        replay.broken = true;
        return;
    }
    replay.state.last_seq = event.seq;
    if let Some((seq, snapshot)) = &replay.snapshot {
        if *seq == event.seq {
            report.snapshots += 1;
            match snapshot {
                Ok(snapshot) if *snapshot == replay.state => {}
                Ok(snapshot) => problem(
                    report,
                    &subject,
                    format!(
                        "the snapshot at seq {seq} differs from the replayed log in {}",
                        differing_parts(snapshot, &replay.state).join(", ")
                    ),
                ),
                Err(why) => problem(
                    report,
                    &subject,
                    format!("the snapshot at seq {seq} does not decode: {why}"),
                ),
            }
        }
    }
}

/// Which top-level parts of two states differ (for a readable report).
fn differing_parts(a: &ThingState, b: &ThingState) -> Vec<&'static str> {
    let mut parts = Vec::new();
    if a.registration != b.registration {
        parts.push("registration");
    }
    if a.shadow != b.shadow {
        parts.push("shadow");
    }
    if a.connection != b.connection {
        parts.push("connection status");
    }
    if a.last_event_at_ms != b.last_event_at_ms {
        parts.push("last event time");
    }
    if a.commands != b.commands {
        parts.push("commands");
    }
    if parts.is_empty() {
        parts.push("name or sequence number");
    }
    parts
}

/// After a Thing's last event: a snapshot past the log, and the indexes against the state.
fn finish(store: &Store, report: &mut CheckReport, replay: Replay) {
    let subject = thing_subject(&replay.name);
    if replay.broken {
        return;
    }
    if let Some((seq, _)) = &replay.snapshot {
        if *seq > replay.state.last_seq {
            problem(
                report,
                &subject,
                format!(
                    "the snapshot is at seq {seq}, past the end of the log (seq {})",
                    replay.state.last_seq
                ),
            );
        }
    }
    let wanted = replay
        .state
        .registration
        .as_ref()
        .map(|r| ThingIndexRecord {
            mqtt_client_id: r.mqtt_client_id.clone(),
            thing_type: r.thing_type.clone(),
            created_at_ms: r.created_at_ms,
        });
    let present = store
        .get_thing(&replay.name)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            bytes
                .map(|b| codec::decode_index_record(&replay.name, &b).map_err(|e| e.to_string()))
                .transpose()
        });
    match (wanted, present) {
        (_, Err(why)) => problem(report, &subject, format!("registry index record: {why}")),
        (Some(wanted), Ok(Some(present))) if wanted == present => {}
        (None, Ok(None)) => {}
        (Some(_), Ok(None)) => problem(
            report,
            &subject,
            "registered in its log but missing from the registry index (repaired when the Thing is next activated)",
        ),
        (None, Ok(Some(_))) => problem(
            report,
            &subject,
            "deleted in its log but still in the registry index (repaired when the Thing is next activated)",
        ),
        (Some(_), Ok(Some(_))) => problem(
            report,
            &subject,
            "the registry index record differs from the log (repaired when the Thing is next activated)",
        ),
    }
    if let Some(registration) = &replay.state.registration {
        let client_id = &registration.mqtt_client_id;
        match store.client_id_owner(client_id) {
            Ok(Some(owner)) if owner == replay.name => {}
            Ok(Some(owner)) => problem(
                report,
                &subject,
                format!("its client id '{client_id}' is indexed as Thing '{owner}''s"),
            ),
            Ok(None) => problem(
                report,
                &subject,
                format!(
                    "its client id '{client_id}' is missing from the client id index (repaired when the Thing is next activated)"
                ),
            ),
            Err(e) => problem(report, &subject, format!("client id index: {e}")),
        }
    }
    let connection = &replay.state.connection;
    let wanted = (replay.state.registration.is_some() && connection.online).then(|| {
        (
            connection.client_id.clone().unwrap_or_default(),
            connection.connection_id,
        )
    });
    match store.online_entry(&replay.name) {
        Ok(present) if present == wanted => {}
        Ok(_) => problem(
            report,
            &subject,
            "the online index disagrees with its log's connection (repaired when the Thing is next activated)",
        ),
        Err(e) => problem(report, &subject, format!("online index: {e}")),
    }
    if let Some(at_ms) = replay.state.next_deadline_ms() {
        match store.has_deadline(&replay.name, at_ms) {
            Ok(true) => {}
            Ok(false) => problem(
                report,
                &subject,
                format!(
                    "a pending deadline ({at_ms} ms: a command, job or offline watch) is missing from the deadline index: it will not fire until the Thing is activated"
                ),
            ),
            Err(e) => problem(report, &subject, format!("deadline index: {e}")),
        }
    }
}

fn check_snapshots(store: &Store, report: &mut CheckReport, seen: &HashSet<String>) {
    match store.snapshot_names() {
        Ok(names) => {
            for name in names {
                match name {
                    Ok(name) if seen.contains(&name) => {}
                    Ok(name) => problem(report, thing_subject(&name), "a snapshot but no log"),
                    Err(why) => problem(report, "snapshots", why),
                }
            }
        }
        Err(e) => problem(report, "snapshots", format!("cannot be read: {e}")),
    }
}

/// Registry index records read per step.
const INDEX_PAGE_RECORDS: usize = 1000;

fn check_registry_index(store: &Store, report: &mut CheckReport, seen: &HashSet<String>) {
    let mut after: Option<String> = None;
    loop {
        let page = match store.list_things(after.as_deref(), INDEX_PAGE_RECORDS) {
            Ok(page) => page,
            Err(e) => {
                problem(report, "registry index", format!("cannot be read: {e}"));
                return;
            }
        };
        let Some((last, _)) = page.last() else {
            return;
        };
        after = Some(last.clone());
        for (name, bytes) in &page {
            report.records += 1;
            if let Err(e) = codec::decode_index_record(name, bytes) {
                problem(
                    report,
                    thing_subject(name),
                    format!("registry index record: {e}"),
                );
            } else if !seen.contains(name) {
                problem(
                    report,
                    thing_subject(name),
                    "in the registry index but has no log",
                );
            }
        }
        if page.len() < INDEX_PAGE_RECORDS {
            return;
        }
    }
}

fn check_alarm_index(store: &Store, report: &mut CheckReport, seen: &HashSet<String>) {
    let mut after: Option<String> = None;
    loop {
        let (page, next) = match store.scan_alarms(
            None,
            after.as_deref(),
            INDEX_PAGE_RECORDS,
            INDEX_PAGE_RECORDS,
            |_| true,
        ) {
            Ok(page) => page,
            Err(e) => {
                problem(report, "alarm index", format!("cannot be read: {e}"));
                return;
            }
        };
        for (key, bytes) in &page {
            report.records += 1;
            let thing = key.split('/').next().unwrap_or_default();
            if let Err(e) = thinghub_actors::alarms::decode_alarm_record(bytes) {
                problem(report, thing_subject(thing), format!("alarm record: {e}"));
            } else if !seen.contains(thing) {
                problem(report, thing_subject(thing), "an alarm but no log");
            }
        }
        match next {
            Some(next) => after = Some(next),
            None => return,
        }
    }
}

fn check_online_index(store: &Store, report: &mut CheckReport, seen: &HashSet<String>) {
    let mut after: Option<String> = None;
    loop {
        let page = match store.online_things(after.as_deref(), INDEX_PAGE_RECORDS) {
            Ok(page) => page,
            Err(e) => {
                problem(report, "online index", format!("cannot be read: {e}"));
                return;
            }
        };
        for entry in &page {
            report.records += 1;
            if !seen.contains(&entry.thing) {
                problem(report, thing_subject(&entry.thing), "online but no log");
            }
        }
        match page.last() {
            Some(last) if page.len() == INDEX_PAGE_RECORDS => after = Some(last.thing.clone()),
            _ => return,
        }
    }
}

fn check_deadline_index(store: &Store, report: &mut CheckReport, seen: &HashSet<String>) {
    match store.all_deadlines() {
        Ok(entries) => {
            for entry in entries {
                report.records += 1;
                match entry {
                    Ok(entry) if seen.contains(&entry.thing) => {}
                    Ok(entry) => problem(
                        report,
                        thing_subject(&entry.thing),
                        format!("a deadline entry ({} ms) but no log", entry.at_ms),
                    ),
                    Err(why) => problem(report, "deadline index", why),
                }
            }
        }
        Err(e) => problem(report, "deadline index", format!("cannot be read: {e}")),
    }
}

/// Decodes one stored `kv` record of a known kind.
type RecordCheck = fn(&[u8]) -> Result<(), String>;

/// A group membership record holds nothing.
fn membership(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        Ok(())
    } else {
        Err("a membership record holds no value".into())
    }
}

fn check_kv(store: &Store, report: &mut CheckReport) {
    let records = match store.kv_scan_prefix("", usize::MAX) {
        Ok(records) => records,
        Err(e) => {
            problem(report, "stored records", format!("cannot be read: {e}"));
            return;
        }
    };
    let kinds: [(&str, RecordCheck); 18] = [
        ("meta/", |_| Ok(())),
        (thinghub_actors::groups::PREFIXES[0], |bytes| {
            thinghub_actors::groups::decode_group(bytes).map(|_| ())
        }),
        (thinghub_actors::groups::PREFIXES[1], membership),
        (thinghub_actors::groups::PREFIXES[2], membership),
        (thinghub_actors::job_manager::JOB_PREFIX, |bytes| {
            thinghub_actors::job_manager::decode_record(bytes).map(|_| ())
        }),
        (thinghub_actors::job_manager::TARGET_PREFIX, |bytes| {
            thinghub_actors::job_manager::check_target_status(bytes)
        }),
        (
            crate::mqtt::persist::ALIVE_MARK_KEY,
            crate::mqtt::persist::check_alive_mark,
        ),
        (crate::auth::API_KEY_PREFIX, crate::auth::check_stored_key),
        (
            crate::users::MQTT_USER_PREFIX,
            crate::users::check_stored_user,
        ),
        (
            crate::certificates::DEVICE_CERTIFICATE_PREFIX,
            crate::certificates::check_stored_certificate,
        ),
        (
            crate::mqtt::acl::ACL_RULE_PREFIX,
            crate::mqtt::acl::check_stored_rule,
        ),
        (
            crate::webhooks::PREFIX,
            crate::webhooks::check_stored_webhook,
        ),
        (
            crate::webhooks::DEAD_PREFIX,
            crate::webhooks::check_dead_letter,
        ),
        (
            crate::cumulocity::children::CHILD_PREFIX,
            crate::cumulocity::children::check_stored_link,
        ),
        (
            crate::cumulocity::children::PARENT_PREFIX,
            crate::cumulocity::children::check_stored_link,
        ),
        (
            crate::cumulocity::registrations::PREFIX,
            crate::cumulocity::registrations::check_stored_registration,
        ),
        (thinghub_actors::alarms::RULE_PREFIX, |bytes| {
            thinghub_actors::alarms::decode_rule(bytes).map(|_| ())
        }),
        (thinghub_actors::alarms::SWEEP_PREFIX, |bytes| {
            std::str::from_utf8(bytes)
                .map(|_| ())
                .map_err(|_| "a sweep cursor is a Thing name".into())
        }),
    ];
    for (key, bytes) in records {
        report.records += 1;
        match kinds.iter().find(|(prefix, _)| key.starts_with(prefix)) {
            Some((_, check)) => {
                if let Err(why) = check(&bytes) {
                    problem(report, format!("record '{key}'"), why);
                }
            }
            None => problem(report, format!("record '{key}'"), "unknown kind of record"),
        }
    }
}

/// The scratch directory when none is given: the system's temporary directory.
pub fn default_scratch_dir() -> PathBuf {
    std::env::temp_dir()
}
