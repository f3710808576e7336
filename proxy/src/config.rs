//! Configuration: a TOML file, overridden by command-line flags, validated once into
//! [`Config`]. Every error names the field, the value and what to do about it.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::Deserialize;

use crate::{
    authz::{AuthorizationSection, Policies, PolicySection},
    discovery::spec::{Catalog, ServiceSection, WorkloadSection},
};

/// Where the default config file lives on a node.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ebpf-mesh/proxy.toml";

// === file format ===

/// The config file as written by an operator. Every field is optional; defaults are filled
/// in by [`Config::resolve`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub intercept: InterceptSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub detect: DetectSection,
    #[serde(default)]
    pub http: HttpSection,
    /// `[[service]]` tables: see `discovery::spec`.
    #[serde(default)]
    pub service: Vec<ServiceSection>,
    /// `[[workload]]` tables: see `discovery::spec`.
    #[serde(default)]
    pub workload: Vec<WorkloadSection>,
    /// The node's default authorization: see `authz`.
    #[serde(default)]
    pub authorization: AuthorizationSection,
    /// `[[policy]]` tables: see `authz`.
    #[serde(default)]
    pub policy: Vec<PolicySection>,
    /// Certificates from the mesh's issuer (mutual TLS between nodes).
    pub identity: Option<IdentitySection>,
    /// This node's place in the mesh: its name, tunnel port and the other nodes.
    #[serde(default)]
    pub mesh: MeshSection,
    /// Where services and workloads come from: this file or the Kubernetes API.
    #[serde(default)]
    pub discovery: DiscoverySection,
    /// The API server to watch when `discovery.mode = "kubernetes"`.
    #[serde(default)]
    pub kubernetes: KubernetesSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySection {
    /// `file` (default: `[[service]]`/`[[workload]]` tables) or `kubernetes`.
    pub mode: Option<String>,
}

/// `[kubernetes]`: read only in `discovery.mode = "kubernetes"`. See `discovery::kubernetes`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    /// `https://HOST:PORT`; default from KUBERNETES_SERVICE_HOST/PORT (in a pod).
    pub api_server: Option<String>,
    /// Bearer token, re-read by the client (projected tokens rotate).
    pub token_file: Option<String>,
    /// PEM bundle the API server's certificate is checked against.
    pub ca_file: Option<String>,
    /// This node's name as Kubernetes knows it; default env NODE_NAME, else mesh.node_name.
    pub node_name: Option<String>,
    /// Only pods in namespaces with this label (`key=value` or `key`) are workloads.
    pub namespace_label: Option<String>,
    /// The kubelet's cgroup driver: `systemd` (default) or `cgroupfs`.
    pub cgroup_driver: Option<String>,
    /// Where the kubelet's cgroup tree starts, relative to the cgroup v2 mount (default "").
    pub cgroup_root: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    pub trust_domain: Option<String>,
    /// The issuer's ADDRESS:PORT (`proxy identity serve`).
    pub issuer: Option<String>,
    /// PEM bundle of the mesh's trust anchors (`anchors.pem` of the CA directory).
    pub anchors: Option<String>,
    /// File holding this node's bootstrap token for the issuer.
    pub token_file: Option<String>,
    /// Renew a certificate when this fraction of its lifetime has passed.
    pub rotate_fraction: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// This node's name (its identity is spiffe://<td>/ns/ebpf-mesh/sa/node-<name>).
    pub node_name: Option<String>,
    /// Port of the mutual-TLS tunnel (HTTP/2 CONNECT) other nodes connect to.
    pub inbound_port: Option<u16>,
    /// Address the tunnel listener binds.
    pub inbound_bind: Option<String>,
    /// The other nodes: traffic to their pods goes through their tunnel port.
    #[serde(default)]
    pub peer: Vec<PeerSection>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub name: Option<String>,
    /// The peer's tunnel ADDRESS:PORT.
    pub address: Option<String>,
    /// The peer's pod networks.
    pub pod_cidrs: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectSection {
    /// How long protocol detection waits for a client's first bytes.
    pub timeout_ms: Option<u64>,
    /// Destination ports that skip detection (server-speaks-first protocols).
    pub opaque_ports: Option<Vec<u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// A client must send a request's headers within this time (slowloris).
    pub header_read_timeout_ms: Option<u64>,
    /// Largest request head (HTTP/1) or header list (HTTP/2) accepted; larger gets 431.
    pub max_header_bytes: Option<usize>,
    /// Concurrent streams an HTTP/2 client may open on one connection.
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the admin server (health, metrics, debug).
    pub address: Option<String>,
    /// Allow an address other than loopback (the admin API must never face workloads by
    /// accident).
    pub allow_non_loopback: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// Port that redirected connections arrive on.
    pub port: Option<u16>,
    /// IPv4 address workloads' connects are rewritten to. It must reach the proxy from inside
    /// the workloads' network namespaces (on a node: an address of the node).
    pub redirect_ipv4: Option<String>,
    /// IPv6 address workloads' connects are rewritten to; leave out to not intercept IPv6.
    pub redirect_ipv6: Option<String>,
    /// Address the IPv4 listener binds.
    pub bind_ipv4: Option<String>,
    /// Address the IPv6 listener binds.
    pub bind_ipv6: Option<String>,
    /// How often the config file is checked for changes (services and workloads reload
    /// without a restart).
    pub reload_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptSection {
    pub mode: Option<String>,
    pub workload_cgroup: Option<String>,
    pub proxy_cgroup: Option<String>,
    pub pin_dir: Option<String>,
    pub fail_mode: Option<String>,
    pub sockmap: Option<bool>,
    /// "adaptive" (default) or "naive" (every message redirected, no bound: for the bench).
    pub sockmap_policy: Option<String>,
    /// Kernel memory (bytes plus a struct per message) that may wait unread in one socket's
    /// short-circuit queue.
    pub sockmap_queue_limit: Option<u32>,
    /// Writes smaller than this count for the stream rule.
    pub sockmap_small_write: Option<u32>,
    /// Writes in a row (receiver still has unread bytes) that make a stream: its connection
    /// leaves the short-circuit for plain TCP.
    pub sockmap_small_streak: Option<u32>,
    /// With the short-circuit on: authorized same-node opaque TCP connections go workload to
    /// workload in the kernel, without the proxy in the data path (default true).
    pub kernel_path: Option<bool>,
    /// Ports whose connections stay off the short-circuit (at most 8): the port a workload
    /// connects to, or a workload server's port.
    pub sockmap_exclude_ports: Option<Vec<u16>>,
    /// With the short-circuit on: register blocking workload sockets too, and keep those
    /// that turn blocking after registering (default false: a blocking reader there can get
    /// a spurious EAGAIN from the kernel).
    pub sockmap_blocking_sockets: Option<bool>,
    /// Intercept only declared workloads' cgroups (and their descendants), not everything
    /// below the workload cgroup parent.
    pub workloads_only: Option<bool>,
    pub exclude_ports: Option<Vec<u16>>,
    pub exclude_cidrs: Option<Vec<String>>,
    pub iptables_interfaces: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub sockhash_entries: Option<u32>,
    pub connect_timeout_ms: Option<u64>,
    pub copy_buffer_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub level: Option<String>,
    pub json: Option<bool>,
    /// Debug records from the kernel programs (aya-log), one per intercepted connect.
    pub kernel: Option<bool>,
}

// === overrides from the command line ===

/// Flags of `proxy run` / `proxy check` that override the file. Built by main.rs from clap.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub port: Option<u16>,
    pub redirect_ipv4: Option<String>,
    pub redirect_ipv6: Option<String>,
    pub mode: Option<String>,
    pub workload_cgroup: Option<String>,
    pub proxy_cgroup: Option<String>,
    pub pin_dir: Option<String>,
    pub fail_mode: Option<String>,
    pub sockmap: Option<bool>,
    pub sockmap_policy: Option<String>,
    pub sockmap_queue_limit: Option<u32>,
    pub sockmap_small_streak: Option<u32>,
    pub sockmap_small_write: Option<u32>,
    pub kernel_path: Option<bool>,
    pub sockmap_exclude_ports: Vec<u16>,
    pub sockmap_blocking_sockets: Option<bool>,
    pub workloads_only: Option<bool>,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<String>,
    pub iptables_interfaces: Vec<String>,
    pub sockhash_entries: Option<u32>,
    pub admin_address: Option<String>,
    pub log_level: Option<String>,
    pub log_json: bool,
    pub log_kernel: bool,
}

