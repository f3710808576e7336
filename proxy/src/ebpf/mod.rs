//! Loading, configuring, pinning and attaching the kernel programs, and typed handles over
//! their maps.
//!
//! Layout under the pin directory (so `bpftool` explains the state):
//! - `maps/<MAP>`: every map (`proxy_common::map`).
//! - `progs/<prog>`: every program (`proxy_common::program`).
//! - `links/<prog>`: only in fail-closed mode, the connect4/connect6 attachments, so they
//!   outlive the proxy (a crash leaves connects redirected to a dead port: refused).
//!   In fail-open mode no link is pinned: when the proxy dies, the kernel detaches the
//!   programs with the last reference to their links, and workloads connect directly.

pub mod btf;
mod pins;
pub mod sweep;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSockAddr, Iter, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use proxy_common::{
    AF_INET, AF_INET6, FLAG_KERNEL_LOG, FLAG_SOCKMAP, FLAG_SOCKMAP_BLOCKING, FLAG_WORKLOADS_ONLY,
    Flow, ListenKey, OrigDst, OrigKey, SockKey, Splice, counter, map, program,
};
use tracing::{info, warn};

use crate::config::{Cidr, Config, FailMode, ShortCircuit};
pub use pins::{PinDir, PinError, is_bpffs};

/// The kernel object, embedded at build time by build.rs (empty if it was not built).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this proxy binary was built without its eBPF object (bpf-linker or the nightly toolchain was missing at build time); run `cargo xtask build`, or use --mode iptables --sockmap off"
    )]
    NoObject,
    #[error("loading the eBPF object failed: {0}; run `proxy check` for what this kernel lacks")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {0} is missing from the eBPF object; rebuild with `cargo xtask build`")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object; rebuild with `cargo xtask build`")]
    MissingMap(&'static str),
    #[error("program {name}: {action} failed: {}{hint}", chain(source.as_ref()))]
    Program {
        name: &'static str,
        action: &'static str,
        source: Box<aya::programs::ProgramError>,
        hint: &'static str,
    },
    #[error("program {name}: its link cannot be pinned: {source}")]
    Link {
        name: &'static str,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("map {name}: {action} failed: {}", chain(source.as_ref()))]
    Map {
        name: &'static str,
        action: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("pinning {path}: {source}; is {dir} on a bpffs mount?", dir = path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    Pin {
        path: PathBuf,
        source: Box<aya::pin::PinError>,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    PinDir(#[from] PinError),
}

/// An error with its causes, one after the other (aya's top-level messages leave out the
/// errno, which is usually the useful part).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Everything the proxy needs to start the datapath.
pub struct Plan<'a> {
    pub config: &'a Config,
    /// Network namespace cookie of the proxy's listeners.
    pub proxy_netns: u64,
    /// Absolute path of the workload cgroup parent.
    pub workload_cgroup: &'a Path,
    /// Absolute path of the proxy's own cgroup.
    pub proxy_cgroup: &'a Path,
    /// Where the kernel keeps a socket's short-circuit queue length (from its BTF); needed by
    /// every short-circuit policy but the naive one.
    pub kernel_offsets: Option<btf::KernelOffsets>,
}

/// Loaded and attached programs. Dropping it detaches what is not pinned; call
/// [`Datapath::shutdown`] for an orderly stop that also removes the pins.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinDir,
    fail_mode: FailMode,
    /// connect4/connect6 links: pinned in fail-closed mode, held here otherwise.
    connect_links: Vec<ConnectLink>,
}

enum ConnectLink {
    Held(#[allow(dead_code)] FdLink),
    Pinned(PinnedLink),
}

/// `BPF_EXIST` (include/uapi/linux/bpf.h): a map update that only replaces an existing entry.
const BPF_EXIST: u64 = 2;

/// Handles the connection path uses; cheap to share between tasks.
pub struct Maps {
    /// Behind a lock because taking an entry deletes it, and aya's delete takes `&mut`.
    orig_dst: std::sync::Mutex<HashMap<MapData, OrigKey, OrigDst>>,
    counters: PerCpuArray<MapData, u64>,
    /// Behind a lock for aya's `&mut` delete (`detach`).
    socks: std::sync::Mutex<SockHash<MapData, SockKey>>,
    /// Declared workloads' cgroup ids (`intercept.workloads_only`); written by the proxy's
    /// sync task, behind a lock because aya's writes take `&mut`.
    workloads: std::sync::Mutex<HashMap<MapData, u64, u32>>,
    /// The kernel-only path (`MESH_SPLICE`), written per connection; behind a lock for
    /// aya's `&mut` writes.
    splice: std::sync::Mutex<HashMap<MapData, SockKey, Splice>>,
    /// Read only: whether a proxy socket is paired with a workload.
    peers: HashMap<MapData, SockKey, SockKey>,
    /// `MESH_EXPECT`, only to claim an unpaired upstream socket's entry
    /// (`release_unpaired`); behind a lock for aya's `&mut` delete.
    expect: std::sync::Mutex<HashMap<MapData, SockKey, u64>>,
    /// Bytes sent on the kernel-only path past each proxy socket (`MESH_DIRECT`).
    direct: std::sync::Mutex<HashMap<MapData, SockKey, u64>>,
    /// Each registered socket's sending direction (`MESH_FLOWS`), read for the pause sk_msg
    /// asks of the proxy's writes (`Flow::held`, after every write: no lock) and a
    /// workload's wish to leave the SOCKHASH (`Flow::detach`).
    flows: HashMap<MapData, SockKey, Flow>,
    /// A second handle on `MESH_FLOWS` (opened from its pin), behind a lock for aya's `&mut`
    /// writes: only to mark a proxy socket `FLOW_TCP_DETACHING`, rarely.
    flows_write: std::sync::Mutex<HashMap<MapData, SockKey, Flow>>,
    /// Network namespace cookie of the proxy's sockets, the first part of their keys.
    proxy_netns: u64,
    /// The stream rule is on (`sockmap_small_streak` > 0): streams belong on plain TCP, so
    /// every connection that asks to leave does (`transport::splice::Pacer`).
    streams_leave: bool,
    /// The release sweep (`program::RELEASE`), if it could be set up: leaving proxy sockets
    /// that no write of the proxy's reaches wait for it.
    release: Option<sweep::Sweep>,
}

/// Upstream sockets `Maps::release_unpaired` took out of the SOCKHASH, process-wide
/// (`mesh_tcp_short_circuit_unpaired_released_total`).
pub fn released_unpaired() -> &'static prometheus_client::metrics::counter::Counter {
    static COUNT: std::sync::OnceLock<prometheus_client::metrics::counter::Counter> =
        std::sync::OnceLock::new();
    COUNT.get_or_init(Default::default)
}

/// Forwards the kernel programs' aya-log records to the proxy's log (target
/// `proxy::kernel`), when `log.kernel` is on.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(target: "proxy::kernel", "{}", record.args());
    }

    fn flush(&self) {}
}

impl Datapath {
    /// The reader of the kernel programs' log records (they write them only with
    /// `log.kernel` on). The caller polls its fd and calls `flush()` when it is readable.
    pub fn kernel_logger(&mut self) -> Result<aya_log::EbpfLogger<KernelLog>, aya_log::Error> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, KernelLog)
    }

    /// Loads, configures, pins and attaches everything. Stale pins left by a crashed proxy
    /// are removed first; a pin directory held by a running proxy is refused.
    /// `pins` is the pin directory, locked by the caller first thing at start-up so a
    /// second proxy is refused before it touches anything.
    pub fn start(plan: &Plan<'_>, pins: PinDir) -> Result<(Datapath, Maps), EbpfError> {
        if OBJECT.is_empty() {
            pins.remove_all_except(&[]);
            return Err(EbpfError::NoObject);
        }
        match Datapath::start_locked(plan, &pins) {
            Ok((ebpf, connect_links, maps)) => Ok((
                Datapath {
                    ebpf,
                    pins,
                    fail_mode: plan.config.fail_mode,
                    connect_links,
                },
                maps,
            )),
            Err(e) => {
                // Whatever was pinned before the failure goes too; a half-set-up pin
                // directory would only confuse bpftool users and the next start.
                pins.remove_all_except(&[]);
                Err(e)
            }
        }
    }

    fn start_locked(
        plan: &Plan<'_>,
        pins: &PinDir,
    ) -> Result<(Ebpf, Vec<ConnectLink>, Maps), EbpfError> {
        let cfg = plan.config;
        // Stale attachments stay attached until the new ones are in place, so a fail-closed
        // node never has a moment where workloads could bypass the proxy.
        let stale = pins.take_stale()?;
        if stale.removed > 0 {
            warn!(
                pin_dir = %cfg.pin_dir.display(),
                removed = stale.removed,
                "found pins of a proxy that did not shut down cleanly; replacing them"
            );
        }

        let n = cfg.sockhash_entries;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map::SOCKS, n)
            .map_max_entries(map::PEERS, n)
            .map_max_entries(map::FLOWS, n)
            .map_max_entries(map::SPLICE, n)
            .map_max_entries(map::DIRECT, n)
            .load(OBJECT)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;

        configure(&mut ebpf, plan)?;
        for name in map::ALL {
            let m = ebpf.map(name).ok_or(EbpfError::MissingMap(name))?;
            let path = pins.map_path(name);
            m.pin(&path).map_err(|source| EbpfError::Pin {
                path,
                source: Box::new(source),
            })?;
        }

        // Load every program first, so a verifier rejection leaves nothing attached.
        load_cgroup_sock_addr(&mut ebpf, program::CONNECT4, pins)?;
        load_cgroup_sock_addr(&mut ebpf, program::CONNECT6, pins)?;
        load_sock_ops(&mut ebpf, program::SOCKOPS_WORKLOAD, pins)?;
        load_sock_ops(&mut ebpf, program::SOCKOPS_PROXY, pins)?;
        {
            let p: &mut SkMsg = program_mut(&mut ebpf, program::MSG_REDIRECT)?;
            p.load().map_err(prog_err(program::MSG_REDIRECT, "load"))?;
            let path = pins.prog_path(program::MSG_REDIRECT);
            p.pin(&path).map_err(|source| EbpfError::Pin {
                path,
                source: Box::new(source),
            })?;
        }

        if cfg.sockmap {
            load_listener_scan(&mut ebpf, Some(pins))?;
        }
        let release = if cfg.sockmap {
            load_release_sweep(&mut ebpf, pins)
        } else {
            None
        };

        let workload_cg = open_cgroup(plan.workload_cgroup)?;
        let proxy_cg = open_cgroup(plan.proxy_cgroup)?;

        // Attach in dependency order: bookkeeping first, interception last, so the first
        // redirected connect already finds its original destination recorded.
        if cfg.sockmap {
            let socks = ebpf
                .map(map::SOCKS)
                .ok_or(EbpfError::MissingMap(map::SOCKS))?;
            let socks: SockHash<&MapData, SockKey> =
                SockHash::try_from(socks).map_err(map_err(map::SOCKS, "open"))?;
            let fd = socks
                .fd()
                .try_clone()
                .map_err(|e| map_err(map::SOCKS, "dup fd")(aya::maps::MapError::from(e)))?;
            let p: &mut SkMsg = program_mut(&mut ebpf, program::MSG_REDIRECT)?;
            p.attach(&fd)
                .map_err(prog_err(program::MSG_REDIRECT, "attach"))?;
        }
        attach_sock_ops(&mut ebpf, program::SOCKOPS_PROXY, &proxy_cg)?;
        attach_sock_ops(&mut ebpf, program::SOCKOPS_WORKLOAD, &workload_cg)?;
        if cfg.sockmap {
            // After sock_ops: a listener is then seen by its TCP_LISTEN callback, by this
            // scan, or by both (the callback's entry wins), never by neither.
            scan_listeners(&mut ebpf);
        }
        let mut connect_links = Vec::new();
        for name in [program::CONNECT4, program::CONNECT6] {
            let p: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            let id = p
                .attach(&workload_cg, CgroupAttachMode::Single)
                .map_err(prog_err(name, "attach"))?;
            let link = p.take_link(id).map_err(prog_err(name, "take link"))?;
            let link = FdLink::try_from(link).map_err(|e| EbpfError::Link {
                name,
                source: Box::new(e),
            })?;
            connect_links.push(match cfg.fail_mode {
                FailMode::Open => ConnectLink::Held(link),
                FailMode::Closed => {
                    let path = pins.link_path(name);
                    ConnectLink::Pinned(link.pin(&path).map_err(|source| EbpfError::Pin {
                        path,
                        source: Box::new(source),
                    })?)
                }
            });
        }
        // Now the new programs are in place: let the stale ones go.
        drop(stale);

        let counters = take_map(&mut ebpf, map::COUNTERS)?;
        let counters = PerCpuArray::try_from(counters).map_err(map_err(map::COUNTERS, "open"))?;
        let orig_dst = take_hash(&mut ebpf, map::ORIG_DST)?;
        let workloads = take_hash(&mut ebpf, map::WORKLOADS)?;
        let splice = take_hash(&mut ebpf, map::SPLICE)?;
        let peers = take_hash(&mut ebpf, map::PEERS)?;
        let expect = take_hash(&mut ebpf, map::EXPECT)?;
        let direct = take_hash(&mut ebpf, map::DIRECT)?;
        let flows = take_hash(&mut ebpf, map::FLOWS)?;
        let flows_write = MapData::from_pin(pins.map_path(map::FLOWS))
            .and_then(|m| HashMap::try_from(aya::maps::Map::HashMap(m)))
            .map_err(map_err(map::FLOWS, "open pinned"))?;

        info!(
            pin_dir = %cfg.pin_dir.display(),
            workload_cgroup = %plan.workload_cgroup.display(),
            proxy_cgroup = %plan.proxy_cgroup.display(),
            sockmap = cfg.sockmap,
            fail_mode = %cfg.fail_mode,
            "eBPF programs attached"
        );
        // Taken after the sk_msg attach above; the attached program keeps its own reference.
        let socks = take_map(&mut ebpf, map::SOCKS)?;
        let socks = SockHash::try_from(socks).map_err(map_err(map::SOCKS, "open"))?;
        Ok((
            ebpf,
            connect_links,
            Maps {
                orig_dst: std::sync::Mutex::new(orig_dst),
                counters,
                socks: std::sync::Mutex::new(socks),
                workloads: std::sync::Mutex::new(workloads),
                splice: std::sync::Mutex::new(splice),
                peers,
                expect: std::sync::Mutex::new(expect),
                direct: std::sync::Mutex::new(direct),
                flows,
                flows_write: std::sync::Mutex::new(flows_write),
                proxy_netns: plan.proxy_netns,
                streams_leave: cfg.short_circuit.small_streak != 0,
                release,
            },
        ))
    }

    /// Orderly stop: detach and unpin everything. In fail-closed mode the connect programs
    /// stay attached and pinned, so workloads cannot bypass a stopped proxy; `proxy clean`
    /// removes them.
    pub fn shutdown(self) {
        let Datapath {
            ebpf,
            pins,
            fail_mode,
            connect_links,
        } = self;
        let mut kept = Vec::new();
        for link in connect_links {
            match (link, fail_mode) {
                (ConnectLink::Pinned(l), FailMode::Closed) => kept.push(l),
                (ConnectLink::Pinned(l), FailMode::Open) => {
                    if let Err(e) = l.unpin() {
                        warn!(error = %e, "removing a link pin failed");
                    }
                }
                (ConnectLink::Held(_), _) => {}
            }
        }
        // Links on cgroups (bpf_link_create) always coexist with other programs on the same
        // hook; the kernel rejects the BPF_F_ALLOW_MULTI flag there, hence `Single` above.
        // Dropping the object detaches the remaining links and closes program and map fds.
        drop(ebpf);
        let keep: Vec<&str> = if kept.is_empty() {
            Vec::new()
        } else {
            vec![program::CONNECT4, program::CONNECT6]
        };
        pins.remove_all_except(&keep);
        if !kept.is_empty() {
            warn!(
                "fail-closed: connect4/connect6 stay attached so workloads cannot bypass the stopped proxy; `proxy clean` removes them"
            );
        }
        drop(kept);
    }
}

