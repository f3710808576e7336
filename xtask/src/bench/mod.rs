//! `cargo xtask bench`: every scenario side by side in one run, on the same pods and the
//! same load generators, reported as medians with min/max and ratios against direct.
//!
//! Scenarios: direct (no proxy), the proxy with eBPF interception (short-circuit off; the
//! per-hop short-circuit with the adaptive policy; the kernel-only path; the naive per-hop
//! short-circuit), HAProxy and nginx in the node namespace, and last the proxy with iptables
//! interception (any nat rule turns conntrack on for the namespace and would slow every
//! later scenario, see ../shared/notes/bench-peers.md).
//!
//! The bench reports; it never asserts targets. `--quick` runs everything once with tiny
//! counts, as a smoke test that every scenario produces numbers.

mod peers;
mod report;

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tests::{Binaries, Node, Pod, ProxyOptions, require_privileges, run_bounded};

use crate::{build, sh};
use peers::{HTTP1, HTTP2, Managed, TCP_PINNED, TCP_UNPINNED};

/// CPU that latency runs pin client, server and proxy to (bench-peers.md: pinning makes
/// tails repeatable on this 2-vCPU VM).
const PIN_CPU: &str = "0";
const HAPROXY_BASE: u16 = 10000;
/// Ping-pong sizes of the pinned latency runs, in every scenario (direct included): 1 B for
/// the headline, the rest for the short-circuit table (plain TCP vs naive vs adaptive vs the
/// kernel-only path at each size) and all of them for the kernel-only path vs direct TCP
/// (`report::short_circuit`).
const PINNED_PINGPONG_SIZES: &[u64] = &[1, 64, 1024, 16384, 65536, 1 << 20];
/// CPU the client of the "split" latency runs is pinned to, while the server and the proxy
/// (or peer) stay on [`PIN_CPU`]: the pinned setup with the client moved. Unpinned, the
/// scheduler places each scenario's processes its own way (measured: TCP through the proxy
/// at 28 µs with all three on one CPU, 37 µs with two wake-ups crossing CPUs and 45 µs with
/// all four, the per-hop short-circuit at 24, 31 and 37 µs), and the scenarios settled in
/// different placements often enough that the unpinned row compared placements, not paths.
/// Split is one fixed placement where every path pays a cross-CPU wake-up, as a client and a
/// server of two pods on a real node do: the client's request crosses, and so does the reply.
const SPLIT_CLIENT_CPU: &str = "1";
/// Ping-pong sizes of the split latency runs.
const SPLIT_PINGPONG_SIZES: &[u64] = &[1, 1024];
/// Where a stream run connects, and the CPUs its client runs on (`None`: unpinned).
#[derive(Clone, Copy)]
struct Placed<'a> {
    target: &'a str,
    client_cpus: Option<&'a str>,
}

impl<'a> Placed<'a> {
    fn unpinned(target: &'a str) -> Placed<'a> {
        Placed {
            target,
            client_cpus: None,
        }
    }

    /// The client on SPLIT_CLIENT_CPU; `target` must be the server pinned to PIN_CPU, and
    /// the proxy (or peer) pinned there too.
    fn split(target: &'a str) -> Placed<'a> {
        Placed {
            target,
            client_cpus: Some(SPLIT_CLIENT_CPU),
        }
    }
}

const NGINX_BASE: u16 = 20000;

#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    pub reps: usize,
    /// The congestion control to set in every namespace the bench creates; `None`: inherited.
    pub tcp_congestion: Option<String>,
    /// Only the interleaved streams (`Bench::interleaved_streams`).
    pub streams_only: bool,
    /// Extra arguments for the proxies of the short-circuit scenarios.
    pub sockmap_args: Vec<String>,
    /// Only the scenarios of these names; empty: all.
    pub scenarios: Vec<String>,
    /// A CPU group per pod and one for the proxies (`Node::share_cpu_per_pod`).
    pub cpu_per_pod: bool,
    /// Only these stream write sizes (bytes); empty: all of `STREAM_SIZES`.
    pub stream_sizes: Vec<u64>,
    /// Only these stream connection counts; empty: all of `STREAM_CONNS`.
    pub stream_connections: Vec<u64>,
    /// Seconds per stream run instead of the profile's.
    pub stream_seconds: Option<f64>,
}

/// How big each workload is.
struct Sizes {
    rounds: u64,
    warmup: u64,
    stream_seconds: f64,
    stream_sizes: Vec<u64>,
    stream_conns: Vec<u64>,
    connrate_count: u64,
    http_seconds: u64,
    h2_requests: u64,
    hold_conns: u64,
}

/// The stream sizes and connection counts measured unless `--stream-size` or
/// `--stream-connections` narrow them.
const STREAM_SIZES: [u64; 5] = [64, 1024, 16384, 65536, 1 << 20];
const STREAM_CONNS: [u64; 3] = [1, 10, 100];

fn quick() -> Sizes {
    Sizes {
        rounds: 300,
        warmup: 50,
        stream_seconds: 0.2,
        stream_sizes: STREAM_SIZES.to_vec(),
        stream_conns: STREAM_CONNS.to_vec(),
        connrate_count: 200,
        http_seconds: 1,
        h2_requests: 2000,
        hold_conns: 200,
    }
}

fn full() -> Sizes {
    Sizes {
        rounds: 20000,
        warmup: 1000,
        stream_seconds: 2.0,
        stream_sizes: STREAM_SIZES.to_vec(),
        stream_conns: STREAM_CONNS.to_vec(),
        connrate_count: 5000,
        http_seconds: 5,
        h2_requests: 50000,
        hold_conns: 1000,
    }
}

/// `--streams-only` says when a stream run's slowest connection took longer than this to
/// drain after writing ended: one such connection stretches the run's time and cuts its
/// figure. Measured here, 100 connections of 16 KiB to 1 MiB writes drain in 150 to 350 ms
/// through the proxy (deep TCP buffers) with or without the short-circuit; the stall fixed
/// in be36094 held a connection for the client's 30 s timeout.
const DRAIN_SHOWN_MS: f64 = 1000.0;

/// One figure of one repetition.
#[derive(Clone, Debug)]
pub struct Sample {
    pub scenario: String,
    pub workload: String,
    pub metric: String,
    pub unit: &'static str,
    pub value: f64,
}

/// RSS samples (KiB) of the proxy under test over the run, for the plot.
#[derive(Clone, Debug, Default)]
pub struct RssTrace {
    pub scenario: String,
    pub points: Vec<(f64, f64)>,
}

/// A scenario's stream figures, measured before its turn (`Bench::interleaved_streams`).
pub struct Streams {
    samples: Vec<Sample>,
    /// Connection directions that switched to the kernel-only path meanwhile (`None`: the
    /// counters could not be read, or the scenario has none).
    switches: Option<u64>,
}

/// What a scenario's stream runs moved, and the CPU its proxy (or peer) spent on them.
#[derive(Default)]
struct StreamTotals {
    bytes: f64,
    cpu_seconds: f64,
    /// meshbench's mean wait at the start gate of each run since the last `say_decisions`,
    /// with the run's connection count.
    gate_waits_ms: Vec<(f64, f64)>,
}

impl StreamTotals {
    /// CPU seconds per GiB streamed, if something was under test and bytes moved.
    fn sample_if(&self, scenario: &str, measured: bool) -> Option<Sample> {
        (measured && self.bytes > 0.0).then(|| Sample {
            scenario: scenario.to_string(),
            workload: "stream (all)".into(),
            metric: "cpu_s_per_gib".into(),
            unit: "s/GiB",
            value: self.cpu_seconds / (self.bytes / f64::from(1u32 << 30)),
        })
    }

