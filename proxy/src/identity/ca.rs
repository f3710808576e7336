//! The mesh CA on disk: create, rotate and retire it, and issue leaf certificates from it.
//!
//! Layout of a CA directory `D`:
//! - `D/ca.key`: the current signing key (PKCS#8 PEM, mode 0600, never printed or logged);
//! - `D/ca.crt`: the current signing certificate, a self-signed trust anchor with the URI
//!   SAN `spiffe://<trust-domain>` (that is where the trust domain is read from);
//! - `D/anchors.pem`: the bundle every node trusts: `ca.crt`, plus the previous anchor
//!   during a rollover;
//! - `D/previous/ca.key`, `D/previous/ca.crt`: the previous CA, between `rotate` and
//!   `retire-previous`.
//!
//! These functions return a summary for the CLI to print; it never holds key material.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;

use super::{
    AnchorInfo, SpiffeId, SpiffeIdError, hex,
    spiffe::validate_trust_domain,
    x509::{self, rfc3339},
};

pub const KEY_FILE: &str = "ca.key";
pub const CERT_FILE: &str = "ca.crt";
pub const ANCHORS_FILE: &str = "anchors.pem";
pub const PREVIOUS_DIR: &str = "previous";

/// Default CA lifetime for `proxy ca init`.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Certificates start this far in the past so that a peer whose clock is a little behind
/// still accepts them.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Serial numbers are 16 random bytes (RFC 5280 allows 20; CA/B asks for ≥ 64 random bits).
const SERIAL_BYTES: usize = 16;

const SECRET_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;

