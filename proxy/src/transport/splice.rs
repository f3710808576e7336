//! The kernel-only path: an authorized same-node opaque TCP connection whose bytes go from
//! workload to workload in the kernel, the proxy out of the data path.
//!
//! The proxy keeps both of its sockets and its copy loop: it still relays whatever reaches
//! it (the first bytes, written before the pair existed; bytes sent while a memory rule holds
//! a direction on TCP), sees end of stream and reset on its own sockets and passes them on,
//! and counts the bytes the workloads sent past it (`MESH_DIRECT`).
//!
//! A direction switches only when the proxy has relayed everything its sender sent towards
//! it: after each write the proxy publishes its relayed total in `MESH_SPLICE`, and sk_msg
//! compares it with the sender's own count (proxy-ebpf/src/redirect.rs, `splice_target`).
//! The proxy's write has returned by then, so its bytes are already queued at the far
//! workload: the direct bytes land behind them.
//!
//! With the stream rule on (the default) the path opens only after a turn, once both
//! directions carried bytes: a one-way stream stays on the per-hop short-circuit and leaves
//! the SOCKHASH like any stream there (`Pacer`), and a connection that started leaving never
//! opens it. A spliced connection never leaves the SOCKHASH: the far workload could write
//! straight into a socket being removed, and only that workload's own lock orders it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_common::{
    DETACH_READY, DETACH_STREAM, DETACH_WANTED, GUARD_LEAVING, STREAM_SENT_KNOWN, SockKey,
};
use tokio::net::TcpStream;
use tracing::debug;

use crate::{
    ebpf::Maps,
    transport::copy::{self, Reading, Relay},
};

/// How many of the proxy's writes may find its upstream socket not (yet) paired with a
/// workload before the connection is taken for one that never will be (a destination off
/// this node or outside the mesh). The pairing comes from the server's sock_ops callback on
/// the final ACK, a moment after the proxy's connect returns; nothing waits for it.
const PAIRING_CHECKS: u32 = 8;

/// `Splicer::state`: paired and published; never will be; else the checks made so far.
const ACTIVE: u32 = u32::MAX;
const NEVER: u32 = u32::MAX - 1;

/// One connection on (or allowed onto) the kernel-only path. Dropping it takes the path away
/// (the kernel also forgets it when the proxy's sockets close).
pub struct Splicer {
    maps: Arc<Maps>,
    /// The proxy's socket facing the client, and the one facing the server.
    inbound: SockKey,
    outbound: SockKey,
    /// Relayed totals of each direction (client to upstream, upstream to client).
    up: AtomicU64,
    down: AtomicU64,
    state: AtomicU32,
    /// Directions that carried bytes so far: bit 0 to upstream, bit 1 to the client.
    carried: AtomicU8,
    /// `MESH_SPLICE` may hold this connection's entries (set before the first is written,
    /// cleared by `take_back`), and whether it ever did (then `MESH_DIRECT` may count its
    /// direct bytes). A connection that never opened the path, most of them (the path
    /// opens after a turn), ends without the six map syscalls of taking back and taking
    /// its counts, each behind the maps' lock.
    splice_written: AtomicBool,
    spliced_ever: AtomicBool,
    /// The path opens only once both directions carried bytes (the stream rule on: see
    /// [`Splicer::relayed`]); else at once.
    after_turn: bool,
    /// Until the path opens (and if it never does), the per-hop short-circuit's pauses and
    /// leaving; once open, the pause sk_msg asks for when a workload falls behind (bytes
    /// still pass through the proxy then: after a memory rule took a direction off).
    pacer: Pacer,
}

impl Splicer {
    /// A candidate for the kernel-only path if the client is a workload paired with the
    /// proxy's socket (`None` otherwise: a full SOCKHASH, the short-circuit off for it). The
    /// path is allowed once the upstream socket is paired too (and, with the stream rule on,
    /// after a turn), checked after the proxy's writes, so the copy never waits for it.
    pub fn attach(maps: &Arc<Maps>, client: &TcpStream, upstream: &TcpStream) -> Option<Splicer> {
        let addrs = |s: &TcpStream| -> Option<(SocketAddr, SocketAddr)> {
            Some((s.local_addr().ok()?, s.peer_addr().ok()?))
        };
        let (inbound, outbound) = maps.proxy_keys(addrs(client)?, addrs(upstream)?)?;
        if !maps.paired(&inbound) {
            return None;
        }
        // Before the copy's first write: until the path opens, a stream asks to leave.
        maps.mark_leaves(&inbound);
        maps.mark_leaves(&outbound);
        let s = Splicer {
            maps: Arc::clone(maps),
            inbound,
            outbound,
            pacer: Pacer::new(maps, inbound, outbound),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            state: AtomicU32::new(0),
            carried: AtomicU8::new(0),
            splice_written: AtomicBool::new(false),
            spliced_ever: AtomicBool::new(false),
            after_turn: maps.streams_leave(),
        };
        if !s.after_turn {
            s.try_activate();
        }
        Some(s)
    }

    /// How many of the connection's sockets left the SOCKHASH before the path opened:
    /// (workloads', proxy's), each 0 to 2.
    pub fn detached(&self) -> Detached {
        self.pacer.detached()
    }

    /// See [`Pacer::leave_times`].
    pub fn leave_times(&self) -> Option<LeaveTimes> {
        self.pacer.leave_times()
    }

