//! The node side: [`IdentityManager`] gets, holds and renews a certificate per local
//! identity and builds the rustls configs that present and verify them.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use hyper::{Method, StatusCode};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::{
    ClientConfig, ServerConfig, SignatureScheme,
    client::{ResolvesClientCert, Resumption},
    crypto::CryptoProvider,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime},
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::task::{AbortHandle, JoinSet};

use super::{
    AnchorInfo, CertInfo, SpiffeId, VerifyError,
    ca::warn_if_readable,
    client::IssuerClient,
    issuer::{ErrorBody, IssueRequest, IssueResponse},
    sni_for,
    verify::{
        AnchorSet, AnchorsError, SpiffeClientVerifier, SpiffeServerVerifier, TrustAnchors, Usage,
    },
    x509,
};

/// Renew when this fraction of a certificate's lifetime has passed.
pub const DEFAULT_ROTATE_FRACTION: f64 = 0.5;

/// How often the anchors bundle is re-read (its content is compared, not its mtime).
const ANCHORS_POLL: Duration = Duration::from_secs(2);

/// Renewal retries: first after this, doubling up to `RETRY_MAX`.
const RETRY_INITIAL: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Never schedule a renewal sooner than this, so a certificate that is already due (clock
/// skew, tiny lifetimes) cannot make the loop spin.
const MIN_RENEW_DELAY: Duration = Duration::from_millis(100);

/// The ALPN of node-to-node connections.
const ALPN_H2: &[u8] = b"h2";

/// The node's identity settings, validated by [`IdentityManager::start`].
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub trust_domain: String,
    /// The issuer (`proxy identity serve --listen`).
    pub issuer: SocketAddr,
    /// The anchors bundle: authenticates the issuer and is the mesh's trust anchors.
    pub issuer_anchors: PathBuf,
    /// This node's issuer token (one line; mode 0600 recommended).
    pub token_file: PathBuf,
    pub node_name: String,
    /// Renew at this fraction of the lifetime, in (0, 1); default 0.5.
    pub rotate_fraction: f64,
}

impl IdentityConfig {
    /// A config with the default `rotate_fraction`.
    pub fn new(
        trust_domain: impl Into<String>,
        issuer: SocketAddr,
        issuer_anchors: impl Into<PathBuf>,
        token_file: impl Into<PathBuf>,
        node_name: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            issuer,
            issuer_anchors: issuer_anchors.into(),
            token_file: token_file.into(),
            node_name: node_name.into(),
            rotate_fraction: DEFAULT_ROTATE_FRACTION,
        }
    }
}

/// What went wrong getting or using this node's certificates.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid identity config {field} = {value:?}: {reason}")]
    Config {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "cannot read the issuer token {path}: {source}; write this node's token there (mode \
         0600) and its hash (`proxy identity hash-token`) into the issuer's nodes file",
        path = path.display()
    )]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "issuer token file {path} is empty; write this node's token into it",
        path = path.display()
    )]
    EmptyToken { path: PathBuf },
    #[error(transparent)]
    Anchors(#[from] AnchorsError),
    #[error(
        "cannot reach the identity issuer at {addr}: {reason}; is `proxy identity serve` \
         running and reachable from this node?"
    )]
    IssuerUnreachable { addr: SocketAddr, reason: String },
    #[error("issuer at {addr} refused a certificate for {identity}: {status} {message}")]
    IssuerRejected {
        addr: SocketAddr,
        identity: SpiffeId,
        status: u16,
        message: String,
    },
    #[error("issuer at {addr} sent an unusable answer for {identity}: {reason}")]
    IssuerResponse {
        addr: SocketAddr,
        identity: SpiffeId,
        reason: String,
    },
    #[error(
        "the certificate issued for {identity} does not verify against {anchors}: {source}; \
         does the issuer use the CA of this bundle?",
        anchors = anchors.display()
    )]
    IssuedCertInvalid {
        identity: SpiffeId,
        anchors: PathBuf,
        source: Box<VerifyError>,
    },
    #[error(
        "{identity} is not one of this node's identities; pass it to IdentityManager::start \
         or set_identities first"
    )]
    UnknownIdentity { identity: SpiffeId },
    #[error("cannot create a key or CSR: {0}")]
    Key(String),
    #[error("cannot build a TLS config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("peer identity: {0}")]
    Peer(Box<VerifyError>),
}

