//! Reading certificates: PEM bundles, the facts the mesh needs from a certificate (SPIFFE
//! URI SANs, serial, validity, names) and time formatting for messages.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use super::SpiffeId;

/// A certificate this node holds for one of its identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: SpiffeId,
    /// Lowercase hex of the serial number.
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A trust anchor (CA certificate) in the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorInfo {
    /// The subject in RFC 4514 form, e.g. `O=ebpf-mesh, CN=cluster.local CA ...`.
    pub subject: String,
    pub not_after: SystemTime,
}

/// What the mesh reads from a certificate.
#[derive(Debug, Clone)]
pub(crate) struct CertFacts {
    /// Every URI SAN, in order.
    pub uris: Vec<String>,
    pub serial_hex: String,
    pub subject: String,
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// The DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
}

/// Parses the facts of one DER certificate; the error says what is malformed.
pub(crate) fn facts(der: &[u8]) -> Result<CertFacts, String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut uris = Vec::new();
    match cert.subject_alternative_name() {
        Ok(Some(san)) => {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push((*uri).to_owned());
                }
            }
        }
        Ok(None) => {}
        Err(e) => return Err(format!("malformed subjectAltName extension: {e}")),
    }
    let validity = cert.validity();
    Ok(CertFacts {
        uris,
        serial_hex: super::hex(cert.raw_serial()),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
        is_ca: cert.is_ca(),
        spki: cert.public_key().raw.to_vec(),
    })
}

/// Parses every CERTIFICATE block of a PEM text (other blocks are skipped).
pub(crate) fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))
}

/// The SPIFFE ID of a leaf: its only URI SAN. Errors say what the certificate has instead.
pub(crate) fn spiffe_id_of(facts: &CertFacts) -> Result<SpiffeId, super::VerifyError> {
    use super::VerifyError;
    match facts.uris.as_slice() {
        [] => Err(VerifyError::NoSpiffeId {
            subject: facts.subject.clone(),
        }),
        [uri] => SpiffeId::parse(uri).map_err(|source| VerifyError::BadSpiffeId {
            uri: uri.clone(),
            source,
        }),
        uris => Err(VerifyError::SeveralUris {
            uris: uris.join(", "),
        }),
    }
}

fn system_time(unix_secs: i64) -> SystemTime {
    if unix_secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix_secs.unsigned_abs())
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(unix_secs.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

/// RFC 3339 in UTC, for messages and the issuer's `not_after`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{} (unix)", t.unix_timestamp()))
}
