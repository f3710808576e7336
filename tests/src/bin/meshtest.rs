//! meshtest: the integrity client and server the end-to-end tests run inside pods.
//!
//! `serve` / `client`, protocol of one connection:
//! 1. server: optionally writes `--greet` bytes first (a server that speaks first);
//! 2. client: (after reading the greeting, if it expects one) writes a 32-byte header
//!    `MTv1`, 4 zero bytes, upload length, reply length, seed (little-endian u64s), then the
//!    upload: a deterministic byte stream from the seed, in writes of random sizes; then
//!    half-closes (shutdown of its write side);
//! 3. server: reads to end of stream, checking every byte and the length, writes one status
//!    byte (`Y` all correct, `N` not), then the reply stream in random-size writes, closes;
//! 4. client: checks status, every reply byte and the length.
//!
//! Any mismatch, short read or timeout is a failure; the client exits non-zero.
//!
//! `--io blocking` (default) uses plain blocking sockets, as simple C or Python clients do;
//! `--io poll` uses non-blocking sockets and poll(2), as event-driven runtimes (Go, Java
//! NIO, tokio, curl) do. Both must work through the proxy; see ARCHITECTURE.md for the
//! kernel behaviour that makes the difference matter with the short-circuit on.
//!
//! The two modes below check the socket short-circuit (sk_msg redirect) for reordering, loss,
//! stalls and backpressure. By default their sockets are blocking and have no timeouts at
//! all: a timeout would turn a stall into an error message that looks like a slow network,
//! so a stalled client hangs and the test harness kills it.
//!
//! `order-serve` / `order`: full duplex with delayed readers. Each side writes at once after
//! connect / accept, in small writes of random sizes, while its reader first sleeps
//! `--read-delay-ms`; then it half-closes. Bytes written right after connect, while the peer
//! is not reading yet, are where data sent through the redirect and data sent over TCP can
//! overtake each other; a reordered, lost or duplicated byte shows as a mismatch at its offset.
//! Upload: the client's seed (`--seed` plus the connection index, little-endian u64), then
//! `--bytes` of the stream for that seed. Download: `--bytes` of the stream for the fixed seed
//! 0xD0D0 on every connection (not derived from the client's seed, so the server writes before
//! it has read anything). `--progress FILE` publishes the upload bytes written so far, so a
//! test can check that a peer that does not read stops the writer (backpressure) instead of
//! the data piling up somewhere. `--tfo` sends the first write in the SYN (TCP Fast Open).
//!
//! `order-serve` / `order` also take `--io`. `blocking` (default): as above; a read that
//! returns EAGAIN although the socket is blocking and has no timeout (a spurious EAGAIN from
//! the kernel) fails the connection, as it would fail a plain blocking program, and is counted
//! (`"eagain"` in the client's JSON: connections that failed so; `eagain=` on the server's
//! line). `poll`: the sockets are non-blocking once connected (the writer thread's handle is a
//! dup of the reader's, sharing O_NONBLOCK) and every read or write that gets EAGAIN waits in
//! poll(2) and retries, as event-driven programs do; `eagain` then counts those retries. A
//! poll that waits 30 s fails with "poll timed out: the peer stalled", so a reader paused
//! longer than that fails its peer's writer in this mode.
//!
//! `rr-serve` / `rr`: request/response echo, each frame a little-endian u32 length and a
//! payload, every read a blocking `recv(MSG_WAITALL)`. Such a read sleeps until the whole
//! amount is there, so a receive path that misses a wake-up stalls it forever where a read
//! with a timeout would only retry. A MSG_WAITALL read that returns fewer bytes (but some) is
//! allowed: it is counted as `short_waitall` and the rest is read with further calls.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{
        self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage, sockopt,
    },
};

use anyhow::{Context, Result, anyhow, bail};

const MAGIC: &[u8; 4] = b"MTv1";
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const GREET_SEED: u64 = 0x6767_6767;

/// xorshift64* stream: cheap, deterministic, and any reordering or loss shows.
struct Pattern(u64);

