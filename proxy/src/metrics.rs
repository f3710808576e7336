//! Prometheus metrics: the proxy's own counters and histograms, the kernel programs'
//! per-CPU counters (read at scrape time), and process figures (RSS, CPU, open files).
//!
//! Label cardinality is bounded: labels are directions, protocols and reasons from fixed
//! sets, never addresses, ports or connection ids.

use std::{
    fmt, fs,
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        gauge::Gauge, histogram::Histogram,
    },
    registry::{Registry, Unit},
};

use crate::ebpf::Maps;
use crate::transport::splice::{Detached, LEAVE_SOCKETS, LeaveTimes};

/// Label of `mesh_tcp_short_circuit_leave_socket_seconds`: one of `transport::splice::LEAVE_SOCKETS`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaveLabels {
    pub socket: &'static str,
}

/// Labels of the TCP connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// "outbound": a workload's connect, intercepted.
    pub direction: &'static str,
    /// One of [`PROTOCOLS`].
    pub protocol: &'static str,
    /// The connecting workload (declared in the config, found by its cgroup), or "unknown".
    pub source_workload: String,
    /// The service connected to, else the declared workload at the original destination,
    /// else "external". Bounded by the config like every other label.
    pub destination: String,
}

/// Labels of connections the proxy refused or could not complete.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailLabels {
    pub direction: &'static str,
    /// "orig_dst_unknown", "connect_failed", "connect_timeout", "loop", "reset".
    pub reason: &'static str,
}

/// Labels of byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub source_workload: String,
    pub destination: String,
    /// "to_upstream" or "to_client".
    pub flow: &'static str,
}

pub const OUTBOUND: &str = "outbound";
pub const TCP: &str = "tcp";
/// Every value of `ConnLabels::protocol`: opaque TCP, the two HTTP versions, and TLS from the
/// application (forwarded as opaque, counted apart).
pub const PROTOCOLS: [&str; 4] = [TCP, "http1", "http2", "tls"];

/// Why the proxy closed or reset a connection (`FailLabels::reason`).
pub mod reason {
    pub const ORIG_DST_UNKNOWN: &str = "orig_dst_unknown";
    pub const LOOP: &str = "loop";
    pub const RESET: &str = "reset";
    pub const CONNECT_FAILED: &str = "connect_failed";
    pub const CONNECT_TIMEOUT: &str = "connect_timeout";
    /// A service connection found no endpoint (none configured, or all ejected).
    pub const NO_ENDPOINTS: &str = "no_endpoints";
    /// Authorization denied the connection.
    pub const DENIED: &str = "denied";
    /// Every reason, so totals can sum the family without scanning its series.
    pub const ALL: [&str; 7] = [
        DENIED,
        ORIG_DST_UNKNOWN,
        LOOP,
        RESET,
        CONNECT_FAILED,
        CONNECT_TIMEOUT,
        NO_ENDPOINTS,
    ];
}

/// Sums of the outbound TCP families, read straight from the metrics (for /debug/summary,
/// which the dashboard and `proxy top` poll every second: cheaper than encoding and
/// re-parsing the whole exposition, which also walks the SOCKHASH).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Totals {
    pub opened: u64,
    pub active: i64,
    pub failed: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
}

/// Everything the data path records. Cheap to clone handles; built once at start-up.
pub struct Metrics {
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub active: Family<ConnLabels, Gauge>,
    pub failed: Family<FailLabels, Counter>,
    pub bytes: Family<ByteLabels, Counter>,
    pub duration: Family<ConnLabels, Histogram>,
    /// Connections that carried bytes on the kernel-only path.
    pub kernel_path: Counter,
    pub detached: Counter,
    pub detached_proxy: Counter,
    pub detached_proxy_by_count: Counter,
    /// Connections that left the short-circuit: from the copy's start until the proxy began
    /// to take them off, and from then until all four sockets were out.
    pub leave_start: Histogram,
    pub leave_notice: Histogram,
    pub leave_move: Histogram,
    /// From the start of leaving until each socket was out (`transport::splice::LEAVE_SOCKETS`).
    pub leave_socket: Family<LeaveLabels, Histogram>,
    /// Sums over every label set of the TCP families, for /debug/summary (cheaper than
    /// walking the families, whose label sets grow with workloads and services).
    sums: ConnSums,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_latency: Family<ServiceLabels, Histogram>,
    pub grpc_responses: Family<GrpcLabels, Counter>,
    pub body_errors: Family<ServiceLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub ejections: Family<ServiceLabels, Counter>,
    pub detect: Family<DetectLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub authz: Family<AuthzLabels, Counter>,
    pub tunnel_handshakes: Family<TunnelLabels, Counter>,
    pub tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    pub config_generation: Gauge,
    /// Per-service request counts and latency buckets for `proxy top` and the dashboard,
    /// which diff two polls (Prometheus histograms cannot be read back here).
    /// Keyed by (source workload or "unknown", service): the edges of the request topology.
    pub routes: std::sync::Mutex<std::collections::HashMap<(String, String), RouteStat>>,
}

