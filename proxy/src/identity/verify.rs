//! Verifying peers: a certificate chain must lead to one of the current trust anchors and
//! its leaf must carry exactly one SPIFFE ID, in our trust domain. One code path serves both
//! directions (the rustls client and server verifiers below) so the checks cannot drift.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use super::{
    AnchorInfo, SpiffeId, SpiffeIdError,
    x509::{self, rfc3339},
};

/// Why a peer certificate was refused. Each message names the certificate and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("peer sent no certificate; mesh peers must present their SPIFFE certificate")]
    NoCertificate,
    #[error("peer certificate is malformed: {reason}")]
    Malformed { reason: String },
    #[error(
        "certificate {subject:?} has no spiffe:// URI SAN; mesh peers present a certificate \
         issued by `proxy identity serve`"
    )]
    NoSpiffeId { subject: String },
    #[error("certificate has several URI SANs ({uris}); a SPIFFE certificate has exactly one")]
    SeveralUris { uris: String },
    #[error("certificate URI SAN {uri:?} is not a valid SPIFFE ID: {source}")]
    BadSpiffeId { uri: String, source: SpiffeIdError },
    #[error(
        "certificate for {id} is outside trust domain {trust_domain}; issue it from this \
         mesh's CA"
    )]
    OutsideTrustDomain { id: SpiffeId, trust_domain: String },
    #[error("certificate for {id} is a CA certificate; peers must present a leaf certificate")]
    CaAsLeaf { id: SpiffeId },
    #[error(
        "certificate for {id} (serial {serial}) expired at {not_after} (now {now}); the \
         peer must renew it (is its issuer reachable?)"
    )]
    Expired {
        id: SpiffeId,
        serial: String,
        not_after: String,
        now: String,
    },
    #[error(
        "certificate for {id} is not valid before {not_before} (now {now}); check the clocks \
         of both hosts"
    )]
    NotYetValid {
        id: SpiffeId,
        not_before: String,
        now: String,
    },
    #[error(
        "certificate for {id} was issued by {issuer:?}, which is not among the trust anchors \
         in {source_path} ({anchors}); if the CA was rotated, renew the certificate or keep \
         the previous anchor until every certificate it issued is renewed"
    )]
    UnknownIssuer {
        id: SpiffeId,
        issuer: String,
        source_path: PathBuf,
        anchors: String,
    },
    #[error(
        "trust anchor {anchor:?} expired at {not_after}; roll the CA over with \
         `proxy ca rotate`"
    )]
    AnchorExpired { anchor: String, not_after: String },
    #[error(
        "server presented {got}, expected {expected}; the connection reached the wrong \
         workload (stale endpoint or misrouted traffic)"
    )]
    WrongIdentity { expected: SpiffeId, got: SpiffeId },
    #[error("certificate chain for {id} rejected: {reason}")]
    Chain { id: SpiffeId, reason: String },
}

/// Why a trust anchor bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AnchorsError {
    #[error(
        "cannot read trust anchors {path}: {source}; pass the bundle written by `proxy ca \
         init` (<ca-dir>/anchors.pem) or saved from the issuer's GET /v1/anchors"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trust anchors {path}: {reason}; the file must hold PEM CERTIFICATE blocks")]
    Pem { path: PathBuf, reason: String },
    #[error(
        "trust anchors {path} hold no CERTIFICATE block; pass the bundle written by \
         `proxy ca init`"
    )]
    Empty { path: PathBuf },
    #[error("certificate #{index} in {path} cannot be a trust anchor: {reason}")]
    NotAnAnchor {
        path: PathBuf,
        index: usize,
        reason: String,
    },
}

/// Which side a certificate authenticates: selects the extended key usage checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Usage {
    Client,
    Server,
}

// === impl TrustAnchors ===

/// A parsed trust anchor bundle. During a CA rollover it holds the old and the new anchor
/// and certificates from either verify.
pub(crate) struct TrustAnchors {
    source: PathBuf,
    trust_domain: String,
    anchors: Vec<TrustAnchor<'static>>,
    infos: Vec<AnchorInfo>,
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("source", &self.source)
            .field("trust_domain", &self.trust_domain)
            .field("anchors", &self.infos)
            .finish()
    }
}

