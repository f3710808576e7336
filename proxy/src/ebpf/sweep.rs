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
}

impl Sweep {
    pub fn new(link: PathBuf) -> Sweep {
        Sweep {
            link,
            running: Arc::new(AtomicBool::new(false)),
            last: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Starts a sweep on a blocking thread (inline outside a tokio runtime), unless one runs
    /// or started within [`MIN_INTERVAL_US`].
    pub fn request(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < MIN_INTERVAL_US {
            return;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.last.store(now.max(1), Ordering::Relaxed);
        let link = self.link.clone();
        let running = Arc::clone(&self.running);
        let sweep = move || {
            if let Err(e) = run(&link) {
                debug!(link = %link.display(), error = %e, "the release sweep failed");
            }
            running.store(false, Ordering::Release);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(sweep)),
            Err(_) => sweep(),
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