    /// If the upstream socket is paired now, publishes both directions' relayed totals (the
    /// counts never run ahead of what was written, so a late start is safe) and returns true.
    fn try_activate(&self) -> bool {
        let checks = self.state.load(Ordering::Relaxed);
        if checks == ACTIVE {
            return true;
        }
        if checks == NEVER {
            return false;
        }
        // A workload that asked to leave (a stream, or a writer the proxy cannot keep up
        // with) keeps its connection off: the proxy acts on the ask at its next look. A
        // spliced connection never leaves (the far workload could write straight into a
        // socket being removed, and only that workload's lock orders it), so an ask that
        // comes after this look only keeps its direction on TCP until it can go direct.
        if (0..2).any(|i| self.pacer.asked(i)) {
            self.state.store(NEVER, Ordering::Relaxed);
            return false;
        }
        if !self.maps.paired(&self.outbound) {
            let next = if checks + 1 >= PAIRING_CHECKS {
                NEVER
            } else {
                checks + 1
            };
            self.state.store(next, Ordering::Relaxed);
            return false;
        }
        let (up, down) = (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        );
        self.splice_written.store(true, Ordering::Relaxed);
        self.spliced_ever.store(true, Ordering::Relaxed);
        match self
            .maps
            .set_splice(&self.inbound, &self.outbound, up)
            .and_then(|()| self.maps.set_splice(&self.outbound, &self.inbound, down))
        {
            Ok(()) => {
                self.state.store(ACTIVE, Ordering::Relaxed);
                true
            }
            Err(e) => {
                debug!(error = %e, "MESH_SPLICE is full; the connection stays on the proxy's path");
                self.take_back();
                self.state.store(NEVER, Ordering::Relaxed);
                false
            }
        }
    }

    /// Takes the counts of bytes the client and the server sent on the kernel-only path, in
    /// that order.
    pub fn take_direct_bytes(&self) -> (u64, u64) {
        // Only a workload whose proxy socket had a `MESH_SPLICE` entry sends direct bytes
        // (sk_msg counts them in `MESH_DIRECT`); sock_ops removes a stale count of the same
        // 4-tuple when it registers the proxy's socket.
        if !self.spliced_ever.load(Ordering::Relaxed) {
            return (0, 0);
        }
        (
            self.maps.take_direct_bytes(&self.inbound),
            self.maps.take_direct_bytes(&self.outbound),
        )
    }

    /// Takes the connection off the kernel-only path: each workload's next message goes to
    /// the proxy over TCP (in order: the far end reads the direct bytes first).
    pub fn take_back(&self) {
        if self.splice_written.swap(false, Ordering::Relaxed) {
            self.maps.remove_splice(&self.inbound);
            self.maps.remove_splice(&self.outbound);
        }
    }
}

impl Relay for Splicer {
    /// With the stream rule on, the path opens only after a turn: once both directions
    /// carried bytes (request and response, or a greeting and its answer). Until then the
    /// connection is on the per-hop short-circuit and a stream leaves the SOCKHASH for plain
    /// TCP like any other (`Pacer`). A one-way stream never turns, and direct small writes
    /// are what the kernel-only path does worst: measured (`cargo xtask bench`, bbr,
    /// interleaved), streams spliced at once ran at x0.39 (64 B x100) to x0.93 of plain TCP
    /// through the proxy, 1 KiB x10 at x0.61. Request/response loses nothing: its first
    /// exchange went through the proxy before too (the proxy relays it before the byte
    /// counts allow a switch).
    fn relayed(&self, to_upstream: bool, total: u64, waited: bool) -> Option<Duration> {
        let (count, from, to, bit) = if to_upstream {
            (&self.up, &self.inbound, &self.outbound, 1)
        } else {
            (&self.down, &self.outbound, &self.inbound, 2)
        };
        count.store(total, Ordering::Relaxed);
        let carried = self.carried.fetch_or(bit, Ordering::Relaxed) | bit;
        match self.state.load(Ordering::Relaxed) {
            ACTIVE => {
                // A failed update leaves the older, smaller total: the kernel then keeps this
                // direction on the proxy's path, which is always safe.
                self.splice_written.store(true, Ordering::Relaxed);
                if let Err(e) = self.maps.set_splice(from, to, total) {
                    debug!(error = %e, "could not publish the relayed byte count");
                }
                return self.pacer.held(to_upstream);
            }
            // A connection that started leaving the SOCKHASH never opens the path: its
            // sockets are about to leave, which is safe only while nothing but the proxy's
            // sockets can redirect into them.
            s if s < NEVER && !self.pacer.watching() => {
                self.state.store(NEVER, Ordering::Relaxed);
            }
            // Publishes this total along with the other direction's.
            s if s < NEVER && (!self.after_turn || carried == 3) && self.try_activate() => {
                return self.pacer.held(to_upstream);
            }
            _ => {}
        }
        self.pacer.relayed(to_upstream, total, waited)
    }

    /// The pacer's: a connection on the kernel-only path never leaves, so never ticks.
    fn ticking(&self) -> Option<&tokio::sync::Notify> {
        self.pacer.ticking()
    }

    fn next_tick(&self) -> Option<Duration> {
        self.pacer.next_tick()
    }

    fn tick(&self) {
        self.pacer.tick();
    }

    /// The pacer's: a connection that may take the kernel-only path leaves the SOCKHASH
    /// like any other until it does, and its reads meet the same mixed queues. (Before,
    /// these rules were the trait's defaults here, so with the kernel-only path on, the
    /// default, none of the copy's read rules for leaving applied.)
    fn reading(&self) -> Reading {
        self.pacer.reading()
    }
}

impl Drop for Splicer {
    fn drop(&mut self) {
        self.take_back();
    }
}

