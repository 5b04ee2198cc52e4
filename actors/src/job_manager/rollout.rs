//! A job's rollout pace: unpaced, a fixed most-per-minute, or an exponential rate (AWS IoT's
//! `exponentialRate`) that starts at a base rate and multiplies it by a factor each time enough
//! more Things were notified, or enough more executions succeeded, up to the most-per-minute.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The ceiling of an exponential rollout without `maximumPerMinute` (as AWS IoT).
pub const RATE_PER_MINUTE_MAX: u32 = 1000;

/// What raises an exponential rollout's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RateIncreaseCriteria {
    /// This many more Things notified (executions queued) since the last increase.
    NotifiedThings(u32),
    /// This many more executions SUCCEEDED since the last increase.
    SucceededThings(u32),
}

/// `rollout.exponentialRate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExponentialRate {
    /// The rate a rollout starts at, executions per minute.
    pub base_rate_per_minute: u32,
    /// The factor, in tenths (AWS IoT allows one decimal: 1.1 ..= 5.0 is 11 ..= 50).
    pub increment_factor_tenths: u32,
    /// When the rate goes up.
    pub criteria: RateIncreaseCriteria,
}

impl ExponentialRate {
    /// The API's view.
    pub fn to_json(self) -> serde_json::Value {
        let criteria = match self.criteria {
            RateIncreaseCriteria::NotifiedThings(n) => {
                serde_json::json!({"numberOfNotifiedThings": n})
            }
            RateIncreaseCriteria::SucceededThings(n) => {
                serde_json::json!({"numberOfSucceededThings": n})
            }
        };
        serde_json::json!({
            "baseRatePerMinute": self.base_rate_per_minute,
            "incrementFactor": f64::from(self.increment_factor_tenths) / 10.0,
            "rateIncreaseCriteria": criteria,
        })
    }
}

/// Where a rollout's rate is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pace {
    rate: Option<u32>,
    ceiling: u32,
    exponential: Option<ExponentialRate>,
    notified_mark: u64,
    succeeded_mark: u64,
}

impl Pace {
    /// The pace of a rollout that starts now: at `current` (the rate a rollout before a restart
    /// had reached) or the base rate, with `succeeded` executions SUCCEEDED so far.
    pub fn new(
        maximum_per_minute: Option<u32>,
        exponential: Option<ExponentialRate>,
        current: Option<u32>,
        succeeded: u64,
    ) -> Pace {
        let ceiling = maximum_per_minute.unwrap_or(RATE_PER_MINUTE_MAX).max(1);
        let rate = match exponential {
            Some(exp) => Some(
                current
                    .unwrap_or(exp.base_rate_per_minute)
                    .clamp(1, ceiling),
            ),
            None => maximum_per_minute.map(|rate| rate.max(1)),
        };
        Pace {
            rate,
            ceiling,
            exponential,
            notified_mark: 0,
            succeeded_mark: succeeded,
        }
    }

    /// Executions per minute now (`None`: unpaced).
    pub fn rate_per_minute(&self) -> Option<u32> {
        self.rate
    }

    /// The most it will ever be (`None`: unpaced).
    pub fn ceiling_per_minute(&self) -> Option<u32> {
        self.rate.map(|_| self.ceiling)
    }

    /// Time between two queue requests now.
    pub fn interval(&self) -> Option<Duration> {
        self.rate.map(|rate| Duration::from_secs(60) / rate.max(1))
    }

    /// Whether `succeeded` matters to the next increase (reading it costs the caller a read).
    pub fn wants_succeeded(&self) -> bool {
        matches!(
            self.exponential.map(|e| e.criteria),
            Some(RateIncreaseCriteria::SucceededThings(_))
        )
    }

