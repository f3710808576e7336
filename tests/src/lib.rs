//! The pods harness: a "node" is a network namespace running the real proxy binary; a
//! "pod" is a network namespace with a veth to the node, its own IPv4 and IPv6 address,
//! and its own cgroup v2 directory under the node's workload cgroup parent.
//!
//! Everything a node creates is named with its id (`mtest-<pid>-<n>`) and removed when the
//! [`Node`] is dropped, also when a test fails or panics; [`cleanup_leftovers`] removes
//! what an interrupted run left (`cargo xtask clean`).
//!
//! Addresses: every node has a number `k` (0 to 15; [`Node::new`] makes node 0). Pod `i`
//! (from 1) of node `k` gets 10.(77+k).i.2/24 and fd00:(0x77+k):i::2/64, its gateway (the
//! node end of its veth) .1 / ::1, so pods of differently numbered nodes never collide and
//! node `k`'s pods are 10.(77+k).0.0/16 and fd00:(0x77+k)::/32 ([`Node::pod_prefix4`]).
//! The proxy is reached at 10.77.255.1 and fd00:77:ffff::1 on every node's loopback (one
//! namespace each, so these never collide; a local address wins over the route to node 0's
//! pods). Two nodes joined by [`link`] reach each other at 10.99.0.(k+1) and fd00:99::(k+1)
//! ([`Node::link_addr4`]), and each routes to the other's pod prefixes through it.

pub mod kube;

use std::{
    collections::HashMap,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

/// Prefix of everything the harness creates.
pub const PREFIX: &str = "mtest-";

/// The proxy's redirect addresses inside every node.
pub const PROXY_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 255, 1);
pub const PROXY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0xffff, 0, 0, 0, 0, 1);
pub const PROXY_PORT: u16 = 15001;

/// Length of the global header at the start of every pcap file ([`Capture::stop_and_read`]).
pub const PCAP_HEADER_LEN: usize = 24;

/// Node numbers run from 0 to this; each shifts the pod prefixes by one (see the module doc).
pub const MAX_NODE_NUMBER: u8 = 15;

/// Where the cgroup v1 `cpu` controller is mounted (see [`Node::share_cpu_per_pod`]).
pub const CPU_V1_MOUNT: &str = "/sys/fs/cgroup/cpu";

/// First octet / hextet after 10. / fd00: of node 0's pod prefixes.
const POD_NET4: u8 = 77;
const POD_NET6: u16 = 0x77;
/// The network between linked nodes: 10.99.0.0/24 and fd00:99::/64.
const LINK_NET4: [u8; 3] = [10, 99, 0];
const LINK_NET6: [u16; 2] = [0xfd00, 0x99];

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
static NEXT_CAPTURE: AtomicU32 = AtomicU32::new(0);

// === preconditions ===

/// Checks what an end-to-end test needs (root, tools, bpffs). Outside CI a missing piece
/// skips the test with a loud message; under `CI=true` it is a failure, so a CI run can
/// never look green without having run.
pub fn require_privileges() -> Result<bool> {
    let mut missing = Vec::new();
    if !nix_is_root() {
        missing.push("root (run `sudo -E cargo xtask test`)".to_string());
    }
    for tool in ["ip", "nsenter", "bpftool", "iptables"] {
        if which(tool).is_none() {
            missing.push(format!("{tool} (cargo xtask build installs it)"));
        }
    }
    if cgroup2_mount().is_err() {
        missing.push("a cgroup v2 mount".into());
    }
    if !is_bpffs(Path::new("/sys/fs/bpf")) {
        missing.push("bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)".into());
    }
    if missing.is_empty() {
        return Ok(true);
    }
    let msg = format!("end-to-end test needs: {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        bail!("{msg} (CI=true: failing instead of skipping)");
    }
    eprintln!("SKIPPED (not a pass): {msg}");
    Ok(false)
}

fn nix_is_root() -> bool {
    // /proc/self/status "Uid:" line, effective uid is the second field.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn is_bpffs(p: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut parts = l.split(" - ");
            let left = parts.next().unwrap_or("");
            let right = parts.next().unwrap_or("");
            right.starts_with("bpf ") && left.split_whitespace().nth(4) == p.to_str()
        })
    })
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            Some(PathBuf::from(left.split_whitespace().nth(4)?))
        })
        .context("no cgroup2 mount")
}

// === binaries ===

/// Paths of the binaries a node runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub proxy: PathBuf,
    pub meshtest: PathBuf,
}

