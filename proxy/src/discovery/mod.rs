//! Service discovery: which virtual addresses are services, and their endpoints.
//!
//! Every source of services (the config file today, the Kubernetes API in issue 8) feeds the
//! same interface, [`Discovery::apply`], with a validated [`Catalog`]. `apply` builds a new
//! [`Snapshot`] off the hot path, reusing the load-balancer state of endpoints that stay (so a
//! reload neither forgets latencies nor un-ejects a failing endpoint), then swaps it in with
//! one pointer store. Connections and requests look the snapshot up per request and keep the
//! `Arc`s they took, so a swap never disturbs anything in flight.

pub mod kubernetes;
pub mod spec;
pub mod watch;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::balance::{Balancer, Endpoint, RetryBudget};
pub use spec::{Catalog, ProtocolHint, ServiceSpec, WorkloadSpec};

/// The window of every service's retry budget (the shape of linkerd's default).
pub const RETRY_BUDGET_TTL: Duration = Duration::from_secs(10);

/// A service with its runtime state.
pub struct Service {
    pub spec: ServiceSpec,
    /// One balancer per service port: endpoints without a port of their own take the port
    /// the workload connected to.
    balancers: HashMap<u16, Balancer>,
    pub budget: Arc<RetryBudget>,
}

impl Service {
    pub fn balancer(&self, port: u16) -> Option<&Balancer> {
        self.balancers.get(&port)
    }

    /// Every endpoint of every port, for metrics and status.
    pub fn balancers(&self) -> impl Iterator<Item = (&u16, &Balancer)> {
        self.balancers.iter()
    }
}

/// What a connection to a service's virtual address resolves to.
#[derive(Clone)]
pub struct Target {
    pub service: Arc<Service>,
    /// The service port the workload connected to.
    pub port: u16,
}

/// One generation of the catalog, ready for lookups.
pub struct Snapshot {
    pub generation: u64,
    pub catalog: Catalog,
    pub services: Vec<Arc<Service>>,
    by_addr: HashMap<SocketAddr, (usize, u16)>,
    workloads_by_cgroup: HashMap<PathBuf, usize>,
    workloads_by_addr: HashMap<IpAddr, usize>,
}

impl Snapshot {
    pub fn lookup(&self, dst: SocketAddr) -> Option<Target> {
        let dst = SocketAddr::new(canonical(dst.ip()), dst.port());
        let (i, port) = self.by_addr.get(&dst)?;
        Some(Target {
            service: Arc::clone(self.services.get(*i)?),
            port: *port,
        })
    }

    /// The declared workload with this pod address (its connections are authorized here).
    pub fn workload_at(&self, ip: IpAddr) -> Option<&WorkloadSpec> {
        let i = self.workloads_by_addr.get(&canonical(ip))?;
        self.catalog.workloads.get(*i)
    }

    /// Authorizes `source` (a workload's SPIFFE ID; None when unknown) reaching `dst`, for
    /// the HTTP request `http` if any. `None`: `dst` is not a declared workload, so this
    /// node's policy does not govern it.
    pub fn authorize(
        &self,
        source: Option<&str>,
        dst: SocketAddr,
        http: Option<(&str, &str)>,
    ) -> Option<(crate::authz::Decision, &WorkloadSpec)> {
        let w = self.workload_at(dst.ip())?;
        let d = self
            .catalog
            .policies
            .decide(source, (&w.namespace, &w.name), dst.port(), http);
        Some((d, w))
    }

    /// The workload a cgroup (relative to the cgroup v2 mount) belongs to.
    pub fn workload_of_cgroup(&self, cgroup: &std::path::Path) -> Option<&WorkloadSpec> {
        let i = self.workloads_by_cgroup.get(cgroup)?;
        self.catalog.workloads.get(*i)
    }
}