/// Upper bounds (seconds) of [`RouteStat::buckets`]: the request latency histogram's.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Cumulative counts of one service's requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteStat {
    pub requests: u64,
    /// 5xx responses, the proxy's own errors included.
    pub failures: u64,
    /// Requests per latency bucket (not cumulative); the last slot is +Inf.
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
}

/// Labels of HTTP request metrics. `service` comes from the config (bounded by it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub service: String,
    /// The calling workload (declared in the config, found by the kernel-recorded cgroup),
    /// or "unknown".
    pub source_workload: String,
    /// "2xx" .. "5xx".
    pub status_class: &'static str,
    /// The proxy's own error reason ("" when the response came from the upstream).
    pub proxy_error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub service: String,
    /// The numeric grpc-status, or "missing" for a response that ended without one.
    pub grpc_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub service: String,
    /// "retried" or "budget_exhausted".
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    /// "http1", "http2", "tls", "opaque" (decided by the bytes), "timeout", "peek_limit",
    /// "closed" (fell back to opaque), "skipped" (opaque port or service).
    pub result: &'static str,
}

/// Labels of authorization decisions. Identities come from the config (same node) or from
/// certificates the mesh's CA issued (other nodes), so the sets are bounded by the mesh.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// Source SPIFFE ID, or "unauthenticated".
    pub source: String,
    /// Destination workload's SPIFFE ID.
    pub destination: String,
    /// "allow" or "deny".
    pub decision: &'static str,
    /// The deciding policy's name, or the node default's (allow-all, mesh-only, deny-all).
    pub policy: String,
    /// "tcp" (the connection) or "http" (one request).
    pub level: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    /// "outbound" (this node opened it) or "inbound".
    pub direction: &'static str,
    /// "ok", or why the TLS handshake failed: not_tls, no_certificate, unknown_ca, expired,
    /// wrong_trust_domain, bad_identity, peer_refused, timeout, io, other.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelBytesLabels {
    pub direction: &'static str,
    /// "to_workload" (arrived through the tunnel) or "from_workload".
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// "applied" or "rejected".
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs to 30 s: same-node requests take tens to hundreds of microseconds, so the low
    // buckets must resolve below a millisecond.
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Default)]
struct ConnSums {
    opened: std::sync::atomic::AtomicU64,
    active: std::sync::atomic::AtomicI64,
    to_upstream: std::sync::atomic::AtomicU64,
    to_client: std::sync::atomic::AtomicU64,
}

fn duration_histogram() -> Histogram {
    // 100 µs to ~100 s: sub-millisecond resolution for short RPC connections, and long
    // streams still land in a bucket.
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 100.0,
    ])
}

