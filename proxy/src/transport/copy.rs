//! Bidirectional copy between the workload's connection and the upstream one.
//!
//! Each direction has one fixed buffer (`copy_buffer_bytes`): the proxy reads only when it
//! has written what it read before, so a slow reader on one side pushes back on the sender
//! through TCP flow control instead of growing memory. End of stream on one side is passed
//! on as a half-close (shutdown of the write side), so request/response protocols that
//! signal the end of a request with FIN keep working. An error on either side ends both
//! directions; the caller resets the sockets.
//!
//! Bytes are counted as they move (not only at the end), so the admin API can show live
//! connections with their byte counts.
//!
//! With the sk_msg short-circuit on (`recheck`), a read or write that waited [`RECHECK`]
//! for readiness asks the socket directly (`recv`/`send` with MSG_DONTWAIT). Measured: in
//! about one run in ten of `stream 1KiB x100`, one connection stopped for good with 3.6 MB
//! in the proxy's inbound TCP receive queue, none ever read, because no readiness event came
//! after the bytes moved from the psock list to the TCP queue; a direct `recv` returns them
//! (16 of 16 runs clean with it). Writes get the same backstop: a short-circuit socket can
//! refuse a write for lack of memory with nothing in its own TCP queue, so no ACK would
//! report it writable again. Idle reads back off to [`RECHECK_IDLE_MAX`].

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
    time::Duration,
};

use nix::sys::socket::{MsgFlags, recv, send};

use super::rechecked::Rechecked;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf},
    net::{
        TcpStream,
        tcp::{ReadHalf as TcpReadHalf, WriteHalf as TcpWriteHalf},
    },
};

/// How long a write (or, at first, a read) waits for readiness before asking the kernel
/// directly.
pub const RECHECK: Duration = Duration::from_millis(50);
/// The same for a read after a step (`Rechecked::ask_after`: its connection leaving the
/// short-circuit, or the other direction's end of stream), when an answer or the rest of a
/// stream is due soon: measured, the server's answer to the end of an upload, found only by
/// a timed recheck on 3 to 8 of 100 connections a run (`cargo xtask bench --streams-only`,
/// 16 KiB writes), came after that connection's reader had backed off to a second.
pub const RECHECK_AFTER_STEP: Duration = Duration::from_millis(5);
/// The longest an idle read waits between direct checks.
pub const RECHECK_IDLE_MAX: Duration = Duration::from_secs(1);