// === validated config ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// cgroup connect4/connect6 programs rewrite the destination (default).
    Ebpf,
    /// iptables/ip6tables REDIRECT rules, installed and removed by the proxy.
    Iptables,
}

/// The short-circuit policy sk_msg applies (`proxy-ebpf/src/redirect.rs`). All zero is the
/// naive policy: every message redirected, nothing bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortCircuit {
    /// Kernel memory (bytes plus a struct per message) that may wait unread in one socket's
    /// short-circuit queue before its sender's direction moves to TCP, where the receive
    /// window holds the sender back.
    pub queue_limit: u32,
    /// Writes below this size are "small".
    pub small_write: u32,
    /// Small writes in a row, each finding the receiver with unread bytes or with no reply
    /// since the one before, that move a direction to TCP (which coalesces them; see `cargo xtask bench`).
    pub small_streak: u32,
    /// Times a workload's direction may meet the queue limit before its socket leaves the
    /// SOCKHASH for plain TCP (`proxy_common::Config::detach_after`); 0: never.
    pub detach_after: u32,
}

impl ShortCircuit {
    /// 4 MiB: the order of an autotuned socket receive buffer (`tcp_rmem` max 6 MiB by
    /// default), and far below `tcp_mem`. Measured (`cargo xtask bench`): 1 MiB sends bulk
    /// streams to TCP about four times as often for no gain in what a slow reader can pin.
    pub const DEFAULT_QUEUE_LIMIT: u32 = 4 << 20;
    /// Every write counts for the stream rule, whatever its size (see `MAX_SMALL_WRITE`).
    pub const DEFAULT_SMALL_WRITE: u32 = Self::MAX_SMALL_WRITE;
    /// The largest `small_write`: every write counts, whatever its size.
    pub const MAX_SMALL_WRITE: u32 = 1 << 20;
    /// 16 writes in a row that find the reader behind make a workload's direction a stream
    /// (so does meeting the queue limit), and the proxy takes its whole connection off the
    /// SOCKHASH for plain TCP (`transport::splice::Pacer`). Measured (`cargo xtask bench
    /// --streams-only`, plain TCP through the proxy and per hop interleaved, cubic, medians
    /// of 3 per-repetition ratios): with the rule off, streams of 16 KiB to 1 MiB ran at
    /// x0.80 to x0.93 of plain TCP at every connection count; with it on, every connection
    /// left and streams ran at x0.94 to x1.06 (64 B and 1 KiB x0.79 to x1.23 either way).
    /// Request/response never makes a streak: each request finds the queue empty. 0 turns
    /// the rule off (streams then stay on the short-circuit until they keep meeting the
    /// queue limit with the proxy behind).
    pub const DEFAULT_SMALL_STREAK: u32 = 16;
    /// A writer that met the limit twice outruns its reader for good: the proxy, sharing the
    /// CPUs with many such writers, cannot drain their queues as fast as they fill them, and
    /// between stays on the TCP path they pay sk_msg's costs for nothing. Measured (`stream`
    /// through the proxy, 10 and 100 connections of 1 KiB and 16 KiB writes): TCP-path
    /// sockets that stay in the SOCKHASH ran at 0.8x of plain TCP; removed, 1.0x to 1.4x.
    pub const DEFAULT_DETACH_AFTER: u32 = 2;
    pub const NAIVE: ShortCircuit = ShortCircuit {
        queue_limit: 0,
        small_write: 0,
        small_streak: 0,
        detach_after: 0,
    };

    pub fn is_naive(&self) -> bool {
        *self == ShortCircuit::NAIVE
    }

    fn new(
        policy: Option<&str>,
        queue_limit: Option<u32>,
        small_write: Option<u32>,
        small_streak: Option<u32>,
    ) -> Result<ShortCircuit, ConfigError> {
        match policy.unwrap_or("adaptive") {
            "adaptive" => {}
            "naive" => {
                if queue_limit.is_some() || small_write.is_some() || small_streak.is_some() {
                    return Err(invalid(
                        "intercept.sockmap_policy",
                        "naive",
                        "the naive policy has no queue limit or small-write rule",
                        "remove sockmap_queue_limit / sockmap_small_write / sockmap_small_streak, or use sockmap_policy = \"adaptive\"",
                    ));
                }
                return Ok(ShortCircuit::NAIVE);
            }
            other => {
                return Err(invalid(
                    "intercept.sockmap_policy",
                    other,
                    "unknown policy",
                    "use \"adaptive\" (bounded queues, small-write streams on TCP) or \"naive\" (unbounded; for measuring only)",
                ));
            }
        }
        let queue_limit = queue_limit.unwrap_or(Self::DEFAULT_QUEUE_LIMIT);
        if !(16 * 1024..=64 << 20).contains(&queue_limit) {
            return Err(invalid(
                "intercept.sockmap_queue_limit",
                queue_limit,
                "out of range 16384..=67108864 bytes",
                "the default 4194304 suits most nodes; it bounds the memory one slow reader can hold",
            ));
        }
        let small_write = small_write.unwrap_or(Self::DEFAULT_SMALL_WRITE);
        if small_write > Self::MAX_SMALL_WRITE {
            return Err(invalid(
                "intercept.sockmap_small_write",
                small_write,
                "out of range 0..=1048576 bytes",
                "use a size up to 1048576 (the default: every write counts, so a stream of any size leaves the short-circuit); a smaller size keeps streams of larger writes on it (README, \"Benchmarks\")",
            ));
        }
        let small_streak = small_streak.unwrap_or(Self::DEFAULT_SMALL_STREAK);
        if small_streak > 1 << 16 {
            return Err(invalid(
                "intercept.sockmap_small_streak",
                small_streak,
                "out of range 0..=65536",
                "use 16 (the default) to move streams to plain TCP, or 0 to keep them on the short-circuit",
            ));
        }
        Ok(ShortCircuit {
            queue_limit,
            small_write,
            small_streak,
            detach_after: Self::DEFAULT_DETACH_AFTER,
        })
    }
}

