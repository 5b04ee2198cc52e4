//! Failed-authentication throttling, shared by MQTT CONNECT and the HTTP API keys.
//!
//! Every wrong secret counts against the source address (IPv6: its /64, which one host can
//! fill) and against the username (or API key); a request without credentials is refused
//! without counting (it guesses nothing and costs nothing). After `failures_free` failures a
//! key is blocked for `backoff_base` x 2^(n - free - 1), capped at `backoff_max`; while either
//! of a request's keys is blocked it is refused at once, without running argon2 (so a password
//! guesser gets nowhere and costs almost nothing). Failures are forgotten once a key has been
//! quiet for `backoff_max`, and a success clears the username's count (not the address's: one
//! valid account must not reset a guesser sharing the address). The table is bounded: when it
//! is full, entries quiet for a maximum backoff go first, then the least recently failed half.
//!
//! Failures are logged in aggregate: one line per reporting period with counts and the busiest
//! source, not one line per attempt.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Throttling bounds.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// Failures per address or username before backoff starts.
    pub failures_free: u32,
    /// The first backoff.
    pub backoff_base: Duration,
    /// The longest backoff.
    pub backoff_max: Duration,
    /// Most addresses and usernames tracked at once.
    pub entries_max: usize,
}

/// Whether an authentication may be attempted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Go,
    /// Refuse: retry after this long.
    Wait(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    Name(String),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    blocked_until: Instant,
    last_failure: Instant,
}

/// Failures since the last report.
#[derive(Debug, Default)]
struct Period {
    by_channel: HashMap<&'static str, u64>,
    throttled: u64,
    by_address: HashMap<IpAddr, u64>,
}

/// Most distinct addresses counted per reporting period (the rest still count in totals).
const PERIOD_ADDRESSES_MAX: usize = 1024;

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<Key, Entry>,
    period: Period,
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct ThrottleStats {
    /// Failed MQTT authentications.
    pub mqtt_failures: AtomicU64,
    /// Failed HTTP authentications.
    pub http_failures: AtomicU64,
    /// Attempts refused because their address or username was blocked.
    pub throttled: AtomicU64,
}

/// The throttle (one per server).
#[derive(Debug)]
pub struct AuthThrottle {
    config: ThrottleConfig,
    table: Mutex<Table>,
    /// Counters.
    pub stats: ThrottleStats,
}

