//! The certificate issuer (`proxy identity serve`): an HTTPS endpoint that signs node CSRs
//! for the identities each node's token authorizes. See the module doc of `identity` for
//! the protocol.

use std::{
    convert::Infallible,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use rcgen::PublicKeyData;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::FromDer;

use super::{
    SpiffeId,
    ca::{self, Ca, CaError},
    verify::{AnchorsError, TrustAnchors},
    x509::rfc3339,
};

/// Default lifetime of issued leaf certificates (`--lifetime-secs`).
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Largest accepted request body: a P-256 CSR is under 1 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// How often the nodes file and the CA files are checked for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The issuer's own serving certificate; renewed at half-life.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A client must finish the TLS handshake, and send request headers, within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The issuer cannot start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Anchors(#[from] AnchorsError),
    #[error(transparent)]
    Nodes(#[from] NodesError),
    #[error(
        "cannot listen on {addr}: {source}; pick a free port or an address of this host \
         (--listen)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the issuer's TLS config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot create the issuer's own certificate: {0}")]
    ServerCert(String),
}

/// The nodes file is unusable. Messages name the file, the node and the fix.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    #[error(
        "cannot read nodes file {path}: {source}; create it with one [[node]] table per node \
         (name, token_sha256, identities)",
        path = path.display()
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nodes file {path} is not valid: {message}", path = path.display())]
    Toml { path: PathBuf, message: String },
    #[error(
        "nodes file {path} says trust_domain = {found:?} but the CA is for {ca}; remove the \
         key (the CA's trust domain applies) or point --ca-dir at that trust domain's CA",
        path = path.display()
    )]
    TrustDomain {
        path: PathBuf,
        found: String,
        ca: String,
    },
    #[error("nodes file {path}: node name {name:?} is invalid: {reason}", path = path.display())]
    BadName {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error(
        "nodes file {path} lists node {name:?} twice; merge the entries",
        path = path.display()
    )]
    DuplicateName { path: PathBuf, name: String },
    #[error(
        "nodes file {path}: token_sha256 of node {node:?} must be 64 hex characters (the \
         sha256 of the token); compute it with `proxy identity hash-token`",
        path = path.display()
    )]
    BadTokenHash { path: PathBuf, node: String },
    #[error(
        "nodes file {path}: nodes {first:?} and {second:?} share a token; give every node its \
         own",
        path = path.display()
    )]
    DuplicateToken {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error(
        "nodes file {path}: identity pattern {pattern:?} of node {node:?} is invalid: {reason}",
        path = path.display()
    )]
    BadPattern {
        path: PathBuf,
        node: String,
        pattern: String,
        reason: String,
    },
}

// === wire format ===

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssueRequest {
    pub identity: String,
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct IssueResponse {
    pub certificate_chain: String,
    pub not_after: String,
    pub serial: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub error: String,
}

// === nodes file ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodesToml {
    /// Optional; when present it must equal the CA's trust domain.
    trust_domain: Option<String>,
    #[serde(default)]
    node: Vec<NodeToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeToml {
    name: String,
    token_sha256: String,
    #[serde(default)]
    identities: Vec<String>,
}

/// An identity a node may request: exact, or any value of the last path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdPattern {
    Exact(SpiffeId),
    /// `spiffe://td/ns/default/sa/*`: holds the prefix up to and including the last '/'.
    LastSegment(String),
}

impl IdPattern {
    pub(crate) fn parse(pattern: &str, trust_domain: &str) -> Result<Self, String> {
        let (probe, wildcard) = match pattern.strip_suffix('*') {
            Some(prefix) => {
                if !prefix.ends_with('/') {
                    return Err(format!(
                        "a `*` must stand for the whole last segment, e.g. \
                         spiffe://{trust_domain}/ns/default/sa/*"
                    ));
                }
                (format!("{prefix}x"), Some(prefix))
            }
            None => (pattern.to_owned(), None),
        };
        if probe.contains('*') {
            return Err("only a single trailing `*` is supported".to_owned());
        }
        let id = SpiffeId::parse(&probe).map_err(|e| e.to_string())?;
        if id.trust_domain() != trust_domain {
            return Err(format!(
                "it is outside trust domain {trust_domain} of this issuer's CA"
            ));
        }
        Ok(match wildcard {
            Some(prefix) => Self::LastSegment(prefix.to_owned()),
            None => Self::Exact(id),
        })
    }

