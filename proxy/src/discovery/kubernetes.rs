//! Discovery mode `kubernetes`: services, endpoints and this node's workloads from the API
//! server, fed to the same interface as the config file: a [`Catalog`] built from
//! `[[service]]`/`[[workload]]` sections, resolved by [`Catalog::resolve`] (so the file's
//! validation and defaults apply) and installed with [`Discovery::apply`]. Nothing
//! downstream knows where a catalog came from.
//!
//! # What is watched
//! One `kube::runtime::watcher` per kind (it relists by itself after `410 Gone` and retries
//! with backoff after errors): Services and EndpointSlices in every namespace, Pods on this
//! node (`spec.nodeName` field selector), and Namespaces carrying `namespace_label`.
//! EndpointSlices are read as `DynamicObject`s of the version the server serves
//! (`discovery.k8s.io/v1`, else `v1beta1`: 1.20 has only v1beta1); the fields used here
//! (`addressType`, `ports`, `endpoints[].addresses`, `endpoints[].conditions.ready`) are the
//! same in both. ServiceAccounts are not watched: a workload's identity needs only the
//! pod's `spec.serviceAccountName`.
//!
//! # Mapping
//! - A Service with a cluster IP (not headless, not ExternalName) becomes one service named
//!   `<name>.<namespace>`: addresses = `clusterIPs`, ports = its TCP `ports[].port`, protocol
//!   from `appProtocol` (`http` → http1, `kubernetes.io/h2c` or `http2` → http2, `grpc` →
//!   grpc, `tcp` → opaque, anything else → auto). Endpoints: every address of every
//!   endpoint whose `conditions.ready` is not false (absent = ready) in the EndpointSlices
//!   labelled `kubernetes.io/service-name=<name>` in the namespace, with the slice port whose
//!   name matches the service port's (or the slice's only port). A Service whose ports
//!   differ in target port or protocol becomes one service per port,
//!   `<name>.<namespace>.<port>`. Service names must fit the catalog's 1-63 characters; a
//!   Service that does not, or that fails validation on its own, is left out and logged.
//! - A Pod on this node, Running, with a `podIP`, not on the host network, in a labelled
//!   namespace, is a workload `{ name: <pod>, namespace, identity:
//!   spiffe://<trust domain>/ns/<ns>/sa/<serviceAccountName or default>, addresses: [podIP],
//!   cgroups: [the kubelet's pod cgroup] }`; the cgroup path follows `cgroup_driver`, see
//!   [`pod_cgroup`].
//! - Policies (authorization) and everything else still come from the config file.
//!
//! # Updates and outages
//! Nothing is applied until every watch has listed once (a half-listed cluster would serve
//! services without endpoints). After that, each event marks the state dirty; a catalog is
//! rebuilt at most once per [`DEBOUNCE`] and applied only when it differs from the last one.
//! If the whole set fails to resolve, the previous catalog stays. While the API server is
//! unreachable nothing changes: the last catalog keeps serving; the watchers log their
//! errors and `mesh_kubernetes_last_event_timestamp_seconds` stops advancing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use prometheus_client::metrics::gauge::Gauge;
use serde_json::Value;
use tokio::sync::watch as tokio_watch;
use tracing::{debug, info, warn};

use super::{Catalog, Discovery};
use crate::{
    authz::Policies,
    config::{CgroupDriver, KubernetesSettings},
    discovery::spec::{EndpointSection, ServiceSection, WorkloadSection},
    metrics::Metrics,
};

/// At most one catalog rebuild per this interval, however many events arrive.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// The label EndpointSlices name their Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Retry bounds for connecting (reading the CA file, API discovery) before the watches run.
const CONNECT_RETRY_MIN: Duration = Duration::from_millis(500);
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "cannot read the API server's CA bundle {path}: {reason}; point kubernetes.ca_file at a PEM file"
    )]
    Ca { path: PathBuf, reason: String },
    #[error("invalid kubernetes.api_server {0:?}: {1}")]
    Url(String, String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(
        "cannot discover discovery.k8s.io (EndpointSlices) on the API server: {0}; check api_server, the token's RBAC (list/watch endpointslices) and that the server is up"
    )]
    Discovery(#[source] kube::Error),
    #[error("the API server serves neither discovery.k8s.io/v1 nor v1beta1 EndpointSlices")]
    NoEndpointSlices,
}

