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

use std::{net::SocketAddr, sync::Arc, time::Duration};

use proxy_common::SockKey;
use tokio::net::TcpStream;
use tracing::debug;

use crate::{ebpf::Maps, transport::copy::Relay};

/// How long to wait for the far workload's sock_ops to pair the proxy's upstream socket: it
/// runs when the server's side sees the final ACK, which can come a moment after the proxy's
/// connect returns.
const PAIRING_WAIT: [Duration; 5] = [
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
];

/// One connection on (or allowed onto) the kernel-only path. Dropping it takes the path away
/// (the kernel also forgets it when the proxy's sockets close).
pub struct Splicer {
    maps: Arc<Maps>,
    /// The proxy's socket facing the client, and the one facing the server.
    inbound: SockKey,
    outbound: SockKey,
}

impl Splicer {
    /// Allows the connection onto the kernel-only path if both of the proxy's sockets are
    /// paired with workloads on this node (so both ends are local workloads); `None`
    /// otherwise (a remote or non-mesh destination, a full SOCKHASH).
    pub async fn attach(
        maps: &Arc<Maps>,
        client: &TcpStream,
        upstream: &TcpStream,
    ) -> Option<Splicer> {
        let addrs = |s: &TcpStream| -> Option<(SocketAddr, SocketAddr)> {
            Some((s.local_addr().ok()?, s.peer_addr().ok()?))
        };
        let (inbound, outbound) = maps.proxy_keys(addrs(client)?, addrs(upstream)?)?;
        if !maps.paired(&inbound) {
            return None;
        }
        let mut waits = PAIRING_WAIT.iter();
        while !maps.paired(&outbound) {
            tokio::time::sleep(*waits.next()?).await;
        }
        let s = Splicer {
            maps: Arc::clone(maps),
            inbound,
            outbound,
        };
        // Nothing relayed yet: the copy loop starts after this.
        if let Err(e) = s
            .maps
            .set_splice(&inbound, &outbound, 0)
            .and_then(|()| s.maps.set_splice(&outbound, &inbound, 0))
        {
            debug!(error = %e, "MESH_SPLICE is full; the connection stays on the proxy's path");
            return None; // Drop removes whatever was written
        }
        Some(s)
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
    fn relayed(&self, to_upstream: bool, total: u64) {
        let (from, to) = if to_upstream {
            (&self.inbound, &self.outbound)
        } else {
            (&self.outbound, &self.inbound)
        };
        // A failed update leaves the older, smaller total: the kernel then keeps this
        // direction on the proxy's path, which is always safe.
        if let Err(e) = self.maps.set_splice(from, to, total) {
            debug!(error = %e, "could not publish the relayed byte count");
        }
    }
}

impl Drop for Splicer {
    fn drop(&mut self) {
        self.take_back();
    }
}