    /// Given `notified` Things queued by this rollout so far and `succeeded` executions of the
    /// job, raises the rate when the criteria is met; returns the new rate when it changed.
    pub fn observe(&mut self, notified: u64, succeeded: u64) -> Option<u32> {
        let exp = self.exponential?;
        let rate = self.rate?;
        if rate >= self.ceiling {
            return None;
        }
        let met = match exp.criteria {
            RateIncreaseCriteria::NotifiedThings(n) => {
                notified.saturating_sub(self.notified_mark) >= u64::from(n)
            }
            RateIncreaseCriteria::SucceededThings(n) => {
                succeeded.saturating_sub(self.succeeded_mark) >= u64::from(n)
            }
        };
        if !met {
            return None;
        }
        // Rounded up, and up by one at least: a small base times a small factor still grows.
        let raised = (u64::from(rate) * u64::from(exp.increment_factor_tenths)).div_ceil(10);
        let raised = raised.max(u64::from(rate) + 1).min(u64::from(self.ceiling)) as u32;
        self.rate = Some(raised);
        self.notified_mark = notified;
        self.succeeded_mark = succeeded;
        Some(raised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exponential(base: u32, tenths: u32, criteria: RateIncreaseCriteria) -> ExponentialRate {
        ExponentialRate {
            base_rate_per_minute: base,
            increment_factor_tenths: tenths,
            criteria,
        }
    }

    #[test]
    fn a_fixed_rate_never_changes_and_no_rate_is_unpaced() {
        let mut fixed = Pace::new(Some(120), None, None, 0);
        assert_eq!(fixed.interval(), Some(Duration::from_millis(500)));
        assert_eq!(fixed.observe(1_000_000, 1_000_000), None);
        assert_eq!(fixed.rate_per_minute(), Some(120));
        let unpaced = Pace::new(None, None, None, 0);
        assert_eq!(unpaced.interval(), None);
        assert_eq!(unpaced.ceiling_per_minute(), None);
    }

    #[test]
    fn the_rate_multiplies_each_time_enough_more_things_were_notified() {
        // Given base 10/min, factor 2, every 5 notified, at most 50/min.
        let exp = exponential(10, 20, RateIncreaseCriteria::NotifiedThings(5));
        let mut pace = Pace::new(Some(50), Some(exp), None, 0);
        assert_eq!(pace.rate_per_minute(), Some(10));
        // When 4 are notified nothing changes; at 5 it doubles, and counts start again.
        assert_eq!(pace.observe(4, 0), None);
        assert_eq!(pace.observe(5, 0), Some(20));
        assert_eq!(pace.observe(9, 0), None);
        assert_eq!(pace.observe(10, 0), Some(40));
        // Then the ceiling holds.
        assert_eq!(pace.observe(15, 0), Some(50));
        assert_eq!(pace.observe(100, 0), None);
        assert_eq!(pace.rate_per_minute(), Some(50));
    }

    #[test]
    fn succeeded_executions_count_from_the_rollouts_start() {
        let exp = exponential(1, 11, RateIncreaseCriteria::SucceededThings(3));
        // Given 7 executions had succeeded before a restart resumed the rollout at 4/min.
        let mut pace = Pace::new(None, Some(exp), Some(4), 7);
        assert!(pace.wants_succeeded());
        assert_eq!(pace.rate_per_minute(), Some(4));
        assert_eq!(pace.observe(100, 9), None, "notified Things do not count");
        // 4 * 1.1 = 4.4, rounded up.
        assert_eq!(pace.observe(0, 10), Some(5));
        // 5 * 1.1 = 5.5 -> 6; a factor always raises by one at least.
        assert_eq!(pace.observe(0, 13), Some(6));
        assert_eq!(pace.ceiling_per_minute(), Some(RATE_PER_MINUTE_MAX));
    }

    #[test]
    fn a_stored_rate_beyond_the_ceiling_is_clamped() {
        let exp = exponential(10, 50, RateIncreaseCriteria::NotifiedThings(1));
        assert_eq!(
            Pace::new(Some(30), Some(exp), Some(400), 0).rate_per_minute(),
            Some(30)
        );
        assert_eq!(
            exp.to_json()["rateIncreaseCriteria"]["numberOfNotifiedThings"],
            1
        );
        assert_eq!(exp.to_json()["incrementFactor"], 5.0);
    }
}
