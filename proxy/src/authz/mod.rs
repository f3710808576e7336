//! Authorization: may this source identity reach that destination workload and port (and,
//! for HTTP, this method and path)?
//!
//! Policies are written per destination workload (`[[policy]]`); a destination workload
//! with no policy for the port falls back to the node default (`[authorization] default`):
//! `allow-all`, `mesh-only` (any authenticated identity) or `deny-all`. A destination that
//! is not a declared workload is not governed by this node's policy (it is egress, or
//! another node's workload, which that node's proxy authorizes).
//!
//! The source identity comes from the kernel on the same node (the connecting task's
//! cgroup, mapped to a declared workload) and from the verified client certificate across
//! nodes; never from an address or a header.
//!
//! Decision rules, in order:
//! 1. Policies of the destination workload that cover the port are the candidates.
//! 2. No candidates: the node default decides.
//! 3. A candidate allows when one of its `allow` patterns matches the source identity, and,
//!    when it has HTTP rules, the request matches one of them. Opaque TCP (no request to
//!    match) is allowed only by candidates without HTTP rules.
//! 4. No candidate allows: denied, naming the first candidate.

use serde::Deserialize;

use crate::config::{ConfigError, invalid};

// === file format ===

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationSection {
    /// `allow-all` (default), `mesh-only` or `deny-all`.
    pub default: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    pub name: Option<String>,
    /// Destination workload name.
    pub workload: Option<String>,
    pub namespace: Option<String>,
    /// Destination ports; empty or absent: every port.
    pub ports: Option<Vec<u16>>,
    /// Source identities: exact SPIFFE IDs, or a prefix ending in `*`.
    pub allow: Option<Vec<String>>,
    /// HTTP rules; a request must match one of them.
    pub rules: Option<Vec<RuleSection>>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    /// Methods (upper case); absent: any.
    pub methods: Option<Vec<String>>,
    /// Path prefix; absent: any.
    pub path_prefix: Option<String>,
}

// === validated ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultPolicy {
    AllowAll,
    MeshOnly,
    DenyAll,
}

impl DefaultPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllowAll => "allow-all",
            DefaultPolicy::MeshOnly => "mesh-only",
            DefaultPolicy::DenyAll => "deny-all",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn matches(&self, id: &str) -> bool {
        match self {
            Pattern::Exact(e) => e == id,
            Pattern::Prefix(p) => id.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub methods: Vec<String>,
    pub path_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub workload: String,
    pub namespace: String,
    pub ports: Vec<u16>,
    pub allow: Vec<Pattern>,
    pub rules: Vec<Rule>,
}

/// Every policy of the node, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    pub default: DefaultPolicy,
    pub policies: Vec<Policy>,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            default: DefaultPolicy::AllowAll,
            policies: Vec::new(),
        }
    }
}

/// Most policies a node holds (bounds memory and the metrics' `policy` label).
pub const MAX_POLICIES: usize = 4096;