impl Binaries {
    /// `PROXY_BIN` if set, else `proxy` next to `meshtest` in the target directory.
    /// Refuses a proxy binary older than its sources: testing a stale binary proves nothing.
    pub fn locate(meshtest: &Path) -> Result<Binaries> {
        let proxy = match std::env::var_os("PROXY_BIN") {
            Some(p) => PathBuf::from(p),
            None => meshtest.with_file_name("proxy"),
        };
        if !proxy.is_file() {
            bail!(
                "proxy binary not found at {}; build it with `cargo xtask build` (cargo xtask test does this) or set PROXY_BIN",
                proxy.display()
            );
        }
        // MESH_ANY_PROXY_AGE=1 skips the freshness check, for a developer who tests a
        // binary while editing sources that do not change it (never set in CI).
        if std::env::var_os("MESH_ANY_PROXY_AGE").is_some() {
            return Ok(Binaries {
                proxy,
                meshtest: meshtest.to_owned(),
            });
        }
        let built = fs::metadata(&proxy)?.modified()?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for dir in ["proxy/src", "proxy-common/src", "proxy-ebpf/src"] {
            if let Some(newer) = newest_file(&root.join(dir))
                && newer.1 > built
            {
                bail!(
                    "{} is older than {}; rebuild with `cargo xtask build` (cargo xtask test does this)",
                    proxy.display(),
                    newer.0.display()
                );
            }
        }
        Ok(Binaries {
            proxy,
            meshtest: meshtest.to_owned(),
        })
    }
}

fn newest_file(dir: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut best: Option<(PathBuf, std::time::SystemTime)> = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let cand = if p.is_dir() {
            newest_file(&p)
        } else {
            e.metadata().ok()?.modified().ok().map(|m| (p, m))
        };
        if let Some(c) = cand
            && best.as_ref().is_none_or(|b| c.1 > b.1)
        {
            best = Some(c);
        }
    }
    best
}

// === node ===

/// How to start the proxy on a node.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// "ebpf" or "iptables".
    pub mode: &'static str,
    /// Most end-to-end tests exercise the short-circuit, so the harness turns it on
    /// (the proxy's own default is off).
    pub sockmap: bool,
    /// "open" or "closed".
    pub fail_mode: &'static str,
    pub exclude_ports: Vec<u16>,
    pub ipv6: bool,
    /// More `proxy run` flags.
    pub extra_args: Vec<String>,
    /// Pin the proxy to these CPUs (`taskset -c`), for repeatable latency tails.
    pub cpus: Option<String>,
    /// Use the release build's log level (info) instead of per-connection debug logs.
    pub quiet: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            mode: "ebpf",
            sockmap: true,
            fail_mode: "open",
            exclude_ports: Vec::new(),
            ipv6: true,
            extra_args: Vec::new(),
            cpus: None,
            quiet: false,
        }
    }
}

pub struct Node {
    pub id: String,
    /// Selects this node's pod prefixes and link address (see the module doc).
    pub number: u8,
    pub netns: String,
    pub bins: Binaries,
    /// cgroup v2 directory holding this node's cgroups.
    pub cgroup_root: PathBuf,
    /// Workload cgroup parent (absolute).
    pub workload_cgroup: PathBuf,
    /// Relative (to the cgroup mount) paths passed to the proxy.
    pub workload_cgroup_rel: String,
    pub proxy_cgroup_rel: String,
    pub pin_dir: PathBuf,
    pub pods: Vec<Pod>,
    proxy: Option<Child>,
    pub proxy_log: PathBuf,
    pub scratch: PathBuf,
    if_prefix: String,
    /// This node's end of the veth made by [`link`]; does not match [`Node::pod_interfaces`].
    link_if: String,
    /// Number of the node [`link`] joined this one to.
    link_peer: Option<u8>,
    /// With [`Node::share_cpu_per_pod`]: this node's directory in the cgroup v1 `cpu`
    /// hierarchy, with one child per pod and one for the proxy.
    cpu_root: Option<PathBuf>,
    cleaned: bool,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The node end of this pod's veth: the source address the proxy uses towards it.
    pub gateway4: Ipv4Addr,
    pub gateway6: Ipv6Addr,
    /// With [`Node::share_cpu_per_pod`]: the pod's own cgroup v1 `cpu` group.
    pub cpu_cgroup: Option<PathBuf>,
}

impl Node {
    /// Creates node 0: the node namespace with the proxy's addresses on its loopback.
    pub fn new(bins: &Binaries) -> Result<Node> {
        Node::with_number(bins, 0)
    }

