//! meshbench: the load generator and server `cargo xtask bench` runs inside pods (issue 7).
//!
//! One server (`meshbench serve`) handles every client mode on one port. Each connection
//! starts with a 16-byte header from the client: the magic `MBv1`, the mode as a
//! little-endian u32 (1 echo, 2 sink, 3 connect-only) and the message size as a
//! little-endian u64. Then:
//! - echo (`pingpong`): the client writes `size` bytes, the server reads exactly that many
//!   and writes them back; repeated until the client closes;
//! - sink (`stream`): the client writes messages of `size` bytes, then half-closes; the
//!   server answers with the number of bytes it read (little-endian u64) and closes;
//! - connect-only (`connrate`): the server closes as soon as it has the header.
//!
//! Every client run is bounded in count (rounds, bytes, connections) and in time
//! (`--max-seconds` or `--seconds`, plus a 30 s limit on any single socket operation). It
//! prints exactly one JSON object as its last stdout line and exits with
//! - 0: no errors and something was measured;
//! - 3: the run finished but errors were counted (or nothing was measured); the JSON still
//!   says what was measured, stderr says what failed;
//! - 2: invalid arguments; 1: the run could not happen at all.
//!
//! Every socket (client and server) has TCP_NODELAY set, so each message leaves when it is
//! written: the figures are those of the path between the pods, not of Nagle's algorithm.
//! One thread per connection on both sides keeps the code obvious; see `STACK_SIZE`.
//!
//! Every socket is non-blocking from its creation (the listener too), and a read or write
//! that would block waits in poll(2) (`Sock`), as event-driven programs do (Go, tokio, Java
//! NIO, nginx, Envoy). The proxy keeps blocking sockets off its short-circuit (a blocking
//! reader there can get a spurious EAGAIN from the kernel), so blocking I/O here would
//! measure plain TCP under every short-circuit scenario.

use std::{
    fmt::{Display, Write as _},
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    ops::RangeInclusive,
    os::fd::{AsFd, AsRawFd},
    process::ExitCode,
    sync::{
        Arc, Condvar, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{
        self as sock, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6,
        SockaddrStorage, sockopt,
    },
};

const MAGIC: &[u8; 4] = b"MBv1";
const HEADER_LEN: usize = 16;
/// No single client read, write or connect may stall longer than this; a stall is counted
/// as an error of that connection, never a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The server gives up on a silent connection after this. Longer than any wait of a client
/// (a pingpong connection idles at the start gate while others connect), so that a stall is
/// reported by the client, which knows what it was measuring.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Stack of every connection thread (client and server): they only hold a few locals, and
/// 1000 connections need 1000 threads on each side.
const STACK_SIZE: usize = 256 * 1024;
const MAX_CONNECTIONS: u64 = 4096;
/// Largest message. The echo server allocates a buffer of the size a client announces, so
/// this bounds what one connection can make it allocate.
const MAX_MESSAGE: u64 = 64 << 20;
/// Message buffers of all connections of one client run together.
const MAX_BUFFERS: u64 = 1 << 30;
/// Latency samples one pingpong run keeps (8 bytes each, 80 MB at most).
const MAX_SAMPLES: u64 = 10_000_000;
/// Upper bound of every duration argument.
const MAX_SECONDS: f64 = 3600.0;
/// Read size of the sink: iperf3's default, so stream figures are comparable to iperf3's.
const SINK_BUFFER: usize = 128 * 1024;
/// Client failures shown on stderr; the JSON counts all of them.
const SHOWN_FAILURES: usize = 5;
/// Server errors shown on stderr; a broken client must not flood the orchestrator's logs.
const SHOWN_SERVER_ERRORS: u64 = 20;
const EXIT_USAGE: u8 = 2;
const EXIT_ERRORS: u8 = 3;

const USAGE: &str = "usage:
  meshbench serve --listen ADDR [--max-seconds S]
  meshbench pingpong --connect ADDR --size N --connections C --rounds R [--warmup W] [--max-seconds S (60)]
  meshbench stream --connect ADDR --size N --connections C --seconds T [--max-bytes B (per connection)]
  meshbench connrate --connect ADDR --connections C --count K [--max-seconds S (60)]
  meshbench http --url http://ADDR:PORT/PATH --rate REQ_PER_S --connections C --seconds T";

// === impl Header ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Read `size` bytes, write them back, until end of stream.
    Echo = 1,
    /// Read and count until end of stream, answer with the count.
    Sink = 2,
    /// Close right after the header.
    Connect = 3,
}

/// The first 16 bytes a client sends on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    mode: Mode,
    /// Message size; only echo uses it (sink reads whatever comes).
    size: u64,
}

impl Header {
    fn encode(self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&(self.mode as u32).to_le_bytes());
        h[8..].copy_from_slice(&self.size.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Result<Header> {
        if &h[..4] != MAGIC {
            bail!(
                "bad magic {:02x?}: the peer is not a meshbench client, or the stream is out of step",
                &h[..4]
            );
        }
        let mode = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let mode = match mode {
            1 => Mode::Echo,
            2 => Mode::Sink,
            3 => Mode::Connect,
            _ => bail!("unknown mode {mode} (1 echo, 2 sink, 3 connect-only)"),
        };
        let mut size = [0u8; 8];
        size.copy_from_slice(&h[8..]);
        Ok(Header {
            mode,
            size: u64::from_le_bytes(size),
        })
    }
}

// === server ===

/// Binds with a backlog of `net.core.somaxconn`. std's `TcpListener::bind` listens with a
/// backlog of 128: a connrate run with more threads than that overflows the accept queue,
/// and the dropped SYNs are retried after 1 s, so the run would measure the retransmit
/// timer instead of the path.
fn bind_listener(addr: SocketAddr) -> Result<TcpListener> {
    let fd = nonblocking_socket(addr).context("socket")?;
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    match addr {
        SocketAddr::V4(a) => sock::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => sock::bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    }
    .with_context(|| format!("bind {addr}"))?;
    sock::listen(&fd, Backlog::MAXALLOWABLE).context("listen")?;
    Ok(TcpListener::from(fd))
}

/// Serves every client mode on `listener` (non-blocking: accept waits in poll), one thread
/// per connection, until the process ends. Errors of single connections go to stderr (the
/// first few only).
fn serve(listener: TcpListener) {
    loop {
        match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                if let Err(e) = poll(&mut fds, PollTimeout::NONE)
                    && e != Errno::EINTR
                {
                    server_error(format_args!("poll on the listener: {e}"));
                    thread::sleep(Duration::from_millis(10));
                }
            }
            Ok((s, peer)) => {
                let spawned = thread::Builder::new()
                    .stack_size(STACK_SIZE)
                    .spawn(move || {
                        if let Err(e) = serve_conn(s) {
                            server_error(format_args!("connection from {peer}: {e:#}"));
                        }
                    });
                // On failure the closure, and with it the connection, is dropped: the
                // client sees the close and counts an error.
                if let Err(e) = spawned {
                    server_error(format_args!("no thread for a connection from {peer}: {e}"));
                }
            }
            Err(e) => {
                server_error(format_args!("accept: {e}"));
                // Out of file descriptors or memory: do not spin on the error.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn server_error(what: impl Display) {
    static ERRORS: AtomicU64 = AtomicU64::new(0);
    let n = ERRORS.fetch_add(1, Ordering::Relaxed);
    if n < SHOWN_SERVER_ERRORS {
        eprintln!("meshbench serve: {what}");
    }
    if n + 1 == SHOWN_SERVER_ERRORS {
        eprintln!("meshbench serve: further errors are not shown");
    }
}

fn serve_conn(s: TcpStream) -> Result<()> {
    let mut s = Sock::new(s, SERVER_IDLE_TIMEOUT).context("socket options")?;
    let mut h = [0u8; HEADER_LEN];
    read_full(&mut s, &mut h).map_err(|e| io_error("read header", e))?;
    let h = Header::decode(&h)?;
    match h.mode {
        Mode::Echo => echo(&mut s, h.size),
        Mode::Sink => sink(&mut s),
        Mode::Connect => Ok(()),
    }
}

fn echo(s: &mut Sock, size: u64) -> Result<()> {
    if !(1..=MAX_MESSAGE).contains(&size) {
        bail!("echo message size {size} is outside 1..={MAX_MESSAGE}");
    }
    let mut buf = vec![0u8; usize::try_from(size)?];
    while read_message(s, &mut buf).map_err(|e| io_error("read message", e))? {
        s.write_all(&buf).map_err(|e| io_error("write echo", e))?;
    }
    Ok(())
}

/// Fills `buf`. `Ok(false)` when the peer closed before the first byte: the clean end of a
/// run, between two messages. A close inside a message is an error.
fn read_message(s: &mut Sock, buf: &mut [u8]) -> io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match s.read(&mut buf[at..]) {
            Ok(0) if at == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("end of stream after {at} of {} bytes", buf.len()),
                ));
            }
            Ok(n) => at += n,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn sink(s: &mut Sock) -> Result<()> {
    let mut buf = vec![0u8; SINK_BUFFER];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => return Err(io_error("read", e)),
        }
    }
    s.write_all(&total.to_le_bytes())
        .map_err(|e| io_error("write the byte count", e))
}

