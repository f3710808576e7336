//! The outbound stack: a workload's intercepted connection, from accept to its original
//! destination. This module assembles; the algorithms live in `transport`.
//!
//! Per connection: recover the original destination, connect to it, copy both ways.
//! Protocol detection, load balancing and TLS (later issues) slot in between the lookup and
//! the upstream connect: the original destination becomes a target that is then resolved
//! by the service's stack.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::transport::{
    copy::{self, Transferred},
    orig_dst::OrigDstSource,
};

/// What every connection needs, built once at start-up.
pub struct Outbound {
    pub orig_dst: OrigDstSource,
    pub connect_timeout: Duration,
    pub copy_buffer: usize,
    /// The proxy's own listening addresses: a connection whose original destination is one
    /// of them would loop.
    pub own_addrs: Vec<SocketAddr>,
    pub stats: Stats,
}

/// Userspace counters (exported as metrics in a later issue; logged at shutdown now).
#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub orig_dst_unknown: AtomicU64,
    pub connect_failed: AtomicU64,
    pub loops_refused: AtomicU64,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
}

/// Accepts until `stop` turns true, then waits up to `drain` for open connections.
pub async fn serve(
    listeners: Vec<TcpListener>,
    outbound: Arc<Outbound>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut conns = JoinSet::new();
    let mut accepts = JoinSet::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(TcpStream, SocketAddr)>(1024);
    for l in listeners {
        let tx = tx.clone();
        accepts.spawn(accept_loop(l, tx));
    }
    drop(tx);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            next = rx.recv() => {
                let Some((stream, client)) = next else { break };
                while conns.try_join_next().is_some() {}
                let ob = Arc::clone(&outbound);
                conns.spawn(async move { handle(stream, client, ob).await });
            }
        }
    }
    accepts.abort_all();
    while conns.try_join_next().is_some() {}
    let open = conns.len();
    if open > 0 {
        info!(
            open,
            drain_secs = drain.as_secs_f32(),
            "draining open connections"
        );
        if timeout(drain, async { while conns.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            warn!(
                open = conns.len(),
                "drain timeout: closing remaining connections"
            );
            conns.abort_all();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tx: tokio::sync::mpsc::Sender<(TcpStream, SocketAddr)>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                if tx.send((stream, client)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the connection stays in
                // the kernel's accept queue.
                warn!(error = %e, "accept failed; retrying in 100 ms (raise the open-files limit if this repeats)");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut client: TcpStream, client_addr: SocketAddr, ob: Arc<Outbound>) {
    ob.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(client = %client_addr, error = %e, "accepted socket has no local address");
            return;
        }
    };
    let orig = match ob.orig_dst.lookup(&client, client_addr, local) {
        Ok(o) => o,
        Err(e) => {
            ob.stats.orig_dst_unknown.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "closing connection");
            copy::reset(client);
            return;
        }
    };
    if ob.own_addrs.iter().any(|a| same_endpoint(*a, orig, local)) {
        ob.stats.loops_refused.fetch_add(1, Ordering::Relaxed);
        warn!(client = %client_addr, original_dst = %orig, "original destination is the proxy itself; refusing to loop");
        copy::reset(client);
        return;
    }
    debug!(client = %client_addr, original_dst = %orig, "connection accepted");

    let mut upstream = match timeout(ob.connect_timeout, TcpStream::connect(orig)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ob.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            debug!(client = %client_addr, original_dst = %orig, error = %e, "upstream connect failed; resetting the client");
            copy::reset(client);
            return;
        }
        Err(_) => {
            ob.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            warn!(client = %client_addr, original_dst = %orig, timeout_ms = ob.connect_timeout.as_millis() as u64, "upstream connect timed out (limits.connect_timeout_ms); resetting the client");
            copy::reset(client);
            return;
        }
    };
    // Latency over batching: the workload already chose how to write.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    match copy::bidirectional(&mut client, &mut upstream, ob.copy_buffer).await {
        Ok(t) => {
            record(&ob.stats, t);
            debug!(client = %client_addr, original_dst = %orig, to_upstream = t.to_upstream, to_client = t.to_client, "connection closed");
        }
        Err(e) => {
            debug!(client = %client_addr, original_dst = %orig, error = %e, "connection failed; resetting both sides");
            copy::reset(client);
            copy::reset(upstream);
        }
    }
    ob.stats.forwarded.fetch_add(1, Ordering::Relaxed);
}

fn record(stats: &Stats, t: Transferred) {
    stats
        .bytes_to_upstream
        .fetch_add(t.to_upstream, Ordering::Relaxed);
    stats
        .bytes_to_client
        .fetch_add(t.to_client, Ordering::Relaxed);
}

/// True if `orig` is the listener `own` (a wildcard listener matches the local address the
/// connection arrived on).
fn same_endpoint(own: SocketAddr, orig: SocketAddr, local: SocketAddr) -> bool {
    own.port() == orig.port()
        && (own.ip() == orig.ip() || (own.ip().is_unspecified() && orig.ip() == local.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn loop_detection() {
        let own = a("0.0.0.0:15001");
        assert!(same_endpoint(own, a("10.0.0.1:15001"), a("10.0.0.1:15001")));
        assert!(!same_endpoint(
            own,
            a("10.0.0.2:15001"),
            a("10.0.0.1:15001")
        ));
        assert!(!same_endpoint(own, a("10.0.0.1:80"), a("10.0.0.1:15001")));
        assert!(same_endpoint(
            a("10.0.0.1:15001"),
            a("10.0.0.1:15001"),
            a("10.0.0.9:15001")
        ));
    }
}