/// Everything the watcher needs, built once in main.
pub struct Watcher {
    pub settings: KubernetesSettings,
    pub trust_domain: String,
    /// The config file's authorization: part of every catalog.
    pub policies: Policies,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    /// The admin server's /config view: its services and workloads follow each apply.
    pub config_json: Arc<RwLock<Value>>,
    /// Certificates follow the workloads.
    pub identity: Option<Arc<crate::identity::IdentityManager>>,
    /// Unix time of the last watch event received (0 before the first): staleness.
    pub last_event: Gauge,
}

// === impl Watcher ===

impl Watcher {
    /// Runs until `stop` turns true. Connection failures are retried with backoff.
    pub async fn run(self, mut stop: tokio_watch::Receiver<bool>) {
        let mut delay = CONNECT_RETRY_MIN;
        let (client, slices) = loop {
            match self.connect().await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "kubernetes discovery cannot start; the current catalog stays");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
            delay = (delay * 2).min(CONNECT_RETRY_MAX);
        };
        info!(
            api_server = %self.settings.api_server,
            node = %self.settings.node_name,
            endpointslices = %slices.api_version,
            "watching the Kubernetes API"
        );
        let mut events = self.streams(client, &slices);
        let mut state = State::default();
        let mut last_applied: Option<Catalog> = None;
        let mut warned: HashSet<String> = HashSet::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut last_build = tokio::time::Instant::now() - DEBOUNCE;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                ev = events.next() => match ev {
                    Some(Ok(u)) => {
                        self.last_event.set(unix_now());
                        state.handle(u, &self.settings.node_name);
                        if deadline.is_none() {
                            deadline = Some((last_build + DEBOUNCE).max(tokio::time::Instant::now()));
                        }
                    }
                    Some(Err(e)) => warn!(error = %e, "kubernetes watch failed; retrying with backoff, the current catalog stays"),
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    deadline = None;
                    last_build = tokio::time::Instant::now();
                    if !state.synced() {
                        continue;
                    }
                    let (catalog, dropped) = build_catalog(
                        &state,
                        &self.settings,
                        self.policies.clone(),
                        &self.trust_domain,
                    );
                    for d in &dropped {
                        if !warned.contains(d) {
                            warn!("kubernetes discovery leaves out {d}");
                        }
                    }
                    warned = dropped.into_iter().collect();
                    match catalog {
                        Ok(c) if last_applied.as_ref() != Some(&c) => {
                            self.apply(c.clone()).await;
                            last_applied = Some(c);
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "the catalog from the API server is invalid; the current catalog stays"),
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<(Client, ApiResource), KubeError> {
        let s = &self.settings;
        let url = s
            .api_server
            .parse::<hyper::Uri>()
            .map_err(|e| KubeError::Url(s.api_server.clone(), e.to_string()))?;
        let mut cfg = kube::Config::new(url);
        cfg.root_cert = Some(read_ca(&s.ca_file)?);
        // kube re-reads the file, so rotated (projected) tokens are picked up.
        cfg.auth_info.token_file = Some(s.token_file.display().to_string());
        let client = Client::try_from(cfg).map_err(KubeError::Client)?;
        let group = kube::discovery::group(&client, "discovery.k8s.io")
            .await
            .map_err(KubeError::Discovery)?;
        let versions: Vec<&str> = group.versions().collect();
        let version = ["v1", "v1beta1"]
            .into_iter()
            .find(|v| versions.contains(v))
            .ok_or(KubeError::NoEndpointSlices)?;
        let gvk = GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice");
        Ok((
            client,
            ApiResource::from_gvk_with_plural(&gvk, "endpointslices"),
        ))
    }

    fn streams(
        &self,
        client: Client,
        slices: &ApiResource,
    ) -> BoxStream<'static, Result<Update, watcher::Error>> {
        let s = &self.settings;
        let services = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .map(|r| r.map(|e| Update::Service(Box::new(e))));
        let slices = watcher(
            Api::<DynamicObject>::all_with(client.clone(), slices),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
        )
        .map(|r| r.map(|e| Update::Slice(Box::new(e))));
        let pods = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", s.node_name)),
        )
        .map(|r| r.map(|e| Update::Pod(Box::new(e))));
        let namespaces = watcher(
            Api::<Namespace>::all(client),
            watcher::Config::default().labels(&s.namespace_label),
        )
        .map(|r| r.map(|e| Update::Namespace(Box::new(e))));
        futures::stream::select_all([
            services.boxed(),
            slices.boxed(),
            pods.boxed(),
            namespaces.boxed(),
        ])
        .boxed()
    }

