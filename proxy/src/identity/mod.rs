//! Identity: SPIFFE IDs, the mesh CA, the certificate issuer, and the node's
//! [`IdentityManager`], which holds a certificate per local identity, renews it before it
//! expires and builds the mutual-TLS configs of node-to-node connections.
//!
//! # Design
//!
//! **Identities.** Workloads are `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//! ([`SpiffeId`]); the node proxy itself is `spiffe://<td>/ns/ebpf-mesh/sa/node-<nodename>`
//! and the issuer `spiffe://<td>/ns/ebpf-mesh/sa/issuer`. A certificate carries its SPIFFE
//! ID as its only URI SAN (an X509-SVID); the subject is not used.
//!
//! **Trust anchors.** A PEM bundle of one or more CA certificates. During a CA rollover it
//! holds the old and the new anchor and certificates from either verify. Nodes poll the
//! bundle's content every 2 s and swap it in, so a rollover needs no restart; verifiers read
//! the current anchors per handshake. An expired anchor is reported as such.
//!
//! **The CA directory** ([`ca`]): `D/ca.key` (0600), `D/ca.crt` (the signing anchor, with the
//! URI SAN `spiffe://<td>` that names the trust domain), `D/anchors.pem` (the bundle).
//! - `proxy ca init --dir D --trust-domain TD [--lifetime-days 365]` creates it (refuses to
//!   replace a CA without `--force`);
//! - `proxy ca rotate --dir D` moves the current pair to `D/previous/`, makes a new one and
//!   writes `anchors.pem` = new + old;
//! - `proxy ca retire-previous --dir D` drops the old anchor and deletes its key, once every
//!   leaf it signed has been renewed (at most one leaf lifetime after the rotation).
//!
//! **Issuing** ([`issuer`]): `proxy identity serve --ca-dir D --listen ADDR --nodes FILE`
//! serves HTTPS (rustls, TLS 1.3; its own certificate is issued from the CA for the issuer
//! identity and renewed at half-life) with HTTP/1.1:
//! - `POST /v1/certificates`, `Authorization: Bearer <token>`, body
//!   `{"identity": "...", "csr": "<PKCS#10 PEM>"}` → 200
//!   `{"certificate_chain": "<leaf PEM + CA PEM>", "not_after": "<RFC 3339>", "serial": "<hex>"}`;
//!   401 unknown token, 403 identity not allowed for that node, 400 malformed CSR or
//!   identity, 413 body over 64 KiB. Errors are `{"error": "<message>"}`.
//! - `GET /v1/anchors` → the anchors bundle (public).
//!
//! Leaf keys are ECDSA P-256, generated on the node, never sent: the node sends a CSR whose
//! self-signature the issuer verifies and whose subject and SANs it ignores; it sets the
//! SAN to the requested identity once the node's token authorizes it. Leaves have EKU
//! serverAuth + clientAuth, key usage digitalSignature, a random 128-bit serial, validity
//! from 1 minute in the past (clock skew) to now + lifetime (default 24 h, never past the
//! CA's expiry). The nodes file (TOML, re-read when it changes) lists per node a
//! `token_sha256` (tokens are stored hashed and compared in constant time, see
//! [`token_hash`]) and the identities it may request (exact, or a trailing `*` for the
//! whole last segment); the trust domain is the CA's. The issuer also reloads the CA files
//! when they change, so after `proxy ca rotate` it signs with the new key.
//!
//! **The node** ([`IdentityManager`]): `start` gets a certificate for the node identity and
//! each local identity before returning (the proxy is not ready without them). A task per
//! identity renews it at `rotate_fraction` (default 0.5) of its remaining lifetime, counted
//! from when the node received it (not from `not_before`, which is back-dated a minute),
//! retries with backoff (0.5 s doubling to 30 s) on failure and keeps serving the old
//! certificate meanwhile. Certificates sit behind an `RwLock` of `Arc<CertifiedKey>`: rustls
//! resolvers read the current one per handshake, so new handshakes use a renewed
//! certificate while established connections keep theirs.
//!
//! **TLS** (rustls with the ring provider, TLS 1.3 only, ALPN `h2`, no session resumption
//! so that every connection presents and verifies current certificates):
//! - server: client certificates required; the chain must lead to a current anchor and the
//!   leaf carry exactly one SPIFFE ID in our trust domain. The served certificate is the one
//!   of the local identity whose [`sni_for`] equals the ClientHello's SNI, else the node's.
//! - client: presents the source identity's current certificate; the server's chain must
//!   lead to a current anchor, its SPIFFE ID be in our trust domain and, when given, equal
//!   the expected identity. There is no DNS name check: the SPIFFE ID replaces it.
//!
//! [`peer_identity`] reads the authenticated peer's SPIFFE ID from an established
//! connection.

pub mod ca;
mod client;
pub mod issuer;
mod manager;
mod spiffe;
mod verify;
mod x509;

#[cfg(test)]
mod tests;

pub use manager::{DEFAULT_ROTATE_FRACTION, IdentityConfig, IdentityError, IdentityManager};
pub use spiffe::{MESH_NAMESPACE, SpiffeId, SpiffeIdError, sni_for, validate_trust_domain};
pub use verify::{AnchorsError, VerifyError, peer_identity};
pub use x509::{AnchorInfo, CertInfo};

/// The hex sha256 of an issuer token, as written into the nodes file's `token_sha256`.
pub fn token_hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The ring provider, the only one this crate builds (aws-lc-rs needs cmake).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::{
        path::{Path, PathBuf},
        sync::atomic::{AtomicUsize, Ordering},
    };

    use rustls::pki_types::UnixTime;

    use super::{SpiffeId, VerifyError, verify, x509};

    /// A directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> std::io::Result<Self> {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("proxy-identity-{}-{n}-{name}", std::process::id()));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Verifies the chain in `chain_file` as a client certificate, now, against the bundle
    /// `anchors` for trust domain `cluster.local` (the tests' trust domain).
    pub(crate) fn verify_chain_file(
        anchors: &Path,
        chain_file: &Path,
    ) -> Result<Result<SpiffeId, VerifyError>, Box<dyn std::error::Error>> {
        let (anchors, _) = verify::TrustAnchors::read(anchors, "cluster.local")?;
        let chain = x509::certs_from_pem(&std::fs::read(chain_file)?)?;
        let (leaf, rest) = chain.split_first().ok_or("empty chain file")?;
        let algs = super::provider().signature_verification_algorithms;
        Ok(anchors.verify(leaf, rest, UnixTime::now(), verify::Usage::Client, &algs))
    }
}