    pub(crate) fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(exact) => exact == id,
            Self::LastSegment(prefix) => id
                .as_str()
                .strip_prefix(prefix.as_str())
                .is_some_and(|last| !last.is_empty() && !last.contains('/')),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Node {
    pub name: String,
    token_sha256: [u8; 32],
    patterns: Vec<IdPattern>,
}

impl Node {
    pub(crate) fn allows(&self, id: &SpiffeId) -> bool {
        self.patterns.iter().any(|p| p.matches(id))
    }
}

/// The parsed nodes file.
#[derive(Debug)]
pub(crate) struct Nodes {
    nodes: Vec<Node>,
}

impl Nodes {
    pub(crate) fn load(path: &Path, trust_domain: &str) -> Result<(Self, Vec<u8>), NodesError> {
        let bytes = fs::read(path).map_err(|source| NodesError::Read {
            path: path.to_owned(),
            source,
        })?;
        let nodes = Self::parse(&bytes, path, trust_domain)?;
        Ok((nodes, bytes))
    }

    pub(crate) fn parse(bytes: &[u8], path: &Path, trust_domain: &str) -> Result<Self, NodesError> {
        let toml_err = |message: String| NodesError::Toml {
            path: path.to_owned(),
            message,
        };
        let text = std::str::from_utf8(bytes).map_err(|e| toml_err(format!("not UTF-8: {e}")))?;
        let file: NodesToml = toml::from_str(text).map_err(|e| toml_err(e.to_string()))?;
        if let Some(found) = file.trust_domain
            && found != trust_domain
        {
            return Err(NodesError::TrustDomain {
                path: path.to_owned(),
                found,
                ca: trust_domain.to_owned(),
            });
        }
        let mut nodes: Vec<Node> = Vec::with_capacity(file.node.len());
        for entry in file.node {
            if let Err(e) = SpiffeId::node(trust_domain, &entry.name) {
                return Err(NodesError::BadName {
                    path: path.to_owned(),
                    name: entry.name,
                    reason: e.to_string(),
                });
            }
            if nodes.iter().any(|n| n.name == entry.name) {
                return Err(NodesError::DuplicateName {
                    path: path.to_owned(),
                    name: entry.name,
                });
            }
            let token_sha256 =
                parse_sha256(&entry.token_sha256).ok_or_else(|| NodesError::BadTokenHash {
                    path: path.to_owned(),
                    node: entry.name.clone(),
                })?;
            if let Some(other) = nodes.iter().find(|n| n.token_sha256 == token_sha256) {
                return Err(NodesError::DuplicateToken {
                    path: path.to_owned(),
                    first: other.name.clone(),
                    second: entry.name,
                });
            }
            let mut patterns = Vec::with_capacity(entry.identities.len());
            for pattern in &entry.identities {
                let parsed = IdPattern::parse(pattern, trust_domain).map_err(|reason| {
                    NodesError::BadPattern {
                        path: path.to_owned(),
                        node: entry.name.clone(),
                        pattern: pattern.clone(),
                        reason,
                    }
                })?;
                patterns.push(parsed);
            }
            nodes.push(Node {
                name: entry.name,
                token_sha256,
                patterns,
            });
        }
        Ok(Self { nodes })
    }

    /// The node whose token this is. Compares against every node in constant time per
    /// node, so the time taken does not reveal how much of a hash matched.
    pub(crate) fn authenticate(&self, token: &str) -> Option<&Node> {
        let presented = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut found = None;
        for node in &self.nodes {
            if constant_time_eq(presented.as_ref(), &node.token_sha256) {
                found = Some(node);
            }
        }
        found
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

// === CSR ===

/// The public key of a verified CSR. Only ECDSA P-256, the key type nodes generate.
pub(crate) struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Parses a PKCS#10 PEM, checks its self-signature and returns its key. Its subject and
/// extensions are ignored: the issuer decides what the certificate names.
pub(crate) fn csr_public_key(pem: &str) -> Result<CsrKey, String> {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("not a PEM `CERTIFICATE REQUEST` block: {e}"))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| format!("not a PKCS#10 certificate request: {e}"))?;
    csr.verify_signature().map_err(|e| {
        format!("its signature does not verify with its own key ({e}); the CSR is corrupt")
    })?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(format!(
            "its key is {} (parameters {:?}); node keys must be ECDSA P-256",
            spki.algorithm.algorithm,
            curve.map(|c| c.to_id_string())
        ));
    }
    Ok(CsrKey(spki.subject_public_key.data.to_vec()))
}

