//! The tunnel between node proxies: HTTP/2 CONNECT over mutual TLS (the shape istio's
//! ztunnel calls HBONE).
//!
//! Source side ([`Tunnels::connect`]): for a connection or request whose endpoint is a pod of
//! another node (`[[mesh.peer]] pod_cidrs`), the proxy opens, or reuses, one TLS 1.3
//! connection to that node's tunnel port per (source identity, expected destination
//! identity), presenting the source workload's certificate (the node's when the source is
//! not a declared workload), and sends one HTTP/2 `CONNECT <endpoint address>` per
//! connection: many streams share one TLS connection. The original destination travels in
//! the CONNECT authority, inside TLS.
//!
//! Destination side ([`serve_inbound`]): TLS with a required client certificate that must
//! chain to the mesh's anchors and carry a SPIFFE ID of our trust domain; the peer's ID is
//! the source identity for authorization. A CONNECT is accepted only to an address of a
//! workload declared on this node (never an open relay), only when authorization allows,
//! and answered 200 once the local connect succeeded; then the stream and the local socket
//! are copied both ways. Handshake failures are counted by reason (not TLS, no certificate,
//! unknown CA, expired, wrong identity).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, client::conn::http1 as client_h1,
    client::conn::http2 as client_h2, server::conn::http2 as server_h2, service::service_fn,
    upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info, warn};

use crate::{
    discovery::Discovery,
    identity::{IdentityManager, SpiffeId, peer_identity, sni_for},
    metrics::Metrics,
};

/// A tunnelled stream: bytes written reach the endpoint on the other node.
pub type TunnelStream = TokioIo<Upgraded>;

type ConnectBody = UnsyncBoxBody<Bytes, Infallible>;

/// TLS handshakes must finish within this (a client that stalls the handshake holds a
/// socket and a task).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "connect to peer node {peer} failed: {source}; is its proxy running with mesh.inbound_port there?"
    )]
    Connect {
        peer: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to peer node {peer} timed out; is a firewall blocking its tunnel port?")]
    Timeout { peer: SocketAddr },
    #[error("TLS with peer node {peer} failed: {source}")]
    Tls {
        peer: SocketAddr,
        source: std::io::Error,
    },
    #[error("no certificate for {identity}: {message}")]
    Identity { identity: String, message: String },
    #[error("HTTP/2 with peer node {peer} failed: {source}")]
    Http {
        peer: SocketAddr,
        source: hyper::Error,
    },
    #[error("peer node {peer} refused the tunnel to {target}: {status} (policy {})", policy.as_deref().unwrap_or("-"))]
    Refused {
        peer: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
        /// The policy that denied it, when authorization did.
        policy: Option<String>,
    },
}

impl TunnelError {
    /// The peer refused by policy (the client should see a denial, not a failure).
    pub fn is_denied(&self) -> bool {
        matches!(self, TunnelError::Refused { status, .. } if *status == StatusCode::FORBIDDEN)
    }

    /// The name of the policy that denied the tunnel.
    pub fn denied_by(&self) -> Option<&str> {
        match self {
            TunnelError::Refused { policy, .. } => policy.as_deref(),
            _ => None,
        }
    }
}

type PoolKey = (SocketAddr, SpiffeId, Option<SpiffeId>);
/// One pooled tunnel connection; the async mutex makes concurrent first users share the
/// handshake instead of each opening their own.
type Slot = Arc<tokio::sync::Mutex<Option<client_h2::SendRequest<ConnectBody>>>>;

/// Source side: pooled mTLS HTTP/2 connections to peer nodes.
pub struct Tunnels {
    identity: Arc<IdentityManager>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    pools: Mutex<HashMap<PoolKey, Slot>>,
}

