//! Retry budget: retries may add at most a fixed ratio to the traffic, plus a small floor.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Finest bucket width: 1 s buckets keep a 10 s window within 10 % of its nominal length.
const MAX_BUCKET: Duration = Duration::from_secs(1);
/// Buckets per window when the window is short (below 10 s the buckets shrink with it).
const MIN_BUCKETS: u32 = 10;
/// Most buckets kept: bounds the memory and the summing cost of very long windows (beyond
/// 600 s the buckets widen instead).
const MAX_BUCKETS: u32 = 600;
/// Finest bucket: below this the window is degenerate anyway.
const MIN_BUCKET: Duration = Duration::from_millis(1);
/// Slack against rounding: `0.2 * 100` must allow 20 retries even if it computes as
/// 19.999999999999996.
const EPSILON: f64 = 1e-9;

/// Retry budget: retries allowed = `min_per_sec * window_secs + ratio * requests in the
/// window`, minus the retries already made in it (the shape of linkerd's and Finagle's
/// budgets).
///
/// The window slides over `ttl` in buckets of at most 1 s (`ttl / 10` for short windows), so
/// a deposit or a retry stops counting between `ttl - bucket` and `ttl` after it was made.
/// Thread-safe: a mutex held for a few additions.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    /// `min_per_sec * ttl`, in retries.
    reserve: f64,
    bucket: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Instant of the first call: tick 0 starts there (`new` has no `now`).
    epoch: Option<Instant>,
    /// Newest tick seen: an older `now` from a slower thread counts in it.
    latest: u64,
    /// Ring indexed by `tick % len`.
    buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    tick: u64,
    deposits: u64,
    withdrawals: u64,
}

impl RetryBudget {
    /// A budget letting retries add `ratio` (e.g. 0.2 = 20 %) to the requests of the last
    /// `ttl`, plus `min_per_sec` retries per second regardless of traffic (so that a
    /// quiet service can still retry). A negative or NaN ratio counts as 0.
    pub fn new(ratio: f64, min_per_sec: u32, ttl: Duration) -> RetryBudget {
        let bucket = (ttl / MIN_BUCKETS)
            .min(MAX_BUCKET)
            .max(ttl / MAX_BUCKETS)
            .max(MIN_BUCKET);
        let len = ttl.as_nanos().div_ceil(bucket.as_nanos()).max(1);
        let len = usize::try_from(len).unwrap_or(MAX_BUCKETS as usize);
        RetryBudget {
            ratio: ratio.max(0.0),
            reserve: f64::from(min_per_sec) * ttl.as_secs_f64(),
            bucket,
            window: Mutex::new(Window {
                epoch: None,
                latest: 0,
                buckets: vec![Bucket::default(); len],
            }),
        }
    }

    /// Every original request deposits.
    pub fn deposit(&self, now: Instant) {
        self.with_window(now, |window, tick| {
            window.current(tick).deposits += 1;
        });
    }

    /// A retry withdraws; false when the budget is exhausted (then do not retry).
    pub fn try_withdraw(&self, now: Instant) -> bool {
        self.with_window(now, |window, tick| {
            let (deposits, withdrawals) = window.totals(tick);
            let allowed = (self.reserve + self.ratio * deposits as f64 + EPSILON).floor();
            if (withdrawals as f64) < allowed {
                window.current(tick).withdrawals += 1;
                true
            } else {
                false
            }
        })
    }

    fn with_window<T>(&self, now: Instant, f: impl FnOnce(&mut Window, u64) -> T) -> T {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = *window.epoch.get_or_insert(now);
        let tick = now.saturating_duration_since(epoch).as_nanos() / self.bucket.as_nanos();
        let tick = u64::try_from(tick).unwrap_or(u64::MAX).max(window.latest);
        window.latest = tick;
        f(&mut window, tick)
    }
}

impl Window {
    /// The bucket of `tick`, emptied if it still holds an expired tick.
    fn current(&mut self, tick: u64) -> &mut Bucket {
        // `buckets` is never empty (`new` makes at least one), so the index is in range.
        let len = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(tick % len) as usize];
        if bucket.tick != tick {
            *bucket = Bucket {
                tick,
                ..Bucket::default()
            };
        }
        bucket
    }

    /// (deposits, withdrawals) of the buckets within the window ending at `tick`.
    fn totals(&self, tick: u64) -> (u64, u64) {
        let len = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.tick <= tick && b.tick.saturating_add(len) > tick)
            .fold((0, 0), |(d, w), b| (d + b.deposits, w + b.withdrawals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn withdrawals(budget: &RetryBudget, now: Instant) -> usize {
        (0..10_000).take_while(|_| budget.try_withdraw(now)).count()
    }

    #[test]
    fn ratio_of_deposits() {
        let budget = RetryBudget::new(0.2, 0, TTL);
        let base = Instant::now();
        for i in 0..100 {
            budget.deposit(base + Duration::from_millis(i * 10));
        }
        assert_eq!(withdrawals(&budget, base + Duration::from_secs(1)), 20);
    }

    #[test]
    fn floor_without_traffic() {
        let budget = RetryBudget::new(0.2, 2, TTL);
        let base = Instant::now();
        assert_eq!(withdrawals(&budget, base), 20);
        // Ten seconds later the retries made at `base` have left the window.
        assert_eq!(withdrawals(&budget, base + TTL), 20);
    }

    #[test]
    fn deposits_expire_after_ttl() {
        let budget = RetryBudget::new(0.5, 0, TTL);
        let base = Instant::now();
        for _ in 0..10 {
            budget.deposit(base);
        }
        assert!(budget.try_withdraw(base + TTL - Duration::from_millis(1)));
        assert!(!budget.try_withdraw(base + TTL));
        // New traffic refills it; the retry made just before still counts against it.
        for _ in 0..4 {
            budget.deposit(base + TTL);
        }
        assert!(budget.try_withdraw(base + TTL));
        assert!(!budget.try_withdraw(base + TTL));
    }

    #[test]
    fn retries_count_against_the_window_until_they_expire() {
        let budget = RetryBudget::new(0.5, 0, TTL);
        let base = Instant::now();
        for _ in 0..4 {
            budget.deposit(base);
        }
        assert_eq!(withdrawals(&budget, base), 2);
        // Deposits 5 s later: 8 in the window, 2 retries made already.
        let later = base + Duration::from_secs(5);
        for _ in 0..4 {
            budget.deposit(later);
        }
        assert_eq!(withdrawals(&budget, later), 2);
        // At base + 10 s the first half is gone: 4 deposits, 2 retries from `later`.
        assert_eq!(withdrawals(&budget, base + TTL), 0);
    }

    #[test]
    fn older_instants_count_in_the_newest_bucket() {
        let budget = RetryBudget::new(1.0, 0, TTL);
        let base = Instant::now();
        budget.deposit(base + Duration::from_secs(3));
        // A slower thread reports an instant before the first one (and before the epoch).
        budget.deposit(base);
        assert_eq!(withdrawals(&budget, base + Duration::from_secs(3)), 2);
    }

    #[test]
    fn short_and_degenerate_windows() {
        let base = Instant::now();
        let short = RetryBudget::new(1.0, 0, Duration::from_millis(100));
        short.deposit(base);
        assert!(!short.try_withdraw(base + Duration::from_millis(100)));
        let zero = RetryBudget::new(1.0, 100, Duration::ZERO);
        assert!(!zero.try_withdraw(base));
        let nan = RetryBudget::new(f64::NAN, 0, TTL);
        nan.deposit(base);
        assert!(!nan.try_withdraw(base));
    }
}
