//! The outbound stack: a workload's intercepted connection, from accept to its original
//! destination. This module assembles; the algorithms live in `transport`.
//!
//! Per connection: recover the original destination and look it up in discovery.
//! - Not a service: connect to the original destination and copy both ways (transparent;
//!   no detection, so server-speaks-first protocols never wait).
//! - A service: unless its protocol is `opaque` or the port is in `detect.opaque_ports`,
//!   detect the protocol with a bounded peek. HTTP/1 and HTTP/2 go to the HTTP stack
//!   (`http`), balanced per request; TLS (SNI recorded) and anything else are balanced per
//!   connection and copied.

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
    balance::PickError,
    detect::{self, Outcome, Protocol},
    discovery::{Discovery, ProtocolHint, Target, WorkloadSpec},
    http::{Downstream, HttpProxy},
    metrics::{ConnLabels, Metrics, OUTBOUND, TCP, reason},
    transport::{
        copy::{self, Progress},
        counted::Counted,
        orig_dst::OrigDstSource,
        rechecked::Rechecked,
        splice::{Pacer, Splicer},
    },
};

/// What every connection needs, built once at start-up.
pub struct Outbound {
    pub orig_dst: OrigDstSource,
    pub connect_timeout: Duration,
    pub copy_buffer: usize,
    /// Copy loops re-check their sockets directly when readiness is slow to come
    /// (`transport::copy`): on when the sk_msg short-circuit is.
    pub recheck_io: bool,
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
    pub discovery: Arc<Discovery>,
    pub http: Arc<HttpProxy>,
    pub detect_timeout: Duration,
    /// Sorted: ports that skip protocol detection.
    pub opaque_ports: Vec<u16>,
    /// The other nodes, and the tunnels to them (None without `[identity]`).
    pub mesh: crate::config::MeshSettings,
    pub tunnels: Option<Arc<crate::tunnel::Tunnels>>,
    /// The kernel-only path for authorized same-node opaque TCP (`intercept.kernel_path`),
    /// through these maps; None when off.
    pub kernel_path: Option<Arc<crate::ebpf::Maps>>,
    /// The short-circuit's maps when it is on (the copy pauses when sk_msg says a workload
    /// falls behind, `transport::splice::Pacer`); None when off.
    pub short_circuit: Option<Arc<crate::ebpf::Maps>>,
}

/// What a connection to a service is handled as, after detection.
enum Handling {
    /// Not a service: copied to the original destination.
    Passthrough,
    /// A service, balanced per connection and copied.
    Opaque { sni: Option<String> },
    /// A service, served by the HTTP stack.
    Http(Downstream),
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
    source: Option<Arc<str>>,
    orig_dst: SocketAddr,
    protocol: &'static str,
    service: Option<String>,
    sni: Option<String>,
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
                            "source_workload": e.source.as_deref(),
                            "original_dst": e.orig_dst.to_string(),
                            "direction": OUTBOUND,
                            "protocol": e.protocol,
                            "service": e.service,
                            "sni": e.sni,
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