impl Pattern {
    fn new(seed: u64) -> Pattern {
        Pattern(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Generates the stream in 8-byte units so that any split of reads sees the same bytes.
struct Stream {
    p: Pattern,
    pending: Vec<u8>,
}

impl Stream {
    fn new(seed: u64) -> Stream {
        Stream {
            p: Pattern::new(seed),
            pending: Vec::new(),
        }
    }

    fn take(&mut self, n: usize, out: &mut Vec<u8>) {
        out.clear();
        while self.pending.len() < n {
            let mut b = [0u8; 8];
            self.p.fill(&mut b);
            self.pending.extend_from_slice(&b);
        }
        out.extend(self.pending.drain(..n));
    }
}

/// A connection in blocking or poll mode. It implements `Read` and `Write`; in poll mode
/// every read and write that gets WouldBlock (EAGAIN) waits with poll(2) and tries again.
struct Conn {
    s: TcpStream,
    poll: bool,
    /// Reads and writes that got WouldBlock. Poll mode: each was waited for and retried.
    /// Blocking mode: only reads are counted, and the first one failed the read; on a socket
    /// without timeouts (`order`) that is a spurious EAGAIN from the kernel, on one with
    /// timeouts (`serve`, `client`) it is a timeout.
    eagain: u64,
}

impl Conn {
    /// For `serve` / `client`: a blocking socket gets IO_TIMEOUT read and write timeouts.
    fn new(s: TcpStream, poll: bool) -> Result<Conn> {
        if !poll {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
        }
        Ok(Conn::without_socket_timeouts(s, poll)?)
    }

    /// No socket timeouts, so a stall in blocking mode hangs; in poll mode each wait still
    /// ends after IO_TIMEOUT.
    fn without_socket_timeouts(s: TcpStream, poll: bool) -> io::Result<Conn> {
        if poll {
            s.set_nonblocking(true)?;
        }
        Ok(Conn { s, poll, eagain: 0 })
    }

    /// Reader and writer handles of one socket, for a reader and a writer thread; see
    /// `without_socket_timeouts`. The writer's is a dup (`try_clone`), which shares the open
    /// file and so its O_NONBLOCK flag.
    fn duplex(s: TcpStream, poll: bool) -> io::Result<(Conn, Conn)> {
        let reader = Conn::without_socket_timeouts(s, poll)?;
        let writer = Conn {
            s: reader.s.try_clone()?,
            poll,
            eagain: 0,
        };
        Ok((reader, writer))
    }

    fn wait(&self, flags: PollFlags) -> io::Result<()> {
        // The caller retries its read or write, which polls again if it must.
        wait_ready(self.s.as_fd(), flags).map(|_| ())
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.s.shutdown(Shutdown::Write)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.s.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.eagain += 1;
                    if !self.poll {
                        return Err(e);
                    }
                    self.wait(PollFlags::POLLIN)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.s.write(buf) {
                // EINPROGRESS: with TCP_FASTOPEN_CONNECT the connect happens in the first
                // write, which on a non-blocking socket fails so, sending nothing, when no
                // data fitted in the SYN; the socket is writable once the handshake is done.
                Err(e)
                    if self.poll
                        && (e.kind() == io::ErrorKind::WouldBlock
                            || e.raw_os_error() == Some(Errno::EINPROGRESS as i32)) =>
                {
                    self.eagain += 1;
                    self.wait(PollFlags::POLLOUT)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits at most IO_TIMEOUT for `fd` to be ready for `flags` (`TimedOut` after that):
/// true if it is, false if a signal interrupted the wait.
fn wait_ready(fd: BorrowedFd<'_>, flags: PollFlags) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, flags)];
    let ms = u16::try_from(IO_TIMEOUT.as_millis()).unwrap_or(u16::MAX);
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "poll timed out: the peer stalled",
        )),
        Ok(_) => Ok(true),
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

fn write_stream(s: &mut Conn, len: u64, seed: u64, max_write: usize, rng_seed: u64) -> Result<()> {
    let mut data = Stream::new(seed);
    let mut sizes = Pattern::new(rng_seed);
    let mut left = len;
    let mut buf = Vec::new();
    while left > 0 {
        // Mostly random sizes up to max_write, with frequent tiny writes.
        let r = sizes.next_u64();
        let size = if r.is_multiple_of(4) {
            1 + (r >> 8) % 16
        } else {
            1 + (r >> 8) % max_write as u64
        };
        let n = size.min(left) as usize;
        data.take(n, &mut buf);
        s.write_all(&buf).context("write")?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads to end of stream; returns (bytes read, all bytes matched).
fn read_stream(s: &mut Conn, seed: u64, limit: Option<u64>) -> Result<(u64, bool)> {
    let mut expect = Stream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = Vec::new();
    let mut total = 0u64;
    let mut ok = true;
    loop {
        let cap = match limit {
            Some(l) if l - total < buf.len() as u64 => (l - total) as usize,
            _ => buf.len(),
        };
        if cap == 0 {
            return Ok((total, ok));
        }
        let n = s.read(&mut buf[..cap]).context("read")?;
        if n == 0 {
            return Ok((total, ok));
        }
        expect.take(n, &mut want);
        if buf[..n] != want[..] {
            ok = false;
        }
        total += n as u64;
    }
}

// === server ===

/// A listener in blocking or poll mode. Poll mode makes it non-blocking as event-driven
/// servers do, which is also what the proxy's sock_ops judges an accepted socket by (the
/// listener's mode when the connection arrives): a blocking listener's connections stay off
/// the short-circuit (unless the proxy runs with `--sockmap-blocking-sockets on`).
fn listener(listen: SocketAddr, poll: bool) -> Result<TcpListener> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    if poll {
        l.set_nonblocking(true)
            .context("O_NONBLOCK on the listener")?;
    }
    Ok(l)
}

/// The next connection; on a non-blocking listener, waits for it in poll(2). The accepted
/// socket is blocking either way (`accept4` without `SOCK_NONBLOCK`): `Conn` sets its mode.
fn accept(l: &TcpListener) -> io::Result<TcpStream> {
    loop {
        match l.accept() {
            Ok((s, _)) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(io::Error::from(e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `blocking_connections`: with `poll`, the listener is non-blocking but each connection is
/// served with blocking I/O, as Python's `accept()` does on a listener with a timeout.
fn serve(listen: SocketAddr, greet: u64, poll: bool, blocking_connections: bool) -> Result<()> {
    let l = listener(listen, poll)?;
    let conn_poll = poll && !blocking_connections;
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    let out = Arc::new(Mutex::new(()));
    loop {
        let Ok(s) = accept(&l) else { continue };
        let out = Arc::clone(&out);
        thread::spawn(move || {
            let peer = peer_name(&s);
            let line = match Conn::new(s, conn_poll).and_then(|mut c| serve_one(&mut c, greet)) {
                Ok((got, ok, sent)) => {
                    format!("conn peer={peer} received={got} verified={ok} sent={sent}")
                }
                Err(e) => format!("conn peer={peer} error={e:#}"),
            };
            let _g = out.lock();
            println!("{line}");
            let _ = std::io::stdout().flush();
        });
    }
}

fn serve_one(s: &mut Conn, greet: u64) -> Result<(u64, bool, u64)> {
    if greet > 0 {
        write_stream(s, greet, GREET_SEED, 4096, 1)?;
    }
    let mut h = [0u8; 32];
    s.read_exact(&mut h).context("header")?;
    if &h[..4] != MAGIC {
        bail!("bad header magic");
    }
    let field = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let (upload, reply, seed) = (field(8), field(16), field(24));
    let (got, matched) = read_stream(s, seed, None)?;
    let ok = matched && got == upload;
    s.write_all(if ok { b"Y" } else { b"N" })?;
    write_stream(s, reply, seed ^ 0xabc, 64 * 1024, seed ^ 0x77)?;
    s.shutdown_write()?;
    Ok((got, ok, reply))
}

// === client ===

struct ClientArgs {
    connect: SocketAddr,
    send: u64,
    reply: u64,
    seed: u64,
    connections: u64,
    max_write: usize,
    expect_greet: u64,
    poll: bool,
}

fn client_one(a: &ClientArgs, seed: u64) -> Result<(u64, u64)> {
    let s = if a.poll {
        connect(a.connect, false, true)?
    } else {
        TcpStream::connect_timeout(&a.connect, IO_TIMEOUT)
            .with_context(|| format!("connect {}", a.connect))?
    };
    let mut s = Conn::new(s, a.poll)?;
    if a.expect_greet > 0 {
        let (got, ok) = read_stream(&mut s, GREET_SEED, Some(a.expect_greet))?;
        if got != a.expect_greet || !ok {
            bail!(
                "greeting: got {got} of {} bytes, intact={ok}",
                a.expect_greet
            );
        }
    }
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&a.send.to_le_bytes());
    h[16..24].copy_from_slice(&a.reply.to_le_bytes());
    h[24..32].copy_from_slice(&seed.to_le_bytes());
    s.write_all(&h)?;
    write_stream(&mut s, a.send, seed, a.max_write, seed ^ 0x1234)?;
    s.shutdown_write()?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status)
        .context("status byte (the server closed early?)")?;
    if &status != b"Y" {
        bail!("server saw a corrupted or short upload of {} bytes", a.send);
    }
    let (got, ok) = read_stream(&mut s, seed ^ 0xabc, None)?;
    if !ok || got != a.reply {
        bail!("reply: got {got} of {} bytes, intact={ok}", a.reply);
    }
    Ok((a.send, got))
}

fn client(a: ClientArgs) -> Result<bool> {
    let a = Arc::new(a);
    let mut handles = Vec::new();
    for i in 0..a.connections {
        let a = Arc::clone(&a);
        handles.push(thread::spawn(move || {
            client_one(&a, a.seed.wrapping_add(i))
        }));
    }
    let (mut sent, mut received, mut failures) = (0u64, 0u64, Vec::new());
    for h in handles {
        match h.join() {
            Ok(Ok((s, r))) => {
                sent += s;
                received += r;
            }
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push("client thread panicked".into()),
        }
    }
    let ok = failures.is_empty();
    let failures: Vec<String> = failures.iter().map(|f| format!("{f:?}")).collect();
    println!(
        "{{\"ok\":{ok},\"connections\":{},\"sent\":{sent},\"received\":{received},\"failures\":[{}]}}",
        a.connections,
        failures.join(",")
    );
    Ok(ok)
}

// === shared by order and rr ===

/// How many failures a client summary names; its counts cover all of them.
const FIRST_FAILURES: usize = 5;

/// A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; this prints them as IPv4.
fn peer_name(s: &TcpStream) -> String {
    s.peer_addr()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()).to_string())
        .unwrap_or_default()
}

/// Accepts forever, one thread per connection; prints the line `handle` returns for it.
fn serve_each<F>(l: TcpListener, handle: F) -> Result<()>
where
    F: Fn(TcpStream, &str) -> String + Send + Sync + 'static,
{
    println!("listening {}", l.local_addr()?);
    io::stdout().flush()?;
    let handle = Arc::new(handle);
    loop {
        let Ok(s) = accept(&l) else { continue };
        let handle = Arc::clone(&handle);
        thread::spawn(move || {
            let peer = peer_name(&s);
            let line = handle(s, &peer);
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        });
    }
}

/// Runs `one(i)` for every i in 0..n on at most `concurrency` threads at once; returns the
/// results in index order.
fn run_pool<T: Send>(
    n: u64,
    concurrency: u64,
    one: impl Fn(u64) -> T + Sync,
) -> Result<Vec<(u64, T)>> {
    let next = AtomicU64::new(0);
    thread::scope(|sc| {
        let workers: Vec<_> = (0..concurrency.clamp(1, n.max(1)))
            .map(|_| {
                sc.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return done;
                        }
                        done.push((i, one(i)));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().map_err(|_| anyhow!("worker thread panicked"))?);
        }
        all.sort_by_key(|(i, _)| *i);
        Ok(all)
    })
}

/// The outcome of one client connection; the strings say which connection and what went wrong.
#[derive(Debug)]
enum Verdict {
    Ok,
    Mismatch(String),
    Short(String),
    Error(String),
}

/// Per-connection verdicts of a client run, counted for its JSON summary.
#[derive(Debug, Default)]
struct Tally {
    connections: u64,
    mismatches: u64,
    short: u64,
    errors: u64,
    first_failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, v: Verdict) {
        self.connections += 1;
        let failure = match v {
            Verdict::Ok => return,
            Verdict::Mismatch(f) => {
                self.mismatches += 1;
                f
            }
            Verdict::Short(f) => {
                self.short += 1;
                f
            }
            Verdict::Error(f) => {
                self.errors += 1;
                f
            }
        };
        if self.first_failures.len() < FIRST_FAILURES {
            self.first_failures.push(failure);
        }
    }

    fn ok(&self) -> bool {
        self.mismatches + self.short + self.errors == 0
    }

    fn failures_json(&self) -> String {
        serde_json::Value::from(self.first_failures.clone()).to_string()
    }
}

// === order: full duplex, writes right after connect, delayed readers ===

/// Seed of the server-to-client stream on every connection: fixed so the server can write
/// before it has read the client's seed.
const ORDER_DOWN_SEED: u64 = 0xD0D0;
/// Largest server write; small, so many writes are in flight while the client is not reading.
const ORDER_SERVER_MAX_WRITE: usize = 512;
/// Mixed into a stream seed to seed the write sizes, so sizes and bytes are unrelated.
const SIZES_SEED: u64 = 0x5eed;
/// TCP_FASTOPEN queue length (pending Fast Open requests) of `order-serve --tfo`.
const TFO_QUEUE: i32 = 256;
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

/// What a reader saw of one expected stream.
#[derive(Debug, Default)]
struct Received {
    /// Bytes read, including any beyond the expected length.
    got: u64,
    /// Offset of the first byte that differs from the stream, or of the first extra byte.
    first_bad: Option<u64>,
    /// The read error that ended the stream, if any.
    error: Option<String>,
}

impl Received {
    fn intact(&self, want: u64) -> bool {
        self.got == want && self.first_bad.is_none() && self.error.is_none()
    }
}

/// Reads to end of stream, checking against `want` bytes of the stream for `seed`. A read
/// error is recorded with the bytes read before it, not returned.
fn read_verify(r: &mut impl Read, seed: u64, want: u64) -> Received {
    let mut expect = Stream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut exp = Vec::new();
    let mut rx = Received::default();
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return rx,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                rx.error = Some(format!("read after {} bytes: {e}", rx.got));
                return rx;
            }
        };
        if rx.first_bad.is_none() {
            // Bytes up to `want` are compared; any byte beyond it is wrong by definition.
            let inside = usize::try_from(want - rx.got).map_or(n, |w| w.min(n));
            expect.take(inside, &mut exp);
            if let Some(i) = buf[..inside].iter().zip(&exp).position(|(a, b)| a != b) {
                rx.first_bad = Some(rx.got + i as u64);
            } else if inside < n {
                rx.first_bad = Some(want);
            }
        }
        rx.got += n as u64;
    }
}

/// Writes `len` bytes of the stream for `seed` in writes of random sizes 1..=max_write, the
/// sizes drawn from `sizes_seed` (`None`: every write `max_write` bytes); adds each write to
/// `written`.
fn write_random(
    w: &mut impl Write,
    len: u64,
    seed: u64,
    max_write: usize,
    sizes_seed: Option<u64>,
    written: Option<&AtomicU64>,
) -> io::Result<()> {
    let mut data = Stream::new(seed);
    let mut sizes = sizes_seed.map(Pattern::new);
    let mut buf = Vec::new();
    let mut left = len;
    while left > 0 {
        let size = match sizes.as_mut() {
            Some(sizes) => 1 + sizes.next_u64() % max_write.max(1) as u64,
            None => max_write.max(1) as u64,
        };
        let n = size.min(left) as usize;
        data.take(n, &mut buf);
        w.write_all(&buf)?;
        if let Some(c) = written {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        left -= n as u64;
    }
    Ok(())
}

/// Connect with no timeouts, in blocking or poll mode. Poll mode connects the way
/// event-driven programs do: a non-blocking socket from the start (`SOCK_NONBLOCK`), the
/// handshake waited for in poll(2). That matters beyond style: the proxy's sock_ops judges a
/// client by its socket's mode when the connection is established, and keeps blocking ones
/// off the short-circuit. With `tfo`, sets TCP_FASTOPEN_CONNECT first: connect() then
/// returns at once and the first write goes out in the SYN once the client holds a Fast Open
/// cookie from this server (the first connection only asks for one).
fn connect(addr: SocketAddr, tfo: bool, poll_mode: bool) -> Result<TcpStream> {
    if !tfo && !poll_mode {
        return TcpStream::connect(addr).with_context(|| format!("connect {addr}"));
    }
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let flags = if poll_mode {
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK
    } else {
        SockFlag::SOCK_CLOEXEC
    };
    let fd =
        socket::socket(family, SockType::Stream, flags, SockProtocol::Tcp).context("socket")?;
    if tfo {
        socket::setsockopt(&fd, sockopt::TcpFastOpenConnect, &true)
            .context("TCP_FASTOPEN_CONNECT (Linux 4.11 or later)")?;
    }
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) => {}
        Err(Errno::EINPROGRESS) if poll_mode => {
            while !wait_ready(fd.as_fd(), PollFlags::POLLOUT)
                .with_context(|| format!("connect {addr}"))?
            {}
            let err = socket::getsockopt(&fd, sockopt::SocketError)
                .with_context(|| format!("connect {addr}: SO_ERROR"))?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err))
                    .with_context(|| format!("connect {addr}"));
            }
        }
        Err(e) => return Err(e).with_context(|| format!("connect {addr}")),
    }
    Ok(TcpStream::from(fd))
}

