//! The config file's service catalog: `[[service]]` and `[[workload]]` tables, validated into
//! [`Catalog`]. Validation errors use the config's error type, so they name the field (with
//! the service's name), the value and the fix, like every other config error.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;

use crate::{
    balance::CircuitPolicy,
    config::{ConfigError, invalid},
};

// === file format ===

/// `[[service]]`: a virtual address workloads connect to, and the endpoints behind it.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub name: Option<String>,
    /// Virtual addresses (IPv4 and/or IPv6) workloads connect to.
    pub addresses: Option<Vec<String>>,
    pub ports: Option<Vec<u16>>,
    /// `auto` (detect), `http1`, `http2`, `grpc` or `opaque`.
    pub protocol: Option<String>,
    pub endpoints: Option<Vec<EndpointSection>>,
    /// A request body larger than this is refused with 413 (where the proxy must buffer it
    /// for a retry, or when the body is declared larger up front).
    pub max_request_body_bytes: Option<u64>,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    #[serde(default)]
    pub retry: RetrySection,
    #[serde(default)]
    pub circuit: CircuitSection,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct EndpointSection {
    pub address: Option<String>,
    /// Defaults to the service port the workload connected to.
    pub port: Option<u16>,
    pub weight: Option<u32>,
    /// The endpoint's workload identity (a SPIFFE ID), when known.
    pub identity: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSection {
    pub connect_ms: Option<u64>,
    /// From the request's arrival to the response's headers, retries included. 0: none.
    pub request_ms: Option<u64>,
    /// Idle upstream connections are closed after this long.
    pub idle_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    /// Retries after the first try (0: no retries).
    pub attempts: Option<u32>,
    /// Upstream statuses retried (for idempotent requests only).
    pub statuses: Option<Vec<u16>>,
    /// Per-try timeout (to the response's headers). 0: none.
    pub per_try_timeout_ms: Option<u64>,
    /// Request bodies up to this size are kept so that they can be replayed.
    pub max_body_bytes: Option<usize>,
    /// Retries allowed as a share of requests over the last 10 s ...
    pub budget_ratio: Option<f64>,
    /// ... plus this many per second.
    pub budget_min_per_sec: Option<u32>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct CircuitSection {
    /// Consecutive failures that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: Option<u32>,
    pub base_ejection_ms: Option<u64>,
    pub max_ejection_ms: Option<u64>,
}

/// `[[workload]]`: which local pods (cgroups) belong to which workload.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSection {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// SPIFFE ID; derived from namespace and name when left out.
    pub identity: Option<String>,
    /// Cgroup directories of the workload's pods, relative to the cgroup v2 mount.
    pub cgroups: Option<Vec<String>>,
    /// The pods' addresses: connections to them are authorized by this node's policies.
    pub addresses: Option<Vec<String>>,
}

// === validated ===

/// What a service speaks, as its config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolHint {
    /// Detect per connection.
    Auto,
    Http1,
    Http2,
    /// HTTP/2 with gRPC's error mapping (proxy errors become `grpc-status` trailers).
    Grpc,
    /// Plain TCP, no detection: balanced per connection.
    Opaque,
}

impl ProtocolHint {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolHint::Auto => "auto",
            ProtocolHint::Http1 => "http1",
            ProtocolHint::Http2 => "http2",
            ProtocolHint::Grpc => "grpc",
            ProtocolHint::Opaque => "opaque",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub statuses: Vec<u16>,
    pub per_try_timeout: Option<Duration>,
    pub max_body_bytes: usize,
    pub budget_ratio: f64,
    pub budget_min_per_sec: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<u16>,
    pub protocol: ProtocolHint,
    pub endpoints: Vec<EndpointSpec>,
    pub connect_timeout: Duration,
    pub request_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub max_request_body: Option<u64>,
    pub retry: RetryPolicy,
    pub circuit: CircuitPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub address: IpAddr,
    pub port: Option<u16>,
    pub weight: u32,
    pub identity: Option<String>,
}

