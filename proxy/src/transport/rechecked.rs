//! A TCP stream whose reads and writes do not depend on readiness alone, for the sockets of
//! connections the proxy terminates (HTTP, through hyper) when the sk_msg short-circuit is on.
//!
//! The backstop the L4 copy loop uses too (`transport::copy`, whose module comment has the
//! measurement): a short-circuit socket can hold bytes (or room to write) without a readiness
//! event ever coming, so a read or write that has waited [`RECHECK`] asks the socket directly
//! with MSG_DONTWAIT; an idle read asks again after twice as long, up to [`RECHECK_IDLE_MAX`]
//! (a keep-alive connection costs a syscall per second). Without the short-circuit the
//! wrapper only delegates.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Sleep,
};

use super::copy::{Direct, RECHECK, RECHECK_AFTER_STEP, RECHECK_IDLE_MAX};

/// Label of `mesh_tcp_readiness_rechecks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecheckLabels {
    /// `read`: a direct ask found bytes (or end of stream) that no readiness had reported;
    /// `write`: it found room to write.
    pub op: &'static str,
}

/// The process's count of timed direct asks that found what readiness had not reported: a
/// lost wake-up each, and the time until its recheck lost with it (after the 5 ms interval
/// that follows a step, `RECHECK_AFTER_STEP`, possibly a wake-up still on its way through a
/// busy runtime). The metrics register it.
pub fn rechecks() -> &'static Family<RecheckLabels, Counter> {
    static RECHECKS: OnceLock<Family<RecheckLabels, Counter>> = OnceLock::new();
    RECHECKS.get_or_init(|| {
        // Both series from the start: a scrape shows 0, not nothing.
        let f = Family::default();
        for op in ["read", "write"] {
            drop(f.get_or_create(&RecheckLabels { op }));
        }
        f
    })
}

fn count_recheck(op: &'static str) {
    rechecks().get_or_create(&RecheckLabels { op }).inc();
}

/// One direction's wait for readiness: the timer that ends it, how long the next is, and
/// how long the first after progress is.
struct Wait {
    timer: Option<Pin<Box<Sleep>>>,
    next: Duration,
    first: Duration,
}

impl Wait {
    fn new() -> Wait {
        Wait {
            timer: None,
            next: RECHECK,
            first: RECHECK,
        }
    }

    /// True once the current wait is over (a timer is armed first, and polled so it wakes
    /// this task).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let next = self.next;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(next)));
        if timer.as_mut().poll(cx).is_ready() {
            self.timer = None;
            return true;
        }
        false
    }

    /// The socket made progress: the next wait starts short again.
    fn reset(&mut self) {
        self.restart(self.first);
    }

    /// The current wait is off; the next one lasts `next`.
    fn restart(&mut self, next: Duration) {
        self.timer = None;
        self.next = next;
    }

    /// Nothing there when asked: wait longer next time, up to `max`.
    fn back_off(&mut self, max: Duration) {
        self.next = (self.next * 2).min(max);
    }
}

/// See the module comment. `recheck` false: a plain delegate. Over a whole stream (HTTP), over
/// either half of one (the copy loop), or over a tunnel stream, which has no socket to ask.
pub struct Rechecked<T = TcpStream> {
    inner: T,
    recheck: bool,
    read: Wait,
    write: Wait,
    /// A write found the stream full (returned Pending) since `take_write_blocked`.
    write_blocked: bool,
    /// Reads keep the socket's readiness after a short read (`keep_readiness`).
    keep_readiness: bool,
    /// A read that waits asks the socket directly once (`ask_after`).
    ask_now: bool,
    /// The relay's step count last seen (`ask_after`).
    steps_seen: u64,
}

impl<T> Rechecked<T> {
    pub fn new(inner: T, recheck: bool) -> Rechecked<T> {
        Rechecked {
            inner,
            recheck,
            read: Wait::new(),
            write: Wait::new(),
            write_blocked: false,
            keep_readiness: false,
            ask_now: false,
            steps_seen: 0,
        }
    }

    /// With `on` (and `recheck`), reads take the socket's readiness for gone only when a read
    /// would block, not after a short one (`copy::poll_recv_keeping_readiness`, which says
    /// when a short read does not show the socket drained and what this costs).
    pub fn keep_readiness(&mut self, on: bool) {
        self.keep_readiness = on && self.recheck;
    }

    /// With `soon`, a read that waits asks the socket directly after [`RECHECK_AFTER_STEP`]
    /// rather than [`RECHECK`] (`copy::Reading::rechecks_soon`): from the next wait that
    /// starts, or from the current one if its timer is not armed yet.
    pub fn rechecks_soon(&mut self, soon: bool) {
        let first = if soon { RECHECK_AFTER_STEP } else { RECHECK };
        if self.read.first != first {
            self.read.first = first;
            // A wait not begun yet (no timer armed) takes the new interval at once.
            if self.read.timer.is_none() {
                self.read.next = first;
            }
        }
    }