/// How many bytes of a workload's direction the proxy relays between two looks at whether
/// the workload's socket asked to leave the SOCKHASH (`Flow::detach`): a map lookup per look.
/// Only a writer that keeps the proxy behind, or a stream, asks, so the look comes soon after.
const DETACH_CHECK_BYTES: u64 = 64 * 1024;

/// Microseconds between two looks at `Flow::detach` at most, for a direction that relays
/// fewer than [`DETACH_CHECK_BYTES`] meanwhile: a slow stream (small writes, far apart) that
/// asked would otherwise stay in the SOCKHASH, on TCP for good, until 64 KiB of it went by
/// (test `one_way_writes_the_proxy_keeps_up_with_are_a_stream_and_request_response_is_not`:
/// 100 writes of 64 B, 2 ms apart, never left).
const DETACH_CHECK_US: u64 = 10_000;

/// Looks at `Flow::detach` before a workload that met the queue limit may take its connection
/// off the short-circuit with the stream rule off: 1 MiB of it relayed at
/// [`DETACH_CHECK_BYTES`], so a short burst that met the limit does not. A stream
/// (`DETACH_STREAM`: `Config::small_streak` writes in a row found its reader behind, or it met
/// the limit with the rule on) has shown what it is already and leaves at once.
const CALM_LOOKS: u32 = 16;

/// While a connection leaves, the proxy looks at the kernel's progress (up to four map
/// lookups) at its next write or tick after a step (a tick at least [`MIN_LEAVE_WAIT_US`]
/// later), then 1, 2, 4, ... ms later while nothing moves, up to this many microseconds
/// apart, and at once when the release sweep it waits for is done: a stalled move costs a
/// few lookups a second however fast the proxy writes (a wait counted in writes, doubling up
/// to 1024, looked up to a hundred times a second at 10 GB/s in 64 KiB writes). What a move
/// waits for is the kernel and the threads that drive it: measured (`cargo xtask bench
/// --streams-only`, per hop and per socket, `mesh_tcp_short_circuit_leave_socket_seconds`),
/// the proxy's socket facing the client, which needs a sweep after the client's socket is
/// out, is the last out (150 to 230 ms from 16 KiB up, 0.6 to 1.1 s at 64 B x100, where
/// about 200 load threads share 2 CPUs per thread with the proxy's few; 45 to 150 ms at
/// 64 B with the proxy at nice -10).
const MAX_LEAVE_WAIT_US: u64 = 64_000;

/// The first wait after a look that found nothing moved.
const MIN_LEAVE_WAIT_US: u64 = 1_000;

/// While bytes move between two looks, a socket that waits for its verdict asks for the
/// release sweep only once the wait between looks has grown to this (the look 15 ms into a
/// stalled step). Moving bytes bring the verdicts without it: each workload sends segments
/// (its data, or ACKs of the proxy's), at which its own sock_ops leaves once its queue is
/// empty (`leaves_with_its_connection`), a workload that asked gives it at its next write,
/// and the proxy's writes to a workload run the release check of the proxy's socket.
/// A sweep walks every TCP socket of the namespace and the hash tables' empty buckets:
/// measured (`cargo xtask bench --streams-only`, 16 KiB x100, per thread), 8 to 23 sweeps a
/// run took 30 to 70 ms, about 3 ms each under load, of the proxy's CPU, when every
/// connection asked for one from its second look.
const SWEEP_WHILE_MOVING_US: u64 = 8_000;

/// `Pacer::phase`: watching; leaving (both of the proxy's sockets marked
/// `FLOW_TCP_DETACHING`); finished (left, or nothing to do any more).
const WATCHING: u8 = 0;
const LEAVING: u8 = 1;
const FINISHED: u8 = 2;

/// `Side::step` while leaving: the workload's socket is still in the SOCKHASH; it is out
/// and the proxy's socket facing it still in; both out or nothing more to do.
const WORKLOAD_IN: u8 = 0;
const PROXY_IN: u8 = 1;
const SIDE_DONE: u8 = 2;