impl EndpointSpec {
    /// The endpoint's socket address for a connection to service port `port`.
    pub fn socket_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.address, self.port.unwrap_or(port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub cgroups: Vec<PathBuf>,
    pub addresses: Vec<IpAddr>,
}

/// Services and workloads, validated. What discovery serves; reloadable.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub services: Vec<ServiceSpec>,
    pub workloads: Vec<WorkloadSpec>,
    pub policies: crate::authz::Policies,
}

/// The trust domain of identities derived from workload names when `[identity]` does not
/// name one.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Most services and endpoints a catalog may hold: bounds the memory a config file (or a
/// typo that repeats a table) can take, and the metrics' label sets.
pub const MAX_SERVICES: usize = 4096;
pub const MAX_ENDPOINTS_PER_SERVICE: usize = 4096;

impl Catalog {
    pub fn resolve(
        services: Vec<ServiceSection>,
        workloads: Vec<WorkloadSection>,
        policies: crate::authz::Policies,
        trust_domain: &str,
    ) -> Result<Catalog, ConfigError> {
        if services.len() > MAX_SERVICES {
            return Err(invalid(
                "service",
                services.len(),
                format!("more than {MAX_SERVICES} services"),
                "split the mesh across nodes or raise the limit in the source",
            ));
        }
        let mut names = HashSet::new();
        let mut taken: HashMap<SocketAddr, String> = HashMap::new();
        let mut out = Vec::with_capacity(services.len());
        for (i, s) in services.into_iter().enumerate() {
            let spec = resolve_service(i, s)?;
            if !names.insert(spec.name.clone()) {
                return Err(invalid(
                    "service.name",
                    &spec.name,
                    "two services have this name",
                    "give every [[service]] a unique name",
                ));
            }
            for ip in &spec.addresses {
                for port in &spec.ports {
                    let sa = SocketAddr::new(*ip, *port);
                    if let Some(other) = taken.insert(sa, spec.name.clone()) {
                        return Err(invalid(
                            "service.addresses",
                            sa,
                            format!("both service {other:?} and {:?} claim it", spec.name),
                            "give each service its own virtual address and port",
                        ));
                    }
                }
            }
            out.push(spec);
        }
        let mut wl = Vec::with_capacity(workloads.len());
        let mut wl_names = HashSet::new();
        let mut cgroups_seen = HashSet::new();
        let mut addrs_seen = HashSet::new();
        for w in workloads {
            let spec = resolve_workload(w, trust_domain)?;
            if !wl_names.insert((spec.namespace.clone(), spec.name.clone())) {
                return Err(invalid(
                    "workload.name",
                    &spec.name,
                    "two workloads have this name in the same namespace",
                    "give every [[workload]] a unique name",
                ));
            }
            for a in &spec.addresses {
                if !addrs_seen.insert(*a) {
                    return Err(invalid(
                        "workload.addresses",
                        a,
                        "the address belongs to two workloads",
                        "list each pod address under one workload only",
                    ));
                }
            }
            for c in &spec.cgroups {
                if !cgroups_seen.insert(c.clone()) {
                    return Err(invalid(
                        "workload.cgroups",
                        c.display(),
                        "the cgroup belongs to two workloads",
                        "list each pod's cgroup under one workload only",
                    ));
                }
            }
            wl.push(spec);
        }
        Ok(Catalog {
            services: out,
            workloads: wl,
            policies,
        })
    }
}

