//! Peak-EWMA latency estimate of one endpoint (the linkerd2-proxy / tower `PeakEwma` family).

use std::time::{Duration, Instant};

/// Time constant of the estimate's decay.
///
/// 10 s is linkerd2-proxy's default: long enough that one fast response does not erase a
/// run of slow ones (the weight of the old estimate after 1 s without a sample is still
/// e^-0.1 ≈ 0.9), short enough that an endpoint shunned after a latency spike looks cheap
/// again, and is measured again, within tens of seconds.
pub const DECAY: Duration = Duration::from_secs(10);

/// Estimate of an endpoint that has not answered yet.
///
/// 30 ms is linkerd2-proxy's default: a plausible in-cluster RTT, so a new endpoint is
/// neither flooded (as an estimate of 0 would do) nor starved next to measured ones.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// A latency estimate that jumps to every sample above it and otherwise decays.
///
/// Between samples the estimate decays towards zero (as tower's `PeakEwma` does when read):
/// an endpoint that stopped getting traffic because of one slow spike becomes a cheap
/// choice again after a while, gets a request and so a fresh sample. A sample above the
/// decayed estimate replaces it (peak sensitivity: a slow endpoint is avoided at once); a
/// sample at or below it pulls the estimate towards the sample with weight `1 - w`,
/// `w = exp(-elapsed / DECAY)`, so the estimate falls only as fast as time passes.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PeakEwma {
    /// Estimate in seconds at the instant of the last sample; `None` before the first one.
    last: Option<(f64, Instant)>,
}

/// Weight of an estimate `elapsed` old.
fn weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

impl PeakEwma {
    /// The estimate at `now`, in seconds.
    pub(super) fn secs(&self, now: Instant) -> f64 {
        match self.last {
            None => DEFAULT_RTT.as_secs_f64(),
            Some((estimate, at)) => estimate * weight(now.saturating_duration_since(at)),
        }
    }

    /// The estimate at `now`, or `None` before the first sample.
    pub(super) fn measured(&self, now: Instant) -> Option<f64> {
        self.last.map(|_| self.secs(now))
    }

    /// Records a response that took `rtt`, received at `now`.
    pub(super) fn sample(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_secs_f64();
        self.last = Some(match self.last {
            // The first sample is the estimate: the default was a guess, not a measurement.
            None => (rtt, now),
            Some((estimate, at)) => {
                let w = weight(now.saturating_duration_since(at));
                let current = estimate * w;
                let next = if rtt > current {
                    rtt
                } else {
                    current * w + rtt * (1.0 - w)
                };
                // Threads may report slightly out of order: never move the time back.
                (next, now.max(at))
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn default_until_first_sample_then_the_sample() {
        let base = Instant::now();
        let mut e = PeakEwma::default();
        assert!(close(e.secs(base), 0.030));
        assert!(close(e.secs(base + Duration::from_secs(100)), 0.030));
        e.sample(Duration::from_millis(2), base);
        assert!(close(e.secs(base), 0.002));
    }

    #[test]
    fn a_slower_sample_replaces_the_estimate() {
        let base = Instant::now();
        let mut e = PeakEwma::default();
        e.sample(Duration::from_millis(2), base);
        e.sample(Duration::from_millis(80), base + Duration::from_millis(1));
        assert!(close(e.secs(base + Duration::from_millis(1)), 0.080));
    }

    #[test]
    fn a_faster_sample_pulls_the_estimate_down_with_time() {
        let base = Instant::now();
        let mut e = PeakEwma::default();
        e.sample(Duration::from_millis(50), base);
        // Right after: the old estimate keeps (almost) all its weight.
        e.sample(Duration::from_millis(10), base);
        assert!(close(e.secs(base), 0.050));
        // One decay constant later: decayed 50 ms blended with 10 ms, weight e^-1.
        let later = base + DECAY;
        e.sample(Duration::from_millis(10), later);
        let w = (-1.0f64).exp();
        assert!(close(e.secs(later), 0.050 * w * w + 0.010 * (1.0 - w)));
        assert!(e.secs(later) > 0.010 && e.secs(later) < 0.050 * w);
    }

    #[test]
    fn decays_towards_zero_without_samples() {
        let base = Instant::now();
        let mut e = PeakEwma::default();
        e.sample(Duration::from_millis(50), base);
        let w = (-2.0f64).exp();
        assert!(close(e.secs(base + 2 * DECAY), 0.050 * w));
        // Reading does not change it.
        assert!(close(e.secs(base), 0.050));
    }

    #[test]
    fn out_of_order_samples_do_not_move_time_back() {
        let base = Instant::now();
        let mut e = PeakEwma::default();
        e.sample(Duration::from_millis(50), base + DECAY);
        e.sample(Duration::from_millis(10), base);
        assert!(close(e.secs(base + DECAY), 0.050));
    }
}