impl Tunnels {
    pub fn new(
        identity: Arc<IdentityManager>,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
    ) -> Tunnels {
        Tunnels {
            identity,
            metrics,
            connect_timeout,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// The identity a source presents: its workload's when it is declared (and so has a
    /// certificate), else the node's.
    pub fn source_identity(&self, workload_identity: Option<&str>) -> SpiffeId {
        workload_identity
            .and_then(|s| SpiffeId::parse(s).ok())
            .filter(|id| self.identity.has_identity(id))
            .unwrap_or_else(|| self.identity.node_identity().clone())
    }

    /// Opens a tunnelled stream to `target` through the peer node at `peer`.
    pub async fn connect(
        &self,
        peer: SocketAddr,
        source: &SpiffeId,
        expected: Option<&SpiffeId>,
        target: SocketAddr,
    ) -> Result<TunnelStream, TunnelError> {
        let key: PoolKey = (peer, source.clone(), expected.cloned());
        let slot = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            // Drop closed connections of other keys now and then: keeps the map bounded by
            // the live (peer, source, destination) combinations.
            if pools.len() > 1024 {
                pools.retain(|_, s| {
                    s.try_lock()
                        .map(|g| g.as_ref().is_some_and(|c| !c.is_closed()))
                        .unwrap_or(true)
                });
            }
            Arc::clone(pools.entry(key).or_default())
        };
        let mut sender = {
            let mut guard = slot.lock().await;
            match guard.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.handshake(peer, source, expected).await?;
                    *guard = Some(s.clone());
                    s
                }
            }
        };
        sender
            .ready()
            .await
            .map_err(|source| TunnelError::Http { peer, source })?;
        let mut req = Request::new(Empty::<Bytes>::new().boxed_unsync());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = target
            .to_string()
            .parse()
            .map_err(|_| TunnelError::Refused {
                peer,
                target,
                status: StatusCode::BAD_REQUEST,
                policy: None,
            })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| TunnelError::Http { peer, source })?;
        if resp.status() != StatusCode::OK {
            let policy = resp
                .headers()
                .get(crate::http::POLICY_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Err(TunnelError::Refused {
                peer,
                target,
                status: resp.status(),
                policy,
            });
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|source| TunnelError::Http { peer, source })?;
        Ok(TokioIo::new(upgraded))
    }

    async fn handshake(
        &self,
        peer: SocketAddr,
        source: &SpiffeId,
        expected: Option<&SpiffeId>,
    ) -> Result<client_h2::SendRequest<ConnectBody>, TunnelError> {
        let config =
            self.identity
                .client_config(source, expected)
                .map_err(|e| TunnelError::Identity {
                    identity: source.to_string(),
                    message: e.to_string(),
                })?;
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(peer)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(TunnelError::Connect { peer, source }),
            Err(_) => return Err(TunnelError::Timeout { peer }),
        };
        let _ = tcp.set_nodelay(true);
        // SNI selects the destination identity's certificate on the peer; without an
        // expected identity, an IP server name sends no SNI and the peer presents its node
        // certificate (any identity of our trust domain is accepted then).
        let name = match expected {
            Some(id) => ServerName::try_from(sni_for(id)).map_err(|_| TunnelError::Identity {
                identity: id.to_string(),
                message: "no valid server name".into(),
            })?,
            None => ServerName::IpAddress(peer.ip().into()),
        };
        let tls = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(source)) => {
                self.metrics.tunnel_handshake("outbound", classify(&source));
                return Err(TunnelError::Tls { peer, source });
            }
            Err(_) => {
                self.metrics.tunnel_handshake("outbound", "timeout");
                return Err(TunnelError::Timeout { peer });
            }
        };
        self.metrics.tunnel_handshake("outbound", "ok");
        let (sender, conn) = client_h2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| TunnelError::Http { peer, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(peer = %peer, error = %e, "tunnel connection ended");
            }
        });
        Ok(sender)
    }
}