// === impl Issuer ===

/// A bound issuer, ready to [`run`](Issuer::run).
pub struct Issuer {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<State>,
    tls: Arc<ServerConfig>,
}

/// `proxy identity serve`: binds `listen` and serves until `stop` turns true (or its
/// sender is dropped).
pub async fn serve(
    ca_dir: PathBuf,
    listen: SocketAddr,
    nodes_file: PathBuf,
    lifetime: Duration,
    stop: watch::Receiver<bool>,
) -> Result<(), IssuerError> {
    Issuer::bind(ca_dir, listen, nodes_file, lifetime)
        .await?
        .run(stop)
        .await
}

impl Issuer {
    /// Loads the CA and the nodes file, issues the issuer's own certificate and binds.
    pub async fn bind(
        ca_dir: PathBuf,
        listen: SocketAddr,
        nodes_file: PathBuf,
        lifetime: Duration,
    ) -> Result<Self, IssuerError> {
        let ca = Ca::load(&ca_dir)?;
        let anchors_path = ca_dir.join(ca::ANCHORS_FILE);
        let (_, anchors_pem) = TrustAnchors::read(&anchors_path, ca.trust_domain())?;
        let (nodes, nodes_bytes) = Nodes::load(&nodes_file, ca.trust_domain())?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| IssuerError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| IssuerError::Bind {
            addr: listen,
            source,
        })?;
        let provider = super::provider();
        // An IP SAN for operators' tools; nodes check the SPIFFE ID, not the address.
        let ip = Some(local_addr.ip()).filter(|ip| !ip.is_unspecified());
        let server_cert = ServerCert::issue(&ca, ip, &provider)?;
        let state = Arc::new(State {
            ca_fingerprint: Mutex::new(ca_fingerprint(&ca_dir)),
            nodes_fingerprint: Mutex::new(nodes_bytes),
            ca_dir,
            nodes_file,
            lifetime,
            ip,
            provider: provider.clone(),
            ca: RwLock::new(Arc::new(ca)),
            anchors_pem: RwLock::new(Bytes::from(anchors_pem)),
            nodes: RwLock::new(Arc::new(nodes)),
            server_cert: RwLock::new(server_cert),
            issued_total: AtomicU64::new(0),
        });
        let mut tls = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(IssuerCertResolver(state.clone())));
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            listener,
            local_addr,
            state,
            tls: Arc::new(tls),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Serves until `stop` turns true or its sender is dropped.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), IssuerError> {
        // Resolves when `stop` turns true or its sender is gone. The borrow guard that
        // `wait_for` returns is dropped inside, so this future stays `Send`.
        let mut stopped = std::pin::pin!(async move {
            let _ = stop.wait_for(|stop| *stop).await.is_ok();
        });
        let acceptor = TlsAcceptor::from(self.tls);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connections = JoinSet::new();
        tracing::info!(
            listen = %self.local_addr,
            trust_domain = %self.state.ca().trust_domain(),
            "identity issuer serving"
        );
        loop {
            while connections.try_join_next().is_some() {}
            tokio::select! {
                () = &mut stopped => break,
                _ = poll.tick() => self.state.poll(),
                accepted = self.listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(conn) => conn,
                        Err(e) => {
                            // Out of file descriptors and the like: back off briefly.
                            tracing::warn!(error = %e, "issuer accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let acceptor = acceptor.clone();
                    let state = self.state.clone();
                    connections.spawn(async move {
                        serve_connection(acceptor, tcp, peer, state).await;
                    });
                }
            }
        }
        connections.abort_all();
        tracing::info!(
            issued_total = self.state.issued_total.load(Ordering::Relaxed),
            "identity issuer stopped"
        );
        Ok(())
    }
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "issuer TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "issuer TLS handshake timed out");
            return;
        }
    };
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "issuer connection ended with an error");
    }
}

// === impl State ===

/// The issuer's current CA, nodes and serving certificate, each swapped whole on change.
pub(crate) struct State {
    ca_dir: PathBuf,
    nodes_file: PathBuf,
    lifetime: Duration,
    ip: Option<IpAddr>,
    provider: Arc<CryptoProvider>,
    ca: RwLock<Arc<Ca>>,
    anchors_pem: RwLock<Bytes>,
    nodes: RwLock<Arc<Nodes>>,
    server_cert: RwLock<ServerCert>,
    /// sha256 of ca.key + ca.crt + anchors.pem as last read (not the key itself).
    ca_fingerprint: Mutex<Vec<u8>>,
    nodes_fingerprint: Mutex<Vec<u8>>,
    issued_total: AtomicU64,
}