    fn sample(&self, scenario: &str, under: &UnderTest<'_>) -> Option<Sample> {
        self.sample_if(scenario, !matches!(under, UnderTest::Nothing))
    }
}

/// Runs the bench; returns the directory the results were written to.
pub fn run(opts: Options) -> Result<std::path::PathBuf> {
    let chosen = chosen_scenarios(&opts.scenarios)?;
    if !sh::is_root()? {
        bail!(
            "the bench creates network namespaces and cgroups and loads eBPF programs: run it as root (sudo -E env PATH=\"$PATH\" cargo xtask bench)"
        );
    }
    // --quick is a smoke test of the bench itself: the debug build is enough and saves a
    // release build in CI. Full runs measure the release build.
    let out = build::ensure_built(!opts.quick)?;
    build::ensure_packages(&[
        "haproxy",
        "nginx",
        "libnginx-mod-stream",
        "wrk",
        "nghttp2-client",
        "util-linux",
        "iproute2",
    ])?;
    if !require_privileges()? {
        bail!("this machine lacks what the bench needs (see above)");
    }
    // The latency placements pin to CPU 0 (PIN_CPU) and CPU 1 (SPLIT_CLIENT_CPU).
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        bail!(
            "the bench pins its latency runs to CPU {PIN_CPU} and CPU {SPLIT_CLIENT_CPU}, but this process may run on {cpus} CPU(s): run it on a machine (or with an affinity) that has at least 2 CPUs"
        );
    }
    sh::cleanup_on_interrupt()?;
    let bins = Binaries {
        proxy: out.profile_dir.join("proxy"),
        meshtest: out.profile_dir.join("meshtest"),
    };
    let meshbench = out.profile_dir.join("meshbench");
    let stamp = report::timestamp(SystemTime::now());
    let dir = out.target_dir.join("bench").join(&stamp);
    let mut sizes = if opts.quick { quick() } else { full() };
    if !opts.stream_sizes.is_empty() {
        sizes.stream_sizes = opts.stream_sizes.clone();
    }
    if !opts.stream_connections.is_empty() {
        sizes.stream_conns = opts.stream_connections.clone();
    }
    if let Some(seconds) = opts.stream_seconds {
        if !(seconds.is_finite() && seconds > 0.0) {
            bail!("--stream-seconds {seconds}: give a positive number of seconds, e.g. 2 or 0.5");
        }
        sizes.stream_seconds = seconds;
    }
    let sizes = &sizes;
    let reps = if opts.quick { 1 } else { opts.reps.max(1) };

    let mut bench = Bench::new(
        &bins,
        &meshbench,
        sizes,
        reps,
        opts.tcp_congestion.as_deref(),
        opts.cpu_per_pod,
    )?;
    bench.sockmap_args = opts.sockmap_args.clone();
    bench.streams_only = opts.streams_only;
    let congestion = bench.congestion_control()?;
    say(&format!(
        "TCP congestion control in the bench's namespaces: {congestion}"
    ));
    let cpu_sharing = if opts.cpu_per_pod {
        "per pod (a cgroup v1 cpu group each, and one for the proxies)"
    } else {
        "per thread (no CPU groups)"
    };
    say(&format!("CPU sharing under contention: {cpu_sharing}"));
    let mut samples = Vec::new();
    let mut traces = Vec::new();
    // First, while no iptables rule has turned conntrack on in the namespaces.
    let compared: Vec<Scenario> = chosen.iter().copied().filter(|s| s.interleaved).collect();
    let mut streams = bench
        .interleaved_streams(&compared)
        .context("interleaved streams")?;
    if opts.streams_only {
        let samples: Vec<Sample> = compared
            .iter()
            .filter_map(|sc| streams.remove(sc.name))
            .flat_map(|s| s.samples)
            .collect();
        println!("{}", report::table(&samples));
        println!("{}", report::streams_vs_plain(&samples));
        return Ok(out.target_dir.join("bench"));
    }
    for scenario in chosen {
        say(&format!("scenario {}: {}", scenario.name, scenario.about));
        let (s, t) = bench
            .scenario(&scenario, streams.remove(scenario.name))
            .with_context(|| format!("scenario {}", scenario.name))?;
        samples.extend(s);
        traces.push(t);
    }
    let machine = report::machine_info(&bins.proxy, &congestion, cpu_sharing);
    fs::create_dir_all(&dir)?;
    report::write_all(
        &dir,
        &report::Run {
            stamp: &stamp,
            samples: &samples,
            traces: &traces,
            machine: &machine,
            quick: opts.quick,
            reps,
        },
    )?;
    println!("{}", report::table(&samples));
    println!("{}", report::short_circuit(&samples));
    println!("{}", report::streams_vs_plain(&samples));
    say(&format!("results in {}", dir.display()));
    Ok(dir)
}

/// Checks a results directory: the files parse, every scenario has a finite median for
/// every headline figure, and no workload failed outright.
pub fn validate(dir: &Path) -> Result<()> {
    let text = fs::read_to_string(dir.join("results.json")).context("results.json")?;
    let doc: Value = serde_json::from_str(&text).context("results.json does not parse")?;
    let results = doc["results"]
        .as_array()
        .context("results.json has no results array")?;
    let headline = [
        ("pingpong 1B pinned", "p50_us"),
        ("pingpong 1024B unpinned", "p99_us"),
        ("stream 64KiB x1", "gbit_per_s"),
        ("connrate x4", "conn_per_s"),
        ("http1 wrk c10", "req_per_s"),
        ("http2 h2load c10 m10", "req_per_s"),
    ];
    for sc in SCENARIOS {
        for (w, m) in headline {
            let found = results
                .iter()
                .find(|r| r["scenario"] == sc.name && r["workload"] == w && r["metric"] == m);
            let med = found.and_then(|r| r["median"].as_f64());
            if !med.is_some_and(|v| v.is_finite() && v > 0.0) {
                bail!(
                    "scenario {} has no figure for {w} {m} in {}",
                    sc.name,
                    dir.display()
                );
            }
        }
        // The per-hop and kernel-only scenarios differ only by --kernel-path: the kernel's
        // own count of directions that switched to the kernel-only path is what shows each
        // measured the path its name says (the proxy turns the path on by default, which is
        // how the per-hop scenarios once measured it without saying so).
        let Kind::Proxy {
            sockmap: true,
            kernel_path,
            ..
        } = sc.kind
        else {
            continue;
        };
        let switches = results
            .iter()
            .find(|r| {
                r["scenario"] == sc.name
                    && r["workload"] == report::KERNEL_PATH_WORKLOAD
                    && r["metric"] == report::KERNEL_PATH_SWITCHES
            })
            .and_then(|r| r["median"].as_f64());
        match switches {
            None => bail!(
                "scenario {} has no count of kernel-only path switches in {}: the bench could not read the proxy's kernel counters (proxy counters --pin-dir)",
                sc.name,
                dir.display()
            ),
            Some(n) if kernel_path && n <= 0.0 => bail!(
                "the kernel-only path never engaged in scenario {} (no connection direction switched to it in {}): its figures are those of the per-hop short-circuit",
                sc.name,
                dir.display()
            ),
            Some(n) if !kernel_path && n > 0.0 => bail!(
                "scenario {} runs with --kernel-path off but {n} connection directions took the kernel-only path ({}): its figures are not per-hop only",
                sc.name,
                dir.display()
            ),
            Some(_) => {}
        }
    }
    let summary = fs::read_to_string(dir.join("summary.md")).context("summary.md")?;
    if !summary.contains("short-circuit:")
        || !summary.contains(report::KERNEL_VS_DIRECT_TITLE)
        || summary.contains("(some sizes are missing")
    {
        bail!(
            "the short-circuit tables in {} are incomplete",
            dir.display()
        );
    }
    let csv = fs::read_to_string(dir.join("results.csv")).context("results.csv")?;
    let mut lines = csv.lines();
    let header = lines.next().unwrap_or("");
    let columns = header.split(',').count();
    if columns != 9 || lines.clone().count() != results.len() {
        bail!("results.csv has {columns} columns / a different row count than results.json");
    }
    if let Some(bad) = lines.find(|l| l.split(',').count() != columns) {
        bail!("malformed results.csv row: {bad}");
    }
    for f in ["latency.svg", "throughput.svg", "rss.svg", "summary.md"] {
        let body = fs::read_to_string(dir.join(f)).with_context(|| f.to_string())?;
        if body.len() < 200 || (f.ends_with(".svg") && !body.contains("<svg")) {
            bail!("{f} in {} looks empty", dir.display());
        }
    }
    say(&format!("results in {} are complete", dir.display()));
    Ok(())
}

