//! The outbound stack: a workload's intercepted connection, from accept to its original
//! destination. This module assembles; the algorithms live in `transport`.
//!
//! Per connection: recover the original destination, connect to it, copy both ways.
//! Protocol detection, load balancing and TLS (later issues) slot in between the lookup and
//! the upstream connect: the original destination becomes a target that is then resolved
//! by the service's stack.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::{
    metrics::{ConnLabels, FailLabels, Metrics, OUTBOUND, TCP, reason},
    transport::{
        copy::{self, Progress},
        orig_dst::OrigDstSource,
    },
};

/// What every connection needs, built once at start-up.
pub struct Outbound {
    pub orig_dst: OrigDstSource,
    pub connect_timeout: Duration,
    pub copy_buffer: usize,
    /// The proxy's own listening addresses: a connection whose original destination is one
    /// of them would loop.
    pub own_addrs: Vec<SocketAddr>,
    pub metrics: Arc<Metrics>,
    pub conns: Arc<ConnTable>,
    /// Finished connections for `proxy tap`. A broadcast channel: sending never blocks or
    /// allocates per subscriber, and a tap that reads too slowly loses events (it is told how
    /// many) instead of slowing the data plane.
    pub tap: tokio::sync::broadcast::Sender<Arc<Value>>,
    /// How connections travel besides the proxy's copy: "short-circuit" when the sk_msg
    /// redirect is on (the bytes still pass through the proxy, but skip TCP/IP on both
    /// same-node hops when both sockets are paired), else "proxied".
    pub path: &'static str,
}

// === connection table ===

/// Open connections, for /debug/connections. Entries are added after accept and removed
/// when the connection ends; the lock is held only for those two map operations.
#[derive(Default)]
pub struct ConnTable {
    next: AtomicU64,
    open: Mutex<HashMap<u64, ConnEntry>>,
}

struct ConnEntry {
    client: SocketAddr,
    orig_dst: SocketAddr,
    started: Instant,
    path: &'static str,
    progress: Arc<Progress>,
}