fn resolve_service(index: usize, s: ServiceSection) -> Result<ServiceSpec, ConfigError> {
    let name = s.name.unwrap_or_default();
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !name_ok {
        return Err(invalid(
            "service.name",
            if name.is_empty() {
                format!("(unset, service #{})", index + 1)
            } else {
                name
            },
            "a service needs a name of 1-63 letters, digits, '-', '_' or '.' (it labels metrics)",
            "set name = \"my-service\"",
        ));
    }
    let ctx = |field: &str| format!("{field} of service {name}");
    let addr_text = s.addresses.unwrap_or_default();
    if addr_text.is_empty() {
        return Err(invalid(
            "service.addresses",
            ctx("(unset)"),
            "a service needs at least one virtual address",
            "set addresses = [\"10.96.0.10\"] (IPv4 and/or IPv6)",
        ));
    }
    let mut addresses = Vec::new();
    for a in &addr_text {
        let ip: IpAddr = a.trim().parse().map_err(|_| {
            invalid(
                "service.addresses",
                format!("{a} ({})", ctx("address")),
                "not an IP address",
                "write plain addresses such as 10.96.0.10 or fd00:96::10",
            )
        })?;
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            return Err(invalid(
                "service.addresses",
                format!("{ip} ({})", ctx("address")),
                "unspecified, multicast and loopback addresses are never intercepted",
                "use a virtual address outside 127.0.0.0/8 and ::1",
            ));
        }
        addresses.push(ip);
    }
    let ports = s.ports.unwrap_or_default();
    if ports.is_empty() || ports.contains(&0) {
        return Err(invalid(
            "service.ports",
            format!("{ports:?} ({})", ctx("ports")),
            "a service needs one or more ports, none of them 0",
            "set ports = [80]",
        ));
    }
    let protocol = match s.protocol.as_deref().map(str::trim) {
        None | Some("auto") => ProtocolHint::Auto,
        Some("http1") => ProtocolHint::Http1,
        Some("http2") => ProtocolHint::Http2,
        Some("grpc") => ProtocolHint::Grpc,
        Some("opaque") => ProtocolHint::Opaque,
        Some(other) => {
            return Err(invalid(
                "service.protocol",
                format!("{other} ({})", ctx("protocol")),
                "unknown protocol",
                "use auto, http1, http2, grpc or opaque",
            ));
        }
    };
    let eps = s.endpoints.unwrap_or_default();
    if eps.len() > MAX_ENDPOINTS_PER_SERVICE {
        return Err(invalid(
            "service.endpoints",
            ctx("endpoints"),
            format!("more than {MAX_ENDPOINTS_PER_SERVICE} endpoints"),
            "split the service",
        ));
    }
    let mut endpoints = Vec::with_capacity(eps.len());
    let mut seen = HashSet::new();
    for e in eps {
        let text = e.address.unwrap_or_default();
        let address: IpAddr = text.trim().parse().map_err(|_| {
            invalid(
                "service.endpoints.address",
                format!("{text:?} ({})", ctx("endpoint")),
                "not an IP address",
                "write endpoints as { address = \"10.0.0.5\", port = 8080 }",
            )
        })?;
        if address.is_unspecified() || address.is_multicast() {
            return Err(invalid(
                "service.endpoints.address",
                format!("{address} ({})", ctx("endpoint")),
                "an endpoint cannot be an unspecified or multicast address",
                "use the address of the pod or host serving the service",
            ));
        }
        if e.port == Some(0) {
            return Err(invalid(
                "service.endpoints.port",
                format!("0 ({})", ctx("endpoint")),
                "port 0 is not a destination",
                "leave port out to use the service port, or set the port the endpoint listens on",
            ));
        }
        let weight = e.weight.unwrap_or(1);
        if !(1..=10_000).contains(&weight) {
            return Err(invalid(
                "service.endpoints.weight",
                format!("{weight} ({})", ctx("endpoint")),
                "out of range 1..=10000",
                "use relative weights such as 1 and 3; remove an endpoint instead of weighting it 0",
            ));
        }
        if let Some(id) = &e.identity {
            check_spiffe("service.endpoints.identity", id)?;
        }
        if !seen.insert((address, e.port)) {
            return Err(invalid(
                "service.endpoints",
                format!("{address}:{:?} ({})", e.port, ctx("endpoint")),
                "listed twice",
                "list each endpoint once (use weight for a larger share)",
            ));
        }
        endpoints.push(EndpointSpec {
            address,
            port: e.port,
            weight,
            identity: e.identity,
        });
    }
    let ms = |field: &'static str, v: Option<u64>, default: u64, max: u64, fix: &'static str| {
        let v = v.unwrap_or(default);
        if v > max {
            return Err(invalid(
                field,
                format!("{v} ({})", ctx(field)),
                format!("out of range 0..={max}"),
                fix,
            ));
        }
        Ok(v)
    };
    let connect_ms = ms(
        "service.timeouts.connect_ms",
        s.timeouts.connect_ms,
        1000,
        600_000,
        "use about a second on a node network",
    )?;
    if connect_ms == 0 {
        return Err(invalid(
            "service.timeouts.connect_ms",
            format!("0 ({})", ctx("timeouts")),
            "a connect needs some time",
            "use about 1000",
        ));
    }
    let request_ms = ms(
        "service.timeouts.request_ms",
        s.timeouts.request_ms,
        15_000,
        3_600_000,
        "use the slowest response the service should give, or 0 for none",
    )?;
    let idle_ms = ms(
        "service.timeouts.idle_ms",
        s.timeouts.idle_ms,
        60_000,
        3_600_000,
        "use about a minute",
    )?;
    let per_try_ms = ms(
        "service.retry.per_try_timeout_ms",
        s.retry.per_try_timeout_ms,
        0,
        3_600_000,
        "use less than timeouts.request_ms, or 0 for none",
    )?;
    let attempts = s.retry.attempts.unwrap_or(2);
    if attempts > 10 {
        return Err(invalid(
            "service.retry.attempts",
            format!("{attempts} ({})", ctx("retry")),
            "more than 10 retries multiply load on a failing service",
            "use 0..=10 (default 2)",
        ));
    }
    let statuses = s.retry.statuses.unwrap_or_else(|| vec![502, 503, 504]);
    if let Some(bad) = statuses.iter().find(|c| !(500..=599).contains(*c)) {
        return Err(invalid(
            "service.retry.statuses",
            format!("{bad} ({})", ctx("retry")),
            "only 5xx responses are retried",
            "list 5xx statuses such as [502, 503, 504]",
        ));
    }
    let max_body_bytes = s.retry.max_body_bytes.unwrap_or(64 * 1024);
    if max_body_bytes > 16 << 20 {
        return Err(invalid(
            "service.retry.max_body_bytes",
            format!("{max_body_bytes} ({})", ctx("retry")),
            "out of range 0..=16777216 (the proxy keeps this much per request in memory)",
            "use 65536",
        ));
    }
    let budget_ratio = s.retry.budget_ratio.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&budget_ratio) {
        return Err(invalid(
            "service.retry.budget_ratio",
            format!("{budget_ratio} ({})", ctx("retry")),
            "out of range 0.0..=1.0",
            "use 0.2: retries add at most 20 % to live traffic",
        ));
    }
    let budget_min_per_sec = s.retry.budget_min_per_sec.unwrap_or(10);
    if budget_min_per_sec > 10_000 {
        return Err(invalid(
            "service.retry.budget_min_per_sec",
            format!("{budget_min_per_sec} ({})", ctx("retry")),
            "out of range 0..=10000",
            "use 10",
        ));
    }
    let consecutive_failures = s.circuit.consecutive_failures.unwrap_or(5);
    let base = ms(
        "service.circuit.base_ejection_ms",
        s.circuit.base_ejection_ms,
        1000,
        3_600_000,
        "use about a second",
    )?;
    let max = ms(
        "service.circuit.max_ejection_ms",
        s.circuit.max_ejection_ms,
        30_000,
        3_600_000,
        "use about 30 s",
    )?;
    if base == 0 || max < base {
        return Err(invalid(
            "service.circuit.max_ejection_ms",
            format!("{max} ({})", ctx("circuit")),
            format!("must be at least base_ejection_ms ({base}), which must not be 0"),
            "set base_ejection_ms = 1000 and max_ejection_ms = 30000",
        ));
    }
    if s.max_request_body_bytes == Some(0) {
        return Err(invalid(
            "service.max_request_body_bytes",
            format!("0 ({})", ctx("max_request_body_bytes")),
            "0 would refuse every request with a body",
            "leave it out for no limit, or set the largest body the service accepts",
        ));
    }
    let nonzero = |v: u64| (v > 0).then(|| Duration::from_millis(v));
    Ok(ServiceSpec {
        name,
        addresses,
        ports,
        protocol,
        endpoints,
        connect_timeout: Duration::from_millis(connect_ms),
        request_timeout: nonzero(request_ms),
        idle_timeout: Duration::from_millis(idle_ms.max(1)),
        max_request_body: s.max_request_body_bytes,
        retry: RetryPolicy {
            attempts,
            statuses,
            per_try_timeout: nonzero(per_try_ms),
            max_body_bytes,
            budget_ratio,
            budget_min_per_sec,
        },
        circuit: CircuitPolicy {
            consecutive_failures,
            base_ejection: Duration::from_millis(base),
            max_ejection: Duration::from_millis(max),
        },
    })
}