/// The scenarios named by `--scenario` (all if none), in the bench's order.
fn chosen_scenarios(names: &[String]) -> Result<Vec<Scenario>> {
    if let Some(bad) = names
        .iter()
        .find(|n| !SCENARIOS.iter().any(|s| s.name == n.as_str()))
    {
        bail!(
            "--scenario {bad}: no such scenario; pick from {}",
            SCENARIOS.map(|s| s.name).join(", ")
        );
    }
    Ok(SCENARIOS
        .into_iter()
        .filter(|s| names.is_empty() || names.iter().any(|n| n == s.name))
        .collect())
}

fn say(what: &str) {
    println!("xtask: bench: {what}");
}

// === scenarios ===

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    about: &'static str,
    kind: Kind,
    /// Its streams run in the interleaved block (`Bench::interleaved_streams`) instead of
    /// in its own turn: the scenarios the short-circuit table compares.
    interleaved: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    /// `naive`: the short-circuit with every message redirected and nothing bounded
    /// (`--sockmap-policy naive`), the baseline the adaptive policy is measured against.
    /// `kernel_path`: with `sockmap`, authorized same-node opaque TCP goes workload to
    /// workload in the kernel (`--kernel-path on`) instead of hop by hop through the proxy.
    Proxy {
        mode: &'static str,
        sockmap: bool,
        naive: bool,
        kernel_path: bool,
    },
    Haproxy,
    Nginx,
}

const SCENARIOS: [Scenario; 8] = [
    Scenario {
        name: "direct",
        about: "client pod to server pod, no proxy",
        kind: Kind::Direct,
        interleaved: true,
    },
    Scenario {
        name: "ebpf",
        about: "the proxy, eBPF interception, short-circuit off",
        kind: Kind::Proxy {
            mode: "ebpf",
            sockmap: false,
            naive: false,
            kernel_path: false,
        },
        interleaved: true,
    },
    Scenario {
        name: "ebpf+sockmap",
        about: "the proxy, eBPF interception, per-hop sk_msg short-circuit on (adaptive policy), kernel-only path off",
        kind: Kind::Proxy {
            mode: "ebpf",
            sockmap: true,
            naive: false,
            kernel_path: false,
        },
        interleaved: true,
    },
    Scenario {
        name: "ebpf+kernel",
        about: "the proxy, eBPF interception, short-circuit on with the kernel-only path (authorized same-node TCP goes workload to workload in the kernel)",
        kind: Kind::Proxy {
            mode: "ebpf",
            sockmap: true,
            naive: false,
            kernel_path: true,
        },
        interleaved: true,
    },
    Scenario {
        name: "ebpf+naive",
        about: "the proxy, eBPF interception, naive per-hop short-circuit (every message redirected, unbounded), kernel-only path off",
        kind: Kind::Proxy {
            mode: "ebpf",
            sockmap: true,
            naive: true,
            kernel_path: false,
        },
        interleaved: true,
    },
    Scenario {
        name: "haproxy",
        about: "HAProxy in the node (TCP and HTTP modes), addressed explicitly",
        kind: Kind::Haproxy,
        interleaved: false,
    },
    Scenario {
        name: "nginx",
        about: "nginx in the node (stream and HTTP proxy), addressed explicitly",
        kind: Kind::Nginx,
        interleaved: false,
    },
    // Last: iptables nat rules turn conntrack on for the whole namespace.
    Scenario {
        name: "iptables",
        about: "the proxy, iptables REDIRECT interception",
        kind: Kind::Proxy {
            mode: "iptables",
            sockmap: false,
            naive: false,
            kernel_path: false,
        },
        interleaved: false,
    },
];

/// Where a scenario's client connects.
struct Targets {
    tcp_pinned: String,
    tcp_unpinned: String,
    http1: String,
    http2: String,
}

/// What is measured for resources: the proxy's (or peer's) processes.
enum UnderTest<'a> {
    Nothing,
    Proxy(&'a Node),
    Peer(&'a Managed),
}

impl UnderTest<'_> {
    fn pids(&self) -> Vec<u32> {
        match self {
            UnderTest::Nothing => Vec::new(),
            UnderTest::Proxy(n) => n.proxy_pid().into_iter().collect(),
            UnderTest::Peer(m) => m.pids(),
        }
    }

    /// CPU seconds used so far by the processes (utime + stime of each, threads included).
    fn cpu_seconds(&self) -> f64 {
        self.pids().iter().map(|p| proc_cpu_seconds(*p)).sum()
    }

    fn rss_kib(&self) -> f64 {
        self.pids().iter().map(|p| proc_rss_kib(*p)).sum()
    }
}

struct Bench<'a> {
    node: Node,
    client: Pod,
    server: Pod,
    meshbench: &'a Path,
    sizes: &'a Sizes,
    reps: usize,
    /// Extra arguments for the proxies of the short-circuit scenarios (`--sockmap-arg`).
    sockmap_args: Vec<String>,
    /// `--streams-only`: also says what the short-circuit decided in each run.
    streams_only: bool,
    /// The host's allowed congestion controls, put back when the bench ends.
    _allowed: Option<AllowedCongestion>,
    _servers: Vec<tests::Background>,
    _origin: Managed,
}

