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
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use proxy_common::SockKey;
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
    fn relayed(&self, to_upstream: bool, total: u64) -> Option<Duration> {
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

/// The per-hop short-circuit's pause: after each write the copy asks sk_msg's verdict on it
/// (`Flow::held` of the proxy socket written to, one map lookup) and pauses if the workload
/// behind that socket has more than 3/4 of the queue limit unread (see `copy::held_pause`).
pub struct Pacer {
    maps: Arc<Maps>,
    inbound: SockKey,
    outbound: SockKey,
    /// Per direction (to upstream, to client): lookups that found no flow before any did, or
    /// `u32::MAX` once one did. A socket that is not on the short-circuit (a destination off
    /// this node, a full SOCKHASH) stops being asked after [`PAIRING_CHECKS`] writes.
    misses: [AtomicU32; 2],
}

impl Pacer {
    fn new(maps: &Arc<Maps>, inbound: SockKey, outbound: SockKey) -> Pacer {
        Pacer {
            maps: Arc::clone(maps),
            inbound,
            outbound,
            misses: [AtomicU32::new(0), AtomicU32::new(0)],
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
    fn relayed(&self, to_upstream: bool, _total: u64) -> Option<Duration> {
        self.held(to_upstream)
    }
}
