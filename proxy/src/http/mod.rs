//! The HTTP stack: serves a detected HTTP/1.x or HTTP/2 connection with hyper and sends each
//! request to an endpoint picked by the service's balancer, with retries, timeouts and the
//! circuit breaker.
//!
//! Per request: look the service up in the current discovery snapshot (so reloads apply to
//! keep-alive connections too), check the body limit, then try up to `1 + retry.attempts`
//! endpoints. A try that fails before the request left (connect refused or timed out) is
//! always retried; a try that failed after (5xx listed in `retry.statuses`, a reset, a per-try
//! timeout) only for idempotent methods whose body the proxy kept (at most
//! `retry.max_body_bytes`). Every retry withdraws from the service's retry budget, so retries
//! can never multiply an outage.
//!
//! Errors the proxy makes carry `x-mesh-proxy-error: <reason>` so that they are never
//! mistaken for the upstream's; gRPC requests get them as a trailers-only response with the
//! matching `grpc-status`.

pub mod upstream;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use crate::transport::{counted::Counted, rechecked::Rechecked};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited, combinators::UnsyncBoxBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
    body::{Body as _, Frame, Incoming, SizeHint},
    header::{self, HeaderName, HeaderValue},
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};
use tracing::debug;

use crate::{
    balance::PickError,
    config::HttpLimits,
    discovery::{Discovery, ProtocolHint, Target},
    metrics::Metrics,
};
use upstream::{ConnectError, Pools, Via};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The response header that marks an error made by this proxy, naming its reason.
pub const PROXY_ERROR_HEADER: &str = "x-mesh-proxy-error";
/// The response header of a 403 that names the policy that denied the request.
pub const POLICY_HEADER: &str = "x-mesh-policy";

/// What the downstream connection speaks (from detection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downstream {
    Http1,
    Http2,
}

/// The HTTP stack, built once at start-up.
pub struct HttpProxy {
    pub discovery: Arc<Discovery>,
    pub pools: Arc<Pools>,
    pub metrics: Arc<Metrics>,
    pub limits: HttpLimits,
    pub tap: tokio::sync::broadcast::Sender<Arc<Value>>,
    /// The other nodes, and the tunnels to them (None without `[identity]`).
    pub mesh: crate::config::MeshSettings,
    pub tunnels: Option<Arc<crate::tunnel::Tunnels>>,
}

/// An error the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The service was removed by a reload while the connection was open.
    NoService,
    NoEndpoints,
    CircuitOpen,
    ConnectFailed,
    ConnectTimeout,
    /// The request timeout (service `timeouts.request_ms`, per-try, or gRPC deadline).
    Timeout,
    /// The upstream failed before sending a complete response head.
    UpstreamFailed,
    BodyTooLarge,
    /// The client's request body failed while the proxy was reading it.
    ClientBody,
    /// Authorization denied the request (the response names the policy).
    Forbidden,
}

impl ProxyError {
    /// The value of [`PROXY_ERROR_HEADER`], and the metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::NoService => "no-service",
            ProxyError::NoEndpoints => "no-endpoints",
            ProxyError::CircuitOpen => "circuit-open",
            ProxyError::ConnectFailed => "connect-failed",
            ProxyError::ConnectTimeout => "connect-timeout",
            ProxyError::Timeout => "timeout",
            ProxyError::UpstreamFailed => "upstream-failed",
            ProxyError::BodyTooLarge => "body-too-large",
            ProxyError::ClientBody => "client-body-error",
            ProxyError::Forbidden => "forbidden",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoService | ProxyError::NoEndpoints | ProxyError::CircuitOpen => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::ConnectFailed | ProxyError::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout | ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody => StatusCode::BAD_REQUEST,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    /// The gRPC status code (grpc/doc/statuscodes.md) for a gRPC request.
    pub fn grpc_status(self) -> u32 {
        match self {
            ProxyError::Timeout | ProxyError::ConnectTimeout => 4, // DEADLINE_EXCEEDED
            ProxyError::BodyTooLarge => 8,                         // RESOURCE_EXHAUSTED
            ProxyError::ClientBody => 13,                          // INTERNAL
            ProxyError::Forbidden => 7,                            // PERMISSION_DENIED
            _ => 14,                                               // UNAVAILABLE
        }
    }