    async fn apply(&self, catalog: Catalog) {
        if let Some(m) = &self.identity {
            let ids = catalog
                .workloads
                .iter()
                .filter_map(|w| crate::identity::SpiffeId::parse(&w.identity).ok())
                .collect();
            // A failure keeps the old certificates; the manager retries renewals.
            if let Err(e) = m.set_identities(ids).await {
                warn!(error = %e, "cannot get certificates for the workloads from the API server");
            }
        }
        let services = crate::config::services_json(&catalog.services);
        let workloads = crate::config::workloads_json(&catalog.workloads);
        let (n_services, n_workloads) = (catalog.services.len(), catalog.workloads.len());
        let generation = self.discovery.apply(catalog);
        self.metrics.config_generation.set(generation as i64);
        if let Ok(mut g) = self.config_json.write()
            && let Some(o) = g.as_object_mut()
        {
            o.insert("services".into(), services);
            o.insert("workloads".into(), workloads);
        }
        info!(
            generation,
            services = n_services,
            workloads = n_workloads,
            "catalog from the Kubernetes API applied"
        );
    }
}

/// The watcher with its default backoff (kube's: exponential, capped, with jitter).
fn watcher<K>(
    api: Api<K>,
    cfg: watcher::Config,
) -> impl futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, cfg).default_backoff()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn read_ca(path: &Path) -> Result<Vec<Vec<u8>>, KubeError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let err = |reason: String| KubeError::Ca {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE in it".into()));
    }
    Ok(certs)
}

// === the watched state ===

/// One event of one of the watches (boxed: a Pod is kilobytes, a Namespace is not).
pub enum Update {
    Service(Box<Event<Service>>),
    Slice(Box<Event<DynamicObject>>),
    Pod(Box<Event<Pod>>),
    Namespace(Box<Event<Namespace>>),
}

/// What the catalog needs of a Service.
#[derive(Debug, Clone, PartialEq)]
struct Svc {
    addresses: Vec<String>,
    ports: Vec<SvcPort>,
}

#[derive(Debug, Clone, PartialEq)]
struct SvcPort {
    name: String,
    port: u16,
    protocol: &'static str,
}

/// What the catalog needs of an EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
struct Slice {
    namespace: String,
    service: String,
    /// (name, port); a slice port without a number (all ports) is left out.
    ports: Vec<(String, u16)>,
    /// Addresses of ready endpoints.
    ready: Vec<IpAddr>,
}

/// What the catalog needs of a local Pod.
#[derive(Debug, Clone, PartialEq)]
struct LocalPod {
    uid: String,
    service_account: String,
    ip: IpAddr,
    qos: String,
}