impl Config {
    /// True if the kernel programs must read the running kernel's structs (the short-circuit
    /// is on with a policy other than naive, or with the kernel-only path), so its BTF
    /// offsets are needed.
    pub fn needs_kernel_offsets(&self) -> bool {
        self.sockmap && (!self.short_circuit.is_naive() || self.kernel_path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// With the proxy gone, workloads connect directly (default).
    Open,
    /// With the proxy gone, workloads' intercepted connects are refused.
    Closed,
}

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Where services and workloads come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryMode {
    /// The config file's `[[service]]` and `[[workload]]` tables, reloaded on change.
    File,
    /// The Kubernetes API (`discovery::kubernetes`); the file still gives everything else.
    Kubernetes,
}

/// How the kubelet names pod cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// The API server to watch, validated (`[kubernetes]`).
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesSettings {
    pub api_server: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub node_name: String,
    pub namespace_label: String,
    pub cgroup_driver: CgroupDriver,
    pub cgroup_root: PathBuf,
}

/// Where a pod finds its service account's credentials.
pub const DEFAULT_K8S_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const DEFAULT_K8S_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
pub const DEFAULT_NAMESPACE_LABEL: &str = "ebpf-mesh.io/inject=enabled";

fn resolve_kubernetes(
    k: KubernetesSection,
    mesh_node: &str,
) -> Result<KubernetesSettings, ConfigError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let api_server = match k.api_server {
        Some(a) => a.trim().to_owned(),
        None => match (
            env("KUBERNETES_SERVICE_HOST"),
            env("KUBERNETES_SERVICE_PORT"),
        ) {
            (Some(h), Some(p)) if h.contains(':') => format!("https://[{h}]:{p}"),
            (Some(h), Some(p)) => format!("https://{h}:{p}"),
            _ => {
                return Err(invalid(
                    "kubernetes.api_server",
                    "(unset)",
                    "not set, and KUBERNETES_SERVICE_HOST/PORT are not in the environment (the proxy is not in a pod)",
                    "set api_server = \"https://10.0.0.1:6443\"",
                ));
            }
        },
    };
    let uri_ok = api_server
        .parse::<hyper::Uri>()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("https" | "http")) && u.host().is_some());
    if !uri_ok {
        return Err(invalid(
            "kubernetes.api_server",
            &api_server,
            "not an http(s) URL",
            "write it as https://HOST:PORT, e.g. https://10.0.0.1:6443",
        ));
    }
    let path = |field: &'static str, v: Option<String>, default: &str| {
        let v = v.unwrap_or_else(|| default.to_owned());
        if !Path::new(&v).is_absolute() {
            return Err(invalid(
                field,
                &v,
                "needs an absolute file path",
                "use the service account's file, e.g. /var/run/secrets/kubernetes.io/serviceaccount/token",
            ));
        }
        Ok(PathBuf::from(v))
    };
    let token_file = path(
        "kubernetes.token_file",
        k.token_file,
        DEFAULT_K8S_TOKEN_FILE,
    )?;
    let ca_file = path("kubernetes.ca_file", k.ca_file, DEFAULT_K8S_CA_FILE)?;
    let node_name = k
        .node_name
        .or_else(|| env("NODE_NAME"))
        .unwrap_or_else(|| mesh_node.to_owned());
    if node_name.is_empty()
        || node_name.len() > 253
        || !node_name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
    {
        return Err(invalid(
            "kubernetes.node_name",
            &node_name,
            "not a Kubernetes node name (lower-case letters, digits, '-' and '.')",
            "set it from the pod's spec.nodeName (env NODE_NAME via the downward API)",
        ));
    }
    let namespace_label = k
        .namespace_label
        .unwrap_or_else(|| DEFAULT_NAMESPACE_LABEL.to_owned());
    let (key, value) = namespace_label
        .split_once('=')
        .unwrap_or((namespace_label.as_str(), ""));
    let label_char = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
    if key.is_empty() || !key.chars().all(label_char) || !value.chars().all(label_char) {
        return Err(invalid(
            "kubernetes.namespace_label",
            &namespace_label,
            "not a label KEY=VALUE (or KEY)",
            "use ebpf-mesh.io/inject=enabled",
        ));
    }
    let cgroup_driver = match k.cgroup_driver.as_deref().unwrap_or("systemd") {
        "systemd" => CgroupDriver::Systemd,
        "cgroupfs" => CgroupDriver::Cgroupfs,
        other => {
            return Err(invalid(
                "kubernetes.cgroup_driver",
                other,
                "not a kubelet cgroup driver",
                "use the kubelet's cgroupDriver: systemd (default) or cgroupfs",
            ));
        }
    };
    let root = k.cgroup_root.unwrap_or_default();
    let cgroup_root = PathBuf::from(root.trim().trim_start_matches('/'));
    if cgroup_root
        .components()
        .any(|x| x.as_os_str() == ".." || x.as_os_str() == ".")
    {
        return Err(invalid(
            "kubernetes.cgroup_root",
            &root,
            "must be a directory below the cgroup v2 mount, without '.' or '..'",
            "leave it out (\"\") unless the kubelet runs with a --cgroup-root",
        ));
    }
    Ok(KubernetesSettings {
        api_server,
        token_file,
        ca_file,
        node_name,
        namespace_label,
        cgroup_driver,
        cgroup_root,
    })
}

#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub redirect_ipv4: Option<Ipv4Addr>,
    pub redirect_ipv6: Option<Ipv6Addr>,
    pub bind_ipv4: Ipv4Addr,
    pub bind_ipv6: Ipv6Addr,
    pub mode: Mode,
    /// Workload cgroup parent, relative to the cgroup v2 mount.
    pub workload_cgroup: PathBuf,
    /// The proxy's own cgroup, relative to the cgroup v2 mount.
    pub proxy_cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub fail_mode: FailMode,
    pub sockmap: bool,
    /// How sk_msg decides between the short-circuit and TCP (`proxy_common::Config`).
    pub short_circuit: ShortCircuit,
    /// The kernel-only path for authorized same-node opaque TCP (needs `sockmap`).
    pub kernel_path: bool,
    /// Ports whose connections stay off the short-circuit (sorted, at most
    /// `proxy_common::SOCKMAP_EXCLUDE_PORTS_MAX`).
    pub sockmap_exclude_ports: Vec<u16>,
    /// Blocking workload sockets are registered too (`proxy_common::FLAG_SOCKMAP_BLOCKING`).
    pub sockmap_blocking_sockets: bool,
    /// Only declared workloads' cgroups are intercepted (`MESH_WORKLOADS`).
    pub workloads_only: bool,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Cidr>,
    pub iptables_interfaces: Vec<String>,
    pub sockhash_entries: u32,
    pub connect_timeout: Duration,
    pub copy_buffer_bytes: usize,
    pub log_level: String,
    pub log_json: bool,
    /// Kernel programs write debug records (aya-log) the proxy logs as `proxy::kernel`.
    pub log_kernel: bool,
    pub admin_address: std::net::SocketAddr,
    pub detect_timeout: Duration,
    /// Sorted, deduplicated.
    pub opaque_ports: Vec<u16>,
    pub http: HttpLimits,
    /// Services and workloads: the part of the config a reload may change.
    pub catalog: Catalog,
    /// Where services and workloads come from.
    pub discovery: DiscoveryMode,
    /// Set in [`DiscoveryMode::Kubernetes`].
    pub kubernetes: Option<KubernetesSettings>,
    pub identity: Option<IdentitySettings>,
    pub mesh: MeshSettings,
    /// The mesh's trust domain (`identity.trust_domain`, else cluster.local).
    pub trust_domain: String,
    /// How often the config file is checked for changes.
    pub reload_interval: Duration,
    /// The file this config came from (None: flags only), and the flags, so that a reload
    /// resolves the changed file exactly like start-up did.
    pub file_path: Option<PathBuf>,
    pub overrides: Overrides,
}

/// Where this node gets its certificates.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentitySettings {
    pub trust_domain: String,
    pub issuer: std::net::SocketAddr,
    pub anchors: PathBuf,
    pub token_file: PathBuf,
    pub rotate_fraction: f64,
}

/// The node's tunnel and its peers.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshSettings {
    pub node_name: String,
    pub inbound: std::net::SocketAddr,
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub name: String,
    pub address: std::net::SocketAddr,
    pub pod_cidrs: Vec<Cidr>,
}

impl MeshSettings {
    /// The peer whose pods include `ip`.
    pub fn peer_for(&self, ip: IpAddr) -> Option<&Peer> {
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        self.peers
            .iter()
            .find(|p| p.pod_cidrs.iter().any(|c| c.contains(ip)))
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                (u32::from(net) & mask) == (u32::from(a) & mask)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                (u128::from(net) & mask) == (u128::from(a) & mask)
            }
            _ => false,
        }
    }
}

/// Default port of the mutual-TLS tunnel between nodes (istio's HBONE port).
pub const DEFAULT_INBOUND_PORT: u16 = 15008;

fn resolve_identity(i: IdentitySection) -> Result<IdentitySettings, ConfigError> {
    let trust_domain = i
        .trust_domain
        .unwrap_or_else(|| crate::discovery::spec::DEFAULT_TRUST_DOMAIN.to_owned());
    let td_ok = !trust_domain.is_empty()
        && trust_domain.len() <= 255
        && trust_domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
    if !td_ok {
        return Err(invalid(
            "identity.trust_domain",
            &trust_domain,
            "a trust domain is lower-case letters, digits, '-', '.' and '_'",
            "use the trust domain the CA was made with (proxy ca init --trust-domain), e.g. cluster.local",
        ));
    }
    let issuer_text = i.issuer.unwrap_or_default();
    let issuer: std::net::SocketAddr = issuer_text.trim().parse().map_err(|_| {
        invalid(
            "identity.issuer",
            &issuer_text,
            "not an ADDRESS:PORT",
            "set issuer to where `proxy identity serve --listen` listens, e.g. 10.0.0.1:15012",
        )
    })?;
    let path = |field: &'static str, v: Option<String>, fix: &'static str| {
        let v = v.unwrap_or_default();
        if v.trim().is_empty() || !Path::new(&v).is_absolute() {
            return Err(invalid(field, &v, "needs an absolute file path", fix));
        }
        Ok(PathBuf::from(v))
    };
    let anchors = path(
        "identity.anchors",
        i.anchors,
        "point it at the CA directory's anchors.pem (copied to the node), e.g. /etc/ebpf-mesh/anchors.pem",
    )?;
    let token_file = path(
        "identity.token_file",
        i.token_file,
        "point it at a file (mode 0600) holding this node's issuer token",
    )?;
    let rotate_fraction = i.rotate_fraction.unwrap_or(0.5);
    if !(0.1..=0.9).contains(&rotate_fraction) {
        return Err(invalid(
            "identity.rotate_fraction",
            rotate_fraction,
            "out of range 0.1..=0.9",
            "use 0.5: certificates are renewed at half their lifetime",
        ));
    }
    Ok(IdentitySettings {
        trust_domain,
        issuer,
        anchors,
        token_file,
        rotate_fraction,
    })
}