    fn message(self) -> &'static str {
        match self {
            ProxyError::NoService => "the service was removed from the proxy's config",
            ProxyError::NoEndpoints => "the service has no endpoints",
            ProxyError::CircuitOpen => {
                "every endpoint of the service is ejected after consecutive failures"
            }
            ProxyError::ConnectFailed => "the proxy could not connect to an endpoint",
            ProxyError::ConnectTimeout => "connecting to an endpoint timed out",
            ProxyError::Timeout => "the request timed out",
            ProxyError::UpstreamFailed => "the endpoint failed before it sent a response",
            ProxyError::BodyTooLarge => "the request body is larger than the service accepts",
            ProxyError::ClientBody => "the request body could not be read",
            ProxyError::Forbidden => "authorization policy denies this request",
        }
    }
}

impl From<PickError> for ProxyError {
    fn from(e: PickError) -> ProxyError {
        match e {
            PickError::NoEndpoints => ProxyError::NoEndpoints,
            PickError::AllEjected => ProxyError::CircuitOpen,
        }
    }
}

impl From<&ConnectError> for ProxyError {
    fn from(e: &ConnectError) -> ProxyError {
        match e {
            ConnectError::Timeout { .. } => ProxyError::ConnectTimeout,
            _ => ProxyError::ConnectFailed,
        }
    }
}

