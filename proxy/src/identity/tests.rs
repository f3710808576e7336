//! End-to-end tests: a real issuer on loopback, node managers fetching from it, and TLS 1.3
//! handshakes over loopback TCP with tokio-rustls.

use std::{
    error::Error,
    fs::{self, OpenOptions},
    io::Write,
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use hyper::{Method, StatusCode};
use rustls::{
    ClientConfig, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::{
    IdentityConfig, IdentityError, IdentityManager, SpiffeId,
    ca::{self, Ca},
    client::IssuerClient,
    issuer::{self, ErrorBody, IssueRequest, IssueResponse, Issuer, IssuerError},
    peer_identity, provider, sni_for,
    test_support::TempDir,
    verify::{AnchorSet, SpiffeServerVerifier, TrustAnchors},
    x509,
};

type TestResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

const TD: &str = "cluster.local";
const TOKEN1: &str = "token-of-node1";
const TOKEN2: &str = "token-of-node2";

fn id(s: &str) -> TestResult<SpiffeId> {
    Ok(SpiffeId::parse(s)?)
}

fn web() -> TestResult<SpiffeId> {
    id("spiffe://cluster.local/ns/default/sa/web")
}

fn api() -> TestResult<SpiffeId> {
    id("spiffe://cluster.local/ns/backend/sa/api")
}

// === a mesh: CA, nodes file, tokens, a running issuer ===

struct Mesh {
    tmp: TempDir,
    ca_dir: PathBuf,
    nodes_file: PathBuf,
    addr: SocketAddr,
    state: Arc<issuer::State>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), IssuerError>>>,
}

fn write_secret(path: &Path, text: &str) -> TestResult {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn nodes_text(node1_extra: &[&str]) -> String {
    let mut node1 = vec![
        "spiffe://cluster.local/ns/default/sa/*",
        "spiffe://cluster.local/ns/ebpf-mesh/sa/node-node1",
    ];
    node1.extend_from_slice(node1_extra);
    format!(
        "{}{}",
        issuer::nodes_entry("node1", TOKEN1, &node1),
        issuer::nodes_entry(
            "node2",
            TOKEN2,
            &[
                "spiffe://cluster.local/ns/backend/sa/*",
                "spiffe://cluster.local/ns/ebpf-mesh/sa/node-node2",
            ],
        )
    )
}

impl Mesh {
    async fn start(name: &str, lifetime: Duration) -> TestResult<Self> {
        let tmp = TempDir::new(name)?;
        let ca_dir = tmp.path().join("ca");
        ca::init(&ca_dir, TD, ca::DEFAULT_CA_LIFETIME, false)?;
        let nodes_file = tmp.path().join("nodes.toml");
        fs::write(&nodes_file, nodes_text(&[]))?;
        write_secret(&tmp.path().join("token-node1"), &format!("{TOKEN1}\n"))?;
        write_secret(&tmp.path().join("token-node2"), TOKEN2)?;
        let issuer = Issuer::bind(
            ca_dir.clone(),
            "127.0.0.1:0".parse()?,
            nodes_file.clone(),
            lifetime,
        )
        .await?;
        let addr = issuer.local_addr();
        let state = issuer.state();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(issuer.run(stop_rx));
        Ok(Self {
            tmp,
            ca_dir,
            nodes_file,
            addr,
            state,
            stop,
            task: Some(task),
        })
    }

    fn anchors_path(&self) -> PathBuf {
        self.ca_dir.join(ca::ANCHORS_FILE)
    }

    fn config(&self, node: &str) -> IdentityConfig {
        IdentityConfig::new(
            TD,
            self.addr,
            self.anchors_path(),
            self.tmp.path().join(format!("token-{node}")),
            node,
        )
    }

    async fn manager(&self, node: &str, ids: Vec<SpiffeId>) -> TestResult<Arc<IdentityManager>> {
        Ok(IdentityManager::start(self.config(node), ids).await?)
    }

    async fn stop_issuer(&mut self) -> TestResult {
        self.stop.send(true)?;
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }

    /// A raw HTTPS client for the issuer.
    fn client(&self) -> TestResult<IssuerClient> {
        let (anchors, _) = TrustAnchors::read(&self.anchors_path(), TD)?;
        Ok(IssuerClient::new(
            self.addr,
            Arc::new(AnchorSet::new(anchors)),
            SpiffeId::issuer(TD)?,
            &provider(),
        )?)
    }

    async fn post(
        &self,
        token: Option<&str>,
        identity: &str,
        csr: &str,
    ) -> TestResult<(StatusCode, Vec<u8>)> {
        let body = serde_json::to_vec(&IssueRequest {
            identity: identity.to_owned(),
            csr: csr.to_owned(),
        })?;
        let (status, bytes) = self
            .client()?
            .request(Method::POST, "/v1/certificates", token, body)
            .await?;
        Ok((status, bytes.to_vec()))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

/// A CSR whose subject and SANs claim something else than what will be requested.
fn csr_claiming(san_uri: &str) -> TestResult<String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(san_uri.to_owned().try_into()?));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    Ok(params.serialize_request(&key)?.pem()?)
}

// === TLS helpers ===

/// Runs one handshake over loopback TCP: (server side, client side).
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    sni: &str,
) -> TestResult<(
    std::io::Result<server::TlsStream<TcpStream>>,
    std::io::Result<client::TlsStream<TcpStream>>,
)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let name = ServerName::try_from(sni.to_owned())?;
    let server_side = async move {
        let (tcp, _) = listener.accept().await?;
        TlsAcceptor::from(server).accept(tcp).await
    };
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(client).connect(name, tcp).await
    };
    Ok(tokio::join!(server_side, client_side))
}