fn resolve_mesh(m: MeshSection, has_identity: bool) -> Result<MeshSettings, ConfigError> {
    let node_name = m.node_name.unwrap_or_else(|| "node".into());
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if !name_ok(&node_name) {
        return Err(invalid(
            "mesh.node_name",
            &node_name,
            "a node name is 1-63 lower-case letters, digits and '-' (it is part of the node's SPIFFE ID)",
            "use the host's name, e.g. node-1",
        ));
    }
    let port = m.inbound_port.unwrap_or(DEFAULT_INBOUND_PORT);
    if port == 0 {
        return Err(invalid(
            "mesh.inbound_port",
            0,
            "port 0 cannot receive tunnels",
            "use 15008",
        ));
    }
    let bind: IpAddr = match m.inbound_bind {
        Some(b) => b.trim().parse().map_err(|_| {
            invalid(
                "mesh.inbound_bind",
                &b,
                "not an IP address",
                "use 0.0.0.0, or the node's address on the network between nodes",
            )
        })?,
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let mut peers = Vec::new();
    for p in m.peer {
        let name = p.name.unwrap_or_default();
        if !name_ok(&name) {
            return Err(invalid(
                "mesh.peer.name",
                if name.is_empty() { "(unset)" } else { &name },
                "a peer needs a node name",
                "set name = \"node-2\"",
            ));
        }
        let text = p.address.unwrap_or_default();
        let address: std::net::SocketAddr = text.trim().parse().map_err(|_| {
            invalid(
                "mesh.peer.address",
                format!("{text:?} (peer {name})"),
                "not an ADDRESS:PORT",
                "set the peer node's tunnel address, e.g. 10.0.0.2:15008",
            )
        })?;
        let mut pod_cidrs = Vec::new();
        for c in p.pod_cidrs.unwrap_or_default() {
            pod_cidrs.push(c.parse::<Cidr>().map_err(|reason| {
                invalid(
                    "mesh.peer.pod_cidrs",
                    format!("{c:?} (peer {name})"),
                    reason,
                    "list the peer's pod networks as ADDRESS/PREFIX, e.g. 10.78.0.0/16",
                )
            })?);
        }
        if pod_cidrs.is_empty() {
            return Err(invalid(
                "mesh.peer.pod_cidrs",
                format!("[] (peer {name})"),
                "without pod networks no traffic would use this peer",
                "list the peer's pod networks, e.g. pod_cidrs = [\"10.78.0.0/16\"]",
            ));
        }
        peers.push(Peer {
            name,
            address,
            pod_cidrs,
        });
    }
    if !peers.is_empty() && !has_identity {
        return Err(invalid(
            "mesh.peer",
            peers.len(),
            "traffic to other nodes is carried over mutual TLS, which needs certificates",
            "add an [identity] section (issuer, anchors, token_file)",
        ));
    }
    Ok(MeshSettings {
        node_name,
        inbound: std::net::SocketAddr::new(bind, port),
        peers,
    })
}

/// Limits of the HTTP server side (what a client may make the proxy hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_concurrent_streams: u32,
}

/// Ports of server-speaks-first protocols, which never send first and so would always wait
/// out detection: SMTP (25, 587), MySQL (3306), PostgreSQL (5432; its client does speak
/// first but often behind a proxy that does not), MongoDB (27017) is client-first and not
/// here. Operators extend the list with `detect.opaque_ports`.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 5432];

/// A config error: which field, which value, why, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass an existing file with --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for this proxy: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {field} = {value:?}: {reason}; fix: {fix}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
        fix: &'static str,
    },
}

/// A port list from the file plus the command line: no port 0, sorted, no repeats, and at
/// most `max.0` ports (else the error `max.1`, with the fix `max.2`).
fn port_list(
    field: &'static str,
    mut ports: Vec<u16>,
    more: Vec<u16>,
    max: (usize, &'static str, &'static str),
) -> Result<Vec<u16>, ConfigError> {
    ports.extend(more);
    if let Some(p) = ports.iter().find(|p| **p == 0) {
        return Err(invalid(
            field,
            p,
            "port 0 is not a port a connection can use",
            "remove 0 from the list",
        ));
    }
    ports.sort_unstable();
    ports.dedup();
    if ports.len() > max.0 {
        return Err(invalid(field, ports.len(), max.1, max.2));
    }
    Ok(ports)
}

pub(crate) fn invalid(
    field: &'static str,
    value: impl fmt::Display,
    reason: impl Into<String>,
    fix: &'static str,
) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
        fix,
    }
}

impl File {
    /// Reads and parses a config file. Unknown keys are errors (a typo must not be ignored).
    pub fn load(path: &Path) -> Result<File, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        File::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<File, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }
}