fn empty() -> Body {
    Empty::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

fn full(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// The proxy's own error response.
pub fn error_response(e: ProxyError, grpc: bool) -> Response<Body> {
    let mut resp = if grpc {
        // Trailers-only: HTTP 200 with grpc-status in the only HEADERS frame (gRPC over
        // HTTP/2 protocol spec), which every gRPC client reads as the call's status.
        let mut r = Response::new(empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(e.grpc_status()));
        h.insert("grpc-message", HeaderValue::from_static(e.message()));
        r
    } else {
        let mut r = Response::new(full(Bytes::from(format!(
            "{} (proxy error: {})\n",
            e.message(),
            e.reason()
        ))));
        *r.status_mut() = e.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    resp.headers_mut()
        .insert(PROXY_ERROR_HEADER, HeaderValue::from_static(e.reason()));
    resp
}

// === request classification ===

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// RFC 9110, section 9.2.2.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The `grpc-timeout` header (gRPC over HTTP/2: 1-8 digits and a unit). None when absent
/// or malformed (a malformed deadline is ignored, as gRPC servers do).
pub fn parse_grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Headers that describe one hop, not the message (RFC 9110, section 7.6.1), plus the ones
/// the `Connection` header names. `te: trailers` survives: gRPC needs it end to end.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "trailer",
        "transfer-encoding",
    ] {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    let te_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    h.remove(header::TE);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

// === the per-request body ===

/// The request body as the retry loop holds it.
enum ReqBody {
    /// Kept whole: can be sent again.
    Replayable(Bytes),
    /// Streamed through once; `None` after it was sent.
    Stream(Option<Body>),
}

impl ReqBody {
    fn take(&mut self) -> Option<Body> {
        match self {
            ReqBody::Replayable(b) => Some(full(b.clone())),
            ReqBody::Stream(s) => s.take(),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, ReqBody::Replayable(_))
    }
}

/// A streamed request body that fails once more than `limit` bytes went through (the
/// declared Content-Length was absent or lied).
struct CappedBody {
    inner: Body,
    left: u64,
}

impl hyper::body::Body for CappedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let n = d.len() as u64;
                    if n > self.left {
                        return Poll::Ready(Some(Err(
                            "request body larger than service.max_request_body_bytes".into(),
                        )));
                    }
                    self.left -= n;
                }
                Poll::Ready(Some(Ok(f)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Observes a response body to its end: counts gRPC statuses that arrive in trailers and
/// bodies that fail mid-way (an upstream that closed early: hyper passes the error on, so
/// the client sees a reset or a truncated chunked body, never a clean end).
struct ObservedBody {
    inner: Body,
    metrics: Arc<Metrics>,
    service: Arc<str>,
    grpc: bool,
    done: bool,
}

impl hyper::body::Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if self.grpc
                    && let Some(t) = f.trailers_ref()
                {
                    let code = t
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u32>().ok());
                    self.metrics.grpc_status(&self.service, code);
                    self.done = true;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.metrics.response_body_error(&self.service);
                self.done = true;
            }
            Poll::Ready(None) => {
                if self.grpc && !self.done {
                    // A gRPC response that ended without trailers carries no status.
                    self.metrics.grpc_status(&self.service, None);
                }
                self.done = true;
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl HttpProxy ===

/// One downstream connection's facts, shared by its requests.
struct ConnCtx {
    client: SocketAddr,
    orig_dst: SocketAddr,
    downstream: Downstream,
    /// The workload that connected (from its cgroup), if it is a declared workload.
    source: Option<crate::discovery::WorkloadSpec>,
}

impl HttpProxy {
    /// Serves one detected HTTP connection until it ends.
    pub async fn serve(
        self: Arc<Self>,
        stream: Counted<Rechecked>,
        downstream: Downstream,
        client: SocketAddr,
        orig_dst: SocketAddr,
        source: Option<crate::discovery::WorkloadSpec>,
    ) -> Result<(), hyper::Error> {
        let ctx = Arc::new(ConnCtx {
            client,
            orig_dst,
            downstream,
            source,
        });
        let limits = self.limits;
        let this = Arc::clone(&self);
        let svc = service_fn(move |req: Request<Incoming>| {
            let this = Arc::clone(&this);
            let ctx = Arc::clone(&ctx);
            async move { Ok::<_, Infallible>(this.handle(&ctx, req).await) }
        });
        let io = TokioIo::new(stream);
        match downstream {
            Downstream::Http1 => {
                http1::Builder::new()
                    .timer(TokioTimer::new())
                    // Slowloris: a client must finish its request head within this time.
                    .header_read_timeout(limits.header_read_timeout)
                    // hyper answers a head larger than this (or more than 100 headers) with
                    // 431, and a malformed one with 400, then closes.
                    .max_buf_size(limits.max_header_bytes)
                    .keep_alive(true)
                    .serve_connection(io, svc)
                    .with_upgrades()
                    .await
            }
            Downstream::Http2 => {
                http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    // Stream floods: at most this many open streams per connection.
                    .max_concurrent_streams(limits.max_concurrent_streams)
                    // Header floods: HPACK-decoded header list size per request.
                    .max_header_list_size(limits.max_header_bytes as u32)
                    // Rapid reset (CVE-2023-44487): streams a client opens and resets before
                    // the proxy accepted them; past this the connection gets GOAWAY.
                    .max_pending_accept_reset_streams(Some(20))
                    // Streams the proxy itself had to reset for protocol errors before the
                    // connection is closed (CVE-2024-27316-style floods of bad frames).
                    .max_local_error_reset_streams(Some(256))
                    // Bytes queued per stream for a client that does not read; bounds memory
                    // per stream (hyper's default is 400 KiB).
                    .max_send_buf_size(256 * 1024)
                    // A peer that vanished without a FIN is found by PING.
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .serve_connection(io, svc)
                    .await
            }
        }
    }

    async fn handle(self: &Arc<Self>, ctx: &ConnCtx, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let grpc = is_grpc(req.headers());
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let Some(target) = self.discovery.lookup(ctx.orig_dst) else {
            return self.finish(
                ctx,
                None,
                &method,
                &path,
                grpc,
                started,
                Err(ProxyError::NoService),
                None,
            );
        };
        let service: Arc<str> = Arc::from(target.service.spec.name.as_str());
        let mut denied_by = None;
        let result = if ctx.downstream == Downstream::Http1 && is_upgrade(req.headers()) {
            self.upgrade(ctx, &target, &mut req, &mut denied_by).await
        } else {
            self.forward(ctx, &target, req, grpc, &mut denied_by).await
        };
        let (resp, endpoint) = match result {
            Ok((r, e)) => (Ok(r), Some(e)),
            Err(e) => (Err(e), None),
        };
        let mut resp = self.finish(
            ctx,
            Some(service),
            &method,
            &path,
            grpc,
            started,
            resp,
            endpoint,
        );
        if let Some(policy) = denied_by
            && let Ok(v) = HeaderValue::from_str(&policy)
        {
            resp.headers_mut().insert(POLICY_HEADER, v);
        }
        resp
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        ctx: &ConnCtx,
        service: Option<Arc<str>>,
        method: &Method,
        path: &str,
        grpc: bool,
        started: Instant,
        result: Result<Response<Body>, ProxyError>,
        endpoint: Option<SocketAddr>,
    ) -> Response<Body> {
        let svc_label: Arc<str> = service.unwrap_or_else(|| Arc::from("unknown"));
        let (mut resp, proxy_error) = match result {
            Ok(r) => (r, None),
            Err(e) => (error_response(e, grpc), Some(e.reason())),
        };
        let elapsed = started.elapsed();
        let status = resp.status().as_u16();
        let head_grpc = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        let source = ctx.source.as_ref().map(|w| w.name.as_str());
        self.metrics
            .http_request(&svc_label, source, status, proxy_error, elapsed);
        if grpc && head_grpc.is_some() {
            // Trailers-only response: the status is in the head.
            self.metrics.grpc_status(&svc_label, head_grpc);
        }
        if self.tap.receiver_count() > 0 {
            let _ = self.tap.send(Arc::new(json!({
                "kind": "request",
                "client": ctx.client.to_string(),
                "source_workload": source,
                "source_identity": ctx.source.as_ref().map(|w| w.identity.as_str()),
                "original_dst": ctx.orig_dst.to_string(),
                "service": &*svc_label,
                "endpoint": endpoint.map(|e| e.to_string()),
                "protocol": if grpc { "grpc" } else if ctx.downstream == Downstream::Http2 { "http2" } else { "http1" },
                "method": method.as_str(),
                "path": path,
                "status": status,
                "grpc_status": head_grpc,
                "proxy_error": proxy_error,
                "latency_ms": elapsed.as_secs_f64() * 1000.0,
            })));
        }
        *resp.version_mut() = match ctx.downstream {
            Downstream::Http1 => Version::HTTP_11,
            Downstream::Http2 => Version::HTTP_2,
        };
        if proxy_error.is_none() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let body = std::mem::replace(resp.body_mut(), empty());
            *resp.body_mut() = ObservedBody {
                inner: body,
                metrics: Arc::clone(&self.metrics),
                service: svc_label,
                grpc: grpc && head_grpc.is_none(),
                done: false,
            }
            .boxed_unsync();
        }
        resp
    }

    /// The retry loop: returns the response and the endpoint that gave it.
    async fn forward(
        &self,
        ctx: &ConnCtx,
        target: &Target,
        req: Request<Incoming>,
        grpc: bool,
        denied_by: &mut Option<String>,
    ) -> Result<(Response<Body>, SocketAddr), ProxyError> {
        let spec = &target.service.spec;
        let (parts, incoming) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let (Some(max), Some(n)) = (spec.max_request_body, declared)
            && n > max
        {
            return Err(ProxyError::BodyTooLarge);
        }
        let idempotent = is_idempotent(&parts.method);
        let mut body = if incoming.is_end_stream() {
            ReqBody::Replayable(Bytes::new())
        } else if spec.retry.attempts > 0
            && idempotent
            && declared.is_some_and(|n| n <= spec.retry.max_body_bytes as u64)
        {
            // Small enough to keep for a replay: read it whole first (this also sends the
            // client its 100 Continue, when it asked for one).
            let limit = spec.retry.max_body_bytes;
            match Limited::new(incoming, limit).collect().await {
                Ok(c) => ReqBody::Replayable(c.to_bytes()),
                Err(_) => return Err(ProxyError::ClientBody),
            }
        } else {
            let b: Body = incoming.map_err(BoxError::from).boxed_unsync();
            ReqBody::Stream(Some(match spec.max_request_body {
                Some(max) => CappedBody {
                    inner: b,
                    left: max,
                }
                .boxed_unsync(),
                None => b,
            }))
        };

        let up_h2 = match spec.protocol {
            ProtocolHint::Http1 => false,
            ProtocolHint::Http2 | ProtocolHint::Grpc => true,
            ProtocolHint::Auto | ProtocolHint::Opaque => ctx.downstream == Downstream::Http2,
        };
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers, false);
        // The proxy answered any 100-continue itself by reading the body.
        headers.remove(header::EXPECT);
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| ctx.orig_dst.to_string());
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let uri: Uri = if up_h2 {
            headers.remove(header::HOST);
            format!("http://{authority}{path_and_query}")
                .parse()
                .map_err(|_| ProxyError::ClientBody)?
        } else {
            if !headers.contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(&authority)
            {
                headers.insert(header::HOST, v);
            }
            path_and_query.parse().map_err(|_| ProxyError::ClientBody)?
        };

        let deadline = [
            spec.request_timeout,
            if grpc {
                headers.get("grpc-timeout").and_then(parse_grpc_timeout)
            } else {
                None
            },
        ]
        .into_iter()
        .flatten()
        .min();
        let source = ctx.source.as_ref().map(|w| w.identity.as_str());
        let attempts = self.attempts(
            target,
            source,
            &parts.method,
            &uri,
            &headers,
            &mut body,
            up_h2,
            idempotent,
            denied_by,
        );
        match deadline {
            Some(d) => tokio::time::timeout(d, attempts)
                .await
                .unwrap_or(Err(ProxyError::Timeout)),
            None => attempts.await,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        target: &Target,
        source: Option<&str>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &mut ReqBody,
        up_h2: bool,
        idempotent: bool,
        denied_by: &mut Option<String>,
    ) -> Result<(Response<Body>, SocketAddr), ProxyError> {
        let svc = &target.service;
        let spec = &svc.spec;
        let name = spec.name.as_str();
        let balancer = svc.balancer(target.port).ok_or(ProxyError::NoEndpoints)?;
        svc.budget.deposit(Instant::now());
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0u32;
        // `done`: tries made so far. A retry needs attempts left and the budget's consent.
        let can_retry = |done: u32| {
            if done > spec.retry.attempts {
                return false;
            }
            if svc.budget.try_withdraw(Instant::now()) {
                self.metrics.retry(name, "retried");
                true
            } else {
                self.metrics.retry(name, "budget_exhausted");
                false
            }
        };
        loop {
            let ep = balancer
                .pick(Instant::now(), &tried)
                .map_err(ProxyError::from)?;
            let addr = ep.addr;
            if let Err(policy) = self.authorize(source, addr, Some((method.as_str(), uri.path()))) {
                *denied_by = Some(policy);
                return Err(ProxyError::Forbidden);
            }
            tried.push(addr);
            attempt += 1;
            let via = self.via_for(addr, source, ep.identity.as_deref());
            let inflight = ep.start(Instant::now());
            let fail = |inflight: crate::balance::InFlight| {
                if inflight.failure(Instant::now(), &spec.circuit) {
                    self.metrics.ejection(name);
                    debug!(service = name, endpoint = %addr, "endpoint ejected after consecutive failures");
                }
            };

            // Connect first: failures here happen before the request left, so a retry is
            // always safe and the body is still ours.
            enum Sender {
                H1(hyper::client::conn::http1::SendRequest<Body>),
                H2(hyper::client::conn::http2::SendRequest<Body>),
            }
            let sender = if up_h2 {
                self.pools
                    .h2(addr, spec.connect_timeout, spec.idle_timeout, via.as_ref())
                    .await
                    .map(Sender::H2)
            } else {
                self.pools
                    .h1(addr, spec.connect_timeout, via.as_ref())
                    .await
                    .map(Sender::H1)
            };
            let sender = match sender {
                Ok(s) => s,
                Err(ConnectError::Tunnel { source, .. }) if source.is_denied() => {
                    // The destination node's policy: a denial, not an endpoint failure.
                    drop(inflight);
                    *denied_by = Some(source.denied_by().unwrap_or("remote").to_owned());
                    return Err(ProxyError::Forbidden);
                }
                Err(e) => {
                    debug!(service = name, endpoint = %addr, error = %e, "upstream connect failed");
                    fail(inflight);
                    if can_retry(attempt) {
                        continue;
                    }
                    return Err(ProxyError::from(&e));
                }
            };
            let Some(b) = body.take() else {
                // A streamed body already went to an earlier try.
                fail(inflight);
                return Err(ProxyError::UpstreamFailed);
            };
            let mut req = Request::new(b);
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers.clone();
            *req.version_mut() = if up_h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            let send = async {
                match sender {
                    Sender::H1(mut s) => {
                        let r = s.send_request(req).await;
                        self.pools
                            .release_h1(addr, via.as_ref(), s, spec.idle_timeout);
                        r
                    }
                    Sender::H2(mut s) => {
                        s.ready().await?;
                        s.send_request(req).await
                    }
                }
            };
            let result = match spec.retry.per_try_timeout {
                Some(t) => tokio::time::timeout(t, send).await.map_err(|_| ()),
                None => Ok(send.await),
            };
            let replay_ok = body.replayable() && idempotent;
            match result {
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    if status.is_server_error() {
                        fail(inflight);
                        if replay_ok
                            && spec.retry.statuses.contains(&status.as_u16())
                            && can_retry(attempt)
                        {
                            continue;
                        }
                    } else {
                        inflight.success(Instant::now());
                    }
                    let mut resp = resp.map(|b| b.map_err(BoxError::from).boxed_unsync());
                    strip_hop_by_hop(resp.headers_mut(), false);
                    return Ok((resp, addr));
                }
                Ok(Err(e)) => {
                    debug!(service = name, endpoint = %addr, error = %e, "upstream request failed");
                    fail(inflight);
                    if replay_ok && can_retry(attempt) {
                        continue;
                    }
                    return Err(ProxyError::UpstreamFailed);
                }
                Err(()) => {
                    fail(inflight);
                    if replay_ok && can_retry(attempt) {
                        continue;
                    }
                    return Err(ProxyError::Timeout);
                }
            }
        }
    }

    /// The tunnel to use for `endpoint` when it is a pod of another node.
    fn via_for(
        &self,
        endpoint: SocketAddr,
        source: Option<&str>,
        endpoint_identity: Option<&str>,
    ) -> Option<Via> {
        let peer = self.mesh.peer_for(endpoint.ip())?;
        let tunnels = self.tunnels.as_ref()?;
        Some(Via {
            tunnels: Arc::clone(tunnels),
            peer: peer.address,
            source: tunnels.source_identity(source),
            expected: endpoint_identity.and_then(|i| crate::identity::SpiffeId::parse(i).ok()),
        })
    }

    /// Same-node authorization of one request to `endpoint`; Err names the denying policy.
    fn authorize(
        &self,
        source: Option<&str>,
        endpoint: SocketAddr,
        http: Option<(&str, &str)>,
    ) -> Result<(), String> {
        let snap = self.discovery.snapshot();
        let Some((decision, dest)) = snap.authorize(source, endpoint, http) else {
            return Ok(());
        };
        self.metrics
            .authz_decision(source, &dest.identity, &decision, "http");
        if decision.allowed {
            Ok(())
        } else {
            Err(decision.policy)
        }
    }

    /// An HTTP/1.1 Upgrade (WebSocket and the like): sent on a fresh connection (it becomes
    /// a tunnel, never pooled); on 101 both upgraded connections are joined by a copy.
    async fn upgrade(
        &self,
        ctx: &ConnCtx,
        target: &Target,
        req: &mut Request<Incoming>,
        denied_by: &mut Option<String>,
    ) -> Result<(Response<Body>, SocketAddr), ProxyError> {
        let spec = &target.service.spec;
        let balancer = target
            .service
            .balancer(target.port)
            .ok_or(ProxyError::NoEndpoints)?;
        let ep = balancer
            .pick(Instant::now(), &[])
            .map_err(ProxyError::from)?;
        let addr = ep.addr;
        let source = ctx.source.as_ref().map(|w| w.identity.as_str());
        if let Err(policy) = self.authorize(
            source,
            addr,
            Some((req.method().as_str(), req.uri().path())),
        ) {
            *denied_by = Some(policy);
            return Err(ProxyError::Forbidden);
        }
        let inflight = ep.start(Instant::now());
        let via = self.via_for(addr, source, ep.identity.as_deref());
        let mut sender = match self
            .pools
            .new_h1(addr, spec.connect_timeout, true, via.as_ref())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let _ = inflight.failure(Instant::now(), &spec.circuit);
                return Err(ProxyError::from(&e));
            }
        };
        let client_upgrade = hyper::upgrade::on(&mut *req);
        let mut headers = req.headers().clone();
        strip_hop_by_hop(&mut headers, true);
        let mut up = Request::new(empty());
        *up.method_mut() = req.method().clone();
        *up.uri_mut() = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(|_| ProxyError::ClientBody)?;
        *up.headers_mut() = headers;
        let mut resp = match sender.send_request(up).await {
            Ok(r) => r,
            Err(_) => {
                let _ = inflight.failure(Instant::now(), &spec.circuit);
                return Err(ProxyError::UpstreamFailed);
            }
        };
        inflight.success(Instant::now());
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                            debug!(error = %e, "upgraded connection ended with an error");
                        }
                    }
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            });
            let mut resp = resp.map(|b| b.map_err(BoxError::from).boxed_unsync());
            strip_hop_by_hop(resp.headers_mut(), true);
            return Ok((resp, addr));
        }
        let mut resp = resp.map(|b| b.map_err(BoxError::from).boxed_unsync());
        strip_hop_by_hop(resp.headers_mut(), false);
        Ok((resp, addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parses_units_and_rejects_garbage() {
        let p = |s: &str| {
            parse_grpc_timeout(&HeaderValue::from_str(s).unwrap_or_else(|_| unreachable!()))
        };
        assert_eq!(p("100m"), Some(Duration::from_millis(100)));
        assert_eq!(p("1S"), Some(Duration::from_secs(1)));
        assert_eq!(p("2M"), Some(Duration::from_secs(120)));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("5u"), Some(Duration::from_micros(5)));
        assert_eq!(p("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(p("99999999S"), Some(Duration::from_secs(99_999_999)));
        for bad in [
            "",
            "m",
            "123",
            "123456789S",
            "1x",
            "-1S",
            "1.5S",
            " 1S",
            "１S",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["te", "x-keep"]);
        assert_eq!(
            h.get(header::TE),
            Some(&HeaderValue::from_static("trailers"))
        );

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key(header::UPGRADE) && h.contains_key(header::CONNECTION));
    }

    #[test]
    fn proxy_errors_map_to_statuses_and_grpc_codes() {
        assert_eq!(
            ProxyError::NoEndpoints.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(ProxyError::ConnectFailed.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(ProxyError::Timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(ProxyError::Timeout.grpc_status(), 4);
        assert_eq!(ProxyError::CircuitOpen.grpc_status(), 14);
        let r = error_response(ProxyError::CircuitOpen, false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers().get(PROXY_ERROR_HEADER),
            Some(&HeaderValue::from_static("circuit-open"))
        );
        let r = error_response(ProxyError::Timeout, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers().get("grpc-status"),
            Some(&HeaderValue::from(4u32))
        );
    }
}