/// The per-hop short-circuit's pause: after each write the copy asks sk_msg's verdict on it
/// (`Flow::held` of the proxy socket written to, one map lookup) and pauses if the workload
/// behind that socket has more than 3/4 of the queue limit unread (see `copy::held_pause`).
///
/// It also takes the whole connection off the short-circuit when a workload's socket (the
/// client's or the server's) asks to (`Flow::detach`: its writes keep meeting the queue
/// limit while the proxy itself is what holds it back, none of its writes ever paced or
/// waiting for room, `Side::downstream_slow`; or its writes are a stream, which went to TCP
/// for good already; proxy-ebpf/src/redirect.rs, `note_pressure`, `policy`): a stream runs
/// faster on plain TCP, and a socket left in the SOCKHASH keeps paying for sk_msg on every
/// send and receive even on the TCP path (measured: with only the asking workload removed,
/// 16 KiB streams ran at 0.72x to 0.89x of plain TCP; with all four sockets removed, 0.98x
/// to 1.24x). The copy keeps its readiness rechecks after (see `copy::one_way`). The
/// order keeps every byte:
/// 1. both of the proxy's sockets are marked `FLOW_TCP_DETACHING`: the proxy never redirects
///    again, in either direction;
/// 2. a workload's socket is removed once nothing can be in or reach its queue: its own
///    sk_msg saw its queue empty (`DETACH_READY`, on its next write), or the sk_msg of the
///    proxy's socket facing it did (`DETACH_PEER_EMPTY`, on the proxy's next write to it);
/// 3. the proxy's socket is removed once the kernel saw the workload's psock gone (no send
///    of it still under way) and the proxy's own queue empty (`DETACH_READY` of the proxy's
///    socket, on the proxy's next write on it, or by the release sweep the proxy asks for
///    while it waits, for a workload that only sends; `release` in redirect.rs).
///
/// Every step happens in [`Relay::relayed`], which the copy calls between writes from the
/// one task that writes both ways (`copy::bidirectional`), so no write on a marked socket is
/// under way when it is marked. Every step but the last for a workload that only sends
/// comes with writes the proxy makes anyway; that one comes from the release sweep
/// (`Maps::sweep`; without it, that proxy socket stays in the SOCKHASH until the connection
/// ends, on the TCP path: correct, only not as fast).
pub struct Pacer {
    maps: Arc<Maps>,
    inbound: SockKey,
    outbound: SockKey,
    /// Per direction (to upstream, to client): lookups that found no flow before any did, or
    /// `u32::MAX` once one did. A socket that is not on the short-circuit (a destination off
    /// this node, a full SOCKHASH) stops being asked after [`PAIRING_CHECKS`] writes.
    misses: [AtomicU32; 2],
    /// The client's side, then the server's.
    sides: [Side; 2],
    phase: AtomicU8,
    /// Steps of leaving taken so far (its start, each socket out, its end), for
    /// [`Reading::steps`].
    steps: AtomicU64,
    /// While leaving: when to look next (microseconds after `started`), and the current
    /// wait between looks (0 after a step).
    next_look: AtomicU64,
    wait: AtomicU64,
    /// While a proxy socket of the connection waits for the release sweep: the number of the
    /// sweep that brings its verdict (`Maps::sweep`), 0 otherwise. The copy looks at its
    /// next write once that sweep is done, whatever the wait: measured (100 uploads of 64 B
    /// writes), waiting out the doubled waits instead, the proxy socket facing the client
    /// left 300 to 500 ms after the client's socket, the longest step of a move by far.
    sweep_wait: AtomicU64,
    /// Bytes relayed both ways as of the last look while leaving: a look that finds them
    /// unchanged may ask for the release sweep ([`SWEEP_WHILE_MOVING_US`]).
    relayed_at_look: AtomicU64,
    /// Signalled when leaving starts: from then on the copy also looks between writes, at
    /// the times `next_look` says (`Relay::tick`). Measured before (100 uploads of 64 B
    /// writes through the proxy): looking only at the proxy's writes, which come a few dozen
    /// times a second per connection when the proxy reads whole buffers of small writes,
    /// looks came 0.3 to 0.8 s apart and moves took 0.8 to 0.9 s.
    leaving: tokio::sync::Notify,
    /// When the proxy relayed the connection's first bytes, and how long after that leaving
    /// started, for `mesh_tcp_short_circuit_leave_*` (each socket's time out is its
    /// `Side`'s). From the first bytes, not from accept: a client may connect long before
    /// it writes (the bench's clients wait for each other, up to half a second at 100
    /// connections).
    started: OnceLock<Instant>,
    leave_started: OnceLock<Duration>,
    /// From the workload's ask (its `Flow::asked_ns`, the kernel's clock) to the start of
    /// leaving: how long the proxy took to notice.
    leave_noticed: OnceLock<Duration>,
    /// Whether the upstream socket's pairing was settled (the first bytes from upstream):
    /// see `relayed`.
    pairing_known: AtomicBool,
}

/// The sockets of a connection in [`LeaveTimes::out`]'s order, as the label of
/// `mesh_tcp_short_circuit_leave_socket_seconds`.
pub const LEAVE_SOCKETS: [&str; 4] = ["client", "client_proxy", "server", "server_proxy"];

/// How many of a connection's sockets left the SOCKHASH (`Pacer::detached`), each 0 to 2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Detached {
    pub workloads: u64,
    pub proxy: u64,
    /// Of `proxy`, those that left on the copy's byte count, without the kernel's verdict
    /// (`Pacer::read_all_before_stream`).
    pub proxy_by_count: u64,
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of the kernel's `bpf_ktime_get_ns`.
fn monotonic_ns() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let secs = u64::try_from(t.tv_sec()).ok()?;
    let nanos = u64::try_from(t.tv_nsec()).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// How long a connection that left the short-circuit took (`Pacer::leave_times`).
#[derive(Clone, Copy, Debug)]
pub struct LeaveTimes {
    /// From the proxy's first relayed bytes to the start of leaving.
    pub start: Duration,
    /// From the workload's ask to the start of leaving, if the kernel's clock could be read.
    pub noticed: Option<Duration>,
    /// From the start of leaving until each socket was out of the SOCKHASH, in
    /// [`LEAVE_SOCKETS`] order; `None` for one that stayed (the connection ended first).
    pub out: [Option<Duration>; 4],
}

impl LeaveTimes {
    /// The whole move, if all four sockets got out: until the last one did.
    pub fn moved(&self) -> Option<Duration> {
        self.out
            .iter()
            .try_fold(Duration::ZERO, |last, t| t.map(|t| last.max(t)))
    }
}

