//! Load balancing of one service's endpoints: power of two choices over a peak-EWMA cost,
//! weighted, with a per-endpoint circuit breaker and a retry budget.
//!
//! Every function takes `now` explicitly: the caller reads the clock once per event, and
//! tests drive time by hand. The balancer never allocates on the common path and holds each
//! endpoint's mutex for a few arithmetic operations, never across an await.

mod breaker;
mod budget;
mod ewma;

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

pub use std::net::SocketAddr;

pub use breaker::{CircuitPolicy, EndpointState};
pub use budget::RetryBudget;
pub use ewma::{DECAY, DEFAULT_RTT};

use breaker::Breaker;
use ewma::PeakEwma;

// === impl Endpoint ===

/// One upstream endpoint with its load-balancing and breaker state.
///
/// Shared (`Arc`) between the balancer and requests in flight; it survives config reloads
/// when the same address stays in the service, so its latency and breaker state carry over.
#[derive(Debug)]
pub struct Endpoint {
    /// Address the proxy connects to.
    pub addr: SocketAddr,
    /// Relative share of traffic, at least 1.
    pub weight: u32,
    /// Expected peer identity (e.g. a SPIFFE id), when the connection is authenticated.
    pub identity: Option<String>,
    /// Requests in flight: an atomic, as every pick reads it for two endpoints.
    pending: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    ewma: PeakEwma,
    breaker: Breaker,
}

impl Endpoint {
    /// An endpoint without history; a weight of 0 counts as 1 (an endpoint listed in the
    /// service is meant to get traffic; removing it is how to give it none).
    pub fn new(addr: SocketAddr, weight: u32, identity: Option<String>) -> Endpoint {
        Endpoint {
            addr,
            weight: weight.max(1),
            identity,
            pending: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        }
    }

    /// Requests/connections in flight now.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Starts a request: pending += 1 until the returned guard is finished or dropped.
    ///
    /// If the endpoint is probing and no probe is in flight, this request is the probe.
    pub fn start(self: &Arc<Self>, now: Instant) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let probe = self.lock().breaker.start(now);
        InFlight {
            endpoint: Arc::clone(self),
            started: now,
            probe,
        }
    }

    /// Breaker state at `now`.
    pub fn state(&self, now: Instant) -> EndpointState {
        self.lock().breaker.state(now)
    }

    /// Peak-EWMA latency estimate in seconds ([`DEFAULT_RTT`] until the first sample).
    pub fn ewma_secs(&self, now: Instant) -> f64 {
        self.lock().ewma.secs(now)
    }

    /// Times this endpoint was ejected (counter, for metrics).
    pub fn ejections(&self) -> u64 {
        self.lock().breaker.ejections()
    }

    /// Load cost used by P2C: `ewma * (pending + 1) / weight`.
    ///
    /// The `+ 1` prices the request being placed, so that an idle slow endpoint still costs
    /// more than an idle fast one.
    pub fn cost(&self, now: Instant) -> f64 {
        self.ewma_secs(now) * (self.pending() as f64 + 1.0) / f64::from(self.weight)
    }

    /// The latency estimate, or `None` before the first sample.
    fn measured(&self, now: Instant) -> Option<f64> {
        self.lock().ewma.measured(now)
    }

    /// [`Endpoint::cost`] with the latency estimate `ewma` (seconds).
    fn cost_at(&self, ewma: f64) -> f64 {
        ewma * (self.pending() as f64 + 1.0) / f64::from(self.weight)
    }

    /// Whether the balancer may send it a new request at `now`.
    fn admits(&self, now: Instant) -> bool {
        self.lock().breaker.admits(now)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every step, so a panic elsewhere while holding the
        // lock leaves nothing half-done: keep going with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl InFlight ===

/// A request in flight on an endpoint.
///
/// Dropping it without [`success`](InFlight::success) or [`failure`](InFlight::failure)
/// counts as neither (the client cancelled the request) and only releases pending (and the
/// probe slot, if it was the probe).
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    started: Instant,
    /// The ejection this request probes, if it is the probe.
    probe: Option<u64>,
}

