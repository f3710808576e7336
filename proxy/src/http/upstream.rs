//! Upstream HTTP connections, pooled per endpoint: HTTP/1.1 connections are reused one request
//! at a time (idle ones wait in a bounded list), HTTP/2 connections are shared by every request
//! to the endpoint (one connection multiplexes). Idle connections are reaped after the
//! service's idle timeout by [`Pools::reap`], which a background task calls every second.
//!
//! The pool is keyed by the endpoint's address, not by the request's authority: the balancer
//! picks the endpoint per request and the request keeps its own Host / `:authority`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::debug;

use super::Body;
use crate::{
    identity::SpiffeId,
    transport::rechecked::Rechecked,
    tunnel::{TunnelError, Tunnels},
};

/// An upstream byte stream: a TCP connection to a local endpoint, or a tunnel stream to an
/// endpoint on another node.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How to reach an endpoint on another node: through the tunnel to `peer`, as `source`,
/// expecting the endpoint's identity when the config names it.
#[derive(Clone)]
pub struct Via {
    pub tunnels: Arc<Tunnels>,
    pub peer: SocketAddr,
    pub source: SpiffeId,
    pub expected: Option<SpiffeId>,
}

/// Pool key: the endpoint, and for tunnelled endpoints the identity presented (connections
/// made as one workload are never lent to another).
type Key = (SocketAddr, Option<SpiffeId>);

/// Idle HTTP/1.1 connections kept per endpoint: enough for a busy keep-alive client mix,
/// few enough that a burst does not leave thousands of idle sockets behind.
const MAX_IDLE_H1: usize = 64;

/// Why no upstream connection could be had. Every such failure happened before the request
/// was sent, so retrying it on another endpoint is always safe.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} failed: {source}")]
    Refused {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("tunnel to {addr} failed: {source}")]
    Tunnel {
        addr: SocketAddr,
        source: TunnelError,
    },
}

#[derive(Default)]
struct H1Idle {
    conns: Vec<(http1::SendRequest<Body>, Instant)>,
    idle_timeout: Duration,
}

struct H2Slot {
    conn: Option<http2::SendRequest<Body>>,
    last_used: Instant,
    idle_timeout: Duration,
}

/// Upstream connections of the whole proxy.
#[derive(Default)]
pub struct Pools {
    h1: Mutex<HashMap<Key, H1Idle>>,
    /// An async mutex per endpoint: requests that arrive while the connection is being made
    /// wait for it instead of each opening their own.
    h2: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<H2Slot>>>>,
    /// New TCP connections ask their sockets directly when readiness is slow to come
    /// (`transport::rechecked`): on when the sk_msg short-circuit is.
    recheck: bool,
}

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    via: Option<&Via>,
    recheck: bool,
) -> Result<Box<dyn Io>, ConnectError> {
    if let Some(v) = via {
        return match tokio::time::timeout(
            timeout,
            v.tunnels
                .connect(v.peer, &v.source, v.expected.as_ref(), addr),
        )
        .await
        {
            Ok(Ok(s)) => Ok(Box::new(s)),
            Ok(Err(source)) => Err(ConnectError::Tunnel { addr, source }),
            Err(_) => Err(ConnectError::Timeout { addr, timeout }),
        };
    }
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            // Requests and responses are written whole by hyper; don't let Nagle hold the tail.
            let _ = s.set_nodelay(true);
            Ok(Box::new(Rechecked::new(s, recheck)))
        }
        Ok(Err(source)) => Err(ConnectError::Refused { addr, source }),
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
    }
}

impl Pools {
    /// `recheck`: the sk_msg short-circuit is on (see the field).
    pub fn new(recheck: bool) -> Pools {
        Pools {
            recheck,
            ..Pools::default()
        }
    }

