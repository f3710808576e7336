//! The admin server: health, readiness, metrics, the effective config and debug views.
//!
//! It runs on its own single-threaded tokio runtime in its own OS thread, so a slow or
//! hostile scrape never takes a data-plane worker. It binds loopback by default; another
//! address needs `admin.allow_non_loopback = true` (config.rs).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_stream::{StreamExt, wrappers::BroadcastStream};
use tracing::{info, warn};

use crate::{ebpf, outbound::ConnTable};

/// What the admin endpoints read. Shared with the data plane through atomics and locks
/// that the data plane holds only briefly.
pub struct AdminState {
    /// True once interception is in place and the config is loaded; false again when the
    /// proxy starts to stop.
    pub ready: AtomicBool,
    pub registry: Registry,
    /// The same metrics the registry exports, read directly by /debug/summary.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The kernel maps once loaded (None before, and in iptables mode).
    pub kernel: Arc<std::sync::OnceLock<Arc<ebpf::Maps>>>,
    /// The effective config, as JSON (nothing secret in it yet; TLS keys will be redacted).
    pub config: Arc<std::sync::RwLock<Value>>,
    pub conns: Arc<ConnTable>,
    /// The pin directory, for /debug/ebpf (None in iptables mode).
    pub pin_dir: Option<PathBuf>,
    /// Finished-connection events, for /debug/tap.
    pub tap: tokio::sync::broadcast::Sender<Arc<Value>>,
    /// Taps streaming now; bounded by MAX_TAPS.
    pub taps: std::sync::atomic::AtomicUsize,
    /// Services and endpoints, for /debug/services.
    pub discovery: Arc<crate::discovery::Discovery>,
    /// Certificates and anchors, for /debug/identity (set once fetched).
    pub identity: Arc<std::sync::OnceLock<Arc<crate::identity::IdentityManager>>>,
    /// In discovery mode `kubernetes`: unix time of the last watch event, so /ready can
    /// say how old the state it serves is.
    pub kube_last_event: Option<prometheus_client::metrics::gauge::Gauge>,
}

/// The effective config now (replaced by every applied reload).
fn current_config(state: &AdminState) -> Value {
    match state.config.read() {
        Ok(v) => v.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// At most this many /debug/tap streams at once: each holds a channel receiver.
const MAX_TAPS: usize = 8;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin server to {addr}: {source}; choose another admin.address")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the admin thread: {0}")]
    Thread(std::io::Error),
}

/// Binds the listener now (so a bad address fails start-up), then serves from its own
/// thread and runtime until the process exits.
pub fn start(addr: SocketAddr, state: Arc<AdminState>) -> Result<SocketAddr, AdminError> {
    let std_listener =
        std::net::TcpListener::bind(addr).map_err(|source| AdminError::Bind { addr, source })?;
    std_listener
        .set_nonblocking(true)
        .map_err(|source| AdminError::Bind { addr, source })?;
    let local = std_listener
        .local_addr()
        .map_err(|source| AdminError::Bind { addr, source })?;
    thread::Builder::new()
        .name("proxy-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "admin runtime failed to start; no admin API");
                    return;
                }
            };
            rt.block_on(serve(std_listener, state));
        })
        .map_err(AdminError::Thread)?;
    info!(address = %local, "admin server listening");
    Ok(local)
}

