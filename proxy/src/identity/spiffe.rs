//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`), checked against the SPIFFE ID
//! specification, and the SNI name derived from one.

use std::{fmt, str::FromStr};

const SCHEME: &str = "spiffe://";

/// The SPIFFE spec caps a SPIFFE ID at 2048 bytes and a trust domain at 255.
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The namespace of the mesh's own identities (node proxies, the issuer).
pub const MESH_NAMESPACE: &str = "ebpf-mesh";

/// A workload or node identity: `spiffe://<trust-domain>/<path>` with a non-empty path.
///
/// The trust domain alone (`spiffe://cluster.local`) names a CA, not something a leaf
/// certificate is issued for, so it is not a `SpiffeId`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    /// The whole ID, validated.
    id: String,
    /// Byte offset of the path's leading '/'.
    path_start: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error(
        "SPIFFE ID is empty; expected spiffe://<trust-domain>/<path>, \
         e.g. spiffe://cluster.local/ns/default/sa/web"
    )]
    Empty,
    #[error("SPIFFE ID is {len} bytes long; the SPIFFE spec allows at most {MAX_ID_LEN}")]
    TooLong { len: usize },
    #[error(
        "{id:?} does not start with `spiffe://` (lowercase); \
         expected spiffe://<trust-domain>/<path>"
    )]
    Scheme { id: String },
    #[error("{id:?} has an empty trust domain; expected spiffe://<trust-domain>/<path>")]
    EmptyTrustDomain { id: String },
    #[error(
        "trust domain {trust_domain:?} is {len} bytes long; the SPIFFE spec allows at most \
         {MAX_TRUST_DOMAIN_LEN}"
    )]
    TrustDomainTooLong { trust_domain: String, len: usize },
    #[error(
        "trust domain {trust_domain:?} contains {ch:?}; trust domains use only lowercase \
         letters, digits, '.', '-' and '_' (no port, user or uppercase)"
    )]
    TrustDomainChar { trust_domain: String, ch: char },
    #[error(
        "{id:?} has no path; identities look like \
         spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    MissingPath { id: String },
    #[error("{id:?} has an empty path segment (`//` or a trailing `/`); remove it")]
    EmptySegment { id: String },
    #[error("{id:?} has a `.` or `..` path segment; SPIFFE IDs must not contain them")]
    DotSegment { id: String },
    #[error(
        "path of {id:?} contains {ch:?}; path segments use only letters, digits, '.', '-' \
         and '_' (no query, fragment or percent-encoding)"
    )]
    PathChar { id: String, ch: char },
    #[error("{what} {value:?} is not a valid path segment: {reason}")]
    Segment {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Parses and validates a SPIFFE ID. Never panics, whatever the input.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Err(SpiffeIdError::Scheme { id: s.to_owned() });
        };
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if trust_domain.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain { id: s.to_owned() });
        }
        validate_trust_domain(trust_domain)?;
        if path.is_empty() {
            return Err(SpiffeIdError::MissingPath { id: s.to_owned() });
        }
        // `path` starts with '/': the first split item is empty.
        for segment in path.split('/').skip(1) {
            if segment.is_empty() {
                return Err(SpiffeIdError::EmptySegment { id: s.to_owned() });
            }
            if segment == "." || segment == ".." {
                return Err(SpiffeIdError::DotSegment { id: s.to_owned() });
            }
            if let Some(ch) = segment.chars().find(|c| !is_path_char(*c)) {
                return Err(SpiffeIdError::PathChar {
                    id: s.to_owned(),
                    ch,
                });
            }
        }
        Ok(Self {
            id: s.to_owned(),
            path_start: SCHEME.len() + trust_domain.len(),
        })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)?;
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The node proxy's own identity: `spiffe://<td>/ns/ebpf-mesh/sa/node-<node_name>`.
    pub fn node(trust_domain: &str, node_name: &str) -> Result<Self, SpiffeIdError> {
        check_segment("node name", node_name)?;
        Self::workload(trust_domain, MESH_NAMESPACE, &format!("node-{node_name}"))
    }

    /// The issuer's identity: `spiffe://<td>/ns/ebpf-mesh/sa/issuer`.
    pub fn issuer(trust_domain: &str) -> Result<Self, SpiffeIdError> {
        Self::workload(trust_domain, MESH_NAMESPACE, "issuer")
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        self.id
            .get(SCHEME.len()..self.path_start)
            .unwrap_or_default()
    }

    /// The path including its leading '/', e.g. `/ns/default/sa/web`.
    pub fn path(&self) -> &str {
        self.id.get(self.path_start..).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.id
    }
}

/// Checks a trust domain name (`cluster.local`).
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), SpiffeIdError> {
    if trust_domain.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain {
            id: format!("{SCHEME}{trust_domain}"),
        });
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong {
            trust_domain: trust_domain.chars().take(64).collect(),
            len: trust_domain.len(),
        });
    }
    if let Some(ch) = trust_domain.chars().find(|c| !is_trust_domain_char(*c)) {
        return Err(SpiffeIdError::TrustDomainChar {
            trust_domain: trust_domain.to_owned(),
            ch,
        });
    }
    Ok(())
}

