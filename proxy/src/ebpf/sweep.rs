//! The release sweep: reads the pinned link of `mesh_release` (an iter/tcp program,
//! `proxy-ebpf/src/sweep.rs`), which runs the program over every TCP socket of the proxy's
//! network namespace, when a leaving connection's proxy socket waits for a verdict that no
//! write of the proxy's would bring (it faces a workload that only sends).
//!
//! Reading a pinned iterator link opens a new iterator in the reader's namespace; the program
//! writes nothing, so the read returns end of file once every socket was visited.

use std::{
    fs::File,
    io::{self, Read as _},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus_client::metrics::counter::Counter;
use tracing::debug;

/// The process's release sweeps: how many ran, and the seconds they took (each walks every
/// TCP socket of the namespace and the hash tables' empty buckets). The metrics register
/// both.
pub struct SweepCounts {
    pub runs: Counter,
    pub seconds: Counter<f64>,
}

pub fn counts() -> &'static SweepCounts {
    static COUNTS: std::sync::OnceLock<SweepCounts> = std::sync::OnceLock::new();
    COUNTS.get_or_init(|| SweepCounts {
        runs: Counter::default(),
        seconds: Counter::default(),
    })
}

/// At most one sweep per this many microseconds: a sweep walks the kernel's TCP hash tables
/// (every socket of the namespace, and the empty buckets; about 0.9 ms here when idle, 3 ms
/// among 200 busy threads), and each leaving connection whose verdict waits asks for one at
/// its looks while nothing moves (`splice::SWEEP_WHILE_MOVING_US`).
const MIN_INTERVAL_US: u64 = 5_000;

pub struct Sweep {
    link: PathBuf,
    epoch: Instant,
    state: Arc<State>,
}

/// What the sweeper (one blocking thread at a time) and the requests share.
struct State {
    /// The sweeper runs: a request meanwhile only sets `pending`, and the sweeper sweeps
    /// again for it once the interval has passed.
    running: AtomicBool,
    /// A request came since the sweeper last started a sweep.
    pending: AtomicBool,
    /// Microseconds after `epoch` at which the last sweep started (0: never).
    last: AtomicU64,
    /// Sweeps started and finished so far: a request made when `started` was `n` is covered
    /// by sweep `n + 1` (one already running may have passed its socket).
    started: AtomicU64,
    finished: AtomicU64,
}

impl Sweep {
    pub fn new(link: PathBuf) -> Sweep {
        Sweep {
            link,
            epoch: Instant::now(),
            state: Arc::new(State {
                running: AtomicBool::new(false),
                pending: AtomicBool::new(false),
                last: AtomicU64::new(0),
                started: AtomicU64::new(0),
                finished: AtomicU64::new(0),
            }),
        }
    }

    /// Sweeps finished so far.
    pub fn done(&self) -> u64 {
        self.state.finished.load(Ordering::Acquire)
    }

    /// Asks for a sweep that starts after this call. Returns its number: once
    /// [`Sweep::done`] reaches it, a sweep started after the request visited every socket.
    /// Every request is served: one that comes while a sweep runs, or within
    /// [`MIN_INTERVAL_US`] of the last one's start, gets the sweeper's next sweep, as soon as
    /// the interval allows. Before, such a request was dropped and its connection asked
    /// again at its next look, up to 64 ms later (`splice::MAX_LEAVE_WAIT_US`): measured
    /// (`cargo xtask bench --streams-only`, 64 B x100), the proxy's socket facing the client
    /// left 1.0 to 1.4 s after its connection began leaving.
    pub fn request(&self) -> u64 {
        let covering = self.state.started.load(Ordering::Acquire) + 1;
        self.state.pending.store(true, Ordering::Release);
        if self.state.running.swap(true, Ordering::AcqRel) {
            // The sweeper sees `pending` before it stops (see `sweeper`).
            return covering;
        }
        let (link, epoch, state) = (self.link.clone(), self.epoch, Arc::clone(&self.state));
        let sweeper = move || sweeper(&link, epoch, &state);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(sweeper)),
            Err(_) => sweeper(),
        }
        covering
    }
}

/// Sweeps while requests come, at most one sweep per [`MIN_INTERVAL_US`], then stops.
fn sweeper(link: &PathBuf, epoch: Instant, state: &State) {
    let micros = || u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
    loop {
        let last = state.last.load(Ordering::Relaxed);
        let wait = (last + MIN_INTERVAL_US).saturating_sub(micros());
        if last != 0 && wait > 0 {
            std::thread::sleep(std::time::Duration::from_micros(wait));
        }
        // Cleared before the sweep is numbered: a request that read the old number set it
        // again after this, or is covered by this sweep, which starts after its read.
        state.pending.store(false, Ordering::Release);
        let n = state.started.load(Ordering::Relaxed) + 1;
        state.last.store(micros().max(1), Ordering::Relaxed);
        state.started.store(n, Ordering::Release);
        let t = Instant::now();
        let result = run(link);
        let took = t.elapsed();
        counts().runs.inc();
        counts().seconds.inc_by(took.as_secs_f64());
        match result {
            Ok(()) => debug!(took_us = took.as_micros(), "release sweep"),
            Err(e) => debug!(link = %link.display(), error = %e, "the release sweep failed"),
        }
        state.finished.store(n, Ordering::Release);
        if state.pending.load(Ordering::Acquire) {
            continue;
        }
        state.running.store(false, Ordering::Release);
        // A request between the load above and this store saw `running` still set and left
        // its sweep to us: take it, unless a new sweeper started for it meanwhile.
        if !state.pending.load(Ordering::Acquire) || state.running.swap(true, Ordering::AcqRel) {
            return;
        }
    }
}

/// One sweep: opens the pinned link and reads the iterator to its end.
fn run(link: &PathBuf) -> io::Result<()> {
    let mut file = File::open(link)?;
    let mut buf = [0u8; 64];
    while file.read(&mut buf)? > 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_covered_by_the_next_sweep_to_start() {
        // Outside a runtime the sweeper runs inline; this link does not exist, so each sweep
        // fails at once, and still counts as done (the caller looks again either way).
        let s = Sweep::new(PathBuf::from("/nonexistent/mesh_release"));
        assert_eq!(s.done(), 0);
        assert_eq!(s.request(), 1);
        assert_eq!(s.done(), 1);
        // Within the interval the request is not dropped: its sweep starts once the interval
        // has passed (inline here, so the call waits for it).
        let t = Instant::now();
        assert_eq!(s.request(), 2);
        assert_eq!(s.done(), 2);
        assert!(t.elapsed() >= std::time::Duration::from_micros(MIN_INTERVAL_US / 2));
        assert!(!s.state.running.load(Ordering::Acquire));
        assert!(!s.state.pending.load(Ordering::Acquire));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_while_a_sweep_runs_get_one_more_sweep() {
        let s = Sweep::new(PathBuf::from("/nonexistent/mesh_release"));
        let first = s.request();
        let later: Vec<u64> = (0..10).map(|_| s.request()).collect();
        let wanted = later.iter().copied().max().unwrap_or(first).max(first);
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while s.done() < wanted && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(s.done() >= wanted, "done {} of {wanted}", s.done());
        // Each served by a sweep started after it, and not one per request.
        assert!(s.done() <= 3, "{} sweeps for 11 requests", s.done());
    }
}