/// A half of a connection that can try its socket directly, past the runtime's readiness.
pub trait Direct {
    /// `Some(result of a non-blocking recv)`, or `None` if there is no socket under it.
    fn recv_now(&self, _buf: &mut [u8]) -> Option<io::Result<usize>> {
        None
    }
    /// A read that waits for readiness like `poll_read` but keeps it after a short read
    /// ([`poll_recv_keeping_readiness`]); `None` if there is no socket under it.
    fn poll_recv(
        &self,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<()>>> {
        None
    }
    /// `Some(result of a non-blocking send)`, or `None` if there is no socket under it.
    fn send_now(&self, _buf: &[u8]) -> Option<io::Result<usize>> {
        None
    }
}

/// A non-blocking `recv` on socket `fd`, past the runtime's readiness.
pub fn recv_now(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv(fd, buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

/// A non-blocking `send` on socket `fd` (no SIGPIPE), past the runtime's readiness.
pub fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    send(fd, buf, flags).map_err(io::Error::from)
}

/// A read that takes the socket's readiness for gone only when the read would block.
///
/// tokio's `poll_read` also drops it after a read that did not fill the buffer (on epoll
/// that shows the socket drained). A socket in the SOCKHASH breaks that rule:
/// `tcp_bpf_recvmsg` (net/ipv4/tcp_bpf.c) returns what its psock list holds (redirected
/// bytes) and stops there, even with TCP bytes behind them in the receive queue. That
/// happens while a connection leaves the short-circuit: a workload out of the SOCKHASH
/// writes over TCP to the proxy's socket, whose psock list still holds what that workload
/// redirected before. The read that empties the list is short, tokio drops the readiness,
/// and the edge the TCP bytes raised was already taken: nothing more comes while the writer
/// waits on a full window, until the copy's [`RECHECK`] (50 ms) asks directly. Measured
/// (`mesh_tcp_readiness_rechecks_total`, 100 streams of 16 KiB writes, 5 runs): the timed
/// rechecks found bytes 2 to 34 times a run before this, 1 to 15 after; at the start of
/// leaving, the direct ask (`Reading::steps`) finds bytes waiting on 36 to 97 connections of
/// 100.
///
/// Not for every read: after a short read, the next one (an EAGAIN, mostly) costs a syscall.
/// Used for all reads, it slowed 100 streams of 1 KiB writes to x0.53 of TCP (the proxy,
/// short of CPU among 200 load threads, fell behind and the workloads asked to leave); the
/// copy uses it only while its connection leaves ([`Reading::mixed_queues`]).
pub fn poll_recv_keeping_readiness(
    s: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        ready!(s.poll_read_ready(cx))?;
        // `try_read` drops the readiness on WouldBlock only.
        match s.try_read(buf.initialize_unfilled()) {
            Ok(n) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl Direct for TcpStream {
    fn recv_now(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        Some(recv_now(self.as_raw_fd(), buf))
    }
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<()>>> {
        Some(poll_recv_keeping_readiness(self, cx, buf))
    }
    fn send_now(&self, buf: &[u8]) -> Option<io::Result<usize>> {
        Some(send_now(self.as_raw_fd(), buf))
    }
}

impl<T: Direct> Direct for &mut T {
    fn recv_now(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        (**self).recv_now(buf)
    }
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<()>>> {
        (**self).poll_recv(cx, buf)
    }
    fn send_now(&self, buf: &[u8]) -> Option<io::Result<usize>> {
        (**self).send_now(buf)
    }
}

impl Direct for TcpReadHalf<'_> {
    fn recv_now(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        Some(recv_now(AsRef::<TcpStream>::as_ref(self).as_raw_fd(), buf))
    }
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<()>>> {
        Some(poll_recv_keeping_readiness(self.as_ref(), cx, buf))
    }
}

impl Direct for TcpWriteHalf<'_> {
    fn send_now(&self, buf: &[u8]) -> Option<io::Result<usize>> {
        Some(send_now(AsRef::<TcpStream>::as_ref(self).as_raw_fd(), buf))
    }
}

/// Tunnel streams (TLS over HTTP/2) have no socket of their own to ask.
impl<T> Direct for ReadHalf<T> {}
impl<T> Direct for WriteHalf<T> {}

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client (workload) to upstream.
    pub to_upstream: u64,
    /// Upstream to client.
    pub to_client: u64,
}

/// Live byte counters of one connection, shared with the connection table.
#[derive(Debug, Default)]
pub struct Progress {
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
}

impl Progress {
    pub fn snapshot(&self) -> Transferred {
        Transferred {
            to_upstream: self.to_upstream.load(Ordering::Relaxed),
            to_client: self.to_client.load(Ordering::Relaxed),
        }
    }
}

/// Told, after each write, how many bytes of a direction the proxy has relayed in all (read
/// from one side and finished writing to the other): the kernel-only path switches a
/// direction over only when nothing of it is left in the proxy. It answers whether the
/// write went into a short-circuited workload that is falling behind.
pub trait Relay: Sync {
    /// `to_upstream`: the client-to-upstream direction; `total`: its bytes relayed so far;
    /// `waited`: the write found the socket full and waited for room (TCP's window or the
    /// socket's memory: the reader behind it, not the proxy, set the pace). Returns how long
    /// the copy should pause before its next write in that direction (see [`held_pause`]).
    fn relayed(&self, to_upstream: bool, total: u64, waited: bool) -> Option<Duration>;

    /// Signalled (`notify_one`) when the relay starts something it must look at between
    /// writes too ([`Relay::next_tick`]); `None` if it never does.
    fn ticking(&self) -> Option<&tokio::sync::Notify> {
        None
    }

    /// How long until the relay wants to look again without waiting for a write ([`Relay::tick`]);
    /// `None` once there is nothing to look at.
    fn next_tick(&self) -> Option<Duration> {
        None
    }

    /// Looks (between the copy's reads and writes: never while a syscall of the copy is under
    /// way, as for `relayed`).
    fn tick(&self) {}