    /// An HTTP/1.1 connection to `addr` that is ready for a request: an idle one if any,
    /// else a new one. Give it back with [`Pools::release_h1`] once the request is sent.
    pub async fn h1(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        via: Option<&Via>,
    ) -> Result<http1::SendRequest<Body>, ConnectError> {
        let key: Key = (addr, via.map(|v| v.source.clone()));
        loop {
            let idle = self
                .h1
                .lock()
                .ok()
                .and_then(|mut m| m.get_mut(&key).and_then(|i| i.conns.pop()));
            match idle {
                Some((sender, _)) if sender.is_ready() => return Ok(sender),
                Some(_) => continue, // closed by the server while idle: try the next one
                None => break,
            }
        }
        self.new_h1(addr, connect_timeout, false, via).await
    }

    /// A fresh HTTP/1.1 connection, never pooled afterwards when `upgrades` (the
    /// connection becomes a tunnel).
    pub async fn new_h1(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        upgrades: bool,
        via: Option<&Via>,
    ) -> Result<http1::SendRequest<Body>, ConnectError> {
        let stream = connect(addr, connect_timeout, via, self.recheck).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        tokio::spawn(async move {
            let r = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = r {
                debug!(upstream = %addr, error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }

    /// Puts an HTTP/1.1 connection back once its response has been read to the end (hyper's
    /// `ready()` resolves then); a connection that closes instead is dropped.
    pub fn release_h1(
        self: &Arc<Self>,
        addr: SocketAddr,
        via: Option<&Via>,
        mut sender: http1::SendRequest<Body>,
        idle_timeout: Duration,
    ) {
        let key: Key = (addr, via.map(|v| v.source.clone()));
        let pools = Arc::clone(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            if let Ok(mut m) = pools.h1.lock() {
                let idle = m.entry(key).or_default();
                idle.idle_timeout = idle_timeout;
                if idle.conns.len() < MAX_IDLE_H1 {
                    idle.conns.push((sender, Instant::now()));
                }
            }
        });
    }

    /// The shared HTTP/2 connection to `addr`, made if there is none or it has closed.
    pub async fn h2(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        idle_timeout: Duration,
        via: Option<&Via>,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        let key: Key = (addr, via.map(|v| v.source.clone()));
        let slot = match self.h2.lock() {
            Ok(mut m) => Arc::clone(m.entry(key).or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(H2Slot {
                    conn: None,
                    last_used: Instant::now(),
                    idle_timeout,
                }))
            })),
            Err(_) => Arc::new(tokio::sync::Mutex::new(H2Slot {
                conn: None,
                last_used: Instant::now(),
                idle_timeout,
            })),
        };
        let mut slot = slot.lock().await;
        slot.last_used = Instant::now();
        slot.idle_timeout = idle_timeout;
        if let Some(c) = &slot.conn
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let stream = connect(addr, connect_timeout, via, self.recheck).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Detects an upstream that vanished without a FIN (a node lost) while streams
            // wait; the interval is long enough to cost nothing on a healthy connection.
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(upstream = %addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        slot.conn = Some(sender.clone());
        Ok(sender)
    }

    /// Closes connections idle for longer than their service's idle timeout.
    pub fn reap(&self, now: Instant) {
        if let Ok(mut m) = self.h1.lock() {
            m.retain(|_, idle| {
                let limit = idle.idle_timeout;
                idle.conns
                    .retain(|(s, since)| !s.is_closed() && now.duration_since(*since) < limit);
                !idle.conns.is_empty()
            });
        }
        if let Ok(mut m) = self.h2.lock() {
            m.retain(|_, slot| match slot.try_lock() {
                Ok(mut s) => {
                    let idle = now.duration_since(s.last_used) >= s.idle_timeout;
                    let closed = s.conn.as_ref().is_none_or(|c| c.is_closed());
                    if idle || closed {
                        // Dropping the last sender lets hyper close the connection once its
                        // streams (if any are still running) end.
                        s.conn = None;
                        false
                    } else {
                        true
                    }
                }
                Err(_) => true, // a connect is in progress
            });
        }
    }

    /// (idle HTTP/1 connections, HTTP/2 connections), for metrics.
    pub fn counts(&self) -> (usize, usize) {
        let h1 = self
            .h1
            .lock()
            .map(|m| m.values().map(|i| i.conns.len()).sum())
            .unwrap_or(0);
        let h2 = self.h2.lock().map(|m| m.len()).unwrap_or(0);
        (h1, h2)
    }
}