impl TrustAnchors {
    /// Reads a bundle file.
    pub(crate) fn read(path: &Path, trust_domain: &str) -> Result<(Self, Vec<u8>), AnchorsError> {
        let pem = std::fs::read(path).map_err(|source| AnchorsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let anchors = Self::from_pem(&pem, path, trust_domain)?;
        Ok((anchors, pem))
    }

    /// Parses a bundle; `source` names it in messages.
    pub(crate) fn from_pem(
        pem: &[u8],
        source: &Path,
        trust_domain: &str,
    ) -> Result<Self, AnchorsError> {
        let certs = x509::certs_from_pem(pem).map_err(|reason| AnchorsError::Pem {
            path: source.to_owned(),
            reason,
        })?;
        if certs.is_empty() {
            return Err(AnchorsError::Empty {
                path: source.to_owned(),
            });
        }
        let mut anchors = Vec::with_capacity(certs.len());
        let mut infos = Vec::with_capacity(certs.len());
        for (i, cert) in certs.iter().enumerate() {
            let not_an_anchor = |reason: String| AnchorsError::NotAnAnchor {
                path: source.to_owned(),
                index: i + 1,
                reason,
            };
            let facts = x509::facts(cert).map_err(not_an_anchor)?;
            if !facts.is_ca {
                return Err(not_an_anchor(format!(
                    "{:?} is not a CA certificate (basicConstraints CA:FALSE or missing)",
                    facts.subject
                )));
            }
            let anchor = webpki::anchor_from_trusted_cert(cert)
                .map_err(|e| not_an_anchor(format!("{e:?}")))?
                .to_owned();
            anchors.push(anchor);
            infos.push(AnchorInfo {
                subject: facts.subject,
                not_after: facts.not_after,
            });
        }
        Ok(Self {
            source: source.to_owned(),
            trust_domain: trust_domain.to_owned(),
            anchors,
            infos,
        })
    }

    pub(crate) fn infos(&self) -> &[AnchorInfo] {
        &self.infos
    }

    /// Verifies a peer's chain at `now` and returns its SPIFFE ID.
    pub(crate) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
        algs: &WebPkiSupportedAlgorithms,
    ) -> Result<SpiffeId, VerifyError> {
        let facts = x509::facts(end_entity).map_err(|reason| VerifyError::Malformed { reason })?;
        // The SAN checks come first: they are cheap and give the clearest message for a
        // certificate from another mesh.
        let id = x509::spiffe_id_of(&facts)?;
        if id.trust_domain() != self.trust_domain {
            return Err(VerifyError::OutsideTrustDomain {
                id,
                trust_domain: self.trust_domain.clone(),
            });
        }
        if facts.is_ca {
            return Err(VerifyError::CaAsLeaf { id });
        }
        let cert =
            webpki::EndEntityCert::try_from(end_entity).map_err(|e| VerifyError::Malformed {
                reason: format!("{e:?}"),
            })?;
        let eku = match usage {
            Usage::Client => webpki::KeyUsage::client_auth(),
            Usage::Server => webpki::KeyUsage::server_auth(),
        };
        let path = cert
            .verify_for_usage(algs.all, &self.anchors, intermediates, now, eku, None, None)
            .map_err(|e| self.explain(e, &id, &facts, now))?;
        // webpki does not look at an anchor's own validity; we do, so an expired CA is
        // reported as such instead of silently trusted.
        let anchor = path.anchor();
        if let Some(info) = self
            .anchors
            .iter()
            .position(|a| {
                a.subject == anchor.subject
                    && a.subject_public_key_info == anchor.subject_public_key_info
            })
            .and_then(|i| self.infos.get(i))
            && to_unix(info.not_after) < now.as_secs()
        {
            return Err(VerifyError::AnchorExpired {
                anchor: info.subject.clone(),
                not_after: rfc3339(info.not_after),
            });
        }
        Ok(id)
    }