    /// How the copy reads the proxy's sockets now ([`Reading`]), asked at every poll of a
    /// read. One answer for all three rules, so that a relay that wraps another (`Splicer`
    /// around its `Pacer`) passes them on in one place.
    fn reading(&self) -> Reading {
        Reading::default()
    }
}

/// The relay's rules for the copy's reads at this moment (`Relay::reading`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// A read of the proxy's sockets may find redirected bytes ahead of TCP bytes (the
    /// connection is leaving the short-circuit): keep a socket's readiness after a short
    /// read ([`poll_recv_keeping_readiness`]).
    pub mixed_queues: bool,
    /// A read may wait for a wake-up that was lost before the relay could know (its
    /// connection on the short-circuit, no workload's ask seen yet): ask directly after
    /// [`RECHECK_AFTER_STEP`], not [`RECHECK`] (`Rechecked::rechecks_soon`).
    pub rechecks_soon: bool,
    /// A count the relay moves on at each step that can change how the proxy's sockets are
    /// read (a connection starting to leave the short-circuit, each socket out of the
    /// SOCKHASH, the end of leaving). A read that waits asks its socket directly once when
    /// it sees the count move (`Rechecked::ask_after`): the step may have followed a short
    /// read that dropped a readiness still owed.
    pub steps: u64,
}

/// The copy's third leg: calls [`Relay::tick`] at the times the relay asks for, from its
/// first signal until it has nothing left to look at. Never returns.
async fn ticks(relay: &dyn Relay) -> std::convert::Infallible {
    if let Some(started) = relay.ticking() {
        started.notified().await;
        while let Some(d) = relay.next_tick() {
            tokio::time::sleep(d).await;
            relay.tick();
        }
    }
    std::future::pending().await
}

/// How long the copy pauses after a write that sk_msg redirected into a workload whose queue
/// is `level` sixteenths full (`Flow::held`: 12, i.e. 3/4 of the queue limit, to 16), if at
/// all. A redirected write has no flow control: it returns at once however far behind the
/// reader is, so without a pause the proxy fills the queue within milliseconds and the
/// direction leaves the short-circuit for good (for a proxy direction: its reader is a
/// workload that may wait in `tcp_recvmsg`, where later redirected bytes are invisible).
///
/// [`HELD_PAUSE`] at 3/4, doubling with each sixteenth up to 3.2 ms at the limit. Measured
/// here (`stream` through the proxy, 64 KiB and 1 MiB writes): a flat 1 ms pause (tokio's
/// timer, 1 to 2 ms in practice) often let the reader empty the 3 MiB it had left and wait,
/// and streams ran at 0.9x of TCP through the proxy; 200 us keeps it fed (1.1x to 1.6x). At
/// one write (at most `copy_buffer_bytes`, 64 KiB) per pause, a reader that stops reading
/// altogether has about 12 ms before the proxy meets the limit and that direction takes TCP,
/// whose window then holds the proxy back.
pub fn held_pause(level: u32) -> Option<Duration> {
    let over = level.checked_sub(12)?;
    Some(HELD_PAUSE * (1 << over.min(4)))
}

/// The shortest pause, at 3/4 of the queue limit.
pub const HELD_PAUSE: Duration = Duration::from_micros(200);

/// Waits `d` with microsecond precision: tokio's timers tick in milliseconds, too coarse for
/// [`HELD_PAUSE`]. One thread, started on first use, wakes every pause at its deadline.
async fn pause(d: Duration) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if pauses().add(std::time::Instant::now() + d, tx) {
        let _ = rx.await;
    } else {
        tokio::time::sleep(d).await;
    }
}

/// A pause: its deadline, a tie-break, and whom to wake.
struct Due(std::time::Instant, u64, tokio::sync::oneshot::Sender<()>);

impl PartialEq for Due {
    fn eq(&self, other: &Due) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Due) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Due) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

/// The pending pauses, earliest first, and the timer thread's wake-up.
struct Pauses {
    due: std::sync::Mutex<(std::collections::BinaryHeap<std::cmp::Reverse<Due>>, u64)>,
    changed: std::sync::Condvar,
}

impl Pauses {
    /// Queues a wake-up; false if the timer thread could not be started.
    fn add(&self, at: std::time::Instant, wake: tokio::sync::oneshot::Sender<()>) -> bool {
        if !PAUSE_THREAD.get_or_init(start_pause_thread) {
            return false;
        }
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        let seq = due.1;
        due.1 = seq.wrapping_add(1);
        let earliest = due.0.peek().is_none_or(|first| at < first.0.0);
        due.0.push(std::cmp::Reverse(Due(at, seq, wake)));
        if earliest {
            self.changed.notify_one();
        }
        true
    }

