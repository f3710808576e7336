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

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use proxy_common::{DETACH_READY, DETACH_WANTED, SockKey};
use tokio::net::TcpStream;
use tracing::debug;

use crate::{
    ebpf::Maps,
    transport::copy::{self, Relay},
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
    /// The pause sk_msg asks for when a workload falls behind (also while bytes still pass
    /// through the proxy, which is when it matters: the first bytes, or after a memory rule).
    pacer: Pacer,
}

impl Splicer {
    /// A candidate for the kernel-only path if the client is a workload paired with the
    /// proxy's socket (`None` otherwise: a full SOCKHASH, the short-circuit off for it). The
    /// path is allowed once the upstream socket is paired too, checked now and after the
    /// proxy's writes, so the copy never waits for it.
    pub fn attach(maps: &Arc<Maps>, client: &TcpStream, upstream: &TcpStream) -> Option<Splicer> {
        let addrs = |s: &TcpStream| -> Option<(SocketAddr, SocketAddr)> {
            Some((s.local_addr().ok()?, s.peer_addr().ok()?))
        };
        let (inbound, outbound) = maps.proxy_keys(addrs(client)?, addrs(upstream)?)?;
        if !maps.paired(&inbound) {
            return None;
        }
        let s = Splicer {
            maps: Arc::clone(maps),
            inbound,
            outbound,
            pacer: Pacer::new(maps, inbound, outbound),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            state: AtomicU32::new(0),
        };
        s.try_activate();
        Some(s)
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
        (
            self.maps.take_direct_bytes(&self.inbound),
            self.maps.take_direct_bytes(&self.outbound),
        )
    }

    /// Takes the connection off the kernel-only path: each workload's next message goes to
    /// the proxy over TCP (in order: the far end reads the direct bytes first).
    pub fn take_back(&self) {
        self.maps.remove_splice(&self.inbound);
        self.maps.remove_splice(&self.outbound);
    }
}

impl Relay for Splicer {
    fn relayed(&self, to_upstream: bool, total: u64, _waited: bool) -> Option<Duration> {
        let (count, from, to) = if to_upstream {
            (&self.up, &self.inbound, &self.outbound)
        } else {
            (&self.down, &self.outbound, &self.inbound)
        };
        count.store(total, Ordering::Relaxed);
        match self.state.load(Ordering::Relaxed) {
            // Publishes this total along with the other direction's.
            s if s < NEVER => {
                self.try_activate();
            }
            ACTIVE => {
                // A failed update leaves the older, smaller total: the kernel then keeps this
                // direction on the proxy's path, which is always safe.
                if let Err(e) = self.maps.set_splice(from, to, total) {
                    debug!(error = %e, "could not publish the relayed byte count");
                }
            }
            _ => {}
        }
        self.pacer.held(to_upstream)
    }
}

impl Drop for Splicer {
    fn drop(&mut self) {
        self.take_back();
    }
}

/// How many bytes of a workload's direction the proxy relays between two looks at whether
/// the workload's socket asked to leave the SOCKHASH (`Flow::detach`): a map lookup per look.
/// Only a writer that keeps the proxy behind asks, so the look comes soon after.
const DETACH_CHECK_BYTES: u64 = 64 * 1024;

/// Looks at `Flow::detach` before a workload may leave: 1 MiB of it relayed at
/// [`DETACH_CHECK_BYTES`], so a short burst that met the limit does not take a connection
/// off the short-circuit.
const CALM_LOOKS: u32 = 16;

/// `Detach::phase`: watching; the proxy's socket towards the workload is marked
/// `FLOW_TCP_DETACHING`; finished (detached, or nothing to do any more).
const WATCHING: u8 = 0;
const QUIESCED: u8 = 1;
const FINISHED: u8 = 2;

/// The per-hop short-circuit's pause: after each write the copy asks sk_msg's verdict on it
/// (`Flow::held` of the proxy socket written to, one map lookup) and pauses if the workload
/// behind that socket has more than 3/4 of the queue limit unread (see `copy::held_pause`).
///
/// It also takes a workload's socket (the client's or the server's) out of the SOCKHASH when
/// that socket asks to (`Flow::detach`: its writes keep meeting the queue limit;
/// proxy-ebpf/src/redirect.rs, `note_pressure` and `detach`) and the proxy itself is what
/// holds it back (after 1 MiB of it relayed, none of its writes ever paced or waiting for
/// room; `Detach::downstream_slow`): first it marks the proxy's
/// socket towards that workload `FLOW_TCP_DETACHING` so nothing more is redirected into it,
/// then, once the workload's sk_msg has seen its own queue empty (`DETACH_READY`), it
/// removes the workload's socket. Both happen in [`Relay::relayed`] for the workload's
/// direction, which the copy calls from the task that also writes towards that workload
/// (`copy::bidirectional`), so no write on the marked socket is under way when it is marked.
pub struct Pacer {
    maps: Arc<Maps>,
    inbound: SockKey,
    outbound: SockKey,
    /// Per direction (to upstream, to client): lookups that found no flow before any did, or
    /// `u32::MAX` once one did. A socket that is not on the short-circuit (a destination off
    /// this node, a full SOCKHASH) stops being asked after [`PAIRING_CHECKS`] writes.
    misses: [AtomicU32; 2],
    /// The client's socket, then the server's: each may leave the SOCKHASH.
    detach: [Detach; 2],
}