impl InFlight {
    /// The endpoint the request runs on.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Records the latency (`now - start`) in the EWMA and resets the consecutive-failure
    /// count; ends probing: the endpoint is healthy again and its backoff reset.
    pub fn success(mut self, now: Instant) {
        let mut state = self.endpoint.lock();
        state
            .ewma
            .sample(now.saturating_duration_since(self.started), now);
        state.breaker.success(now);
        if let Some(probe) = self.probe.take() {
            state.breaker.end_probe(probe);
        }
    }

    /// Counts a failure (connect error, timeout, 5xx) and records its latency too (a slow
    /// failure is slow). With `policy.consecutive_failures` reached, or any failure while
    /// probing, ejects the endpoint for the current backoff, then doubles the backoff
    /// (capped). Returns true if this call ejected it.
    pub fn failure(mut self, now: Instant, policy: &CircuitPolicy) -> bool {
        let mut state = self.endpoint.lock();
        state
            .ewma
            .sample(now.saturating_duration_since(self.started), now);
        let ejected = state.breaker.failure(now, policy);
        if let Some(probe) = self.probe.take() {
            state.breaker.end_probe(probe);
        }
        ejected
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(probe) = self.probe.take() {
            self.endpoint.lock().breaker.end_probe(probe);
        }
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl Balancer ===

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// The service has no endpoints (none discovered, or all removed).
    #[error("the service has no endpoints")]
    NoEndpoints,
    /// Every endpoint is ejected, or probing with its probe in flight.
    #[error("every endpoint of the service is ejected by the circuit breaker")]
    AllEjected,
}

/// Random draws per candidate before falling back to a scan of all endpoints.
///
/// Drawing (binary search over cumulative weights, one lock) keeps a pick O(log n) while
/// most endpoints are usable; when eight draws in a row miss, most endpoints are out (or
/// the set is tiny with skewed weights) and one pass over them is cheaper than more luck.
const MAX_DRAWS: usize = 8;

/// Power of two choices over peak-EWMA cost, weighted.
///
/// Draws two distinct usable endpoints with probability proportional to weight and keeps the
/// cheaper by [`Endpoint::cost`]. Two random choices avoid both the herd behaviour of
/// "always the least loaded" (every proxy piling onto the same endpoint between updates)
/// and the O(n) scan it needs.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
    /// `cumulative[i]` = total weight of `endpoints[..=i]`, for weighted draws.
    cumulative: Vec<u64>,
    /// State of a SplitMix64 sequence: each pick takes one output as the seed of its own
    /// local generator, so concurrent picks share one relaxed atomic add and no lock.
    seed: AtomicU64,
}

/// SplitMix64 increment (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64 output function: a bijective mix of the state.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small fast generator; load balancing needs spread, not unpredictability.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for any `n` here).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

impl Balancer {
    /// A balancer over `endpoints` (possibly empty: picks then fail with
    /// [`PickError::NoEndpoints`]).
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Balancer {
        // A per-process random seed, so that proxies do not all make the same choices.
        Self::with_seed(endpoints, RandomState::new().hash_one(0u8))
    }

    fn with_seed(endpoints: Vec<Arc<Endpoint>>, seed: u64) -> Balancer {
        let cumulative = endpoints
            .iter()
            .scan(0u64, |total, ep| {
                *total += u64::from(ep.weight);
                Some(*total)
            })
            .collect();
        Balancer {
            endpoints,
            cumulative,
            seed: AtomicU64::new(seed),
        }
    }