    /// The timer thread: sends each pause's wake-up at its deadline.
    fn run(&self) {
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = std::time::Instant::now();
            let wait = match due.0.peek() {
                None => None,
                Some(first) if first.0.0 <= now => {
                    if let Some(std::cmp::Reverse(Due(_, _, wake))) = due.0.pop() {
                        // The pause may have been dropped (its connection ended): fine.
                        let _ = wake.send(());
                    }
                    continue;
                }
                Some(first) => Some(first.0.0 - now),
            };
            due = match wait {
                None => self.changed.wait(due).unwrap_or_else(|e| e.into_inner()),
                Some(w) => match self.changed.wait_timeout(due, w) {
                    Ok((g, _)) => g,
                    Err(e) => e.into_inner().0,
                },
            };
        }
    }
}

fn pauses() -> &'static Pauses {
    static PAUSES: std::sync::OnceLock<Pauses> = std::sync::OnceLock::new();
    PAUSES.get_or_init(|| Pauses {
        due: std::sync::Mutex::new((std::collections::BinaryHeap::new(), 0)),
        changed: std::sync::Condvar::new(),
    })
}

static PAUSE_THREAD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn start_pause_thread() -> bool {
    std::thread::Builder::new()
        .name("copy-pauses".into())
        .spawn(|| pauses().run())
        .is_ok()
}

/// `recheck`: the sockets may be on the sk_msg short-circuit, whose readiness can be lost
/// (see the module comment); plain TCP never needs it. `relay`: told the relayed totals.
pub async fn bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    buffer: usize,
    recheck: bool,
    relay: Option<&dyn Relay>,
    progress: &Progress,
) -> io::Result<Transferred> {
    let copy = both_ways(
        client.split(),
        upstream.split(),
        buffer,
        recheck,
        relay,
        progress,
    );
    // The relay's ticks run in this same task, for the same reason as the two directions
    // (`both_ways`): they look between the copy's reads and writes, never during one.
    match relay {
        Some(relay) => tokio::select! {
            r = copy => r?,
            never = ticks(relay) => match never {},
        },
        None => copy.await?,
    };
    Ok(progress.snapshot())
}

/// [`bidirectional`] between a client socket and any upstream stream (a tunnel stream to
/// another node's proxy), with the same buffers, half-close and counting.
pub async fn bidirectional_io<U>(
    client: &mut TcpStream,
    upstream: U,
    buffer: usize,
    recheck: bool,
    progress: &Progress,
) -> io::Result<Transferred>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    both_ways(
        client.split(),
        tokio::io::split(upstream),
        buffer,
        recheck,
        None,
        progress,
    )
    .await?;
    Ok(progress.snapshot())
}

/// Both directions of a connection, client to upstream and back, in one future: never
/// spawned apart. `Pacer` relies on it (it marks the socket towards the client from the
/// other direction's `relayed`, which must not run while a write towards the client is
/// under way), and each direction's end of stream is a step for the other's read
/// (`one_way`'s `ended`).
async fn both_ways<CR, CW, UR, UW>(
    (mut cr, mut cw): (CR, CW),
    (mut ur, mut uw): (UR, UW),
    buffer: usize,
    recheck: bool,
    relay: Option<&dyn Relay>,
    progress: &Progress,
) -> io::Result<()>
where
    CR: AsyncRead + Unpin + Direct,
    CW: AsyncWrite + Unpin + Direct,
    UR: AsyncRead + Unpin + Direct,
    UW: AsyncWrite + Unpin + Direct,
{
    let ended = AtomicU64::new(0);
    let up = (relay.map(|r| (r, true)), &progress.to_upstream);
    let down = (relay.map(|r| (r, false)), &progress.to_client);
    tokio::try_join!(
        one_way(&mut cr, &mut uw, buffer, recheck, up, &ended),
        one_way(&mut ur, &mut cw, buffer, recheck, down, &ended),
    )?;
    Ok(())
}

