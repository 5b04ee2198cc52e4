//! `thinghub audit THING [--json]`: a Thing's full history, in order, from the log on disk.
//!
//! It opens the data directory itself, so it runs while the server is stopped; while a server
//! holds the directory, the same history is at `GET /api/v1/things/{name}/history`.

use std::io::Write;

use thinghub_actors::service::read_history;
use thinghub_storage::{StorageError, Store, StoreConfig};

/// Events read per page while printing.
const AUDIT_PAGE_EVENTS: usize = 1000;

/// Why an audit could not be printed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Storage failed (including a locked data directory or a corrupt record).
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// The Thing has no history.
    #[error("thing '{0}' has no history in this data directory")]
    NoHistory(String),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// The UTC calendar date of a day count since 1970-01-01: civil-from-days (H. Hinnant), so no
/// date crate is needed.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

fn format_time(ms: u64) -> String {
    // RFC 3339 in UTC.
    let secs = ms / 1000;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

/// Prints `thing`'s history from `data_dir` to `out`.
pub fn run(
    data_dir: &std::path::Path,
    thing: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<u64, AuditError> {
    let store = Store::open(&StoreConfig::new(data_dir))?;
    let mut from_seq = 1;
    let mut printed = 0u64;
    if !json {
        writeln!(
            out,
            "{:>8}  {:<24}  {:<16}  SUMMARY",
            "SEQ", "TIME (UTC)", "TYPE"
        )?;
    }
    loop {
        let page = read_history(&store, thing, from_seq, AUDIT_PAGE_EVENTS)?;
        let Some(last) = page.last() else { break };
        from_seq = last.seq + 1;
        for entry in &page {
            if json {
                writeln!(out, "{}", serde_json::to_string(entry).unwrap_or_default())?;
            } else {
                writeln!(
                    out,
                    "{:>8}  {:<24}  {:<16}  {}",
                    entry.seq,
                    format_time(entry.recorded_at_ms),
                    entry.event_type,
                    entry.summary
                )?;
            }
            printed += 1;
        }
    }
    if printed == 0 {
        return Err(AuditError::NoHistory(thing.to_owned()));
    }
    Ok(printed)
}

#[cfg(test)]
mod tests {
    use super::format_time;

    #[test]
    fn times_render_as_rfc3339_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