struct ServerCert {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

impl ServerCert {
    fn issue(ca: &Ca, ip: Option<IpAddr>, provider: &CryptoProvider) -> Result<Self, IssuerError> {
        let id = SpiffeId::issuer(ca.trust_domain())
            .map_err(|e| IssuerError::ServerCert(e.to_string()))?;
        let now = SystemTime::now();
        let not_before = now.checked_sub(ca::CLOCK_SKEW).unwrap_or(now);
        let (issued, key) =
            ca.issue_with_new_key(&id, not_before, now + SERVER_CERT_LIFETIME, ip)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(issued.chain, key, provider)?;
        let life = issued.not_after.duration_since(now).unwrap_or_default();
        Ok(Self {
            key: Arc::new(certified),
            renew_at: now + life / 2,
        })
    }
}

fn read_lock<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn write_lock<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(|e| e.into_inner()) = value;
}

fn ca_fingerprint(dir: &Path) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for name in [ca::KEY_FILE, ca::CERT_FILE, ca::ANCHORS_FILE] {
        match fs::read(dir.join(name)) {
            Ok(bytes) => ctx.update(&bytes),
            Err(_) => ctx.update(b"\0missing\0"),
        }
    }
    ctx.finish().as_ref().to_vec()
}

impl State {
    fn ca(&self) -> Arc<Ca> {
        read_lock(&self.ca)
    }

    fn nodes(&self) -> Arc<Nodes> {
        read_lock(&self.nodes)
    }

    /// Picks up changes to the nodes file and the CA files, and renews the serving
    /// certificate at half-life. A broken file is reported once and the previous content
    /// stays in force.
    pub(crate) fn poll(&self) {
        self.poll_nodes();
        self.poll_ca();
        let renew_at = self
            .server_cert
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .renew_at;
        if SystemTime::now() >= renew_at {
            self.renew_server_cert();
        }
    }

    fn poll_nodes(&self) {
        let bytes = match fs::read(&self.nodes_file) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(path = %self.nodes_file.display(), error = %e, "cannot read the nodes file; keeping the previous one");
                return;
            }
        };
        {
            let mut last = self
                .nodes_fingerprint
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *last == bytes {
                return;
            }
            last.clone_from(&bytes);
        }
        match Nodes::parse(&bytes, &self.nodes_file, self.ca().trust_domain()) {
            Ok(nodes) => {
                tracing::info!(path = %self.nodes_file.display(), nodes = nodes.nodes.len(), "reloaded the nodes file");
                write_lock(&self.nodes, Arc::new(nodes));
            }
            Err(e) => tracing::warn!(error = %e, "keeping the previous nodes file"),
        }
    }

    fn poll_ca(&self) {
        let fingerprint = ca_fingerprint(&self.ca_dir);
        {
            let mut last = self
                .ca_fingerprint
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *last == fingerprint {
                return;
            }
            *last = fingerprint;
        }
        let loaded = Ca::load(&self.ca_dir)
            .map_err(IssuerError::from)
            .and_then(|ca| {
                let path = self.ca_dir.join(ca::ANCHORS_FILE);
                let (_, pem) = TrustAnchors::read(&path, ca.trust_domain())?;
                Ok((ca, pem))
            });
        match loaded {
            Ok((ca, pem)) => {
                tracing::info!(dir = %self.ca_dir.display(), "reloaded the CA");
                write_lock(&self.ca, Arc::new(ca));
                write_lock(&self.anchors_pem, Bytes::from(pem));
                self.renew_server_cert();
            }
            // Mid-rotation the key and certificate may briefly not match; the next poll
            // sees the finished state.
            Err(e) => tracing::warn!(error = %e, "keeping the previous CA"),
        }
    }

    fn renew_server_cert(&self) {
        match ServerCert::issue(&self.ca(), self.ip, &self.provider) {
            Ok(cert) => write_lock(&self.server_cert, cert),
            Err(e) => tracing::warn!(error = %e, "cannot renew the issuer's own certificate"),
        }
    }
}

#[derive(Debug)]
struct IssuerCertResolver(Arc<State>);

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("issuer::State")
            .field("ca_dir", &self.ca_dir)
            .field("nodes_file", &self.nodes_file)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for IssuerCertResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .server_cert
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .key
                .clone(),
        )
    }
}

// === request handling ===