    /// The endpoints, in the order given to [`Balancer::new`].
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Picks an endpoint.
    ///
    /// Candidates are endpoints that are healthy, or probing with no probe in flight (a
    /// probing endpoint takes one request at a time). Two distinct candidates are drawn with
    /// probability proportional to weight and the cheaper one is kept; a lone candidate is
    /// taken. `avoid` lists addresses to skip if any other candidate exists (retries prefer
    /// another endpoint).
    ///
    /// Two picks racing for the same probing endpoint may both get it before either starts
    /// its request; that costs one extra request to an endpoint being tested, no more.
    pub fn pick(&self, now: Instant, avoid: &[SocketAddr]) -> Result<Arc<Endpoint>, PickError> {
        if self.endpoints.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        let mut rng = Rng(mix(self
            .seed
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA)));
        if !avoid.is_empty() {
            let fresh = |ep: &Endpoint| !avoid.contains(&ep.addr) && ep.admits(now);
            if let Some(ep) = self.choose(&mut rng, now, &fresh) {
                return Ok(ep);
            }
        }
        self.choose(&mut rng, now, &|ep: &Endpoint| ep.admits(now))
            .ok_or(PickError::AllEjected)
    }

    /// (healthy, ejected, probing) counts, for metrics.
    pub fn state_counts(&self, now: Instant) -> (usize, usize, usize) {
        self.endpoints
            .iter()
            .fold((0, 0, 0), |(h, e, p), ep| match ep.state(now) {
                EndpointState::Healthy => (h + 1, e, p),
                EndpointState::Ejected => (h, e + 1, p),
                EndpointState::Probing => (h, e, p + 1),
            })
    }

    /// P2C among the endpoints passing `ok`.
    fn choose(
        &self,
        rng: &mut Rng,
        now: Instant,
        ok: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let (first_index, first) = self.sample(rng, None, ok)?;
        let Some((_, second)) = self.sample(rng, Some(first_index), ok) else {
            return Some(Arc::clone(first));
        };
        // An endpoint without a latency sample yet (new, or just added by a reload) is priced
        // at the other candidate's latency, and wins a tie: it gets traffic and so a sample,
        // instead of waiting behind DEFAULT_RTT until the others are loaded (with a
        // pessimistic default, sequential traffic would never reach it). Its pending count
        // still counts, so a burst does not all land on it before it answers.
        let (e1, e2) = (first.measured(now), second.measured(now));
        let (c1, c2) = match (e1, e2) {
            (Some(a), Some(b)) => (first.cost_at(a), second.cost_at(b)),
            (Some(a), None) => (first.cost_at(a), second.cost_at(a)),
            (None, Some(b)) => (first.cost_at(b), second.cost_at(b)),
            (None, None) => (first.cost(now), second.cost(now)),
        };
        // On a tie the first drawn wins, so equal costs split traffic by weight; an
        // unmeasured endpoint wins ties against a measured one.
        let second_wins = c2 < c1 || (c2 == c1 && e2.is_none() && e1.is_some());
        let chosen = if second_wins { second } else { first };
        Some(Arc::clone(chosen))
    }

    /// One endpoint passing `ok` other than `exclude`, drawn with probability proportional
    /// to weight.
    ///
    /// First by rejection sampling (exact: the first draw that passes is weight-proportional
    /// among those that pass), then, after [`MAX_DRAWS`] misses, by one weighted reservoir
    /// pass over all endpoints (the same distribution).
    fn sample(
        &self,
        rng: &mut Rng,
        exclude: Option<usize>,
        ok: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<(usize, &Arc<Endpoint>)> {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if total == 0 {
            return None;
        }
        for _ in 0..MAX_DRAWS {
            let r = rng.below(total);
            let index = self.cumulative.partition_point(|&c| c <= r);
            if Some(index) == exclude {
                continue;
            }
            if let Some(ep) = self.endpoints.get(index).filter(|ep| ok(ep)) {
                return Some((index, ep));
            }
        }
        let mut seen = 0u64;
        let mut chosen = None;
        for (index, ep) in self.endpoints.iter().enumerate() {
            if Some(index) == exclude || !ok(ep) {
                continue;
            }
            let weight = u64::from(ep.weight);
            seen += weight;
            // Keep this one with probability weight / (weight seen so far).
            if rng.below(seen) < weight {
                chosen = Some((index, ep));
            }
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    const POLICY: CircuitPolicy = CircuitPolicy {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(1),
        max_ejection: Duration::from_secs(4),
    };

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)), 8080)
    }

    fn endpoint(last: u8, weight: u32) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(addr(last), weight, None))
    }

    fn balancer(endpoints: &[Arc<Endpoint>]) -> Balancer {
        Balancer::with_seed(endpoints.to_vec(), 7)
    }

    /// One request on `ep` that took `rtt`, answered at `now`.
    fn sample(ep: &Arc<Endpoint>, rtt: Duration, now: Instant) {
        ep.start(now - rtt).success(now);
    }

    fn fail(ep: &Arc<Endpoint>, now: Instant) -> bool {
        ep.start(now).failure(now, &POLICY)
    }

    fn eject(ep: &Arc<Endpoint>, now: Instant) {
        for _ in 1..POLICY.consecutive_failures {
            assert!(!fail(ep, now));
        }
        assert!(fail(ep, now));
    }

    fn picked(balancer: &Balancer, now: Instant, avoid: &[SocketAddr]) -> Option<SocketAddr> {
        balancer.pick(now, avoid).ok().map(|ep| ep.addr)
    }

    #[test]
    fn prefers_the_fast_endpoint() {
        let base = Instant::now() + Duration::from_secs(1);
        let (fast, slow) = (endpoint(1, 1), endpoint(2, 1));
        sample(&fast, Duration::from_millis(1), base);
        sample(&slow, Duration::from_millis(50), base);
        let balancer = balancer(&[fast, slow]);
        let now = base + Duration::from_millis(100);
        // Requests stay in flight: the slow endpoint gets one once the fast one has ~50.
        let mut in_flight = Vec::new();
        let mut slow_picks = 0;
        for _ in 0..1000 {
            let Ok(ep) = balancer.pick(now, &[]) else {
                panic!("no endpoint picked")
            };
            slow_picks += usize::from(ep.addr == addr(2));
            in_flight.push(ep.start(now));
        }
        assert!(
            slow_picks > 0 && slow_picks < 100,
            "slow picks: {slow_picks}"
        );
    }

    #[test]
    fn weights_split_traffic() {
        let now = Instant::now();
        let endpoints = [endpoint(1, 1), endpoint(2, 3)];
        for ep in &endpoints {
            sample(ep, Duration::from_millis(10), now);
        }
        let balancer = balancer(&endpoints);
        // A closed loop of 100 concurrent requests, each completing 100 picks later.
        let mut in_flight = std::collections::VecDeque::new();
        let mut heavy = 0;
        for _ in 0..10_000 {
            let Ok(ep) = balancer.pick(now, &[]) else {
                panic!("no endpoint picked")
            };
            heavy += usize::from(ep.addr == addr(2));
            in_flight.push_back(ep.start(now));
            if in_flight.len() > 100 {
                in_flight.pop_front();
            }
        }
        assert!((7_200..=7_800).contains(&heavy), "heavy picks: {heavy}");
    }

    #[test]
    fn equal_costs_split_by_weight_among_many() {
        // Ten endpoints of weight 1 and one of weight 10, all idle: the heavy one wins every
        // comparison it is in (its cost is divided by 10), so its share is its chance of
        // being one of the two drawn: weight counts twice while nothing is pending.
        let mut endpoints: Vec<_> = (1..=10).map(|i| endpoint(i, 1)).collect();
        endpoints.push(endpoint(11, 10));
        let balancer = balancer(&endpoints);
        let now = Instant::now();
        let heavy = (0..10_000)
            .filter(|_| picked(&balancer, now, &[]) == Some(addr(11)))
            .count();
        // Picked whenever drawn: first (10/20), or second after a light one (1/2 * 10/19),
        // so 1/2 + 5/19 = 0.763.
        assert!((7_300..=7_950).contains(&heavy), "heavy picks: {heavy}");
    }

    #[test]
    fn pending_raises_cost() {
        let now = Instant::now();
        let (a, b) = (endpoint(1, 1), endpoint(2, 1));
        let idle = a.cost(now);
        assert!((idle - DEFAULT_RTT.as_secs_f64()).abs() < 1e-12);
        let first = a.start(now);
        let second = a.start(now);
        assert_eq!(a.pending(), 2);
        assert!((a.cost(now) - 3.0 * idle).abs() < 1e-12);
        let balancer = balancer(&[Arc::clone(&a), b]);
        assert!((0..100).all(|_| picked(&balancer, now, &[]) == Some(addr(2))));
        drop(first);
        second.success(now);
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn weight_zero_counts_as_one() {
        assert_eq!(Endpoint::new(addr(1), 0, None).weight, 1);
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let now = Instant::now();
        let ep = endpoint(1, 1);
        assert!(!fail(&ep, now));
        assert!(!fail(&ep, now));
        ep.start(now).success(now);
        assert!(!fail(&ep, now));
        assert!(!fail(&ep, now));
        // A cancelled request is neither a success nor a failure.
        drop(ep.start(now));
        assert_eq!(ep.state(now), EndpointState::Healthy);
        assert!(fail(&ep, now));
        assert_eq!(ep.state(now), EndpointState::Ejected);
        assert_eq!(ep.ejections(), 1);
        assert_eq!(ep.pending(), 0);
    }

    #[test]
    fn breaker_off_never_ejects() {
        let now = Instant::now();
        let ep = endpoint(1, 1);
        let off = CircuitPolicy {
            consecutive_failures: 0,
            ..POLICY
        };
        assert!((0..100).all(|_| !ep.start(now).failure(now, &off)));
        assert_eq!(ep.state(now), EndpointState::Healthy);
        assert_eq!(ep.ejections(), 0);
    }

    #[test]
    fn failures_record_latency() {
        let now = Instant::now();
        let ep = endpoint(1, 1);
        assert!(!ep.start(now).failure(now + Duration::from_secs(2), &POLICY));
        assert!((ep.ewma_secs(now + Duration::from_secs(2)) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn all_ejected() {
        let now = Instant::now();
        let endpoints = [endpoint(1, 1), endpoint(2, 1)];
        let balancer = balancer(&endpoints);
        eject(&endpoints[0], now);
        assert!((0..50).all(|_| picked(&balancer, now, &[]) == Some(addr(2))));
        eject(&endpoints[1], now);
        assert_eq!(balancer.pick(now, &[]).err(), Some(PickError::AllEjected));
        assert_eq!(balancer.state_counts(now), (0, 2, 0));
    }

    #[test]
    fn probing_admits_one_request_at_a_time() {
        let now = Instant::now();
        let ep = endpoint(1, 1);
        let balancer = balancer(&[Arc::clone(&ep)]);
        eject(&ep, now);
        let almost = now + POLICY.base_ejection - Duration::from_millis(1);
        assert_eq!(
            balancer.pick(almost, &[]).err(),
            Some(PickError::AllEjected)
        );
        let later = now + POLICY.base_ejection;
        assert_eq!(ep.state(later), EndpointState::Probing);
        assert_eq!(balancer.state_counts(later), (0, 0, 1));
        let Ok(picked) = balancer.pick(later, &[]) else {
            panic!("the probe was not admitted")
        };
        let probe = picked.start(later);
        assert_eq!(balancer.pick(later, &[]).err(), Some(PickError::AllEjected));
        // A cancelled probe frees the slot.
        drop(probe);
        assert!(balancer.pick(later, &[]).is_ok());
    }

    #[test]
    fn old_requests_do_not_block_the_probe() {
        let now = Instant::now();
        let ep = endpoint(1, 1);
        let balancer = balancer(&[Arc::clone(&ep)]);
        let long_lived = ep.start(now);
        eject(&ep, now);
        let later = now + POLICY.base_ejection;
        assert!(balancer.pick(later, &[]).is_ok());
        drop(long_lived);
    }

    #[test]
    fn probe_failure_doubles_the_ejection_up_to_the_cap() {
        let mut now = Instant::now();
        let ep = endpoint(1, 1);
        eject(&ep, now);
        for secs in [1, 2, 4, 4] {
            let ejection = Duration::from_secs(secs);
            let almost = now + ejection - Duration::from_millis(1);
            assert_eq!(ep.state(almost), EndpointState::Ejected);
            now += ejection;
            assert_eq!(ep.state(now), EndpointState::Probing);
            let probe = ep.start(now);
            assert!(probe.failure(now, &POLICY));
        }
        assert_eq!(ep.ejections(), 5);
    }

    #[test]
    fn probe_success_restores() {
        let mut now = Instant::now();
        let ep = endpoint(1, 1);
        eject(&ep, now);
        now += Duration::from_secs(1);
        assert!(ep.start(now).failure(now, &POLICY));
        now += Duration::from_secs(2);
        ep.start(now).success(now);
        assert_eq!(ep.state(now), EndpointState::Healthy);
        // Failure count and backoff start over: N failures again, then the base ejection.
        eject(&ep, now);
        assert_eq!(
            ep.state(now + Duration::from_secs(1)),
            EndpointState::Probing
        );
    }

    #[test]
    fn avoid_is_a_preference() {
        let now = Instant::now();
        let endpoints = [endpoint(1, 1), endpoint(2, 1), endpoint(3, 1)];
        let balancer = balancer(&endpoints);
        let avoid = [addr(1), addr(2)];
        assert!((0..100).all(|_| picked(&balancer, now, &avoid) == Some(addr(3))));
        // The only alternative is ejected: take an avoided one rather than nothing.
        eject(&endpoints[2], now);
        assert!((0..100).all(|_| picked(&balancer, now, &avoid).is_some_and(|a| a != addr(3))));
        let single = balancer_of_one();
        assert_eq!(picked(&single, now, &[addr(1)]), Some(addr(1)));
    }

    fn balancer_of_one() -> Balancer {
        balancer(&[endpoint(1, 1)])
    }

    #[test]
    fn no_endpoints() {
        let balancer = Balancer::new(Vec::new());
        assert_eq!(
            balancer.pick(Instant::now(), &[]).err(),
            Some(PickError::NoEndpoints)
        );
        assert_eq!(balancer.state_counts(Instant::now()), (0, 0, 0));
    }

    #[test]
    fn finds_the_few_usable_endpoints_among_many() {
        // 98 of 100 ejected: random draws nearly always miss, the scan finds the two.
        let now = Instant::now();
        let endpoints: Vec<_> = (1..=100).map(|i| endpoint(i, 1)).collect();
        for ep in &endpoints[2..] {
            eject(ep, now);
        }
        let balancer = balancer(&endpoints);
        let mut counts = [0usize; 2];
        for _ in 0..1000 {
            match picked(&balancer, now, &[]) {
                Some(a) if a == addr(1) => counts[0] += 1,
                Some(a) if a == addr(2) => counts[1] += 1,
                other => panic!("picked {other:?}"),
            }
        }
        // Idle and equal: the first drawn wins the tie, so about half each.
        assert!(
            counts.iter().all(|&c| (400..=600).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(balancer.state_counts(now), (2, 98, 0));
    }

    #[test]
    fn new_balancers_draw_differently() {
        // The production constructor seeds itself; two of them should not agree on 64 picks.
        let endpoints: Vec<_> = (1..=8).map(|i| endpoint(i, 1)).collect();
        let now = Instant::now();
        let run = |b: &Balancer| (0..64).map(|_| picked(b, now, &[])).collect::<Vec<_>>();
        let (a, b) = (Balancer::new(endpoints.clone()), Balancer::new(endpoints));
        assert_ne!(run(&a), run(&b));
    }
}