/// Echoes everything it reads until EOF.
fn spawn_echo(mut tls: server::TlsStream<TcpStream>) -> JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            tls.write_all(buf.get(..n).unwrap_or_default()).await?;
            tls.flush().await?;
        }
    })
}

async fn ping(tls: &mut client::TlsStream<TcpStream>, msg: &[u8]) -> TestResult {
    tls.write_all(msg).await?;
    tls.flush().await?;
    let mut back = vec![0u8; msg.len()];
    tls.read_exact(&mut back).await?;
    assert_eq!(back, msg);
    Ok(())
}

fn leaf_serial(certs: Option<&[CertificateDer<'_>]>) -> TestResult<String> {
    let leaf = certs.and_then(|c| c.first()).ok_or("no peer certificate")?;
    Ok(x509::facts(leaf)?.serial_hex)
}

/// A client config presenting a fixed certificate (not from a manager).
fn static_client(
    mesh: &Mesh,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> TestResult<Arc<ClientConfig>> {
    let (anchors, _) = TrustAnchors::read(&mesh.anchors_path(), TD)?;
    let provider = provider();
    let verifier = SpiffeServerVerifier::new(
        Arc::new(AnchorSet::new(anchors)),
        None,
        provider.signature_verification_algorithms,
    );
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn static_client_from_files(mesh: &Mesh, dir: &Path) -> TestResult<Arc<ClientConfig>> {
    let chain = x509::certs_from_pem(&fs::read(dir.join("cert.pem"))?)?;
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem"))?;
    static_client(mesh, chain, key)
}

/// Polls `done` every 50 ms until it holds or `deadline` passes.
async fn wait_until(deadline: SystemTime, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if SystemTime::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === the issuer ===

#[tokio::test]
async fn issuer_issues_only_what_the_token_allows() -> TestResult {
    let mesh = Mesh::start("issuer", Duration::from_secs(3600)).await?;
    let web = web()?;

    // The CSR claims kube-system/admin and a DNS name; the certificate names only `web`.
    let csr = csr_claiming("spiffe://cluster.local/ns/kube-system/sa/admin")?;
    let (status, body) = mesh.post(Some(TOKEN1), web.as_str(), &csr).await?;
    assert_eq!(status, StatusCode::OK, "{}", error_message(&body));
    let response: IssueResponse = serde_json::from_slice(&body)?;
    let chain = x509::certs_from_pem(response.certificate_chain.as_bytes())?;
    assert_eq!(chain.len(), 2, "leaf + CA");
    let leaf = x509::facts(chain.first().ok_or("empty chain")?)?;
    assert_eq!(leaf.uris, vec![web.to_string()]);
    assert_eq!(leaf.serial_hex, response.serial);
    assert!(leaf.serial_hex.len() >= 16, "serial has ≥ 64 bits");
    assert!(!leaf.subject.contains("admin"), "subject {}", leaf.subject);
    let not_after = time::OffsetDateTime::parse(
        &response.not_after,
        &time::format_description::well_known::Rfc3339,
    )?;
    assert_eq!(SystemTime::from(not_after), leaf.not_after);
    assert_eq!(
        leaf.not_after.duration_since(leaf.not_before)?,
        Duration::from_secs(3600) + ca::CLOCK_SKEW
    );

    let (status, body) = mesh.post(Some("wrong-token"), web.as_str(), &csr).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error_message(&body).contains("unknown token"));
    let (status, _) = mesh.post(None, web.as_str(), &csr).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let admin = "spiffe://cluster.local/ns/kube-system/sa/admin";
    let (status, body) = mesh.post(Some(TOKEN1), admin, &csr).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let message = error_message(&body);
    assert!(
        message.contains("node node1") && message.contains(admin),
        "{message}"
    );
    // node2 may not have node1's identity either.
    let (status, _) = mesh
        .post(
            Some(TOKEN2),
            "spiffe://cluster.local/ns/ebpf-mesh/sa/node-node1",
            &csr,
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = mesh
        .post(
            Some(TOKEN1),
            "spiffe://other.domain/ns/default/sa/web",
            &csr,
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(error_message(&body).contains("outside trust domain"));

    let (status, body) = mesh.post(Some(TOKEN1), web.as_str(), "garbage").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_message(&body).starts_with("csr:"),
        "{}",
        error_message(&body)
    );
    let (status, body) = mesh
        .post(Some(TOKEN1), "spiffe://cluster.local", &csr)
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body).contains("has no path"));
    let (status, _) = mesh
        .client()?
        .request(
            Method::POST,
            "/v1/certificates",
            Some(TOKEN1),
            b"{not json".to_vec(),
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let huge = "x".repeat(issuer::MAX_BODY + 1);
    let (status, _) = mesh.post(Some(TOKEN1), web.as_str(), &huge).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, anchors) = mesh
        .client()?
        .request(Method::GET, "/v1/anchors", None, Vec::new())
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(anchors.to_vec(), fs::read(mesh.anchors_path())?);

    // The nodes file is reloaded when it changes.
    fs::write(&mesh.nodes_file, nodes_text(&[admin]))?;
    mesh.state.poll();
    let (status, body) = mesh.post(Some(TOKEN1), admin, &csr).await?;
    assert_eq!(status, StatusCode::OK, "{}", error_message(&body));
    // A broken nodes file leaves the previous one in force.
    fs::write(&mesh.nodes_file, "[[node]]\nname = 1\n")?;
    mesh.state.poll();
    let (status, _) = mesh.post(Some(TOKEN1), admin, &csr).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

// === managers and handshakes ===

#[tokio::test]
async fn managers_complete_mutual_tls_and_see_each_others_identity() -> TestResult {
    let mesh = Mesh::start("mtls", Duration::from_secs(3600)).await?;
    let (web, api) = (web()?, api()?);
    let node1 = mesh.manager("node1", vec![web.clone()]).await?;
    let node2 = mesh.manager("node2", vec![api.clone()]).await?;

    let certs = node1.certificates();
    let ids: Vec<_> = certs.iter().map(|c| c.identity.to_string()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/ebpf-mesh/sa/node-node1",
        ]
    );
    assert!(certs.iter().all(|c| c.not_after > c.not_before));
    assert_eq!(node1.anchors().len(), 1);
    assert!(node1.has_identity(&web) && !node1.has_identity(&api));
    assert_eq!(
        node1.node_identity().as_str(),
        "spiffe://cluster.local/ns/ebpf-mesh/sa/node-node1"
    );

    // web → api, asking for api by SNI.
    let client = node1.client_config(&web, Some(&api))?;
    let (server, client) = handshake(node2.server_config(), client, &sni_for(&api)).await?;
    let (server, mut client) = (server?, client?);
    let (_, s) = server.get_ref();
    assert_eq!(s.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(
        peer_identity(s.peer_certificates().unwrap_or_default())?,
        web
    );
    let (_, c) = client.get_ref();
    assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        peer_identity(c.peer_certificates().unwrap_or_default())?,
        api
    );
    let echo = spawn_echo(server);
    ping(&mut client, b"hello over mTLS").await?;
    client.shutdown().await?;
    echo.await??;

    // An SNI that names no local identity gets the node's certificate.
    let node2_id = node2.node_identity().clone();
    let client = node1.client_config(&web, Some(&node2_id))?;
    let (server, client) = handshake(node2.server_config(), client, "other.mesh.internal").await?;
    let (_, c) = client?.into_inner();
    assert_eq!(
        peer_identity(c.peer_certificates().unwrap_or_default())?,
        node2_id
    );
    drop(server);

    // Expecting someone else than the server is refused by the client.
    let wrong = id("spiffe://cluster.local/ns/backend/sa/db")?;
    let client = node1.client_config(&web, Some(&wrong))?;
    let (_, client) = handshake(node2.server_config(), client, &sni_for(&api)).await?;
    let err = client
        .err()
        .ok_or("handshake with the wrong server succeeded")?;
    let msg = err.to_string();
    assert!(
        msg.contains("expected spiffe://cluster.local/ns/backend/sa/db"),
        "{msg}"
    );
    assert!(
        msg.contains("presented spiffe://cluster.local/ns/backend/sa/api"),
        "{msg}"
    );

    // Only local identities can be a source.
    assert!(matches!(
        node1.client_config(&api, None),
        Err(IdentityError::UnknownIdentity { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn server_rejects_untrusted_expired_and_foreign_client_certs() -> TestResult {
    let mesh = Mesh::start("reject", Duration::from_secs(3600)).await?;
    let node2 = mesh.manager("node2", vec![api()?]).await?;
    let sni = sni_for(&api()?);
    let now = SystemTime::now();

    let expect_rejected = async |client: Arc<ClientConfig>, want: &str| -> TestResult {
        let (server, _) = handshake(node2.server_config(), client, &sni).await?;
        let err = server
            .err()
            .ok_or("server accepted the client")?
            .to_string();
        assert!(
            err.contains(want),
            "server error {err:?} does not mention {want:?}"
        );
        Ok(())
    };

    // Same trust domain, another CA.
    let other_ca = mesh.tmp.path().join("other-ca");
    ca::init(&other_ca, TD, ca::DEFAULT_CA_LIFETIME, false)?;
    let out = mesh.tmp.path().join("other-leaf");
    ca::issue(
        &other_ca,
        &web()?,
        now,
        now + Duration::from_secs(600),
        &out,
    )?;
    expect_rejected(
        static_client_from_files(&mesh, &out)?,
        "not among the trust anchors",
    )
    .await?;

    // From the mesh CA, but expired.
    let out = mesh.tmp.path().join("expired-leaf");
    ca::issue(
        &mesh.ca_dir,
        &web()?,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
        &out,
    )?;
    expect_rejected(static_client_from_files(&mesh, &out)?, "expired at").await?;

    // From the mesh CA, but for another trust domain (only a test can make one).
    let foreign = id("spiffe://other.domain/ns/default/sa/web")?;
    let (issued, key) =
        Ca::load(&mesh.ca_dir)?.issue_any_domain(&foreign, now, now + Duration::from_secs(600))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    expect_rejected(
        static_client(&mesh, issued.chain, key)?,
        "certificate for spiffe://other.domain/ns/default/sa/web is outside trust domain cluster.local",
    )
    .await?;

    // A valid certificate from the mesh CA is accepted by the same server.
    let out = mesh.tmp.path().join("good-leaf");
    ca::issue(
        &mesh.ca_dir,
        &web()?,
        now,
        now + Duration::from_secs(600),
        &out,
    )?;
    let (server, _) = handshake(
        node2.server_config(),
        static_client_from_files(&mesh, &out)?,
        &sni,
    )
    .await?;
    let (_, s) = server?.into_inner();
    assert_eq!(
        peer_identity(s.peer_certificates().unwrap_or_default())?,
        web()?
    );
    Ok(())
}

#[tokio::test]
async fn rotation_presents_a_new_certificate_and_keeps_established_connections() -> TestResult {
    let mesh = Mesh::start("rotate", Duration::from_secs(4)).await?;
    let (web, api) = (web()?, api()?);
    let node1 = mesh.manager("node1", vec![web.clone()]).await?;
    let node2 = mesh.manager("node2", vec![api.clone()]).await?;
    let client_config = node1.client_config(&web, Some(&api))?;

    let (server, client) =
        handshake(node2.server_config(), client_config.clone(), &sni_for(&api)).await?;
    let (server, mut established) = (server?, client?);
    let old_server_serial = leaf_serial(established.get_ref().1.peer_certificates())?;
    let old_client_serial = leaf_serial(server.get_ref().1.peer_certificates())?;
    let echo = spawn_echo(server);
    ping(&mut established, b"before rotation").await?;

    // Renewal is due at half the 4 s lifetime; wait for it, bounded by the expiry of the
    // certificates (after which waiting is pointless).
    let serial_of = |m: &IdentityManager, id: &SpiffeId| {
        m.certificates()
            .into_iter()
            .find(|c| c.identity == *id)
            .map(|c| (c.serial_hex, c.not_after))
    };
    let (_, api_expiry) = serial_of(&node2, &api).ok_or("api has no certificate")?;
    let (_, web_expiry) = serial_of(&node1, &web).ok_or("web has no certificate")?;
    let deadline = api_expiry.max(web_expiry) + Duration::from_secs(1);
    let renewed = wait_until(deadline, || {
        serial_of(&node2, &api).is_some_and(|(s, _)| s != old_server_serial)
            && serial_of(&node1, &web).is_some_and(|(s, _)| s != old_client_serial)
    })
    .await;
    assert!(
        renewed,
        "no renewal before expiry: {} rotations, {} failures",
        node1.rotations_total() + node2.rotations_total(),
        node1.rotation_failures_total() + node2.rotation_failures_total()
    );
    assert!(node1.rotations_total() >= 1 && node2.rotations_total() >= 1);

    // A new handshake presents the new certificates, in both directions.
    let (server, client) = handshake(node2.server_config(), client_config, &sni_for(&api)).await?;
    let (server, client) = (server?, client?);
    let new_server_serial = leaf_serial(client.get_ref().1.peer_certificates())?;
    let new_client_serial = leaf_serial(server.get_ref().1.peer_certificates())?;
    assert_ne!(new_server_serial, old_server_serial);
    assert_ne!(new_client_serial, old_client_serial);
    assert_eq!(
        peer_identity(client.get_ref().1.peer_certificates().unwrap_or_default())?,
        api
    );

    // The connection established before keeps working.
    ping(&mut established, b"after rotation").await?;
    established.shutdown().await?;
    echo.await??;
    Ok(())
}

#[tokio::test]
async fn renewal_failure_keeps_the_current_certificate() -> TestResult {
    let mut mesh = Mesh::start("renew-fail", Duration::from_secs(4)).await?;
    let web = web()?;
    let node1 = mesh.manager("node1", vec![web.clone()]).await?;
    let before = node1.certificates();
    mesh.stop_issuer().await?;

    let expiry = before
        .iter()
        .map(|c| c.not_after)
        .max()
        .ok_or("no certificates")?;
    let failed = wait_until(expiry + Duration::from_secs(1), || {
        node1.rotation_failures_total() >= 1
    })
    .await;
    assert!(failed, "no failed renewal was counted");
    assert_eq!(node1.rotations_total(), 0);
    assert_eq!(
        node1.certificates(),
        before,
        "the current certificates stay in place"
    );
    // The old certificate is still presented.
    assert!(node1.client_config(&web, None).is_ok());
    Ok(())
}

#[tokio::test]
async fn ca_rollover_needs_no_restart() -> TestResult {
    let mesh = Mesh::start("rollover", Duration::from_secs(3600)).await?;
    let (web, api) = (web()?, api()?);
    let node1 = mesh.manager("node1", vec![web.clone()]).await?;
    let node2 = mesh.manager("node2", vec![api.clone()]).await?;

    // Rotate: nodes pick up the two-anchor bundle, the issuer signs with the new key.
    let rotated = ca::rotate(&mesh.ca_dir)?;
    assert!(node1.reload_anchors()?);
    assert!(node2.reload_anchors()?);
    assert!(
        !node1.reload_anchors()?,
        "unchanged content is not reloaded"
    );
    assert_eq!(node1.anchors().len(), 2);
    mesh.state.poll();

    // node2 gets a new identity from the new CA; web still holds an old-CA certificate.
    let api2 = id("spiffe://cluster.local/ns/backend/sa/api2")?;
    node2
        .set_identities(vec![api.clone(), api2.clone()])
        .await?;
    let client = node1.client_config(&web, Some(&api2))?;
    let (server, client) =
        handshake(node2.server_config(), client.clone(), &sni_for(&api2)).await?;
    let (server, client) = (server?, client?);
    let api2_cert = client
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no cert")?;
    let issuer = x509::facts(api2_cert)?.issuer;
    assert_eq!(issuer, rotated.subject, "api2 comes from the new CA");
    assert_eq!(
        peer_identity(server.get_ref().1.peer_certificates().unwrap_or_default())?,
        web
    );

    // Retire the old anchor: web's old-CA certificate is now refused, with a message
    // naming its issuer.
    let old_subject = rotated
        .anchors
        .get(1)
        .map(|a| a.subject.clone())
        .ok_or("no old anchor")?;
    ca::retire_previous(&mesh.ca_dir)?;
    assert!(node2.reload_anchors()?);
    assert_eq!(node2.anchors().len(), 1);
    let client = node1.client_config(&web, Some(&api2))?;
    let (server, _) = handshake(node2.server_config(), client, &sni_for(&api2)).await?;
    let err = server
        .err()
        .ok_or("old-CA certificate accepted after retire")?
        .to_string();
    assert!(
        err.contains(&old_subject) && err.contains("not among the trust anchors"),
        "{err}"
    );

    // Dropping an identity removes its certificate.
    node2.set_identities(vec![api2.clone()]).await?;
    assert_eq!(
        node2.identities(),
        vec![api2.clone(), node2.node_identity().clone()]
    );
    assert!(matches!(
        node2.client_config(&api, None),
        Err(IdentityError::UnknownIdentity { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn start_fails_clearly_without_a_usable_token_or_authorization() -> TestResult {
    let mesh = Mesh::start("start-errors", Duration::from_secs(3600)).await?;

    let mut cfg = mesh.config("node1");
    cfg.token_file = mesh.tmp.path().join("missing-token");
    let err = IdentityManager::start(cfg, vec![])
        .await
        .err()
        .ok_or("started")?;
    assert!(matches!(err, IdentityError::TokenFile { .. }), "{err}");
    assert!(err.to_string().contains("hash-token"), "{err}");

    let mut cfg = mesh.config("node1");
    write_secret(&mesh.tmp.path().join("bad-token"), "not-a-token")?;
    cfg.token_file = mesh.tmp.path().join("bad-token");
    let err = IdentityManager::start(cfg, vec![])
        .await
        .err()
        .ok_or("started")?;
    assert!(
        matches!(err, IdentityError::IssuerRejected { status: 401, .. }),
        "{err}"
    );

    // node1 may not have backend identities: start names the node and the identity.
    let err = IdentityManager::start(mesh.config("node1"), vec![api()?])
        .await
        .err()
        .ok_or("started")?
        .to_string();
    assert!(
        err.contains("403") && err.contains("node node1") && err.contains(api()?.as_str()),
        "{err}"
    );

    let mut cfg = mesh.config("node1");
    cfg.rotate_fraction = 1.5;
    let err = IdentityManager::start(cfg, vec![])
        .await
        .err()
        .ok_or("started")?;
    assert!(err.to_string().contains("rotate_fraction"), "{err}");

    let mut cfg = mesh.config("node1");
    cfg.issuer_anchors = mesh.tmp.path().join("no-anchors.pem");
    let err = IdentityManager::start(cfg, vec![])
        .await
        .err()
        .ok_or("started")?;
    assert!(
        err.to_string().contains("cannot read trust anchors"),
        "{err}"
    );

    let err = IdentityManager::start(
        mesh.config("node1"),
        vec![id("spiffe://other.domain/ns/default/sa/web")?],
    )
    .await
    .err()
    .ok_or("started")?;
    assert!(err.to_string().contains("outside trust domain"), "{err}");
    Ok(())
}