// === client: shared parts ===

/// A connected non-blocking socket with TCP_NODELAY whose reads and writes wait in poll(2)
/// when they would block, at most `timeout` each (then they fail with `TimedOut`).
struct Sock {
    s: TcpStream,
    timeout: Duration,
}

impl Sock {
    fn new(s: TcpStream, timeout: Duration) -> io::Result<Sock> {
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        Ok(Sock { s, timeout })
    }

    /// Connects a socket that is non-blocking from its creation, waiting at most `timeout`.
    fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Sock> {
        let fd = nonblocking_socket(addr)?;
        match sock::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
            Ok(()) => {}
            Err(Errno::EINPROGRESS) => {
                wait(fd.as_fd(), PollFlags::POLLOUT, timeout)?;
                let err = sock::getsockopt(&fd, sockopt::SocketError)?;
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(err));
                }
            }
            Err(e) => return Err(e.into()),
        }
        Sock::new(TcpStream::from(fd), timeout)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.s.shutdown(Shutdown::Write)
    }
}

/// A TCP socket of `addr`'s family, non-blocking from its creation (the proxy judges a
/// client by its mode at connect and a server by its listener's).
fn nonblocking_socket(addr: SocketAddr) -> nix::Result<std::os::fd::OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    sock::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
}

/// Waits until `fd` is ready for `flags`, at most `timeout` (`TimedOut` after that).
fn wait(fd: std::os::fd::BorrowedFd<'_>, flags: PollFlags, timeout: Duration) -> io::Result<()> {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let mut fds = [PollFd::new(fd, flags)];
    match poll(
        &mut fds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(0) => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
        // The caller retries, and polls again if it must.
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Sock {
    /// Runs `op` until it neither would block (then waits in poll for `ready`) nor was
    /// interrupted: reads and writes through a `Sock` never return `WouldBlock` or
    /// `Interrupted`.
    fn retry<T>(
        &mut self,
        ready: PollFlags,
        mut op: impl FnMut(&mut TcpStream) -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            match op(&mut self.s) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(self.s.as_fd(), ready, self.timeout)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(PollFlags::POLLIN, |s| s.read(buf))
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(PollFlags::POLLOUT, |s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects (within `IO_TIMEOUT` and the run's deadline) and sends the header.
fn open(addr: SocketAddr, header: Header, deadline: Instant) -> Result<Sock> {
    let timeout = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), IO_TIMEOUT);
    let mut s = match Sock::connect(addr, timeout) {
        Ok(s) => s,
        Err(e) => bail!(
            "{:#}; is `meshbench serve` listening there?",
            io_error(format_args!("connect {addr}"), e)
        ),
    };
    s.timeout = IO_TIMEOUT;
    s.write_all(&header.encode())
        .map_err(|e| io_error("write header", e))?;
    Ok(s)
}

/// Names the operation and turns a socket timeout (EAGAIN on Linux) into words.
fn io_error(what: impl Display, e: io::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            anyhow!("{what}: timed out; is the peer stalled or are packets dropped?")
        }
        _ => anyhow!(e).context(what.to_string()),
    }
}

/// `read_exact` with an error that says how far it got.
fn read_full(s: &mut Sock, buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match s.read(&mut buf[at..])? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("end of stream after {at} of {} bytes", buf.len()),
                ));
            }
            n => at += n,
        }
    }
    Ok(())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Deterministic bytes, different per connection, so an echo from the wrong connection or
/// a shifted stream does not compare equal.
fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15 | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Starts the measurement of all connection threads together, once every one is ready
/// (connected, warmed up) or the deadline has passed, so connection set-up does not overlap
/// the measurement. A thread that could not get ready (an error) arrives all the same.
///
/// The threads wait on a read lock that `run_threads` holds for writing until then; when it
/// lets go, all are woken together and none has to wait for another to hand a mutex on.
/// They still need a CPU each: with 1000 threads on 2 CPUs the last ones begin up to a
/// second late, which is why a stream run ends at one common instant (see `stream_send`).
struct Gate {
    ready: Mutex<usize>,
    all_ready: Condvar,
    /// Write-locked by `run_threads` until the start, then the instant of the start.
    start: RwLock<Option<Instant>>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            ready: Mutex::new(0),
            all_ready: Condvar::new(),
            start: RwLock::new(None),
        }
    }

    /// Called once by every connection thread; returns when the measurement starts, with
    /// the instant it started.
    fn arrive(&self) -> Instant {
        // The state stays consistent even if a holder panicked: a counter, an instant.
        *self.ready.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.all_ready.notify_one();
        let start = *self.start.read().unwrap_or_else(|p| p.into_inner());
        start.unwrap_or_else(Instant::now)
    }

    /// Waits until `n` threads have arrived or the deadline has passed.
    fn wait_ready(&self, n: usize, deadline: Instant) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        while *ready < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            ready = match self.all_ready.wait_timeout(ready, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// Runs `f(i)` for `i` in `0..n`, one small-stack thread each, which must call
/// `gate.arrive()` once; starts them through the gate and collects what they return, plus
/// a failure for each thread that could not be spawned or panicked. All threads share the
/// one `f` (and what it captured).
fn run_threads<T, F>(n: usize, gate: &Gate, deadline: Instant, f: F) -> (Vec<T>, Vec<String>)
where
    T: Send + 'static,
    F: Fn(usize) -> T + Send + Sync + 'static,
{
    let mut start = gate.start.write().unwrap_or_else(|p| p.into_inner());
    let f = Arc::new(f);
    let mut handles = Vec::with_capacity(n);
    let mut failures = Vec::new();
    for i in 0..n {
        let f = Arc::clone(&f);
        match thread::Builder::new()
            .name(format!("conn-{i}"))
            .stack_size(STACK_SIZE)
            .spawn(move || f(i))
        {
            Ok(h) => handles.push(h),
            Err(e) => failures.push(format!("connection {i}: no thread: {e}")),
        }
    }
    gate.wait_ready(handles.len(), deadline);
    *start = Some(Instant::now());
    drop(start);
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok(t) => out.push(t),
            Err(_) => failures.push("a connection thread panicked".to_string()),
        }
    }
    (out, failures)
}