/// Sets `net.ipv4.tcp_congestion_control` to `cc` in each of `namespaces`, loading its module
/// if the kernel has it but has not loaded it yet.
///
/// A namespace other than the host's may only pick one the host allows
/// (`net.ipv4.tcp_allowed_congestion_control`, else EPERM): if `cc` is not allowed yet, it is
/// added for the bench and the host's list restored when the returned guard drops.
fn set_congestion_control(namespaces: &[&str], cc: &str) -> Result<Option<AllowedCongestion>> {
    let available = || {
        fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    if !available().split_whitespace().any(|a| a == cc) {
        // Best effort: the check below says what is wrong if this did not help.
        let _ = std::process::Command::new("modprobe")
            .arg(format!("tcp_{cc}"))
            .output();
    }
    let now = available();
    if !now.split_whitespace().any(|a| a == cc) {
        bail!(
            "--tcp-congestion {cc}: this kernel has no such congestion control (available: {now}); pick one of those, or load its module (modprobe tcp_{cc})"
        );
    }
    let allowed = fs::read_to_string(ALLOWED_CONGESTION)
        .with_context(|| format!("reading {ALLOWED_CONGESTION}"))?
        .trim()
        .to_string();
    let guard = if allowed.split_whitespace().any(|a| a == cc) {
        None
    } else {
        fs::write(ALLOWED_CONGESTION, format!("{allowed} {cc}")).with_context(|| {
            format!("allowing {cc} in network namespaces: writing {ALLOWED_CONGESTION} (it holds {allowed:?})")
        })?;
        say(&format!(
            "allowed {cc} for the bench's namespaces (net.ipv4.tcp_allowed_congestion_control was {allowed:?}; restored at the end)"
        ));
        Some(AllowedCongestion { before: allowed })
    };
    for ns in namespaces {
        sh::run(sysctl_in(ns).args(["-qw", &format!("net.ipv4.tcp_congestion_control={cc}")]))
            .with_context(|| format!("setting the congestion control in namespace {ns}"))?;
    }
    Ok(guard)
}

const ALLOWED_CONGESTION: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

/// Puts the host's list of congestion controls that namespaces may pick back as it was.
struct AllowedCongestion {
    before: String,
}

impl Drop for AllowedCongestion {
    fn drop(&mut self) {
        if let Err(e) = fs::write(ALLOWED_CONGESTION, &self.before) {
            say(&format!(
                "could not restore {ALLOWED_CONGESTION} to {:?}: {e}",
                self.before
            ));
        }
    }
}

/// `sysctl` run in network namespace `ns` (namespaced settings such as the congestion
/// control), without joining any cgroup.
fn sysctl_in(ns: &str) -> std::process::Command {
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", ns, "sysctl"]);
    c
}

impl<'a> Bench<'a> {
    /// The congestion control the bench's TCP sockets use: its namespaces' setting, which
    /// must be the same in all of them.
    fn congestion_control(&self) -> Result<String> {
        let mut seen = Vec::new();
        for ns in [&self.node.netns, &self.client.netns, &self.server.netns] {
            let out = sysctl_in(ns)
                .args(["-n", "net.ipv4.tcp_congestion_control"])
                .output()
                .with_context(|| format!("reading the congestion control of namespace {ns}"))?;
            seen.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        seen.dedup();
        match seen.as_slice() {
            [one] if !one.is_empty() => Ok(one.clone()),
            _ => bail!(
                "the bench's namespaces disagree on (or could not report) their TCP congestion control: {seen:?}; pass --tcp-congestion NAME to set it in all of them"
            ),
        }
    }

    fn new(
        bins: &Binaries,
        meshbench: &'a Path,
        sizes: &'a Sizes,
        reps: usize,
        congestion: Option<&str>,
        cpu_per_pod: bool,
    ) -> Result<Bench<'a>> {
        let mut node = Node::new(bins)?;
        if cpu_per_pod {
            node.share_cpu_per_pod()?;
        }
        let client = node.add_pod("client")?;
        let server = node.add_pod("server")?;
        // Before any socket exists: a socket takes its namespace's setting when it is made
        // (an accepted one when the connection arrives).
        let mut allowed = None;
        if let Some(cc) = congestion {
            allowed = set_congestion_control(&[&node.netns, &client.netns, &server.netns], cc)?;
        }
        let mut servers = Vec::new();
        for (port, cpus) in [(TCP_PINNED, Some(PIN_CPU)), (TCP_UNPINNED, None)] {
            let mut cmd = match cpus {
                Some(c) => {
                    let mut cmd = server.command("taskset");
                    cmd.args(["-c", c]).arg(meshbench);
                    cmd
                }
                None => server.command(meshbench),
            };
            cmd.args(["serve", "--listen", &format!("[::]:{port}")]);
            let mut bg =
                tests::Background::spawn(cmd, node.scratch.join(format!("meshbench-{port}.out")))?;
            bg.wait_for("listening")?;
            servers.push(bg);
        }
        let conf = node.scratch.join("origin.conf");
        fs::write(&conf, peers::nginx_origin_config(&node.scratch))?;
        let log = node.scratch.join("origin.log");
        let mut origin = Managed::start(
            "nginx origin",
            &node.cgroup_root.join("origin"),
            server.cpu_cgroup.as_deref(),
            &server.netns,
            None,
            &[
                "nginx".into(),
                "-c".into(),
                conf.display().to_string(),
                "-p".into(),
                node.scratch.display().to_string(),
            ],
            &log,
        )?;
        peers::wait_listening(&server.netns, HTTP1)?;
        origin.check_alive(&log)?;
        Ok(Bench {
            node,
            client,
            server,
            meshbench,
            sizes,
            reps,
            sockmap_args: Vec::new(),
            streams_only: false,
            _allowed: allowed,
            _servers: servers,
            _origin: origin,
        })
    }

    fn targets(&self, kind: Kind) -> Targets {
        let (host, base) = match kind {
            Kind::Direct | Kind::Proxy { .. } => (self.server.ipv4.to_string(), 0),
            Kind::Haproxy => (tests::PROXY_V4.to_string(), HAPROXY_BASE),
            Kind::Nginx => (tests::PROXY_V4.to_string(), NGINX_BASE),
        };
        Targets {
            tcp_pinned: format!("{host}:{}", base + TCP_PINNED),
            tcp_unpinned: format!("{host}:{}", base + TCP_UNPINNED),
            http1: format!("http://{host}:{}/", base + HTTP1),
            http2: format!("http://{host}:{}/", base + HTTP2),
        }
    }

    /// Runs a scenario twice: once with the proxy (or peer) pinned to the CPU the client
    /// and server of the latency runs are pinned to, for repeatable tails; once unpinned
    /// for everything else. `streams`: its stream figures, measured already (interleaved
    /// with the other scenarios'); `None`: measured now.
    fn scenario(
        &mut self,
        sc: &Scenario,
        streams: Option<Streams>,
    ) -> Result<(Vec<Sample>, RssTrace)> {
        let targets = self.targets(sc.kind);
        let peer = self.setup(sc, Some(PIN_CPU))?;
        let before = self.kernel_path_switches(sc);
        let pinned = self
            .latency(
                sc.name,
                &targets.tcp_pinned,
                "pinned",
                Some(PIN_CPU),
                PINNED_PINGPONG_SIZES,
            )
            .and_then(|mut v| {
                v.extend(self.latency(
                    sc.name,
                    &targets.tcp_pinned,
                    "split",
                    Some(SPLIT_CLIENT_CPU),
                    SPLIT_PINGPONG_SIZES,
                )?);
                Ok(v)
            });
        let pinned_switches = since(before, self.kernel_path_switches(sc));
        self.teardown(sc, peer)?;
        let mut samples = pinned?;
        let peer = self.setup(sc, None)?;
        let before = self.kernel_path_switches(sc);
        let rest = {
            let under = self.under_test(peer.as_ref(), sc.kind);
            self.measure(sc.name, &targets, &under, streams.as_ref())
        };
        let switches = since(before, self.kernel_path_switches(sc))
            .zip(pinned_switches)
            .zip(streams.as_ref().map_or(Some(0), |s| s.switches))
            .map(|((a, b), c)| a + b + c);
        self.teardown(sc, peer)?;
        let (rest, trace) = rest?;
        samples.extend(rest);
        if let Some(n) = switches {
            say(&format!(
                "{}: {n} connection directions switched to the kernel-only path",
                sc.name
            ));
            samples.push(Sample {
                scenario: sc.name.to_string(),
                workload: report::KERNEL_PATH_WORKLOAD.to_string(),
                metric: report::KERNEL_PATH_SWITCHES.to_string(),
                unit: "count",
                value: n as f64,
            });
        }
        Ok((samples, trace))
    }

    /// The kernel's count of connection directions that switched to the kernel-only path,
    /// for a proxy scenario with the short-circuit on (None otherwise, or if the counters
    /// cannot be read: `bench::validate` then reports the figure missing).
    fn kernel_path_switches(&self, sc: &Scenario) -> Option<u64> {
        // Checked at compile time: the name `proxy counters --json` prints for the counter.
        const SPLICE_STARTED: &str =
            proxy_common::counter::NAMES[proxy_common::counter::SPLICE_STARTED as usize];
        if !matches!(sc.kind, Kind::Proxy { sockmap: true, .. }) {
            return None;
        }
        match self.node.counters() {
            Ok(c) => {
                let n = c.get(SPLICE_STARTED).copied();
                if n.is_none() {
                    say(&format!(
                        "{}: proxy counters has no {SPLICE_STARTED}",
                        sc.name
                    ));
                }
                n
            }
            Err(e) => {
                say(&format!(
                    "{}: cannot read the kernel counters: {e:#}",
                    sc.name
                ));
                None
            }
        }
    }

    fn setup(&mut self, sc: &Scenario, cpus: Option<&str>) -> Result<Option<Managed>> {
        match sc.kind {
            Kind::Direct => Ok(None),
            Kind::Proxy {
                mode,
                sockmap,
                naive,
                kernel_path,
            } => {
                let mut extra_args: Vec<String> = Vec::new();
                if naive {
                    extra_args.extend(["--sockmap-policy".into(), "naive".into()]);
                }
                // Explicit both ways: the proxy's default (on whenever --sockmap is on) would
                // silently turn the per-hop scenarios into kernel-only ones. Without the
                // short-circuit the flag is accepted and ignored, so it is left out.
                if sockmap {
                    extra_args.extend([
                        "--kernel-path".into(),
                        if kernel_path { "on" } else { "off" }.into(),
                    ]);
                    extra_args.extend(self.sockmap_args.iter().cloned());
                }
                self.node.start_proxy(&ProxyOptions {
                    mode,
                    sockmap,
                    extra_args,
                    cpus: cpus.map(str::to_string),
                    quiet: true,
                    ..ProxyOptions::default()
                })?;
                Ok(None)
            }
            Kind::Haproxy | Kind::Nginx => {
                let haproxy = sc.kind == Kind::Haproxy;
                let (name, base) = if haproxy {
                    ("haproxy", HAPROXY_BASE)
                } else {
                    ("nginx", NGINX_BASE)
                };
                let conf_text = if haproxy {
                    peers::haproxy_config(tests::PROXY_V4, self.server.ipv4, base)
                } else {
                    peers::nginx_proxy_config(
                        &self.node.scratch,
                        tests::PROXY_V4,
                        self.server.ipv4,
                        base,
                    )
                };
                let conf = self.node.scratch.join(format!("{name}.conf"));
                fs::write(&conf, conf_text)?;
                let conf = conf.display().to_string();
                let argv: Vec<String> = if haproxy {
                    vec!["haproxy".into(), "-db".into(), "-f".into(), conf]
                } else {
                    vec![
                        "nginx".into(),
                        "-c".into(),
                        conf,
                        "-p".into(),
                        self.node.scratch.display().to_string(),
                    ]
                };
                let log = self.node.scratch.join(format!("{name}.log"));
                let mut m = Managed::start(
                    name,
                    &self.node.cgroup_root.join(name),
                    self.node.proxy_cpu_cgroup().as_deref(),
                    &self.node.netns,
                    cpus,
                    &argv,
                    &log,
                )?;
                peers::wait_listening(&self.node.netns, base + HTTP1)?;
                m.check_alive(&log)?;
                Ok(Some(m))
            }
        }
    }

    fn teardown(&mut self, sc: &Scenario, peer: Option<Managed>) -> Result<()> {
        if let Kind::Proxy { .. } = sc.kind {
            let status = self.node.stop_proxy("TERM")?;
            if !status.success() {
                bail!(
                    "proxy exited with {status}:\n{}",
                    self.node.proxy_log_text()
                );
            }
        }
        drop(peer);
        Ok(())
    }

    /// Ping-pong over one connection at each of `sizes`. Large messages get fewer rounds
    /// (at most 16 MiB moved per 1,000 rounds) so a 1 MiB run takes as long as a 16 KiB one.
    fn latency(
        &self,
        scenario: &str,
        target: &str,
        label: &str,
        client_cpus: Option<&str>,
        sizes: &[u64],
    ) -> Result<Vec<Sample>> {
        let mut out = Vec::new();
        for &size in sizes {
            let scale = (size / 16384).max(1);
            let rounds = (self.sizes.rounds / scale).max(50);
            let warmup = (self.sizes.warmup / scale).max(5);
            for _ in 0..self.reps {
                let j = self.meshbench_json(
                    client_cpus,
                    &[
                        "pingpong",
                        "--connect",
                        target,
                        "--size",
                        &size.to_string(),
                        "--connections",
                        "1",
                        "--rounds",
                        &rounds.to_string(),
                        "--warmup",
                        &warmup.to_string(),
                    ],
                )?;
                let w = format!("pingpong {size}B {label}");
                for m in ["p50_us", "p90_us", "p99_us", "p999_us", "errors"] {
                    out.push(Sample {
                        scenario: scenario.to_string(),
                        workload: w.clone(),
                        metric: m.to_string(),
                        unit: if m.ends_with("_us") { "us" } else { "count" },
                        value: num(&j, m)?,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The unpinned figures of one scenario; its stream figures are `streams` if measured
    /// already.
    fn measure(
        &self,
        scenario: &str,
        t: &Targets,
        under: &UnderTest<'_>,
        streams: Option<&Streams>,
    ) -> Result<(Vec<Sample>, RssTrace)> {
        // Latency unpinned (the pinned runs happened with the proxy pinned, see scenario()).
        let mut out = self.latency(scenario, &t.tcp_unpinned, "unpinned", None, &[1, 1024])?;
        let rss_idle = under.rss_kib();
        let sampler = RssSampler::start(scenario, under.pids());

        // Throughput by message size and concurrency; CPU per GiB over all of it.
        match streams {
            Some(done) => out.extend(done.samples.iter().cloned()),
            None => {
                let mut totals = StreamTotals::default();
                for &size in &self.sizes.stream_sizes {
                    for &conns in &self.sizes.stream_conns {
                        for _ in 0..self.reps {
                            out.extend(self.stream(
                                scenario,
                                Placed::unpinned(&t.tcp_unpinned),
                                size,
                                conns,
                                under,
                                &mut totals,
                            )?);
                        }
                    }
                }
                out.extend(totals.sample(scenario, under));
            }
        }
        let mut push = |workload: String, metric: &str, unit: &'static str, value: f64| {
            out.push(Sample {
                scenario: scenario.to_string(),
                workload,
                metric: metric.to_string(),
                unit,
                value,
            });
        };

        // Connection rate: short connections, the per-connection cost of the hooks.
        for _ in 0..self.reps {
            let j = self.meshbench_json(
                None,
                &[
                    "connrate",
                    "--connect",
                    &t.tcp_unpinned,
                    "--connections",
                    "4",
                    "--count",
                    &self.sizes.connrate_count.to_string(),
                ],
            )?;
            push(
                "connrate x4".into(),
                "conn_per_s",
                "conn/s",
                num(&j, "conn_per_s")?,
            );
            push("connrate x4".into(), "errors", "count", num(&j, "errors")?);
        }

        // HTTP/1.1 (wrk) and HTTP/2 (h2load): maximum request rate, CPU per 10k requests.
        let cpu0 = under.cpu_seconds();
        let mut requests = 0f64;
        for _ in 0..self.reps {
            let (rps, p50, p99, n) = self.wrk(&t.http1)?;
            push("http1 wrk c10".into(), "req_per_s", "req/s", rps);
            push("http1 wrk c10".into(), "p50_ms", "ms", p50);
            push("http1 wrk c10".into(), "p99_ms", "ms", p99);
            requests += n;
            let (rps, n, failed) = self.h2load(&t.http2)?;
            push("http2 h2load c10 m10".into(), "req_per_s", "req/s", rps);
            push("http2 h2load c10 m10".into(), "errors", "count", failed);
            requests += n;
        }
        // Added latency at a fixed, moderate rate (what a user feels, rather than the
        // saturation point): HTTP/1.1 GETs at 1000 req/s over 10 keep-alive connections.
        for _ in 0..self.reps {
            let j = self.meshbench_json(
                None,
                &[
                    "http",
                    "--url",
                    &t.http1,
                    "--rate",
                    "1000",
                    "--connections",
                    "10",
                    "--seconds",
                    &self.sizes.http_seconds.to_string(),
                ],
            )?;
            let w = "http1 1000 req/s c10".to_string();
            push(w.clone(), "p50_us", "us", num(&j, "p50_us")?);
            push(w.clone(), "p99_us", "us", num(&j, "p99_us")?);
            push(w, "errors", "count", num(&j, "errors")?);
            requests += num(&j, "requests")?;
        }
        // The same for HTTP/2: h2load at 100 req/s on each of 10 connections; its
        // per-request log gives the percentiles. (h2load times each request from when it
        // was sent, so unlike meshbench http a stall can hide later requests' waiting.)
        for rep in 0..self.reps {
            let log = self
                .node
                .scratch
                .join(format!("h2load-{scenario}-{rep}.log"));
            let mut cmd = self.client.command("h2load");
            cmd.args([
                "--rps=100",
                "-c10",
                "-m1",
                &format!("-D{}", self.sizes.http_seconds),
            ])
            .arg(format!("--log-file={}", log.display()))
            .arg(&t.http2);
            let o = run_bounded(cmd, Duration::from_secs(120))?;
            if !o.status.success() {
                bail!(
                    "h2load --rps failed: {}",
                    String::from_utf8_lossy(&o.stdout)
                );
            }
            let text = fs::read_to_string(&log)
                .with_context(|| format!("h2load log {}", log.display()))?;
            let (p50, p99, n, bad) = report::parse_h2load_log(&text)
                .with_context(|| format!("h2load log {} has no requests", log.display()))?;
            let w = "http2 1000 req/s c10".to_string();
            push(w.clone(), "p50_us", "us", p50);
            push(w.clone(), "p99_us", "us", p99);
            push(w, "errors", "count", bad);
            requests += n;
        }
        let cpu_http = under.cpu_seconds() - cpu0;
        if requests > 0.0 && !matches!(under, UnderTest::Nothing) {
            push(
                "http (all)".into(),
                "cpu_s_per_10k_req",
                "s/10k",
                cpu_http / (requests / 10_000.0),
            );
        }

        // Memory: idle, with many concurrent connections, after the load.
        if !matches!(under, UnderTest::Nothing) {
            let conns = self.sizes.hold_conns;
            let peak = Arc::new(std::sync::Mutex::new(0f64));
            let stop = Arc::new(AtomicBool::new(false));
            let pids = under.pids();
            let watcher = {
                let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let rss: f64 = pids.iter().map(|p| proc_rss_kib(*p)).sum();
                        if let Ok(mut p) = peak.lock() {
                            *p = p.max(rss);
                        }
                        thread::sleep(Duration::from_millis(20));
                    }
                })
            };
            let j = self.meshbench_json(
                None,
                &[
                    "pingpong",
                    "--connect",
                    &t.tcp_unpinned,
                    "--size",
                    "1024",
                    "--connections",
                    &conns.to_string(),
                    "--rounds",
                    "20",
                    "--warmup",
                    "0",
                ],
            );
            stop.store(true, Ordering::Relaxed);
            let _ = watcher.join();
            let j = j?;
            push(
                format!("hold {conns} conns"),
                "errors",
                "count",
                num(&j, "errors")?,
            );
            push("memory".into(), "rss_idle_kib", "KiB", rss_idle);
            push(
                "memory".into(),
                &format!("rss_peak_{conns}_conns_kib"),
                "KiB",
                peak.lock().map(|p| *p).unwrap_or(0.0),
            );
            push("memory".into(), "rss_after_kib", "KiB", under.rss_kib());
        }
        let trace = sampler.stop();
        Ok((out, trace))
    }

    /// One stream run: `conns` connections writing `size`-byte messages to `target` for the
    /// stream time; its throughput and errors as samples of `scenario`, its bytes and the
    /// CPU `under` spent on it added to `totals`.
    fn stream(
        &self,
        scenario: &str,
        to: Placed<'_>,
        size: u64,
        conns: u64,
        under: &UnderTest<'_>,
        totals: &mut StreamTotals,
    ) -> Result<[Sample; 2]> {
        let Placed {
            target,
            client_cpus,
        } = to;
        let cpu0 = under.cpu_seconds();
        let j = self.meshbench_json(
            client_cpus,
            &[
                "stream",
                "--connect",
                target,
                "--size",
                &size.to_string(),
                "--connections",
                &conns.to_string(),
                "--seconds",
                &self.sizes.stream_seconds.to_string(),
            ],
        )?;
        totals.cpu_seconds += under.cpu_seconds() - cpu0;
        totals.bytes += num(&j, "bytes")?;
        totals.gate_waits_ms.extend(
            j.get("gate_wait_ms")
                .and_then(Value::as_f64)
                .map(|ms| (conns as f64, ms)),
        );
        // The split placement of latency (SPLIT_CLIENT_CPU) for one connection: unpinned,
        // one stream settles in one of a few placements that run it at 11 to 19 Gbit/s here
        // whatever the path, so a scenario's unpinned x1 figure says as much about where it
        // landed as about its path.
        let placement = if client_cpus.is_some() { " split" } else { "" };
        let workload = format!("stream {} x{conns}{placement}", human(size));
        if self.streams_only {
            let run = format!("{scenario} {workload}");
            let drain = j.get("drain_ms_max").and_then(Value::as_f64);
            if let Some(line) = timeline(&j) {
                let drained = drain
                    .map(|ms| format!("; last count confirmed {ms:.0} ms after writing ended"))
                    .unwrap_or_default();
                say(&format!("{run}: Gbit/s written per {line}{drained}"));
            }
            if let Some(drain) = drain.filter(|&ms| ms > DRAIN_SHOWN_MS) {
                say(&format!(
                    "{run}: a connection confirmed its count {drain:.0} ms after writing ended (a stall?)"
                ));
            }
        }
        let sample = |metric: &str, unit: &'static str, value: f64| Sample {
            scenario: scenario.to_string(),
            workload: workload.clone(),
            metric: metric.to_string(),
            unit,
            value,
        };
        Ok([
            sample("gbit_per_s", "Gbit/s", num(&j, "gbit_per_s")?),
            sample("errors", "count", num(&j, "errors")?),
        ])
    }

    /// What a scenario's resource figures measure: its peer's processes, the proxy's, or
    /// nothing (direct).
    fn under_test<'b>(&'b self, peer: Option<&'b Managed>, kind: Kind) -> UnderTest<'b> {
        match (peer, kind) {
            (Some(m), _) => UnderTest::Peer(m),
            (None, Kind::Proxy { .. }) => UnderTest::Proxy(&self.node),
            _ => UnderTest::Nothing,
        }
    }

    /// The kernel counters of a short-circuit scenario's proxy (`None` for other scenarios,
    /// or if they cannot be read).
    fn short_circuit_counters(&self, sc: &Scenario) -> Option<HashMap<String, u64>> {
        if !matches!(sc.kind, Kind::Proxy { sockmap: true, .. }) {
            return None;
        }
        self.node.counters().ok()
    }

    /// `--streams-only`: what the short-circuit decided during one scenario's streams at
    /// `size`: how many bytes it redirected or passed to TCP, and the leave decisions.
    /// `gate_waits_ms`: meshbench's mean wait at its start gate in each run, with the run's
    /// connection count; the leave start (timed from the first bytes the proxy relayed, the
    /// header) includes it.
    fn say_decisions(
        &self,
        sc: &Scenario,
        size: u64,
        before: Option<HashMap<String, u64>>,
        gate_waits_ms: &[(f64, f64)],
    ) {
        const SHOWN: [&str; 9] = [
            "msg_redirected_bytes",
            "msg_passed_bytes",
            "msg_proxy_held",
            "msg_passed_backpressure",
            "detach_stream",
            "detach_self",
            "detach_wanted",
            "detach_ready",
            "detach_proxy_ready",
        ];
        let (Some(before), Some(after)) = (before, self.short_circuit_counters(sc)) else {
            return;
        };
        // One scrape of the proxy's metrics for both summaries (None if it cannot be had).
        let metrics = self.node.admin_metrics().ok();
        let grew: Vec<String> = SHOWN
            .iter()
            .filter_map(|name| {
                let d = after
                    .get(*name)?
                    .saturating_sub(*before.get(*name).unwrap_or(&0));
                (d > 0).then(|| format!("{name} {d}"))
            })
            .collect();
        say(&format!(
            "{} {}: {}{}{}{}",
            sc.name,
            human(size),
            if grew.is_empty() {
                "no short-circuit counter moved".to_string()
            } else {
                grew.join(", ")
            },
            metrics
                .as_deref()
                .and_then(|text| Self::leave_times(text, gate_waits_ms))
                .unwrap_or_default(),
            metrics
                .as_deref()
                .and_then(Self::lost_wakeups)
                .unwrap_or_default(),
            metrics
                .as_deref()
                .and_then(Self::sweeps)
                .unwrap_or_default()
        ));
    }

    /// "; N release sweeps (T ms)" from the proxy's metrics, if any ran: their CPU is the
    /// proxy's, taken from relaying.
    fn sweeps(text: &str) -> Option<String> {
        let runs = tests::metric_sum(text, "mesh_tcp_short_circuit_release_sweeps_total", &[]);
        let seconds = tests::metric_sum(
            text,
            "mesh_tcp_short_circuit_release_sweep_seconds_total",
            &[],
        );
        (runs > 0.0).then(|| format!("; {runs:.0} release sweeps ({:.1} ms)", seconds * 1e3))
    }

    /// "; lost wake-ups found by rechecks: N reads, M writes" from the proxy's metrics
    /// (`mesh_tcp_readiness_rechecks_total`), if any: each cost its connection 5 ms to 1 s,
    /// or after the shortest interval was a wake-up still on its way; `None` if none.
    fn lost_wakeups(text: &str) -> Option<String> {
        let [read, write] = ["read", "write"].map(|op| {
            let label = format!("op=\"{op}\"");
            tests::metric_sum(text, "mesh_tcp_readiness_rechecks_total", &[label.as_str()]).max(0.0)
                as u64
        });
        (read + write > 0)
            .then(|| format!("; lost wake-ups found by rechecks: {read} reads, {write} writes"))
    }

    /// "; left: ..." with the mean times connections took to start leaving the short-circuit
    /// and to get all four sockets out, from the proxy's metrics (this scenario's proxy only
    /// ran this size); `None` if no connection left.
    fn leave_times(text: &str, gate_waits_ms: &[(f64, f64)]) -> Option<String> {
        let mean = |name: &str| {
            let sum = tests::metric_sum(text, &format!("{name}_sum"), &[]);
            let count = tests::metric_sum(text, &format!("{name}_count"), &[]);
            (count > 0.0).then(|| (sum / count * 1000.0, count))
        };
        let (start, n) = mean("mesh_tcp_short_circuit_leave_start_seconds")?;
        let moved = mean("mesh_tcp_short_circuit_leave_move_seconds")
            .map_or("-".to_string(), |(m, k)| format!("{m:.1} ms ({k} whole)"));
        // Which socket holds a move up: each one's mean time out after leaving began.
        let sockets: Vec<String> = ["client", "client_proxy", "server", "server_proxy"]
            .iter()
            .filter_map(|socket| {
                let label = format!("socket=\"{socket}\"");
                let per = |suffix: &str| {
                    tests::metric_sum(
                        text,
                        &format!("mesh_tcp_short_circuit_leave_socket_seconds_{suffix}"),
                        &[label.as_str()],
                    )
                };
                let count = per("count");
                (count > 0.0).then(|| format!("{socket} {:.1}", per("sum") / count * 1000.0))
            })
            .collect();
        // Weighted by connections, as the proxy's mean is over connections.
        let conns: f64 = gate_waits_ms.iter().map(|(n, _)| n).sum();
        let gate = if conns > 0.0 {
            let mean = gate_waits_ms.iter().map(|(n, ms)| n * ms).sum::<f64>() / conns;
            format!(" (of which the clients' start gate {mean:.1} ms)")
        } else {
            String::new()
        };
        // How long the proxy took to act on the kernel's ask (the rest of the start is the
        // stream's own time until its writes were judged).
        let noticed = mean("mesh_tcp_short_circuit_leave_notice_seconds")
            .map_or(String::new(), |(m, _)| {
                format!(", {m:.1} ms after the workload asked")
            });
        Some(format!(
            "; {n} connections left: started after {start:.1} ms{gate}{noticed}, moved in {moved}; sockets out after {} ms (means)",
            sockets.join(", ")
        ))
    }

    /// The stream figures of the scenarios the short-circuit table compares, measured
    /// interleaved: for each message size, each repetition runs every scenario once (all
    /// connection counts), in an order rotated from one repetition to the next, with the
    /// scenario's proxy started for it and stopped after. Measured: throughput on this VM
    /// drifts more within an afternoon (TCP through the proxy, 16 KiB x1, from 7.0 to 10.9
    /// Gbit/s) than the differences the table judges, so scenarios measured ten minutes
    /// apart compared the drift; seconds apart, they compare the scenarios.
    fn interleaved_streams(
        &mut self,
        scenarios: &[Scenario],
    ) -> Result<BTreeMap<&'static str, Streams>> {
        say(&format!(
            "streams of {} interleaved (per size and repetition, each once, the proxy restarted for each)",
            scenarios
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut done: BTreeMap<&'static str, Streams> = BTreeMap::new();
        let mut totals: BTreeMap<&'static str, StreamTotals> = BTreeMap::new();
        let mut turn = 0;
        for &size in &self.sizes.stream_sizes {
            for _ in 0..self.reps {
                for k in 0..scenarios.len() {
                    let sc = scenarios[(turn + k) % scenarios.len()];
                    let targets = self.targets(sc.kind);
                    let peer = self.setup(&sc, None)?;
                    let before = self.kernel_path_switches(&sc);
                    let counters = self.short_circuit_counters(&sc);
                    let runs = {
                        let under = self.under_test(peer.as_ref(), sc.kind);
                        let t = totals.entry(sc.name).or_default();
                        self.sizes
                            .stream_conns
                            .iter()
                            .map(|&conns| {
                                self.stream(
                                    sc.name,
                                    Placed::unpinned(&targets.tcp_unpinned),
                                    size,
                                    conns,
                                    &under,
                                    t,
                                )
                            })
                            .collect::<Result<Vec<_>>>()
                    };
                    let mut switches = since(before, self.kernel_path_switches(&sc));
                    if self.streams_only {
                        let waits = totals
                            .get_mut(sc.name)
                            .map(|t| std::mem::take(&mut t.gate_waits_ms))
                            .unwrap_or_default();
                        self.say_decisions(&sc, size, counters, &waits);
                    }
                    self.teardown(&sc, peer)?;
                    let mut runs = runs.with_context(|| format!("scenario {}", sc.name))?;
                    if self.sizes.stream_conns.contains(&1) {
                        // One connection again in the split placement: the server (on the
                        // pinned port) and the proxy (or peer) on PIN_CPU, the client on
                        // SPLIT_CLIENT_CPU. Its CPU stays out of the CPU-per-GiB totals,
                        // which compare the unpinned runs.
                        let peer = self.setup(&sc, Some(PIN_CPU))?;
                        let before = self.kernel_path_switches(&sc);
                        let run = {
                            let under = self.under_test(peer.as_ref(), sc.kind);
                            self.stream(
                                sc.name,
                                Placed::split(&targets.tcp_pinned),
                                size,
                                1,
                                &under,
                                &mut StreamTotals::default(),
                            )
                        };
                        let split = since(before, self.kernel_path_switches(&sc));
                        switches = switches.zip(split).map(|(a, b)| a + b);
                        self.teardown(&sc, peer)?;
                        runs.push(run.with_context(|| format!("scenario {}", sc.name))?);
                    }
                    let entry = done.entry(sc.name).or_insert_with(|| Streams {
                        samples: Vec::new(),
                        switches: Some(0),
                    });
                    entry.samples.extend(runs.into_iter().flatten());
                    entry.switches = entry.switches.zip(switches).map(|(a, b)| a + b);
                }
                turn += 1;
            }
        }
        for sc in scenarios {
            if let (Some(entry), Some(t)) = (done.get_mut(sc.name), totals.get(sc.name)) {
                let measured = !matches!(sc.kind, Kind::Direct);
                entry.samples.extend(t.sample_if(sc.name, measured));
            }
        }
        Ok(done)
    }

    /// Runs meshbench in the client pod and returns its final JSON line.
    fn meshbench_json(&self, cpus: Option<&str>, args: &[&str]) -> Result<Value> {
        let mut cmd = match cpus {
            Some(cpus) => {
                let mut c = self.client.command("taskset");
                c.args(["-c", cpus]).arg(self.meshbench);
                c
            }
            None => self.client.command(self.meshbench),
        };
        cmd.args(args);
        let o = run_bounded(cmd, Duration::from_secs(300))?;
        let stdout = String::from_utf8_lossy(&o.stdout);
        let last = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or("");
        let v: Value = serde_json::from_str(last).with_context(|| {
            format!(
                "meshbench {args:?} printed no JSON result ({}): {stdout} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )
        })?;
        if !o.status.success() {
            // The run produced figures but also errors: keep them (the table reports the
            // errors per scenario) instead of losing the whole bench to one failure.
            let err = String::from_utf8_lossy(&o.stderr);
            let first = err.lines().next().unwrap_or("");
            say(&format!(
                "meshbench {} reported errors: {first}",
                args.join(" ")
            ));
        }
        Ok(v)
    }

    /// wrk: requests/s, p50 and p99 latency in ms, requests done.
    fn wrk(&self, url: &str) -> Result<(f64, f64, f64, f64)> {
        let mut cmd = self.client.command("wrk");
        cmd.args([
            "-t2",
            "-c10",
            &format!("-d{}s", self.sizes.http_seconds),
            "--latency",
            url,
        ]);
        let o = run_bounded(cmd, Duration::from_secs(120))?;
        let text = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            bail!("wrk failed: {text} {}", String::from_utf8_lossy(&o.stderr));
        }
        report::parse_wrk(&text).with_context(|| format!("unexpected wrk output: {text}"))
    }

    /// h2load (h2c prior knowledge): requests/s, requests done, requests failed.
    fn h2load(&self, url: &str) -> Result<(f64, f64, f64)> {
        let mut cmd = self.client.command("h2load");
        cmd.args([
            "-n",
            &self.sizes.h2_requests.to_string(),
            "-c10",
            "-m10",
            url,
        ]);
        let o = run_bounded(cmd, Duration::from_secs(120))?;
        let text = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            bail!(
                "h2load failed: {text} {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        report::parse_h2load(&text).with_context(|| format!("unexpected h2load output: {text}"))
    }
}

/// A number from a result; `null` (nothing measured, e.g. every connection failed) is NaN,
/// which the report shows as n/a.
/// meshbench stream's `timeline_bytes` as "100 ms: 12.1 17.9 ...", in Gbit/s per window
/// (`--streams-only` prints it per run: where in a run a path loses its time); `None` if
/// the JSON has none.
fn timeline(j: &Value) -> Option<String> {
    let step_ms = j.get("timeline_step_ms")?.as_u64().filter(|&ms| ms > 0)?;
    let windows = j.get("timeline_bytes")?.as_array()?;
    let rates: Vec<String> = windows
        .iter()
        .filter_map(Value::as_u64)
        .map(|b| format!("{:.1}", b as f64 * 8.0 / 1e9 / (step_ms as f64 / 1000.0)))
        .collect();
    Some(format!("{step_ms} ms: {}", rates.join(" ")))
}

fn num(v: &Value, key: &str) -> Result<f64> {
    match v.get(key) {
        Some(Value::Null) => Ok(f64::NAN),
        Some(x) => x
            .as_f64()
            .with_context(|| format!("{key:?} is not a number in {v}")),
        None => bail!("no {key:?} in {v}"),
    }
}

/// How much a counter grew between two readings of one proxy run: a difference, since the
/// pinned counters need not start from zero with a new proxy.
fn since(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(after?.saturating_sub(before?))
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1024 && b % 1024 == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

// === /proc readings ===

fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux ABI this project targets.
    100.0
}

fn proc_rss_kib(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0.0)
}

/// Samples RSS of the processes under test every 100 ms for the RSS-over-time plot.
struct RssSampler {
    scenario: String,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<(f64, f64)>>>,
}

impl RssSampler {
    fn start(scenario: &str, pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = (!pids.is_empty()).then(|| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let t0 = Instant::now();
                let mut points = Vec::new();
                // Bounded: at most 10 minutes of samples.
                while !stop.load(Ordering::Relaxed) && points.len() < 6000 {
                    let rss: f64 = pids.iter().map(|p| proc_rss_kib(*p)).sum();
                    points.push((t0.elapsed().as_secs_f64(), rss / 1024.0));
                    thread::sleep(Duration::from_millis(100));
                }
                points
            })
        });
        RssSampler {
            scenario: scenario.to_string(),
            stop,
            handle,
        }
    }

    fn stop(self) -> RssTrace {
        self.stop.store(true, Ordering::Relaxed);
        let points = self.handle.and_then(|h| h.join().ok()).unwrap_or_default();
        RssTrace {
            scenario: self.scenario,
            points,
        }
    }
}