impl ConnTable {
    fn insert(&self, entry: ConnEntry) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, entry);
        }
        id
    }

    fn remove(&self, id: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&id);
        }
    }

    /// JSON list of open connections, oldest first.
    pub fn snapshot(&self) -> Value {
        let mut rows: Vec<(Instant, Value)> = match self.open.lock() {
            Ok(open) => open
                .values()
                .map(|e| {
                    let t = e.progress.snapshot();
                    (
                        e.started,
                        json!({
                            "client": e.client.to_string(),
                            "original_dst": e.orig_dst.to_string(),
                            "direction": OUTBOUND,
                            "protocol": TCP,
                            "path": e.path,
                            "bytes_to_upstream": t.to_upstream,
                            "bytes_to_client": t.to_client,
                            "age_seconds": e.started.elapsed().as_secs_f64(),
                        }),
                    )
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        rows.sort_by_key(|r| r.0);
        Value::Array(rows.into_iter().map(|r| r.1).collect())
    }

    /// Open connections grouped by edge (client address -> original destination address,
    /// ports left out), for the dashboard's topology: counts and live bytes per edge.
    pub fn edges(&self) -> Value {
        let mut edges: HashMap<(String, String), (u64, u64, u64)> = HashMap::new();
        if let Ok(open) = self.open.lock() {
            for e in open.values() {
                let t = e.progress.snapshot();
                let k = (e.client.ip().to_string(), e.orig_dst.ip().to_string());
                let v = edges.entry(k).or_default();
                v.0 += 1;
                v.1 += t.to_upstream;
                v.2 += t.to_client;
            }
        }
        let mut list: Vec<Value> = edges
            .into_iter()
            .map(|((src, dst), (n, up, down))| {
                json!({"source": src, "destination": dst, "connections": n, "bytes_to_upstream": up, "bytes_to_client": down})
            })
            .collect();
        list.sort_by(|a, b| {
            a["source"]
                .as_str()
                .cmp(&b["source"].as_str())
                .then(a["destination"].as_str().cmp(&b["destination"].as_str()))
        });
        Value::Array(list)
    }

    pub fn len(&self) -> usize {
        self.open.lock().map(|o| o.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Accepts until `stop` turns true, then takes what is still in the accept queues (those
/// clients already completed their handshake: dropping them would reset them), then waits up
/// to `drain` for open connections.
pub async fn serve(
    listeners: Vec<TcpListener>,
    outbound: Arc<Outbound>,
    stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut conns = JoinSet::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(TcpStream, SocketAddr)>(1024);
    for l in listeners {
        tokio::spawn(accept_loop(l, tx.clone(), stop.clone()));
    }
    drop(tx);
    // Ends when every accept loop has finished (stopped and drained its queue).
    while let Some((stream, client)) = rx.recv().await {
        while conns.try_join_next().is_some() {}
        let ob = Arc::clone(&outbound);
        conns.spawn(async move { handle(stream, client, ob).await });
    }
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

/// How long the accept queue must stay empty after stop before a listener closes. The
/// interception is detached before stop, so only handshakes already in flight can still
/// arrive; they complete within microseconds on a node.
const ACCEPT_QUIET: Duration = Duration::from_millis(100);

async fn accept_loop(
    listener: TcpListener,
    tx: tokio::sync::mpsc::Sender<(TcpStream, SocketAddr)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stopping = *stop.borrow();
    loop {
        let next = if stopping {
            match timeout(ACCEPT_QUIET, listener.accept()).await {
                Ok(r) => r,
                Err(_) => return, // queue empty and quiet: close the listener
            }
        } else {
            tokio::select! {
                r = listener.accept() => r,
                _ = stop.changed() => {
                    stopping = true;
                    continue;
                }
            }
        };
        match next {
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

/// Capacity of the tap channel: events a slow tap may fall behind before it loses some.
pub const TAP_CAPACITY: usize = 1024;

async fn handle(mut client: TcpStream, client_addr: SocketAddr, ob: Arc<Outbound>) {
    let labels = ConnLabels {
        direction: OUTBOUND,
        protocol: TCP,
    };
    let fail = |reason: &'static str| {
        ob.metrics
            .failed
            .get_or_create(&FailLabels {
                direction: OUTBOUND,
                reason,
            })
            .inc();
    };
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
            fail(reason::ORIG_DST_UNKNOWN);
            warn!(error = %e, "closing connection");
            copy::reset(client);
            return;
        }
    };
    if ob.own_addrs.iter().any(|a| same_endpoint(*a, orig, local)) {
        fail(reason::LOOP);
        warn!(client = %client_addr, original_dst = %orig, "original destination is the proxy itself; refusing to loop");
        copy::reset(client);
        return;
    }
    debug!(client = %client_addr, original_dst = %orig, "connection accepted");
    ob.metrics.opened.get_or_create(&labels).inc();
    ob.metrics.active.get_or_create(&labels).inc();
    let started = Instant::now();
    let progress = Arc::new(Progress::default());
    let id = ob.conns.insert(ConnEntry {
        client: client_addr,
        orig_dst: orig,
        started,
        path: ob.path,
        progress: Arc::clone(&progress),
    });

    // Protocol detection, balancing and TLS (issues 4 and 5) go here: the original
    // destination becomes a target resolved by the service's stack.
    let outcome = match timeout(ob.connect_timeout, TcpStream::connect(orig)).await {
        Ok(Ok(mut upstream)) => {
            // Latency over batching: the workload already chose how to write.
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            match copy::bidirectional(&mut client, &mut upstream, ob.copy_buffer, &progress).await {
                Ok(t) => {
                    debug!(client = %client_addr, original_dst = %orig, to_upstream = t.to_upstream, to_client = t.to_client, "connection closed");
                    "ok"
                }
                Err(e) => {
                    fail(reason::RESET);
                    debug!(client = %client_addr, original_dst = %orig, error = %e, "connection failed; resetting both sides");
                    copy::reset(client);
                    copy::reset(upstream);
                    "reset"
                }
            }
        }
        Ok(Err(e)) => {
            fail(reason::CONNECT_FAILED);
            debug!(client = %client_addr, original_dst = %orig, error = %e, "upstream connect failed; resetting the client");
            copy::reset(client);
            "connect_failed"
        }
        Err(_) => {
            fail(reason::CONNECT_TIMEOUT);
            warn!(client = %client_addr, original_dst = %orig, timeout_ms = ob.connect_timeout.as_millis() as u64, "upstream connect timed out (limits.connect_timeout_ms); resetting the client");
            copy::reset(client);
            "connect_timeout"
        }
    };
    let t = progress.snapshot();
    if ob.tap.receiver_count() > 0 {
        let _ = ob.tap.send(Arc::new(json!({
            "client": client_addr.to_string(),
            "original_dst": orig.to_string(),
            "direction": OUTBOUND,
            "protocol": TCP,
            "path": ob.path,
            "outcome": outcome,
            "bytes_to_upstream": t.to_upstream,
            "bytes_to_client": t.to_client,
            "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
        })));
    }
    ob.metrics
        .observe_close(&labels, started.elapsed(), t.to_upstream, t.to_client);
    ob.conns.remove(id);
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