/// A CA operation failed. Messages name the file and the command that fixes it.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "cannot read {what} {path}: {source}; run `proxy ca init --dir {dir} --trust-domain \
         <td>` or fix the file's owner",
        dir = dir_of(path)
    )]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot write {path}: {source}; check that its directory is writable")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{dir} already holds a CA ({KEY_FILE}); pass --force to replace it (every \
         certificate it issued stops verifying) or roll it over with `proxy ca rotate --dir \
         {dir}`",
        dir = dir.display()
    )]
    Exists { dir: PathBuf },
    #[error("{what} {path} is unusable: {reason}; recreate it with `proxy ca init --force`")]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{key} does not belong to {cert}; restore the matching pair or recreate the CA with \
         `proxy ca init --force`",
        key = key.display(), cert = cert.display()
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("invalid trust domain: {0}")]
    TrustDomain(SpiffeIdError),
    #[error("invalid CA lifetime {days} days: must be at least 1 day")]
    Lifetime { days: u64 },
    #[error(
        "cannot issue {identity}: it is outside trust domain {trust_domain} of the CA in \
         {dir}; issue it from that trust domain's CA",
        dir = dir.display()
    )]
    OutsideTrustDomain {
        identity: SpiffeId,
        trust_domain: String,
        dir: PathBuf,
    },
    #[error(
        "the CA {subject:?} in {dir} expired at {not_after}; roll it over with `proxy ca \
         rotate --dir {dir}`",
        dir = dir.display()
    )]
    CaExpired {
        subject: String,
        dir: PathBuf,
        not_after: String,
    },
    #[error("not_after {not_after} is not later than not_before {not_before}; swap them")]
    Validity {
        not_before: String,
        not_after: String,
    },
    #[error(
        "{dir} still holds a previous CA; run `proxy ca retire-previous --dir {dir}` first \
         (once every certificate it issued has been renewed)",
        dir = dir.display()
    )]
    PreviousExists { dir: PathBuf },
    #[error(
        "{dir} holds no previous CA ({PREVIOUS_DIR}/{CERT_FILE}); nothing to retire",
        dir = dir.display()
    )]
    NoPrevious { dir: PathBuf },
    #[error("cannot create or sign a certificate: {0}")]
    Sign(String),
}

fn dir_of(path: &Path) -> String {
    path.parent()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| ".".to_owned())
}

fn sign_error(e: rcgen::Error) -> CaError {
    CaError::Sign(e.to_string())
}

// === summaries (what the CLI prints) ===

/// The state of a CA directory after an operation. No key material.
#[derive(Debug, Clone)]
pub struct CaSummary {
    pub dir: PathBuf,
    pub trust_domain: String,
    /// Subject of the current signing certificate.
    pub subject: String,
    pub not_after: SystemTime,
    /// The anchors in `anchors.pem`, current first.
    pub anchors: Vec<AnchorInfo>,
}

impl fmt::Display for CaSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "CA for trust domain {} in {}",
            self.trust_domain,
            self.dir.display()
        )?;
        writeln!(
            f,
            "  signing certificate: {} (expires {})",
            self.subject,
            rfc3339(self.not_after)
        )?;
        write!(
            f,
            "  {ANCHORS_FILE} trusts {} anchor(s):",
            self.anchors.len()
        )?;
        for a in &self.anchors {
            write!(f, "\n    {} (expires {})", a.subject, rfc3339(a.not_after))?;
        }
        Ok(())
    }
}

/// A certificate written by [`issue`]. No key material.
#[derive(Debug, Clone)]
pub struct IssuedSummary {
    pub identity: SpiffeId,
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl fmt::Display for IssuedSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "issued {} serial {} valid {} .. {}\n  certificate chain: {}\n  private key (0600): {}",
            self.identity,
            self.serial_hex,
            rfc3339(self.not_before),
            rfc3339(self.not_after),
            self.cert_path.display(),
            self.key_path.display()
        )
    }
}

// === CLI functions ===

/// `proxy ca init`: creates a CA for `trust_domain` in `dir`. Refuses to replace an
/// existing CA unless `force` (which also drops a previous CA).
pub fn init(
    dir: &Path,
    trust_domain: &str,
    lifetime: Duration,
    force: bool,
) -> Result<CaSummary, CaError> {
    validate_trust_domain(trust_domain).map_err(CaError::TrustDomain)?;
    if lifetime < Duration::from_secs(24 * 3600) {
        return Err(CaError::Lifetime {
            days: lifetime.as_secs() / (24 * 3600),
        });
    }
    create_dir(dir)?;
    if !force && (dir.join(KEY_FILE).exists() || dir.join(CERT_FILE).exists()) {
        return Err(CaError::Exists {
            dir: dir.to_owned(),
        });
    }
    let (key, cert) = generate_ca(trust_domain, lifetime)?;
    write_file(
        &dir.join(KEY_FILE),
        key.serialize_pem().as_bytes(),
        SECRET_MODE,
    )?;
    write_file(&dir.join(CERT_FILE), cert.pem().as_bytes(), PUBLIC_MODE)?;
    write_file(&dir.join(ANCHORS_FILE), cert.pem().as_bytes(), PUBLIC_MODE)?;
    let previous = dir.join(PREVIOUS_DIR);
    if force && previous.exists() {
        fs::remove_dir_all(&previous).map_err(|source| CaError::Write {
            path: previous.clone(),
            source,
        })?;
    }
    summary(dir)
}

/// `proxy ca rotate`: moves the current CA to `previous/`, creates a new one with the same
/// trust domain and lifetime, and trusts both (`anchors.pem` = new + old), so certificates
/// from the old CA keep verifying until they are renewed.
pub fn rotate(dir: &Path) -> Result<CaSummary, CaError> {
    let current = Ca::load(dir)?;
    let previous = dir.join(PREVIOUS_DIR);
    if previous.join(CERT_FILE).exists() || previous.join(KEY_FILE).exists() {
        return Err(CaError::PreviousExists {
            dir: dir.to_owned(),
        });
    }
    let lifetime = current
        .not_after
        .duration_since(current.not_before)
        .unwrap_or(DEFAULT_CA_LIFETIME)
        .max(Duration::from_secs(24 * 3600));
    let (key, cert) = generate_ca(&current.trust_domain, lifetime)?;
    // Order matters for a reader polling the directory: first keep the old pair, then trust
    // the new anchor, and only then sign with the new key.
    create_dir(&previous)?;
    write_file(
        &previous.join(KEY_FILE),
        current.key.serialize_pem().as_bytes(),
        SECRET_MODE,
    )?;
    write_file(
        &previous.join(CERT_FILE),
        current.cert_pem.as_bytes(),
        PUBLIC_MODE,
    )?;
    let bundle = format!("{}{}", cert.pem(), current.cert_pem);
    write_file(&dir.join(ANCHORS_FILE), bundle.as_bytes(), PUBLIC_MODE)?;
    write_file(
        &dir.join(KEY_FILE),
        key.serialize_pem().as_bytes(),
        SECRET_MODE,
    )?;
    write_file(&dir.join(CERT_FILE), cert.pem().as_bytes(), PUBLIC_MODE)?;
    summary(dir)
}

/// `proxy ca retire-previous`: stops trusting the previous CA (`anchors.pem` = `ca.crt`)
/// and deletes its key.
pub fn retire_previous(dir: &Path) -> Result<CaSummary, CaError> {
    let current = Ca::load(dir)?;
    let previous = dir.join(PREVIOUS_DIR);
    if !previous.join(CERT_FILE).exists() {
        return Err(CaError::NoPrevious {
            dir: dir.to_owned(),
        });
    }
    write_file(
        &dir.join(ANCHORS_FILE),
        current.cert_pem.as_bytes(),
        PUBLIC_MODE,
    )?;
    fs::remove_dir_all(&previous).map_err(|source| CaError::Write {
        path: previous,
        source,
    })?;
    summary(dir)
}

/// `proxy ca issue`: issues a certificate for `identity` with a fresh key, valid from
/// `not_before` to `not_after` (either may be in the past: tests use it for expired
/// certificates), to `out_dir/cert.pem` (leaf + CA) and `out_dir/key.pem` (0600).
/// Refuses identities outside the CA's trust domain.
pub fn issue(
    dir: &Path,
    identity: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    out_dir: &Path,
) -> Result<IssuedSummary, CaError> {
    let ca = Ca::load(dir)?;
    let (issued, key) = ca.issue_with_new_key(identity, not_before, not_after, None)?;
    create_dir(out_dir)?;
    let cert_path = out_dir.join("cert.pem");
    let key_path = out_dir.join("key.pem");
    write_file(&cert_path, issued.chain_pem.as_bytes(), PUBLIC_MODE)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), SECRET_MODE)?;
    Ok(IssuedSummary {
        identity: identity.clone(),
        serial_hex: issued.serial_hex,
        not_before: issued.not_before,
        not_after: issued.not_after,
        cert_path,
        key_path,
    })
}

fn summary(dir: &Path) -> Result<CaSummary, CaError> {
    let ca = Ca::load(dir)?;
    let anchors_path = dir.join(ANCHORS_FILE);
    let pem = read(&anchors_path, "trust anchors")?;
    let anchors = super::verify::TrustAnchors::from_pem(&pem, &anchors_path, &ca.trust_domain)
        .map_err(|e| CaError::Corrupt {
            what: "trust anchors",
            path: anchors_path,
            reason: e.to_string(),
        })?;
    Ok(CaSummary {
        dir: dir.to_owned(),
        trust_domain: ca.trust_domain,
        subject: ca.subject,
        not_after: ca.not_after,
        anchors: anchors.infos().to_vec(),
    })
}

// === impl Ca ===

/// A loaded CA: the current signing key and certificate.
pub(crate) struct Ca {
    key: KeyPair,
    /// rcgen's view of the CA certificate, for issuing (issuer name, key identifier).
    cert: rcgen::Certificate,
    /// `ca.crt` exactly as on disk (one certificate): the chain's second element.
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    trust_domain: String,
    subject: String,
    not_before: SystemTime,
    not_after: SystemTime,
    dir: PathBuf,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately absent.
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// A leaf certificate just issued.
#[derive(Debug, Clone)]
pub(crate) struct Issued {
    /// Leaf PEM followed by the CA PEM.
    pub chain_pem: String,
    /// Leaf DER followed by the CA DER.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Ca {
    /// Loads `dir/ca.key` and `dir/ca.crt` and checks that they belong together.
    pub(crate) fn load(dir: &Path) -> Result<Self, CaError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_pem =
            String::from_utf8(read(&key_path, "CA key")?).map_err(|_| CaError::Corrupt {
                what: "CA key",
                path: key_path.clone(),
                reason: "not UTF-8 PEM".to_owned(),
            })?;
        warn_if_readable(&key_path);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Corrupt {
            what: "CA key",
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let corrupt_cert = |reason: String| CaError::Corrupt {
            what: "CA certificate",
            path: cert_path.clone(),
            reason,
        };
        let cert_pem = String::from_utf8(read(&cert_path, "CA certificate")?)
            .map_err(|_| corrupt_cert("not UTF-8 PEM".to_owned()))?;
        let cert_der = match x509::certs_from_pem(cert_pem.as_bytes()).map_err(corrupt_cert)? {
            certs if certs.len() == 1 => certs.into_iter().next(),
            certs => {
                return Err(corrupt_cert(format!(
                    "holds {} certificates, expected exactly one",
                    certs.len()
                )));
            }
        }
        .ok_or_else(|| corrupt_cert("holds no certificate".to_owned()))?;
        let facts = x509::facts(&cert_der).map_err(corrupt_cert)?;
        if !facts.is_ca {
            return Err(corrupt_cert("not a CA certificate".to_owned()));
        }
        let trust_domain = facts
            .uris
            .iter()
            .find_map(|u| {
                let td = u.strip_prefix("spiffe://")?;
                validate_trust_domain(td).ok().map(|()| td.to_owned())
            })
            .ok_or_else(|| {
                corrupt_cert(
                    "has no spiffe://<trust-domain> URI SAN (not made by `proxy ca init`)"
                        .to_owned(),
                )
            })?;
        if key.public_key_der() != facts.spki {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let cert = CertificateParams::from_ca_cert_der(&cert_der)
            .and_then(|params| params.self_signed(&key))
            .map_err(|e| corrupt_cert(e.to_string()))?;
        Ok(Self {
            key,
            cert,
            cert_pem,
            cert_der,
            trust_domain,
            subject: facts.subject,
            not_before: facts.not_before,
            not_after: facts.not_after,
            dir: dir.to_owned(),
        })
    }

    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Issues a leaf for `identity` with `public_key` (from a verified CSR), valid from
    /// now − [`CLOCK_SKEW`] for `lifetime`, but never past the CA's own expiry.
    pub(crate) fn issue_for_key(
        &self,
        public_key: &impl PublicKeyData,
        identity: &SpiffeId,
        lifetime: Duration,
        ip: Option<IpAddr>,
    ) -> Result<Issued, CaError> {
        let now = SystemTime::now();
        if self.not_after <= now {
            return Err(CaError::CaExpired {
                subject: self.subject.clone(),
                dir: self.dir.clone(),
                not_after: rfc3339(self.not_after),
            });
        }
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
        let not_after = (now + lifetime).min(self.not_after);
        self.sign(public_key, identity, not_before, not_after, ip, true)
    }

    /// Issues a leaf with a freshly generated ECDSA P-256 key.
    pub(crate) fn issue_with_new_key(
        &self,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
        ip: Option<IpAddr>,
    ) -> Result<(Issued, KeyPair), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_error)?;
        let issued = self.sign(&key, identity, not_before, not_after, ip, true)?;
        Ok((issued, key))
    }

    /// Like [`Self::issue_with_new_key`] for any trust domain: only tests make such
    /// certificates, to check that peers refuse them.
    #[cfg(test)]
    pub(crate) fn issue_any_domain(
        &self,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(Issued, KeyPair), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_error)?;
        let issued = self.sign(&key, identity, not_before, not_after, None, false)?;
        Ok((issued, key))
    }

    fn sign(
        &self,
        public_key: &impl PublicKeyData,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
        ip: Option<IpAddr>,
        check_domain: bool,
    ) -> Result<Issued, CaError> {
        if check_domain && identity.trust_domain() != self.trust_domain {
            return Err(CaError::OutsideTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
                dir: self.dir.clone(),
            });
        }
        if not_after <= not_before {
            return Err(CaError::Validity {
                not_before: rfc3339(not_before),
                not_after: rfc3339(not_after),
            });
        }
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        // The subject is not empty so that the SAN extension need not be critical
        // (RFC 5280 4.2.1.6); peers only look at the URI SAN.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ebpf-mesh");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            identity
                .as_str()
                .to_owned()
                .try_into()
                .map_err(sign_error)?,
        )];
        if let Some(ip) = ip {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let leaf = params
            .signed_by(public_key, &self.cert, &self.key)
            .map_err(sign_error)?;
        let ca_pem = self.cert_pem.trim_end();
        Ok(Issued {
            chain_pem: format!("{}{ca_pem}\n", leaf.pem()),
            chain: vec![leaf.der().clone(), self.cert_der.clone()],
            serial_hex: hex(&serial),
            not_before: truncate_to_secs(not_before),
            not_after: truncate_to_secs(not_after),
        })
    }
}

/// X.509 times have one-second resolution.
fn truncate_to_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

fn generate_ca(
    trust_domain: &str,
    lifetime: Duration,
) -> Result<(KeyPair, rcgen::Certificate), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_error)?;
    let serial = random_serial()?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    // A distinct name per CA generation, so messages can tell the old anchor from the new.
    let date = time::OffsetDateTime::from(now).date();
    let tag = hex(serial.get(..4).unwrap_or_default());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ebpf-mesh");
    dn.push(
        DnType::CommonName,
        format!("{trust_domain} CA {date} {tag}"),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(sign_error)?,
    )];
    // Path length 0: the CA signs leaves directly, no intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&key).map_err(sign_error)?;
    Ok((key, cert))
}

fn random_serial() -> Result<[u8; SERIAL_BYTES], CaError> {
    use ring::rand::SecureRandom;
    let mut serial = [0u8; SERIAL_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| CaError::Sign("the system random generator failed".to_owned()))?;
    // Positive (top bit clear) and exactly SERIAL_BYTES long (first byte non-zero).
    serial[0] = (serial[0] & 0x7f).max(1);
    Ok(serial)
}

// === files ===

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|source| CaError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it), created with
/// `mode` so a key is never readable by others, not even briefly.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}

/// Warns when a secret file can be read by group or others.
pub(crate) fn warn_if_readable(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "secret file is readable by group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::identity::{
        test_support::{TempDir, verify_chain_file},
        verify::VerifyError,
    };

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn init_writes_a_private_key_and_refuses_to_overwrite() -> TestResult {
        let tmp = TempDir::new("ca-init")?;
        let dir = tmp.path().join("ca");
        let summary = init(&dir, "cluster.local", DEFAULT_CA_LIFETIME, false)?;
        assert_eq!(summary.trust_domain, "cluster.local");
        assert_eq!(summary.anchors.len(), 1);
        let mode = fs::metadata(dir.join(KEY_FILE))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "ca.key mode {mode:o}");
        assert_eq!(
            fs::read(dir.join(CERT_FILE))?,
            fs::read(dir.join(ANCHORS_FILE))?
        );
        // The summary never shows key material.
        assert!(!summary.to_string().contains("PRIVATE KEY"));

        let key_before = fs::read(dir.join(KEY_FILE))?;
        let err = match init(&dir, "cluster.local", DEFAULT_CA_LIFETIME, false) {
            Err(e) => e,
            Ok(_) => return Err("init over an existing CA succeeded".into()),
        };
        assert!(matches!(err, CaError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(dir.join(KEY_FILE))?, key_before);

        init(&dir, "cluster.local", DEFAULT_CA_LIFETIME, true)?;
        assert_ne!(fs::read(dir.join(KEY_FILE))?, key_before);
        Ok(())
    }

    #[test]
    fn init_validates_inputs() -> TestResult {
        let tmp = TempDir::new("ca-inputs")?;
        let err = init(tmp.path(), "Bad:Domain", DEFAULT_CA_LIFETIME, false);
        assert!(matches!(err, Err(CaError::TrustDomain(_))));
        let err = init(tmp.path(), "td", Duration::from_secs(60), false);
        assert!(matches!(err, Err(CaError::Lifetime { .. })));
        Ok(())
    }

    #[test]
    fn load_reports_missing_files_with_the_fix() -> TestResult {
        let tmp = TempDir::new("ca-missing")?;
        let err = match Ca::load(tmp.path()) {
            Err(e) => e.to_string(),
            Ok(_) => return Err("loaded a CA from an empty directory".into()),
        };
        assert!(err.contains("cannot read CA key"), "{err}");
        assert!(err.contains("proxy ca init --dir"), "{err}");
        Ok(())
    }

    #[test]
    fn rotation_keeps_old_leaves_valid_until_retired() -> TestResult {
        let tmp = TempDir::new("ca-rotate")?;
        let dir = tmp.path().join("ca");
        init(&dir, "cluster.local", DEFAULT_CA_LIFETIME, false)?;
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web")?;
        let now = SystemTime::now();
        let old_leaf = tmp.path().join("old");
        issue(&dir, &id, now, now + Duration::from_secs(3600), &old_leaf)?;
        let old_subject = Ca::load(&dir)?.subject;

        let rotated = rotate(&dir)?;
        assert_eq!(rotated.anchors.len(), 2, "{rotated}");
        assert_ne!(rotated.subject, old_subject);
        assert_eq!(
            rotated.anchors.get(1).map(|a| &a.subject),
            Some(&old_subject)
        );
        assert!(dir.join(PREVIOUS_DIR).join(KEY_FILE).exists());
        // A second rotation before retiring would drop the still-trusted anchor's key.
        assert!(matches!(rotate(&dir), Err(CaError::PreviousExists { .. })));

        // During the rollover both the old and a new leaf verify.
        let anchors = dir.join(ANCHORS_FILE);
        assert_eq!(
            verify_chain_file(&anchors, &old_leaf.join("cert.pem"))?,
            Ok(id.clone())
        );
        let new_leaf = tmp.path().join("new");
        issue(&dir, &id, now, now + Duration::from_secs(3600), &new_leaf)?;
        assert_eq!(
            verify_chain_file(&anchors, &new_leaf.join("cert.pem"))?,
            Ok(id.clone())
        );

        let retired = retire_previous(&dir)?;
        assert_eq!(retired.anchors.len(), 1);
        assert!(!dir.join(PREVIOUS_DIR).exists());
        match verify_chain_file(&anchors, &old_leaf.join("cert.pem"))? {
            Err(e @ VerifyError::UnknownIssuer { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&old_subject), "{msg}");
                assert!(msg.contains("not among the trust anchors"), "{msg}");
            }
            other => return Err(format!("old leaf after retire: {other:?}").into()),
        }
        assert_eq!(
            verify_chain_file(&anchors, &new_leaf.join("cert.pem"))?,
            Ok(id)
        );
        assert!(matches!(
            retire_previous(&dir),
            Err(CaError::NoPrevious { .. })
        ));
        Ok(())
    }

    #[test]
    fn issue_writes_a_private_key_and_refuses_other_domains() -> TestResult {
        let tmp = TempDir::new("ca-issue")?;
        let dir = tmp.path().join("ca");
        init(&dir, "cluster.local", DEFAULT_CA_LIFETIME, false)?;
        let out = tmp.path().join("leaf");
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web")?;
        let now = SystemTime::now();
        let issued = issue(&dir, &id, now, now + Duration::from_secs(60), &out)?;
        assert!(
            issued.serial_hex.len() >= 16,
            "serial {}",
            issued.serial_hex
        );
        let mode = fs::metadata(out.join("key.pem"))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let chain = x509::certs_from_pem(&fs::read(out.join("cert.pem"))?)?;
        assert_eq!(chain.len(), 2);
        let leaf = chain.first().ok_or("empty chain")?;
        let facts = x509::facts(leaf)?;
        assert_eq!(facts.uris, vec![id.to_string()]);
        assert!(!facts.is_ca);
        assert_eq!(facts.serial_hex, issued.serial_hex);

        let other = SpiffeId::parse("spiffe://other.domain/ns/default/sa/web")?;
        let err = match issue(&dir, &other, now, now + Duration::from_secs(60), &out) {
            Err(e) => e.to_string(),
            Ok(_) => return Err("issued for another trust domain".into()),
        };
        assert!(err.contains("outside trust domain cluster.local"), "{err}");
        let backwards = issue(&dir, &id, now, now - Duration::from_secs(1), &out);
        assert!(matches!(backwards, Err(CaError::Validity { .. })));
        Ok(())
    }

    #[test]
    fn expired_leaf_is_reported_as_expired() -> TestResult {
        let tmp = TempDir::new("ca-expired")?;
        let dir = tmp.path().join("ca");
        init(&dir, "cluster.local", DEFAULT_CA_LIFETIME, false)?;
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web")?;
        let now = SystemTime::now();
        let out = tmp.path().join("leaf");
        issue(
            &dir,
            &id,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
            &out,
        )?;
        match verify_chain_file(&dir.join(ANCHORS_FILE), &out.join("cert.pem"))? {
            Err(e @ VerifyError::Expired { .. }) => {
                assert!(e.to_string().contains("expired at"), "{e}")
            }
            other => return Err(format!("expired leaf: {other:?}").into()),
        }
        Ok(())
    }
}