// === pingpong ===

#[derive(Debug, Clone)]
struct PingpongArgs {
    connect: SocketAddr,
    size: usize,
    connections: usize,
    rounds: usize,
    warmup: u64,
    max_time: Duration,
}

#[derive(Debug)]
struct PingpongReport {
    size: usize,
    connections: usize,
    round_trips: u64,
    /// None when no round trip was measured.
    latency: Option<Latency>,
    errors: u64,
    failures: Vec<String>,
    /// `--max-seconds` ended the run before every connection did its rounds.
    stopped_early: bool,
}

struct PingpongConn {
    /// Round-trip times in nanoseconds, also those measured before an error.
    samples: Vec<u64>,
    error: Option<String>,
}

fn pingpong(a: &PingpongArgs) -> PingpongReport {
    let deadline = Instant::now() + a.max_time;
    let gate = Arc::new(Gate::new());
    let shared = (a.clone(), Arc::clone(&gate));
    let (conns, mut failures) = run_threads(a.connections, &gate, deadline, move |i| {
        let (a, gate) = &shared;
        pingpong_conn(a, i, gate, deadline)
    });
    let stopped_early = conns
        .iter()
        .any(|c| c.error.is_none() && c.samples.len() < a.rounds);
    let mut samples = Vec::with_capacity(conns.iter().map(|c| c.samples.len()).sum());
    for c in conns {
        samples.extend_from_slice(&c.samples);
        failures.extend(c.error);
    }
    samples.sort_unstable();
    PingpongReport {
        size: a.size,
        connections: a.connections,
        round_trips: samples.len() as u64,
        latency: Latency::of_sorted(&samples),
        errors: failures.len() as u64,
        failures,
        stopped_early,
    }
}

fn pingpong_conn(a: &PingpongArgs, i: usize, gate: &Gate, deadline: Instant) -> PingpongConn {
    let mut samples = Vec::with_capacity(a.rounds);
    let mut send = vec![0u8; a.size];
    fill_pattern(&mut send, i as u64);
    let mut recv = vec![0u8; a.size];
    let header = Header {
        mode: Mode::Echo,
        size: a.size as u64,
    };
    let ready = open(a.connect, header, deadline).and_then(|mut s| {
        for round in 0..a.warmup {
            let (_, end) = round_trip(&mut s, &mut send, &mut recv, round)?;
            if end >= deadline {
                break;
            }
        }
        Ok(s)
    });
    gate.arrive();
    let measured = ready.and_then(|mut s| {
        if Instant::now() >= deadline {
            return Ok(());
        }
        for round in 0..a.rounds as u64 {
            let (rtt, end) = round_trip(&mut s, &mut send, &mut recv, a.warmup + round)?;
            samples.push(rtt);
            if end >= deadline {
                break;
            }
        }
        Ok(())
    });
    PingpongConn {
        samples,
        error: measured.err().map(|e| format!("connection {i}: {e:#}")),
    }
}

/// One measured round trip: returns its time in nanoseconds and when it ended. The round
/// number is stamped into the message, so a stale or repeated echo does not verify.
fn round_trip(
    s: &mut Sock,
    send: &mut [u8],
    recv: &mut [u8],
    round: u64,
) -> Result<(u64, Instant)> {
    let stamp = round.to_le_bytes();
    let n = send.len().min(stamp.len());
    send[..n].copy_from_slice(&stamp[..n]);
    let start = Instant::now();
    s.write_all(send).map_err(|e| io_error("write", e))?;
    read_full(s, recv).map_err(|e| io_error("read echo", e))?;
    let end = Instant::now();
    if recv != send {
        bail!("round {round}: the echo differs from what was sent");
    }
    Ok((nanos(end - start), end))
}

/// Latency summary in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    min: u64,
    max: u64,
    mean: f64,
}

impl Latency {
    fn of_sorted(sorted: &[u64]) -> Option<Latency> {
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        let sum: u128 = sorted.iter().map(|&v| u128::from(v)).sum();
        Some(Latency {
            p50: nearest_rank(sorted, 500)?,
            p90: nearest_rank(sorted, 900)?,
            p99: nearest_rank(sorted, 990)?,
            p999: nearest_rank(sorted, 999)?,
            min,
            max,
            mean: sum as f64 / sorted.len() as f64,
        })
    }
}

/// Nearest-rank percentile of ascending `sorted`, the percentile given in per mille (p99.9
/// is 999): the smallest sample with at least that share of all samples at or below it.
/// Integer arithmetic, so 99.9 % of 1000 samples is rank 999 exactly (in floating point
/// 99.9 / 100 * 1000 is 999.0000000000001, whose ceiling is 1000). None without samples.
fn nearest_rank(sorted: &[u64], per_mille: u64) -> Option<u64> {
    let n = sorted.len() as u128;
    let rank = (u128::from(per_mille) * n)
        .div_ceil(1000)
        .clamp(1, n.max(1));
    sorted.get(usize::try_from(rank - 1).ok()?).copied()
}

impl PingpongReport {
    fn json(&self) -> String {
        let us = |f: fn(&Latency) -> f64| self.latency.as_ref().map(|l| f(l) / 1e3);
        Json::new("pingpong")
            .int("size", self.size as u64)
            .int("connections", self.connections as u64)
            .int("round_trips", self.round_trips)
            .num("p50_us", us(|l| l.p50 as f64), 3)
            .num("p90_us", us(|l| l.p90 as f64), 3)
            .num("p99_us", us(|l| l.p99 as f64), 3)
            .num("p999_us", us(|l| l.p999 as f64), 3)
            .num("min_us", us(|l| l.min as f64), 3)
            .num("max_us", us(|l| l.max as f64), 3)
            .num("mean_us", us(|l| l.mean), 3)
            .int("errors", self.errors)
            .finish()
    }
}

// === stream ===

#[derive(Debug, Clone)]
struct StreamArgs {
    connect: SocketAddr,
    size: usize,
    connections: usize,
    time: Duration,
    /// Per connection; a connection never sends more than this.
    max_bytes: u64,
}

#[derive(Debug)]
struct StreamReport {
    size: usize,
    connections: usize,
    /// From the first write of any connection to the last confirmed count.
    seconds: f64,
    /// Bytes the server confirmed, over the connections without errors.
    bytes: u64,
    msgs: u64,
    /// Mean time from a connection's header being sent to its first stream write (the wait at
    /// the start gate for the others), in ms: what a proxy's figures timed from the first
    /// bytes it relayed include before the stream itself began.
    gate_wait_ms: Option<f64>,
    /// The longest time from the common end of writing to a connection's confirmed count, in
    /// ms: what draining the queues took. One slow connection stretches the run's time and
    /// cuts its figure, so this tells a stall apart from a slower path.
    drain_ms_max: Option<f64>,
    /// Bytes written in each [`TIMELINE_STEP`] after the common start, over all connections
    /// (the last window may be partial): where in the run a slower path loses its time.
    timeline: Vec<u64>,
    errors: u64,
    failures: Vec<String>,
}

/// The width of one `timeline` window of `stream`.
const TIMELINE_STEP: Duration = Duration::from_millis(100);