impl AuthThrottle {
    /// An empty throttle.
    pub fn new(config: ThrottleConfig) -> AuthThrottle {
        AuthThrottle {
            config,
            table: Mutex::new(Table::default()),
            stats: ThrottleStats::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keys(address: IpAddr, name: Option<&str>) -> impl Iterator<Item = Key> {
        let address = match address {
            // One host commonly holds a whole /64: throttle the network, not each address.
            IpAddr::V6(v6) => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
            v4 => v4,
        };
        std::iter::once(Key::Address(address)).chain(name.map(|n| Key::Name(n.to_owned())))
    }

    /// Whether `address` (and `name`, if any) may try to authenticate now.
    pub fn check(&self, address: IpAddr, name: Option<&str>) -> Verdict {
        self.check_at(address, name, Instant::now())
    }

    fn check_at(&self, address: IpAddr, name: Option<&str>, now: Instant) -> Verdict {
        let mut table = self.lock();
        let wait = Self::keys(address, name)
            .filter_map(|key| table.entries.get(&key))
            .map(|entry| entry.blocked_until.saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if wait.is_zero() {
            Verdict::Go
        } else {
            table.period.throttled += 1;
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            Verdict::Wait(wait)
        }
    }

    /// Records a failed authentication on `channel` (`mqtt` or `http`).
    pub fn failed(&self, address: IpAddr, name: Option<&str>, channel: &'static str) {
        self.failed_at(address, name, channel, Instant::now());
    }

    fn failed_at(&self, address: IpAddr, name: Option<&str>, channel: &'static str, now: Instant) {
        match channel {
            "http" => &self.stats.http_failures,
            _ => &self.stats.mqtt_failures,
        }
        .fetch_add(1, Ordering::Relaxed);
        let mut table = self.lock();
        *table.period.by_channel.entry(channel).or_default() += 1;
        let tracked = table.period.by_address.len();
        if let Some(n) = table.period.by_address.get_mut(&address) {
            *n += 1;
        } else if tracked < PERIOD_ADDRESSES_MAX {
            table.period.by_address.insert(address, 1);
        }
        for key in Self::keys(address, name) {
            if !table.entries.contains_key(&key) {
                self.make_room(&mut table, now);
            }
            let entry = table.entries.entry(key).or_insert(Entry {
                failures: 0,
                blocked_until: now,
                last_failure: now,
            });
            if now.saturating_duration_since(entry.last_failure) >= self.config.backoff_max {
                // Quiet for a whole maximum backoff: start counting again.
                entry.failures = 0;
            }
            entry.failures = entry.failures.saturating_add(1);
            entry.last_failure = now;
            if let Some(over) = entry.failures.checked_sub(self.config.failures_free) {
                if over > 0 {
                    let factor = 1u32 << (over - 1).min(20);
                    let backoff = self
                        .config
                        .backoff_base
                        .saturating_mul(factor)
                        .min(self.config.backoff_max);
                    entry.blocked_until = now + backoff;
                }
            }
        }
    }

    /// Keeps the table under its bound: when full, forgets the entries quiet for a whole
    /// maximum backoff (their count would restart anyway), and if that frees nothing, the half
    /// that failed least recently (so the cost of making room is spread over the many
    /// insertions the freed half allows, and a key under attack, failing often, stays).
    fn make_room(&self, table: &mut Table, now: Instant) {
        if table.entries.len() < self.config.entries_max {
            return;
        }
        let quiet = self.config.backoff_max;
        table.entries.retain(|_, e| {
            e.blocked_until > now || now.saturating_duration_since(e.last_failure) < quiet
        });
        if table.entries.len() < self.config.entries_max {
            return;
        }
        let mut ages: Vec<Instant> = table.entries.values().map(|e| e.last_failure).collect();
        let middle = ages.len() / 2;
        let (_, cutoff, _) = ages.select_nth_unstable(middle);
        let cutoff = *cutoff;
        table.entries.retain(|_, e| e.last_failure > cutoff);
    }

    /// Records a successful authentication: the name's failures are forgiven.
    pub fn succeeded(&self, _address: IpAddr, name: &str) {
        let mut table = self.lock();
        if !table.entries.is_empty() {
            table.entries.remove(&Key::Name(name.to_owned()));
        }
    }

    /// Addresses and names tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().entries.len()
    }

    /// Logs one line for the failures since the last call (nothing if there were none).
    pub fn report(&self, period: Duration) {
        let Period {
            by_channel,
            throttled,
            by_address,
        } = std::mem::take(&mut self.lock().period);
        let failures: u64 = by_channel.values().sum();
        if failures == 0 && throttled == 0 {
            return;
        }
        let busiest = by_address.iter().max_by_key(|(_, n)| **n);
        tracing::warn!(
            period_s = period.as_secs(),
            mqtt = by_channel.get("mqtt").copied().unwrap_or(0),
            http = by_channel.get("http").copied().unwrap_or(0),
            throttled,
            sources = by_address.len(),
            busiest_source = %busiest.map(|(a, _)| a.to_string()).unwrap_or_default(),
            busiest_source_failures = busiest.map(|(_, n)| *n).unwrap_or(0),
            "failed authentications"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(entries_max: usize) -> AuthThrottle {
        AuthThrottle::new(ThrottleConfig {
            failures_free: 2,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            entries_max,
        })
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn backoff_starts_after_the_free_failures_doubles_and_is_capped() {
        let t = throttle(100);
        let now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..8 {
            t.failed_at(ip(1), Some("u"), "mqtt", now);
            waits.push(match t.check_at(ip(1), Some("u"), now) {
                Verdict::Go => 0,
                Verdict::Wait(w) => w.as_millis(),
            });
        }
        assert_eq!(waits, [0, 0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(
            t.check_at(ip(1), Some("u"), now + Duration::from_secs(1)),
            Verdict::Go,
            "the block ends"
        );
    }

    #[test]
    fn the_address_and_the_username_are_throttled_separately() {
        let t = throttle(100);
        let now = Instant::now();
        for n in 0..3 {
            // One guesser, many usernames: the address is blocked.
            t.failed_at(ip(1), Some(&format!("user{n}")), "mqtt", now);
        }
        assert!(matches!(
            t.check_at(ip(1), Some("fresh"), now),
            Verdict::Wait(_)
        ));
        assert_eq!(t.check_at(ip(2), Some("fresh"), now), Verdict::Go);
        for n in 0..3 {
            // Many addresses, one username: the username is blocked.
            t.failed_at(ip(10 + n), Some("victim"), "http", now);
        }
        assert!(matches!(
            t.check_at(ip(99), Some("victim"), now),
            Verdict::Wait(_)
        ));
        t.succeeded(ip(99), "victim");
        assert_eq!(t.check_at(ip(99), Some("victim"), now), Verdict::Go);
        assert_eq!(t.stats.mqtt_failures.load(Ordering::Relaxed), 3);
        assert_eq!(t.stats.http_failures.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_maximum_backoff() {
        let t = throttle(100);
        let start = Instant::now();
        for n in 0..10u64 {
            // One failure every 2 s with a 1 s maximum backoff: never blocked.
            let at = start + Duration::from_secs(2 * n);
            t.failed_at(ip(1), Some("u"), "mqtt", at);
            assert_eq!(t.check_at(ip(1), Some("u"), at), Verdict::Go, "failure {n}");
        }
    }

    #[test]
    fn an_ipv6_host_is_throttled_by_its_64_network() {
        let t = throttle(100);
        let now = Instant::now();
        for n in 0..3u16 {
            let address = IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, n]);
            t.failed_at(address, None, "mqtt", now);
        }
        let same_64 = IpAddr::from([0x2001, 0xdb8, 0, 1, 0xffff, 0, 0, 9]);
        assert!(matches!(t.check_at(same_64, None, now), Verdict::Wait(_)));
        let other_64 = IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]);
        assert_eq!(t.check_at(other_64, None, now), Verdict::Go);
    }

    #[test]
    fn the_table_is_bounded() {
        let t = throttle(10);
        let now = Instant::now();
        for n in 0..200u8 {
            t.failed_at(
                ip(n),
                None,
                "mqtt",
                now + Duration::from_millis(u64::from(n)),
            );
        }
        assert!(t.tracked() <= 10, "{}", t.tracked());
        t.report(Duration::from_secs(10));
    }
}