/// One workload of a connection, with the proxy's socket facing it.
#[derive(Default)]
struct Side {
    /// The workload's socket (the peer of the proxy's socket facing it), once looked up.
    workload: OnceLock<SockKey>,
    /// Relayed bytes of its direction at which to look at `Flow::detach` next, and the time
    /// (microseconds after the first relayed bytes) at which to look anyway.
    next_check: AtomicU64,
    next_check_at: AtomicU64,
    /// A write of its bytes was ever paced (sk_msg found the reader's queue 3/4 full) or had
    /// to wait for room: the reader on the other side holds this workload back, not the
    /// proxy, and plain TCP would not make it faster. Such a workload's meeting the limit
    /// never takes its connection off (a stream still does: see `Pacer::look`), so a
    /// burst into a slow reader keeps the short-circuit for what
    /// follows (request/response after it keeps its latency gain; test
    /// `a_reader_slower_than_the_proxy_keeps_its_hop_on_the_short_circuit`). Measured: a
    /// window (leaving after 1 MiB relayed without such a write) let that test's client leave.
    downstream_slow: AtomicBool,
    /// Looks so far: a workload that met the limit leaves only after [`CALM_LOOKS`].
    looks: AtomicU32,
    /// Bytes of the workload's direction the copy has relayed (read from the proxy's socket
    /// facing it and written on), as of its last write.
    relayed: AtomicU64,
    /// The proxy's socket left on that count (`Pacer::read_all_before_stream`).
    proxy_out_by_count: AtomicBool,
    /// While leaving: `WORKLOAD_IN`, `PROXY_IN` or `SIDE_DONE`.
    step: AtomicU8,
    /// When the sockets of this side were removed from the SOCKHASH (the workload's, the
    /// proxy's), after the proxy's first relayed bytes.
    workload_out: OnceLock<Duration>,
    proxy_out: OnceLock<Duration>,
}

impl Pacer {
    fn new(maps: &Arc<Maps>, inbound: SockKey, outbound: SockKey) -> Pacer {
        Pacer {
            maps: Arc::clone(maps),
            inbound,
            outbound,
            misses: [AtomicU32::new(0), AtomicU32::new(0)],
            sides: [Side::default(), Side::default()],
            phase: AtomicU8::new(WATCHING),
            steps: AtomicU64::new(0),
            next_look: AtomicU64::new(0),
            wait: AtomicU64::new(0),
            sweep_wait: AtomicU64::new(0),
            relayed_at_look: AtomicU64::new(0),
            leaving: tokio::sync::Notify::new(),
            started: OnceLock::new(),
            leave_started: OnceLock::new(),
            leave_noticed: OnceLock::new(),
            pairing_known: AtomicBool::new(false),
        }
    }

    /// Time since the proxy relayed the connection's first bytes.
    fn since_first(&self) -> Duration {
        self.started.get_or_init(Instant::now).elapsed()
    }

    /// For a connection that started leaving: how long after its first relayed bytes it did,
    /// and how long after that each socket got out.
    pub fn leave_times(&self) -> Option<LeaveTimes> {
        let start = *self.leave_started.get()?;
        let after = |t: &OnceLock<Duration>| t.get().map(|t| t.saturating_sub(start));
        let [client, server] = &self.sides;
        Some(LeaveTimes {
            start,
            noticed: self.leave_noticed.get().copied(),
            out: [
                after(&client.workload_out),
                after(&client.proxy_out),
                after(&server.workload_out),
                after(&server.proxy_out),
            ],
        })
    }

    /// How many of the connection's sockets left the SOCKHASH: (workloads', proxy's), each
    /// 0 to 2.
    pub fn detached(&self) -> Detached {
        let count = |f: fn(&Side) -> &OnceLock<Duration>| {
            self.sides.iter().filter(|s| f(s).get().is_some()).count() as u64
        };
        Detached {
            workloads: count(|s| &s.workload_out),
            proxy: count(|s| &s.proxy_out),
            proxy_by_count: self
                .sides
                .iter()
                .filter(|s| s.proxy_out_by_count.load(Ordering::Relaxed))
                .count() as u64,
        }
    }

    /// No workload of the connection asked to leave, or the proxy has not acted on it yet.
    fn watching(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == WATCHING
    }

    /// Side `i`'s workload asked to leave the SOCKHASH (`Flow::detach` set).
    fn asked(&self, i: usize) -> bool {
        self.workload(i)
            .and_then(|w| self.maps.flow(&w))
            .is_some_and(|f| f.detach != 0)
    }

    /// The proxy's socket facing side `i` (0: the client).
    fn facing(&self, i: usize) -> &SockKey {
        if i == 0 {
            &self.inbound
        } else {
            &self.outbound
        }
    }

    /// Side `i`'s workload socket, looked up once; `None` if the proxy's socket facing it is
    /// not paired (that side is not on the short-circuit).
    fn workload(&self, i: usize) -> Option<SockKey> {
        let side = &self.sides[i];
        if let Some(k) = side.workload.get() {
            return Some(*k);
        }
        let k = self.maps.peer(self.facing(i))?;
        Some(*side.workload.get_or_init(|| k))
    }

    /// After a write of a workload's direction (`total` bytes of it relayed so far; the
    /// client's if `from_client`): watches for that workload asking to leave, or moves a
    /// leaving connection on (see the type's comment).
    fn watch_detach(&self, from_client: bool, total: u64) {
        match self.phase.load(Ordering::Relaxed) {
            WATCHING => self.look(usize::from(!from_client), total),
            LEAVING => self.look_leaving(),
            _ => {}
        }
    }