impl Config {
    /// Merges the file and the flags (flags win) and validates the result.
    pub fn resolve(file: File, o: Overrides) -> Result<Config, ConfigError> {
        let overrides = o.clone();
        let File {
            proxy,
            intercept,
            limits,
            log,
            admin,
            detect,
            http,
            service,
            workload,
            authorization,
            policy,
            identity,
            mesh,
            discovery,
            kubernetes,
        } = file;

        let port = o.port.or(proxy.port).unwrap_or(15001);
        if port == 0 {
            return Err(invalid(
                "proxy.port",
                port,
                "port 0 cannot receive redirected connections",
                "choose a free port such as 15001",
            ));
        }
        let redirect_ipv4 = o
            .redirect_ipv4
            .or(proxy.redirect_ipv4)
            .map(|v| parse_ip::<Ipv4Addr>("proxy.redirect_ipv4", &v))
            .transpose()?;
        let redirect_ipv6 = o
            .redirect_ipv6
            .or(proxy.redirect_ipv6)
            .map(|v| parse_ip::<Ipv6Addr>("proxy.redirect_ipv6", &v))
            .transpose()?;
        if let Some(ip) = redirect_ipv4
            && (ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast())
        {
            return Err(invalid(
                "proxy.redirect_ipv4",
                ip,
                "connects cannot be sent to an unspecified, multicast or broadcast address",
                "use an address of this node that workloads can reach",
            ));
        }
        if let Some(ip) = redirect_ipv6
            && (ip.is_unspecified() || ip.is_multicast())
        {
            return Err(invalid(
                "proxy.redirect_ipv6",
                ip,
                "connects cannot be sent to an unspecified or multicast address",
                "use an address of this node that workloads can reach",
            ));
        }
        let bind_ipv4 = proxy
            .bind_ipv4
            .map(|v| parse_ip::<Ipv4Addr>("proxy.bind_ipv4", &v))
            .transpose()?
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let bind_ipv6 = proxy
            .bind_ipv6
            .map(|v| parse_ip::<Ipv6Addr>("proxy.bind_ipv6", &v))
            .transpose()?
            .unwrap_or(Ipv6Addr::UNSPECIFIED);

        let mode = match o.mode.or(intercept.mode).as_deref() {
            None | Some("ebpf") => Mode::Ebpf,
            Some("iptables") => Mode::Iptables,
            Some(other) => {
                return Err(invalid(
                    "intercept.mode",
                    other,
                    "unknown interception mode",
                    "use \"ebpf\" (default) or \"iptables\"",
                ));
            }
        };
        let fail_mode = match o.fail_mode.or(intercept.fail_mode).as_deref() {
            None | Some("open") => FailMode::Open,
            Some("closed") => FailMode::Closed,
            Some(other) => {
                return Err(invalid(
                    "intercept.fail_mode",
                    other,
                    "unknown fail mode",
                    "use \"open\" (workloads go direct while the proxy is down) or \"closed\" (their connects are refused)",
                ));
            }
        };
        // Off by default: on this kernel a blocking reader on a short-circuited socket can
        // get a spurious EAGAIN (see ARCHITECTURE.md, "Kernel facts"), and the measured
        // hazards in issue 9 (no backpressure, small-write slowdown) are not solved yet.
        let sockmap = o.sockmap.or(intercept.sockmap).unwrap_or(false);
        let workloads_only = o
            .workloads_only
            .or(intercept.workloads_only)
            .unwrap_or(false);

        if mode == Mode::Iptables && sockmap {
            return Err(invalid(
                "intercept.sockmap",
                true,
                "the short-circuit pairs sockets by their 4-tuples, which NAT rewrites, so it only works with eBPF interception",
                "set intercept.sockmap = false (or --sockmap off) with mode = \"iptables\"",
            ));
        }
        let short_circuit = ShortCircuit::new(
            o.sockmap_policy
                .as_deref()
                .or(intercept.sockmap_policy.as_deref()),
            o.sockmap_queue_limit.or(intercept.sockmap_queue_limit),
            o.sockmap_small_write.or(intercept.sockmap_small_write),
            o.sockmap_small_streak.or(intercept.sockmap_small_streak),
        )?;
        if mode == Mode::Iptables && workloads_only {
            return Err(invalid(
                "intercept.workloads_only",
                true,
                "iptables rules match interfaces, not cgroups, so they cannot tell workloads apart",
                "use mode = \"ebpf\", or leave workloads_only off with iptables",
            ));
        }
        if mode == Mode::Iptables && fail_mode == FailMode::Closed {
            return Err(invalid(
                "intercept.fail_mode",
                "closed",
                "iptables mode removes its rules when the proxy stops and cannot hold connects closed after a crash",
                "use fail_mode = \"open\" with iptables, or mode = \"ebpf\"",
            ));
        }

        let workload_cgroup = cgroup_rel(
            "intercept.workload_cgroup",
            o.workload_cgroup
                .or(intercept.workload_cgroup)
                .unwrap_or_else(|| "ebpf-mesh/workloads".into()),
        )?;
        let proxy_cgroup = cgroup_rel(
            "intercept.proxy_cgroup",
            o.proxy_cgroup
                .or(intercept.proxy_cgroup)
                .unwrap_or_else(|| "ebpf-mesh-proxy".into()),
        )?;
        if proxy_cgroup.starts_with(&workload_cgroup) {
            return Err(invalid(
                "intercept.proxy_cgroup",
                proxy_cgroup.display(),
                "the proxy's cgroup is inside the workload cgroup, so its own upstream connects would be intercepted (a loop)",
                "put the proxy's cgroup outside intercept.workload_cgroup",
            ));
        }
        if workload_cgroup.starts_with(&proxy_cgroup) {
            return Err(invalid(
                "intercept.workload_cgroup",
                workload_cgroup.display(),
                "the workload cgroup is inside the proxy's cgroup",
                "use two separate cgroup directories",
            ));
        }

        let pin_dir = PathBuf::from(
            o.pin_dir
                .or(intercept.pin_dir)
                .unwrap_or_else(|| "/sys/fs/bpf/ebpf-mesh".into()),
        );
        if !pin_dir.is_absolute() || pin_dir.components().any(|c| c.as_os_str() == "..") {
            return Err(invalid(
                "intercept.pin_dir",
                pin_dir.display(),
                "the pin directory must be an absolute path without '..'",
                "use a directory under a bpffs mount, e.g. /sys/fs/bpf/ebpf-mesh",
            ));
        }

        let exclude_ports = port_list(
            "intercept.exclude_ports",
            intercept.exclude_ports.unwrap_or_default(),
            o.exclude_ports,
            (
                1024,
                "more ports than the kernel map holds (1024)",
                "exclude fewer ports",
            ),
        )?;
        let sockmap_exclude_ports = port_list(
            "intercept.sockmap_exclude_ports",
            intercept.sockmap_exclude_ports.unwrap_or_default(),
            o.sockmap_exclude_ports,
            (
                proxy_common::SOCKMAP_EXCLUDE_PORTS_MAX,
                "more ports than the kernel programs check (8)",
                "list at most 8 ports, or turn the short-circuit off (sockmap = false)",
            ),
        )?;

        let mut cidr_text = intercept.exclude_cidrs.unwrap_or_default();
        cidr_text.extend(o.exclude_cidrs);
        let exclude_cidrs = cidr_text
            .iter()
            .map(|t| {
                t.parse::<Cidr>().map_err(|reason| {
                    invalid(
                        "intercept.exclude_cidrs",
                        t,
                        reason,
                        "write networks as ADDRESS/PREFIX, e.g. 169.254.0.0/16 or fd00::/8",
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut iptables_interfaces = intercept.iptables_interfaces.unwrap_or_default();
        iptables_interfaces.extend(o.iptables_interfaces);
        for i in &iptables_interfaces {
            let name_ok = !i.is_empty()
                && i.len() <= 15
                && i.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c));
            if !name_ok {
                return Err(invalid(
                    "intercept.iptables_interfaces",
                    i,
                    "not an interface name (1-15 characters: letters, digits, - _ . and a trailing + as wildcard)",
                    "list the interfaces workloads' traffic arrives on, e.g. \"veth+\"",
                ));
            }
        }
        if mode == Mode::Iptables && iptables_interfaces.is_empty() {
            return Err(invalid(
                "intercept.iptables_interfaces",
                "[]",
                "iptables mode redirects traffic arriving on the workloads' interfaces, and none are listed",
                "list them, e.g. iptables_interfaces = [\"veth+\"], or pass --iptables-interface",
            ));
        }

        let sockhash_entries = o
            .sockhash_entries
            .or(limits.sockhash_entries)
            .unwrap_or(65536);
        if !(64..=1 << 20).contains(&sockhash_entries) {
            return Err(invalid(
                "limits.sockhash_entries",
                sockhash_entries,
                "out of range 64..=1048576",
                "4 entries carry one short-circuited connection; the default 65536 fits most nodes",
            ));
        }
        let connect_timeout_ms = limits.connect_timeout_ms.unwrap_or(5000);
        if !(1..=600_000).contains(&connect_timeout_ms) {
            return Err(invalid(
                "limits.connect_timeout_ms",
                connect_timeout_ms,
                "out of range 1..=600000",
                "use a few seconds, e.g. 5000",
            ));
        }
        let copy_buffer_bytes = limits.copy_buffer_bytes.unwrap_or(64 * 1024);
        if !(1024..=16 << 20).contains(&copy_buffer_bytes) {
            return Err(invalid(
                "limits.copy_buffer_bytes",
                copy_buffer_bytes,
                "out of range 1024..=16777216",
                "use 65536 unless measurements say otherwise",
            ));
        }

        let log_level = o.log_level.or(log.level).unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(invalid(
                "log.level",
                &log_level,
                "not a log filter",
                "use error, warn, info, debug or trace (or a tracing filter such as proxy=debug)",
            ));
        }
        let log_json = o.log_json || log.json.unwrap_or(false);
        let log_kernel = o.log_kernel || log.kernel.unwrap_or(false);

        let admin_text = o
            .admin_address
            .or(admin.address)
            .unwrap_or_else(|| "127.0.0.1:15020".into());
        let admin_address: std::net::SocketAddr = admin_text.trim().parse().map_err(|_| {
            invalid(
                "admin.address",
                &admin_text,
                "not an ADDRESS:PORT",
                "write it as 127.0.0.1:15020 (IPv6: [::1]:15020)",
            )
        })?;
        if !admin_address.ip().is_loopback() && !admin.allow_non_loopback.unwrap_or(false) {
            return Err(invalid(
                "admin.address",
                admin_address,
                "the admin API (metrics, config, connections) would be reachable from beyond this host, possibly by workloads",
                "keep it on loopback, or set admin.allow_non_loopback = true if that is intended",
            ));
        }

        let detect_ms = detect.timeout_ms.unwrap_or(100);
        if !(1..=10_000).contains(&detect_ms) {
            return Err(invalid(
                "detect.timeout_ms",
                detect_ms,
                "out of range 1..=10000",
                "keep it short (default 100): every connection of a server-speaks-first protocol waits this long unless its port is in detect.opaque_ports",
            ));
        }
        let mut opaque_ports = detect
            .opaque_ports
            .unwrap_or_else(|| DEFAULT_OPAQUE_PORTS.to_vec());
        if opaque_ports.contains(&0) {
            return Err(invalid(
                "detect.opaque_ports",
                0,
                "port 0 is not a destination port",
                "remove 0 from the list",
            ));
        }
        opaque_ports.sort_unstable();
        opaque_ports.dedup();
        let header_read_ms = http.header_read_timeout_ms.unwrap_or(10_000);
        if !(100..=600_000).contains(&header_read_ms) {
            return Err(invalid(
                "http.header_read_timeout_ms",
                header_read_ms,
                "out of range 100..=600000",
                "use about 10000: a client that takes longer to send its headers is cut off",
            ));
        }
        let max_header_bytes = http.max_header_bytes.unwrap_or(64 * 1024);
        if !(8192..=1 << 20).contains(&max_header_bytes) {
            return Err(invalid(
                "http.max_header_bytes",
                max_header_bytes,
                "out of range 8192..=1048576",
                "use 65536",
            ));
        }
        let max_concurrent_streams = http.max_concurrent_streams.unwrap_or(256);
        if !(1..=10_000).contains(&max_concurrent_streams) {
            return Err(invalid(
                "http.max_concurrent_streams",
                max_concurrent_streams,
                "out of range 1..=10000",
                "use 256",
            ));
        }
        let identity = identity.map(resolve_identity).transpose()?;
        let trust_domain = identity
            .as_ref()
            .map(|i| i.trust_domain.clone())
            .unwrap_or_else(|| crate::discovery::spec::DEFAULT_TRUST_DOMAIN.to_owned());
        let mesh = resolve_mesh(mesh, identity.is_some())?;
        let discovery = match discovery.mode.as_deref().unwrap_or("file") {
            "file" => DiscoveryMode::File,
            "kubernetes" => DiscoveryMode::Kubernetes,
            other => {
                return Err(invalid(
                    "discovery.mode",
                    other,
                    "not a discovery mode",
                    "use file (the [[service]] tables, default) or kubernetes (the API server)",
                ));
            }
        };
        let kubernetes = match discovery {
            DiscoveryMode::File => None,
            DiscoveryMode::Kubernetes => {
                if !service.is_empty() || !workload.is_empty() {
                    return Err(invalid(
                        "discovery.mode",
                        "kubernetes",
                        "services and workloads come from the API server, yet the file declares some",
                        "remove the [[service]] and [[workload]] tables, or set discovery.mode = \"file\"",
                    ));
                }
                Some(resolve_kubernetes(kubernetes, &mesh.node_name)?)
            }
        };
        let catalog = Catalog::resolve(
            service,
            workload,
            Policies::resolve(authorization, policy)?,
            &trust_domain,
        )?;
        let reload_ms = proxy.reload_interval_ms.unwrap_or(1000);
        if !(100..=3_600_000).contains(&reload_ms) {
            return Err(invalid(
                "proxy.reload_interval_ms",
                reload_ms,
                "out of range 100..=3600000",
                "use 1000: the file is re-read (and compared) once a second",
            ));
        }

        Ok(Config {
            identity,
            mesh,
            trust_domain,
            detect_timeout: Duration::from_millis(detect_ms),
            opaque_ports,
            http: HttpLimits {
                header_read_timeout: Duration::from_millis(header_read_ms),
                max_header_bytes,
                max_concurrent_streams,
            },
            catalog,
            discovery,
            kubernetes,
            reload_interval: Duration::from_millis(reload_ms),
            file_path: None,
            overrides,
            port,
            redirect_ipv4,
            redirect_ipv6,
            bind_ipv4,
            bind_ipv6,
            mode,
            workload_cgroup,
            proxy_cgroup,
            pin_dir,
            fail_mode,
            sockmap,
            short_circuit,
            kernel_path: sockmap && o.kernel_path.or(intercept.kernel_path).unwrap_or(true),
            sockmap_exclude_ports,
            sockmap_blocking_sockets: o
                .sockmap_blocking_sockets
                .or(intercept.sockmap_blocking_sockets)
                .unwrap_or(false),
            workloads_only,
            exclude_ports,
            exclude_cidrs,
            iptables_interfaces,
            sockhash_entries,
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            copy_buffer_bytes,
            log_level,
            log_json,
            log_kernel,
            admin_address,
        })
    }
}

/// The services of a catalog as the admin API's /config shows them.
pub fn services_json(services: &[crate::discovery::ServiceSpec]) -> serde_json::Value {
    serde_json::Value::Array(services.iter().map(|s| serde_json::json!({
                "name": s.name,
                "addresses": s.addresses,
                "ports": s.ports,
                "protocol": s.protocol.as_str(),
                "endpoints": s.endpoints.iter().map(|e| serde_json::json!({
                    "address": e.address, "port": e.port, "weight": e.weight, "identity": e.identity,
                })).collect::<Vec<_>>(),
                "timeouts": {
                    "connect_ms": s.connect_timeout.as_millis() as u64,
                    "request_ms": s.request_timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
                    "idle_ms": s.idle_timeout.as_millis() as u64,
                },
                "retry": {
                    "attempts": s.retry.attempts,
                    "statuses": s.retry.statuses,
                    "per_try_timeout_ms": s.retry.per_try_timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
                    "max_body_bytes": s.retry.max_body_bytes,
                    "budget_ratio": s.retry.budget_ratio,
                    "budget_min_per_sec": s.retry.budget_min_per_sec,
                },
                "circuit": {
                    "consecutive_failures": s.circuit.consecutive_failures,
                    "base_ejection_ms": s.circuit.base_ejection.as_millis() as u64,
                    "max_ejection_ms": s.circuit.max_ejection.as_millis() as u64,
                },
                "max_request_body_bytes": s.max_request_body,
            })).collect::<Vec<_>>())
}

/// The workloads of a catalog as the admin API's /config shows them.
pub fn workloads_json(workloads: &[crate::discovery::WorkloadSpec]) -> serde_json::Value {
    serde_json::Value::Array(workloads.iter().map(|w| serde_json::json!({
                "name": w.name, "namespace": w.namespace, "identity": w.identity, "cgroups": w.cgroups,
                "addresses": w.addresses,
            })).collect::<Vec<_>>())
}

impl Config {
    /// The effective config as JSON, for the admin API's /config. Nothing in it is secret
    /// yet; TLS material (issue 5) must be redacted here.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "proxy": {
                "port": self.port,
                "redirect_ipv4": self.redirect_ipv4,
                "redirect_ipv6": self.redirect_ipv6,
                "bind_ipv4": self.bind_ipv4,
                "bind_ipv6": self.bind_ipv6,
                "reload_interval_ms": self.reload_interval.as_millis() as u64,
            },
            "intercept": {
                "mode": self.mode.to_string(),
                "workload_cgroup": self.workload_cgroup,
                "proxy_cgroup": self.proxy_cgroup,
                "pin_dir": self.pin_dir,
                "fail_mode": self.fail_mode.to_string(),
                "sockmap": self.sockmap,
                "sockmap_policy": if self.short_circuit.is_naive() { "naive" } else { "adaptive" },
                "sockmap_queue_limit": self.short_circuit.queue_limit,
                "sockmap_small_write": self.short_circuit.small_write,
                "sockmap_small_streak": self.short_circuit.small_streak,
                "kernel_path": self.kernel_path,
                "sockmap_exclude_ports": self.sockmap_exclude_ports,
                "sockmap_blocking_sockets": self.sockmap_blocking_sockets,
                "workloads_only": self.workloads_only,
                "exclude_ports": self.exclude_ports,
                "exclude_cidrs": self.exclude_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "iptables_interfaces": self.iptables_interfaces,
            },
            "limits": {
                "sockhash_entries": self.sockhash_entries,
                "connect_timeout_ms": self.connect_timeout.as_millis() as u64,
                "copy_buffer_bytes": self.copy_buffer_bytes,
            },
            "log": {"level": self.log_level, "json": self.log_json, "kernel": self.log_kernel},
            "admin": {"address": self.admin_address.to_string()},
            "detect": {"timeout_ms": self.detect_timeout.as_millis() as u64, "opaque_ports": self.opaque_ports},
            // File paths only: the token and keys themselves are never in the config view.
            "identity": self.identity.as_ref().map(|i| serde_json::json!({
                "trust_domain": i.trust_domain,
                "issuer": i.issuer.to_string(),
                "anchors": i.anchors,
                "token_file": i.token_file,
                "rotate_fraction": i.rotate_fraction,
            })),
            "mesh": {
                "node_name": self.mesh.node_name,
                "inbound": self.mesh.inbound.to_string(),
                "peers": self.mesh.peers.iter().map(|p| serde_json::json!({
                    "name": p.name,
                    "address": p.address.to_string(),
                    "pod_cidrs": p.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            },
            "http": {
                "header_read_timeout_ms": self.http.header_read_timeout.as_millis() as u64,
                "max_header_bytes": self.http.max_header_bytes,
                "max_concurrent_streams": self.http.max_concurrent_streams,
            },
            "services": services_json(&self.catalog.services),
            "workloads": workloads_json(&self.catalog.workloads),
            "discovery": {"mode": match self.discovery {
                DiscoveryMode::File => "file",
                DiscoveryMode::Kubernetes => "kubernetes",
            }},
            // File paths only, never the token.
            "kubernetes": self.kubernetes.as_ref().map(|k| serde_json::json!({
                "api_server": k.api_server,
                "token_file": k.token_file,
                "ca_file": k.ca_file,
                "node_name": k.node_name,
                "namespace_label": k.namespace_label,
                "cgroup_driver": match k.cgroup_driver {
                    CgroupDriver::Systemd => "systemd",
                    CgroupDriver::Cgroupfs => "cgroupfs",
                },
                "cgroup_root": k.cgroup_root,
            })),
            "authorization": {"default": self.catalog.policies.default.as_str()},
            "policies": self.catalog.policies.policies.iter().map(|p| serde_json::json!({
                "name": p.name, "workload": p.workload, "namespace": p.namespace, "ports": p.ports,
                "allow": p.allow.iter().map(|a| match a {
                    crate::authz::Pattern::Exact(e) => e.clone(),
                    crate::authz::Pattern::Prefix(x) => format!("{x}*"),
                }).collect::<Vec<_>>(),
                "rules": p.rules.iter().map(|r| serde_json::json!({"methods": r.methods, "path_prefix": r.path_prefix})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    /// What `proxy run` and `proxy check` need beyond a well-formed config (`proxy clean`
    /// does not need to know where connects would be sent).
    pub fn require_interception(&self) -> Result<(), ConfigError> {
        if self.mode == Mode::Ebpf && self.redirect_ipv4.is_none() && self.redirect_ipv6.is_none() {
            return Err(invalid(
                "proxy.redirect_ipv4",
                "(unset)",
                "eBPF interception needs an address to send workloads' connects to",
                "set proxy.redirect_ipv4 (and optionally proxy.redirect_ipv6) to an address of this node reachable from the workloads, or pass --redirect-ipv4",
            ));
        }
        Ok(())
    }
}

fn parse_ip<T: FromStr>(field: &'static str, value: &str) -> Result<T, ConfigError> {
    value.trim().parse::<T>().map_err(|_| {
        invalid(
            field,
            value,
            "not an IP address of the right family",
            "write a plain address such as 10.0.0.1 (IPv4 fields) or fd00::1 (IPv6 fields)",
        )
    })
}

/// Cgroup paths are relative to the cgroup v2 mount; an absolute path that starts with the
/// mount is accepted and made relative later (the mount is only known at run time).
fn cgroup_rel(field: &'static str, value: String) -> Result<PathBuf, ConfigError> {
    let p = PathBuf::from(value.trim_start_matches('/'));
    if value.trim().is_empty()
        || p.as_os_str().is_empty()
        || p.components()
            .any(|c| c.as_os_str() == ".." || c.as_os_str() == ".")
    {
        return Err(invalid(
            field,
            value,
            "must name a cgroup directory below the cgroup v2 mount, without '.' or '..'",
            "write it relative to the cgroup v2 mount, e.g. ebpf-mesh/workloads",
        ));
    }
    Ok(p)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| "missing /PREFIX".to_string())?;
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let prefix: u8 = prefix
            .trim()
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max} bits"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        })
    }
}

impl fmt::Display for FailMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Result<Config, ConfigError> {
        let file = File::parse(Path::new("t.toml"), text)?;
        let c = Config::resolve(file, Overrides::default())?;
        c.require_interception()?;
        Ok(c)
    }

    fn err(text: &str) -> String {
        match resolve(text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn kubernetes_discovery_is_validated_and_gets_defaults() -> Result<(), ConfigError> {
        let base = "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[discovery]\nmode = \"kubernetes\"\n";
        let c = resolve(&format!(
            "{base}[kubernetes]\napi_server = \"https://192.0.2.1:6443\"\nnode_name = \"node-1\"\n"
        ))?;
        assert_eq!(c.discovery, DiscoveryMode::Kubernetes);
        let k = c.kubernetes.clone().unwrap_or_else(|| unreachable!());
        assert_eq!(k.token_file, PathBuf::from(DEFAULT_K8S_TOKEN_FILE));
        assert_eq!(k.ca_file, PathBuf::from(DEFAULT_K8S_CA_FILE));
        assert_eq!(k.namespace_label, DEFAULT_NAMESPACE_LABEL);
        assert_eq!(k.cgroup_driver, CgroupDriver::Systemd);
        assert_eq!(c.to_json()["discovery"]["mode"], "kubernetes");
        assert_eq!(
            resolve("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n")?.discovery,
            DiscoveryMode::File
        );
        let api = "[kubernetes]\napi_server = \"https://192.0.2.1:6443\"\n";
        let e = err(&format!("{base}{api}cgroup_driver = \"docker\"\n"));
        assert!(
            e.contains("kubernetes.cgroup_driver") && e.contains("fix:"),
            "{e}"
        );
        let e = err(&format!("{base}[kubernetes]\napi_server = \"192.0.2.1\"\n"));
        assert!(e.contains("kubernetes.api_server"), "{e}");
        let e = err(&format!("{base}{api}token_file = \"token\"\n"));
        assert!(e.contains("kubernetes.token_file"), "{e}");
        let e = err(&format!(
            "{base}{api}[[service]]\nname = \"a\"\naddresses = [\"10.96.0.1\"]\nports = [80]\n"
        ));
        assert!(e.contains("discovery.mode"), "{e}");
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[discovery]\nmode = \"consul\"\n");
        assert!(e.contains("discovery.mode"), "{e}");
        Ok(())
    }

    #[test]
    fn minimal_config_gets_defaults() -> Result<(), ConfigError> {
        let c = resolve("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n")?;
        assert_eq!(c.port, 15001);
        assert_eq!(c.mode, Mode::Ebpf);
        assert_eq!(c.fail_mode, FailMode::Open);
        assert!(!c.sockmap);
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/ebpf-mesh"));
        assert_eq!(c.workload_cgroup, PathBuf::from("ebpf-mesh/workloads"));
        Ok(())
    }

    #[test]
    fn flags_override_file() -> Result<(), ConfigError> {
        let file = File::parse(
            Path::new("t.toml"),
            "[proxy]\nport = 1000\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nsockmap = true\n",
        )?;
        let c = Config::resolve(
            file,
            Overrides {
                port: Some(2000),
                sockmap: Some(false),
                exclude_ports: vec![22, 22],
                ..Overrides::default()
            },
        )?;
        assert_eq!(c.port, 2000);
        assert!(!c.sockmap);
        assert_eq!(c.exclude_ports, vec![22]);
        // The short-circuit's rule for small writes: flags win over the file, and an
        // out-of-range flag is refused like the file's value.
        let text = "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nsockmap = true\nsockmap_small_write = 4096\nsockmap_small_streak = 8\n";
        let flags = Overrides {
            sockmap_small_write: Some(1024),
            sockmap_small_streak: Some(16),
            ..Overrides::default()
        };
        let c = Config::resolve(File::parse(Path::new("t.toml"), text)?, flags)?;
        assert_eq!(
            (c.short_circuit.small_write, c.short_circuit.small_streak),
            (1024, 16)
        );
        let too_big = Overrides {
            sockmap_small_write: Some(2 << 20),
            ..Overrides::default()
        };
        let e = Config::resolve(File::parse(Path::new("t.toml"), text)?, too_big)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("sockmap_small_write") && e.contains("2097152"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn malformed_inputs_name_field_value_and_fix() {
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.300\"\n");
        assert!(
            e.contains("proxy.redirect_ipv4") && e.contains("10.0.0.300") && e.contains("fix:"),
            "{e}"
        );
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nmode = \"nft\"\n");
        assert!(e.contains("intercept.mode") && e.contains("nft"), "{e}");
        let e = err(
            "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nexclude_cidrs = [\"10.0.0.0/33\"]\n",
        );
        assert!(e.contains("exclude_cidrs") && e.contains("/33"), "{e}");
        let e = err(
            "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nexclude_cidrs = [\"10.0.0.0\"]\n",
        );
        assert!(e.contains("missing /PREFIX"), "{e}");
        let e =
            err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nworkload_cgroup = \"../x\"\n");
        assert!(e.contains("workload_cgroup"), "{e}");
        let e = err(
            "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nworkload_cgroup = \"a\"\nproxy_cgroup = \"a/p\"\n",
        );
        assert!(e.contains("loop"), "{e}");
        let e = err(
            "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nmode = \"iptables\"\nsockmap = true\niptables_interfaces = [\"veth+\"]\n",
        );
        assert!(e.contains("intercept.sockmap"), "{e}");
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nmode = \"iptables\"\n");
        assert!(e.contains("iptables_interfaces"), "{e}");
        let e = err("[proxy]\n");
        assert!(e.contains("redirect_ipv4") && e.contains("(unset)"), "{e}");
        let e = err("[proxy]\nredirect_ipv4 = \"0.0.0.0\"\n");
        assert!(e.contains("unspecified"), "{e}");
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\nport = 0\n");
        assert!(e.contains("proxy.port"), "{e}");
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[limits]\nsockhash_entries = 1\n");
        assert!(e.contains("limits.sockhash_entries"), "{e}");
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\npin_dir = \"relative\"\n");
        assert!(e.contains("pin_dir"), "{e}");
        let e = err(
            "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\niptables_interfaces = [\"a b\"]\n",
        );
        assert!(e.contains("iptables_interfaces"), "{e}");
        let e =
            err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[admin]\naddress = \"0.0.0.0:15020\"\n");
        assert!(
            e.contains("admin.address") && e.contains("allow_non_loopback"),
            "{e}"
        );
        assert!(resolve("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[admin]\naddress = \"0.0.0.0:15020\"\nallow_non_loopback = true\n").is_ok());
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[admin]\naddress = \"localhost\"\n");
        assert!(e.contains("admin.address"), "{e}");
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[log]\nlevel = \"=[\"\n");
        assert!(e.contains("log.level"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_rejected() {
        let e = err("[proxy]\nredirect_ipv4 = \"10.0.0.1\"\nprot = 1\n");
        assert!(e.contains("prot") && e.contains("t.toml"), "{e}");
        let e = err("[proxy\n");
        assert!(e.contains("not valid TOML"), "{e}");
        let e = err("[proxy]\nport = \"x\"\n");
        assert!(e.contains("not valid TOML"), "{e}");
        let e = err("[proxy]\nport = 70000\n");
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap stand-in between fuzz runs: truncations and byte flips of a valid file.
        let base = "[proxy]\nport = 15001\nredirect_ipv4 = \"10.0.0.1\"\nredirect_ipv6 = \"fd00::1\"\n[intercept]\nexclude_cidrs = [\"10.0.0.0/8\"]\nexclude_ports = [22]\n";
        for cut in 0..base.len() {
            let _ = resolve(&base[..cut]);
        }
        let bytes = base.as_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x55;
            if let Ok(s) = std::str::from_utf8(&b) {
                let _ = resolve(s);
            }
        }
    }

    #[test]
    fn sockmap_exclude_ports_are_checked_and_merged() -> Result<(), ConfigError> {
        let base = "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nsockmap = true\n";
        let c = resolve(&format!("{base}sockmap_exclude_ports = [5432, 22, 5432]\n"))?;
        assert_eq!(c.sockmap_exclude_ports, vec![22, 5432]);
        let zero = resolve(&format!("{base}sockmap_exclude_ports = [0]\n"));
        assert!(zero.is_err_and(|e| e.to_string().contains("sockmap_exclude_ports")));
        let nine = resolve(&format!(
            "{base}sockmap_exclude_ports = [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
        ));
        assert!(nine.is_err_and(|e| e.to_string().contains("at most 8")));
        Ok(())
    }

    #[test]
    fn blocking_sockets_stay_off_the_short_circuit_unless_allowed() -> Result<(), ConfigError> {
        let base = "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nsockmap = true\n";
        assert!(!resolve(base)?.sockmap_blocking_sockets);
        let on = resolve(&format!("{base}sockmap_blocking_sockets = true\n"))?;
        assert!(on.sockmap_blocking_sockets);
        let wrong = resolve(&format!("{base}sockmap_blocking_sockets = \"yes\"\n"));
        assert!(wrong.is_err_and(|e| e.to_string().contains("sockmap_blocking_sockets")));
        Ok(())
    }

    #[test]
    fn kernel_path_is_on_with_the_short_circuit_unless_turned_off() -> Result<(), ConfigError> {
        let base = "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\n";
        assert!(resolve(&format!("{base}sockmap = true\n"))?.kernel_path);
        assert!(!resolve(&format!("{base}sockmap = true\nkernel_path = false\n"))?.kernel_path);
        // Without the short-circuit there is nothing to pair, whatever the setting says.
        assert!(!resolve(&format!("{base}sockmap = false\nkernel_path = true\n"))?.kernel_path);
        let c = resolve(&format!(
            "{base}sockmap = true\nsockmap_policy = \"naive\"\n"
        ))?;
        assert!(
            c.kernel_path && c.needs_kernel_offsets(),
            "the path reads write_seq"
        );
        let e = err(&format!("{base}kernel_path = \"yes\"\n"));
        assert!(e.contains("kernel_path"), "{e}");
        Ok(())
    }

    #[test]
    fn short_circuit_policy_defaults_bounds_and_errors() -> Result<(), ConfigError> {
        let base = "[proxy]\nredirect_ipv4 = \"10.0.0.1\"\n[intercept]\nsockmap = true\n";
        let c = resolve(base)?;
        assert_eq!(
            c.short_circuit.queue_limit,
            ShortCircuit::DEFAULT_QUEUE_LIMIT
        );
        // The stream rule is on by default, counting every write.
        assert_eq!(c.short_circuit.small_streak, 16);
        assert_eq!(c.short_circuit.small_write, 1 << 20);
        assert!(!c.short_circuit.is_naive());
        let c = resolve(&format!(
            "{base}sockmap_queue_limit = 65536\nsockmap_small_streak = 8\nsockmap_small_write = 4096\n"
        ))?;
        assert_eq!(
            c.short_circuit,
            ShortCircuit {
                queue_limit: 65536,
                small_write: 4096,
                small_streak: 8,
                detach_after: ShortCircuit::DEFAULT_DETACH_AFTER,
            }
        );
        assert!(
            resolve(&format!("{base}sockmap_policy = \"naive\"\n"))?
                .short_circuit
                .is_naive()
        );
        for (extra, field) in [
            ("sockmap_policy = \"fast\"", "intercept.sockmap_policy"),
            (
                "sockmap_policy = \"naive\"\nsockmap_queue_limit = 65536",
                "intercept.sockmap_policy",
            ),
            ("sockmap_queue_limit = 10", "intercept.sockmap_queue_limit"),
            (
                "sockmap_queue_limit = 4000000000",
                "intercept.sockmap_queue_limit",
            ),
            (
                "sockmap_small_write = 9999999",
                "intercept.sockmap_small_write",
            ),
            (
                "sockmap_small_streak = 100000",
                "intercept.sockmap_small_streak",
            ),
        ] {
            let e = err(&format!("{base}{extra}\n"));
            assert!(e.contains(field), "{extra}: {e}");
        }
        // Wrong types are refused by the parser with the field's name.
        let e = err(&format!("{base}sockmap_queue_limit = \"big\"\n"));
        assert!(e.contains("sockmap_queue_limit"), "{e}");
        Ok(())
    }
}