// === impl Maps ===

impl Maps {
    /// True if the stream rule is on: see the field.
    pub fn streams_leave(&self) -> bool {
        self.streams_leave
    }

    /// Asks for the release sweep: a leaving connection's proxy socket waits for a verdict
    /// no write of the proxy's would bring. Paced and run off the async workers; the caller
    /// looks again once [`Maps::sweeps_done`] reaches the number returned (`None`: no sweep
    /// on this node), or later.
    pub fn sweep(&self) -> Option<u64> {
        self.release.as_ref().map(|s| s.request())
    }

    /// How many release sweeps have finished (see [`Maps::sweep`]).
    pub fn sweeps_done(&self) -> u64 {
        self.release.as_ref().map_or(0, |s| s.done())
    }

    /// Takes (reads and deletes) the original destination of a connection the proxy accepted
    /// from `client` on `local`, and the cgroup id of the task that connected.
    ///
    /// Deleting it here keeps `MESH_ORIG_DST` down to connections the proxy has not accepted
    /// yet. Left until the workload socket closes, every open connection held an entry, and an
    /// LRU map evicts before it is full (each CPU keeps its own list of free entries), so a
    /// busy node lost the destination of connections it had not accepted yet.
    pub fn take_orig_dst(
        &self,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Option<(SocketAddr, u64)> {
        let key = orig_key(client, local)?;
        let mut map = self.orig_dst.lock().unwrap_or_else(|e| e.into_inner());
        let v = map.get(&key, 0).ok()?;
        // A failed delete leaves the entry to the socket's close callback or to LRU eviction.
        let _ = map.remove(&key);
        drop(map);
        Some((orig_to_socket_addr(&v)?, v.cgroup_id))
    }

    /// The keys of the proxy's two sockets of a connection, as sock_ops registered them:
    /// (client-side socket, upstream socket), each from its local and peer address.
    pub fn proxy_keys(
        &self,
        inbound: (SocketAddr, SocketAddr),
        outbound: (SocketAddr, SocketAddr),
    ) -> Option<(SockKey, SockKey)> {
        Some((
            sock_key(self.proxy_netns, inbound.0, inbound.1)?,
            sock_key(self.proxy_netns, outbound.0, outbound.1)?,
        ))
    }

    /// Whether the proxy's last write on socket `key` was redirected into a workload that has
    /// more than 3/4 of the queue limit unread: the proxy should pause before its next one.
    /// `None` if the socket has no flow (it is not on the short-circuit).
    /// The value is `Flow::held`: 0, or the queue's fill level in sixteenths of the limit.
    pub fn held(&self, key: &SockKey) -> Option<u32> {
        self.flow(key).map(|f| f.held)
    }

    /// The `MESH_FLOWS` entry of socket `key`, if it is registered.
    pub fn flow(&self, key: &SockKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    /// The workload socket sock_ops paired with proxy socket `key`, if any.
    pub fn peer(&self, key: &SockKey) -> Option<SockKey> {
        self.peers.get(key, 0).ok()
    }

    /// Marks proxy socket `key` `FLOW_TCP_DETACHING`: its sk_msg never redirects again, so
    /// the workload behind it may leave the SOCKHASH once its queue is empty. The caller must
    /// not be writing on that socket meanwhile (sk_msg updates the same entry under the
    /// socket's lock; the copy writes and calls this from one task). False if the socket is
    /// not registered (any more): it closed, or never was.
    pub fn quiesce(&self, key: &SockKey) -> bool {
        self.update_flow(key, |flow| {
            flow.state = proxy_common::FLOW_TCP_DETACHING;
            flow.held = 0;
        })
    }

    /// Marks proxy socket `key` `PROXY_LEAVES`: the proxy takes its connection off the
    /// short-circuit when a workload asks. Before the proxy writes on it (sk_msg updates the
    /// same entry under the socket's lock while the proxy writes). False if not registered.
    pub fn mark_leaves(&self, key: &SockKey) -> bool {
        self.update_flow(key, |flow| flow.proxy |= proxy_common::PROXY_LEAVES)
    }

    /// Rewrites proxy socket `key`'s `MESH_FLOWS` entry with `change` applied; false if it is
    /// not registered (any more). The caller keeps sk_msg off the entry meanwhile (see
    /// `quiesce`).
    fn update_flow(&self, key: &SockKey, change: impl FnOnce(&mut Flow)) -> bool {
        let mut map = self.flows_write.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(mut flow) = map.get(key, 0) else {
            return false;
        };
        change(&mut flow);
        // BPF_EXIST: never re-create the entry of a socket whose close callback just removed it.
        map.insert(key, flow, BPF_EXIST).is_ok()
    }

    /// Removes socket `key`, a workload's or the proxy's own, from the SOCKHASH (sk_msg said it
    /// is safe: `DETACH_READY`, or `DETACH_PEER_EMPTY` of the proxy's socket facing a
    /// workload). The kernel drops its psock and the socket is plain TCP again.
    pub fn detach(&self, key: &SockKey) -> bool {
        let mut socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
        socks.remove(key).is_ok()
    }

    /// True if sock_ops paired the proxy socket `key` with a workload socket on this node.
    pub fn paired(&self, key: &SockKey) -> bool {
        self.peers.get(key, 0).is_ok()
    }

    /// Takes the proxy's upstream socket `key` out of the SOCKHASH if no workload on this
    /// node paired with it: its server is another node's, or not a workload. In the SOCKHASH
    /// such a socket gained nothing and every send of the proxy's on it took the
    /// short-circuit's send path (`tcp_bpf_sendmsg`: measured 41-54 µs per small send
    /// against 12-16 µs on plain TCP, under `perf trace`; HTTP/1.1 at 1000 req/s to a
    /// server outside the mesh, p50 130-178 µs against 116-124 µs).
    ///
    /// Safe because it claims the server's side first: it deletes the `MESH_EXPECT` entry
    /// the proxy's sock_ops left for the server's, and only a successful delete lets the
    /// socket go. The server's sock_ops pairs only if its own delete of that entry succeeds
    /// (proxy-ebpf/src/sockops.rs), so a server that did not pair by now never will, and
    /// nothing can have been redirected into this socket's short-circuit queue (only its
    /// paired workload redirects into a proxy socket), which leaving would drop. A server
    /// whose accept comes after the claim stays on plain TCP with it. True if it left.
    pub fn release_unpaired(&self, key: &SockKey) -> bool {
        if self.paired(key) {
            return false;
        }
        let claimed = {
            let mut expect = self.expect.lock().unwrap_or_else(|e| e.into_inner());
            expect.remove(&key.reversed_in(0)).is_ok()
        };
        if !claimed || !self.detach(key) {
            return false;
        }
        released_unpaired().inc();
        true
    }

    /// Lets the workload sending into proxy socket `key` take the kernel-only path towards the
    /// workload behind proxy socket `out`, once the proxy has relayed `relayed` bytes of it
    /// (see `MESH_SPLICE`). Called again after each relayed write.
    pub fn set_splice(
        &self,
        key: &SockKey,
        out: &SockKey,
        relayed: u64,
    ) -> Result<(), aya::maps::MapError> {
        let mut map = self.splice.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(key, Splice { out: *out, relayed }, 0)
    }

    /// Takes the kernel-only path away from the workload sending into proxy socket `key`:
    /// its next message goes to the proxy over TCP.
    pub fn remove_splice(&self, key: &SockKey) {
        let mut map = self.splice.lock().unwrap_or_else(|e| e.into_inner());
        let _ = map.remove(key);
    }

    /// Takes (reads and deletes) the bytes the workload paired with proxy socket `key` sent
    /// past it on the kernel-only path (0 if it never did).
    pub fn take_direct_bytes(&self, key: &SockKey) -> u64 {
        let mut map = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.get(key, 0).unwrap_or(0);
        let _ = map.remove(key);
        n
    }

    /// Makes `MESH_WORKLOADS` hold exactly `wanted` (cgroup ids); returns how many entries
    /// were added and removed.
    pub fn set_workloads(
        &self,
        wanted: &std::collections::HashSet<u64>,
    ) -> Result<(usize, usize), aya::maps::MapError> {
        let mut map = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        let present: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        let mut removed = 0;
        for id in &present {
            if !wanted.contains(id) {
                map.remove(id)?;
                removed += 1;
            }
        }
        let mut added = 0;
        for id in wanted {
            if !present.contains(id) {
                map.insert(id, 1, 0)?;
                added += 1;
            }
        }
        Ok((added, removed))
    }

    /// The kernel counters summed over CPUs, by `proxy_common::counter` index.
    /// Sockets in the SOCKHASH now, counted by walking its keys. Costs one syscall per
    /// entry, so it runs at scrape time on the admin thread, never on the data path.
    pub fn sockhash_entries(&self) -> usize {
        let socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
        socks.keys().filter(Result::is_ok).count()
    }

    pub fn counters(&self) -> Result<Vec<u64>, aya::maps::MapError> {
        sum_counters(&self.counters)
    }
}

/// Sums a per-CPU counter map.
pub fn sum_counters<T: std::borrow::Borrow<MapData>>(
    m: &PerCpuArray<T, u64>,
) -> Result<Vec<u64>, aya::maps::MapError> {
    (0..counter::COUNT)
        .map(|i| {
            m.get(&i, 0)
                .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
        })
        .collect()
}

/// Reads the counters of a running (or crashed) proxy from its pin directory.
pub fn read_pinned_counters(pin_dir: &Path) -> Result<Vec<u64>, EbpfError> {
    let path = pins::map_path(pin_dir, map::COUNTERS);
    let data = MapData::from_pin(&path).map_err(map_err(map::COUNTERS, "open pinned"))?;
    let m = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(map_err(map::COUNTERS, "open"))?;
    sum_counters(&m).map_err(map_err(map::COUNTERS, "read"))
}

/// What `/debug/ebpf` and `proxy status` show: the pinned programs (kernel ids and
/// names), map occupancy and the counters summed over CPUs.
pub fn inspect(pin_dir: &Path) -> Result<serde_json::Value, EbpfError> {
    use serde_json::json;
    let programs: Vec<serde_json::Value> = program::ALL
        .iter()
        .filter_map(|name| {
            let info =
                aya::programs::ProgramInfo::from_pin(pin_dir.join("progs").join(name)).ok()?;
            Some(json!({"name": name, "id": info.id(), "pin": pin_dir.join("progs").join(name)}))
        })
        .collect();
    let socks = MapData::from_pin(pins::map_path(pin_dir, map::SOCKS))
        .ok()
        .and_then(|d| SockHash::<_, SockKey>::try_from(aya::maps::Map::SockHash(d)).ok())
        .map(|m| m.keys().count());
    let maps = json!([
        {"name": map::SOCKS, "entries": socks},
        {"name": map::PEERS, "entries": count_keys::<SockKey, SockKey>(pin_dir, map::PEERS, aya::maps::Map::LruHashMap)},
        {"name": map::FLOWS, "entries": count_keys::<SockKey, Flow>(pin_dir, map::FLOWS, aya::maps::Map::HashMap)},
        {"name": map::ORIG_DST, "entries": count_keys::<OrigKey, OrigDst>(pin_dir, map::ORIG_DST, aya::maps::Map::LruHashMap)},
        {"name": map::LISTEN, "entries": count_keys::<ListenKey, u64>(pin_dir, map::LISTEN, aya::maps::Map::LruHashMap)},
    ]);
    let values = read_pinned_counters(pin_dir)?;
    let counters: serde_json::Map<String, serde_json::Value> = counter::NAMES
        .iter()
        .zip(values)
        .map(|(n, v)| ((*n).to_string(), json!(v)))
        .collect();
    Ok(json!({
        "pin_dir": pin_dir,
        "programs": programs,
        "maps": maps,
        "counters": counters,
    }))
}

/// Entries of a pinned hash map (`kind`: `Map::HashMap` or `Map::LruHashMap`), counted by
/// walking its keys: bounded by max_entries, and only done on an operator's request, never on
/// the data path.
fn count_keys<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
    kind: fn(MapData) -> aya::maps::Map,
) -> Option<usize> {
    let data = MapData::from_pin(pins::map_path(pin_dir, name)).ok()?;
    HashMap::<_, K, V>::try_from(kind(data))
        .ok()
        .map(|m| m.keys().count())
}

/// Removes every pin under `pin_dir` (detaching pinned links). Refuses while a proxy runs.
pub fn clean(pin_dir: &Path) -> Result<usize, EbpfError> {
    let pins = PinDir::lock(pin_dir)?;
    let stale = pins.take_stale()?;
    let n = stale.removed;
    drop(stale);
    pins.remove_all_except(&[]);
    Ok(n)
}

/// The OrigKey the kernel wrote for a connection, computed from the proxy's side.
pub fn orig_key(client: SocketAddr, local: SocketAddr) -> Option<OrigKey> {
    let (family, client_ip, proxy_ip) = match (client.ip(), local.ip()) {
        (IpAddr::V4(c), IpAddr::V4(l)) => (AF_INET, ip4_words(c.octets()), ip4_words(l.octets())),
        (IpAddr::V6(c), IpAddr::V6(l)) => match (c.to_ipv4_mapped(), l.to_ipv4_mapped()) {
            (Some(c), Some(l)) => (AF_INET, ip4_words(c.octets()), ip4_words(l.octets())),
            _ => (AF_INET6, ip6_words(c.octets()), ip6_words(l.octets())),
        },
        _ => return None,
    };
    Some(OrigKey {
        family,
        client_port: u32::from(client.port()),
        proxy_port: u32::from(local.port()),
        _pad: 0,
        client_ip,
        proxy_ip,
    })
}

/// The `MESH_SOCKS` key of a socket in namespace `netns` from its local and peer address, in
/// the kernel's layout (v4-mapped addresses normalised to IPv4, like `OrigKey`).
pub fn sock_key(netns: u64, local: SocketAddr, remote: SocketAddr) -> Option<SockKey> {
    let k = orig_key(remote, local)?;
    Some(SockKey {
        netns,
        family: k.family,
        local_port: k.proxy_port,
        remote_port: k.client_port,
        _pad: 0,
        local_ip: k.proxy_ip,
        remote_ip: k.client_ip,
    })
}

fn orig_to_socket_addr(v: &OrigDst) -> Option<SocketAddr> {
    let port = u16::try_from(v.port).ok()?;
    let ip = match v.family {
        AF_INET => IpAddr::from(v.ip[0].to_ne_bytes()),
        AF_INET6 => {
            let mut b = [0u8; 16];
            for (i, w) in v.ip.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::from(b)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Addresses in the map are the kernel's in-memory (network order) bytes.
fn ip4_words(o: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(o), 0, 0, 0]
}

fn ip6_words(o: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

// === loading helpers ===

/// The kernel's `small_msg` for `sockmap_small_write`: sk_msg counts a message as small
/// below it. The largest setting, 1 MiB, is documented as "every write": a 1 MiB write
/// reaches sk_msg whole (one message of exactly 1 MiB), so it must count too. Measured: with
/// 1048576 passed as is, streams of 1 MiB writes never asked to leave.
fn small_msg(small_write: u32) -> u32 {
    if small_write >= ShortCircuit::MAX_SMALL_WRITE {
        u32::MAX
    } else {
        small_write
    }
}

fn configure(ebpf: &mut Ebpf, plan: &Plan<'_>) -> Result<(), EbpfError> {
    let cfg = plan.config;
    // All zero without offsets (the naive policy): the programs then read nothing.
    let k = plan.kernel_offsets.unwrap_or_default();
    let value = proxy_common::Config {
        proxy_netns: plan.proxy_netns,
        redirect_ip4: cfg
            .redirect_ipv4
            .map(|ip| u32::from_ne_bytes(ip.octets()))
            .unwrap_or(0),
        redirect_port: u32::from(cfg.port),
        redirect_ip6: cfg
            .redirect_ipv6
            .map(|ip| ip6_words(ip.octets()))
            .unwrap_or([0; 4]),
        flags: if cfg.sockmap { FLAG_SOCKMAP } else { 0 }
            | if cfg.log_kernel { FLAG_KERNEL_LOG } else { 0 }
            | if cfg.workloads_only {
                FLAG_WORKLOADS_ONLY
            } else {
                0
            }
            | if cfg.sockmap_blocking_sockets {
                FLAG_SOCKMAP_BLOCKING
            } else {
                0
            },
        queue_limit: cfg.short_circuit.queue_limit,
        small_msg: small_msg(cfg.short_circuit.small_write),
        small_streak: cfg.short_circuit.small_streak,
        off_sk_user_data: k.sock_user_data,
        off_psock_msg_len: k.psock_msg_tot_len,
        off_tcp_write_seq: k.tcp_write_seq,
        off_tcp_copied_seq: k.tcp_copied_seq,
        off_sock_prot: k.sock_prot,
        off_proto_memory_allocated: k.proto_memory_allocated,
        off_proto_sysctl_mem: k.proto_sysctl_mem,
        // The naive policy bounds nothing, so it counts nothing either.
        msg_cost: if cfg.short_circuit.is_naive() {
            0
        } else {
            k.msg_cost()
        },
        sockmap_exclude_ports: {
            // config.rs allows at most SOCKMAP_EXCLUDE_PORTS_MAX.
            let mut ports = [0u16; proxy_common::SOCKMAP_EXCLUDE_PORTS_MAX];
            for (slot, p) in ports.iter_mut().zip(&cfg.sockmap_exclude_ports) {
                *slot = *p;
            }
            ports
        },
        detach_after: cfg.short_circuit.detach_after,
        off_sock_socket: k.sock_socket,
        off_socket_file: k.socket_file,
        off_file_flags: k.file_flags,
        off_socket_sk: k.socket_sk,
        off_sock_protocol: k.sock_protocol,
        off_skc_state: k.skc_state,
        off_skc_num: k.skc_num,
        off_skc_net: k.skc_net,
        off_net_cookie: k.net_cookie,
        off_skc_family: k.skc_family,
        off_skc_dport: k.skc_dport,
        off_skc_rcv_saddr: k.skc_rcv_saddr,
        off_skc_daddr: k.skc_daddr,
        off_skc_v6_rcv_saddr: k.skc_v6_rcv_saddr,
        off_skc_v6_daddr: k.skc_v6_daddr,
    };
    {
        let m = ebpf
            .map_mut(map::CONFIG)
            .ok_or(EbpfError::MissingMap(map::CONFIG))?;
        let mut a: Array<&mut MapData, proxy_common::Config> =
            Array::try_from(m).map_err(map_err(map::CONFIG, "open"))?;
        a.set(0, value, 0).map_err(map_err(map::CONFIG, "write"))?;
    }
    {
        let m = ebpf
            .map_mut(map::EXCLUDED_PORTS)
            .ok_or(EbpfError::MissingMap(map::EXCLUDED_PORTS))?;
        let mut h: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(m).map_err(map_err(map::EXCLUDED_PORTS, "open"))?;
        for p in &cfg.exclude_ports {
            h.insert(u32::from(*p), 1, 0)
                .map_err(map_err(map::EXCLUDED_PORTS, "write"))?;
        }
    }
    for cidr in &cfg.exclude_cidrs {
        insert_cidr(ebpf, cidr)?;
    }
    Ok(())
}

fn insert_cidr(ebpf: &mut Ebpf, cidr: &Cidr) -> Result<(), EbpfError> {
    match cidr.addr {
        IpAddr::V4(ip) => {
            let m = ebpf
                .map_mut(map::EXCLUDED_V4)
                .ok_or(EbpfError::MissingMap(map::EXCLUDED_V4))?;
            let mut t: LpmTrie<&mut MapData, u32, u32> =
                LpmTrie::try_from(m).map_err(map_err(map::EXCLUDED_V4, "open"))?;
            let key = Key::new(u32::from(cidr.prefix), u32::from_ne_bytes(ip.octets()));
            t.insert(&key, 1, 0)
                .map_err(map_err(map::EXCLUDED_V4, "write"))
        }
        IpAddr::V6(ip) => {
            let m = ebpf
                .map_mut(map::EXCLUDED_V6)
                .ok_or(EbpfError::MissingMap(map::EXCLUDED_V6))?;
            let mut t: LpmTrie<&mut MapData, [u32; 4], u32> =
                LpmTrie::try_from(m).map_err(map_err(map::EXCLUDED_V6, "open"))?;
            let key = Key::new(u32::from(cidr.prefix), ip6_words(ip.octets()));
            t.insert(&key, 1, 0)
                .map_err(map_err(map::EXCLUDED_V6, "write"))
        }
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?;
    p.try_into().map_err(prog_err(name, "open"))
}

fn load_cgroup_sock_addr(
    ebpf: &mut Ebpf,
    name: &'static str,
    pins: &PinDir,
) -> Result<(), EbpfError> {
    let p: &mut CgroupSockAddr = program_mut(ebpf, name)?;
    p.load().map_err(prog_err(name, "load"))?;
    let path = pins.prog_path(name);
    p.pin(&path).map_err(|source| EbpfError::Pin {
        path,
        source: Box::new(source),
    })
}

fn load_sock_ops(ebpf: &mut Ebpf, name: &'static str, pins: &PinDir) -> Result<(), EbpfError> {
    let p: &mut SockOps = program_mut(ebpf, name)?;
    p.load().map_err(prog_err(name, "load"))?;
    let path = pins.prog_path(name);
    p.pin(&path).map_err(|source| EbpfError::Pin {
        path,
        source: Box::new(source),
    })
}

/// Loads the start-up listener scan (an iter/task_file program; `proxy-ebpf/src/listeners.rs`),
/// and pins it if `pins` is given. A tracing program needs the running kernel's BTF to load.
fn load_listener_scan(ebpf: &mut Ebpf, pins: Option<&PinDir>) -> Result<(), EbpfError> {
    let name = program::LISTENERS;
    let p = load_iter(ebpf, name, "task_file")?;
    if let Some(pins) = pins {
        let path = pins.prog_path(name);
        p.pin(&path).map_err(|source| EbpfError::Pin {
            path,
            source: Box::new(source),
        })?;
    }
    Ok(())
}

/// Loads iterator program `name` of kind `iter_type` (`bpf_iter_<iter_type>`): a tracing
/// program, which needs the running kernel's BTF to load (the listener scan and the release
/// sweep; `proxy check` loads both).
fn load_iter<'e>(
    ebpf: &'e mut Ebpf,
    name: &'static str,
    iter_type: &str,
) -> Result<&'e mut Iter, EbpfError> {
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| prog_err(name, "read the kernel's BTF for")(e.into()))?;
    let p: &mut Iter = program_mut(ebpf, name)?;
    p.load(iter_type, &btf).map_err(prog_err(name, "load"))?;
    Ok(p)
}

/// Loads the release sweep (an iter/tcp program; `proxy-ebpf/src/sweep.rs`), pins it, and
/// pins its link, which the proxy reads to run it (`sweep::Sweep`). Not fatal: without it a
/// leaving connection's proxy socket that faces a workload that only sends stays in the
/// SOCKHASH until the connection ends, correct but slower, as before the sweep existed.
fn load_release_sweep(ebpf: &mut Ebpf, pins: &PinDir) -> Option<sweep::Sweep> {
    let name = program::RELEASE;
    let mut set_up = || -> Result<PathBuf, String> {
        let p = load_iter(ebpf, name, "tcp").map_err(|e| e.to_string())?;
        p.pin(pins.prog_path(name)).map_err(|e| chain(&e))?;
        let id = p.attach().map_err(|e| chain(&e))?;
        let link =
            FdLink::try_from(p.take_link(id).map_err(|e| chain(&e))?).map_err(|e| chain(&e))?;
        let path = pins.link_path(name);
        // The pin keeps the link (and the program) after this handle goes; the proxy's
        // orderly stop removes it with every other pin.
        link.pin(&path).map_err(|e| chain(&e))?;
        Ok(path)
    };
    match set_up() {
        Ok(path) => Some(sweep::Sweep::new(path)),
        Err(e) => {
            warn!(
                error = %e,
                "could not set up the release sweep (mesh_release): a connection that leaves \
                 the short-circuit while its client only sends keeps the proxy's socket facing \
                 that client in the SOCKHASH until it ends (correct, a little slower); \
                 `proxy check` says what this kernel lacks"
            );
            None
        }
    }
}

/// Runs the listener scan once: records the TCP listeners that called `listen()` before
/// sock_ops was attached, so their blocking servers stay off the short-circuit like those of
/// later listeners. Reading the iterator to its end is what runs the program over every open
/// file on the node. A failure is logged, not fatal: those servers are then registered
/// whatever their mode, as before the scan existed.
fn scan_listeners(ebpf: &mut Ebpf) {
    if in_host_pid_namespace() == Some(false) {
        warn!("{OWN_PID_NAMESPACE}");
    }
    match run_listener_scan(ebpf) {
        Ok(()) => {
            let listeners = ebpf
                .map(map::LISTEN)
                .and_then(|m| HashMap::<_, ListenKey, u64>::try_from(m).ok())
                .map(|m| m.keys().count());
            info!(
                listeners,
                "scanned the node's open files: TCP listeners now known (including those that predate the proxy)"
            );
        }
        Err(e) => warn!(
            error = %e,
            "could not scan for listeners that predate the proxy: servers of those listeners \
             are registered on the short-circuit whether or not they are blocking; restart \
             blocking servers, or keep their ports off with --sockmap-exclude-port"
        ),
    }
}

/// What a proxy in a PID namespace of its own misses, and the fix: said at start-up and by
/// `proxy check`.
pub const OWN_PID_NAMESPACE: &str = "the proxy runs in a PID namespace of its own, and its \
    start-up scan for listeners that predate it walks only the processes of that namespace (a \
    task_file iterator walks its creator's): workloads' listeners older than the proxy go \
    unseen, and their blocking servers may get a spurious EAGAIN on the short-circuit; run the \
    proxy in the host's PID namespace (Kubernetes: hostPID: true, as deploy/ does), or turn the \
    short-circuit off";

/// The initial PID namespace's inode number (`PROC_PID_INIT_INO`, include/linux/proc_ns.h),
/// which `/proc/self/ns/pid` shows in the host's namespace.
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// Whether this process runs in the host's PID namespace; `None` if /proc cannot tell.
pub fn in_host_pid_namespace() -> Option<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = std::fs::metadata("/proc/self/ns/pid").ok()?;
    Some(ns.ino() == INIT_PID_NS_INO)
}

fn run_listener_scan(ebpf: &mut Ebpf) -> Result<(), String> {
    let p: &mut Iter = program_mut(ebpf, program::LISTENERS).map_err(|e| e.to_string())?;
    let id = p.attach().map_err(|e| chain(&e))?;
    let link = p.take_link(id).map_err(|e| chain(&e))?;
    let mut file = link.into_file().map_err(|e| chain(&e))?;
    // The program writes nothing: reading to the end is what makes it visit every file.
    std::io::copy(&mut file, &mut std::io::sink())
        .map(drop)
        .map_err(|e| e.to_string())
}

fn attach_sock_ops(ebpf: &mut Ebpf, name: &'static str, cgroup: &File) -> Result<(), EbpfError> {
    let p: &mut SockOps = program_mut(ebpf, name)?;
    p.attach(cgroup.as_fd(), CgroupAttachMode::Single)
        .map_err(prog_err(name, "attach"))?;
    Ok(())
}

fn open_cgroup(path: &Path) -> Result<File, EbpfError> {
    File::open(path).map_err(|source| EbpfError::Cgroup {
        path: path.to_owned(),
        source,
    })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))
}