impl From<VerifyError> for IdentityError {
    fn from(e: VerifyError) -> Self {
        Self::Peer(Box::new(e))
    }
}

fn config_error(
    field: &'static str,
    value: impl fmt::Display,
    reason: impl Into<String>,
) -> IdentityError {
    IdentityError::Config {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

// === certificate store ===

/// A certificate and key for one identity.
struct Leaf {
    key: Arc<CertifiedKey>,
    info: CertInfo,
    /// When this node received it: renewal is scheduled from here.
    received_at: SystemTime,
}

#[derive(Default)]
struct Store {
    by_id: HashMap<SpiffeId, Arc<Leaf>>,
    by_sni: HashMap<String, Arc<CertifiedKey>>,
}

/// The current certificates, read per handshake by the resolvers.
struct Certs {
    node_id: SpiffeId,
    store: RwLock<Store>,
}

impl Certs {
    fn get(&self, id: &SpiffeId) -> Option<Arc<Leaf>> {
        self.store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .get(id)
            .cloned()
    }

    fn insert(&self, id: SpiffeId, leaf: Leaf) {
        let mut store = self.store.write().unwrap_or_else(|e| e.into_inner());
        store.by_sni.insert(sni_for(&id), leaf.key.clone());
        store.by_id.insert(id, Arc::new(leaf));
    }

    /// Replaces the certificate only if the identity is still wanted (a renewal may race
    /// with `set_identities` dropping it).
    fn replace(&self, id: &SpiffeId, leaf: Leaf) -> bool {
        let mut store = self.store.write().unwrap_or_else(|e| e.into_inner());
        if !store.by_id.contains_key(id) {
            return false;
        }
        store.by_sni.insert(sni_for(id), leaf.key.clone());
        store.by_id.insert(id.clone(), Arc::new(leaf));
        true
    }

    fn remove(&self, id: &SpiffeId) {
        let mut store = self.store.write().unwrap_or_else(|e| e.into_inner());
        store.by_sni.remove(&sni_for(id));
        store.by_id.remove(id);
    }

    fn ids(&self) -> Vec<SpiffeId> {
        let store = self.store.read().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<_> = store.by_id.keys().cloned().collect();
        ids.sort();
        ids
    }
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certs")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Serves the certificate of the local identity the client asked for by SNI, else the
/// node's own.
#[derive(Debug)]
struct ServerResolver(Arc<Certs>);

impl ResolvesServerCert for ServerResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self.0.store.read().unwrap_or_else(|e| e.into_inner());
        client_hello
            .server_name()
            .and_then(|sni| store.by_sni.get(sni))
            .cloned()
            .or_else(|| store.by_id.get(&self.0.node_id).map(|l| l.key.clone()))
    }
}

/// Presents the current certificate of one source identity.
#[derive(Debug)]
struct ClientResolver {
    certs: Arc<Certs>,
    source: SpiffeId,
}

impl ResolvesClientCert for ClientResolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.certs.get(&self.source).map(|l| l.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// === impl Inner ===

/// What the background tasks share with the manager.
struct Inner {
    cfg: IdentityConfig,
    provider: Arc<CryptoProvider>,
    anchors: Arc<AnchorSet>,
    /// sha256 of the anchors file as last read.
    anchors_digest: Mutex<Vec<u8>>,
    certs: Arc<Certs>,
    issuer: IssuerClient,
    rotations: AtomicU64,
    failures: AtomicU64,
}

impl Inner {
    fn read_token(&self) -> Result<String, IdentityError> {
        let path = &self.cfg.token_file;
        let token = std::fs::read_to_string(path).map_err(|source| IdentityError::TokenFile {
            path: path.clone(),
            source,
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(IdentityError::EmptyToken { path: path.clone() });
        }
        Ok(token.to_owned())
    }

    /// Gets a new certificate for `id`: a fresh key, a CSR, the issuer's answer checked
    /// against the current anchors.
    async fn fetch(&self, id: &SpiffeId) -> Result<Leaf, IdentityError> {
        let key_error = |e: rcgen::Error| IdentityError::Key(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(key_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // Informative only: the issuer sets the SAN itself.
        params.subject_alt_names = vec![SanType::URI(
            id.as_str().to_owned().try_into().map_err(key_error)?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(key_error)?;
        let body = serde_json::to_vec(&IssueRequest {
            identity: id.to_string(),
            csr,
        })
        .map_err(|e| IdentityError::Key(e.to_string()))?;
        let token = self.read_token()?;
        let addr = self.issuer.addr();
        let (status, bytes) = self
            .issuer
            .request(Method::POST, "/v1/certificates", Some(&token), body)
            .await
            .map_err(|reason| IdentityError::IssuerUnreachable { addr, reason })?;
        let bad_response = |reason: String| IdentityError::IssuerResponse {
            addr,
            identity: id.clone(),
            reason,
        };
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(512).collect());
            return Err(IdentityError::IssuerRejected {
                addr,
                identity: id.clone(),
                status: status.as_u16(),
                message,
            });
        }
        let response: IssueResponse = serde_json::from_slice(&bytes)
            .map_err(|e| bad_response(format!("not the expected JSON: {e}")))?;
        let chain =
            x509::certs_from_pem(response.certificate_chain.as_bytes()).map_err(bad_response)?;
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| bad_response("empty certificate_chain".to_owned()))?;
        let got = self
            .anchors
            .current()
            .verify(
                leaf,
                rest,
                UnixTime::now(),
                Usage::Client,
                &self.provider.signature_verification_algorithms,
            )
            .map_err(|source| IdentityError::IssuedCertInvalid {
                identity: id.clone(),
                anchors: self.cfg.issuer_anchors.clone(),
                source: Box::new(source),
            })?;
        if got != *id {
            return Err(bad_response(format!("the certificate is for {got}")));
        }
        let facts = x509::facts(leaf).map_err(bad_response)?;
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(chain, private, &self.provider)?;
        Ok(Leaf {
            key: Arc::new(certified),
            info: CertInfo {
                identity: id.clone(),
                serial_hex: facts.serial_hex,
                not_before: facts.not_before,
                not_after: facts.not_after,
            },
            received_at: SystemTime::now(),
        })
    }

    /// Re-reads the anchors bundle; `Ok(true)` when it changed and was swapped in.
    fn reload_anchors(&self) -> Result<bool, IdentityError> {
        let path = &self.cfg.issuer_anchors;
        let pem = std::fs::read(path).map_err(|source| AnchorsError::Read {
            path: path.clone(),
            source,
        })?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &pem)
            .as_ref()
            .to_vec();
        {
            let mut last = self
                .anchors_digest
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *last == digest {
                return Ok(false);
            }
            // Recorded even if the content is broken, so it is reported once, not per poll.
            *last = digest;
        }
        let anchors = TrustAnchors::from_pem(&pem, path, &self.cfg.trust_domain)?;
        tracing::info!(
            path = %path.display(),
            anchors = ?anchors.infos().iter().map(|a| a.subject.as_str()).collect::<Vec<_>>(),
            "reloaded trust anchors"
        );
        self.anchors.replace(anchors);
        Ok(true)
    }
}

/// When to renew a certificate received at `received_at` that expires at `not_after`.
fn renew_delay(
    received_at: SystemTime,
    not_after: SystemTime,
    fraction: f64,
    now: SystemTime,
) -> Duration {
    let life = not_after.duration_since(received_at).unwrap_or_default();
    let due = received_at + life.mul_f64(fraction);
    due.duration_since(now)
        .unwrap_or_default()
        .max(MIN_RENEW_DELAY)
}

async fn renew_loop(inner: Arc<Inner>, id: SpiffeId) {
    loop {
        let Some(current) = inner.certs.get(&id) else {
            return;
        };
        let delay = renew_delay(
            current.received_at,
            current.info.not_after,
            inner.cfg.rotate_fraction,
            SystemTime::now(),
        );
        tokio::time::sleep(delay).await;
        let mut backoff = RETRY_INITIAL;
        loop {
            match inner.fetch(&id).await {
                Ok(leaf) => {
                    tracing::info!(
                        identity = %id,
                        old_serial = %current.info.serial_hex,
                        serial = %leaf.info.serial_hex,
                        not_after = %x509::rfc3339(leaf.info.not_after),
                        "renewed certificate"
                    );
                    if !inner.certs.replace(&id, leaf) {
                        return;
                    }
                    inner.rotations.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    inner.failures.fetch_add(1, Ordering::Relaxed);
                    let expires_in = current
                        .info
                        .not_after
                        .duration_since(SystemTime::now())
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    tracing::warn!(
                        identity = %id,
                        error = %e,
                        retry_in_ms = backoff.as_millis() as u64,
                        current_expires_in_s = expires_in,
                        "certificate renewal failed; still serving the current certificate"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

async fn anchors_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(ANCHORS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = inner.reload_anchors() {
            tracing::warn!(error = %e, "keeping the previous trust anchors");
        }
    }
}

/// Fetches certificates for `ids` concurrently; all or nothing.
async fn fetch_all(
    inner: &Arc<Inner>,
    ids: Vec<SpiffeId>,
) -> Result<Vec<(SpiffeId, Leaf)>, IdentityError> {
    let mut set = JoinSet::new();
    for id in ids {
        let inner = inner.clone();
        set.spawn(async move {
            let leaf = inner.fetch(&id).await?;
            Ok::<_, IdentityError>((id, leaf))
        });
    }
    let mut leaves = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(pair)) => leaves.push(pair),
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(IdentityError::Key(format!(
                    "certificate fetch task failed: {e}"
                )));
            }
        }
    }
    Ok(leaves)
}

// === impl IdentityManager ===

/// Client configs are cached per (source, expected server).
type ClientKey = (SpiffeId, Option<SpiffeId>);

/// Holds this node's certificates (one per local identity plus the node's own), renews
/// them in the background, and builds the mutual-TLS configs that use them.
pub struct IdentityManager {
    inner: Arc<Inner>,
    node_id: SpiffeId,
    server_config: Arc<ServerConfig>,
    client_configs: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
    /// The renewal task of each identity.
    tasks: Mutex<HashMap<SpiffeId, AbortHandle>>,
    anchors_task: AbortHandle,
    /// Serializes `set_identities`.
    reconfigure: tokio::sync::Mutex<()>,
}

impl fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityManager")
            .field("node_id", &self.node_id)
            .field("identities", &self.inner.certs.ids())
            .finish_non_exhaustive()
    }
}

impl Drop for IdentityManager {
    fn drop(&mut self) {
        self.anchors_task.abort();
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            task.abort();
        }
    }
}

impl IdentityManager {
    /// Validates `cfg`, gets a certificate for the node identity and each of `identities`
    /// (so the proxy is not ready without them), then renews them in the background.
    pub async fn start(
        cfg: IdentityConfig,
        identities: Vec<SpiffeId>,
    ) -> Result<Arc<Self>, IdentityError> {
        super::validate_trust_domain(&cfg.trust_domain)
            .map_err(|e| config_error("trust_domain", &cfg.trust_domain, e.to_string()))?;
        let node_id = SpiffeId::node(&cfg.trust_domain, &cfg.node_name)
            .map_err(|e| config_error("node_name", &cfg.node_name, e.to_string()))?;
        if !(cfg.rotate_fraction > 0.0 && cfg.rotate_fraction < 1.0) {
            return Err(config_error(
                "rotate_fraction",
                cfg.rotate_fraction,
                "must be between 0 and 1 (exclusive); 0.5 renews at half-life",
            ));
        }
        check_domains(&cfg.trust_domain, &identities)?;
        warn_if_readable(&cfg.token_file);
        let provider = super::provider();
        let (anchors, pem) = TrustAnchors::read(&cfg.issuer_anchors, &cfg.trust_domain)?;
        let anchors = Arc::new(AnchorSet::new(anchors));
        let issuer_id = SpiffeId::issuer(&cfg.trust_domain)
            .map_err(|e| config_error("trust_domain", &cfg.trust_domain, e.to_string()))?;
        let issuer = IssuerClient::new(cfg.issuer, anchors.clone(), issuer_id, &provider)?;
        let certs = Arc::new(Certs {
            node_id: node_id.clone(),
            store: RwLock::new(Store::default()),
        });
        let inner = Arc::new(Inner {
            anchors_digest: Mutex::new(
                ring::digest::digest(&ring::digest::SHA256, &pem)
                    .as_ref()
                    .to_vec(),
            ),
            cfg,
            provider: provider.clone(),
            anchors: anchors.clone(),
            certs: certs.clone(),
            issuer,
            rotations: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        inner.read_token()?;

        let mut wanted = vec![node_id.clone()];
        for id in identities {
            if !wanted.contains(&id) {
                wanted.push(id);
            }
        }
        let leaves = fetch_all(&inner, wanted).await?;

        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                anchors,
                provider.signature_verification_algorithms,
            )))
            .with_cert_resolver(Arc::new(ServerResolver(certs)));
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No resumption: a resumed session skips certificate verification, so a rotated
        // anchor set or certificate would not apply to it.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let anchors_task = tokio::spawn(anchors_loop(inner.clone())).abort_handle();
        let manager = Arc::new(Self {
            inner,
            node_id,
            server_config: Arc::new(server),
            client_configs: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            anchors_task,
            reconfigure: tokio::sync::Mutex::new(()),
        });
        for (id, leaf) in leaves {
            manager.install(id, leaf);
        }
        Ok(manager)
    }

    fn install(&self, id: SpiffeId, leaf: Leaf) {
        tracing::info!(
            identity = %id,
            serial = %leaf.info.serial_hex,
            not_after = %x509::rfc3339(leaf.info.not_after),
            "got certificate"
        );
        self.inner.certs.insert(id.clone(), leaf);
        let task = tokio::spawn(renew_loop(self.inner.clone(), id.clone())).abort_handle();
        if let Some(old) = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, task)
        {
            old.abort();
        }
    }

    /// Replaces the local identities (config reload): fetches certificates for new ones
    /// and drops removed ones. The node identity always stays. All or nothing: if a new
    /// certificate cannot be had, nothing changes and the error is returned.
    pub async fn set_identities(&self, identities: Vec<SpiffeId>) -> Result<(), IdentityError> {
        let _guard = self.reconfigure.lock().await;
        check_domains(&self.inner.cfg.trust_domain, &identities)?;
        let mut wanted: HashSet<SpiffeId> = identities.into_iter().collect();
        wanted.insert(self.node_id.clone());
        let current: HashSet<SpiffeId> = self.inner.certs.ids().into_iter().collect();
        let added: Vec<SpiffeId> = wanted.difference(&current).cloned().collect();
        let leaves = fetch_all(&self.inner, added).await?;
        for (id, leaf) in leaves {
            self.install(id, leaf);
        }
        for id in current.difference(&wanted) {
            tracing::info!(identity = %id, "dropped identity");
            self.inner.certs.remove(id);
            if let Some(task) = self
                .tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id)
            {
                task.abort();
            }
            self.client_configs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(source, _), _| source != id);
        }
        Ok(())
    }

    /// The server side of node-to-node mTLS: TLS 1.3, ALPN h2, client certificates
    /// required and checked against the current anchors and trust domain; the certificate
    /// served is picked by SNI ([`sni_for`]), else the node's.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }

    /// The client side: presents `source`'s current certificate and accepts a server in our
    /// trust domain, equal to `expected_server` when given. Set the connection's server
    /// name to [`sni_for`]`(expected)` to reach that identity's certificate. Cached per
    /// (source, expected).
    pub fn client_config(
        &self,
        source: &SpiffeId,
        expected_server: Option<&SpiffeId>,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        if self.inner.certs.get(source).is_none() {
            return Err(IdentityError::UnknownIdentity {
                identity: source.clone(),
            });
        }
        let key = (source.clone(), expected_server.cloned());
        let mut cache = self
            .client_configs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(config) = cache.get(&key) {
            return Ok(config.clone());
        }
        let provider = &self.inner.provider;
        let verifier = SpiffeServerVerifier::new(
            self.inner.anchors.clone(),
            expected_server.cloned(),
            provider.signature_verification_algorithms,
        );
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(ClientResolver {
                certs: self.inner.certs.clone(),
                source: source.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = Resumption::disabled();
        let config = Arc::new(config);
        cache.insert(key, config.clone());
        Ok(config)
    }

    pub fn node_identity(&self) -> &SpiffeId {
        &self.node_id
    }

    pub fn trust_domain(&self) -> &str {
        &self.inner.cfg.trust_domain
    }

    /// Whether this node holds a certificate for `id` (cheap: no allocation).
    pub fn has_identity(&self, id: &SpiffeId) -> bool {
        self.inner
            .certs
            .store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .contains_key(id)
    }

    /// The identities this node holds certificates for, sorted.
    pub fn identities(&self) -> Vec<SpiffeId> {
        self.inner.certs.ids()
    }

    /// The current certificate of each identity, sorted by identity.
    pub fn certificates(&self) -> Vec<CertInfo> {
        let store = self
            .inner
            .certs
            .store
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut infos: Vec<CertInfo> = store.by_id.values().map(|l| l.info.clone()).collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }

    /// The current trust anchors.
    pub fn anchors(&self) -> Vec<AnchorInfo> {
        self.inner.anchors.current().infos().to_vec()
    }

    /// Successful renewals since start (first certificates not counted).
    pub fn rotations_total(&self) -> u64 {
        self.inner.rotations.load(Ordering::Relaxed)
    }

    /// Failed renewal attempts since start (each retry counts).
    pub fn rotation_failures_total(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Re-reads the anchors bundle now (the background task does it every 2 s); `Ok(true)`
    /// when it changed. A broken bundle leaves the current anchors in force.
    pub fn reload_anchors(&self) -> Result<bool, IdentityError> {
        self.inner.reload_anchors()
    }
}

fn check_domains(trust_domain: &str, ids: &[SpiffeId]) -> Result<(), IdentityError> {
    match ids.iter().find(|id| id.trust_domain() != trust_domain) {
        Some(id) => Err(config_error(
            "identities",
            id,
            format!("outside trust domain {trust_domain}; the mesh's CA cannot issue it"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_the_fraction_of_the_remaining_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_delay(t0, t0 + day, 0.5, t0), day / 2);
        assert_eq!(
            renew_delay(t0, t0 + day, 0.5, t0 + Duration::from_secs(3600)),
            day / 2 - Duration::from_secs(3600)
        );
        // Overdue or already expired: soon, but not a busy loop.
        assert_eq!(renew_delay(t0, t0 + day, 0.5, t0 + day), MIN_RENEW_DELAY);
        assert_eq!(renew_delay(t0 + day, t0, 0.5, t0 + day), MIN_RENEW_DELAY);
        assert_eq!(
            renew_delay(t0, t0 + Duration::from_secs(4), 0.5, t0),
            Duration::from_secs(2)
        );
    }
}