async fn serve(std_listener: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = match TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "admin listener failed; no admin API");
            return;
        }
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, state: &Arc<AdminState>) -> Response<Body> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if state.ready.load(Ordering::Relaxed) {
                match &state.kube_last_event {
                    // Still ready through an API outage: the last known state keeps
                    // serving traffic; the body (and the metric) say how old it is.
                    Some(g) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs() as i64)
                            .unwrap_or(0);
                        let last = g.get();
                        let age = if last > 0 {
                            format!("{} s ago", (now - last).max(0))
                        } else {
                            "none yet".into()
                        };
                        with_type(
                            StatusCode::OK,
                            "text/plain; charset=utf-8",
                            format!("ready\nkubernetes: last watch event {age}\n"),
                        )
                    }
                    None => text(StatusCode::OK, "ready\n"),
                }
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => match crate::metrics::render(&state.registry) {
            // Content negotiation: OpenMetrics for scrapers that ask for it (Prometheus
            // does), the classic text format for everything else (promtool, curl).
            Ok(body) if accepts_openmetrics(req) => with_type(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ),
            Ok(body) => with_type(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::to_prometheus_text(&body),
            ),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            ),
        },
        "/config" => json_response(&current_config(state)),
        "/debug/connections" => json_response(&state.conns.snapshot()),
        "/debug/ebpf" => json_response(&ebpf_view(state)),
        "/debug/summary" => json_response(&summary(state)),
        "/debug/services" => json_response(&services(state)),
        "/debug/identity" => json_response(&identity(state)),
        "/debug/tap" => tap(req, state),
        "/dashboard" => with_type(
            StatusCode::OK,
            "text/html; charset=utf-8",
            DASHBOARD.to_string(),
        ),
        "/" => text(
            StatusCode::OK,
            "/live /ready /metrics /config /debug/connections /debug/ebpf /debug/identity /debug/services /debug/summary /debug/tap /dashboard\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
    }
}

/// The web dashboard: one self-contained page (no external resources) that polls
/// /debug/summary.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The node's certificates (never keys) and trust anchors.
fn identity(state: &AdminState) -> Value {
    let Some(m) = state.identity.get() else {
        return json!({"enabled": false});
    };
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    json!({
        "enabled": true,
        "trust_domain": m.trust_domain(),
        "node": m.node_identity().to_string(),
        "certificates": m.certificates().iter().map(|c| json!({
            "identity": c.identity.to_string(),
            "serial": c.serial_hex,
            "not_before": secs(c.not_before),
            "not_after": secs(c.not_after),
            "expires_in_seconds": c.not_after.duration_since(std::time::SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0),
        })).collect::<Vec<_>>(),
        "anchors": m.anchors().iter().map(|a| json!({"subject": a.subject, "not_after": secs(a.not_after)})).collect::<Vec<_>>(),
        "rotations": m.rotations_total(),
        "rotation_failures": m.rotation_failures_total(),
    })
}

/// Services with their endpoints' balancer and breaker state.
fn services(state: &AdminState) -> Value {
    let snap = state.discovery.snapshot();
    let now = std::time::Instant::now();
    let list: Vec<Value> = snap
        .services
        .iter()
        .map(|s| {
            let mut ports: Vec<_> = s.balancers().collect();
            ports.sort_by_key(|(p, _)| **p);
            let endpoints: Vec<Value> = ports
                .iter()
                .flat_map(|(port, b)| {
                    b.endpoints().iter().map(move |e| {
                        json!({
                            "service_port": port,
                            "address": e.addr.to_string(),
                            "weight": e.weight,
                            "identity": e.identity,
                            "state": match e.state(now) {
                                crate::balance::EndpointState::Healthy => "healthy",
                                crate::balance::EndpointState::Ejected => "ejected",
                                crate::balance::EndpointState::Probing => "probing",
                            },
                            "pending": e.pending(),
                            "latency_ewma_ms": e.ewma_secs(now) * 1000.0,
                            "ejections": e.ejections(),
                        })
                    })
                })
                .collect();
            json!({
                "name": s.spec.name,
                "protocol": s.spec.protocol.as_str(),
                "addresses": s.spec.addresses,
                "ports": s.spec.ports,
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({"generation": snap.generation, "services": list})
}

/// Per-service request totals and latency buckets (cumulative; `proxy top` and the
/// dashboard diff two polls).
fn routes(state: &AdminState) -> Value {
    let list: Vec<Value> = state
        .metrics
        .routes()
        .into_iter()
        .map(|((source, name), r)| {
            json!({
                "source": source,
                "service": name,
                "requests": r.requests,
                "failures": r.failures,
                "buckets": r.buckets,
            })
        })
        .collect();
    json!({"bucket_bounds": crate::metrics::LATENCY_BUCKETS, "services": list})
}

/// Everything the dashboard and `proxy top` show, in one request: readiness, totals from
/// the metrics, kernel counters, and open connections grouped by edge.
fn summary(state: &AdminState) -> Value {
    let t = state.metrics.totals();
    let kernel: serde_json::Map<String, Value> = state
        .kernel
        .get()
        .and_then(|maps| maps.counters().ok())
        .map(|v| {
            proxy_common::counter::NAMES
                .iter()
                .zip(v)
                .map(|(n, v)| ((*n).to_string(), json!(v)))
                .collect()
        })
        .unwrap_or_default();
    let counted = |name: &str| kernel.get(name).and_then(Value::as_u64).unwrap_or(0);
    // Bytes that skipped TCP/IP: through the proxy's sockets or past the proxy entirely.
    let redirected = counted("msg_redirected_bytes") + counted("msg_direct_bytes");
    let passed = counted("msg_passed_bytes");
    let share = if redirected + passed > 0 {
        json!(redirected as f64 / (redirected + passed) as f64)
    } else {
        Value::Null
    };
    let edges = state.conns.edges();
    let open_bytes: u64 = edges
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    e["bytes_to_upstream"].as_u64().unwrap_or(0)
                        + e["bytes_to_client"].as_u64().unwrap_or(0)
                })
                .sum()
        })
        .unwrap_or(0);
    json!({
        "ready": state.ready.load(Ordering::Relaxed),
        "taps_open": state.taps.load(Ordering::Relaxed),
        // Closed connections' bytes (from the metrics) plus open ones' (live counters).
        "bytes_moved": (t.bytes_to_upstream + t.bytes_to_client + open_bytes) as f64,
        "routes": routes(state),
        "identity": identity(state),
        "connections_opened": t.opened as f64,
        "connections_active": t.active as f64,
        "connections_failed": t.failed as f64,
        "bytes_to_upstream_closed": t.bytes_to_upstream as f64,
        "bytes_to_client_closed": t.bytes_to_client as f64,
        "short_circuit_byte_share": share,
        "kernel": kernel,
        "edges": edges,
        "sockmap": current_config(state)["intercept"]["sockmap"],
        "mode": current_config(state)["intercept"]["mode"],
    })
}