    fn explain(
        &self,
        e: webpki::Error,
        id: &SpiffeId,
        facts: &x509::CertFacts,
        now: UnixTime,
    ) -> VerifyError {
        let now_text =
            rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs()));
        match e {
            webpki::Error::CertExpired { .. } => VerifyError::Expired {
                id: id.clone(),
                serial: facts.serial_hex.clone(),
                not_after: rfc3339(facts.not_after),
                now: now_text,
            },
            webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid {
                id: id.clone(),
                not_before: rfc3339(facts.not_before),
                now: now_text,
            },
            webpki::Error::UnknownIssuer => VerifyError::UnknownIssuer {
                id: id.clone(),
                issuer: facts.issuer.clone(),
                source_path: self.source.clone(),
                anchors: self
                    .infos
                    .iter()
                    .map(|a| format!("{:?}", a.subject))
                    .collect::<Vec<_>>()
                    .join(", "),
            },
            other => VerifyError::Chain {
                id: id.clone(),
                reason: format!("{other:?}"),
            },
        }
    }
}

fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The SPIFFE ID of a peer's leaf certificate (the first in `certs`). It does not verify
/// the chain: use it on the certificates of an established rustls connection, whose
/// verifier already did.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, super::IdentityError> {
    let leaf = certs.first().ok_or(VerifyError::NoCertificate)?;
    let facts = x509::facts(leaf).map_err(|reason| VerifyError::Malformed { reason })?;
    Ok(x509::spiffe_id_of(&facts)?)
}

// === impl AnchorSet ===

/// The current trust anchors, swapped whole when the bundle file changes. Verifiers read
/// it per handshake, so a rollover applies to new handshakes without a restart.
#[derive(Debug)]
pub(crate) struct AnchorSet {
    current: RwLock<Arc<TrustAnchors>>,
}

impl AnchorSet {
    pub(crate) fn new(anchors: TrustAnchors) -> Self {
        Self {
            current: RwLock::new(Arc::new(anchors)),
        }
    }

    pub(crate) fn current(&self) -> Arc<TrustAnchors> {
        // A poisoned lock still holds a consistent Arc: writers only swap it.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn replace(&self, anchors: TrustAnchors) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(anchors);
    }
}

/// rustls prints `CertificateError::Other` with `{:?}`; this wrapper makes that the
/// readable message, so handshake errors logged by callers say what was wrong.
struct Readable(VerifyError);

impl fmt::Debug for Readable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Readable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Readable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn rustls_error(e: VerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Readable(e)),
    )))
}

// === impl SpiffeClientVerifier ===