/// One workload socket of a connection that may leave the SOCKHASH.
#[derive(Default)]
struct Detach {
    /// The workload's socket (the peer of the proxy's socket facing it), once looked up.
    workload: OnceLock<SockKey>,
    /// Relayed bytes of its direction at which to look at `Flow::detach` next.
    next_check: AtomicU64,
    phase: AtomicU8,
    done: AtomicBool,
    /// A write of its bytes was ever paced (sk_msg found the reader's queue 3/4 full) or had
    /// to wait for room: the reader on the other side holds this workload back, not the
    /// proxy, and plain TCP would not make it faster. Such a workload never leaves, so a
    /// stream into a slow reader keeps the short-circuit for what follows (request/response
    /// after it keeps its latency gain; test
    /// `a_reader_slower_than_the_proxy_keeps_its_hop_on_the_short_circuit`). Measured: a
    /// window (leaving after 1 MiB relayed without such a write) let that test's client leave.
    downstream_slow: AtomicBool,
    /// Looks so far: a workload leaves only after [`CALM_LOOKS`].
    looks: AtomicU32,
}

impl Pacer {
    fn new(maps: &Arc<Maps>, inbound: SockKey, outbound: SockKey) -> Pacer {
        Pacer {
            maps: Arc::clone(maps),
            inbound,
            outbound,
            misses: [AtomicU32::new(0), AtomicU32::new(0)],
            detach: [Detach::default(), Detach::default()],
        }
    }

    /// How many of the connection's workload sockets (0 to 2) left the SOCKHASH.
    pub fn detached(&self) -> u64 {
        self.detach
            .iter()
            .filter(|d| d.done.load(Ordering::Relaxed))
            .count() as u64
    }

    /// After a write of a workload's direction (`total` bytes of it relayed so far; the
    /// client's if `from_client`): moves that workload's socket out of the SOCKHASH when it
    /// asks to (see the type's comment).
    fn watch_detach(&self, from_client: bool, total: u64) {
        let (d, facing) = if from_client {
            (&self.detach[0], &self.inbound)
        } else {
            (&self.detach[1], &self.outbound)
        };
        let phase = d.phase.load(Ordering::Relaxed);
        // Once marked, every write looks: the workload is found ready at its next message,
        // and left registered with its proxy direction on TCP it would be exposed to the
        // kernel's spurious EAGAIN for blocking readers (ARCHITECTURE.md, "Kernel facts")
        // until it closes, e.g. if its stream ended before the next 64 KiB.
        if phase == FINISHED || (phase == WATCHING && total < d.next_check.load(Ordering::Relaxed))
        {
            return;
        }
        d.next_check
            .store(total.saturating_add(DETACH_CHECK_BYTES), Ordering::Relaxed);
        let workload = match d.workload.get() {
            Some(k) => *k,
            None => match self.maps.peer(facing) {
                Some(k) => *d.workload.get_or_init(|| k),
                None => {
                    // Not paired: that side is not on the short-circuit.
                    d.phase.store(FINISHED, Ordering::Relaxed);
                    return;
                }
            },
        };
        let looks = d.looks.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let proxy_bound = looks >= CALM_LOOKS && !d.downstream_slow.load(Ordering::Relaxed);
        match (self.maps.detach_state(&workload), phase) {
            // Only while it keeps meeting the limit with the proxy's writes of its bytes
            // going out freely: then the proxy's speed is what holds it back.
            (Some(DETACH_WANTED), WATCHING) if !proxy_bound => {}
            (Some(DETACH_WANTED), WATCHING) => {
                let next = if self.maps.quiesce(facing) {
                    QUIESCED
                } else {
                    FINISHED // the proxy's socket is gone: the connection is ending
                };
                d.phase.store(next, Ordering::Relaxed);
            }
            (Some(DETACH_READY), _) => {
                if self.maps.detach(&workload) {
                    d.done.store(true, Ordering::Relaxed);
                    debug!(
                        client = from_client,
                        "a workload socket left the SOCKHASH for plain TCP"
                    );
                }
                d.phase.store(FINISHED, Ordering::Relaxed);
            }
            // Closed (its close callback removed the entry): nothing left to do.
            (None, _) => d.phase.store(FINISHED, Ordering::Relaxed),
            _ => {}
        }
    }

    /// For a connection whose copy is not a `Splicer` (the kernel-only path off): `None` if
    /// the sockets' keys cannot be had.
    pub fn attach(maps: &Arc<Maps>, client: &TcpStream, upstream: &TcpStream) -> Option<Pacer> {
        let addrs = |s: &TcpStream| -> Option<(SocketAddr, SocketAddr)> {
            Some((s.local_addr().ok()?, s.peer_addr().ok()?))
        };
        let (inbound, outbound) = maps.proxy_keys(addrs(client)?, addrs(upstream)?)?;
        Some(Pacer::new(maps, inbound, outbound))
    }

    /// The pause the last write towards upstream (or the client) asked for, if any.
    fn held(&self, to_upstream: bool) -> Option<Duration> {
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
        let pause = self.held(to_upstream);
        // The workload whose bytes these are is held back by the reader on the other side
        // (a paced or waiting write), not by the proxy's speed: leaving would not help it.
        let d = &self.detach[usize::from(!to_upstream)];
        if waited || pause.is_some() {
            d.downstream_slow.store(true, Ordering::Relaxed);
        }
        self.watch_detach(to_upstream, total);
        pause
    }
}
