//! Circuit breaker of one endpoint: consecutive failures eject it for an exponentially
//! growing time; after that one request at a time (the probe) decides whether it is back.

use std::time::{Duration, Instant};

/// Circuit-breaker policy of a service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitPolicy {
    /// Consecutive failures that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further ejection without a success in between
    /// doubles it ...
    pub base_ejection: Duration,
    /// ... up to this (a value below `base_ejection` means no growth).
    pub max_ejection: Duration,
}

impl Default for CircuitPolicy {
    /// 5 consecutive failures eject for 1 s, then 2 s, 4 s, ... up to 30 s: Envoy's outlier
    /// detection defaults for the count, with a cap short enough that a recovered endpoint
    /// is back within half a minute.
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
        }
    }
}

/// Breaker state of an endpoint at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// Takes requests.
    Healthy,
    /// Ejected by the circuit breaker: takes no requests until the ejection ends.
    Ejected,
    /// The ejection ended: takes one request at a time (the probe) until one succeeds.
    Probing,
}

/// Breaker bookkeeping; lives inside the endpoint's mutex.
#[derive(Debug, Clone, Default)]
pub(super) struct Breaker {
    /// Failures since the last success or ejection.
    failures: u32,
    /// Set by an ejection, cleared by a success after it ended. Ejected before this instant,
    /// Probing from it on: the state is computed from `now`, no timer has to flip it.
    ejected_until: Option<Instant>,
    /// Ejections since the last success: the next ejection lasts `base * 2^streak`.
    streak: u32,
    /// Ejections ever (metrics); also numbers the ejections so that a probe belongs to one.
    ejections: u64,
    /// The ejection (its number) whose probe is in flight.
    probe: Option<u64>,
}

/// `now + d`, or as far as `Instant` goes (a misconfigured huge ejection must not panic).
fn add_saturating(now: Instant, mut d: Duration) -> Instant {
    loop {
        if let Some(t) = now.checked_add(d) {
            return t;
        }
        d /= 2;
    }
}

impl Breaker {
    pub(super) fn state(&self, now: Instant) -> EndpointState {
        match self.ejected_until {
            None => EndpointState::Healthy,
            Some(until) if now < until => EndpointState::Ejected,
            Some(_) => EndpointState::Probing,
        }
    }

    /// Whether the balancer may send a new request now.
    pub(super) fn admits(&self, now: Instant) -> bool {
        match self.state(now) {
            EndpointState::Healthy => true,
            EndpointState::Ejected => false,
            EndpointState::Probing => self.probe != Some(self.ejections),
        }
    }

    pub(super) fn ejections(&self) -> u64 {
        self.ejections
    }

    /// A request starts; returns the ejection it probes if it is the probe.
    ///
    /// The probe is tracked by itself rather than by "no request in flight": requests
    /// started before the ejection (long-lived connections) would otherwise keep a
    /// recovered endpoint out for as long as they last.
    pub(super) fn start(&mut self, now: Instant) -> Option<u64> {
        if self.admits(now) && self.state(now) == EndpointState::Probing {
            self.probe = Some(self.ejections);
            return self.probe;
        }
        None
    }

    /// The probe of ejection `probe` ended (whatever its outcome): another may start.
    pub(super) fn end_probe(&mut self, probe: u64) {
        if self.probe == Some(probe) {
            self.probe = None;
        }
    }

    pub(super) fn success(&mut self, now: Instant) {
        self.failures = 0;
        // A success while still ejected comes from a request started before the ejection:
        // it does not cut the ejection short (that would let a flapping endpoint back at
        // once). After it, the endpoint is healthy again and the backoff starts over.
        if self.state(now) != EndpointState::Ejected {
            self.ejected_until = None;
            self.streak = 0;
        }
    }

    /// Returns true if this failure ejected the endpoint.
    pub(super) fn failure(&mut self, now: Instant, policy: &CircuitPolicy) -> bool {
        match self.state(now) {
            // A request started before the ejection: the endpoint is out already.
            EndpointState::Ejected => false,
            _ if policy.consecutive_failures == 0 => {
                // Breaker off: nothing to probe for either.
                *self = Self {
                    ejections: self.ejections,
                    probe: self.probe,
                    ..Self::default()
                };
                false
            }
            EndpointState::Probing => self.eject(now, policy),
            EndpointState::Healthy => {
                self.failures = self.failures.saturating_add(1);
                self.failures >= policy.consecutive_failures && self.eject(now, policy)
            }
        }
    }

    fn eject(&mut self, now: Instant, policy: &CircuitPolicy) -> bool {
        let cap = policy.max_ejection.max(policy.base_ejection);
        let ejection = 1u32
            .checked_shl(self.streak)
            .and_then(|factor| policy.base_ejection.checked_mul(factor))
            .map_or(cap, |d| d.min(cap));
        self.ejected_until = Some(add_saturating(now, ejection));
        self.streak = self.streak.saturating_add(1);
        self.failures = 0;
        self.ejections += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: CircuitPolicy = CircuitPolicy {
        consecutive_failures: 2,
        base_ejection: Duration::from_secs(1),
        max_ejection: Duration::from_secs(5),
    };

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Breaker::default();
        let mut now = Instant::now();
        assert!(!b.failure(now, &POLICY));
        assert!(b.failure(now, &POLICY));
        // 1 s, 2 s, 4 s, then the 5 s cap.
        for secs in [1, 2, 4, 5, 5] {
            let d = Duration::from_secs(secs);
            assert_eq!(
                b.state(now + d - Duration::from_millis(1)),
                EndpointState::Ejected
            );
            now += d;
            assert_eq!(b.state(now), EndpointState::Probing);
            assert!(b.failure(now, &POLICY));
        }
        assert_eq!(b.ejections(), 6);
    }

    #[test]
    fn huge_durations_do_not_overflow() {
        let policy = CircuitPolicy {
            consecutive_failures: 1,
            base_ejection: Duration::MAX,
            max_ejection: Duration::MAX,
        };
        let mut b = Breaker::default();
        let now = Instant::now();
        assert!(b.failure(now, &policy));
        assert_eq!(
            b.state(now + Duration::from_secs(1 << 40)),
            EndpointState::Ejected
        );
    }

    #[test]
    fn late_success_does_not_end_an_ejection() {
        let mut b = Breaker::default();
        let now = Instant::now();
        b.failure(now, &POLICY);
        b.failure(now, &POLICY);
        b.success(now + Duration::from_millis(10));
        assert_eq!(
            b.state(now + Duration::from_millis(10)),
            EndpointState::Ejected
        );
    }

    #[test]
    fn turning_the_breaker_off_ends_probing() {
        let mut b = Breaker::default();
        let now = Instant::now();
        b.failure(now, &POLICY);
        b.failure(now, &POLICY);
        let later = now + Duration::from_secs(1);
        assert_eq!(b.state(later), EndpointState::Probing);
        let off = CircuitPolicy {
            consecutive_failures: 0,
            ..POLICY
        };
        assert!(!b.failure(later, &off));
        assert_eq!(b.state(later), EndpointState::Healthy);
        assert_eq!(b.ejections(), 1);
    }
}