fn resolve_workload(w: WorkloadSection, trust_domain: &str) -> Result<WorkloadSpec, ConfigError> {
    let name = w.name.unwrap_or_default();
    let label_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !label_ok(&name) {
        return Err(invalid(
            "workload.name",
            if name.is_empty() { "(unset)" } else { &name },
            "a workload needs a name of 1-63 letters, digits, '-', '_' or '.'",
            "set name = \"frontend\"",
        ));
    }
    let namespace = w.namespace.unwrap_or_else(|| "default".into());
    if !label_ok(&namespace) {
        return Err(invalid(
            "workload.namespace",
            &namespace,
            "a namespace is 1-63 letters, digits, '-', '_' or '.'",
            "set namespace = \"default\"",
        ));
    }
    let identity = match w.identity {
        Some(id) => {
            check_spiffe("workload.identity", &id)?;
            id
        }
        None => format!("spiffe://{trust_domain}/ns/{namespace}/sa/{name}"),
    };
    let mut cgroups = Vec::new();
    for c in w.cgroups.unwrap_or_default() {
        let p = PathBuf::from(c.trim().trim_start_matches('/'));
        if p.as_os_str().is_empty()
            || p.components()
                .any(|x| x.as_os_str() == ".." || x.as_os_str() == ".")
        {
            return Err(invalid(
                "workload.cgroups",
                format!("{c:?} (workload {name:?})"),
                "must name a cgroup directory below the cgroup v2 mount, without '.' or '..'",
                "write it relative to the cgroup v2 mount, e.g. ebpf-mesh/workloads/pod-a",
            ));
        }
        cgroups.push(p);
    }
    let mut addresses = Vec::new();
    for a in w.addresses.unwrap_or_default() {
        let ip: IpAddr = a.trim().parse().map_err(|_| {
            invalid(
                "workload.addresses",
                format!("{a:?} (workload {name:?})"),
                "not an IP address",
                "list the pods' addresses, e.g. addresses = [\"10.0.1.5\"]",
            )
        })?;
        addresses.push(ip);
    }
    Ok(WorkloadSpec {
        name,
        namespace,
        identity,
        cgroups,
        addresses,
    })
}