struct Reject {
    status: StatusCode,
    message: String,
}

fn reject(status: StatusCode, message: impl Into<String>) -> Reject {
    Reject {
        status,
        message: message.into(),
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let result = match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/certificates") => issue(state, req).await,
        (&Method::GET, "/v1/anchors") => {
            let mut response = Response::new(Full::new(read_lock(&state.anchors_pem)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/x-pem-file"),
            );
            return response;
        }
        (_, "/v1/certificates") => Err(reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST /v1/certificates",
        )),
        (_, "/v1/anchors") => Err(reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET /v1/anchors",
        )),
        _ => Err(reject(
            StatusCode::NOT_FOUND,
            format!(
                "no such endpoint {path}; the issuer serves POST /v1/certificates and GET /v1/anchors"
            ),
        )),
    };
    match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(r) => json_response(r.status, &ErrorBody { error: r.message }),
    }
}

async fn issue(state: &State, req: Request<Incoming>) -> Result<IssueResponse, Reject> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            reject(
                StatusCode::UNAUTHORIZED,
                "missing `Authorization: Bearer <token>` header; the node sends the token from \
                 its token file",
            )
        })?;
    let nodes = state.nodes();
    let node = nodes.authenticate(token.trim()).ok_or_else(|| {
        reject(
            StatusCode::UNAUTHORIZED,
            format!(
                "unknown token; put the sha256 of the node's token (`proxy identity \
                 hash-token`) in token_sha256 of its entry in {}",
                state.nodes_file.display()
            ),
        )
    })?;
    let too_large = || {
        reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is over {MAX_BODY} bytes; send only the identity and a CSR"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            ));
        }
    };
    let request: IssueRequest = serde_json::from_slice(&body).map_err(|e| {
        reject(
            StatusCode::BAD_REQUEST,
            format!(
                "body is not JSON {{\"identity\": \"spiffe://...\", \"csr\": \"-----BEGIN \
                 CERTIFICATE REQUEST-----...\"}}: {e}"
            ),
        )
    })?;
    let id = SpiffeId::parse(&request.identity)
        .map_err(|e| reject(StatusCode::BAD_REQUEST, format!("identity: {e}")))?;
    let ca = state.ca();
    if id.trust_domain() != ca.trust_domain() {
        return Err(reject(
            StatusCode::FORBIDDEN,
            format!(
                "identity {id} is outside trust domain {} of this issuer",
                ca.trust_domain()
            ),
        ));
    }
    if !node.allows(&id) {
        tracing::warn!(node = %node.name, identity = %id, "refused a certificate the node is not allowed");
        return Err(reject(
            StatusCode::FORBIDDEN,
            format!(
                "node {} is not allowed identity {id}; add it (or a pattern such as \
                 spiffe://{}/ns/<namespace>/sa/*) to node {}'s identities in {}",
                node.name,
                ca.trust_domain(),
                node.name,
                state.nodes_file.display()
            ),
        ));
    }
    let key = csr_public_key(&request.csr)
        .map_err(|reason| reject(StatusCode::BAD_REQUEST, format!("csr: {reason}")))?;
    let issued = ca
        .issue_for_key(&key, &id, state.lifetime, None)
        .map_err(|e| reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    state.issued_total.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        node = %node.name,
        identity = %id,
        serial = %issued.serial_hex,
        not_after = %rfc3339(issued.not_after),
        "issued certificate"
    );
    Ok(IssueResponse {
        certificate_chain: issued.chain_pem,
        not_after: rfc3339(issued.not_after),
        serial: issued.serial_hex,
    })
}