/// Why a TLS handshake failed, as a metrics label.
fn classify(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    use rustls::{CertificateError, Error};
    match tls {
        Error::InvalidMessage(_) => "not_tls",
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => "expired",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(CertificateError::BadSignature) => "unknown_ca",
        // The mesh's verifier says why in its own error type.
        Error::InvalidCertificate(CertificateError::Other(other)) => {
            use crate::identity::VerifyError as V;
            // The verifier wraps its error for readable logs; the cause is its source.
            let err: &(dyn std::error::Error + 'static) = &*other.0;
            let verify = err
                .downcast_ref::<V>()
                .or_else(|| err.source().and_then(|s| s.downcast_ref::<V>()));
            match verify {
                Some(V::Expired { .. } | V::NotYetValid { .. } | V::AnchorExpired { .. }) => {
                    "expired"
                }
                Some(V::UnknownIssuer { .. } | V::Chain { .. }) => "unknown_ca",
                Some(V::OutsideTrustDomain { .. }) => "wrong_trust_domain",
                Some(V::NoCertificate) => "no_certificate",
                _ => "bad_identity",
            }
        }
        Error::InvalidCertificate(_) => "bad_identity",
        Error::AlertReceived(_) => "peer_refused",
        _ => "other",
    }
}

// === destination side ===

/// What the tunnel listener needs.
pub struct Inbound {
    pub identity: Arc<IdentityManager>,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    pub connect_timeout: Duration,
    pub copy_buffer: usize,
    /// See `outbound::Outbound::recheck_io`.
    pub recheck_io: bool,
}

/// Accepts tunnels until `stop` turns true.
pub async fn serve_inbound(
    listener: TcpListener,
    inbound: Arc<Inbound>,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(inbound.identity.server_config());
    info!(address = ?listener.local_addr().ok(), "tunnel listener ready");
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "tunnel accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let acceptor = acceptor.clone();
        let inbound = Arc::clone(&inbound);
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    let reason = classify(&e);
                    inbound.metrics.tunnel_handshake("inbound", reason);
                    info!(peer = %peer, reason, error = %e, "tunnel handshake refused");
                    return;
                }
                Err(_) => {
                    inbound.metrics.tunnel_handshake("inbound", "timeout");
                    return;
                }
            };
            let source = match tls
                .get_ref()
                .1
                .peer_certificates()
                .ok_or("no client certificate")
                .and_then(|c| peer_identity(c).map_err(|_| "no SPIFFE ID"))
            {
                Ok(id) => id,
                Err(why) => {
                    inbound.metrics.tunnel_handshake("inbound", "bad_identity");
                    info!(peer = %peer, why, "tunnel refused");
                    return;
                }
            };
            inbound.metrics.tunnel_handshake("inbound", "ok");
            debug!(peer = %peer, source = %source, "tunnel established");
            let source = Arc::new(source);
            let svc = {
                let inbound = Arc::clone(&inbound);
                service_fn(move |req: Request<Incoming>| {
                    let inbound = Arc::clone(&inbound);
                    let source = Arc::clone(&source);
                    async move { Ok::<_, Infallible>(handle_connect(&inbound, &source, req).await) }
                })
            };
            let served = server_h2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(1024)
                .max_pending_accept_reset_streams(Some(20))
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), svc)
                .await;
            if let Err(e) = served {
                debug!(peer = %peer, error = %e, "tunnel connection ended");
            }
        });
    }
}

fn reply(status: StatusCode, policy: Option<&str>) -> Response<ConnectBody> {
    let mut r = Response::new(Empty::<Bytes>::new().boxed_unsync());
    *r.status_mut() = status;
    if let Some(p) = policy
        && let Ok(v) = hyper::header::HeaderValue::from_str(p)
    {
        r.headers_mut().insert(crate::http::POLICY_HEADER, v);
    }
    r
}

async fn handle_connect(
    inbound: &Inbound,
    source: &SpiffeId,
    mut req: Request<Incoming>,
) -> Response<ConnectBody> {
    if req.method() != Method::CONNECT {
        return reply(StatusCode::METHOD_NOT_ALLOWED, None);
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return reply(StatusCode::BAD_REQUEST, None);
    };
    let snap = inbound.discovery.snapshot();
    // Only this node's declared workloads: the tunnel is no relay to arbitrary addresses.
    let Some(dest) = snap.workload_at(target.ip()).cloned() else {
        info!(source = %source, target = %target, "tunnel to an address that is no workload of this node refused");
        return reply(StatusCode::FORBIDDEN, Some("not-a-local-workload"));
    };
    let policies = &snap.catalog.policies;
    let dest_key = (dest.namespace.as_str(), dest.name.as_str());
    // With HTTP rules, the identity and port are checked now and each request later, here on
    // the destination node (the source node cannot be trusted with the rules).
    let per_request = policies.has_http_rules(dest_key);
    let decision = if per_request {
        policies.allows_identity(Some(source.as_str()), dest_key, target.port())
    } else {
        policies.decide(Some(source.as_str()), dest_key, target.port(), None)
    };
    inbound
        .metrics
        .authz_decision(Some(source.as_str()), &dest.identity, &decision, "tcp");
    if !decision.allowed {
        info!(source = %source, destination = %dest.identity, policy = %decision.policy, "tunnel denied by authorization");
        return reply(StatusCode::FORBIDDEN, Some(&decision.policy));
    }
    let mut upstream =
        match tokio::time::timeout(inbound.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(target = %target, error = %e, "tunnel target connect failed");
                return reply(StatusCode::BAD_GATEWAY, None);
            }
            Err(_) => return reply(StatusCode::GATEWAY_TIMEOUT, None),
        };
    let _ = upstream.set_nodelay(true);
    let on_upgrade = hyper::upgrade::on(&mut req);
    if per_request {
        let ctx = Arc::new(HttpGate {
            source: source.clone(),
            dest,
            port: target.port(),
            discovery: Arc::clone(&inbound.discovery),
            metrics: Arc::clone(&inbound.metrics),
            upstream: tokio::sync::Mutex::new(Some(upstream)),
            senders: tokio::sync::Mutex::new(None),
        });
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(up) => ctx.serve(up).await,
                Err(e) => debug!(error = %e, "tunnel upgrade failed"),
            }
        });
        return reply(StatusCode::OK, None);
    }
    let (buffer, recheck) = (inbound.copy_buffer, inbound.recheck_io);
    let metrics = Arc::clone(&inbound.metrics);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                let progress = crate::transport::copy::Progress::default();
                match crate::transport::copy::bidirectional_io(
                    &mut upstream,
                    TokioIo::new(up),
                    buffer,
                    recheck,
                    &progress,
                )
                .await
                {
                    Ok(t) => metrics.tunnel_bytes("inbound", t.to_client, t.to_upstream),
                    Err(e) => {
                        debug!(target = %target, error = %e, "tunnel stream ended with an error");
                        crate::transport::copy::reset(upstream);
                    }
                }
            }
            Err(e) => debug!(error = %e, "tunnel upgrade failed"),
        }
    });
    reply(StatusCode::OK, None)
}