impl Metrics {
    /// Creates the metrics and registers them, the kernel counters and the process figures
    /// in a new registry. `kernel` is filled in once the programs are loaded (the admin
    /// server, and so the registry, exists before that); until then, and in iptables mode,
    /// no kernel counters are exported.
    pub fn new(kernel: Arc<OnceLock<Arc<Maps>>>) -> (Arc<Metrics>, Registry) {
        let m = Arc::new(Metrics {
            opened: Family::default(),
            closed: Family::default(),
            active: Family::default(),
            failed: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            kernel_path: Counter::default(),
            detached: Counter::default(),
            detached_proxy: Counter::default(),
            detached_proxy_by_count: Counter::default(),
            leave_start: duration_histogram(),
            leave_notice: duration_histogram(),
            leave_move: duration_histogram(),
            leave_socket: Family::new_with_constructor(duration_histogram),
            sums: ConnSums::default(),
            http_requests: Family::default(),
            http_latency: Family::new_with_constructor(latency_histogram),
            grpc_responses: Family::default(),
            body_errors: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            detect: Family::default(),
            reloads: Family::default(),
            authz: Family::default(),
            tunnel_handshakes: Family::default(),
            tunnel_bytes: Family::default(),
            config_generation: Gauge::default(),
            routes: std::sync::Mutex::new(std::collections::HashMap::new()),
        });
        let mut r = Registry::with_prefix("mesh");
        r.register(
            "tcp_connections_opened",
            "TCP connections accepted from workloads",
            m.opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "TCP connections finished (cleanly or not)",
            m.closed.clone(),
        );
        r.register(
            "tcp_connections_active",
            "TCP connections open now",
            m.active.clone(),
        );
        r.register(
            "tcp_connections_failed",
            "Connections the proxy closed or reset, by reason",
            m.failed.clone(),
        );
        r.register_with_unit(
            "tcp_transferred",
            "Bytes of proxied TCP connections, by flow: copied by the proxy or sent past it on the kernel-only path",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register(
            "tcp_kernel_path_connections",
            "Connections whose workloads sent bytes to each other on the kernel-only path, the proxy out of the data path",
            m.kernel_path.clone(),
        );
        r.register(
            "tcp_short_circuit_detached_sockets",
            "Workload sockets (a connection's client or server) that left the short-circuit for plain TCP with their connection: one of them wrote a stream, or kept writing faster than the proxy could read",
            m.detached.clone(),
        );
        r.register(
            "tcp_short_circuit_detached_proxy_sockets",
            "The proxy's own sockets that left the short-circuit for plain TCP with their connection, after the workload they face",
            m.detached_proxy.clone(),
        );
        r.register(
            "tcp_short_circuit_detached_proxy_sockets_by_count",
            "Of those, the ones that left as soon as the proxy had read everything their workload sent before its writes were judged a stream, without waiting for the kernel to see their queue empty",
            m.detached_proxy_by_count.clone(),
        );
        r.register_with_unit(
            "tcp_short_circuit_leave_start",
            "Connections that left the short-circuit: time from the proxy's first relayed byte until it began to take the connection off (a stream or a writer the proxy could not keep up with asked)",
            Unit::Seconds,
            m.leave_start.clone(),
        );
        r.register_with_unit(
            "tcp_short_circuit_leave_notice",
            "Connections that left the short-circuit: time from the workload's ask (recorded by the kernel when its writes were judged a stream or kept meeting the queue limit) until the proxy began to take the connection off",
            Unit::Seconds,
            m.leave_notice.clone(),
        );
        r.register_with_unit(
            "tcp_short_circuit_leave_move",
            "Connections that left the short-circuit: time from the start of leaving until all four sockets (two workloads', two of the proxy's) were out of the SOCKHASH",
            Unit::Seconds,
            m.leave_move.clone(),
        );
        r.register_with_unit(
            "tcp_short_circuit_leave_socket",
            "Connections that left the short-circuit: time from the start of leaving until this socket was out of the SOCKHASH (client, server: the workloads'; client_proxy, server_proxy: the proxy's facing each), to see which one holds a move up",
            Unit::Seconds,
            m.leave_socket.clone(),
        );
        r.register(
            "tcp_short_circuit_unpaired_released",
            "The proxy's upstream sockets taken out of the SOCKHASH because no workload on this node paired with them (a server on another node or outside the mesh), once the server had sent its first bytes: in the SOCKHASH every send on them took the short-circuit's slower send path for nothing",
            crate::ebpf::released_unpaired().clone(),
        );
        let sweeps = crate::ebpf::sweep::counts();
        r.register(
            "tcp_short_circuit_release_sweeps",
            "Release sweeps run (an iterator over every TCP socket of the proxy's namespace that moves leaving proxy sockets on where no write of the proxy's would; at most one per 5 ms, only while a leaving connection waits for one)",
            sweeps.runs.clone(),
        );
        r.register_with_unit(
            "tcp_short_circuit_release_sweep",
            "Time the release sweeps took, summed: their cost grows with the node's TCP sockets and hash table size",
            Unit::Seconds,
            sweeps.seconds.clone(),
        );
        r.register(
            "tcp_readiness_rechecks",
            "Reads and writes of short-circuit sockets that waited past the recheck interval (5 ms to 1 s) and then found bytes or room the runtime's readiness had not reported: a lost wake-up each, or, after the shortest intervals, one still on its way",
            crate::transport::rechecked::rechecks().clone(),
        );
        r.register_with_unit(
            "tcp_connection_duration",
            "Lifetime of finished connections",
            Unit::Seconds,
            m.duration.clone(),
        );
        r.register(
            "http_requests",
            "HTTP and gRPC requests, by service, status class and proxy error reason",
            m.http_requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "Time from a request's arrival to its response's headers, retries included",
            Unit::Seconds,
            m.http_latency.clone(),
        );
        r.register(
            "grpc_responses",
            "gRPC responses by grpc-status (from trailers, or the head of a trailers-only response)",
            m.grpc_responses.clone(),
        );
        r.register(
            "http_response_body_errors",
            "Responses whose body failed mid-way (the upstream closed early); the client saw an error, not a short success",
            m.body_errors.clone(),
        );
        r.register(
            "http_retries",
            "Retries sent, and retries not sent because the budget was exhausted",
            m.retries.clone(),
        );
        r.register(
            "lb_ejections",
            "Endpoints ejected by the circuit breaker after consecutive failures",
            m.ejections.clone(),
        );
        r.register(
            "protocol_detections",
            "Protocol detection outcomes; timeout, peek_limit and closed fell back to opaque TCP",
            m.detect.clone(),
        );
        r.register(
            "config_reloads",
            "Config file changes applied or rejected (a rejected change leaves the running config in place)",
            m.reloads.clone(),
        );
        r.register(
            "authz_decisions",
            "Authorization decisions by source and destination identity, decision and policy",
            m.authz.clone(),
        );
        r.register(
            "tunnel_handshakes",
            "Mutual-TLS handshakes of the tunnel between nodes, by direction and result",
            m.tunnel_handshakes.clone(),
        );
        r.register_with_unit(
            "tunnel_transferred",
            "Bytes carried by tunnel streams this node terminated, by flow",
            Unit::Bytes,
            m.tunnel_bytes.clone(),
        );
        r.register(
            "config_generation",
            "Generation of the service catalog in use (grows with every applied reload)",
            m.config_generation.clone(),
        );
        r.register_collector(Box::new(KernelCollector { maps: kernel }));
        r.register_collector(Box::new(ProcessCollector));
        (m, r)
    }

    /// Reads without creating series (`Family::get`), so a summary request never adds
    /// zero-valued series to the exposition.
    pub fn totals(&self) -> Totals {
        use std::sync::atomic::Ordering::Relaxed;
        Totals {
            opened: self.sums.opened.load(Relaxed),
            active: self.sums.active.load(Relaxed),
            failed: reason::ALL
                .iter()
                .filter_map(|reason| {
                    let l = FailLabels {
                        direction: OUTBOUND,
                        reason,
                    };
                    self.failed.get(&l).map(|c| c.get())
                })
                .sum(),
            bytes_to_upstream: self.sums.to_upstream.load(Relaxed),
            bytes_to_client: self.sums.to_client.load(Relaxed),
        }
    }

    /// A connection was accepted (and classified).
    pub fn conn_opened(&self, labels: &ConnLabels) {
        use std::sync::atomic::Ordering::Relaxed;
        self.opened.get_or_create(labels).inc();
        self.active.get_or_create(labels).inc();
        self.sums.opened.fetch_add(1, Relaxed);
        self.sums.active.fetch_add(1, Relaxed);
    }

    /// Counts a connection that carried bytes on the kernel-only path.
    pub fn kernel_path_connection(&self) {
        self.kernel_path.inc();
    }

    /// Counts sockets that left the SOCKHASH (`Pacer::detached`): workloads', the proxy's.
    pub fn detached_sockets(&self, d: &Detached) {
        self.detached.inc_by(d.workloads);
        self.detached_proxy.inc_by(d.proxy);
        self.detached_proxy_by_count.inc_by(d.proxy_by_count);
    }

    /// Records how long a connection that left the short-circuit took to start leaving, to
    /// get each socket out and, if all four got out, to finish (`Pacer::leave_times`).
    pub fn leave_times(&self, t: &LeaveTimes) {
        self.leave_start.observe(t.start.as_secs_f64());
        if let Some(n) = t.noticed {
            self.leave_notice.observe(n.as_secs_f64());
        }
        for (socket, out) in LEAVE_SOCKETS.into_iter().zip(t.out) {
            if let Some(out) = out {
                self.leave_socket
                    .get_or_create(&LeaveLabels { socket })
                    .observe(out.as_secs_f64());
            }
        }
        if let Some(m) = t.moved() {
            self.leave_move.observe(m.as_secs_f64());
        }
    }

    /// Counts an outbound connection the proxy closed or reset, by reason.
    pub fn outbound_failed(&self, reason: &'static str) {
        self.failed
            .get_or_create(&FailLabels {
                direction: OUTBOUND,
                reason,
            })
            .inc();
    }

    pub fn http_request(
        &self,
        service: &str,
        source_workload: Option<&str>,
        status: u16,
        proxy_error: Option<&'static str>,
        elapsed: Duration,
    ) {
        let status_class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests
            .get_or_create(&HttpLabels {
                service: service.to_owned(),
                source_workload: source_workload.unwrap_or("unknown").to_owned(),
                status_class,
                proxy_error: proxy_error.unwrap_or(""),
            })
            .inc();
        let secs = elapsed.as_secs_f64();
        self.http_latency
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .observe(secs);
        if let Ok(mut routes) = self.routes.lock() {
            // Bounded like the labels: workloads and services come from the config.
            let key = (
                source_workload.unwrap_or("unknown").to_owned(),
                service.to_owned(),
            );
            let r = routes.entry(key).or_default();
            r.requests += 1;
            if status >= 500 {
                r.failures += 1;
            }
            let i = LATENCY_BUCKETS
                .iter()
                .position(|le| secs <= *le)
                .unwrap_or(LATENCY_BUCKETS.len());
            if let Some(b) = r.buckets.get_mut(i) {
                *b += 1;
            }
        }
    }

    /// A copy of the per-edge (source workload, service) stats, sorted.
    pub fn routes(&self) -> Vec<((String, String), RouteStat)> {
        let mut v: Vec<_> = match self.routes.lock() {
            Ok(r) => r.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        };
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn grpc_status(&self, service: &str, code: Option<u32>) {
        // gRPC defines codes 0..=16; anything else is one label value, not an open set.
        let grpc_status = match code {
            Some(c) if c <= 16 => c.to_string(),
            Some(_) => "invalid".into(),
            None => "missing".into(),
        };
        self.grpc_responses
            .get_or_create(&GrpcLabels {
                service: service.to_owned(),
                grpc_status,
            })
            .inc();
    }

    pub fn response_body_error(&self, service: &str) {
        self.body_errors
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    pub fn retry(&self, service: &str, outcome: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                service: service.to_owned(),
                outcome,
            })
            .inc();
    }

    pub fn ejection(&self, service: &str) {
        self.ejections
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    pub fn detected(&self, result: &'static str) {
        self.detect.get_or_create(&DetectLabels { result }).inc();
    }

    pub fn authz_decision(
        &self,
        source: Option<&str>,
        destination: &str,
        decision: &crate::authz::Decision,
        level: &'static str,
    ) {
        self.authz
            .get_or_create(&AuthzLabels {
                source: source.unwrap_or("unauthenticated").to_owned(),
                destination: destination.to_owned(),
                decision: if decision.allowed { "allow" } else { "deny" },
                policy: decision.policy.clone(),
                level,
            })
            .inc();
    }

    pub fn tunnel_handshake(&self, direction: &'static str, result: &'static str) {
        self.tunnel_handshakes
            .get_or_create(&TunnelLabels { direction, result })
            .inc();
    }

    pub fn tunnel_bytes(&self, direction: &'static str, to_workload: u64, from_workload: u64) {
        for (flow, n) in [
            ("to_workload", to_workload),
            ("from_workload", from_workload),
        ] {
            self.tunnel_bytes
                .get_or_create(&TunnelBytesLabels { direction, flow })
                .inc_by(n);
        }
    }

    pub fn config_reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    pub fn observe_close(
        &self,
        labels: &ConnLabels,
        age: Duration,
        to_upstream: u64,
        to_client: u64,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sums.active.fetch_sub(1, Relaxed);
        self.sums.to_upstream.fetch_add(to_upstream, Relaxed);
        self.sums.to_client.fetch_add(to_client, Relaxed);
        self.closed.get_or_create(labels).inc();
        self.active.get_or_create(labels).dec();
        self.duration
            .get_or_create(labels)
            .observe(age.as_secs_f64());
        for (flow, n) in [("to_upstream", to_upstream), ("to_client", to_client)] {
            self.bytes
                .get_or_create(&ByteLabels {
                    direction: labels.direction,
                    protocol: labels.protocol,
                    source_workload: labels.source_workload.clone(),
                    destination: labels.destination.clone(),
                    flow,
                })
                .inc_by(n);
        }
    }
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// Converts OpenMetrics text (what prometheus-client writes) to the classic Prometheus
/// text format 0.0.4, for clients that did not ask for OpenMetrics (promtool, curl, older
/// scrapers). The differences that matter: a counter family's HELP/TYPE name carries the
/// `_total` suffix its samples have, and there are no `# UNIT` or `# EOF` lines.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters: Vec<&str> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.push(name);
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

// === kernel counters ===

/// Reads `MESH_COUNTERS` (summed over CPUs) at scrape time.
struct KernelCollector {
    maps: Arc<OnceLock<Arc<Maps>>>,
}

impl fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelCollector")
            .field("loaded", &self.maps.get().is_some())
            .finish()
    }
}

/// Help of `ebpf_detach`, one family for the four steps of leaving the SOCKHASH.
const DETACH_HELP: &str = "Sockets of connections leaving the SOCKHASH, by step: a workload asked (wanted: it met the queue limit; stream: it writes a stream; self: a workload that asked and that nothing had been redirected into left by itself at once), a workload found it safe (ready), a proxy socket found it safe (proxy_ready)";

/// Help of `ebpf_turned_blocking`.
const TURNED_BLOCKING_HELP: &str = "Workload sockets registered while non-blocking that were blocking at their first send (a connect with a timeout), by step: left the SOCKHASH by themselves (leaving; see mesh_ebpf_sockhash_self_removed_total), or asked the proxy to take their connection off because bytes had already been redirected into them (asked)";

/// How each kernel counter is exported: metric name, label (key, value), help.
fn kernel_metric(
    name: &str,
) -> (
    &'static str,
    Option<(&'static str, &'static str)>,
    &'static str,
) {
    match name {
        "connect4_redirected" => (
            "ebpf_connects_redirected",
            Some(("family", "ipv4")),
            "Workload connects sent to the proxy by the cgroup connect programs",
        ),
        "connect6_redirected" => (
            "ebpf_connects_redirected",
            Some(("family", "ipv6")),
            "Workload connects sent to the proxy by the cgroup connect programs",
        ),
        "bypass_not_tcp" => (
            "ebpf_connects_bypassed",
            Some(("reason", "not_tcp")),
            "Workload connects left alone, by reason",
        ),
        "bypass_loopback" => (
            "ebpf_connects_bypassed",
            Some(("reason", "loopback")),
            "Workload connects left alone, by reason",
        ),
        "bypass_excluded_port" => (
            "ebpf_connects_bypassed",
            Some(("reason", "excluded_port")),
            "Workload connects left alone, by reason",
        ),
        "bypass_excluded_cidr" => (
            "ebpf_connects_bypassed",
            Some(("reason", "excluded_cidr")),
            "Workload connects left alone, by reason",
        ),
        "bypass_proxy_address" => (
            "ebpf_connects_bypassed",
            Some(("reason", "proxy_address")),
            "Workload connects left alone, by reason",
        ),
        "bypass_unconfigured" => (
            "ebpf_connects_bypassed",
            Some(("reason", "unconfigured")),
            "Workload connects left alone, by reason",
        ),
        "bypass_record_failed" => (
            "ebpf_connects_bypassed",
            Some(("reason", "record_failed")),
            "Workload connects left alone, by reason",
        ),
        "bypass_not_workload" => (
            "ebpf_connects_bypassed",
            Some(("reason", "not_workload")),
            "Workload connects left alone, by reason",
        ),
        "orig_dst_recorded" => (
            "ebpf_orig_dst_recorded",
            None,
            "Original destinations handed to the proxy",
        ),
        "sockhash_inserted" => (
            "ebpf_sockhash_inserts",
            Some(("result", "ok")),
            "SOCKHASH insertions, by result",
        ),
        "sockhash_insert_failed" => (
            "ebpf_sockhash_inserts",
            Some(("result", "failed")),
            "SOCKHASH insertions, by result",
        ),
        "sockhash_skipped_early_data" => (
            "ebpf_sockhash_inserts",
            Some(("result", "skipped_early_data")),
            "SOCKHASH insertions, by result",
        ),
        "sockhash_skipped_blocking" => (
            "ebpf_sockhash_inserts",
            Some(("result", "skipped_blocking")),
            "SOCKHASH insertions, by result",
        ),
        "msg_redirected" => (
            "ebpf_msg",
            Some(("path", "redirected")),
            "sk_msg messages, by path",
        ),
        "msg_passed" => (
            "ebpf_msg",
            Some(("path", "tcp")),
            "sk_msg messages, by path",
        ),
        "msg_redirected_bytes" => (
            "ebpf_msg_bytes",
            Some(("path", "redirected")),
            "sk_msg bytes, by path",
        ),
        "msg_passed_bytes" => (
            "ebpf_msg_bytes",
            Some(("path", "tcp")),
            "sk_msg bytes, by path",
        ),
        "msg_passed_no_peer" => (
            "ebpf_msg_tcp_reasons",
            Some(("reason", "no_peer")),
            "sk_msg messages put on the TCP path, by reason",
        ),
        "msg_passed_tainted" => (
            "ebpf_msg_tcp_reasons",
            Some(("reason", "direction_on_tcp")),
            "sk_msg messages put on the TCP path, by reason",
        ),
        "msg_passed_backpressure" => (
            "ebpf_msg_tcp_reasons",
            Some(("reason", "backpressure")),
            "sk_msg messages put on the TCP path, by reason",
        ),
        "msg_passed_memory_pressure" => (
            "ebpf_msg_tcp_reasons",
            Some(("reason", "memory_pressure")),
            "sk_msg messages put on the TCP path, by reason",
        ),
        "msg_passed_unjudged" => (
            "ebpf_msg_tcp_reasons",
            Some(("reason", "receiver_not_judged")),
            "sk_msg messages put on the TCP path, by reason",
        ),
        "msg_passed_no_flow" => (
            "ebpf_msg_tcp_reasons",
            Some(("reason", "no_flow")),
            "sk_msg messages put on the TCP path, by reason",
        ),
        "flow_resumed" => (
            "ebpf_flows_resumed",
            None,
            "Directions that returned from the TCP path to the short-circuit: into the proxy once it had read every TCP byte, or from the proxy into a workload client once its first send was judged",
        ),
        "splice_started" => (
            "ebpf_kernel_path_switches",
            None,
            "Directions of connections that switched to the kernel-only path (workload to workload)",
        ),
        "msg_direct" => (
            "ebpf_msg",
            Some(("path", "kernel_only")),
            "sk_msg messages, by path",
        ),
        "msg_direct_bytes" => (
            "ebpf_msg_bytes",
            Some(("path", "kernel_only")),
            "sk_msg bytes, by path",
        ),
        "msg_proxy_held" => (
            "ebpf_proxy_writes_held",
            None,
            "Redirected proxy writes after which the proxy paused: the receiving workload had more than 3/4 of the queue limit unread",
        ),
        "detach_wanted" => ("ebpf_detach", Some(("step", "wanted")), DETACH_HELP),
        "detach_ready" => ("ebpf_detach", Some(("step", "ready")), DETACH_HELP),
        "detach_stream" => ("ebpf_detach", Some(("step", "stream")), DETACH_HELP),
        "detach_proxy_ready" => ("ebpf_detach", Some(("step", "proxy_ready")), DETACH_HELP),
        "turned_blocking_leaving" => (
            "ebpf_turned_blocking",
            Some(("step", "leaving")),
            TURNED_BLOCKING_HELP,
        ),
        "sockhash_self_removed" => (
            "ebpf_sockhash_self_removed",
            None,
            "Workload sockets their own sock_ops removed from the SOCKHASH at a segment they sent: turned blocking at their first send, or a stream of small writes nothing had been redirected into; or, their connection leaving, once their short-circuit queue was empty",
        ),
        "detach_self" => ("ebpf_detach", Some(("step", "self")), DETACH_HELP),
        "turned_blocking_asked" => (
            "ebpf_turned_blocking",
            Some(("step", "asked")),
            TURNED_BLOCKING_HELP,
        ),
        "flow_insert_failed" => (
            "ebpf_sockhash_inserts",
            Some(("result", "flow_table_full")),
            "SOCKHASH insertions, by result",
        ),
        _ => (
            "ebpf_unknown",
            None,
            "Kernel counter without an export mapping",
        ),
    }
}

/// One exported family of kernel counters: name, help, and (label, value) per series.
type KernelFamily = (&'static str, &'static str, Vec<(Option<Label>, u64)>);
type Label = (&'static str, &'static str);

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(maps) = self.maps.get() else {
            return Ok(());
        };
        let Ok(values) = maps.counters() else {
            // A failed read is not a reason to fail the whole scrape.
            return Ok(());
        };
        // Group the counters by metric name: each family is described once.
        let mut families: Vec<KernelFamily> = Vec::new();
        for (name, v) in proxy_common::counter::NAMES.iter().zip(values) {
            let (metric, label, help) = kernel_metric(name);
            match families.iter_mut().find(|f| f.0 == metric) {
                Some(f) => f.2.push((label, v)),
                None => families.push((metric, help, vec![(label, v)])),
            }
        }
        let entries = ConstGauge::new(i64::try_from(maps.sockhash_entries()).unwrap_or(i64::MAX));
        entries.encode(encoder.encode_descriptor(
            "ebpf_sockhash_entries",
            "Sockets registered in the SOCKHASH now (4 per short-circuited connection)",
            None,
            entries.metric_type(),
        )?)?;
        for (metric, help, series) in families {
            let mut fam = encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for (label, v) in series {
                let c = ConstCounter::new(v);
                match label {
                    Some(l) => c.encode(fam.encode_family(&[l])?)?,
                    None => c.encode(fam.encode_family(&Vec::<(&str, &str)>::new())?)?,
                }
            }
        }
        Ok(())
    }
}