/// A hash or LRU hash map taken out of the object, typed.
fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, EbpfError> {
    HashMap::try_from(take_map(ebpf, name)?).map_err(map_err(name, "open"))
}

fn prog_err(
    name: &'static str,
    action: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program {
        name,
        action,
        source: Box::new(source),
        hint: if action == "load" {
            " (the verifier log above says why; run `proxy check`)"
        } else {
            ""
        },
    }
}

fn map_err(
    name: &'static str,
    action: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map {
        name,
        action,
        source: Box::new(source),
    }
}

/// Loads every program into the kernel without attaching anything (for `proxy check`):
/// proves the verifier accepts them on this kernel.
pub fn verify_loadable() -> Result<usize, EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject);
    }
    let mut ebpf = EbpfLoader::new()
        .load(OBJECT)
        .map_err(|e| EbpfError::Load(Box::new(e)))?;
    for name in [program::CONNECT4, program::CONNECT6] {
        let p: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
        p.load().map_err(prog_err(name, "load"))?;
    }
    for name in [program::SOCKOPS_WORKLOAD, program::SOCKOPS_PROXY] {
        let p: &mut SockOps = program_mut(&mut ebpf, name)?;
        p.load().map_err(prog_err(name, "load"))?;
    }
    let p: &mut SkMsg = program_mut(&mut ebpf, program::MSG_REDIRECT)?;
    p.load().map_err(prog_err(program::MSG_REDIRECT, "load"))?;
    load_listener_scan(&mut ebpf, None)?;
    load_iter(&mut ebpf, program::RELEASE, "tcp")?;
    Ok(program::ALL.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_small_write_counts_every_write() {
        assert_eq!(small_msg(16384), 16384);
        assert_eq!(small_msg(0), 0);
        assert_eq!(small_msg(ShortCircuit::MAX_SMALL_WRITE - 1), (1 << 20) - 1);
        assert_eq!(small_msg(ShortCircuit::MAX_SMALL_WRITE), u32::MAX);
    }

    /// The tests run on the host, so /proc/self/ns/pid is the initial namespace's.
    #[test]
    fn the_host_pid_namespace_is_recognised() {
        assert_eq!(in_host_pid_namespace(), Some(true));
    }

    #[test]
    fn orig_key_matches_kernel_layout() {
        let client: SocketAddr = "10.1.2.3:40000".parse().unwrap_or_else(|_| unreachable!());
        let local: SocketAddr = "10.9.9.9:15001".parse().unwrap_or_else(|_| unreachable!());
        let k = orig_key(client, local);
        assert_eq!(
            k,
            Some(OrigKey {
                family: AF_INET,
                client_port: 40000,
                proxy_port: 15001,
                _pad: 0,
                client_ip: [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0],
                proxy_ip: [u32::from_ne_bytes([10, 9, 9, 9]), 0, 0, 0],
            })
        );
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:40000"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let mapped_local: SocketAddr = "[::ffff:10.9.9.9]:15001"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(orig_key(mapped, mapped_local), k);
        assert_eq!(orig_key(client, mapped_local), None);
    }

    #[test]
    fn orig_dst_round_trips() {
        for text in ["192.0.2.7:8080", "[2001:db8::1]:443"] {
            let a: SocketAddr = text.parse().unwrap_or_else(|_| unreachable!());
            let v = match a.ip() {
                IpAddr::V4(ip) => OrigDst {
                    family: AF_INET,
                    port: u32::from(a.port()),
                    ip: ip4_words(ip.octets()),
                    cgroup_id: 0,
                },
                IpAddr::V6(ip) => OrigDst {
                    family: AF_INET6,
                    port: u32::from(a.port()),
                    ip: ip6_words(ip.octets()),
                    cgroup_id: 0,
                },
            };
            assert_eq!(orig_to_socket_addr(&v), Some(a));
        }
        let bad = OrigDst {
            family: 99,
            port: 1,
            ip: [0; 4],
            cgroup_id: 0,
        };
        assert_eq!(orig_to_socket_addr(&bad), None);
        let bad_port = OrigDst {
            family: AF_INET,
            port: 70000,
            ip: [0; 4],
            cgroup_id: 0,
        };
        assert_eq!(orig_to_socket_addr(&bad_port), None);
    }
}