/// A SPIFFE ID as the mesh writes them: `spiffe://<trust-domain>/<path>`.
fn check_spiffe(field: &'static str, id: &str) -> Result<(), ConfigError> {
    let rest = id.strip_prefix("spiffe://").unwrap_or("");
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let ok = !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c))
        && !path.is_empty()
        && id.len() <= 2048
        && path
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            id,
            "not a SPIFFE ID",
            "write spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, trust domain in lowercase",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(text: &str) -> Result<Catalog, ConfigError> {
        #[derive(Deserialize)]
        struct F {
            #[serde(default)]
            service: Vec<ServiceSection>,
            #[serde(default)]
            workload: Vec<WorkloadSection>,
        }
        let f: F = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "t.toml".into(),
            message: e.to_string(),
        })?;
        Catalog::resolve(
            f.service,
            f.workload,
            crate::authz::Policies::default(),
            DEFAULT_TRUST_DOMAIN,
        )
    }

    const GOOD: &str = r#"
[[service]]
name = "web"
addresses = ["10.96.0.10", "fd00:96::10"]
ports = [80]
protocol = "http1"
endpoints = [ { address = "10.77.1.2", port = 8080 }, { address = "10.77.2.2", weight = 3, identity = "spiffe://cluster.local/ns/default/sa/web" } ]
[service.retry]
attempts = 1
[service.circuit]
consecutive_failures = 0