/// Objects of one kind by (namespace, name), with the relist protocol of the watcher: a
/// relist (`Init` .. `InitDone`) replaces the map at its end, so the old objects keep
/// serving while it runs.
struct Store<T> {
    items: BTreeMap<(String, String), T>,
    relisting: Option<BTreeMap<(String, String), T>>,
    synced: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            items: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

impl<T> Store<T> {
    fn handle<K: kube::Resource>(&mut self, ev: Event<K>, parse: impl Fn(&K) -> Option<T>) {
        let key = |k: &K| (k.namespace().unwrap_or_default(), k.name_any());
        match ev {
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(k) => {
                if let (Some(m), Some(v)) = (self.relisting.as_mut(), parse(&k)) {
                    m.insert(key(&k), v);
                }
            }
            Event::InitDone => {
                if let Some(m) = self.relisting.take() {
                    self.items = m;
                }
                self.synced = true;
            }
            Event::Apply(k) => match parse(&k) {
                Some(v) => {
                    self.items.insert(key(&k), v);
                }
                None => {
                    self.items.remove(&key(&k));
                }
            },
            Event::Delete(k) => {
                self.items.remove(&key(&k));
            }
        }
    }
}

#[derive(Default)]
struct State {
    services: Store<Svc>,
    slices: Store<Slice>,
    pods: Store<LocalPod>,
    namespaces: Store<()>,
}

impl State {
    fn synced(&self) -> bool {
        self.services.synced && self.slices.synced && self.pods.synced && self.namespaces.synced
    }

    fn handle(&mut self, u: Update, node: &str) {
        match u {
            Update::Service(ev) => self.services.handle(*ev, parse_service),
            Update::Slice(ev) => self.slices.handle(*ev, parse_slice),
            Update::Pod(ev) => self.pods.handle(*ev, |p| parse_pod(p, node)),
            Update::Namespace(ev) => self.namespaces.handle(*ev, |_| Some(())),
        }
    }
}

fn app_protocol(p: Option<&str>) -> &'static str {
    match p {
        Some("http") => "http1",
        Some("kubernetes.io/h2c" | "http2") => "http2",
        Some("grpc") => "grpc",
        Some("tcp") => "opaque",
        _ => "auto",
    }
}

fn parse_service(s: &Service) -> Option<Svc> {
    let spec = s.spec.as_ref()?;
    let mut addresses = spec.cluster_ips.clone().unwrap_or_default();
    if addresses.is_empty() {
        addresses.extend(spec.cluster_ip.clone());
    }
    // Headless ("None") and ExternalName services have no virtual address to intercept.
    addresses.retain(|a| !a.is_empty() && a != "None");
    if addresses.is_empty() {
        return None;
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        // The proxy carries TCP only.
        .filter(|p| p.protocol.as_deref().is_none_or(|x| x == "TCP"))
        .filter_map(|p| {
            Some(SvcPort {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.port).ok().filter(|x| *x != 0)?,
                protocol: app_protocol(p.app_protocol.as_deref()),
            })
        })
        .collect();
    Some(Svc { addresses, ports })
}