struct StreamDone {
    /// When the header went out (the connection was open).
    opened: Instant,
    /// When writing was to stop (the common start plus `--seconds`).
    end: Instant,
    /// None when the connection started too late to write anything.
    first_write: Option<Instant>,
    confirmed: Instant,
    bytes: u64,
    msgs: u64,
    /// Bytes written per `TIMELINE_STEP` since the common start.
    timeline: Vec<u64>,
}

fn stream(a: &StreamArgs) -> StreamReport {
    let connect_deadline = Instant::now() + IO_TIMEOUT;
    let gate = Arc::new(Gate::new());
    let shared = (a.clone(), Arc::clone(&gate));
    let (conns, mut failures) = run_threads(a.connections, &gate, connect_deadline, move |i| {
        let (a, gate) = &shared;
        stream_conn(a, i, gate, connect_deadline)
    });
    let mut done = Vec::with_capacity(conns.len());
    for c in conns {
        match c {
            Ok(d) => done.push(d),
            Err(e) => failures.push(e),
        }
    }
    let first = done.iter().filter_map(|d| d.first_write).min();
    let last = done.iter().map(|d| d.confirmed).max();
    let seconds = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    let waits: Vec<f64> = done
        .iter()
        .filter_map(|d| d.first_write.map(|f| (f - d.opened).as_secs_f64() * 1000.0))
        .collect();
    let gate_wait_ms = (!waits.is_empty()).then(|| waits.iter().sum::<f64>() / waits.len() as f64);
    let drain_ms_max = done
        .iter()
        .map(|d| d.confirmed.saturating_duration_since(d.end).as_secs_f64() * 1000.0)
        .reduce(f64::max);
    StreamReport {
        size: a.size,
        connections: a.connections,
        seconds,
        bytes: done.iter().map(|d| d.bytes).sum(),
        msgs: done.iter().map(|d| d.msgs).sum(),
        gate_wait_ms,
        drain_ms_max,
        timeline: sum_timelines(done.iter().map(|d| d.timeline.as_slice())),
        errors: failures.len() as u64,
        failures,
    }
}

/// Per-window sums of several timelines of different lengths.
fn sum_timelines<'a>(all: impl Iterator<Item = &'a [u64]>) -> Vec<u64> {
    let mut sum: Vec<u64> = Vec::new();
    for t in all {
        if sum.len() < t.len() {
            sum.resize(t.len(), 0);
        }
        for (s, b) in sum.iter_mut().zip(t) {
            *s += b;
        }
    }
    sum
}

fn stream_conn(
    a: &StreamArgs,
    i: usize,
    gate: &Gate,
    connect_deadline: Instant,
) -> Result<StreamDone, String> {
    let mut buf = vec![0u8; a.size];
    fill_pattern(&mut buf, i as u64);
    let header = Header {
        mode: Mode::Sink,
        size: a.size as u64,
    };
    let ready = open(a.connect, header, connect_deadline);
    let opened = Instant::now();
    let start = gate.arrive();
    ready
        .and_then(|mut s| stream_send(&mut s, a, &buf, start, opened))
        .map_err(|e| format!("connection {i}: {e:#}"))
}

/// Sends whole messages until `--seconds` after the common start (or `--max-bytes`), then
/// half-closes and checks the server's count. All connections stop at the same instant,
/// however late the scheduler let one of them begin: with a window per connection, 1000
/// connections of 1 s each took 22 s on 2 CPUs, the late ones sending alone. A connection
/// that only gets a CPU after the end sends nothing, and that is not an error.
fn stream_send(
    s: &mut Sock,
    a: &StreamArgs,
    buf: &[u8],
    start: Instant,
    opened: Instant,
) -> Result<StreamDone> {
    let size = buf.len() as u64;
    let end = start + a.time;
    let (mut sent, mut msgs, mut first_write) = (0u64, 0u64, None);
    let mut timeline: Vec<u64> = Vec::new();
    // `sent <= max_bytes` always holds, so the subtraction cannot underflow.
    while a.max_bytes - sent >= size {
        let now = Instant::now();
        if now >= end {
            break;
        }
        first_write.get_or_insert(now);
        s.write_all(buf).map_err(|e| io_error("write", e))?;
        sent += size;
        msgs += 1;
        // The window the write started in (no second clock read per write).
        let window =
            (now.saturating_duration_since(start).as_nanos() / TIMELINE_STEP.as_nanos()) as usize;
        if timeline.len() <= window {
            timeline.resize(window + 1, 0);
        }
        timeline[window] += size;
    }
    s.shutdown_write()
        .map_err(|e| io_error("shutdown(write)", e))?;
    let mut count = [0u8; 8];
    read_full(s, &mut count).map_err(|e| io_error("read the server's byte count", e))?;
    let confirmed = Instant::now();
    let count = u64::from_le_bytes(count);
    if count != sent {
        bail!("the server counted {count} bytes, {sent} were sent");
    }
    Ok(StreamDone {
        opened,
        end,
        first_write,
        confirmed,
        bytes: sent,
        msgs,
        timeline,
    })
}

impl StreamReport {
    fn json(&self) -> String {
        let rate = |v: u64| Some(v as f64 / self.seconds);
        Json::new("stream")
            .int("size", self.size as u64)
            .int("connections", self.connections as u64)
            .num("seconds", Some(self.seconds), 6)
            .int("bytes", self.bytes)
            .num("gbit_per_s", rate(self.bytes).map(|r| r * 8.0 / 1e9), 3)
            .num("msgs_per_s", rate(self.msgs), 1)
            .num("gate_wait_ms", self.gate_wait_ms, 1)
            .num("drain_ms_max", self.drain_ms_max, 1)
            .ints("timeline_bytes", &self.timeline)
            .int("timeline_step_ms", TIMELINE_STEP.as_millis() as u64)
            .int("errors", self.errors)
            .finish()
    }
}

// === connrate ===

#[derive(Debug, Clone)]
struct ConnrateArgs {
    connect: SocketAddr,
    connections: usize,
    count: u64,
    max_time: Duration,
}

#[derive(Debug)]
struct ConnrateReport {
    connections: usize,
    /// Connections completed without error.
    count: u64,
    seconds: f64,
    /// Failed attempts.
    errors: u64,
    failures: Vec<String>,
    stopped_early: bool,
}

struct ConnrateWorker {
    start: Instant,
    end: Instant,
    done: u64,
    errors: u64,
    first_error: Option<String>,
}

fn connrate(a: &ConnrateArgs) -> ConnrateReport {
    let deadline = Instant::now() + a.max_time;
    let threads = a
        .connections
        .min(usize::try_from(a.count).unwrap_or(usize::MAX));
    let gate = Arc::new(Gate::new());
    let shared = (a.clone(), Arc::clone(&gate), AtomicU64::new(0));
    let (workers, mut failures) = run_threads(threads, &gate, deadline, move |i| {
        let (a, gate, claimed) = &shared;
        gate.arrive();
        connrate_worker(a, i, claimed, deadline)
    });
    let start = workers.iter().map(|w| w.start).min();
    let end = workers.iter().map(|w| w.end).max();
    let seconds = match (start, end) {
        (Some(s), Some(e)) => (e - s).as_secs_f64(),
        _ => 0.0,
    };
    let count = workers.iter().map(|w| w.done).sum();
    let errors = workers.iter().map(|w| w.errors).sum::<u64>() + failures.len() as u64;
    failures.extend(workers.into_iter().filter_map(|w| w.first_error));
    ConnrateReport {
        connections: a.connections,
        count,
        seconds,
        errors,
        failures,
        stopped_early: count + errors < a.count,
    }
}