/// An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) is the IPv4
/// address for lookups.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The current snapshot, swapped as a whole.
pub struct Discovery {
    current: RwLock<Arc<Snapshot>>,
    next_generation: AtomicU64,
    /// Where the workloads' cgroup paths are (the cgroup v2 mount); None: identities from
    /// cgroups are off (iptables mode, unit tests).
    cgroup_root: Option<PathBuf>,
    cgroups: std::sync::Mutex<CgroupIndex>,
    /// The generation of the snapshot just installed, for tasks that act on reloads
    /// (`subscribe`).
    installed: tokio::sync::watch::Sender<u64>,
}

/// cgroup id (inode number of the cgroup directory, which is what
/// `bpf_get_current_cgroup_id` returns on cgroup v2) -> workload, for the generation it was
/// built from. Pods come and go after the config was loaded, so a miss rescans the
/// configured cgroup directories (and their descendants: a pod's processes may sit in child
/// cgroups), at most once per [`RESCAN_INTERVAL`] so that connections from unknown cgroups
/// cannot turn every accept into a directory walk.
#[derive(Default)]
struct CgroupIndex {
    generation: u64,
    by_id: HashMap<u64, usize>,
    scanned: Option<std::time::Instant>,
}

const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How deep below a workload's cgroup directory its descendants are indexed.
const CGROUP_DEPTH: usize = 4;

/// The cgroup v2 id of a cgroup directory: its inode number, which is what
/// `bpf_get_current_cgroup_id` returns. None when the directory does not exist (yet).
fn cgroup_id(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

fn index_cgroup(
    dir: &std::path::Path,
    workload: usize,
    depth: usize,
    out: &mut HashMap<u64, usize>,
) {
    let Some(id) = cgroup_id(dir) else {
        return;
    };
    out.insert(id, workload);
    if depth == 0 {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                index_cgroup(&e.path(), workload, depth - 1, out);
            }
        }
    }
}

impl Discovery {
    pub fn new(catalog: Catalog) -> Discovery {
        let d = Discovery {
            current: RwLock::new(Arc::new(Snapshot {
                generation: 0,
                catalog: Catalog::default(),
                services: Vec::new(),
                by_addr: HashMap::new(),
                workloads_by_cgroup: HashMap::new(),
                workloads_by_addr: HashMap::new(),
            })),
            next_generation: AtomicU64::new(1),
            cgroup_root: None,
            cgroups: std::sync::Mutex::new(CgroupIndex::default()),
            installed: tokio::sync::watch::Sender::new(0),
        };
        d.apply(catalog);
        d
    }

    /// Turns on workload identification by cgroup, below the cgroup v2 mount `root`.
    pub fn with_cgroup_root(mut self, root: PathBuf) -> Discovery {
        self.cgroup_root = Some(root);
        self
    }

    /// The cgroup ids of every declared workload's cgroup directories that exist now (for
    /// the kernel's `MESH_WORKLOADS`; the kernel walks the descendants' ancestors itself).
    /// Empty without a cgroup root.
    pub fn workload_cgroup_ids(&self) -> std::collections::HashSet<u64> {
        let Some(root) = self.cgroup_root.as_ref() else {
            return std::collections::HashSet::new();
        };
        self.snapshot()
            .catalog
            .workloads
            .iter()
            .flat_map(|w| w.cgroups.iter())
            .filter_map(|c| cgroup_id(&root.join(c)))
            .collect()
    }