    /// While leaving, at a write or a tick: moves the connection on if it is time to look
    /// (see [`MAX_LEAVE_WAIT_US`]) or the release sweep it waits for is done.
    fn look_leaving(&self) {
        let now = self.micros();
        if now < self.next_look.load(Ordering::Relaxed) {
            let swept = self.sweep_wait.load(Ordering::Relaxed);
            if swept == 0 || self.maps.sweeps_done() < swept {
                return;
            }
        }
        self.sweep_wait.store(0, Ordering::Relaxed);
        let relayed = self.sides[0]
            .relayed
            .load(Ordering::Relaxed)
            .wrapping_add(self.sides[1].relayed.load(Ordering::Relaxed));
        let quiet = self.relayed_at_look.swap(relayed, Ordering::Relaxed) == relayed;
        let wait = self.wait.load(Ordering::Relaxed);
        // A socket that waits for its verdict may ask for the release sweep at this look:
        // not at the first (`wait` 0: a workload that writes gives its verdict within a
        // millisecond), and while bytes move only once the wait has grown.
        let may_sweep = wait != 0 && (quiet || wait >= SWEEP_WHILE_MOVING_US);
        let moved = self.advance(0, may_sweep) | self.advance(1, may_sweep);
        let done = self
            .sides
            .iter()
            .all(|s| s.step.load(Ordering::Relaxed) == SIDE_DONE);
        if done {
            self.phase.store(FINISHED, Ordering::Relaxed);
            self.steps.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let wait = if moved {
            0
        } else {
            (self.wait.load(Ordering::Relaxed) * 2).clamp(MIN_LEAVE_WAIT_US, MAX_LEAVE_WAIT_US)
        };
        self.wait.store(wait, Ordering::Relaxed);
        self.next_look
            .store(now.saturating_add(wait), Ordering::Relaxed);
    }

    /// Microseconds since the proxy relayed the connection's first bytes.
    fn micros(&self) -> u64 {
        u64::try_from(self.since_first().as_micros()).unwrap_or(u64::MAX)
    }

    /// Looks at whether side `i`'s workload asks its connection to leave (every
    /// [`DETACH_CHECK_BYTES`] of its direction, or [`DETACH_CHECK_US`] at its next write),
    /// and if so starts leaving.
    fn look(&self, i: usize, total: u64) {
        let side = &self.sides[i];
        let by_bytes = total >= side.next_check.load(Ordering::Relaxed);
        let now = self.micros();
        if !by_bytes && now < side.next_check_at.load(Ordering::Relaxed) {
            return;
        }
        side.next_check
            .store(total.saturating_add(DETACH_CHECK_BYTES), Ordering::Relaxed);
        side.next_check_at
            .store(now.saturating_add(DETACH_CHECK_US), Ordering::Relaxed);
        let Some(workload) = self.workload(i) else {
            // Not paired: never on the short-circuit, never asks.
            side.next_check.store(u64::MAX, Ordering::Relaxed);
            side.next_check_at.store(u64::MAX, Ordering::Relaxed);
            return;
        };
        // Only looks that come by bytes count towards `CALM_LOOKS` (1 MiB relayed).
        let looks = if by_bytes {
            side.looks.fetch_add(1, Ordering::Relaxed).saturating_add(1)
        } else {
            side.looks.load(Ordering::Relaxed)
        };
        let Some(flow) = self.maps.flow(&workload) else {
            // Closed (its close callback removed the entry): the connection is ending.
            self.phase.store(FINISHED, Ordering::Relaxed);
            return;
        };
        // A stream leaves whatever held it back: its direction is on TCP for good already
        // (`FLOW_TCP_STREAM`), so staying would keep no short-circuit for what follows, only
        // sk_msg's cost on every send of all four sockets. So does a writer that keeps
        // meeting the limit when the stream rule is on (the operator chose streams on TCP):
        // 1 MiB writes meet the limit before they look like a stream. Measured (cubic,
        // interleaved, rule on): connections of 16 KiB and 1 MiB streams held here by a
        // single paced write ran at x0.83 to x0.93 of plain TCP through the proxy.
        //
        // With the rule on, a workload that met the limit leaves at once as well: it asked
        // as `DETACH_WANTED` only because the kernel could not call it a stream yet (its
        // writes met the limit, or kept the proxy behind on TCP, before this copy marked the
        // proxy's sockets `PROXY_LEAVES`: at 100 connections the proxy accepts, detects and
        // connects late). Measured (`cargo xtask bench --streams-only`, 64 B x100): about
        // half of the connections asked that way, and waiting [`CALM_LOOKS`] for them started
        // leaving about 1 s into a 2 s stream.
        let stream = flow.detach == DETACH_STREAM;
        let wanted = flow.detach == DETACH_WANTED
            && (self.maps.streams_leave()
                || (looks >= CALM_LOOKS && !side.downstream_slow.load(Ordering::Relaxed)));
        if !(stream || wanted) {
            return;
        }
        // Step 1. A proxy socket that is not registered (any more) has nothing to stop.
        let _ = self.maps.quiesce(&self.inbound);
        let _ = self.maps.quiesce(&self.outbound);
        self.phase.store(LEAVING, Ordering::Relaxed);
        self.steps.fetch_add(1, Ordering::Relaxed);
        let _ = self.leave_started.set(self.since_first());
        if flow.asked_ns != 0
            && let Some(now) = monotonic_ns()
        {
            let _ = self
                .leave_noticed
                .set(Duration::from_nanos(now.saturating_sub(flow.asked_ns)));
        }
        // The first look at once: a workload whose queue is empty may go now, and one that
        // needs the release sweep's verdict gets it asked for without waiting for a write.
        self.look_leaving();
        self.leaving.notify_one();
        debug!(
            client = i == 0,
            stream, "a workload asked its connection to leave the short-circuit"
        );
    }

    /// As many of steps 2 and 3 for side `i` as the kernel allows now (the proxy's socket may
    /// follow its workload's at once: `read_all_before_stream`); true if a socket was
    /// removed. With `may_sweep`, a socket waiting for its verdict asks for the release sweep.
    fn advance(&self, i: usize, may_sweep: bool) -> bool {
        let mut moved = false;
        while self.leave_step(i, may_sweep) {
            moved = true;
            self.steps.fetch_add(1, Ordering::Relaxed);
        }
        moved
    }

    /// Steps 2 and 3 for side `i`; true if a socket was removed.
    fn leave_step(&self, i: usize, may_sweep: bool) -> bool {
        let side = &self.sides[i];
        let facing = self.facing(i);
        match side.step.load(Ordering::Relaxed) {
            WORKLOAD_IN => {
                let Some(workload) = self.workload(i) else {
                    side.step.store(SIDE_DONE, Ordering::Relaxed);
                    return false;
                };
                let (Some(w), Some(p)) = (self.maps.flow(&workload), self.maps.flow(facing)) else {
                    side.step.store(SIDE_DONE, Ordering::Relaxed); // closing
                    return false;
                };
                if w.guard & GUARD_LEAVING != 0 {
                    // It left from its own sock_ops (proxy-ebpf/src/sockops.rs,
                    // `leave_if_asked`), or is about to, at a segment it is sending: a
                    // stream of small writes nothing was redirected into, or, with this
                    // connection leaving, once its queue was empty. Nothing can redirect
                    // into it any more.
                    let _ = self.maps.detach(&workload);
                    let _ = side.workload_out.set(self.since_first());
                    side.step.store(PROXY_IN, Ordering::Relaxed);
                    return true;
                }
                if w.detach != DETACH_READY && p.detach == 0 {
                    // The verdict comes with the workload's next write (`detach`) or
                    // segment (its sock_ops), the proxy's next write to it, or the release
                    // sweep (`release` on the proxy's socket), which is the only one for a
                    // workload that asked and then went quiet: a download's client, say,
                    // whose proxy socket gets no writes either (`may_sweep`: see `look_leaving`).
                    if may_sweep {
                        self.wait_for_sweep();
                    }
                    return false;
                }
                if self.maps.detach(&workload) {
                    let _ = side.workload_out.set(self.since_first());
                    side.step.store(PROXY_IN, Ordering::Relaxed);
                    debug!(
                        client = i == 0,
                        "a workload socket left the SOCKHASH for plain TCP"
                    );
                    true
                } else {
                    side.step.store(SIDE_DONE, Ordering::Relaxed);
                    false
                }
            }
            PROXY_IN => match self.maps.flow(facing) {
                Some(p) if p.detach == DETACH_READY || self.read_all_before_stream(i) => {
                    if self.maps.detach(facing) {
                        let _ = side.proxy_out.set(self.since_first());
                        if p.detach != DETACH_READY {
                            side.proxy_out_by_count.store(true, Ordering::Relaxed);
                        }
                        debug!(
                            client = i == 0,
                            "a proxy socket left the SOCKHASH for plain TCP"
                        );
                    }
                    side.step.store(SIDE_DONE, Ordering::Relaxed);
                    true
                }
                Some(_) => {
                    // The verdict comes with the proxy's next write to this workload, or
                    // from the release sweep for one that only sends (which gets none);
                    // a stream's leaves on the byte count above, as the copy catches up.
                    if may_sweep {
                        self.wait_for_sweep();
                    }
                    false
                }
                None => {
                    side.step.store(SIDE_DONE, Ordering::Relaxed);
                    false
                }
            },
            _ => false,
        }
    }

    /// True if side `i`'s workload became a stream (`Flow::stream_sent`) and the copy has
    /// relayed every byte it sent before: the proxy's socket facing it then has nothing in
    /// its short-circuit queue and nothing can come (every redirect into it came before the
    /// stream's first message, under the workload's lock, and the direction stays on TCP), so
    /// it may leave without the kernel's verdict (`release`), which for a workload that only
    /// sends needs a release sweep. Measured (`cargo xtask bench --streams-only`, 64 B and
    /// 16 KiB x100), that socket was the last out of every move, 90 ms to 0.5 s after the
    /// workload's.
    ///
    /// The counts are compared modulo 2^32 as a signed difference: the copy is behind the
    /// workload by at most the queue limit and TCP's buffers, far below 2^31; a copy that
    /// has run 2 GiB past the mark may read as behind, which only leaves it to the verdict.
    fn read_all_before_stream(&self, i: usize) -> bool {
        let Some(w) = self.workload(i).and_then(|w| self.maps.flow(&w)) else {
            return false;
        };
        if w.stream_sent & STREAM_SENT_KNOWN == 0 {
            return false;
        }
        let relayed = self.sides[i].relayed.load(Ordering::Relaxed);
        (relayed as u32).wrapping_sub(w.stream_sent as u32) as i32 >= 0
    }

    /// Asks for a release sweep, and looks again once it is done (`look_leaving`, at the
    /// next write or tick: ticks come every [`MIN_LEAVE_WAIT_US`] meanwhile).
    fn wait_for_sweep(&self) {
        if let Some(n) = self.maps.sweep() {
            self.sweep_wait.store(n, Ordering::Relaxed);
        }
    }

    /// For a connection whose copy is not a `Splicer` (the kernel-only path off): `None` if
    /// the sockets' keys cannot be had.
    pub fn attach(maps: &Arc<Maps>, client: &TcpStream, upstream: &TcpStream) -> Option<Pacer> {
        let addrs = |s: &TcpStream| -> Option<(SocketAddr, SocketAddr)> {
            Some((s.local_addr().ok()?, s.peer_addr().ok()?))
        };
        let (inbound, outbound) = maps.proxy_keys(addrs(client)?, addrs(upstream)?)?;
        // Before the copy's first write: from here a stream asks to leave.
        maps.mark_leaves(&inbound);
        maps.mark_leaves(&outbound);
        Some(Pacer::new(maps, inbound, outbound))
    }

    /// The pause the last write towards upstream (or the client) asked for, if any.
    fn held(&self, to_upstream: bool) -> Option<Duration> {
        // A leaving connection's proxy sockets redirect nothing (`FLOW_TCP_DETACHING`, `held`
        // 0): no lookup per write once its connection starts leaving.
        if self.phase.load(Ordering::Relaxed) != WATCHING {
            return None;
        }
        let (misses, written) = if to_upstream {
            (&self.misses[0], &self.outbound)
        } else {
            (&self.misses[1], &self.inbound)
        };
        let seen = misses.load(Ordering::Relaxed);
        if seen != u32::MAX && seen >= PAIRING_CHECKS {
            return None;
        }
        match self.maps.held(written) {
            Some(level) => {
                misses.store(u32::MAX, Ordering::Relaxed);
                copy::held_pause(level)
            }
            None => {
                if seen != u32::MAX {
                    misses.store(seen + 1, Ordering::Relaxed);
                }
                None
            }
        }
    }
}

impl Relay for Pacer {
    fn relayed(&self, to_upstream: bool, total: u64, waited: bool) -> Option<Duration> {
        self.started.get_or_init(Instant::now);
        if !to_upstream && !self.pairing_known.swap(true, Ordering::Relaxed) {
            // The server has sent bytes, so it accepted the connection: its sock_ops ran
            // and paired with our upstream socket if it ever will. If it did not (a server
            // on another node, or outside the mesh), that socket leaves the SOCKHASH here
            // (`Maps::release_unpaired`). Asked no earlier: a server's pairing may lag our
            // connect when softirq runs on another CPU, and asking first would keep it off.
            self.maps.release_unpaired(&self.outbound);
        }
        let pause = self.held(to_upstream);
        // The workload whose bytes these are is held back by the reader on the other side
        // (a paced or waiting write), not by the proxy's speed: leaving would not help it.
        let side = &self.sides[usize::from(!to_upstream)];
        side.relayed.store(total, Ordering::Relaxed);
        if waited || pause.is_some() {
            side.downstream_slow.store(true, Ordering::Relaxed);
        }
        self.watch_detach(to_upstream, total);
        pause
    }