    /// Open connections grouped by edge (source workload, else client address -> service,
    /// else original destination address; ports left out), for the dashboard's topology:
    /// counts and live bytes per edge.
    pub fn edges(&self) -> Value {
        let mut edges: HashMap<(String, String), (u64, u64, u64)> = HashMap::new();
        if let Ok(open) = self.open.lock() {
            for e in open.values() {
                let t = e.progress.snapshot();
                // Workloads and services by name where the config names them, addresses
                // otherwise: the topology of who talks to what.
                let k = (
                    e.source
                        .as_deref()
                        .map(str::to_owned)
                        .unwrap_or_else(|| e.client.ip().to_string()),
                    e.service
                        .clone()
                        .unwrap_or_else(|| e.orig_dst.ip().to_string()),
                );
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

async fn handle(client: TcpStream, client_addr: SocketAddr, ob: Arc<Outbound>) {
    let fail = |reason: &'static str| ob.metrics.outbound_failed(reason);
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(client = %client_addr, error = %e, "accepted socket has no local address");
            return;
        }
    };
    let (orig, source_cgroup) = match ob.orig_dst.lookup(&client, client_addr, local) {
        Ok(o) => (o.dst, o.cgroup_id),
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
    // Which workload connected, from the cgroup the kernel recorded (never from the
    // client's address, which a workload could choose).
    let source = source_cgroup.and_then(|id| ob.discovery.workload_of_cgroup_id(id));
    let source_name: Option<Arc<str>> = source.as_ref().map(|w| Arc::from(w.name.as_str()));
    debug!(client = %client_addr, original_dst = %orig, source_workload = source_name.as_deref().unwrap_or("-"), "connection accepted");
    let target = ob.discovery.lookup(orig);
    let handling = match &target {
        None => Handling::Passthrough,
        Some(t) => {
            let skip = t.service.spec.protocol == ProtocolHint::Opaque
                || ob.opaque_ports.binary_search(&orig.port()).is_ok();
            if skip {
                ob.metrics.detected("skipped");
                Handling::Opaque { sni: None }
            } else {
                match detect::detect(&client, ob.detect_timeout).await {
                    Ok((protocol, outcome)) => {
                        ob.metrics.detected(match (&protocol, outcome) {
                            (_, Outcome::Timeout) => "timeout",
                            (_, Outcome::PeekLimit) => "peek_limit",
                            (_, Outcome::Closed) => "closed",
                            (Protocol::Http1 { .. }, _) => "http1",
                            (Protocol::Http2, _) => "http2",
                            (Protocol::Tls { .. }, _) => "tls",
                            (Protocol::Opaque, _) => "opaque",
                        });
                        if outcome == Outcome::Timeout {
                            debug!(client = %client_addr, original_dst = %orig, "protocol detection timed out; forwarding as opaque TCP (list the port in detect.opaque_ports if the server speaks first)");
                        }
                        match protocol {
                            Protocol::Http1 { .. } => Handling::Http(Downstream::Http1),
                            Protocol::Http2 => Handling::Http(Downstream::Http2),
                            Protocol::Tls { sni } => Handling::Opaque { sni },
                            Protocol::Opaque => Handling::Opaque { sni: None },
                        }
                    }
                    Err(e) => {
                        fail(reason::RESET);
                        debug!(client = %client_addr, error = %e, "client failed during protocol detection");
                        copy::reset(client);
                        return;
                    }
                }
            }
        }
    };
    let protocol = match &handling {
        Handling::Passthrough => TCP,
        Handling::Opaque { sni: Some(_) } => "tls",
        Handling::Opaque { sni: None } => TCP,
        Handling::Http(Downstream::Http1) => "http1",
        Handling::Http(Downstream::Http2) => "http2",
    };
    let destination = match &target {
        Some(t) => t.service.spec.name.clone(),
        None => ob
            .discovery
            .snapshot()
            .workload_at(orig.ip())
            .map(|w| w.name.clone())
            .unwrap_or_else(|| "external".into()),
    };
    let labels = ConnLabels {
        direction: OUTBOUND,
        protocol,
        source_workload: source_name.as_deref().unwrap_or("unknown").to_owned(),
        destination,
    };
    ob.metrics.conn_opened(&labels);
    let started = Instant::now();
    let progress = Arc::new(Progress::default());
    let service = target.as_ref().map(|t| t.service.spec.name.clone());
    let sni = match &handling {
        Handling::Opaque { sni } => sni.clone(),
        _ => None,
    };
    let id = ob.conns.insert(ConnEntry {
        client: client_addr,
        source: source_name.clone(),
        orig_dst: orig,
        protocol,
        service: service.clone(),
        sni: sni.clone(),
        started,
        path: ob.path,
        progress: Arc::clone(&progress),
    });

    let outcome = match (handling, target) {
        (Handling::Http(downstream), Some(_)) => {
            let _ = client.set_nodelay(true);
            let io = Counted::new(Rechecked::new(client, ob.recheck_io), Arc::clone(&progress));
            match Arc::clone(&ob.http)
                .serve(io, downstream, client_addr, orig, source.clone())
                .await
            {
                Ok(()) => "ok",
                Err(e) => {
                    debug!(client = %client_addr, error = %e, "HTTP connection ended with an error");
                    "http_error"
                }
            }
        }
        (Handling::Opaque { .. }, Some(t)) => {
            opaque_service(
                &ob,
                client,
                client_addr,
                orig,
                source.as_ref(),
                &t,
                &progress,
            )
            .await
        }
        (_, _) if !authorized(&ob, source.as_ref(), orig) => {
            debug!(client = %client_addr, original_dst = %orig, "connection denied by authorization; resetting the client");
            copy::reset(client);
            "denied"
        }
        (_, _) => {
            // Passthrough (a target-less Http/Opaque cannot happen: handling derives from it).
            match dial(&ob, orig, source.as_ref(), None, ob.connect_timeout).await {
                Ok(upstream) => {
                    let route = Route {
                        client_addr,
                        orig,
                        to: orig,
                        source: source.as_ref(),
                    };
                    copy_upstream(&ob, client, upstream, &route, &progress).await
                }
                Err(Dial::Denied) => {
                    fail(reason::DENIED);
                    debug!(client = %client_addr, original_dst = %orig, "the destination node's policy denied the connection; resetting the client");
                    copy::reset(client);
                    "denied"
                }
                Err(Dial::Failed(e)) => {
                    fail(reason::CONNECT_FAILED);
                    debug!(client = %client_addr, original_dst = %orig, error = %e, "upstream connect failed; resetting the client");
                    copy::reset(client);
                    "connect_failed"
                }
                Err(Dial::Timeout) => {
                    fail(reason::CONNECT_TIMEOUT);
                    warn!(client = %client_addr, original_dst = %orig, timeout_ms = ob.connect_timeout.as_millis() as u64, "upstream connect timed out (limits.connect_timeout_ms); resetting the client");
                    copy::reset(client);
                    "connect_timeout"
                }
            }
        }
    };
    let t = progress.snapshot();
    if ob.tap.receiver_count() > 0 {
        let _ = ob.tap.send(Arc::new(json!({
            "client": client_addr.to_string(),
            "source_workload": source_name.as_deref(),
            "original_dst": orig.to_string(),
            "kind": "connection",
            "direction": OUTBOUND,
            "protocol": protocol,
            "service": service,
            "sni": sni,
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

/// Copies between the client and an upstream until both sides are done; resets both on an
/// error. With the kernel-only path on and both ends workloads of this node, the copy only
/// relays what reaches the proxy while the workloads talk directly (`transport::splice`);
/// such a connection is authorized again after every reload and reset if now denied, since
/// the proxy no longer sees its bytes.
async fn copy_both(
    ob: &Outbound,
    mut client: TcpStream,
    mut upstream: TcpStream,
    route: &Route<'_>,
    progress: &Progress,
) -> &'static str {
    let &Route {
        client_addr,
        orig,
        to,
        source,
    } = route;
    // Latency over batching: the workload already chose how to write.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let splicer = match &ob.kernel_path {
        Some(maps) => Splicer::attach(maps, &client, &upstream),
        None => None,
    };
    // Without a splicer the per-hop short-circuit still needs the copy's pauses.
    let pacer = match (&splicer, &ob.short_circuit) {
        (None, Some(maps)) => Pacer::attach(maps, &client, &upstream),
        _ => None,
    };
    let relay: Option<&dyn copy::Relay> = match (&splicer, &pacer) {
        (Some(s), _) => Some(s),
        (None, Some(p)) => Some(p),
        (None, None) => None,
    };
    let generation = ob.discovery.snapshot().generation;
    let copied = {
        let copy = copy::bidirectional(
            &mut client,
            &mut upstream,
            ob.copy_buffer,
            ob.recheck_io,
            relay,
            progress,
        );
        match &splicer {
            Some(_) => tokio::select! {
                r = copy => Some(r),
                () = denied_after_reload(ob, source, to, generation) => None,
            },
            None => Some(copy.await),
        }
    };
    if let Some(s) = &splicer {
        let (up, down) = s.take_direct_bytes();
        progress.to_upstream.fetch_add(up, Ordering::Relaxed);
        progress.to_client.fetch_add(down, Ordering::Relaxed);
        if up + down > 0 {
            ob.metrics.kernel_path_connection();
        }
        s.take_back();
    }
    let (detached, leave_times) = match (&splicer, &pacer) {
        (Some(s), _) => (Some(s.detached()), s.leave_times()),
        (None, Some(p)) => (Some(p.detached()), p.leave_times()),
        (None, None) => (None, None),
    };
    if let Some(t) = leave_times {
        ob.metrics.leave_times(&t);
    }
    if let Some(d) = detached
        && d.workloads + d.proxy > 0
    {
        ob.metrics.detached_sockets(&d);
    }
    match copied {
        Some(Ok(_)) => {
            let t = progress.snapshot();
            debug!(client = %client_addr, original_dst = %orig, upstream = %to, to_upstream = t.to_upstream, to_client = t.to_client, kernel_path = splicer.is_some(), "connection closed");
            "ok"
        }
        Some(Err(e)) => {
            ob.metrics.outbound_failed(reason::RESET);
            debug!(client = %client_addr, original_dst = %orig, upstream = %to, error = %e, "connection failed; resetting both sides");
            copy::reset(client);
            copy::reset(upstream);
            "reset"
        }
        None => {
            debug!(client = %client_addr, original_dst = %orig, upstream = %to, "a reload denies this kernel-path connection; resetting both sides");
            copy::reset(client);
            copy::reset(upstream);
            "denied"
        }
    }
}

/// Returns once a configuration reload after `generation` no longer authorizes `source` to
/// reach `to` (checked at each reload; pending forever while it stays authorized).
async fn denied_after_reload(
    ob: &Outbound,
    source: Option<&WorkloadSpec>,
    to: SocketAddr,
    generation: u64,
) {
    let mut installed = ob.discovery.subscribe();
    // A reload between the copy's start and this subscription is seen here.
    let mut seen = generation;
    loop {
        let now = *installed.borrow_and_update();
        if now != seen {
            seen = now;
            if !authorized(ob, source, to) {
                return;
            }
        }
        if installed.changed().await.is_err() {
            // The catalog is gone (the proxy is stopping): nothing will deny this any more.
            return std::future::pending().await;
        }
    }
}

/// A service connection forwarded as opaque TCP: balanced per connection. A connect failure
/// moves to another endpoint (nothing was sent yet) within the service's retry attempts and
/// budget; the endpoint counts the connection as pending for its whole life, so the balancer
/// sees long-lived connections as load.
async fn opaque_service(
    ob: &Outbound,
    client: TcpStream,
    client_addr: SocketAddr,
    orig: SocketAddr,
    source: Option<&WorkloadSpec>,
    target: &Target,
    progress: &Progress,
) -> &'static str {
    let svc = &target.service;
    let spec = &svc.spec;
    let fail = |reason: &'static str| ob.metrics.outbound_failed(reason);
    let Some(balancer) = svc.balancer(target.port) else {
        fail(reason::NO_ENDPOINTS);
        copy::reset(client);
        return "no_endpoints";
    };
    svc.budget.deposit(Instant::now());
    let mut tried = Vec::new();
    loop {
        let ep = match balancer.pick(Instant::now(), &tried) {
            Ok(ep) => ep,
            Err(e) => {
                fail(reason::NO_ENDPOINTS);
                debug!(client = %client_addr, service = %spec.name, error = %e, "no endpoint for an opaque connection; resetting the client");
                copy::reset(client);
                return match e {
                    PickError::NoEndpoints => "no_endpoints",
                    PickError::AllEjected => "circuit_open",
                };
            }
        };
        tried.push(ep.addr);
        if !authorized(ob, source, ep.addr) {
            debug!(client = %client_addr, service = %spec.name, endpoint = %ep.addr, "connection denied by authorization; resetting the client");
            copy::reset(client);
            return "denied";
        }
        let attempt = ep.start(Instant::now());
        match dial(
            ob,
            ep.addr,
            source,
            ep.identity.as_deref(),
            spec.connect_timeout,
        )
        .await
        {
            Ok(upstream) => {
                attempt.success(Instant::now());
                let _active = ep.start(Instant::now());
                let route = Route {
                    client_addr,
                    orig,
                    to: ep.addr,
                    source,
                };
                return copy_upstream(ob, client, upstream, &route, progress).await;
            }
            Err(Dial::Denied) => {
                fail(reason::DENIED);
                debug!(client = %client_addr, service = %spec.name, endpoint = %ep.addr, "the destination node's policy denied the connection; resetting the client");
                copy::reset(client);
                return "denied";
            }
            Err(Dial::Failed(_)) | Err(Dial::Timeout) => {
                if attempt.failure(Instant::now(), &spec.circuit) {
                    ob.metrics.ejection(&spec.name);
                }
                let more = (tried.len() as u32) <= spec.retry.attempts;
                if more && svc.budget.try_withdraw(Instant::now()) {
                    ob.metrics.retry(&spec.name, "retried");
                    continue;
                }
                if more {
                    ob.metrics.retry(&spec.name, "budget_exhausted");
                }
                fail(reason::CONNECT_FAILED);
                debug!(client = %client_addr, service = %spec.name, endpoint = %ep.addr, "endpoint connect failed; resetting the client");
                copy::reset(client);
                return "connect_failed";
            }
        }
    }
}

/// Where a copied connection comes from and goes.
struct Route<'a> {
    client_addr: SocketAddr,
    /// The workload's original destination (a service address or the endpoint itself).
    orig: SocketAddr,
    /// The endpoint the proxy connected to.
    to: SocketAddr,
    /// The connecting workload, if declared.
    source: Option<&'a WorkloadSpec>,
}

/// An upstream byte stream: a TCP connection, or a tunnel stream to another node's pod.
enum Upstream {
    Tcp(TcpStream),
    Tunnel(crate::tunnel::TunnelStream),
}

enum Dial {
    Failed(String),
    Timeout,
    /// The destination node's authorization refused the tunnel.
    Denied,
}

/// Connects to `dst`: directly, or through the tunnel when it is a pod of another node
/// (presenting the source workload's identity, expecting `expected` when known).
async fn dial(
    ob: &Outbound,
    dst: SocketAddr,
    source: Option<&WorkloadSpec>,
    expected: Option<&str>,
    limit: Duration,
) -> Result<Upstream, Dial> {
    if let (Some(peer), Some(tunnels)) = (ob.mesh.peer_for(dst.ip()), ob.tunnels.as_ref()) {
        let src = tunnels.source_identity(source.map(|w| w.identity.as_str()));
        let expected = expected.and_then(|e| crate::identity::SpiffeId::parse(e).ok());
        return match timeout(
            limit,
            tunnels.connect(peer.address, &src, expected.as_ref(), dst),
        )
        .await
        {
            Ok(Ok(s)) => Ok(Upstream::Tunnel(s)),
            Ok(Err(e)) if e.is_denied() => Err(Dial::Denied),
            Ok(Err(e)) => Err(Dial::Failed(e.to_string())),
            Err(_) => Err(Dial::Timeout),
        };
    }
    match timeout(limit, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => Ok(Upstream::Tcp(s)),
        Ok(Err(e)) => Err(Dial::Failed(e.to_string())),
        Err(_) => Err(Dial::Timeout),
    }
}

async fn copy_upstream(
    ob: &Outbound,
    mut client: TcpStream,
    upstream: Upstream,
    route: &Route<'_>,
    progress: &Progress,
) -> &'static str {
    match upstream {
        Upstream::Tcp(s) => copy_both(ob, client, s, route, progress).await,
        Upstream::Tunnel(t) => {
            let (client_addr, orig, to) = (route.client_addr, route.orig, route.to);
            let _ = client.set_nodelay(true);
            match copy::bidirectional_io(&mut client, t, ob.copy_buffer, ob.recheck_io, progress)
                .await
            {
                Ok(t) => {
                    debug!(client = %client_addr, original_dst = %orig, upstream = %to, to_upstream = t.to_upstream, to_client = t.to_client, "connection closed (tunnelled)");
                    "ok"
                }
                Err(e) => {
                    ob.metrics.outbound_failed(reason::RESET);
                    debug!(client = %client_addr, original_dst = %orig, error = %e, "tunnelled connection failed; resetting the client");
                    copy::reset(client);
                    "reset"
                }
            }
        }
    }
}

/// Same-node authorization of a TCP connection from `source` to `dst`: counted, and true
/// when allowed or when `dst` is not a workload this node's policies govern.
fn authorized(ob: &Outbound, source: Option<&WorkloadSpec>, dst: SocketAddr) -> bool {
    let snap = ob.discovery.snapshot();
    let source_id = source.map(|w| w.identity.as_str());
    let Some((decision, dest)) = snap.authorize(source_id, dst, None) else {
        return true;
    };
    ob.metrics
        .authz_decision(source_id, &dest.identity, &decision, "tcp");
    if !decision.allowed {
        ob.metrics.outbound_failed(reason::DENIED);
        debug!(source = source_id.unwrap_or("-"), destination = %dest.identity, policy = %decision.policy, "denied");
    }
    decision.allowed
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