/// For tests and the docs: the hash line of a nodes file entry.
#[cfg(test)]
pub(crate) fn nodes_entry(name: &str, token: &str, identities: &[&str]) -> String {
    let ids = identities
        .iter()
        .map(|i| format!("{i:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[node]]\nname = {name:?}\ntoken_sha256 = {:?}\nidentities = [{ids}]\n",
        super::token_hash(token)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn patterns_match_exactly_or_the_last_segment() -> TestResult {
        let wildcard = IdPattern::parse("spiffe://cluster.local/ns/default/sa/*", TD)?;
        let exact = IdPattern::parse("spiffe://cluster.local/ns/ebpf-mesh/sa/node-node1", TD)?;
        let id = |s: &str| SpiffeId::parse(s);
        assert!(wildcard.matches(&id("spiffe://cluster.local/ns/default/sa/web")?));
        assert!(!wildcard.matches(&id("spiffe://cluster.local/ns/default/sa/web/x")?));
        assert!(!wildcard.matches(&id("spiffe://cluster.local/ns/other/sa/web")?));
        assert!(!wildcard.matches(&id("spiffe://cluster.local/ns/defaultx/sa/web")?));
        assert!(exact.matches(&id("spiffe://cluster.local/ns/ebpf-mesh/sa/node-node1")?));
        assert!(!exact.matches(&id("spiffe://cluster.local/ns/ebpf-mesh/sa/node-node2")?));

        for (bad, want) in [
            (
                "spiffe://cluster.local/ns/default/sa/web*",
                "whole last segment",
            ),
            ("spiffe://cluster.local/ns/*/sa/web", "single trailing"),
            (
                "spiffe://other.domain/ns/default/sa/*",
                "outside trust domain",
            ),
            ("spiffe://cluster.local/ns//sa/*", "empty path segment"),
        ] {
            match IdPattern::parse(bad, TD) {
                Ok(p) => return Err(format!("{bad} parsed as {p:?}").into()),
                Err(e) => assert!(e.contains(want), "{bad}: {e}"),
            }
        }
        Ok(())
    }

    #[test]
    fn nodes_file_is_validated_and_tokens_authenticate() -> TestResult {
        let path = Path::new("/etc/nodes.toml");
        let text = format!(
            "trust_domain = \"cluster.local\"\n{}{}",
            nodes_entry(
                "node1",
                "tok-1",
                &["spiffe://cluster.local/ns/default/sa/*"]
            ),
            nodes_entry("node2", "tok-2", &[])
        );
        let nodes = Nodes::parse(text.as_bytes(), path, TD)?;
        assert_eq!(
            nodes.authenticate("tok-1").map(|n| n.name.as_str()),
            Some("node1")
        );
        assert_eq!(
            nodes.authenticate("tok-2").map(|n| n.name.as_str()),
            Some("node2")
        );
        assert!(nodes.authenticate("tok-3").is_none());
        assert!(nodes.authenticate("").is_none());

        let cases = [
            (
                format!(
                    "{}{}",
                    nodes_entry("a", "t", &[]),
                    nodes_entry("b", "t", &[])
                ),
                "share a token",
            ),
            (
                format!(
                    "{}{}",
                    nodes_entry("a", "t", &[]),
                    nodes_entry("a", "u", &[])
                ),
                "twice",
            ),
            (
                "[[node]]\nname = \"a\"\ntoken_sha256 = \"abc\"\n".to_owned(),
                "64 hex characters",
            ),
            (nodes_entry("a/b", "t", &[]), "node name"),
            (
                nodes_entry("a", "t", &["spiffe://x/ns/*/sa/b"]),
                "identity pattern",
            ),
            (
                "trust_domain = \"other\"\n".to_owned(),
                "the CA is for cluster.local",
            ),
            (
                "[[node]]\nname = \"a\"\ntoken = \"plain\"\n".to_owned(),
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            match Nodes::parse(text.as_bytes(), path, TD) {
                Ok(_) => return Err(format!("accepted:\n{text}").into()),
                Err(e) => assert!(e.to_string().contains(want), "{e}"),
            }
        }
        Ok(())
    }

    #[test]
    fn csr_parsing_rejects_garbage_and_tampering() -> TestResult {
        assert!(csr_public_key("hello").is_err_and(|e| e.contains("CERTIFICATE REQUEST")));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::new(vec!["example.com".to_owned()])?
            .serialize_request(&key)?;
        let good = csr_public_key(&csr.pem()?)?;
        assert_eq!(good.der_bytes(), key.public_key_raw());

        // Change one base64 character in the middle of the body: the DER changes, so the
        // self-signature (or the structure) must fail.
        let pem = csr.pem()?;
        let mid = (pem.len() / 2..pem.len())
            .find(|&i| pem.as_bytes().get(i).is_some_and(u8::is_ascii_alphanumeric))
            .ok_or("no base64 in the second half of the PEM")?;
        let replacement = if pem.get(mid..=mid) == Some("A") {
            "B"
        } else {
            "A"
        };
        let mut tampered = pem.clone();
        tampered.replace_range(mid..=mid, replacement);
        assert!(csr_public_key(&tampered).is_err());

        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let ed_csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&ed)?;
        assert!(csr_public_key(&ed_csr.pem()?).is_err_and(|e| e.contains("P-256")));
        Ok(())
    }
}