    /// Creates node `number` (0 to [`MAX_NODE_NUMBER`]), whose pods get addresses no other
    /// number's pods get, so it can be [`link`]ed to a node with another number.
    pub fn with_number(bins: &Binaries, number: u8) -> Result<Node> {
        if number > MAX_NODE_NUMBER {
            bail!("node number {number} is out of range: use 0 to {MAX_NODE_NUMBER}");
        }
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}{}-{n}", std::process::id());
        let mount = cgroup2_mount()?;
        let cgroup_root = mount.join(&id);
        let scratch = std::env::temp_dir().join(&id);
        // Interface names are at most 15 characters: "mt" + id (up to 3 digits) + "x" + 4 pid
        // digits + "p" + pod index (up to 3 digits), or + "l" for the link. They only need to
        // be unique inside the node's namespace; the id and pid make them recognisable.
        let if_base = format!("mt{}x{}", n % 1000, std::process::id() % 10_000);
        let node = Node {
            number,
            netns: format!("{id}-node"),
            bins: bins.clone(),
            workload_cgroup: cgroup_root.join("workloads"),
            workload_cgroup_rel: format!("{id}/workloads"),
            proxy_cgroup_rel: format!("{id}/proxy"),
            cgroup_root,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&id),
            pods: Vec::new(),
            proxy: None,
            proxy_log: scratch.join("proxy.log"),
            scratch,
            if_prefix: format!("{if_base}p"),
            link_if: format!("{if_base}l"),
            link_peer: None,
            cpu_root: None,
            id,
            cleaned: false,
        };
        if let Ok(mut live) = LIVE.lock() {
            live.push(node.id.clone());
        }
        fs::create_dir_all(&node.scratch)?;
        fs::create_dir_all(&node.workload_cgroup)
            .with_context(|| format!("creating {}", node.workload_cgroup.display()))?;
        let ns = &node.netns;
        shw(&format!("ip netns add {ns}"))?;
        shw(&format!("ip -n {ns} link set lo up"))?;
        shw(&format!("ip -n {ns} addr add {PROXY_V4}/32 dev lo"))?;
        shw(&format!("ip -n {ns} addr add {PROXY_V6}/128 dev lo"))?;
        // The node routes between its pods (for traffic that is not intercepted); only
        // inside its own namespace, the host's setting is left alone.
        shw(&format!(
            "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1"
        ))?;
        shw(&format!(
            "ip netns exec {ns} sysctl -qw net.ipv6.conf.all.forwarding=1"
        ))?;
        Ok(node)
    }

    /// Adds a pod: namespace, veth to the node, addresses, routes, cgroup.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        let i = self.pods.len() + 1;
        if i > 250 {
            bail!("at most 250 pods per node");
        }
        let i8 = u8::try_from(i)?;
        let netns = format!("{}-{name}", self.id);
        // See with_number for the length limit.
        let host_if = format!("{}{i}", self.if_prefix);
        let (net4, net6) = (self.pod_net4(), self.pod_net6());
        let pod = Pod {
            name: name.to_string(),
            cgroup: self.workload_cgroup.join(name),
            ipv4: Ipv4Addr::new(10, net4, i8, 2),
            ipv6: Ipv6Addr::new(0xfd00, net6, u16::from(i8), 0, 0, 0, 0, 2),
            gateway4: Ipv4Addr::new(10, net4, i8, 1),
            gateway6: Ipv6Addr::new(0xfd00, net6, u16::from(i8), 0, 0, 0, 0, 1),
            cpu_cgroup: self.cpu_root.as_ref().map(|r| r.join(name)),
            netns,
        };
        let (node, ns) = (self.netns.as_str(), pod.netns.as_str());
        shw(&format!("ip netns add {ns}"))?;
        // Registered before anything else can fail, so Drop removes it.
        self.pods.push(pod.clone());
        fs::create_dir_all(&pod.cgroup)?;
        if let Some(cpu) = &pod.cpu_cgroup {
            fs::create_dir_all(cpu).with_context(|| format!("creating {}", cpu.display()))?;
        }
        let (g4, g6, a4, a6) = (pod.gateway4, pod.gateway6, pod.ipv4, pod.ipv6);
        for cmd in [
            format!("ip -n {ns} link set lo up"),
            format!("ip -n {node} link add {host_if} type veth peer name eth0 netns {ns}"),
            format!("ip -n {node} addr add {g4}/24 dev {host_if}"),
            format!("ip -n {node} addr add {g6}/64 dev {host_if} nodad"),
            format!("ip -n {ns} addr add {a4}/24 dev eth0"),
            format!("ip -n {ns} addr add {a6}/64 dev eth0 nodad"),
            format!("ip -n {node} link set {host_if} up"),
            format!("ip -n {ns} link set eth0 up"),
            format!("ip -n {ns} route add default via {g4}"),
            format!("ip -n {ns} -6 route add default via {g6}"),
        ] {
            shw(&cmd)?;
        }
        Ok(pod)
    }

    /// Gives each pod added from now on, and the proxy, a CPU group of its own with equal
    /// weight (the cgroup v1 `cpu` controller: this machine's cgroup v2 hierarchy has none),
    /// as a node's kubelet does: under contention the CPUs are shared per group, not per
    /// thread. Without it a pod of 100 busy threads gets 50 times the CPU of a proxy with 2.
    pub fn share_cpu_per_pod(&mut self) -> Result<()> {
        let v1 = Path::new(CPU_V1_MOUNT);
        if !v1.join("cpu.shares").is_file() {
            bail!(
                "no cgroup v1 cpu controller at {CPU_V1_MOUNT} (cpu.shares missing): mount it (mount -t cgroup -o cpu cgroup {CPU_V1_MOUNT}) or measure without per-pod CPU groups"
            );
        }
        if !self.pods.is_empty() {
            bail!("share_cpu_per_pod must come before the node's first pod");
        }
        let root = v1.join(&self.id);
        let proxy = root.join("proxy");
        fs::create_dir_all(&proxy).with_context(|| format!("creating {}", proxy.display()))?;
        self.cpu_root = Some(root);
        Ok(())
    }

    /// The proxy's CPU group (and the peer proxies' the bench runs), with
    /// [`Node::share_cpu_per_pod`].
    pub fn proxy_cpu_cgroup(&self) -> Option<PathBuf> {
        self.cpu_root.as_ref().map(|r| r.join("proxy"))
    }

    /// Turns on receive packet steering over every CPU for every interface of the node and
    /// its pods, as multi-queue NICs and veths on real nodes spread softirq work. Races that
    /// default loopback placement hides (a receiver's softirq running after the sender
    /// already moved on) show up with it (../shared/notes/sockmap-measured.md).
    pub fn spread_softirq(&self) -> Result<()> {
        let cpus = thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
            .min(32);
        let mask = format!("{:x}", (1u64 << cpus) - 1);
        let script = format!(
            "for f in /sys/class/net/*/queues/rx-*/rps_cpus; do echo {mask} > \"$f\" || exit 1; done"
        );
        // `ip netns exec` mounts the namespace's own /sys, where its interfaces live.
        for ns in std::iter::once(&self.netns).chain(self.pods.iter().map(|p| &p.netns)) {
            sh(&["ip", "netns", "exec", ns, "sh", "-c", &script])?;
        }
        Ok(())
    }

    fn pod_net4(&self) -> u8 {
        POD_NET4 + self.number
    }

    fn pod_net6(&self) -> u16 {
        POD_NET6 + u16::from(self.number)
    }

    /// The IPv4 prefix all pods of this node are in: 10.(77+k).0.0/16.
    pub fn pod_prefix4(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, self.pod_net4(), 0, 0), 16)
    }

    /// The IPv6 prefix all pods of this node are in: fd00:(0x77+k)::/32 (the node number is
    /// in the second hextet, the pod index in the third).
    pub fn pod_prefix6(&self) -> (Ipv6Addr, u8) {
        (Ipv6Addr::new(0xfd00, self.pod_net6(), 0, 0, 0, 0, 0, 0), 32)
    }

    /// This node's address between nodes, on its end of the [`link`]: 10.99.0.(k+1). Use it,
    /// not [`PROXY_V4`] (the same on every node), to reach this node from another one, e.g. as
    /// a tunnel endpoint.
    pub fn link_addr4(&self) -> Ipv4Addr {
        let [a, b, c] = LINK_NET4;
        Ipv4Addr::new(a, b, c, self.number + 1)
    }

    /// This node's IPv6 address between nodes: fd00:99::(k+1).
    pub fn link_addr6(&self) -> Ipv6Addr {
        let [a, b] = LINK_NET6;
        Ipv6Addr::new(a, b, 0, 0, 0, 0, 0, u16::from(self.number) + 1)
    }

    /// Name of this node's end of the [`link`], inside the node namespace.
    pub fn link_ifname(&self) -> &str {
        &self.link_if
    }

    /// Starts `tcpdump` on this node's end of the [`link`], writing every packet to a pcap
    /// file in the node's scratch directory, and waits until it captures. Tests search the
    /// bytes from [`Capture::stop_and_read`] for a marker that must not cross in cleartext.
    pub fn capture_link(&self) -> Result<Capture> {
        let Some(tcpdump) = which("tcpdump") else {
            bail!(
                "tcpdump not found: install the Debian package tcpdump (apt-get install -y tcpdump)"
            );
        };
        if self.link_peer.is_none() {
            bail!(
                "node {} has no link to capture on; call tests::link first",
                self.id
            );
        }
        let n = NEXT_CAPTURE.fetch_add(1, Ordering::Relaxed);
        let pcap = self.scratch.join(format!("link-{n}.pcap"));
        // A cgroup of its own under the node's, so that Node::cleanup and cleanup_leftovers
        // kill tcpdump together with everything else of the node, even after a crash.
        let cgroup = self.cgroup_root.join(format!("capture-{n}"));
        fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        let mut cmd = in_cgroup_and_netns(&cgroup, None, &self.netns, tcpdump);
        cmd.arg("-i")
            .arg(&self.link_if)
            .arg("-w")
            .arg(&pcap)
            // -U: write each packet as it arrives; --immediate-mode: libpcap hands packets
            // over at once instead of when a ring block fills or times out, so nothing sent
            // before stop_and_read is lost. -Z root: keep root rather than switching to the
            // tcpdump user, which may not be allowed to write in the scratch directory.
            .args(["-U", "--immediate-mode", "-Z", "root", "-n"]);
        let mut process =
            Background::spawn(cmd, self.scratch.join(format!("link-{n}.tcpdump.log")))
                .context("starting tcpdump")?;
        // tcpdump prints this once the capture is active.
        process.wait_for("listening on")?;
        Ok(Capture { process, pcap })
    }

    /// Interface name pattern of this node's pod veths (for iptables mode).
    pub fn pod_interfaces(&self) -> String {
        format!("{}+", self.if_prefix)
    }

    /// Starts `proxy run` inside the node namespace without waiting for it.
    pub fn spawn_proxy(&mut self, opts: &ProxyOptions) -> Result<()> {
        if self.proxy.is_some() {
            bail!("proxy already running on {}", self.id);
        }
        let mut args: Vec<String> = vec![
            "run".into(),
            "--mode".into(),
            opts.mode.into(),
            "--port".into(),
            PROXY_PORT.to_string(),
            "--redirect-ipv4".into(),
            PROXY_V4.to_string(),
            "--workload-cgroup".into(),
            self.workload_cgroup_rel.clone(),
            "--proxy-cgroup".into(),
            self.proxy_cgroup_rel.clone(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
            "--fail-mode".into(),
            opts.fail_mode.into(),
            "--sockmap".into(),
            if opts.sockmap { "on" } else { "off" }.into(),
            "--log-level".into(),
            if opts.quiet {
                "info"
            } else {
                "proxy=debug,info"
            }
            .into(),
        ];
        if opts.ipv6 {
            args.extend(["--redirect-ipv6".into(), PROXY_V6.to_string()]);
        }
        if opts.mode == "iptables" {
            args.extend(["--iptables-interface".into(), self.pod_interfaces()]);
        }
        for p in &opts.exclude_ports {
            args.extend(["--exclude-port".into(), p.to_string()]);
        }
        args.extend(opts.extra_args.iter().cloned());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.proxy_log)?;
        let mut cmd = match self.proxy_cpu_cgroup() {
            Some(cpu) => {
                let mut c = Command::new("sh");
                c.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
                    .arg(cpu);
                c
            }
            None => Command::new("env"),
        };
        if let Some(cpus) = &opts.cpus {
            cmd.args(["taskset", "-c", cpus]);
        }
        let child = cmd
            .arg("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(&self.bins.proxy)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the proxy")?;
        self.proxy = Some(child);
        Ok(())
    }

    /// Starts `proxy run` inside the node namespace and waits until it says it is ready.
    pub fn start_proxy(&mut self, opts: &ProxyOptions) -> Result<()> {
        let marks = self.proxy_log_text().matches("proxy ready").count();
        self.spawn_proxy(opts)?;
        self.wait_for_log("proxy ready", marks + 1)
    }

    /// Waits (bounded) until `needle` appears `count` times in the proxy log.
    pub fn wait_for_log(&mut self, needle: &str, count: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.proxy_log_text().matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(child) = self.proxy.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.proxy = None;
                bail!(
                    "proxy exited with {status} before logging {needle:?}; log:\n{}",
                    self.proxy_log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "proxy did not log {needle:?} within 30 s; log:\n{}",
                    self.proxy_log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn proxy_log_text(&self) -> String {
        fs::read_to_string(&self.proxy_log).unwrap_or_default()
    }

    /// One kernel counter of this node's proxy, by name (`proxy counters`).
    pub fn counter(&self, name: &str) -> Result<u64> {
        self.counters()?
            .get(name)
            .copied()
            .with_context(|| format!("no kernel counter {name}"))
    }

    /// [`client_ok`], with this node's proxy warnings in the error.
    pub fn client_ok(&self, out: Output) -> Result<String> {
        client_ok(out).map_err(|e| e.context(format!("proxy warnings:\n{}", self.proxy_warnings())))
    }

    /// The proxy's WARN and ERROR lines (the last 20), for the error of a failed client: a
    /// test that returns an error does not print the whole log (MESH_TEST_LOG=1 does).
    pub fn proxy_warnings(&self) -> String {
        let text = self.proxy_log_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        if tail.is_empty() {
            "(no WARN or ERROR lines in the proxy log)".to_string()
        } else {
            tail.join("\n")
        }
    }

    /// Stops the proxy with `signal` ("TERM" or "KILL") and waits for it.
    pub fn stop_proxy(&mut self, signal: &str) -> Result<ExitStatus> {
        let Some(mut child) = self.proxy.take() else {
            bail!("no proxy running on {}", self.id);
        };
        sh(&["kill", &format!("-{signal}"), &child.id().to_string()])?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("proxy did not exit within 20 s of SIG{signal}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// PID of the running proxy (nsenter execs it, so the child's PID is the proxy's).
    pub fn proxy_pid(&self) -> Option<u32> {
        self.proxy.as_ref().map(Child::id)
    }

    pub fn proxy_running(&mut self) -> bool {
        self.proxy
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The kernel counters, read with `proxy counters --json` from the pin directory.
    pub fn counters(&self) -> Result<HashMap<String, u64>> {
        let out = Command::new(&self.bins.proxy)
            .args(["counters", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "proxy counters failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_counters(&String::from_utf8_lossy(&out.stdout))
    }

    /// A command run in the node namespace, outside the workload cgroups.
    pub fn node_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        c
    }

    /// The proxy's Prometheus text from its admin port, fetched with curl in the node.
    pub fn admin_metrics(&self) -> Result<String> {
        let mut cmd = self.node_command("curl");
        cmd.args(["-s", "--max-time", "10", "http://127.0.0.1:15020/metrics"]);
        let out = run_bounded(cmd, Duration::from_secs(20))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Removes everything this node created. Also run by Drop.
    pub fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        if let Some(mut child) = self.proxy.take() {
            let _ = sh(&["kill", "-TERM", &child.id().to_string()]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_cgroup_tree(&self.cgroup_root);
        if let Some(cpu) = &self.cpu_root {
            // Its processes are gone with the v2 tree above; v1 directories only need rmdir.
            remove_cgroup_tree(cpu);
        }
        for pod in &self.pods {
            let _ = sh(&["ip", "netns", "del", &pod.netns]);
        }
        let _ = sh(&["ip", "netns", "del", &self.netns]);
        // Removing a pinned link detaches it; removing a map pin drops the map once unused.
        let _ = fs::remove_dir_all(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.scratch);
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|id| *id != self.id);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // MESH_TEST_LOG=1 prints the log of every node, also of tests that return an error.
        if thread::panicking() || std::env::var_os("MESH_TEST_LOG").is_some() {
            eprintln!(
                "--- proxy log of {} ---\n{}",
                self.id,
                self.proxy_log_text()
            );
        }
        self.cleanup();
    }
}

// === link between nodes ===

/// Joins two nodes with a veth pair between their namespaces, as a network joins two hosts:
/// node `k` gets [`Node::link_addr4`] / [`Node::link_addr6`] on its end, and each node routes
/// the other's pod prefixes via the other's link address. Nodes forward between their pods
/// and the link (forwarding is on in every node namespace), so a pod reaches a pod of the
/// other node without any proxy.
///
/// The nodes need different numbers ([`Node::with_number`]) and each can have one link.
/// Deleting a node's namespace removes both ends, so Drop of either node cleans up; if a
/// step fails, the pair is removed at once so the nodes are left as they were.
pub fn link(a: &mut Node, b: &mut Node) -> Result<()> {
    if a.number == b.number {
        bail!(
            "cannot link {} and {}: both are node number {}; make one with Node::with_number",
            a.id,
            b.id,
            a.number
        );
    }
    for node in [&*a, &*b] {
        if let Some(peer) = node.link_peer {
            bail!("{} is already linked to node number {peer}", node.id);
        }
    }
    let (na, nb) = (a.netns.as_str(), b.netns.as_str());
    let (ia, ib) = (a.link_if.as_str(), b.link_if.as_str());
    shw(&format!(
        "ip -n {na} link add {ia} type veth peer name {ib} netns {nb}"
    ))?;
    let mut cmds = Vec::new();
    for (ns, ifname, me, other) in [(na, ia, &*a, &*b), (nb, ib, &*b, &*a)] {
        let (p4, l4) = other.pod_prefix4();
        let (p6, l6) = other.pod_prefix6();
        let (via4, via6) = (other.link_addr4(), other.link_addr6());
        cmds.extend([
            format!("ip -n {ns} addr add {}/24 dev {ifname}", me.link_addr4()),
            format!(
                "ip -n {ns} addr add {}/64 dev {ifname} nodad",
                me.link_addr6()
            ),
            format!("ip -n {ns} link set {ifname} up"),
            format!("ip -n {ns} route add {p4}/{l4} via {via4} dev {ifname}"),
            format!("ip -n {ns} -6 route add {p6}/{l6} via {via6} dev {ifname}"),
        ]);
    }
    if let Err(e) = cmds.iter().try_for_each(|c| shw(c)) {
        // Deleting one end deletes the pair, with its addresses and routes.
        let _ = sh(&["ip", "-n", na, "link", "del", ia]);
        return Err(e.context(format!("linking {} and {}", a.id, b.id)));
    }
    a.link_peer = Some(b.number);
    b.link_peer = Some(a.number);
    Ok(())
}

/// A running `tcpdump` from [`Node::capture_link`]; killed on drop.
pub struct Capture {
    process: Background,
    /// The pcap file tcpdump writes.
    pub pcap: PathBuf,
}

impl Capture {
    /// Stops tcpdump with SIGINT, which makes it flush and close the file, waits (bounded)
    /// for it to exit and returns the pcap bytes (the 24-byte file header, then packets).
    pub fn stop_and_read(mut self) -> Result<Vec<u8>> {
        let pid = Pid::from_raw(i32::try_from(self.process.child.id())?);
        signal::kill(pid, Signal::SIGINT).context("sending SIGINT to tcpdump")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.process.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                // Drop of the Background kills it.
                bail!(
                    "tcpdump did not exit within 10 s of SIGINT: {}",
                    self.process.output()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!("tcpdump exited with {status}: {}", self.process.output());
        }
        let bytes =
            fs::read(&self.pcap).with_context(|| format!("reading {}", self.pcap.display()))?;
        if bytes.len() < PCAP_HEADER_LEN {
            bail!(
                "{} is shorter than a pcap header ({} bytes): {}",
                self.pcap.display(),
                bytes.len(),
                self.process.output()
            );
        }
        Ok(bytes)
    }
}

pub fn parse_counters(json: &str) -> Result<HashMap<String, u64>> {
    // Flat object of name -> integer, as printed by `proxy counters --json`.
    let body = json.trim().trim_start_matches('{').trim_end_matches('}');
    let mut out = HashMap::new();
    for part in body.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part.split_once(':').context("malformed counters")?;
        out.insert(k.trim().trim_matches('"').to_string(), v.trim().parse()?);
    }
    Ok(out)
}

// === pod ===

impl Pod {
    /// A command that runs inside this pod: in its cgroup and its network namespace.
    /// The cgroup is joined first because `ip netns exec` remounts /sys and would hide the
    /// cgroup mount; nsenter --net does not remount anything.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_cgroup_and_netns(
            &self.cgroup,
            self.cpu_cgroup.as_deref(),
            &self.netns,
            program,
        )
    }
}

/// A command that joins `cgroup` (and the CPU group `cpu`, if any), then enters the network
/// namespace `netns` (see [`Pod::command`] for the order).
fn in_cgroup_and_netns(
    cgroup: &Path,
    cpu: Option<&Path>,
    netns: &str,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && { [ -z "$2" ] || echo $$ > "$2/cgroup.procs"; } && ns=$1 && shift 2 && exec nsenter --net="/run/netns/$ns" -- "$@""#)
        .arg(cgroup)
        .arg(netns)
        .arg(cpu.map(Path::as_os_str).unwrap_or_default())
        .arg(program);
    c
}

/// A background process (server) that is killed on drop.
pub struct Background {
    child: Child,
    pub stdout: PathBuf,
}

impl Background {
    pub fn spawn(mut cmd: Command, stdout: PathBuf) -> Result<Background> {
        let out = fs::File::create(&stdout)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Background { child, stdout })
    }

    pub fn output(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Waits (bounded) until the output contains `needle`.
    pub fn wait_for(&mut self, needle: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.output().contains(needle) {
            if let Some(s) = self.child.try_wait()? {
                bail!(
                    "process exited ({s}) before printing {needle:?}: {}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                bail!("no {needle:?} within 20 s: {}", self.output());
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion with a bound on its run time, returning its output.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drain both pipes while waiting: a child that writes more than a pipe buffer (64 KiB)
    // would otherwise block on its write and never exit.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (status, false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break (child.wait()?, true);
        }
        thread::sleep(Duration::from_millis(10));
    };
    let join = |h: thread::JoinHandle<Vec<u8>>| h.join().unwrap_or_default();
    let out = Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    };
    if timed_out {
        // At most the head of the output: it can be megabytes.
        let head = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(2000)]).into_owned();
        bail!(
            "command did not finish within {} s; stdout: {} stderr: {}",
            limit.as_secs(),
            head(&out.stdout),
            head(&out.stderr)
        );
    }
    Ok(out)
}

// === cleanup ===

/// Runs a command given as one line of whitespace-separated words (none of ours contain
/// spaces).
fn shw(line: &str) -> Result<()> {
    let words: Vec<&str> = line.split_whitespace().collect();
    sh(&words)
}

fn sh(args: &[&str]) -> Result<()> {
    let Some((program, rest)) = args.split_first() else {
        bail!("empty command");
    };
    let out = Command::new(program)
        .args(rest)
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Kills every process in a cgroup tree and removes its directories, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    // cgroup.kill (Linux 5.14+) kills every process in the subtree at once.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        remove_cgroup_dirs(dir);
        if !dir.exists() || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn remove_cgroup_dirs(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                remove_cgroup_dirs(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes leftovers of interrupted runs: namespaces, cgroups, pins and scratch
/// directories whose names start with [`PREFIX`]. Returns what was removed.
pub fn cleanup_leftovers() -> Result<Vec<String>> {
    cleanup_where(|name| name.starts_with(PREFIX))
}

/// Nodes alive in this process, for [`cleanup_live_nodes`].
static LIVE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Removes what the nodes of this process created, for a signal handler: Ctrl-C ends the
/// process without running destructors. Other runs' resources are left alone.
pub fn cleanup_live_nodes() -> Vec<String> {
    let ids = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    let mut removed = Vec::new();
    for id in ids {
        let prefix = format!("{id}-");
        if let Ok(r) = cleanup_where(|name| name == id || name.starts_with(&prefix)) {
            removed.extend(r);
        }
    }
    removed
}

fn cleanup_where(matches: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    // The v2 trees first: removing them kills their processes, which the v1 `cpu` groups
    // (`Node::share_cpu_per_pod`) share.
    let mounts = [cgroup2_mount().ok(), Some(PathBuf::from(CPU_V1_MOUNT))];
    for mount in mounts.iter().flatten() {
        let Ok(rd) = fs::read_dir(mount) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && matches(&name) {
                remove_cgroup_tree(&e.path());
                removed.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if matches(name) {
            let _ = sh(&["ip", "netns", "del", name]);
            removed.push(format!("netns {name}"));
        }
    }
    for base in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        if let Ok(rd) = fs::read_dir(&base) {
            for e in rd.flatten() {
                if matches(&e.file_name().to_string_lossy()) {
                    let _ = fs::remove_dir_all(e.path());
                    removed.push(format!("{}", e.path().display()));
                }
            }
        }
    }
    Ok(removed)
}

// === mesh issuer ===

/// The mesh's certificate issuer (`proxy identity serve`) running in a node's namespace.
pub struct Issuer {
    /// ADDRESS:PORT the nodes' `[identity] issuer` names.
    pub address: String,
    _process: Background,
}

impl Issuer {
    /// Gives each of `nodes` a bootstrap token (`<scratch>/token`, mode 0600), writes the
    /// issuer's nodes file allowing node `nodeN` its node identity and `workloads` (a SPIFFE
    /// pattern), and starts the issuer of the CA in `ca` on `host`'s link address, port
    /// 15012. `lifetime_secs`: of issued leaves (None: the issuer's default).
    pub fn start(
        host: &Node,
        nodes: &[&Node],
        ca: &Path,
        trust_domain: &str,
        workloads: &str,
        lifetime_secs: Option<u64>,
    ) -> Result<Issuer> {
        let mut nodes_toml = String::new();
        for node in nodes {
            let name = format!("node{}", node.number);
            let token = format!("token-of-{name}-{}", node.id);
            let token_file = node.scratch.join("token");
            fs::write(&token_file, &token)?;
            fs::set_permissions(
                &token_file,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
            let hash = hash_token(&host.bins.proxy, &token)?;
            nodes_toml.push_str(&format!(
                "[[node]]\nname = \"{name}\"\ntoken_sha256 = \"{hash}\"\nidentities = [\"spiffe://{trust_domain}/ns/ebpf-mesh/sa/node-{name}\", \"{workloads}\"]\n\n"
            ));
        }
        let nodes_file = host.scratch.join("nodes.toml");
        fs::write(&nodes_file, nodes_toml)?;
        let address = format!("{}:15012", host.link_addr4());
        let mut cmd = host.node_command(&host.bins.proxy);
        cmd.args(["identity", "serve", "--ca-dir"])
            .arg(ca)
            .args(["--listen", &address, "--nodes"])
            .arg(&nodes_file);
        if let Some(secs) = lifetime_secs {
            cmd.args(["--lifetime-secs", &secs.to_string()]);
        }
        let mut process = Background::spawn(cmd, host.scratch.join("issuer.out"))?;
        process.wait_for("issuer ready")?;
        Ok(Issuer {
            address,
            _process: process,
        })
    }
}

/// `proxy identity hash-token` of `token` (given on standard input, as an operator would).
pub fn hash_token(proxy: &Path, token: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(proxy)
        .args(["identity", "hash-token"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        writeln!(stdin, "{token}")?;
    }
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!(
            "proxy identity hash-token failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The stdout of a meshtest client that exited 0 and printed `"ok":true` in its JSON summary;
/// otherwise an error with its status and both streams.
pub fn client_ok(out: Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !stdout.contains("\"ok\":true") {
        bail!(
            "client failed ({}): {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Sum of the samples of metric `name` (Prometheus text) whose labels contain every one of
/// `labels` (e.g. `service="web"`).
pub fn metric_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with(['{', ' '])
                && labels.iter().all(|x| l.contains(x))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_json_parses() -> Result<()> {
        let c = parse_counters("{\"a\":1,\"msg_redirected_bytes\":12345}\n")?;
        assert_eq!(c.get("a"), Some(&1));
        assert_eq!(c.get("msg_redirected_bytes"), Some(&12345));
        assert!(parse_counters("{\"a\":x}").is_err());
        Ok(())
    }
}