/// Lets a listener accept data in the SYN (server side of TCP Fast Open), with a queue of
/// `qlen` pending Fast Open requests. The kernel uses it only if net.ipv4.tcp_fastopen has the
/// server bit (2); otherwise connections fall back to a normal handshake.
// nix 0.31 has a sockopt for TCP_FASTOPEN_CONNECT but none for TCP_FASTOPEN, and socket2 has
// neither, hence the one call to libc.
#[allow(unsafe_code)]
fn set_tcp_fastopen(l: &TcpListener, qlen: i32) -> io::Result<()> {
    use nix::libc;
    // SAFETY: the fd is borrowed from `l`, which outlives the call; the pointer and length
    // describe `qlen`, a c_int on this stack frame, which is what TCP_FASTOPEN reads.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&raw const qlen).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `value` to `path` through `path.tmp` and a rename, so a reader never sees half.
fn write_progress(path: &Path, value: u64) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{value}\n"))
        .with_context(|| format!("progress file {}", Path::new(&tmp).display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("progress file {}", path.display()))
}

/// Publishes `counter` every PROGRESS_EVERY until `stop`, then its final value.
fn progress_loop(path: &Path, counter: &AtomicU64, stop: &AtomicBool) -> Result<()> {
    loop {
        // Read `stop` before the counter: once it is set, every writer has finished.
        let last = stop.load(Ordering::Acquire);
        write_progress(path, counter.load(Ordering::Relaxed))?;
        if last {
            return Ok(());
        }
        thread::sleep(PROGRESS_EVERY);
    }
}

struct OrderArgs {
    connect: SocketAddr,
    connections: u64,
    concurrency: u64,
    bytes: u64,
    read_delay: Duration,
    max_write: usize,
    /// Every write exactly `max_write` bytes (the last one what is left).
    fixed_writes: bool,
    tfo: bool,
    progress: Option<PathBuf>,
    seed: u64,
    poll: bool,
}

#[derive(Debug)]
struct OrderSummary {
    tally: Tally,
    /// Stream bytes uploaded, without the 8-byte seed headers.
    bytes_up: u64,
    bytes_down: u64,
    /// Blocking mode: connections whose download failed with a spurious EAGAIN. Poll mode:
    /// WouldBlock retries of reads and writes (informational).
    eagain: u64,
}

impl OrderSummary {
    fn json(&self) -> String {
        let t = &self.tally;
        format!(
            "{{\"ok\":{},\"connections\":{},\"mismatches\":{},\"short\":{},\"errors\":{},\"bytes_up\":{},\"bytes_down\":{},\"eagain\":{},\"first_failures\":{}}}",
            t.ok(),
            t.connections,
            t.mismatches,
            t.short,
            t.errors,
            self.bytes_up,
            self.bytes_down,
            self.eagain,
            t.failures_json()
        )
    }
}

fn order_client(a: &OrderArgs) -> Result<OrderSummary> {
    let up = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    if let Some(p) = &a.progress {
        write_progress(p, 0)?;
    }
    let results = thread::scope(|sc| {
        let (up, stop) = (&up, &stop);
        let progress = a
            .progress
            .as_deref()
            .map(|p| sc.spawn(move || progress_loop(p, up, stop)));
        let results = run_pool(a.connections, a.concurrency, |i| order_one(a, i, up));
        stop.store(true, Ordering::Release);
        if let Some(p) = progress {
            p.join()
                .map_err(|_| anyhow!("progress thread panicked"))??;
        }
        results
    })?;
    let mut s = OrderSummary {
        tally: Tally::default(),
        bytes_up: up.load(Ordering::Relaxed),
        bytes_down: 0,
        eagain: 0,
    };
    for (_, (verdict, down, eagain)) in results {
        s.tally.add(verdict);
        s.bytes_down += down;
        // In blocking mode at most 1 per connection: the failed read ends the download.
        s.eagain += eagain;
    }
    Ok(s)
}

/// One `order` connection; returns its verdict, the bytes it downloaded and its WouldBlock
/// count (see `OrderSummary::eagain`).
fn order_one(a: &OrderArgs, index: u64, up: &AtomicU64) -> (Verdict, u64, u64) {
    let seed = a.seed.wrapping_add(index);
    let what = |v: String| format!("conn {index} seed {seed}: {v}");
    let conn = connect(a.connect, a.tfo, a.poll)
        .and_then(|s| Conn::duplex(s, a.poll).context("socket setup"));
    let (mut reader, mut writer) = match conn {
        Ok(rw) => rw,
        Err(e) => return (Verdict::Error(what(format!("{e:#}"))), 0, 0),
    };
    let (sent, rx) = thread::scope(|sc| {
        let w = &mut writer;
        let writer = sc.spawn(move || -> io::Result<()> {
            w.write_all(&seed.to_le_bytes())?;
            let sizes = (!a.fixed_writes).then_some(seed ^ SIZES_SEED);
            write_random(w, a.bytes, seed, a.max_write, sizes, Some(up))?;
            w.shutdown_write()
        });
        thread::sleep(a.read_delay);
        let rx = read_verify(&mut reader, ORDER_DOWN_SEED, a.bytes);
        let sent = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
        (sent, rx)
    });
    let verdict = if let Some(k) = rx.first_bad {
        let how = if k == a.bytes {
            "has extra bytes"
        } else {
            "differs"
        };
        Verdict::Mismatch(what(format!(
            "download {how} at offset {k} (got {} of {} bytes)",
            rx.got, a.bytes
        )))
    } else if let Some(e) = &rx.error {
        Verdict::Error(what(format!("download: {e}")))
    } else if let Err(e) = sent {
        Verdict::Error(what(format!("upload: {e}")))
    } else if rx.got < a.bytes {
        Verdict::Short(what(format!(
            "download short: got {} of {} bytes",
            rx.got, a.bytes
        )))
    } else {
        Verdict::Ok
    };
    (verdict, rx.got, reader.eagain + writer.eagain)
}

/// What `order-serve` saw on one connection.
#[derive(Debug)]
struct OrderServed {
    /// The upload after the seed header.
    rx: Received,
    verified: bool,
    /// Why sending the download failed, if it did.
    write_error: Option<String>,
    /// As `OrderSummary::eagain`, for this connection.
    eagain: u64,
}

impl OrderServed {
    fn line(&self, peer: &str) -> String {
        let mut line = format!(
            "order peer={peer} got={} verified={} eagain={}",
            self.rx.got, self.verified, self.eagain
        );
        if let Some(k) = self.rx.first_bad {
            line += &format!(" first_bad={k}");
        }
        if let Some(e) = self.rx.error.as_ref().or(self.write_error.as_ref()) {
            line += &format!(" error={e}");
        }
        line
    }
}

/// Serves one `order` connection: writes the download at once while the reader, after
/// `read_delay`, reads the seed header and checks the upload.
fn order_serve_one(s: TcpStream, bytes: u64, read_delay: Duration, poll: bool) -> OrderServed {
    let (mut reader, mut writer) = match Conn::duplex(s, poll) {
        Ok(rw) => rw,
        Err(e) => {
            return OrderServed {
                rx: Received {
                    error: Some(format!("socket setup: {e}")),
                    ..Received::default()
                },
                verified: false,
                write_error: None,
                eagain: 0,
            };
        }
    };
    let (sent, rx) = thread::scope(|sc| {
        let w = &mut writer;
        let writer = sc.spawn(move || -> io::Result<()> {
            write_random(
                w,
                bytes,
                ORDER_DOWN_SEED,
                ORDER_SERVER_MAX_WRITE,
                Some(ORDER_DOWN_SEED ^ SIZES_SEED),
                None,
            )?;
            w.shutdown_write()
        });
        thread::sleep(read_delay);
        let mut seed = [0u8; 8];
        let rx = match reader.read_exact(&mut seed) {
            Ok(()) => read_verify(&mut reader, u64::from_le_bytes(seed), bytes),
            Err(e) => Received {
                error: Some(format!("seed header: {e}")),
                ..Received::default()
            },
        };
        let sent = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
        (sent, rx)
    });
    OrderServed {
        verified: rx.intact(bytes),
        rx,
        write_error: sent.err().map(|e| format!("write: {e}")),
        eagain: reader.eagain + writer.eagain,
    }
}

fn order_serve(
    listen: SocketAddr,
    bytes: u64,
    read_delay: Duration,
    tfo: bool,
    poll: bool,
) -> Result<()> {
    let l = listener(listen, poll)?;
    if tfo {
        set_tcp_fastopen(&l, TFO_QUEUE).context("TCP_FASTOPEN on the listener")?;
    }
    serve_each(l, move |s, peer| {
        order_serve_one(s, bytes, read_delay, poll).line(peer)
    })
}

// === rr: request/response with blocking recv(MSG_WAITALL) ===

/// Smallest `rr --size`: the payload starts with the connection index and request number.
const RR_MIN_SIZE: u32 = 16;
/// Largest request `rr-serve` accepts, so a stray client's bytes do not allocate gigabytes.
const RR_MAX_SIZE: u32 = 64 << 20;

/// Fills `buf` with blocking `recv(MSG_WAITALL)` calls and returns how many came back short
/// (some bytes, fewer than asked), or None at end of stream before the first byte. On plain
/// TCP without a receive timeout a MSG_WAITALL read only comes back short for a signal, EOF or
/// error; a receive path that returns what is queued so far is legal and is asked again.
fn recv_waitall(fd: BorrowedFd, buf: &mut [u8]) -> Result<Option<u64>> {
    let (mut at, mut short) = (0, 0);
    while at < buf.len() {
        match socket::recv(fd.as_raw_fd(), &mut buf[at..], MsgFlags::MSG_WAITALL) {
            Ok(0) if at == 0 => return Ok(None),
            Ok(0) => bail!("end of stream after {at} of {} bytes", buf.len()),
            Ok(n) => {
                if at + n < buf.len() {
                    short += 1;
                }
                at += n;
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("recv after {at} of {} bytes", buf.len()));
            }
        }
    }
    Ok(Some(short))
}