fn connrate_worker(
    a: &ConnrateArgs,
    i: usize,
    claimed: &AtomicU64,
    deadline: Instant,
) -> ConnrateWorker {
    let mut w = ConnrateWorker {
        start: Instant::now(),
        end: Instant::now(),
        done: 0,
        errors: 0,
        first_error: None,
    };
    while Instant::now() < deadline && claimed.fetch_add(1, Ordering::Relaxed) < a.count {
        match connect_only(a.connect, deadline) {
            Ok(()) => w.done += 1,
            Err(e) => {
                w.errors += 1;
                if w.first_error.is_none() {
                    w.first_error = Some(format!("connection thread {i}: {e:#}"));
                }
            }
        }
    }
    w.end = Instant::now();
    w
}

/// Opens a connect-only connection and waits for the server to close it first, so the
/// server side holds the TIME_WAIT state and the client's ports are free at once.
fn connect_only(addr: SocketAddr, deadline: Instant) -> Result<()> {
    let header = Header {
        mode: Mode::Connect,
        size: 0,
    };
    let mut s = open(addr, header, deadline)?;
    let mut b = [0u8; 1];
    // `Sock::read` retries EINTR and waits in poll: one call sees the close or data.
    match s.read(&mut b) {
        Ok(0) => Ok(()),
        Ok(_) => bail!("the server sent data on a connect-only connection"),
        Err(e) => Err(io_error("wait for the server's close", e)),
    }
}

impl ConnrateReport {
    fn json(&self) -> String {
        Json::new("connrate")
            .int("connections", self.connections as u64)
            .int("count", self.count)
            .num("seconds", Some(self.seconds), 6)
            .num("conn_per_s", Some(self.count as f64 / self.seconds), 1)
            .int("errors", self.errors)
            .finish()
    }
}

// === impl Json ===

/// One flat JSON object of numbers and lists of integers. The keys are literals of this file and need no
/// escaping; a number that is not finite (a rate over zero seconds) is written as null.
struct Json(String);

impl Json {
    fn new(mode: &str) -> Json {
        Json(format!("{{\"mode\":\"{mode}\""))
    }

    fn int(mut self, key: &str, v: u64) -> Json {
        let _ = write!(self.0, ",\"{key}\":{v}");
        self
    }

    fn ints(mut self, key: &str, v: &[u64]) -> Json {
        let list: Vec<String> = v.iter().map(u64::to_string).collect();
        let _ = write!(self.0, ",\"{key}\":[{}]", list.join(","));
        self
    }

    fn num(mut self, key: &str, v: Option<f64>, decimals: usize) -> Json {
        let _ = match v.filter(|v| v.is_finite()) {
            Some(v) => write!(self.0, ",\"{key}\":{v:.decimals$}"),
            None => write!(self.0, ",\"{key}\":null"),
        };
        self
    }

    fn finish(self) -> String {
        let mut j = self;
        j.0.push('}');
        j.0
    }
}

// === client: fixed-rate HTTP/1.1 ===

/// `http`: GET requests over keep-alive connections at a fixed total rate. Latency is taken
/// from each request's scheduled send time, not from when it was actually sent, so a slow
/// response delays the next request's clock instead of hiding it (no coordinated omission).
#[derive(Clone)]
struct HttpArgs {
    connect: SocketAddr,
    host: String,
    path: String,
    rate: u64,
    connections: usize,
    time: Duration,
}

struct HttpConn {
    samples: Vec<u64>,
    errors: u64,
    error: Option<String>,
}

struct HttpReport {
    rate: u64,
    connections: usize,
    requests: u64,
    errors: u64,
    seconds: f64,
    latency: Option<Latency>,
    failures: Vec<String>,
}

/// Largest response the client accepts (headers and body): the origin's answers are tiny.
const HTTP_BUFFER: usize = 64 * 1024;

fn parse_url(url: &str) -> Result<(SocketAddr, String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url:?} must start with http://"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("--url {url:?}: {host:?} is not ADDRESS:PORT"))?;
    Ok((addr, host.to_string(), path.to_string()))
}

fn httprate(a: &HttpArgs) -> HttpReport {
    let gate = Arc::new(Gate::new());
    let deadline = Instant::now() + a.time + IO_TIMEOUT;
    let (args, g) = (Arc::new(a.clone()), Arc::clone(&gate));
    let started = Instant::now();
    let (conns, mut failures) = run_threads(a.connections, &gate, deadline, move |i| {
        http_conn(&args, i, &g)
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    let mut errors = failures.len() as u64;
    for (i, c) in conns.into_iter().enumerate() {
        samples.extend(c.samples);
        errors += c.errors;
        if let Some(e) = c.error {
            failures.push(format!("connection {i}: {e}"));
        }
    }
    samples.sort_unstable();
    HttpReport {
        rate: a.rate,
        connections: a.connections,
        requests: samples.len() as u64,
        errors,
        seconds,
        latency: Latency::of_sorted(&samples),
        failures,
    }
}

fn http_conn(a: &HttpArgs, i: usize, gate: &Gate) -> HttpConn {
    let mut out = HttpConn {
        samples: Vec::new(),
        errors: 0,
        error: None,
    };
    let conn = Sock::connect(a.connect, IO_TIMEOUT)
        .map_err(|e| io_error(format_args!("connect {}", a.connect), e));
    let start = gate.arrive();
    let mut s = match conn {
        Ok(s) => s,
        Err(e) => {
            out.errors += 1;
            out.error = Some(format!("{e:#}"));
            return out;
        }
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: meshbench\r\n\r\n",
        a.path, a.host
    );
    let mut buf = vec![0u8; HTTP_BUFFER];
    // Each connection carries rate / connections requests per second, its schedule offset
    // so the connections' requests interleave evenly.
    let interval = a.connections as f64 / a.rate as f64;
    let end = start + a.time;
    for k in 0u64.. {
        let due = start
            + Duration::from_secs_f64(interval * (k as f64 + i as f64 / a.connections as f64));
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        match http_exchange(&mut s, request.as_bytes(), &mut buf) {
            Ok(()) => out
                .samples
                .push(nanos(Instant::now().saturating_duration_since(due))),
            Err(e) => {
                // A failed exchange leaves the connection in an unknown state: stop it.
                out.errors += 1;
                out.error = Some(format!("request {k}: {e:#}"));
                break;
            }
        }
    }
    out
}

/// One request and its complete response (status 200, Content-Length framing).
fn http_exchange(s: &mut Sock, request: &[u8], buf: &mut [u8]) -> Result<()> {
    s.write_all(request)
        .map_err(|e| io_error("write request", e))?;
    let mut have = 0;
    loop {
        if have == buf.len() {
            bail!("response larger than {} bytes", buf.len());
        }
        let n = s
            .read(&mut buf[have..])
            .map_err(|e| io_error("read response", e))?;
        if n == 0 {
            bail!("the server closed the connection mid-response");
        }
        have += n;
        let Some(head_end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..head_end]).context("non-UTF-8 response head")?;
        let status = head.lines().next().unwrap_or("");
        if !status.starts_with("HTTP/1.1 200") {
            bail!("unexpected status line {status:?}");
        }
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("response without Content-Length")?;
        let total = head_end + 4 + len;
        if total > buf.len() {
            bail!(
                "response of {total} bytes is larger than {} bytes",
                buf.len()
            );
        }
        while have < total {
            let n = s
                .read(&mut buf[have..total])
                .map_err(|e| io_error("read body", e))?;
            if n == 0 {
                bail!("the server closed the connection mid-body");
            }
            have += n;
        }
        if have != total {
            bail!(
                "{} bytes after the response (no request was pipelined)",
                have - total
            );
        }
        return Ok(());
    }
}

impl HttpReport {
    fn json(&self) -> String {
        let us = |f: fn(&Latency) -> u64| self.latency.as_ref().map(|l| f(l) as f64 / 1000.0);
        Json::new("http")
            .int("rate", self.rate)
            .int("connections", self.connections as u64)
            .int("requests", self.requests)
            .num("seconds", Some(self.seconds), 6)
            .num("p50_us", us(|l| l.p50), 3)
            .num("p90_us", us(|l| l.p90), 3)
            .num("p99_us", us(|l| l.p99), 3)
            .num("p999_us", us(|l| l.p999), 3)
            .int("errors", self.errors)
            .finish()
    }
}

// === CLI ===

/// `--name value` pairs after the subcommand; unknown, repeated or valueless flags are
/// errors, and every value is checked against its range here, once.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String], known: &[&str]) -> Result<Flags> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut it = args.iter();
        while let Some(name) = it.next() {
            if !known.contains(&name.as_str()) {
                bail!("unknown argument {name:?}; expected {}", known.join(", "));
            }
            let Some(value) = it.next() else {
                bail!("{name} needs a value")
            };
            if out.iter().any(|(n, _)| n == name) {
                bail!("{name} is given twice");
            }
            out.push((name.clone(), value.clone()));
        }
        Ok(Flags(out))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn addr(&self, name: &str) -> Result<SocketAddr> {
        let v = self
            .get(name)
            .with_context(|| format!("{name} is required"))?;
        v.parse()
            .with_context(|| format!("{name} {v:?}: expected IP:PORT, e.g. 10.0.0.2:7000"))
    }

    fn num(&self, name: &str, default: Option<u64>, range: RangeInclusive<u64>) -> Result<u64> {
        let v = match (self.get(name), default) {
            (Some(v), _) => v
                .parse::<u64>()
                .with_context(|| format!("{name} {v:?}: expected a whole number"))?,
            (None, Some(d)) => return Ok(d),
            (None, None) => bail!("{name} is required"),
        };
        if !range.contains(&v) {
            bail!(
                "{name} {v}: must be between {} and {}",
                range.start(),
                range.end()
            );
        }
        Ok(v)
    }

    fn count(&self, name: &str, range: RangeInclusive<u64>) -> Result<usize> {
        Ok(usize::try_from(self.num(name, None, range)?)?)
    }

    fn seconds(&self, name: &str, default: Option<f64>) -> Result<Option<Duration>> {
        let v = match (self.get(name), default) {
            (Some(v), _) => v
                .parse::<f64>()
                .with_context(|| format!("{name} {v:?}: expected seconds, e.g. 0.5"))?,
            (None, Some(d)) => d,
            (None, None) => return Ok(None),
        };
        if !(v > 0.0 && v <= MAX_SECONDS) {
            bail!("{name} {v}: must be more than 0 and at most {MAX_SECONDS}");
        }
        Ok(Some(Duration::from_secs_f64(v)))
    }
}