    /// The workload whose cgroup (or a descendant of it) has id `cgroup_id`.
    pub fn workload_of_cgroup_id(&self, cgroup_id: u64) -> Option<WorkloadSpec> {
        let root = self.cgroup_root.as_ref()?;
        let snap = self.snapshot();
        let mut idx = self.cgroups.lock().unwrap_or_else(|e| e.into_inner());
        if idx.generation != snap.generation {
            *idx = CgroupIndex {
                generation: snap.generation,
                ..CgroupIndex::default()
            };
        }
        if let Some(i) = idx.by_id.get(&cgroup_id) {
            return snap.catalog.workloads.get(*i).cloned();
        }
        let now = std::time::Instant::now();
        if idx
            .scanned
            .is_some_and(|t| now.duration_since(t) < RESCAN_INTERVAL)
        {
            return None;
        }
        idx.scanned = Some(now);
        let mut by_id = HashMap::new();
        for (i, w) in snap.catalog.workloads.iter().enumerate() {
            for c in &w.cgroups {
                index_cgroup(&root.join(c), i, CGROUP_DEPTH, &mut by_id);
            }
        }
        idx.by_id = by_id;
        let i = idx.by_id.get(&cgroup_id)?;
        snap.catalog.workloads.get(*i).cloned()
    }

    /// The current snapshot: a clone of an `Arc` under a read lock held for nanoseconds.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn lookup(&self, dst: SocketAddr) -> Option<Target> {
        self.snapshot().lookup(dst)
    }

    /// Installs a new catalog and returns its generation.
    pub fn apply(&self, catalog: Catalog) -> u64 {
        let old = self.snapshot();
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let next = Arc::new(build(generation, catalog, &old));
        match self.current.write() {
            Ok(mut g) => *g = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        self.installed.send_replace(generation);
        generation
    }

    /// Wakes its holder when a new snapshot is installed (its value: that generation). One
    /// shared channel instead of a timer per task that watches for reloads.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.installed.subscribe()
    }
}