    /// `steps`: the relay's step count (`copy::Reading::steps`). When it moved since the last
    /// call, a read that waits asks the socket directly once, at once (with `recheck`).
    /// The next timed ask then comes after [`RECHECK_AFTER_STEP`], doubling from there.
    pub fn ask_after(&mut self, steps: u64) {
        if steps != self.steps_seen {
            self.steps_seen = steps;
            if self.recheck {
                self.ask_now = true;
                self.read.restart(RECHECK_AFTER_STEP);
            }
        }
    }

    /// True if a write had to wait for room since the last call: the receiver, not the
    /// writer, set the pace.
    pub fn take_write_blocked(&mut self) -> bool {
        std::mem::take(&mut self.write_blocked)
    }
}

impl<T: AsyncRead + Direct + Unpin> AsyncRead for Rechecked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let read = match this.keep_readiness.then(|| this.inner.poll_recv(cx, buf)) {
                Some(Some(read)) => read,
                // Off, or no socket to ask (a tunnel stream).
                _ => Pin::new(&mut this.inner).poll_read(cx, buf),
            };
            if let Poll::Ready(r) = read {
                this.read.reset();
                return Poll::Ready(r);
            }
            // The timer's ask backs off when it finds nothing; `ask_now`'s does not.
            let timed = if std::mem::take(&mut this.ask_now) {
                false
            } else if this.recheck && this.read.expired(cx) {
                true
            } else {
                return Poll::Pending;
            };
            match this.inner.recv_now(buf.initialize_unfilled()) {
                Some(Ok(n)) => {
                    buf.advance(n);
                    this.read.reset();
                    // A lost wake-up for sure only once the timer ran out: right after a
                    // short read, the event may still be on its way.
                    if timed {
                        count_recheck("read");
                    }
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => {
                    return Poll::Ready(Err(e));
                }
                // Nothing there, or no socket to ask (a tunnel stream). Loop: poll the stream
                // again (registers for readiness) and arm the next timer, longer after a
                // timed ask.
                _ => {
                    if timed {
                        this.read.back_off(RECHECK_IDLE_MAX);
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Direct + Unpin> AsyncWrite for Rechecked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_write(cx, buf) {
                this.write.reset();
                return Poll::Ready(r);
            }
            this.write_blocked = true;
            if !this.recheck || !this.write.expired(cx) {
                return Poll::Pending;
            }
            match this.inner.send_now(buf) {
                Some(Ok(n)) => {
                    this.write.reset();
                    count_recheck("write");
                    return Poll::Ready(Ok(n));
                }
                // Writes keep asking every RECHECK: a writer is waiting on us.
                None => {}
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Some(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both ends of a loopback connection.
    async fn pair() -> io::Result<(TcpStream, TcpStream)> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let a = TcpStream::connect(l.local_addr()?).await?;
        let (b, _) = l.accept().await?;
        Ok((a, b))
    }

    #[tokio::test]
    async fn delegates_reads_writes_and_end_of_stream() -> io::Result<()> {
        for recheck in [false, true] {
            let (a, b) = pair().await?;
            let mut a = Rechecked::new(a, recheck);
            let mut b = Rechecked::new(b, recheck);
            a.write_all(b"hello").await?;
            a.shutdown().await?;
            let mut got = Vec::new();
            b.read_to_end(&mut got).await?;
            assert_eq!(got, b"hello");
        }
        Ok(())
    }

    /// A read that waited past a recheck and a back-off (the direct asks found nothing) still
    /// returns the bytes that come later, exactly. (A lost readiness event cannot be made on
    /// plain TCP; copy.rs tests the direct-ask logic with a fake socket that never gets one.)
    #[tokio::test]
    async fn an_idle_read_backs_off_and_still_returns_data() -> io::Result<()> {
        let (a, b) = pair().await?;
        let mut a = Rechecked::new(a, true);
        let mut b = Rechecked::new(b, true);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = b.read(&mut buf).await?;
            io::Result::Ok(buf[..n].to_vec())
        });
        // Past the first recheck (50 ms) and one back-off.
        tokio::time::sleep(Duration::from_millis(180)).await;
        a.write_all(b"late").await?;
        let got = reader.await.map_err(io::Error::other)??;
        assert_eq!(got, b"late");
        Ok(())
    }

    /// A stream whose readiness never comes (its reads and writes are always Pending and never
    /// wake anyone), over a real socket: what a lost wake-up looks like from the runtime.
    struct NeverReady(TcpStream);

    impl Direct for NeverReady {
        fn recv_now(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
            self.0.recv_now(buf)
        }
        fn send_now(&self, buf: &[u8]) -> Option<io::Result<usize>> {
            self.0.send_now(buf)
        }
    }

    impl AsyncRead for NeverReady {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for NeverReady {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Polls one read once: its bytes, or `None` if it waits.
    async fn poll_once(b: &mut Rechecked<NeverReady>) -> io::Result<Option<Vec<u8>>> {
        let mut buf = [0u8; 16];
        std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *b).poll_read(cx, &mut rb) {
                Poll::Ready(r) => Poll::Ready(r.map(|()| Some(rb.filled().to_vec()))),
                Poll::Pending => Poll::Ready(Ok(None)),
            }
        })
        .await
    }

    /// Waits until bytes written to `b`'s peer are in its receive queue (paused time does
    /// not stop the kernel; the peek waits on the socket's own readiness).
    async fn delivered(b: &Rechecked<NeverReady>) -> io::Result<()> {
        let n = b.inner.0.peek(&mut [0u8; 8]).await?;
        assert!(n > 0, "end of stream instead of bytes");
        Ok(())
    }

    /// A read that waits when the relay's step count moves asks its socket at once, not
    /// after the recheck timer: its readiness may have been dropped by a short read just
    /// before (a connection leaving the short-circuit).
    #[tokio::test(start_paused = true)]
    async fn a_step_of_the_relay_asks_a_waiting_read_at_once() -> io::Result<()> {
        let (a, b) = pair().await?;
        let mut b = Rechecked::new(NeverReady(b), true);
        // Nothing there yet: the read waits (and arms the 50 ms recheck).
        assert_eq!(poll_once(&mut b).await?, None);
        a.try_write(b"mixed")?;
        delivered(&b).await?;
        b.ask_after(1);
        let got = poll_once(&mut b).await?;
        assert_eq!(
            got.as_deref(),
            Some(&b"mixed"[..]),
            "read without waiting for the timer"
        );
        // Once per step: the same count asks nothing more.
        b.ask_after(1);
        assert!(!b.ask_now);

        // A step when nothing is there yet (the other direction just passed its end of
        // stream on): the answer that comes later, its wake-up lost, is asked for after
        // RECHECK_AFTER_STEP, not after the idle back-off.
        b.ask_after(2);
        assert_eq!(poll_once(&mut b).await?, None, "nothing there yet");
        a.try_write(b"answer")?;
        delivered(&b).await?;
        assert_eq!(poll_once(&mut b).await?, None, "the timer has not run out");
        tokio::time::advance(RECHECK_AFTER_STEP + Duration::from_millis(1)).await;
        assert_eq!(poll_once(&mut b).await?.as_deref(), Some(&b"answer"[..]));
        Ok(())
    }

    /// While the relay asks for it (a connection on the short-circuit, watched), a read
    /// whose readiness never comes is asked for after RECHECK_AFTER_STEP, each time it
    /// waits after progress; without, after RECHECK.
    #[tokio::test(start_paused = true)]
    async fn reads_recheck_soon_while_the_relay_asks_for_it() -> io::Result<()> {
        let (a, b) = pair().await?;
        let mut b = Rechecked::new(NeverReady(b), true);
        b.rechecks_soon(true);
        for word in [&b"first"[..], b"second"] {
            assert_eq!(poll_once(&mut b).await?, None, "nothing there yet");
            a.try_write(word)?;
            delivered(&b).await?;
            assert_eq!(poll_once(&mut b).await?, None, "the timer has not run out");
            tokio::time::advance(RECHECK_AFTER_STEP + Duration::from_millis(1)).await;
            assert_eq!(poll_once(&mut b).await?.as_deref(), Some(word));
        }
        // Off again: the next wait is the plain one.
        b.rechecks_soon(false);
        assert_eq!(poll_once(&mut b).await?, None);
        a.try_write(b"late")?;
        delivered(&b).await?;
        tokio::time::advance(RECHECK_AFTER_STEP * 2).await;
        assert_eq!(poll_once(&mut b).await?, None, "asked before RECHECK");
        tokio::time::advance(RECHECK).await;
        assert_eq!(poll_once(&mut b).await?.as_deref(), Some(&b"late"[..]));
        Ok(())
    }

    #[tokio::test]
    async fn reads_and_writes_finish_although_readiness_never_comes() -> io::Result<()> {
        let (a, b) = pair().await?;
        let mut a = Rechecked::new(NeverReady(a), true);
        let mut b = Rechecked::new(NeverReady(b), true);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = b.read(&mut buf).await?;
            io::Result::Ok(buf[..n].to_vec())
        });
        tokio::time::sleep(Duration::from_millis(120)).await;
        tokio::time::timeout(Duration::from_secs(5), a.write_all(b"lost"))
            .await
            .map_err(io::Error::other)??;
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)??;
        assert_eq!(got, b"lost");
        Ok(())
    }
}