/// Server side: requires a client certificate that chains to the current anchors and
/// carries one SPIFFE ID in our trust domain.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    anchors: Arc<AnchorSet>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(anchors: Arc<AnchorSet>, algs: WebPkiSupportedAlgorithms) -> Self {
        Self { anchors, algs }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would have to borrow from the current (swappable) anchors; clients have one
        // certificate per identity anyway, so none are sent.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.anchors
            .current()
            .verify(end_entity, intermediates, now, Usage::Client, &self.algs)
            .map(|_| ClientCertVerified::assertion())
            .map_err(rustls_error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

// === impl SpiffeServerVerifier ===

/// Client side: the server's chain must lead to the current anchors and its SPIFFE ID be in
/// our trust domain and, when given, equal the expected one. No DNS name check: the SPIFFE
/// ID replaces it.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    anchors: Arc<AnchorSet>,
    expected: Option<SpiffeId>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(
        anchors: Arc<AnchorSet>,
        expected: Option<SpiffeId>,
        algs: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self {
            anchors,
            expected,
            algs,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = self
            .anchors
            .current()
            .verify(end_entity, intermediates, now, Usage::Server, &self.algs)
            .map_err(rustls_error)?;
        match &self.expected {
            Some(expected) if *expected != got => Err(rustls_error(VerifyError::WrongIdentity {
                expected: expected.clone(),
                got,
            })),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::identity::{ca, provider, test_support::TempDir};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn an_expired_anchor_is_named_with_the_fix() -> TestResult {
        let tmp = TempDir::new("anchor-expired")?;
        let dir = tmp.path().join("ca");
        ca::init(&dir, "cluster.local", 2 * DAY, false)?;
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web")?;
        let now = SystemTime::now();
        // A leaf that outlives its CA: webpki does not check anchors' validity, we do.
        let out = tmp.path().join("leaf");
        ca::issue(&dir, &id, now, now + 10 * DAY, &out)?;
        let chain = x509::certs_from_pem(&std::fs::read(out.join("cert.pem"))?)?;
        let (leaf, rest) = chain.split_first().ok_or("empty chain")?;
        let (anchors, _) = TrustAnchors::read(&dir.join(ca::ANCHORS_FILE), "cluster.local")?;
        let algs = provider().signature_verification_algorithms;

        let today = UnixTime::now();
        assert_eq!(
            anchors.verify(leaf, rest, today, Usage::Server, &algs),
            Ok(id.clone())
        );
        let later =
            UnixTime::since_unix_epoch((now + 3 * DAY).duration_since(SystemTime::UNIX_EPOCH)?);
        match anchors.verify(leaf, rest, later, Usage::Server, &algs) {
            Err(e @ VerifyError::AnchorExpired { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("trust anchor \"O=ebpf-mesh, CN=cluster.local CA"),
                    "{msg}"
                );
                assert!(
                    msg.contains("roll the CA over with `proxy ca rotate`"),
                    "{msg}"
                );
            }
            other => return Err(format!("expected AnchorExpired, got {other:?}").into()),
        }
        Ok(())
    }

    #[test]
    fn bundles_must_hold_ca_certificates() -> TestResult {
        let tmp = TempDir::new("bundle")?;
        let dir = tmp.path().join("ca");
        ca::init(&dir, "cluster.local", 2 * DAY, false)?;
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web")?;
        let now = SystemTime::now();
        ca::issue(&dir, &id, now, now + DAY, &tmp.path().join("leaf"))?;
        let leaf_pem = std::fs::read(tmp.path().join("leaf").join("cert.pem"))?;
        let path = Path::new("bundle.pem");
        assert!(matches!(
            TrustAnchors::from_pem(&leaf_pem, path, "cluster.local"),
            Err(AnchorsError::NotAnAnchor { index: 1, .. })
        ));
        assert!(matches!(
            TrustAnchors::from_pem(b"no pem here", path, "cluster.local"),
            Err(AnchorsError::Empty { .. })
        ));
        let missing = TrustAnchors::read(&tmp.path().join("nope.pem"), "cluster.local");
        assert!(missing.is_err_and(|e| e.to_string().contains("proxy ca")));
        Ok(())
    }

    #[test]
    fn peer_identity_reads_the_leaf_uri_san() -> TestResult {
        use crate::identity::IdentityError;
        assert!(matches!(
            peer_identity(&[]),
            Err(IdentityError::Peer(e)) if *e == VerifyError::NoCertificate
        ));
        assert!(matches!(
            peer_identity(&[CertificateDer::from(vec![0x30, 0x00])]),
            Err(IdentityError::Peer(e)) if matches!(*e, VerifyError::Malformed { .. })
        ));
        // A certificate with two URI SANs is not a SPIFFE certificate.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        for uri in [
            "spiffe://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/c/sa/d",
        ] {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.to_owned().try_into()?));
        }
        let cert = params.self_signed(&key)?;
        assert!(matches!(
            peer_identity(&[cert.der().clone()]),
            Err(IdentityError::Peer(e)) if matches!(*e, VerifyError::SeveralUris { .. })
        ));
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".to_owned().try_into()?,
        )];
        let cert = params.self_signed(&key)?;
        assert_eq!(
            peer_identity(&[cert.der().clone()])?.as_str(),
            "spiffe://cluster.local/ns/a/sa/b"
        );
        Ok(())
    }
}