// === per-request authorization at the destination ===

type GateBody = UnsyncBoxBody<Bytes, hyper::Error>;

#[derive(Debug, thiserror::Error)]
enum GateError {
    #[error("HTTP to the pod failed: {0}")]
    Hyper(#[from] hyper::Error),
    #[error("the connection to the pod is gone")]
    PodClosed,
}

enum PodSender {
    H1(client_h1::SendRequest<Incoming>),
    H2(client_h2::SendRequest<Incoming>),
}

/// A tunnel stream to a workload whose policies have HTTP rules: the proxy serves HTTP on
/// the stream, decides each request with the peer's verified identity, and forwards the
/// allowed ones to the pod over the connection it opened for this stream.
struct HttpGate {
    source: SpiffeId,
    dest: crate::discovery::WorkloadSpec,
    port: u16,
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    upstream: tokio::sync::Mutex<Option<TcpStream>>,
    senders: tokio::sync::Mutex<Option<PodSender>>,
}

impl HttpGate {
    async fn serve(self: Arc<Self>, up: Upgraded) {
        let this = Arc::clone(&self);
        let svc = service_fn(move |req: Request<Incoming>| {
            let this = Arc::clone(&this);
            async move { Ok::<_, Infallible>(this.handle(req).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection(up, svc).await {
            debug!(error = %e, "HTTP over the tunnel ended with an error");
        }
    }

    fn status(code: StatusCode, policy: Option<&str>) -> Response<GateBody> {
        let mut r = Response::new(
            http_body_util::Full::new(Bytes::from_static(b"denied by authorization policy\n"))
                .map_err(|e: Infallible| match e {})
                .boxed_unsync(),
        );
        *r.status_mut() = code;
        if let Some(p) = policy
            && let Ok(v) = hyper::header::HeaderValue::from_str(p)
        {
            r.headers_mut().insert(crate::http::POLICY_HEADER, v);
            r.headers_mut().insert(
                crate::http::PROXY_ERROR_HEADER,
                hyper::header::HeaderValue::from_static("forbidden"),
            );
        }
        r
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<GateBody> {
        let snap = self.discovery.snapshot();
        let decision = snap.catalog.policies.decide(
            Some(self.source.as_str()),
            (&self.dest.namespace, &self.dest.name),
            self.port,
            Some((req.method().as_str(), req.uri().path())),
        );
        self.metrics.authz_decision(
            Some(self.source.as_str()),
            &self.dest.identity,
            &decision,
            "http",
        );
        if !decision.allowed {
            return Self::status(StatusCode::FORBIDDEN, Some(&decision.policy));
        }
        match self.forward(req).await {
            Ok(r) => r.map(|b| b.boxed_unsync()),
            Err(e) => {
                debug!(error = %e, "forwarding over the tunnel to the pod failed");
                Self::status(StatusCode::BAD_GATEWAY, None)
            }
        }
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Incoming>, GateError> {
        let h2 = req.version() == hyper::Version::HTTP_2;
        let mut guard = self.senders.lock().await;
        if guard.is_none() {
            // The pod connection opened when the CONNECT was accepted, used once.
            let Some(tcp) = self.upstream.lock().await.take() else {
                return Err(GateError::PodClosed);
            };
            let io = TokioIo::new(tcp);
            *guard = Some(if h2 {
                let (s, conn) = client_h2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await?;
                tokio::spawn(conn);
                PodSender::H2(s)
            } else {
                let (s, conn) = client_h1::Builder::new().handshake(io).await?;
                tokio::spawn(conn);
                PodSender::H1(s)
            });
        }
        match guard.as_mut() {
            Some(PodSender::H2(s)) => {
                let mut s = s.clone();
                drop(guard);
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
            Some(PodSender::H1(s)) => {
                // One request at a time on the pod connection, like the source's pool.
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
            None => Err(GateError::PodClosed),
        }
    }
}