impl Policies {
    pub fn resolve(
        section: AuthorizationSection,
        policies: Vec<PolicySection>,
    ) -> Result<Policies, ConfigError> {
        let default = match section.default.as_deref().map(str::trim) {
            None | Some("allow-all") => DefaultPolicy::AllowAll,
            Some("mesh-only") => DefaultPolicy::MeshOnly,
            Some("deny-all") => DefaultPolicy::DenyAll,
            Some(other) => {
                return Err(invalid(
                    "authorization.default",
                    other,
                    "unknown default policy",
                    "use allow-all, mesh-only (any authenticated identity) or deny-all",
                ));
            }
        };
        if policies.len() > MAX_POLICIES {
            return Err(invalid(
                "policy",
                policies.len(),
                format!("more than {MAX_POLICIES} policies"),
                "merge policies: one policy may allow many identities",
            ));
        }
        let mut out = Vec::with_capacity(policies.len());
        let mut names = std::collections::HashSet::new();
        for (i, p) in policies.into_iter().enumerate() {
            let name = p.name.unwrap_or_default();
            if !label_ok(&name) {
                return Err(invalid(
                    "policy.name",
                    if name.is_empty() {
                        format!("(unset, policy #{})", i + 1)
                    } else {
                        name
                    },
                    "a policy needs a name of 1-63 letters, digits, '-', '_' or '.' (403 responses and metrics name it)",
                    "set name = \"web-from-frontend\"",
                ));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(
                    "policy.name",
                    &name,
                    "two policies have this name",
                    "give every [[policy]] a unique name",
                ));
            }
            let workload = p.workload.unwrap_or_default();
            if !label_ok(&workload) {
                return Err(invalid(
                    "policy.workload",
                    format!("{workload:?} (policy {name})"),
                    "a policy protects one destination workload, named like [[workload]] name",
                    "set workload = \"web\"",
                ));
            }
            let namespace = p.namespace.unwrap_or_else(|| "default".into());
            if !label_ok(&namespace) {
                return Err(invalid(
                    "policy.namespace",
                    format!("{namespace:?} (policy {name})"),
                    "not a namespace name",
                    "set namespace = \"default\"",
                ));
            }
            let ports = p.ports.unwrap_or_default();
            if ports.contains(&0) {
                return Err(invalid(
                    "policy.ports",
                    format!("0 (policy {name})"),
                    "port 0 is not a destination",
                    "list the ports the workload serves, or leave ports out for all",
                ));
            }
            let allow_text = p.allow.unwrap_or_default();
            let mut allow = Vec::with_capacity(allow_text.len());
            for a in allow_text {
                allow.push(parse_pattern(&a).map_err(|reason| {
                    invalid(
                        "policy.allow",
                        format!("{a:?} (policy {name})"),
                        reason,
                        "write spiffe://<trust-domain>/ns/<namespace>/sa/<account>, or a prefix ending in * such as spiffe://cluster.local/ns/shop/*",
                    )
                })?);
            }
            let mut rules = Vec::new();
            for r in p.rules.unwrap_or_default() {
                let methods = r.methods.unwrap_or_default();
                if let Some(m) = methods
                    .iter()
                    .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
                {
                    return Err(invalid(
                        "policy.rules.methods",
                        format!("{m:?} (policy {name})"),
                        "methods are upper-case tokens",
                        "write methods = [\"GET\", \"HEAD\"]",
                    ));
                }
                if let Some(pp) = &r.path_prefix
                    && !pp.starts_with('/')
                {
                    return Err(invalid(
                        "policy.rules.path_prefix",
                        format!("{pp:?} (policy {name})"),
                        "a path prefix starts with /",
                        "write path_prefix = \"/api\"",
                    ));
                }
                rules.push(Rule {
                    methods,
                    path_prefix: r.path_prefix,
                });
            }
            out.push(Policy {
                name,
                workload,
                namespace,
                ports,
                allow,
                rules,
            });
        }
        Ok(Policies {
            default,
            policies: out,
        })
    }

    /// Decides for `source` (None: not an authenticated identity) reaching the workload
    /// `(namespace, name)` on `port`, with the HTTP request `http` (method, path) if any.
    pub fn decide(
        &self,
        source: Option<&str>,
        dest: (&str, &str),
        port: u16,
        http: Option<(&str, &str)>,
    ) -> Decision {
        let mut candidates = self.policies.iter().filter(|p| {
            p.namespace == dest.0
                && p.workload == dest.1
                && (p.ports.is_empty() || p.ports.contains(&port))
        });
        let Some(first) = candidates.next() else {
            let allowed = match self.default {
                DefaultPolicy::AllowAll => true,
                DefaultPolicy::MeshOnly => source.is_some(),
                DefaultPolicy::DenyAll => false,
            };
            return Decision {
                allowed,
                policy: self.default.as_str().to_owned(),
            };
        };
        for p in std::iter::once(first).chain(candidates) {
            if p.allows(source, http) {
                return Decision {
                    allowed: true,
                    policy: p.name.clone(),
                };
            }
        }
        Decision {
            allowed: false,
            policy: first.name.clone(),
        }
    }

    /// Whether `source` passes the identity and port part of some policy of the workload
    /// (HTTP rules aside): a connection that must then be decided per request. The name is
    /// the first candidate's when none does.
    pub fn allows_identity(&self, source: Option<&str>, dest: (&str, &str), port: u16) -> Decision {
        let candidates: Vec<&Policy> = self
            .policies
            .iter()
            .filter(|p| {
                p.namespace == dest.0
                    && p.workload == dest.1
                    && (p.ports.is_empty() || p.ports.contains(&port))
            })
            .collect();
        if candidates.is_empty() {
            return self.decide(source, dest, port, None);
        }
        for p in &candidates {
            if source.is_some_and(|id| p.allow.iter().any(|a| a.matches(id))) {
                return Decision {
                    allowed: true,
                    policy: p.name.clone(),
                };
            }
        }
        Decision {
            allowed: false,
            policy: candidates[0].name.clone(),
        }
    }

    /// Whether any policy of the workload has HTTP rules (then its connections must be
    /// decided per request).
    pub fn has_http_rules(&self, dest: (&str, &str)) -> bool {
        self.policies
            .iter()
            .any(|p| p.namespace == dest.0 && p.workload == dest.1 && !p.rules.is_empty())
    }
}

impl Policy {
    fn allows(&self, source: Option<&str>, http: Option<(&str, &str)>) -> bool {
        let Some(id) = source else {
            return false;
        };
        if !self.allow.iter().any(|a| a.matches(id)) {
            return false;
        }
        if self.rules.is_empty() {
            return true;
        }
        let Some((method, path)) = http else {
            return false;
        };
        self.rules.iter().any(|r| {
            (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
                && r.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
        })
    }
}

/// An authorization decision and the policy that made it (a policy name, or the default's
/// name such as `deny-all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub policy: String,
}