enum Command {
    Serve {
        listen: SocketAddr,
        max_time: Option<Duration>,
    },
    Pingpong(PingpongArgs),
    Stream(StreamArgs),
    Connrate(ConnrateArgs),
    Http(HttpArgs),
}

fn parse_command(args: &[String]) -> Result<Command> {
    let Some((cmd, rest)) = args.split_first() else {
        bail!("no subcommand")
    };
    let default_max = Some(60.0);
    let required =
        |d: Option<Duration>, name: &str| d.with_context(|| format!("{name} is required"));
    match cmd.as_str() {
        "serve" => {
            let f = Flags::parse(rest, &["--listen", "--max-seconds"])?;
            Ok(Command::Serve {
                listen: f.addr("--listen")?,
                max_time: f.seconds("--max-seconds", None)?,
            })
        }
        "pingpong" => {
            let f = Flags::parse(
                rest,
                &[
                    "--connect",
                    "--size",
                    "--connections",
                    "--rounds",
                    "--warmup",
                    "--max-seconds",
                ],
            )?;
            let a = PingpongArgs {
                connect: f.addr("--connect")?,
                size: f.count("--size", 1..=MAX_MESSAGE)?,
                connections: f.count("--connections", 1..=MAX_CONNECTIONS)?,
                rounds: f.count("--rounds", 1..=MAX_SAMPLES)?,
                warmup: f.num("--warmup", Some(0), 0..=u64::MAX)?,
                max_time: required(f.seconds("--max-seconds", default_max)?, "--max-seconds")?,
            };
            let samples = a.connections as u64 * a.rounds as u64;
            if samples > MAX_SAMPLES {
                bail!(
                    "--connections {} x --rounds {} = {samples} samples, more than {MAX_SAMPLES}: lower one of them",
                    a.connections,
                    a.rounds
                );
            }
            check_buffers(2 * a.connections as u64 * a.size as u64)?;
            Ok(Command::Pingpong(a))
        }
        "stream" => {
            let f = Flags::parse(
                rest,
                &[
                    "--connect",
                    "--size",
                    "--connections",
                    "--seconds",
                    "--max-bytes",
                ],
            )?;
            let a = StreamArgs {
                connect: f.addr("--connect")?,
                size: f.count("--size", 1..=MAX_MESSAGE)?,
                connections: f.count("--connections", 1..=MAX_CONNECTIONS)?,
                time: required(f.seconds("--seconds", None)?, "--seconds")?,
                max_bytes: f.num("--max-bytes", Some(u64::MAX), 1..=u64::MAX)?,
            };
            if a.max_bytes < a.size as u64 {
                bail!(
                    "--max-bytes {} is less than one message of --size {}",
                    a.max_bytes,
                    a.size
                );
            }
            check_buffers(a.connections as u64 * a.size as u64)?;
            Ok(Command::Stream(a))
        }
        "connrate" => {
            let f = Flags::parse(
                rest,
                &["--connect", "--connections", "--count", "--max-seconds"],
            )?;
            Ok(Command::Connrate(ConnrateArgs {
                connect: f.addr("--connect")?,
                connections: f.count("--connections", 1..=MAX_CONNECTIONS)?,
                count: f.num("--count", None, 1..=u64::MAX)?,
                max_time: required(f.seconds("--max-seconds", default_max)?, "--max-seconds")?,
            }))
        }
        "http" => {
            let f = Flags::parse(rest, &["--url", "--rate", "--connections", "--seconds"])?;
            let (connect, host, path) = parse_url(f.get("--url").context("--url is required")?)?;
            Ok(Command::Http(HttpArgs {
                connect,
                host,
                path,
                rate: f.num("--rate", None, 1..=1_000_000)?,
                connections: f.count("--connections", 1..=MAX_CONNECTIONS)?,
                time: required(f.seconds("--seconds", None)?, "--seconds")?,
            }))
        }
        _ => bail!("unknown subcommand {cmd:?}"),
    }
}

fn check_buffers(bytes: u64) -> Result<()> {
    if bytes > MAX_BUFFERS {
        bail!(
            "--connections x --size need {bytes} bytes of message buffers, more than {MAX_BUFFERS}: lower one of them"
        );
    }
    Ok(())
}