fn accepts_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn ebpf_view(state: &AdminState) -> Value {
    let Some(pin_dir) = &state.pin_dir else {
        return json!({"mode": "iptables", "programs": [], "maps": [], "counters": {}});
    };
    match ebpf::inspect(pin_dir) {
        Ok(v) => v,
        Err(e) => json!({"error": e.to_string()}),
    }
}

/// A live stream of finished connections as JSON lines, optionally filtered with
/// `?src=TEXT&dst=TEXT` (substring of the client / original destination address). A tap
/// that falls behind is told how many events it lost; the data plane never waits for it.
fn tap(req: &Request<Incoming>, state: &Arc<AdminState>) -> Response<Body> {
    let query = req.uri().query().unwrap_or("");
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    let (src, dst) = (param("src"), param("dst"));
    if state.taps.fetch_add(1, Ordering::Relaxed) >= MAX_TAPS {
        state.taps.fetch_sub(1, Ordering::Relaxed);
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many taps open; close one\n",
        );
    }
    let guard = TapGuard(Arc::clone(state));
    let stream = BroadcastStream::new(state.tap.subscribe()).filter_map(move |ev| {
        let _keep = &guard;
        let line = match ev {
            Ok(v) => {
                let s = v["client"].as_str().unwrap_or("");
                let d = v["original_dst"].as_str().unwrap_or("");
                if src.as_deref().is_some_and(|f| !s.contains(f))
                    || dst.as_deref().is_some_and(|f| !d.contains(f))
                {
                    return None;
                }
                v.to_string()
            }
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                json!({"lost": n, "reason": "the tap read too slowly"}).to_string()
            }
        };
        Some(Ok::<_, Infallible>(Frame::data(Bytes::from(line + "\n"))))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Counts a tap as closed when its stream is dropped (the client went away).
struct TapGuard(Arc<AdminState>);

impl Drop for TapGuard {
    fn drop(&mut self) {
        self.0.taps.fetch_sub(1, Ordering::Relaxed);
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    with_type(status, "text/plain; charset=utf-8", body.to_string())
}

fn json_response(v: &Value) -> Response<Body> {
    let body = serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into());
    with_type(StatusCode::OK, "application/json", body)
}

fn with_type(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(BodyExt::boxed(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}