fn label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    let s = s.trim();
    if s == "*" {
        return Ok(Pattern::Prefix(String::new()));
    }
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return Err("not a SPIFFE ID or pattern".into());
    };
    if rest.is_empty() || s.len() > 2048 {
        return Err("empty or too long".into());
    }
    match s.strip_suffix('*') {
        Some(prefix) if prefix.contains('*') => Err("only one * allowed, at the end".into()),
        Some(prefix) => Ok(Pattern::Prefix(prefix.to_owned())),
        None if s.contains('*') => Err("* is allowed only at the end".into()),
        None => Ok(Pattern::Exact(s.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies(text: &str) -> Result<Policies, ConfigError> {
        #[derive(Deserialize)]
        struct F {
            #[serde(default)]
            authorization: AuthorizationSection,
            #[serde(default)]
            policy: Vec<PolicySection>,
        }
        let f: F = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "t.toml".into(),
            message: e.to_string(),
        })?;
        Policies::resolve(f.authorization, f.policy)
    }

    const FRONT: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/x";

    #[test]
    fn defaults_apply_without_candidates() -> Result<(), ConfigError> {
        let p = policies("")?;
        assert!(p.decide(None, ("default", "web"), 80, None).allowed);
        let p = policies("[authorization]\ndefault = \"mesh-only\"\n")?;
        assert!(!p.decide(None, ("default", "web"), 80, None).allowed);
        assert!(p.decide(Some(OTHER), ("default", "web"), 80, None).allowed);
        let p = policies("[authorization]\ndefault = \"deny-all\"\n")?;
        let d = p.decide(Some(FRONT), ("default", "web"), 80, None);
        assert!(!d.allowed && d.policy == "deny-all");
        Ok(())
    }

    #[test]
    fn identity_port_and_http_rules() -> Result<(), ConfigError> {
        let p = policies(&format!(
            r#"
[authorization]
default = "deny-all"
[[policy]]
name = "web-tcp"
workload = "web"
ports = [8080]
allow = ["{FRONT}"]
[[policy]]
name = "api-read"
workload = "api"
allow = ["spiffe://cluster.local/ns/shop/*"]
rules = [ {{ methods = ["GET"], path_prefix = "/v1" }} ]
"#
        ))?;
        assert!(
            p.decide(Some(FRONT), ("default", "web"), 8080, None)
                .allowed
        );
        let d = p.decide(Some(OTHER), ("default", "web"), 8080, None);
        assert!(!d.allowed && d.policy == "web-tcp");
        // Another port is not covered: the default (deny-all) decides.
        let d = p.decide(Some(FRONT), ("default", "web"), 9090, None);
        assert!(!d.allowed && d.policy == "deny-all");
        assert!(
            p.decide(
                Some(FRONT),
                ("default", "api"),
                80,
                Some(("GET", "/v1/items"))
            )
            .allowed
        );
        assert!(
            !p.decide(
                Some(FRONT),
                ("default", "api"),
                80,
                Some(("POST", "/v1/items"))
            )
            .allowed
        );
        assert!(
            !p.decide(Some(FRONT), ("default", "api"), 80, Some(("GET", "/admin")))
                .allowed
        );
        // Opaque TCP cannot satisfy HTTP rules.
        assert!(!p.decide(Some(FRONT), ("default", "api"), 80, None).allowed);
        assert!(
            !p.decide(None, ("default", "api"), 80, Some(("GET", "/v1")))
                .allowed
        );
        assert!(p.has_http_rules(("default", "api")) && !p.has_http_rules(("default", "web")));
        Ok(())
    }

    #[test]
    fn bad_policies_name_field_and_fix() {
        let cases = [
            (
                "[authorization]\ndefault = \"maybe\"\n",
                "authorization.default",
            ),
            ("[[policy]]\nworkload = \"w\"\n", "policy.name"),
            ("[[policy]]\nname = \"p\"\n", "policy.workload"),
            (
                "[[policy]]\nname = \"p\"\nworkload = \"w\"\nallow = [\"frontend\"]\n",
                "policy.allow",
            ),
            (
                "[[policy]]\nname = \"p\"\nworkload = \"w\"\nallow = [\"spiffe://a/*/b\"]\n",
                "policy.allow",
            ),
            (
                "[[policy]]\nname = \"p\"\nworkload = \"w\"\nrules = [{ methods = [\"get\"] }]\n",
                "policy.rules.methods",
            ),
            (
                "[[policy]]\nname = \"p\"\nworkload = \"w\"\nrules = [{ path_prefix = \"api\" }]\n",
                "policy.rules.path_prefix",
            ),
            (
                "[[policy]]\nname = \"p\"\nworkload = \"w\"\n[[policy]]\nname = \"p\"\nworkload = \"v\"\n",
                "unique",
            ),
            (
                "[[policy]]\nname = \"p\"\nworkload = \"w\"\nports = [0]\n",
                "policy.ports",
            ),
        ];
        for (text, want) in cases {
            match policies(text) {
                Ok(p) => panic!("{text:?} should fail, got {p:?}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains(want) && e.contains("fix:"), "{text:?}: {e}");
                }
            }
        }
    }
}