fn build(generation: u64, catalog: Catalog, old: &Snapshot) -> Snapshot {
    let old_by_name: HashMap<&str, &Arc<Service>> = old
        .services
        .iter()
        .map(|s| (s.spec.name.as_str(), s))
        .collect();
    let mut services = Vec::with_capacity(catalog.services.len());
    let mut by_addr = HashMap::new();
    for (i, spec) in catalog.services.iter().enumerate() {
        let prev = old_by_name.get(spec.name.as_str());
        let mut balancers = HashMap::new();
        for port in &spec.ports {
            let endpoints = spec
                .endpoints
                .iter()
                .map(|e| {
                    let addr = e.socket_addr(*port);
                    // Same address, weight and identity: the same endpoint, state and all.
                    let kept = prev
                        .and_then(|p| p.balancers.get(port))
                        .and_then(|b| {
                            b.endpoints().iter().find(|x| {
                                x.addr == addr && x.weight == e.weight && x.identity == e.identity
                            })
                        })
                        .cloned();
                    kept.unwrap_or_else(|| {
                        Arc::new(Endpoint::new(addr, e.weight, e.identity.clone()))
                    })
                })
                .collect();
            balancers.insert(*port, Balancer::new(endpoints));
            for ip in &spec.addresses {
                by_addr.insert(SocketAddr::new(canonical(*ip), *port), (i, *port));
            }
        }
        let budget = match prev {
            Some(p)
                if p.spec.retry.budget_ratio == spec.retry.budget_ratio
                    && p.spec.retry.budget_min_per_sec == spec.retry.budget_min_per_sec =>
            {
                Arc::clone(&p.budget)
            }
            _ => Arc::new(RetryBudget::new(
                spec.retry.budget_ratio,
                spec.retry.budget_min_per_sec,
                RETRY_BUDGET_TTL,
            )),
        };
        services.push(Arc::new(Service {
            spec: spec.clone(),
            balancers,
            budget,
        }));
    }
    let mut workloads_by_cgroup = HashMap::new();
    let mut workloads_by_addr = HashMap::new();
    for (i, w) in catalog.workloads.iter().enumerate() {
        for c in &w.cgroups {
            workloads_by_cgroup.insert(c.clone(), i);
        }
        for a in &w.addresses {
            workloads_by_addr.insert(canonical(*a), i);
        }
    }
    Snapshot {
        generation,
        catalog,
        services,
        by_addr,
        workloads_by_cgroup,
        workloads_by_addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::spec::{EndpointSpec, RetryPolicy};
    use std::time::Instant;

    fn service(name: &str, vip: &str, eps: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            addresses: vec![vip.parse().unwrap_or_else(|_| unreachable!())],
            ports: vec![80],
            protocol: ProtocolHint::Auto,
            endpoints: eps
                .iter()
                .map(|e| EndpointSpec {
                    address: e.parse().unwrap_or_else(|_| unreachable!()),
                    port: Some(8080),
                    weight: 1,
                    identity: None,
                })
                .collect(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: None,
            idle_timeout: Duration::from_secs(60),
            max_request_body: None,
            retry: RetryPolicy {
                attempts: 2,
                statuses: vec![503],
                per_try_timeout: None,
                max_body_bytes: 1024,
                budget_ratio: 0.2,
                budget_min_per_sec: 10,
            },
            circuit: Default::default(),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn lookup_by_vip_and_mapped_address() {
        let d = Discovery::new(Catalog {
            services: vec![service("web", "10.96.0.10", &["10.0.0.1"])],
            workloads: vec![],
            policies: Default::default(),
        });
        let t = d.lookup(sa("10.96.0.10:80"));
        assert!(
            t.as_ref()
                .is_some_and(|t| t.service.spec.name == "web" && t.port == 80)
        );
        assert!(d.lookup(sa("[::ffff:10.96.0.10]:80")).is_some());
        assert!(d.lookup(sa("10.96.0.10:81")).is_none());
        assert!(d.lookup(sa("10.96.0.11:80")).is_none());
        let b = t.and_then(|t| t.service.balancer(80).map(|b| b.endpoints()[0].addr));
        assert_eq!(b, Some(sa("10.0.0.1:8080")));
    }

    #[test]
    fn subscribers_see_each_installed_generation() {
        let d = Discovery::new(Catalog::default());
        let mut rx = d.subscribe();
        assert_eq!(*rx.borrow_and_update(), d.snapshot().generation);
        assert!(!rx.has_changed().unwrap_or(true));
        let g = d.apply(Catalog::default());
        assert!(rx.has_changed().unwrap_or(false));
        assert_eq!(*rx.borrow_and_update(), g);
        assert_eq!(d.snapshot().generation, g);
    }

    #[test]
    fn reload_keeps_endpoint_state_and_generation_grows() {
        let d = Discovery::new(Catalog {
            services: vec![service("web", "10.96.0.10", &["10.0.0.1", "10.0.0.2"])],
            workloads: vec![],
            policies: Default::default(),
        });
        let g1 = d.snapshot().generation;
        let before = d.lookup(sa("10.96.0.10:80")).and_then(|t| {
            t.service
                .balancer(80)
                .map(|b| Arc::clone(&b.endpoints()[0]))
        });
        // An in-flight request holds its endpoint across the reload.
        let inflight = before.as_ref().map(|e| e.start(Instant::now()));
        let g2 = d.apply(Catalog {
            services: vec![service("web", "10.96.0.10", &["10.0.0.1", "10.0.0.3"])],
            workloads: vec![],
            policies: Default::default(),
        });
        assert!(g2 > g1);
        let after = d
            .lookup(sa("10.96.0.10:80"))
            .and_then(|t| t.service.balancer(80).map(|b| b.endpoints().to_vec()));
        let after = after.unwrap_or_default();
        assert_eq!(after.len(), 2);
        assert!(before.as_ref().is_some_and(|b| Arc::ptr_eq(b, &after[0])));
        assert_eq!(after[0].pending(), 1);
        drop(inflight);
        assert_eq!(after[0].pending(), 0);
        assert_eq!(after[1].addr, sa("10.0.0.3:8080"));
        d.apply(Catalog::default());
        assert!(d.lookup(sa("10.96.0.10:80")).is_none());
    }
}