/// (first-seen position of the workload+metric, workload, metric, scenario).
pub type GroupKey = (usize, String, String, String);
/// Samples grouped by [`GroupKey`]: the unit and the values of every repetition.
pub type Groups = BTreeMap<GroupKey, (&'static str, Vec<f64>)>;

/// Groups samples by (scenario, workload, metric), in first-seen order.
pub fn group(samples: &[Sample]) -> Groups {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut out = Groups::new();
    for s in samples {
        let key = (s.workload.clone(), s.metric.clone());
        let idx = match order.iter().position(|k| *k == key) {
            Some(i) => i,
            None => {
                order.push(key);
                order.len() - 1
            }
        };
        out.entry((
            idx,
            s.workload.clone(),
            s.metric.clone(),
            s.scenario.clone(),
        ))
        .or_insert((s.unit, Vec::new()))
        .1
        .push(s.value);
    }
    out
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn a_stream_timeline_is_shown_in_gbit_per_second_per_window() {
        let j: Value = serde_json::from_str(
            r#"{"timeline_bytes":[1250000000,625000000,0],"timeline_step_ms":100}"#,
        )
        .unwrap_or_default();
        assert_eq!(timeline(&j).as_deref(), Some("100 ms: 100.0 50.0 0.0"));
        // Older meshbench output, or a zero step: nothing to show.
        let old: Value = serde_json::from_str(r#"{"bytes":5}"#).unwrap_or_default();
        assert_eq!(timeline(&old), None);
        let zero: Value = serde_json::from_str(r#"{"timeline_bytes":[1],"timeline_step_ms":0}"#)
            .unwrap_or_default();
        assert_eq!(timeline(&zero), None);
    }
}