[[workload]]
name = "client"
cgroups = ["mesh/pod0"]
"#;

    #[test]
    fn a_full_service_resolves() -> Result<(), ConfigError> {
        let c = svc(GOOD)?;
        let s = &c.services[0];
        assert_eq!(s.name, "web");
        assert_eq!(s.protocol, ProtocolHint::Http1);
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.endpoints[0].socket_addr(80).port(), 8080);
        assert_eq!(s.endpoints[1].socket_addr(80).port(), 80);
        assert_eq!(s.endpoints[1].weight, 3);
        assert_eq!(s.retry.attempts, 1);
        assert_eq!(s.circuit.consecutive_failures, 0);
        assert_eq!(s.request_timeout, Some(Duration::from_secs(15)));
        let w = &c.workloads[0];
        assert_eq!(w.identity, "spiffe://cluster.local/ns/default/sa/client");
        assert_eq!(w.cgroups, vec![PathBuf::from("mesh/pod0")]);
        Ok(())
    }

    fn err(text: &str) -> String {
        match svc(text) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_services_name_the_field_and_the_service() {
        let e = err("[[service]]\naddresses = [\"10.96.0.1\"]\nports = [80]\n");
        assert!(e.contains("service.name") && e.contains("#1"), "{e}");
        let e = err("[[service]]\nname = \"a\"\nports = [80]\n");
        assert!(
            e.contains("service.addresses") && e.contains("of service a"),
            "{e}"
        );
        let e = err("[[service]]\nname = \"a\"\naddresses = [\"10.96.0.300\"]\nports = [80]\n");
        assert!(e.contains("10.96.0.300") && e.contains("fix:"), "{e}");
        let e = err("[[service]]\nname = \"a\"\naddresses = [\"127.0.0.1\"]\nports = [80]\n");
        assert!(e.contains("loopback"), "{e}");
        let e = err("[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = []\n");
        assert!(e.contains("service.ports"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\nprotocol = \"h3\"\n",
        );
        assert!(e.contains("service.protocol") && e.contains("h3"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\nendpoints = [{ address = \"x\" }]\n",
        );
        assert!(e.contains("service.endpoints.address"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\nendpoints = [{ address = \"10.0.0.1\", weight = 0 }]\n",
        );
        assert!(e.contains("weight"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\nendpoints = [{ address = \"10.0.0.1\" }, { address = \"10.0.0.1\" }]\n",
        );
        assert!(e.contains("listed twice"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\n[[service]]\nname = \"b\"\naddresses = [\"10.96.0.1\"]\nports = [80]\n",
        );
        assert!(e.contains("claim"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\n[[service]]\nname = \"a\"\naddresses = [\"10.96.0.2\"]\nports = [80]\n",
        );
        assert!(e.contains("unique"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\n[service.retry]\nstatuses = [404]\n",
        );
        assert!(e.contains("service.retry.statuses"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\n[service.retry]\nbudget_ratio = 2.0\n",
        );
        assert!(e.contains("budget_ratio"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\n[service.circuit]\nbase_ejection_ms = 5000\nmax_ejection_ms = 10\n",
        );
        assert!(e.contains("max_ejection_ms"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\nendpoints = [{ address = \"10.0.0.1\", identity = \"web\" }]\n",
        );
        assert!(e.contains("SPIFFE"), "{e}");
        let e = err("[[workload]]\nname = \"w\"\ncgroups = [\"../x\"]\n");
        assert!(e.contains("workload.cgroups"), "{e}");
        let e = err(
            "[[workload]]\nname = \"w\"\ncgroups = [\"a\"]\n[[workload]]\nname = \"v\"\ncgroups = [\"a\"]\n",
        );
        assert!(e.contains("two workloads"), "{e}");
    }

    #[test]
    fn mutations_never_panic() {
        for cut in 0..GOOD.len() {
            if GOOD.is_char_boundary(cut) {
                let _ = svc(&GOOD[..cut]);
            }
        }
        let bytes = GOOD.as_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x21;
            if let Ok(s) = std::str::from_utf8(&b) {
                let _ = svc(s);
            }
        }
    }
}