/// The SNI a client sends to reach `id`'s certificate on a node that serves several
/// identities: `id-<first 32 hex chars of sha256(id)>.mesh.internal`. SPIFFE IDs are not DNS
/// names, so the server maps this name back to the identity (see the server resolver).
pub fn sni_for(id: &SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
    let hex = super::hex(digest.as_ref().get(..16).unwrap_or_default());
    format!("id-{hex}.mesh.internal")
}

fn check_segment(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    let reason = if value.is_empty() {
        "it is empty"
    } else if value == "." || value == ".." {
        "`.` and `..` are not allowed"
    } else if !value.chars().all(is_path_char) {
        "use only letters, digits, '.', '-' and '_'"
    } else {
        return Ok(());
    };
    Err(SpiffeIdError::Segment {
        what,
        value: value.to_owned(),
        reason,
    })
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() -> Result<(), SpiffeIdError> {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web")?;
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(SpiffeId::workload("cluster.local", "default", "web")?, id);
        assert_eq!(
            SpiffeId::node("cluster.local", "node1")?.as_str(),
            "spiffe://cluster.local/ns/ebpf-mesh/sa/node-node1"
        );
        assert_eq!(
            SpiffeId::issuer("td")?.as_str(),
            "spiffe://td/ns/ebpf-mesh/sa/issuer"
        );
        Ok(())
    }

    #[test]
    fn rejects_malformed_ids_with_clear_errors() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (
                "http://cluster.local/ns/a/sa/b",
                "does not start with `spiffe://`",
            ),
            (
                "SPIFFE://cluster.local/ns/a/sa/b",
                "does not start with `spiffe://`",
            ),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://", "empty trust domain"),
            ("spiffe://Cluster.local/ns/a", "contains 'C'"),
            ("spiffe://cluster.local:8443/ns/a", "contains ':'"),
            ("spiffe://user@cluster.local/ns/a", "contains '@'"),
            ("spiffe://cluster.local", "has no path"),
            ("spiffe://cluster.local/", "empty path segment"),
            ("spiffe://cluster.local/ns//sa/b", "empty path segment"),
            ("spiffe://cluster.local/ns/a/", "empty path segment"),
            ("spiffe://cluster.local/ns/../sa/b", "`.` or `..`"),
            ("spiffe://cluster.local/ns/a?x=1", "contains '?'"),
            ("spiffe://cluster.local/ns/a#frag", "contains '#'"),
            ("spiffe://cluster.local/ns/a%20b", "contains '%'"),
            ("spiffe://cluster.local/ns/é", "contains 'é'"),
        ];
        for (input, want) in cases {
            match SpiffeId::parse(input) {
                Ok(id) => panic!("{input:?} parsed as {id}"),
                Err(e) => assert!(
                    e.to_string().contains(want),
                    "{input:?}: error {e:?} does not mention {want:?}"
                ),
            }
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        assert!(matches!(
            SpiffeId::parse(&long),
            Err(SpiffeIdError::TooLong { .. })
        ));
        let long_td = format!("spiffe://{}/a", "a".repeat(300));
        assert!(matches!(
            SpiffeId::parse(&long_td),
            Err(SpiffeIdError::TrustDomainTooLong { .. })
        ));
        assert!(SpiffeId::workload("td", "a/b", "c").is_err());
        assert!(SpiffeId::node("td", "").is_err());
        assert!(SpiffeId::node("td", "..").is_err());
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // Every prefix of some tricky inputs, including multi-byte characters.
        for s in [
            "spiffe://tdé/ß/ns",
            "spiffe://a/b/c/../d?e#f",
            "\u{0}spiffe://",
            "ñ",
        ] {
            for end in 0..=s.len() {
                if let Some(prefix) = s.get(..end) {
                    let _ = SpiffeId::parse(prefix);
                }
            }
        }
    }

    #[test]
    fn serde_round_trip_validates() -> Result<(), serde_json::Error> {
        let id: SpiffeId = serde_json::from_str("\"spiffe://td/ns/a/sa/b\"")?;
        assert_eq!(serde_json::to_string(&id)?, "\"spiffe://td/ns/a/sa/b\"");
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td\"").is_err());
        Ok(())
    }

    #[test]
    fn sni_is_a_stable_dns_name() -> Result<(), SpiffeIdError> {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web")?;
        let sni = sni_for(&id);
        assert!(sni.starts_with("id-") && sni.ends_with(".mesh.internal"));
        assert_eq!(sni.len(), "id-".len() + 32 + ".mesh.internal".len());
        assert!(rustls::pki_types::ServerName::try_from(sni.clone()).is_ok());
        assert_eq!(sni, sni_for(&id));
        assert_ne!(
            sni,
            sni_for(&SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b")?)
        );
        Ok(())
    }
}