fn parse_slice(o: &DynamicObject) -> Option<Slice> {
    let service = o.labels().get(SERVICE_NAME_LABEL)?.clone();
    let d = &o.data;
    if !matches!(d["addressType"].as_str(), Some("IPv4" | "IPv6")) {
        return None;
    }
    let ports = d["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["protocol"].as_str().is_none_or(|x| x == "TCP"))
        .filter_map(|p| {
            let port = u16::try_from(p["port"].as_u64()?).ok()?;
            Some((p["name"].as_str().unwrap_or("").to_owned(), port))
        })
        .collect();
    let ready = d["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        // Absent (unknown) is ready, as kube-proxy treats it.
        .filter(|e| e["conditions"]["ready"].as_bool() != Some(false))
        .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str()?.parse().ok())
        .collect();
    Some(Slice {
        namespace: o.namespace().unwrap_or_default(),
        service,
        ports,
        ready,
    })
}

fn parse_pod(p: &Pod, node: &str) -> Option<LocalPod> {
    let spec = p.spec.as_ref()?;
    let status = p.status.as_ref()?;
    if spec.node_name.as_deref() != Some(node)
        || spec.host_network == Some(true)
        || status.phase.as_deref() != Some("Running")
    {
        return None;
    }
    Some(LocalPod {
        uid: p.metadata.uid.clone()?,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        ip: status.pod_ip.as_deref()?.parse().ok()?,
        qos: status
            .qos_class
            .clone()
            .unwrap_or_else(|| "BestEffort".into()),
    })
}

/// The kubelet's cgroup of a pod, relative to the cgroup v2 mount.
///
/// cgroupfs: `<root>/kubepods/<qos>/pod<uid>` (Guaranteed: `<root>/kubepods/pod<uid>`);
/// systemd: `<root>/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`
/// (Guaranteed: `<root>/kubepods.slice/kubepods-pod<uid_>.slice`), where `uid_` is the
/// uid with `-` replaced by `_` (systemd reserves `-` in unit names for nesting).
pub fn pod_cgroup(driver: CgroupDriver, root: &Path, qos: &str, uid: &str) -> PathBuf {
    let qos = qos.to_ascii_lowercase();
    let guaranteed = qos == "guaranteed";
    match driver {
        CgroupDriver::Cgroupfs if guaranteed => root.join("kubepods").join(format!("pod{uid}")),
        CgroupDriver::Cgroupfs => root.join("kubepods").join(&qos).join(format!("pod{uid}")),
        CgroupDriver::Systemd => {
            let uid = uid.replace('-', "_");
            let top = root.join("kubepods.slice");
            if guaranteed {
                top.join(format!("kubepods-pod{uid}.slice"))
            } else {
                top.join(format!("kubepods-{qos}.slice"))
                    .join(format!("kubepods-{qos}-pod{uid}.slice"))
            }
        }
    }
}

fn name_fits(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The sections one Service maps to (see the module doc).
fn service_sections(ns: &str, name: &str, svc: &Svc, slices: &[&Slice]) -> Vec<ServiceSection> {
    let base = format!("{name}.{ns}");
    // Per service port: the ready endpoints with their target port.
    let eps: Vec<BTreeSet<(IpAddr, u16)>> = svc
        .ports
        .iter()
        .map(|p| {
            let mut set = BTreeSet::new();
            for s in slices {
                let port = s
                    .ports
                    .iter()
                    .find(|(n, _)| *n == p.name)
                    .or_else(|| (s.ports.len() == 1).then(|| &s.ports[0]))
                    .map(|(_, x)| *x);
                if let Some(port) = port {
                    set.extend(s.ready.iter().map(|a| (*a, port)));
                }
            }
            set
        })
        .collect();
    let section =
        |name: String, ports: Vec<u16>, protocol: &str, eps: Vec<EndpointSection>| ServiceSection {
            name: Some(name),
            addresses: Some(svc.addresses.clone()),
            ports: Some(ports),
            protocol: Some(protocol.to_owned()),
            endpoints: Some(eps),
            ..ServiceSection::default()
        };
    let endpoint = |a: IpAddr, port: Option<u16>| EndpointSection {
        address: Some(a.to_string()),
        port,
        ..EndpointSection::default()
    };
    match svc.ports.as_slice() {
        [] => Vec::new(),
        [p] => vec![section(
            base,
            vec![p.port],
            p.protocol,
            eps[0].iter().map(|(a, x)| endpoint(*a, Some(*x))).collect(),
        )],
        ports => {
            let same_port = ports
                .iter()
                .zip(&eps)
                .all(|(p, e)| e.iter().all(|(_, x)| *x == p.port));
            let same_protocol = ports.iter().all(|p| p.protocol == ports[0].protocol);
            if same_port && same_protocol {
                let addrs: BTreeSet<IpAddr> = eps.iter().flatten().map(|(a, _)| *a).collect();
                vec![section(
                    base,
                    ports.iter().map(|p| p.port).collect(),
                    ports[0].protocol,
                    addrs.into_iter().map(|a| endpoint(a, None)).collect(),
                )]
            } else {
                ports
                    .iter()
                    .zip(&eps)
                    .map(|(p, e)| {
                        section(
                            format!("{base}.{}", p.port),
                            vec![p.port],
                            p.protocol,
                            e.iter().map(|(a, x)| endpoint(*a, Some(*x))).collect(),
                        )
                    })
                    .collect()
            }
        }
    }
}

/// The catalog of the watched state, and what was left out (one line each, for the log).
fn build_catalog(
    state: &State,
    k: &KubernetesSettings,
    policies: Policies,
    trust_domain: &str,
) -> (Result<Catalog, crate::config::ConfigError>, Vec<String>) {
    let mut dropped = Vec::new();
    let mut by_service: HashMap<(&str, &str), Vec<&Slice>> = HashMap::new();
    for s in state.slices.items.values() {
        by_service
            .entry((s.namespace.as_str(), s.service.as_str()))
            .or_default()
            .push(s);
    }
    let mut services = Vec::new();
    let mut names = HashSet::new();
    let mut taken: HashSet<SocketAddr> = HashSet::new();
    for ((ns, name), svc) in &state.services.items {
        let slices = by_service
            .get(&(ns.as_str(), name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for section in service_sections(ns, name, svc, slices) {
            let sname = section.name.clone().unwrap_or_default();
            if !name_fits(&sname) {
                dropped.push(format!(
                    "service {ns}/{name}: the name {sname:?} is not 1-63 letters, digits, '-', '_' or '.'"
                ));
                continue;
            }
            let alone = Catalog::resolve(
                vec![section.clone()],
                Vec::new(),
                Policies::default(),
                trust_domain,
            );
            let spec = match alone {
                Ok(mut c) if !c.services.is_empty() => c.services.remove(0),
                Ok(_) => continue,
                Err(e) => {
                    dropped.push(format!("service {ns}/{name}: {e}"));
                    continue;
                }
            };
            let addrs: Vec<SocketAddr> = spec
                .addresses
                .iter()
                .flat_map(|ip| spec.ports.iter().map(|p| SocketAddr::new(*ip, *p)))
                .collect();
            if !names.insert(sname.clone()) || addrs.iter().any(|a| taken.contains(a)) {
                dropped.push(format!(
                    "service {ns}/{name}: its name or address is taken by another service"
                ));
                continue;
            }
            taken.extend(addrs);
            services.push(section);
        }
    }
    let mut workloads = Vec::new();
    let mut ips = HashSet::new();
    for ((ns, name), pod) in &state.pods.items {
        if !state
            .namespaces
            .items
            .contains_key(&(String::new(), ns.clone()))
        {
            continue;
        }
        let cgroup = pod_cgroup(k.cgroup_driver, &k.cgroup_root, &pod.qos, &pod.uid);
        let section = WorkloadSection {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            identity: Some(format!(
                "spiffe://{trust_domain}/ns/{ns}/sa/{}",
                pod.service_account
            )),
            cgroups: Some(vec![cgroup.display().to_string()]),
            addresses: Some(vec![pod.ip.to_string()]),
        };
        if let Err(e) = Catalog::resolve(
            Vec::new(),
            vec![section.clone()],
            Policies::default(),
            trust_domain,
        ) {
            dropped.push(format!("pod {ns}/{name}: {e}"));
            continue;
        }
        if !ips.insert(pod.ip) {
            dropped.push(format!(
                "pod {ns}/{name}: another pod has its address {}",
                pod.ip
            ));
            continue;
        }
        workloads.push(section);
    }
    debug!(
        services = services.len(),
        workloads = workloads.len(),
        "catalog rebuilt from the Kubernetes API"
    );
    (
        Catalog::resolve(services, workloads, policies, trust_domain),
        dropped,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> KubernetesSettings {
        KubernetesSettings {
            api_server: "https://192.0.2.1:6443".into(),
            token_file: "/t".into(),
            ca_file: "/c".into(),
            node_name: "node-1".into(),
            namespace_label: "ebpf-mesh.io/inject=enabled".into(),
            cgroup_driver: CgroupDriver::Systemd,
            cgroup_root: PathBuf::new(),
        }
    }

    #[test]
    fn pod_cgroups_follow_the_kubelet_drivers() {
        let uid = "1a2b-3c";
        let r = Path::new("");
        assert_eq!(
            pod_cgroup(CgroupDriver::Systemd, r, "Burstable", uid),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_3c.slice"
            )
        );
        assert_eq!(
            pod_cgroup(CgroupDriver::Systemd, r, "Guaranteed", uid),
            PathBuf::from("kubepods.slice/kubepods-pod1a2b_3c.slice")
        );
        assert_eq!(
            pod_cgroup(CgroupDriver::Cgroupfs, Path::new("k"), "BestEffort", uid),
            PathBuf::from("k/kubepods/besteffort/pod1a2b-3c")
        );
        assert_eq!(
            pod_cgroup(CgroupDriver::Cgroupfs, r, "Guaranteed", uid),
            PathBuf::from("kubepods/pod1a2b-3c")
        );
    }

    fn svc(ports: &[(&str, u16, &'static str)]) -> Svc {
        Svc {
            addresses: vec!["10.96.0.70".into()],
            ports: ports
                .iter()
                .map(|(n, p, proto)| SvcPort {
                    name: (*n).into(),
                    port: *p,
                    protocol: proto,
                })
                .collect(),
        }
    }

    fn slice(ports: &[(&str, u16)], ready: &[&str]) -> Slice {
        Slice {
            namespace: "shop".into(),
            service: "web".into(),
            ports: ports.iter().map(|(n, p)| ((*n).into(), *p)).collect(),
            ready: ready
                .iter()
                .map(|a| a.parse().unwrap_or_else(|_| unreachable!()))
                .collect(),
        }
    }

    #[test]
    fn services_map_to_sections_per_port_when_target_ports_differ() {
        let one = service_sections(
            "shop",
            "web",
            &svc(&[("", 80, "http1")]),
            &[&slice(&[("", 8080)], &["10.77.2.2", "10.77.3.2"])],
        );
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name.as_deref(), Some("web.shop"));
        let eps = one[0].endpoints.clone().unwrap_or_default();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].port, Some(8080));

        let s = slice(&[("http", 8080), ("admin", 9090)], &["10.77.2.2"]);
        let two = service_sections(
            "shop",
            "web",
            &svc(&[("http", 80, "auto"), ("admin", 90, "auto")]),
            &[&s],
        );
        let names: Vec<_> = two.iter().filter_map(|s| s.name.clone()).collect();
        assert_eq!(names, ["web.shop.80", "web.shop.90"]);
        assert_eq!(
            two[1].endpoints.as_ref().map(|e| e[0].port),
            Some(Some(9090))
        );

        let s = slice(&[("a", 80), ("b", 81)], &["10.77.2.2"]);
        let same = service_sections(
            "shop",
            "web",
            &svc(&[("a", 80, "auto"), ("b", 81, "auto")]),
            &[&s],
        );
        assert_eq!(same.len(), 1);
        assert_eq!(same[0].ports, Some(vec![80, 81]));
    }

    #[test]
    fn the_catalog_resolves_and_leaves_out_bad_services_and_unlabelled_pods() {
        let mut st = State::default();
        st.services
            .items
            .insert(("shop".into(), "web".into()), svc(&[("", 80, "auto")]));
        let mut bad = svc(&[("", 80, "auto")]);
        bad.addresses = vec!["127.0.0.1".into()];
        st.services
            .items
            .insert(("shop".into(), "loop".into()), bad);
        st.slices.items.insert(
            ("shop".into(), "web-1".into()),
            slice(&[("", 8080)], &["10.77.2.2"]),
        );
        let pod = |ip: &str| LocalPod {
            uid: "u-1".into(),
            service_account: "default".into(),
            ip: ip.parse().unwrap_or_else(|_| unreachable!()),
            qos: "BestEffort".into(),
        };
        st.pods
            .items
            .insert(("shop".into(), "client".into()), pod("10.77.1.2"));
        st.pods
            .items
            .insert(("other".into(), "x".into()), pod("10.77.1.3"));
        st.namespaces
            .items
            .insert((String::new(), "shop".into()), ());
        let (c, dropped) = build_catalog(&st, &settings(), Policies::default(), "cluster.local");
        let c = c.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].name, "web.shop");
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        assert!(dropped[0].contains("shop/loop"));
        assert_eq!(c.workloads.len(), 1);
        assert_eq!(
            c.workloads[0].identity,
            "spiffe://cluster.local/ns/shop/sa/default"
        );
    }
}