/// Prints the report as the last stdout line and what failed on stderr; the exit code says
/// whether the figures can be trusted.
fn finish(json: &str, errors: u64, measured: u64, failures: &[String]) -> Result<ExitCode> {
    let mut out = io::stdout().lock();
    writeln!(out, "{json}").context("write the report to stdout")?;
    out.flush().context("write the report to stdout")?;
    for f in failures.iter().take(SHOWN_FAILURES) {
        eprintln!("meshbench: {f}");
    }
    if failures.len() > SHOWN_FAILURES {
        eprintln!(
            "meshbench: ... and {} more failures",
            failures.len() - SHOWN_FAILURES
        );
    }
    if errors > 0 {
        eprintln!("meshbench: {errors} errors: the figures above are not trustworthy");
        return Ok(ExitCode::from(EXIT_ERRORS));
    }
    if measured == 0 {
        eprintln!("meshbench: nothing was measured");
        return Ok(ExitCode::from(EXIT_ERRORS));
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Serve { listen, max_time } => {
            let l = bind_listener(listen)?;
            let mut out = io::stdout().lock();
            writeln!(out, "listening {}", l.local_addr()?)?;
            out.flush()?;
            drop(out);
            if let Some(t) = max_time {
                thread::Builder::new()
                    .name("max-seconds".into())
                    .spawn(move || {
                        thread::sleep(t);
                        eprintln!("meshbench serve: --max-seconds elapsed, exiting");
                        std::process::exit(0);
                    })
                    .context("spawn the --max-seconds timer")?;
            }
            serve(l);
            Ok(ExitCode::SUCCESS)
        }
        Command::Pingpong(a) => {
            let r = pingpong(&a);
            if r.stopped_early {
                eprintln!(
                    "meshbench: --max-seconds elapsed after {} of {} round trips",
                    r.round_trips,
                    a.connections as u64 * a.rounds as u64
                );
            }
            finish(&r.json(), r.errors, r.round_trips, &r.failures)
        }
        Command::Stream(a) => {
            let r = stream(&a);
            finish(&r.json(), r.errors, r.bytes, &r.failures)
        }
        Command::Http(a) => {
            let r = httprate(&a);
            finish(&r.json(), r.errors, r.requests, &r.failures)
        }
        Command::Connrate(a) => {
            let r = connrate(&a);
            if r.stopped_early {
                eprintln!(
                    "meshbench: --max-seconds elapsed after {} of {} connections",
                    r.count + r.errors,
                    a.count
                );
            }
            finish(&r.json(), r.errors, r.count, &r.failures)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match parse_command(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshbench: {e:#}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_server() -> Result<SocketAddr> {
        let l = bind_listener("127.0.0.1:0".parse()?)?;
        let addr = l.local_addr()?;
        thread::Builder::new()
            .name("server".into())
            .spawn(move || serve(l))?;
        Ok(addr)
    }

    /// The number after `"key":` in a flat JSON object of numbers.
    fn field(json: &str, key: &str) -> Result<f64> {
        let pat = format!("\"{key}\":");
        let at = json
            .find(&pat)
            .with_context(|| format!("{key} in {json}"))?
            + pat.len();
        let rest = &json[at..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        rest[..end]
            .parse()
            .with_context(|| format!("{key} in {json}"))
    }

    fn single_object(json: &str) {
        assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
        assert!(!json.contains('\n'), "{json}");
    }

    #[test]
    fn nearest_rank_edges() {
        assert_eq!(nearest_rank(&[], 500), None);
        assert_eq!(Latency::of_sorted(&[]), None);

        for pm in [0, 1, 500, 900, 990, 999, 1000] {
            assert_eq!(nearest_rank(&[7], pm), Some(7), "per mille {pm}");
        }

        let two = [3, 9];
        assert_eq!(nearest_rank(&two, 0), Some(3));
        assert_eq!(nearest_rank(&two, 500), Some(3));
        assert_eq!(nearest_rank(&two, 501), Some(9));
        assert_eq!(nearest_rank(&two, 900), Some(9));
        assert_eq!(nearest_rank(&two, 999), Some(9));

        let thousand: Vec<u64> = (1..=1000).collect();
        assert_eq!(nearest_rank(&thousand, 500), Some(500));
        assert_eq!(nearest_rank(&thousand, 900), Some(900));
        assert_eq!(nearest_rank(&thousand, 990), Some(990));
        assert_eq!(nearest_rank(&thousand, 999), Some(999));
        assert_eq!(nearest_rank(&thousand, 1000), Some(1000));
        assert_eq!(nearest_rank(&thousand, 2000), Some(1000));

        let l = Latency::of_sorted(&thousand);
        assert_eq!(
            l,
            Some(Latency {
                p50: 500,
                p90: 900,
                p99: 990,
                p999: 999,
                min: 1,
                max: 1000,
                mean: 500.5,
            })
        );
    }

    #[test]
    fn header_round_trip_and_rejects() -> Result<()> {
        for mode in [Mode::Echo, Mode::Sink, Mode::Connect] {
            let h = Header {
                mode,
                size: 0x0102_0304_0506_0708,
            };
            let b = h.encode();
            assert_eq!(&b[..4], b"MBv1");
            assert_eq!(b[4], mode as u8);
            assert_eq!(b[8], 0x08);
            assert_eq!(Header::decode(&b)?, h);
        }
        let good = Header {
            mode: Mode::Echo,
            size: 14,
        }
        .encode();
        let mut bad = good;
        bad[0] = b'X';
        let e = Header::decode(&bad).err().context("bad magic accepted")?;
        assert!(format!("{e}").contains("bad magic"), "{e}");
        let mut bad = good;
        bad[4] = 9;
        let e = Header::decode(&bad).err().context("bad mode accepted")?;
        assert!(format!("{e}").contains("unknown mode 9"), "{e}");
        Ok(())
    }

    #[test]
    fn flags_are_checked() {
        let args = |s: &str| -> Vec<String> { s.split_whitespace().map(String::from).collect() };
        let err = |s: &str| match parse_command(&args(s)) {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        };
        assert!(parse_command(&args("serve --listen 127.0.0.1:1")).is_ok());
        assert!(err("serve --listen 127.0.0.1:1 --bogus 1").contains("unknown argument"));
        assert!(err("serve --listen").contains("needs a value"));
        assert!(err("serve --listen x").contains("expected IP:PORT"));
        assert!(
            err("pingpong --connect 127.0.0.1:1 --size 0 --connections 1 --rounds 1")
                .contains("--size 0: must be between 1")
        );
        assert!(
            err("pingpong --connect 127.0.0.1:1 --size 1 --connections 1000 --rounds 100000")
                .contains("samples")
        );
        assert!(err("stream --connect 127.0.0.1:1 --size 1 --connections 1").contains("--seconds"));
        assert!(
            err("stream --connect 127.0.0.1:1 --size 1 --connections 1 --seconds -1")
                .contains("more than 0")
        );
        assert!(
            err("connrate --connect 127.0.0.1:1 --connections 1 --count 5 --count 5")
                .contains("twice")
        );
        assert!(err("frobnicate").contains("unknown subcommand"));
    }

    #[test]
    fn server_rejects_bad_headers() -> Result<()> {
        let addr = start_server()?;
        let bad_magic = *b"XXXXXXXXXXXXXXXX";
        let zero_echo = Header {
            mode: Mode::Echo,
            size: 0,
        }
        .encode();
        for h in [bad_magic, zero_echo] {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(&h)?;
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b)?, 0, "the server must close the connection");
        }
        Ok(())
    }

    #[test]
    fn pingpong_loopback() -> Result<()> {
        let addr = start_server()?;
        let r = pingpong(&PingpongArgs {
            connect: addr,
            size: 100,
            connections: 2,
            rounds: 50,
            warmup: 5,
            max_time: Duration::from_secs(30),
        });
        assert_eq!(r.errors, 0, "{:?}", r.failures);
        assert_eq!(r.round_trips, 100);
        assert!(!r.stopped_early);
        let l = r.latency.context("no latency")?;
        assert!(l.min > 0 && l.min <= l.p50 && l.p50 <= l.p90, "{l:?}");
        assert!(
            l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max,
            "{l:?}"
        );
        let json = r.json();
        single_object(&json);
        assert!(json.starts_with("{\"mode\":\"pingpong\","), "{json}");
        assert_eq!(field(&json, "size")?, 100.0);
        assert_eq!(field(&json, "connections")?, 2.0);
        assert_eq!(field(&json, "round_trips")?, 100.0);
        assert_eq!(field(&json, "errors")?, 0.0);
        let (min, p50, max) = (
            field(&json, "min_us")?,
            field(&json, "p50_us")?,
            field(&json, "max_us")?,
        );
        assert!(
            0.0 < min && min <= p50 && p50 <= max && max < 30e6,
            "{json}"
        );
        for k in ["p90_us", "p99_us", "p999_us", "mean_us"] {
            let v = field(&json, k)?;
            assert!(min <= v && v <= max, "{k} in {json}");
        }
        Ok(())
    }

    #[test]
    fn pingpong_counts_a_corrupted_echo() -> Result<()> {
        // An "echo" server that flips one bit of every message.
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        thread::spawn(move || -> Result<()> {
            let (s, _) = l.accept()?;
            let mut s = Sock::new(s, IO_TIMEOUT)?;
            let mut h = [0u8; HEADER_LEN];
            s.read_exact(&mut h)?;
            let mut buf = vec![0u8; usize::try_from(Header::decode(&h)?.size)?];
            while read_message(&mut s, &mut buf)? {
                buf[0] ^= 1;
                s.write_all(&buf)?;
            }
            Ok(())
        });
        let r = pingpong(&PingpongArgs {
            connect: addr,
            size: 32,
            connections: 1,
            rounds: 10,
            warmup: 0,
            max_time: Duration::from_secs(30),
        });
        assert_eq!(r.errors, 1);
        assert_eq!(r.round_trips, 0);
        assert!(r.failures[0].contains("differs"), "{:?}", r.failures);
        let json = r.json();
        single_object(&json);
        assert!(json.contains("\"p50_us\":null"), "{json}");
        Ok(())
    }

    #[test]
    fn stream_loopback() -> Result<()> {
        let addr = start_server()?;
        let t0 = Instant::now();
        let r = stream(&StreamArgs {
            connect: addr,
            size: 1024,
            connections: 1,
            time: Duration::from_millis(200),
            max_bytes: u64::MAX,
        });
        assert_eq!(r.errors, 0, "{:?}", r.failures);
        assert!(r.bytes >= 1024 && r.bytes.is_multiple_of(1024), "{r:?}");
        assert_eq!(r.msgs * 1024, r.bytes);
        // The window runs from the common start; the first write may come a little later.
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert!(r.seconds > 0.0 && r.seconds < 30.0, "{r:?}");
        let json = r.json();
        single_object(&json);
        assert!(json.starts_with("{\"mode\":\"stream\","), "{json}");
        assert_eq!(field(&json, "bytes")?, r.bytes as f64);
        assert_eq!(field(&json, "errors")?, 0.0);
        assert!(field(&json, "gbit_per_s")? > 0.0, "{json}");
        assert!(field(&json, "msgs_per_s")? > 0.0, "{json}");
        // Every byte written is in one window of the timeline: 200 ms is 2 or 3 of them.
        assert_eq!(r.timeline.iter().sum::<u64>(), r.bytes, "{r:?}");
        assert!((1..=3).contains(&r.timeline.len()), "{r:?}");
        let list: Vec<String> = r.timeline.iter().map(u64::to_string).collect();
        assert!(
            json.contains(&format!("\"timeline_bytes\":[{}]", list.join(","))),
            "{json}"
        );
        assert_eq!(field(&json, "timeline_step_ms")?, 100.0);

        // --max-bytes ends the run first, at whole messages.
        let r = stream(&StreamArgs {
            connect: addr,
            size: 1000,
            connections: 3,
            time: Duration::from_secs(30),
            max_bytes: 10_500,
        });
        assert_eq!(r.errors, 0, "{:?}", r.failures);
        assert_eq!((r.bytes, r.msgs), (30_000, 30));
        assert!(r.seconds < 10.0, "{r:?}");
        Ok(())
    }

    #[test]
    fn timelines_of_different_lengths_add_up_per_window() {
        let (a, b, none): (&[u64], &[u64], &[u64]) = (&[1, 2], &[10, 20, 30], &[]);
        assert_eq!(sum_timelines([a, b, none].into_iter()), vec![11, 22, 30]);
        assert!(sum_timelines(std::iter::empty()).is_empty());
    }

    #[test]
    fn connrate_loopback() -> Result<()> {
        let addr = start_server()?;
        let r = connrate(&ConnrateArgs {
            connect: addr,
            connections: 4,
            count: 20,
            max_time: Duration::from_secs(30),
        });
        assert_eq!(r.errors, 0, "{:?}", r.failures);
        assert_eq!(r.count, 20);
        assert!(!r.stopped_early);
        let json = r.json();
        single_object(&json);
        assert!(json.starts_with("{\"mode\":\"connrate\","), "{json}");
        assert_eq!(field(&json, "connections")?, 4.0);
        assert_eq!(field(&json, "count")?, 20.0);
        assert_eq!(field(&json, "errors")?, 0.0);
        assert!(field(&json, "seconds")? > 0.0, "{json}");
        assert!(field(&json, "conn_per_s")? > 0.0, "{json}");
        Ok(())
    }

    #[test]
    fn connrate_counts_refused_connections() -> Result<()> {
        // A port nobody listens on: bind, note the port, close.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let r = connrate(&ConnrateArgs {
            connect: addr,
            connections: 2,
            count: 6,
            max_time: Duration::from_secs(30),
        });
        assert_eq!((r.count, r.errors), (0, 6));
        assert!(
            r.failures[0].contains("meshbench serve"),
            "{:?}",
            r.failures
        );
        let json = r.json();
        single_object(&json);
        assert_eq!(field(&json, "count")?, 0.0);
        assert_eq!(field(&json, "errors")?, 6.0);
        Ok(())
    }

    #[test]
    fn url_parsing() -> Result<()> {
        let (a, host, path) = parse_url("http://10.77.2.2:8080/x/y")?;
        assert_eq!(
            (a.port(), host.as_str(), path.as_str()),
            (8080, "10.77.2.2:8080", "/x/y")
        );
        let (_, _, path) = parse_url("http://[::1]:80")?;
        assert_eq!(path, "/");
        assert!(parse_url("https://1.2.3.4:1/").is_err());
        assert!(parse_url("http://host:80/").is_err());
        Ok(())
    }

    #[test]
    fn http_exchange_parses_and_rejects() -> Result<()> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let server = thread::spawn(move || -> Result<()> {
            let (mut c, _) = l.accept()?;
            let mut req = [0u8; 1024];
            for resp in [
                &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..],
                &b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"[..],
            ] {
                let _ = c.read(&mut req)?;
                c.write_all(resp)?;
            }
            Ok(())
        });
        let mut s = Sock::connect(addr, IO_TIMEOUT)?;
        let mut buf = vec![0u8; 1024];
        http_exchange(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut buf)?;
        assert!(http_exchange(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut buf).is_err());
        server.join().map_err(|_| anyhow!("server panicked"))??;
        Ok(())
    }
}
