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

use tracing::debug;

/// At most one sweep per this many microseconds: a sweep walks the kernel's TCP hash tables
/// (every socket of the namespace, and the empty buckets), and each leaving connection that
/// waits asks for one at each of its looks.
const MIN_INTERVAL_US: u64 = 5_000;

pub struct Sweep {
    /// The iterator's pinned link.
    link: PathBuf,
    /// A sweep is running (on a blocking thread): requests meanwhile are dropped; the
    /// connections that wait ask again at their next look.
    running: Arc<AtomicBool>,
    /// Microseconds after `epoch` at which the last sweep started (0: never).
    last: AtomicU64,
    epoch: Instant,
    /// Sweeps started and finished so far: a request made when `started` was `n` is covered
    /// by sweep `n + 1` (one already running may have passed its socket).
    started: AtomicU64,
    finished: Arc<AtomicU64>,
}

impl Sweep {
    pub fn new(link: PathBuf) -> Sweep {
        Sweep {
            link,
            running: Arc::new(AtomicBool::new(false)),
            last: AtomicU64::new(0),
            epoch: Instant::now(),
            started: AtomicU64::new(0),
            finished: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sweeps finished so far.
    pub fn done(&self) -> u64 {
        self.finished.load(Ordering::Acquire)
    }

    /// Starts a sweep on a blocking thread (inline outside a tokio runtime), unless one runs
    /// or started within [`MIN_INTERVAL_US`]. Returns the number of the sweep that covers
    /// this request: once [`Sweep::done`] reaches it, a sweep started after the request and
    /// visited every socket (if this call did not start it, it may never start: the caller
    /// asks again at its next look).
    pub fn request(&self) -> u64 {
        let covering = self.started.load(Ordering::Acquire) + 1;
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < MIN_INTERVAL_US {
            return covering;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return covering;
        }
        self.last.store(now.max(1), Ordering::Relaxed);
        // Only the caller that set `running` gets here: this sweep is `covering`.
        self.started.store(covering, Ordering::Release);
        let link = self.link.clone();
        let running = Arc::clone(&self.running);
        let finished = Arc::clone(&self.finished);
        let sweep = move || {
            let t = Instant::now();
            match run(&link) {
                Ok(()) => debug!(took_us = t.elapsed().as_micros(), "release sweep"),
                Err(e) => {
                    debug!(link = %link.display(), error = %e, "the release sweep failed");
                }
            }
            finished.store(covering, Ordering::Release);
            running.store(false, Ordering::Release);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(sweep)),
            Err(_) => sweep(),
        }
        covering
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
        // Outside a runtime a sweep runs inline; this link does not exist, so it fails at
        // once, and still counts as done (the caller looks again either way).
        let s = Sweep::new(PathBuf::from("/nonexistent/mesh_release"));
        assert_eq!(s.done(), 0);
        assert_eq!(s.request(), 1);
        assert_eq!(s.done(), 1);
        // Within the interval no sweep starts: the request waits for the next one.
        assert_eq!(s.request(), 2);
        assert_eq!(s.done(), 1);
        std::thread::sleep(std::time::Duration::from_micros(MIN_INTERVAL_US + 1_000));
        assert_eq!(s.request(), 2);
        assert_eq!(s.done(), 2);
    }
}