/// Request payload: connection index and request number (little-endian u64s), then the stream
/// for both, cut to `size` bytes.
fn rr_payload(conn: u64, req: u64, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(16));
    p.extend_from_slice(&conn.to_le_bytes());
    p.extend_from_slice(&req.to_le_bytes());
    let mut rest = Vec::new();
    Stream::new(conn.rotate_left(32) ^ req).take(size.saturating_sub(16), &mut rest);
    p.extend_from_slice(&rest);
    p.truncate(size);
    p
}

/// Whether `payload` is the `req`-th request of some connection.
fn rr_payload_valid(payload: &[u8], req: u64) -> bool {
    let field = |i: usize| {
        payload
            .get(i..i + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    match (field(0), field(8)) {
        (Some(conn), Some(r)) => r == req && payload == rr_payload(conn, r, payload.len()),
        _ => false,
    }
}

struct RrArgs {
    connect: SocketAddr,
    connections: u64,
    concurrency: u64,
    requests: u64,
    size: u32,
}

#[derive(Debug)]
struct RrSummary {
    tally: Tally,
    /// Round trips completed and verified.
    requests: u64,
    short_waitall: u64,
}

impl RrSummary {
    fn json(&self) -> String {
        let t = &self.tally;
        format!(
            "{{\"ok\":{},\"connections\":{},\"requests\":{},\"mismatches\":{},\"errors\":{},\"short_waitall\":{},\"first_failures\":{}}}",
            t.ok(),
            t.connections,
            self.requests,
            t.mismatches,
            t.errors,
            self.short_waitall,
            t.failures_json()
        )
    }
}

/// Counters of one `rr` connection.
#[derive(Debug, Default)]
struct RrCounts {
    requests: u64,
    short_waitall: u64,
}

fn rr_client(a: &RrArgs) -> Result<RrSummary> {
    let results = run_pool(a.connections, a.concurrency, |i| {
        let mut c = RrCounts::default();
        let verdict = match rr_exchange(a, i, &mut c) {
            Ok(None) => Verdict::Ok,
            Ok(Some(m)) => Verdict::Mismatch(format!("conn {i}: {m}")),
            Err(e) => Verdict::Error(format!("conn {i}: {e:#}")),
        };
        (verdict, c)
    })?;
    let mut s = RrSummary {
        tally: Tally::default(),
        requests: 0,
        short_waitall: 0,
    };
    for (_, (verdict, c)) in results {
        s.tally.add(verdict);
        s.requests += c.requests;
        s.short_waitall += c.short_waitall;
    }
    Ok(s)
}

/// Runs the requests of connection `index`; returns the first mismatch, which ends the
/// connection (after one the stream is out of step).
fn rr_exchange(a: &RrArgs, index: u64, c: &mut RrCounts) -> Result<Option<String>> {
    let s = connect(a.connect, false, false)?;
    let size = a.size as usize;
    let mut reply = vec![0u8; size];
    for req in 0..a.requests {
        let mut frame = Vec::with_capacity(4 + size);
        frame.extend_from_slice(&a.size.to_le_bytes());
        frame.extend_from_slice(&rr_payload(index, req, size));
        (&s).write_all(&frame)
            .with_context(|| format!("request {req}: write"))?;
        let mut h = [0u8; 4];
        c.short_waitall += recv_waitall(s.as_fd(), &mut h)
            .with_context(|| format!("request {req}: reply header"))?
            .ok_or_else(|| anyhow!("request {req}: end of stream before the reply"))?;
        if h[..] != frame[..4] {
            return Ok(Some(format!(
                "request {req}: reply length {} instead of {}",
                u32::from_le_bytes(h),
                a.size
            )));
        }
        c.short_waitall += recv_waitall(s.as_fd(), &mut reply)
            .with_context(|| format!("request {req}: reply payload"))?
            .ok_or_else(|| anyhow!("request {req}: end of stream after the reply header"))?;
        if let Some(k) = reply.iter().zip(&frame[4..]).position(|(a, b)| a != b) {
            return Ok(Some(format!(
                "request {req}: reply differs at payload byte {k}"
            )));
        }
        c.requests += 1;
    }
    Ok(None)
}

/// What `rr-serve` saw on one connection.
#[derive(Debug, Default)]
struct RrServed {
    requests: u64,
    short_waitall: u64,
    /// Every request so far was the next request of one `rr` connection.
    verified: bool,
    error: Option<String>,
}

impl RrServed {
    fn line(&self, peer: &str) -> String {
        let mut line = format!(
            "rr peer={peer} requests={} short_waitall={} verified={}",
            self.requests, self.short_waitall, self.verified
        );
        if let Some(e) = &self.error {
            line += &format!(" error={e}");
        }
        line
    }
}

/// Echoes requests until the client closes.
fn rr_serve_one(s: &TcpStream) -> RrServed {
    let mut r = RrServed {
        verified: true,
        ..RrServed::default()
    };
    if let Err(e) = rr_echo(s, &mut r) {
        r.verified = false;
        r.error = Some(format!("{e:#}"));
    }
    r
}

fn rr_echo(s: &TcpStream, r: &mut RrServed) -> Result<()> {
    loop {
        let mut h = [0u8; 4];
        let Some(short) = recv_waitall(s.as_fd(), &mut h)
            .with_context(|| format!("request {} header", r.requests))?
        else {
            return Ok(());
        };
        r.short_waitall += short;
        let len = u32::from_le_bytes(h);
        if len > RR_MAX_SIZE {
            bail!(
                "request {} length {len} exceeds {RR_MAX_SIZE}: not an rr client?",
                r.requests
            );
        }
        let mut frame = vec![0u8; 4 + len as usize];
        frame[..4].copy_from_slice(&h);
        r.short_waitall += recv_waitall(s.as_fd(), &mut frame[4..])
            .with_context(|| format!("request {} payload", r.requests))?
            .ok_or_else(|| anyhow!("end of stream before request {} payload", r.requests))?;
        if !rr_payload_valid(&frame[4..], r.requests) {
            r.verified = false;
        }
        (&mut &*s)
            .write_all(&frame)
            .with_context(|| format!("request {} reply", r.requests))?;
        r.requests += 1;
    }
}

fn rr_serve(listen: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    serve_each(l, |s, peer| rr_serve_one(&s).line(peer))
}

// === CLI ===

fn usage() -> ! {
    eprintln!(
        "usage:
  meshtest serve --listen ADDR [--greet BYTES] [--io blocking|poll] [--blocking-connections]
  meshtest client --connect ADDR [--send BYTES] [--reply BYTES] [--seed N] [--connections N] [--max-write BYTES] [--expect-greet BYTES] [--io blocking|poll]
  meshtest order-serve --listen ADDR --bytes B [--read-delay-ms D] [--tfo] [--io blocking|poll]
  meshtest order --connect ADDR --connections N [--concurrency C] --bytes B [--read-delay-ms D] [--max-write W] [--fixed-writes] [--tfo] [--progress FILE] [--seed S] [--io blocking|poll]
  meshtest rr-serve --listen ADDR
  meshtest rr --connect ADDR --connections N [--concurrency C] --requests R --size S

order: both ends write B bytes at once after connect while each reader first sleeps D ms, so
  bytes sent through the short-circuit and over TCP can overtake each other; every byte is
  checked. --progress FILE: upload bytes written so far, every 50 ms (backpressure checks).
  --fixed-writes: the client writes exactly W bytes each time (else random sizes up to W).
  --tfo: TCP Fast Open (client: TCP_FASTOPEN_CONNECT; server: TCP_FASTOPEN).
  --blocking-connections: serve, with --io poll: the listener is non-blocking, each
    connection blocking (as Python's accept() on a listener with a timeout).
  --io blocking (default): no socket timeouts, a stall hangs, and a read that returns EAGAIN
  (spurious, from the kernel) fails the connection; --io poll: non-blocking sockets, every
  EAGAIN waits in poll(2) and retries, a wait over 30 s fails with \"the peer stalled\".
  \"eagain\" (client JSON) / eagain= (server line): connections failed by a spurious EAGAIN
  (blocking), WouldBlock retries (poll).
rr: R echo round trips of S-byte payloads per connection, read with blocking
  recv(MSG_WAITALL) and no socket timeout, so a missed wake-up hangs instead of retrying."
    );
    std::process::exit(2)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    let get = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let num = |name: &str, default: u64| -> Result<u64> {
        get(name).map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name} {v}"))
        })
    };
    let required = |name: &str| -> Result<u64> {
        let v = get(name).unwrap_or_else(|| usage());
        v.parse().with_context(|| format!("{name} {v}"))
    };
    let addr = |name: &str| -> Result<SocketAddr> {
        let v = get(name).unwrap_or_else(|| usage());
        v.parse().with_context(|| format!("{name} {v}"))
    };
    let tfo = args.iter().any(|a| a == "--tfo");
    let poll = match get("--io").as_deref() {
        None | Some("blocking") => false,
        Some("poll") => true,
        Some(_) => usage(),
    };
    match cmd.as_str() {
        "serve" => {
            let listen: SocketAddr = get("--listen").unwrap_or_else(|| usage()).parse()?;
            let blocking_connections = args.iter().any(|a| a == "--blocking-connections");
            serve(listen, num("--greet", 0)?, poll, blocking_connections)
        }
        "client" => {
            let a = ClientArgs {
                connect: get("--connect").unwrap_or_else(|| usage()).parse()?,
                send: num("--send", 1024)?,
                reply: num("--reply", 1024)?,
                seed: num("--seed", 1)?,
                connections: num("--connections", 1)?,
                max_write: usize::try_from(num("--max-write", 65536)?.max(1))?,
                expect_greet: num("--expect-greet", 0)?,
                poll,
            };
            if client(a)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        "order-serve" => order_serve(
            addr("--listen")?,
            required("--bytes")?,
            Duration::from_millis(num("--read-delay-ms", 0)?),
            tfo,
            poll,
        ),
        "order" => {
            let a = OrderArgs {
                connect: addr("--connect")?,
                connections: required("--connections")?,
                concurrency: num("--concurrency", 1)?,
                bytes: required("--bytes")?,
                read_delay: Duration::from_millis(num("--read-delay-ms", 0)?),
                max_write: usize::try_from(num("--max-write", 512)?.max(1))?,
                fixed_writes: args.iter().any(|a| a == "--fixed-writes"),
                tfo,
                progress: get("--progress").map(PathBuf::from),
                seed: num("--seed", 1)?,
                poll,
            };
            let s = order_client(&a)?;
            println!("{}", s.json());
            if s.tally.ok() {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        "rr-serve" => rr_serve(addr("--listen")?),
        "rr" => {
            let size = required("--size")?;
            let size = match u32::try_from(size) {
                Ok(s) if (RR_MIN_SIZE..=RR_MAX_SIZE).contains(&s) => s,
                _ => bail!(
                    "--size {size}: must be {RR_MIN_SIZE}..={RR_MAX_SIZE} (the payload starts with the connection index and request number; rr-serve refuses larger requests)"
                ),
            };
            let a = RrArgs {
                connect: addr("--connect")?,
                connections: required("--connections")?,
                concurrency: num("--concurrency", 1)?,
                requests: required("--requests")?,
                size,
            };
            let s = rr_client(&a)?;
            println!("{}", s.json());
            if s.tally.ok() {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        _ => usage(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_split_independent() {
        let mut a = Stream::new(5);
        let mut whole = Vec::new();
        a.take(100, &mut whole);
        let mut b = Stream::new(5);
        let mut parts = Vec::new();
        let mut tmp = Vec::new();
        for n in [1, 7, 8, 13, 71] {
            b.take(n, &mut tmp);
            parts.extend_from_slice(&tmp);
        }
        assert_eq!(whole, parts);
        let mut c = Stream::new(6);
        c.take(100, &mut tmp);
        assert_ne!(whole, tmp);
    }

    #[test]
    fn loopback_round_trip() -> Result<()> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let server = thread::spawn(move || -> Result<(u64, bool, u64)> {
            let (s, _) = l.accept()?;
            serve_one(&mut Conn::new(s, false)?, 10)
        });
        let a = ClientArgs {
            poll: true,
            connect: addr,
            send: 100_000,
            reply: 5_000,
            seed: 3,
            connections: 1,
            max_write: 1000,
            expect_greet: 10,
        };
        assert_eq!(client_one(&a, 3)?, (100_000, 5_000));
        let r = server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        assert_eq!(r, (100_000, true, 5_000));
        Ok(())
    }

    // === order and rr ===

    fn join<T>(h: thread::JoinHandle<T>) -> Result<T> {
        h.join().map_err(|_| anyhow!("thread panicked"))
    }

    /// Serves `n` loopback connections with `serve_one`, each on its own thread; returns the
    /// address and the reports in accept order.
    fn serve_n<T: Send + 'static>(
        n: usize,
        tfo: bool,
        serve_one: impl Fn(TcpStream) -> T + Send + Sync + 'static,
    ) -> Result<(SocketAddr, thread::JoinHandle<Result<Vec<T>>>)> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        if tfo {
            set_tcp_fastopen(&l, TFO_QUEUE)?;
        }
        let addr = l.local_addr()?;
        let serve_one = Arc::new(serve_one);
        let h = thread::spawn(move || -> Result<Vec<T>> {
            let mut conns = Vec::new();
            for _ in 0..n {
                let (s, _) = l.accept()?;
                let serve_one = Arc::clone(&serve_one);
                conns.push(thread::spawn(move || serve_one(s)));
            }
            conns.into_iter().map(join).collect()
        });
        Ok((addr, h))
    }

    fn order_args(addr: SocketAddr, connections: u64, read_delay_ms: u64) -> OrderArgs {
        OrderArgs {
            connect: addr,
            connections,
            concurrency: 4,
            bytes: 100_000,
            read_delay: Duration::from_millis(read_delay_ms),
            max_write: 512,
            fixed_writes: false,
            tfo: false,
            progress: None,
            seed: 11,
            poll: false,
        }
    }

    /// What varies between the loopback `order` round trips; the rest is `order_args`.
    struct Trip {
        bytes: u64,
        /// Of the client and the server.
        read_delay_ms: u64,
        tfo: bool,
        poll: bool,
        progress: Option<PathBuf>,
    }

    impl Default for Trip {
        fn default() -> Trip {
            Trip {
                bytes: 100_000,
                read_delay_ms: 0,
                tfo: false,
                poll: false,
                progress: None,
            }
        }
    }

    /// 8 connections of `order` both ways, checked by the client and by the server.
    fn order_round_trip(t: Trip) -> Result<OrderSummary> {
        let (bytes, delay, poll) = (t.bytes, Duration::from_millis(t.read_delay_ms), t.poll);
        let (addr, server) = serve_n(8, t.tfo, move |s| order_serve_one(s, bytes, delay, poll))?;
        let a = OrderArgs {
            bytes,
            tfo: t.tfo,
            poll,
            progress: t.progress.clone(),
            ..order_args(addr, 8, t.read_delay_ms)
        };
        let s = order_client(&a)?;
        assert!(s.tally.ok(), "{}", s.json());
        assert_eq!(
            (s.tally.connections, s.bytes_up, s.bytes_down),
            (8, 8 * bytes, 8 * bytes)
        );
        let served = join(server)??;
        assert_eq!(served.len(), 8);
        for r in &served {
            assert!(r.verified, "{}", r.line("server"));
            assert_eq!(r.rx.got, bytes);
        }
        if let Some(p) = t.progress {
            assert_eq!(std::fs::read_to_string(&p)?, format!("{}\n", 8 * bytes));
            std::fs::remove_file(p)?;
        }
        Ok(s)
    }

    #[test]
    fn order_loopback() -> Result<()> {
        let s = order_round_trip(Trip::default())?;
        assert!(s.json().contains(",\"eagain\":0,"), "{}", s.json());
        Ok(())
    }

    #[test]
    fn order_loopback_delayed_readers_with_progress() -> Result<()> {
        let p = std::env::temp_dir().join(format!("meshtest-progress-{}", std::process::id()));
        order_round_trip(Trip {
            read_delay_ms: 20,
            progress: Some(p),
            ..Trip::default()
        })?;
        Ok(())
    }

    /// Setting TCP_FASTOPEN_CONNECT needs no privilege; whether the SYN carries data depends
    /// on net.ipv4.tcp_fastopen, so only integrity is checked.
    #[test]
    fn order_loopback_tfo() -> Result<()> {
        order_round_trip(Trip {
            tfo: true,
            ..Trip::default()
        })?;
        Ok(())
    }

    /// `--io poll` on both sides: non-blocking sockets, shared by a reader and a writer thread.
    #[test]
    fn order_loopback_poll() -> Result<()> {
        order_round_trip(Trip {
            bytes: 200_000,
            read_delay_ms: 5,
            poll: true,
            ..Trip::default()
        })?;
        Ok(())
    }

    /// A read on a blocking socket that returns EAGAIN (made here with O_NONBLOCK behind the
    /// Conn's back, as the kernel's spurious EAGAIN would look) fails and is counted; in poll
    /// mode the same read waits for the data instead.
    #[test]
    fn conn_eagain_blocking_fails_poll_waits() -> Result<()> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let c = TcpStream::connect(l.local_addr()?)?;
        let (s, _) = l.accept()?;
        let (mut blocking, _) = Conn::duplex(c.try_clone()?, false)?;
        c.set_nonblocking(true)?;
        let e = blocking.read(&mut [0u8; 4]).err();
        assert_eq!(e.map(|e| e.kind()), Some(io::ErrorKind::WouldBlock));
        assert_eq!(blocking.eagain, 1);

        let (mut polled, _) = Conn::duplex(c, true)?;
        let late = thread::spawn(move || -> io::Result<()> {
            thread::sleep(Duration::from_millis(20));
            (&s).write_all(b"late")
        });
        let mut got = [0u8; 4];
        polled.read_exact(&mut got)?;
        join(late)??;
        assert_eq!(&got, b"late");
        assert!(polled.eagain >= 1, "{}", polled.eagain);
        Ok(())
    }

    #[test]
    fn order_reports_corrupt_and_short_download() -> Result<()> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        // Connection 0 gets a flipped byte at 1234, connection 1 only half of the stream.
        let server = thread::spawn(move || -> Result<()> {
            for conn in 0..2 {
                let (s, _) = l.accept()?;
                let mut data = Vec::new();
                Stream::new(ORDER_DOWN_SEED).take(100_000, &mut data);
                if conn == 0 {
                    data[1234] ^= 1;
                } else {
                    data.truncate(50_000);
                }
                (&s).write_all(&data)?;
                s.shutdown(Shutdown::Write)?;
                io::copy(&mut &s, &mut io::sink())?;
            }
            Ok(())
        });
        let s = order_client(&OrderArgs {
            concurrency: 1,
            ..order_args(addr, 2, 0)
        })?;
        join(server)??;
        assert!(!s.tally.ok());
        assert_eq!(
            (s.tally.mismatches, s.tally.short, s.tally.errors),
            (1, 1, 0)
        );
        assert!(
            s.tally.first_failures[0].contains("offset 1234"),
            "{}",
            s.json()
        );
        assert!(
            s.tally.first_failures[1].contains("got 50000 of 100000"),
            "{}",
            s.json()
        );
        assert!(s.json().starts_with("{\"ok\":false,\"connections\":2,"));
        Ok(())
    }

    #[test]
    fn order_server_reports_corrupt_upload() -> Result<()> {
        let (addr, server) = serve_n(1, false, |s| {
            order_serve_one(s, 10_000, Duration::ZERO, false)
        })?;
        let s = TcpStream::connect(addr)?;
        let mut data = Vec::new();
        Stream::new(7).take(10_000, &mut data);
        data[777] ^= 0x80;
        (&s).write_all(&7u64.to_le_bytes())?;
        (&s).write_all(&data)?;
        s.shutdown(Shutdown::Write)?;
        io::copy(&mut &s, &mut io::sink())?;
        let served = join(server)??;
        assert!(!served[0].verified);
        assert_eq!(served[0].rx.first_bad, Some(777));
        assert!(
            served[0]
                .line("p")
                .ends_with("got=10000 verified=false eagain=0 first_bad=777")
        );
        Ok(())
    }

    #[test]
    fn read_verify_flags_extra_bytes() {
        let mut data = Vec::new();
        Stream::new(3).take(100, &mut data);
        let rx = read_verify(&mut &data[..], 3, 90);
        assert_eq!((rx.got, rx.first_bad), (100, Some(90)));
        let rx = read_verify(&mut &data[..], 3, 100);
        assert!(rx.intact(100));
    }

    #[test]
    fn rr_loopback() -> Result<()> {
        let (addr, server) = serve_n(3, false, |s| rr_serve_one(&s))?;
        let s = rr_client(&RrArgs {
            connect: addr,
            connections: 3,
            concurrency: 2,
            requests: 50,
            size: 3000,
        })?;
        assert!(s.tally.ok(), "{}", s.json());
        assert_eq!((s.tally.connections, s.requests), (3, 150));
        for r in join(server)?? {
            assert!(r.verified && r.requests == 50, "{}", r.line("server"));
        }
        Ok(())
    }

    #[test]
    fn rr_reports_corrupt_echo() -> Result<()> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        // Echoes, with payload byte 100 of request 3 flipped.
        let server = thread::spawn(move || -> Result<()> {
            let (mut s, _) = l.accept()?;
            for req in 0..4 {
                let mut h = [0u8; 4];
                s.read_exact(&mut h)?;
                let mut p = vec![0u8; u32::from_le_bytes(h) as usize];
                s.read_exact(&mut p)?;
                if req == 3 {
                    p[100] ^= 1;
                }
                s.write_all(&h)?;
                s.write_all(&p)?;
            }
            Ok(())
        });
        let s = rr_client(&RrArgs {
            connect: addr,
            connections: 1,
            concurrency: 1,
            requests: 10,
            size: 200,
        })?;
        join(server)??;
        assert_eq!((s.tally.mismatches, s.tally.errors, s.requests), (1, 0, 3));
        assert!(s.tally.first_failures[0].contains("request 3: reply differs at payload byte 100"));
        assert!(s.json().starts_with("{\"ok\":false,"));
        Ok(())
    }

    #[test]
    fn recv_waitall_end_of_stream() -> Result<()> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let c = TcpStream::connect(l.local_addr()?)?;
        let (mut s, _) = l.accept()?;
        s.write_all(&[1, 2])?;
        drop(s);
        let e = recv_waitall(c.as_fd(), &mut [0u8; 4]).err();
        assert!(
            format!("{e:?}").contains("end of stream after 2 of 4 bytes"),
            "{e:?}"
        );
        assert!(recv_waitall(c.as_fd(), &mut [0u8; 4])?.is_none());
        Ok(())
    }

    #[test]
    fn rr_payload_checks() {
        let p = rr_payload(5, 9, 100);
        assert!(rr_payload_valid(&p, 9));
        assert!(!rr_payload_valid(&p, 8));
        assert!(!rr_payload_valid(&p[..15], 9));
        assert_ne!(p[16..], rr_payload(5, 10, 100)[16..]);
    }
}