    fn ticking(&self) -> Option<&tokio::sync::Notify> {
        Some(&self.leaving)
    }

    /// While leaving: until the next look is due (at least [`MIN_LEAVE_WAIT_US`], also after
    /// a look that moved a socket: the next step waits for the kernel).
    fn next_tick(&self) -> Option<Duration> {
        if self.phase.load(Ordering::Relaxed) != LEAVING {
            return None;
        }
        // Waiting for a sweep: look soon after it is done, not after the doubled wait.
        let due = if self.sweep_wait.load(Ordering::Relaxed) != 0 {
            0
        } else {
            self.next_look.load(Ordering::Relaxed)
        };
        let wait = due.saturating_sub(self.micros()).max(MIN_LEAVE_WAIT_US);
        Some(Duration::from_micros(wait))
    }

    fn tick(&self) {
        if self.phase.load(Ordering::Relaxed) == LEAVING {
            self.look_leaving();
        }
    }

    /// Mixed queues while leaving: a workload already out writes over TCP to the proxy's
    /// socket facing it, which may still list bytes that workload redirected before.
    ///
    /// Rechecks soon while watching a connection on the short-circuit (one of its
    /// directions found its flow): a workload that asked to leave, or met the queue limit,
    /// writes on over TCP to the proxy's socket, whose psock list may still hold what it
    /// redirected, until the proxy notices at its next look (the mixed queues above, before
    /// the relay knows). Measured (`cargo xtask bench --streams-only`, 16 KiB x100): the
    /// timed rechecks found such reads 3 to 18 times a run, each after the 50 ms first
    /// interval.
    fn reading(&self) -> Reading {
        let phase = self.phase.load(Ordering::Relaxed);
        Reading {
            mixed_queues: phase == LEAVING,
            rechecks_soon: phase == WATCHING
                && self
                    .misses
                    .iter()
                    .any(|m| m.load(Ordering::Relaxed) == u32::MAX),
            steps: self.steps.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_is_whole_only_once_every_socket_is_out() {
        let ms = Duration::from_millis;
        let mut t = LeaveTimes {
            start: ms(5),
            noticed: None,
            out: [Some(ms(20)), Some(ms(70)), Some(ms(10)), Some(ms(15))],
        };
        assert_eq!(t.moved(), Some(ms(70)));
        t.out[2] = None;
        assert_eq!(t.moved(), None);
    }

    #[test]
    fn the_monotonic_clock_is_the_kernels_and_moves_forward() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(
            matches!((a, b), (Some(a), Some(b)) if b >= a + 1_000_000),
            "{a:?} {b:?}"
        );
        // Within a second of the uptime the kernel reports (CLOCK_MONOTONIC counts from boot,
        // like bpf_ktime_get_ns; /proc/uptime adds suspended time, none on a VM here).
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        if let Some(up) = uptime
            .split_whitespace()
            .next()
            .and_then(|u| u.parse::<f64>().ok())
        {
            let mono = b.unwrap_or(0) as f64 / 1e9;
            assert!(
                (mono - up).abs() < 5.0,
                "CLOCK_MONOTONIC {mono} s, uptime {up} s"
            );
        }
    }
}