// === process figures ===

#[derive(Debug)]
struct ProcessCollector;

/// The data-plane runtime, for its task count (the collector runs on the admin runtime).
static DATA_RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();

/// Called once from the data-plane runtime at start-up.
pub fn set_data_runtime(handle: tokio::runtime::Handle) {
    let _ = DATA_RUNTIME.set(handle);
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let rss_kib: i64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0);
        let rss = ConstGauge::new(rss_kib * 1024);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory",
            "Resident set size of the proxy",
            Some(&Unit::Bytes),
            rss.metric_type(),
        )?)?;
        let cpu = ConstCounter::new(cpu_seconds());
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "User and system CPU time of the proxy",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let fds = fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0);
        let fds = ConstGauge::new(i64::try_from(fds).unwrap_or(i64::MAX));
        fds.encode(encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors of the proxy",
            None,
            fds.metric_type(),
        )?)?;
        if let Some(h) = DATA_RUNTIME.get() {
            let tasks = ConstGauge::new(i64::try_from(h.metrics().num_alive_tasks()).unwrap_or(0));
            tasks.encode(encoder.encode_descriptor(
                "tokio_data_tasks",
                "Tasks alive on the data-plane runtime (about one per open connection and stream)",
                None,
                tasks.metric_type(),
            )?)?;
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let tasks = ConstGauge::new(i64::try_from(h.metrics().num_alive_tasks()).unwrap_or(0));
            tasks.encode(encoder.encode_descriptor(
                "tokio_admin_tasks",
                "Tasks alive on the admin runtime",
                None,
                tasks.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

fn cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3; utime and stime are fields 14 and 15, in USER_HZ (100) ticks.
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_counter_is_exported() {
        for name in proxy_common::counter::NAMES {
            assert_ne!(
                kernel_metric(name).0,
                "ebpf_unknown",
                "{name} has no metric"
            );
        }
    }

    #[test]
    fn render_contains_families() -> Result<(), fmt::Error> {
        let (m, r) = Metrics::new(Arc::new(OnceLock::new()));
        let l = ConnLabels {
            direction: OUTBOUND,
            protocol: TCP,
            source_workload: "unknown".into(),
            destination: "external".into(),
        };
        m.conn_opened(&l);
        m.observe_close(&l, Duration::from_millis(3), 10, 20);
        m.failed
            .get_or_create(&FailLabels {
                direction: OUTBOUND,
                reason: reason::LOOP,
            })
            .inc();
        assert_eq!(
            m.totals(),
            Totals {
                opened: 1,
                active: 0,
                failed: 1,
                bytes_to_upstream: 10,
                bytes_to_client: 20,
            }
        );
        let text = render(&r)?;
        assert!(
            text.contains(
                "mesh_tcp_connections_opened_total{direction=\"outbound\",protocol=\"tcp\",source_workload=\"unknown\",destination=\"external\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("mesh_tcp_transferred_bytes_total{direction=\"outbound\",protocol=\"tcp\",source_workload=\"unknown\",destination=\"external\",flow=\"to_client\"} 20"), "{text}");
        assert!(
            text.contains("mesh_process_resident_memory_bytes"),
            "{text}"
        );
        // The process-wide count of lost wake-ups (transport::rechecked), shown before any.
        assert!(
            text.contains("mesh_tcp_readiness_rechecks_total{op=\"read\"} "),
            "{text}"
        );
        // The release sweeps' count and time (ebpf::sweep), shown before any ran.
        assert!(
            text.contains("mesh_tcp_short_circuit_release_sweeps_total ")
                && text.contains("mesh_tcp_short_circuit_release_sweep_seconds_total ")
                && text.contains("mesh_tcp_short_circuit_unpaired_released_total "),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        let classic = to_prometheus_text(&text);
        assert!(
            classic.contains("# TYPE mesh_tcp_connections_opened_total counter"),
            "{classic}"
        );
        assert!(
            classic.contains("# HELP mesh_tcp_connections_opened_total "),
            "{classic}"
        );
        assert!(
            classic.contains("# TYPE mesh_tcp_connections_active gauge"),
            "{classic}"
        );
        assert!(
            !classic.contains("# EOF") && !classic.contains("# UNIT"),
            "{classic}"
        );
        Ok(())
    }
}

// === load balancer state ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointStateLabels {
    service: String,
    /// "healthy", "ejected" or "probing".
    state: &'static str,
}

/// Exports the endpoints of every service by circuit-breaker state, read from the current
/// discovery snapshot at scrape time.
pub fn register_discovery(registry: &mut Registry, discovery: Arc<crate::discovery::Discovery>) {
    registry.register_collector(Box::new(DiscoveryCollector { discovery }));
}

struct DiscoveryCollector {
    discovery: Arc<crate::discovery::Discovery>,
}

impl fmt::Debug for DiscoveryCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryCollector").finish()
    }
}

impl Collector for DiscoveryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = self.discovery.snapshot();
        let now = std::time::Instant::now();
        let states: Family<EndpointStateLabels, Gauge> = Family::default();
        for s in &snap.services {
            let (mut h, mut e, mut p) = (0, 0, 0);
            for (_, b) in s.balancers() {
                let (hh, ee, pp) = b.state_counts(now);
                h += hh;
                e += ee;
                p += pp;
            }
            for (state, n) in [("healthy", h), ("ejected", e), ("probing", p)] {
                states
                    .get_or_create(&EndpointStateLabels {
                        service: s.spec.name.clone(),
                        state,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        states.encode(encoder.encode_descriptor(
            "lb_endpoints",
            "Endpoints of each service (per service port) by circuit-breaker state",
            None,
            states.metric_type(),
        )?)?;
        let services = ConstGauge::new(i64::try_from(snap.services.len()).unwrap_or(i64::MAX));
        services.encode(encoder.encode_descriptor(
            "services",
            "Services in the catalog in use",
            None,
            services.metric_type(),
        )?)?;
        Ok(())
    }
}

// === identity ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

/// Exports the node's certificates (expiry per identity), anchors and renewals, read from
/// the identity manager at scrape time. `manager` is filled in once certificates are
/// fetched (the registry exists before that).
pub fn register_identity(
    registry: &mut Registry,
    manager: Arc<OnceLock<Arc<crate::identity::IdentityManager>>>,
) {
    registry.register_collector(Box::new(IdentityCollector { manager }));
}

struct IdentityCollector {
    manager: Arc<OnceLock<Arc<crate::identity::IdentityManager>>>,
}

impl fmt::Debug for IdentityCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityCollector").finish()
    }
}

fn unix_secs(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Collector for IdentityCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(m) = self.manager.get() else {
            return Ok(());
        };
        let expiry: Family<IdentityLabels, Gauge> = Family::default();
        for c in m.certificates() {
            expiry
                .get_or_create(&IdentityLabels {
                    identity: c.identity.to_string(),
                })
                .set(unix_secs(c.not_after));
        }
        expiry.encode(encoder.encode_descriptor(
            "identity_certificate_expiry_timestamp_seconds",
            "When each certificate this node holds expires (it is renewed well before)",
            None,
            expiry.metric_type(),
        )?)?;
        let anchor = ConstGauge::new(
            m.anchors()
                .iter()
                .map(|a| unix_secs(a.not_after))
                .min()
                .unwrap_or(0),
        );
        anchor.encode(encoder.encode_descriptor(
            "identity_anchor_expiry_timestamp_seconds",
            "When the first of the trusted anchors expires",
            None,
            anchor.metric_type(),
        )?)?;
        let rotations = ConstCounter::new(m.rotations_total());
        rotations.encode(encoder.encode_descriptor(
            "identity_rotations",
            "Certificates renewed since start",
            None,
            rotations.metric_type(),
        )?)?;
        let failures = ConstCounter::new(m.rotation_failures_total());
        failures.encode(encoder.encode_descriptor(
            "identity_rotation_failures",
            "Failed renewal attempts since start (the old certificate stays in use meanwhile)",
            None,
            failures.metric_type(),
        )?)?;
        Ok(())
    }
}