/// Copies until end of stream, then half-closes the writer. With `recheck` both ends ask
/// their sockets directly when readiness is slow to come (`Rechecked`). `(relay, count)`:
/// the relay and direction told after each write, and the direction's byte counter.
/// `ended`: shared by the two directions of a connection, each adds 1 when it has passed
/// its end of stream on.
async fn one_way<R, W>(
    r: &mut R,
    w: &mut W,
    buffer: usize,
    recheck: bool,
    (relay, count): (Option<(&dyn Relay, bool)>, &AtomicU64),
    ended: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Direct,
    W: AsyncWrite + Unpin + Direct,
{
    // The rechecks stay on after a connection left the short-circuit: a wake-up lost while
    // it was on it is not delivered again on plain TCP. Caught in `cargo xtask bench
    // --quick` (about one run in three, 100 streams of 1 MiB writes): stopping them once all
    // four sockets were out left a connection with 3.5 MB unread in the proxy's TCP receive
    // queue, a full window and no event to come, until the client's 30 s timeout.
    let (mut r, mut w) = (Rechecked::new(r, recheck), Rechecked::new(w, recheck));
    let mut buf = vec![0u8; buffer];
    let mut relayed = 0u64;
    loop {
        // Asked at every poll, not once per read: a read that waits across a step of the
        // relay or the other direction's end (the task is polled at the relay's ticks and
        // the other direction's progress) asks its socket directly once.
        let n = std::future::poll_fn(|cx| {
            let mut steps = ended.load(Ordering::Relaxed);
            if let Some((relay, _)) = relay {
                let now = relay.reading();
                r.keep_readiness(now.mixed_queues);
                r.rechecks_soon(now.rechecks_soon);
                steps = steps.wrapping_add(now.steps);
            }
            r.ask_after(steps);
            let mut b = ReadBuf::new(&mut buf);
            ready!(Pin::new(&mut r).poll_read(cx, &mut b))?;
            Poll::Ready(io::Result::Ok(b.filled().len()))
        })
        .await?;
        if n == 0 {
            w.shutdown().await?;
            // The other direction's read may be waiting for the answer to this end of
            // stream (a request/response protocol), and a wake-up lost there would cost it
            // its idle recheck (up to RECHECK_IDLE_MAX) at the end of every upload: a step
            // for it (`Rechecked::ask_after`), and a yield, so that the task polls it again.
            ended.fetch_add(1, Ordering::Relaxed);
            tokio::task::yield_now().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        // A no-op on a TcpStream; a tunnel stream (HTTP/2 DATA frames) may hold bytes until
        // flushed, and a request/response peer would wait for them forever.
        w.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        relayed += n as u64;
        let waited = w.take_write_blocked();
        if let Some((relay, to_upstream)) = relay {
            let pause_for = relay.relayed(to_upstream, relayed, waited);
            if let Some(d) = pause_for {
                pause(d).await;
            }
        }
    }
}

/// Closes with RST instead of FIN, so the peer sees the failure rather than a clean end.
pub fn reset(stream: TcpStream) {
    // SO_LINGER with a zero timeout makes close() send RST.
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::test_support::tcp_pair;
    use tokio::io::AsyncReadExt;

    #[test]
    fn held_pause_grows_with_the_fill_level() {
        assert_eq!(held_pause(0), None);
        assert_eq!(held_pause(11), None);
        assert_eq!(held_pause(12), Some(HELD_PAUSE));
        assert_eq!(held_pause(13), Some(HELD_PAUSE * 2));
        assert_eq!(held_pause(16), Some(HELD_PAUSE * 16));
        // A level past 16 (which sk_msg never writes) pauses no longer than the limit's.
        assert_eq!(held_pause(40), Some(HELD_PAUSE * 16));
    }

    #[tokio::test]
    async fn pauses_end_after_their_time_in_any_order() {
        // Many pauses at once, the longest first: each ends, none before its deadline.
        let mut tasks = Vec::new();
        for i in (0..50u64).rev() {
            tasks.push(tokio::spawn(async move {
                let d = Duration::from_micros(100 * i);
                let start = std::time::Instant::now();
                pause(d).await;
                start.elapsed() >= d
            }));
        }
        for t in tasks {
            assert!(matches!(t.await, Ok(true)));
        }
    }

    /// A relay that asks for ticks once a write told it to, three of them, then no more.
    struct Ticking {
        notify: tokio::sync::Notify,
        left: std::sync::atomic::AtomicU32,
        ticks: std::sync::atomic::AtomicU32,
    }

    impl Relay for Ticking {
        fn relayed(&self, _to_upstream: bool, _total: u64, _waited: bool) -> Option<Duration> {
            self.notify.notify_one();
            None
        }
        fn ticking(&self) -> Option<&tokio::sync::Notify> {
            Some(&self.notify)
        }
        fn next_tick(&self) -> Option<Duration> {
            (self.left.load(Ordering::Relaxed) > 0).then_some(Duration::from_millis(1))
        }
        fn tick(&self) {
            self.left.fetch_sub(1, Ordering::Relaxed);
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn the_relay_ticks_between_writes_and_the_copy_still_ends() -> io::Result<()> {
        let (mut client, mut proxy_in) = tcp_pair().await?;
        let (mut proxy_out, mut server) = tcp_pair().await?;
        let relay = std::sync::Arc::new(Ticking {
            notify: tokio::sync::Notify::new(),
            left: std::sync::atomic::AtomicU32::new(3),
            ticks: std::sync::atomic::AtomicU32::new(0),
        });
        let r = std::sync::Arc::clone(&relay);
        let copier = tokio::spawn(async move {
            let p = Progress::default();
            bidirectional(&mut proxy_in, &mut proxy_out, 1024, false, Some(&*r), &p).await
        });
        // One write starts the ticks; none follows until they are done.
        client.write_all(b"hello").await?;
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while relay.ticks.load(Ordering::Relaxed) < 3 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(relay.ticks.load(Ordering::Relaxed), 3);
        client.shutdown().await?;
        server.shutdown().await?;
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await?;
        client.read_to_end(&mut rest).await?;
        let t = copier.await.map_err(io::Error::other)??;
        assert_eq!(t.to_upstream, 5);
        assert_eq!(relay.ticks.load(Ordering::Relaxed), 3);
        Ok(())
    }

    #[tokio::test]
    async fn half_close_passes_through_and_counts_bytes() -> io::Result<()> {
        let (mut client, mut proxy_in) = tcp_pair().await?;
        let (mut proxy_out, mut server) = tcp_pair().await?;
        let copier = tokio::spawn(async move {
            let p = Progress::default();
            bidirectional(&mut proxy_in, &mut proxy_out, 1024, true, None, &p).await
        });
        let request = vec![7u8; 100_000];
        client.write_all(&request).await?;
        client.shutdown().await?;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await?;
        assert_eq!(got, request);
        server.write_all(b"response").await?;
        server.shutdown().await?;
        let mut back = Vec::new();
        client.read_to_end(&mut back).await?;
        assert_eq!(back, b"response");
        let t = copier.await.map_err(io::Error::other)??;
        assert_eq!(
            t,
            Transferred {
                to_upstream: 100_000,
                to_client: 8
            }
        );
        Ok(())
    }

    #[tokio::test]
    async fn an_error_on_one_side_ends_both() -> io::Result<()> {
        let (client, mut proxy_in) = tcp_pair().await?;
        let (mut proxy_out, _server) = tcp_pair().await?;
        // The client resets: the copy must end with an error even though the server side
        // stays open and silent.
        client.set_zero_linger()?;
        drop(client);
        let p = Progress::default();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            bidirectional(&mut proxy_in, &mut proxy_out, 1024, false, None, &p),
        )
        .await;
        assert!(matches!(r, Ok(Err(_))), "expected a reset error, got {r:?}");
        Ok(())
    }

    /// A writer whose readiness never comes (as after the kernel refused a short-circuit
    /// write with an empty TCP queue), but whose socket takes bytes when asked directly.
    struct NeverReady {
        sends: std::cell::Cell<usize>,
    }

    impl AsyncWrite for NeverReady {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Pending
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl Direct for NeverReady {
        fn send_now(&self, buf: &[u8]) -> Option<io::Result<usize>> {
            // Half at a time, so the loop must come back for the rest.
            self.sends.set(self.sends.get() + 1);
            Some(Ok(buf.len().div_ceil(2)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_whose_readiness_never_comes_is_retried_directly() -> io::Result<()> {
        let mut w = NeverReady {
            sends: std::cell::Cell::new(0),
        };
        Rechecked::new(&mut w, true).write_all(&[1u8; 1000]).await?;
        // Left after each: 500, 250, 125, 62, 31, 15, 7, 3, 1, 0: ten direct sends.
        assert_eq!(w.sends.get(), 10);
        Ok(())
    }
}
