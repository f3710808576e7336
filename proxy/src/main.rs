//! The node proxy: parse the CLI and config once, start the datapath, map errors to exit
//! codes.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

mod identity_cli;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{error, info, warn};

use proxy::{
    admin, cgroup, check, config,
    config::{Config, File, Mode, Overrides},
    discovery,
    discovery::Discovery,
    ebpf, http, iptables, metrics, outbound,
    outbound::Outbound,
    transport,
    transport::orig_dst::OrigDstSource,
};

/// Distinct exit codes, so scripts and orchestrators can tell failures apart.
mod exit {
    /// A runtime failure after start-up.
    pub const RUNTIME: u8 = 1;
    // 2 is clap's code for bad flags.
    /// The config (file or flags) is invalid.
    pub const CONFIG: u8 = 3;
    /// `proxy check` found a problem, or start-up found this machine unfit.
    pub const PREFLIGHT: u8 = 4;
    /// Another proxy holds the pin directory.
    pub const ALREADY_RUNNING: u8 = 5;
    /// Loading or attaching the datapath failed.
    pub const SETUP: u8 = 6;
}

#[derive(Parser)]
#[command(
    name = "proxy",
    version,
    about = "eBPF-accelerated transparent node proxy for service meshes",
    long_about = "A per-node proxy. Kernel programs catch outbound TCP connects of workloads (processes in cgroups under the workload cgroup parent) and send them to this proxy, which recovers the original destination and forwards the bytes. Same-node sockets are paired in a SOCKHASH so bytes skip the TCP/IP stack.\n\nExit codes: 0 ok, 1 runtime error, 2 bad flags, 3 bad config, 4 preflight failed, 5 another proxy holds the pin directory, 6 loading/attaching failed.",
    after_help = "Start with `proxy check --config FILE`, then `proxy run --config FILE`. Inspect with `bpftool prog show`, `bpftool cgroup tree` and `proxy counters`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the kernel programs and proxy intercepted connections until SIGTERM.
    Run(ConfigArgs),
    /// Check that this machine can run the proxy: kernel, BTF, cgroup v2, bpffs,
    /// capabilities, verifier, and programs of others on the same hooks.
    Check(ConfigArgs),
    /// Remove what a stopped proxy left: pins (and the fail-closed connect programs they
    /// hold attached) and iptables rules. Refuses while a proxy runs on the pin directory.
    Clean(ConfigArgs),
    /// Show a running proxy's state from its admin API: readiness, programs, maps with
    /// occupancy, kernel counters, open connections.
    Status {
        /// Admin address of the proxy.
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: String,
        /// Print the raw JSON of /debug/ebpf and /debug/connections.
        #[arg(long)]
        json: bool,
    },
    /// A live, refreshing table of what flows through a running proxy: totals and rates,
    /// the short-circuit share, and open connections per edge (workload -> destination).
    Top {
        /// Admin address of the proxy.
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: String,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many refreshes (default: until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// A live stream of finished connections (client, original destination, outcome,
    /// bytes, duration) from a running proxy, optionally filtered. Bounded: a tap that
    /// reads too slowly loses events (it is told) instead of slowing the proxy.
    Tap {
        /// Admin address of the proxy.
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: String,
        /// Only connections whose client address contains this text.
        #[arg(long)]
        src: Option<String>,
        /// Only connections whose original destination contains this text.
        #[arg(long)]
        dst: Option<String>,
        /// Stop after this many events (default: until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// Print the raw JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// The mesh's certificate authority: create, roll over, issue by hand.
    Ca {
        #[command(subcommand)]
        cmd: identity_cli::CaCommand,
    },
    /// The certificate issuer nodes get their workloads' certificates from.
    Identity {
        #[command(subcommand)]
        cmd: identity_cli::IdentityCommand,
    },
    /// Print the kernel programs' counters (summed over CPUs) from the pin directory.
    Counters {
        /// Pin directory of the proxy to read.
        #[arg(long, default_value = "/sys/fs/bpf/ebpf-mesh")]
        pin_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Config file (TOML). Flags override its values [default: /etc/ebpf-mesh/proxy.toml if it exists].
    #[arg(long, short = 'c', env = "PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Port that redirected connections arrive on [default: 15001].
    #[arg(long)]
    port: Option<u16>,
    /// IPv4 address workloads' connects are sent to; must reach this proxy from the workloads' network namespaces.
    #[arg(long, value_name = "IP")]
    redirect_ipv4: Option<String>,
    /// IPv6 address workloads' connects are sent to (leave out to not intercept IPv6).
    #[arg(long, value_name = "IP")]
    redirect_ipv6: Option<String>,
    /// Interception mode [default: ebpf].
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// Workload cgroup parent, relative to the cgroup v2 mount [default: ebpf-mesh/workloads].
    #[arg(long, value_name = "PATH")]
    workload_cgroup: Option<String>,
    /// The proxy's own cgroup, relative to the cgroup v2 mount [default: ebpf-mesh-proxy].
    #[arg(long, value_name = "PATH")]
    proxy_cgroup: Option<String>,
    /// bpffs directory for pins [default: /sys/fs/bpf/ebpf-mesh].
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<String>,
    /// What workloads' connects do while the proxy is down [default: open].
    #[arg(long, value_enum)]
    fail_mode: Option<FailArg>,
    /// Same-node short-circuit with sock_ops + sk_msg [default: off; see ARCHITECTURE.md for the kernel caveats].
    #[arg(long, value_enum)]
    sockmap: Option<OnOff>,
    /// Short-circuit policy: adaptive (each socket's queue bounded, backpressure through TCP;
    /// see --sockmap-queue-limit and --sockmap-small-streak) or naive (every message
    /// redirected, unbounded: only for measuring) [default: adaptive].
    #[arg(long, value_enum)]
    sockmap_policy: Option<PolicyArg>,
    /// Kernel memory that may wait unread in one socket's short-circuit queue before its
    /// sender moves to TCP: the bytes plus the kernel's struct per message (1 KiB here).
    /// A workload that meets it twice because the proxy cannot keep up leaves the
    /// short-circuit for plain TCP (per hop) [default: 4194304].
    #[arg(long, value_name = "BYTES")]
    sockmap_queue_limit: Option<u32>,
    /// Writes (below --sockmap-small-write) in a row, each finding the receiver with unread
    /// bytes or coming with no reply since the one before, that make a workload's direction
    /// a stream (so does meeting the queue limit):
    /// its connection leaves the short-circuit for plain TCP, all four sockets (per hop),
    /// where streams run at least as fast; 0 keeps streams on the short-circuit [default:
    /// 16; README "Benchmarks"].
    #[arg(long, value_name = "N")]
    sockmap_small_streak: Option<u32>,
    /// Writes below this size count for --sockmap-small-streak; 1048576, the largest, counts
    /// every write [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    sockmap_small_write: Option<u32>,
    /// With --sockmap on: authorized same-node opaque TCP connections go workload to
    /// workload in the kernel once the proxy has relayed what it read, the proxy staying out
    /// of the data path (it still sees close and reset, counts the bytes and takes the
    /// connection back when a reload denies it) [default: on].
    #[arg(long, value_enum, value_name = "ON|OFF")]
    kernel_path: Option<OnOff>,
    /// With --sockmap on: connections to this port (the port the workload connects to, or a
    /// workload server's port) stay off the short-circuit, their sockets on the kernel's own
    /// TCP receive path. For programs that read and write one socket from two blocking
    /// threads, which the short-circuit's receive path can fail with a spurious EAGAIN
    /// (ARCHITECTURE.md, "Kernel facts"). Repeatable, at most 8.
    #[arg(long = "sockmap-exclude-port", value_name = "PORT")]
    sockmap_exclude_ports: Vec<u16>,
    /// With --sockmap on: register blocking workload sockets too (clients blocking at connect,
    /// servers whose listener is blocking when the connection arrives). Off by default: a
    /// blocking reader on the short-circuit can get a spurious EAGAIN from the kernel
    /// (ARCHITECTURE.md, "Kernel facts"), so such sockets stay on plain TCP, and one that
    /// turns blocking after it was registered (a connect with a timeout) leaves at its first
    /// send; non-blocking (event-driven) programs keep the short-circuit. On turns both
    /// checks off [default: off].
    #[arg(long, value_enum, value_name = "ON|OFF")]
    sockmap_blocking_sockets: Option<OnOff>,
    /// Intercept only declared workloads' cgroups ([[workload]] or Kubernetes pods), not
    /// every process below the workload cgroup parent [default: off].
    #[arg(long, value_enum)]
    workloads_only: Option<OnOff>,
    /// Destination port never intercepted (repeatable).
    #[arg(long = "exclude-port", value_name = "PORT")]
    exclude_ports: Vec<u16>,
    /// Destination network never intercepted, e.g. 169.254.0.0/16 (repeatable).
    #[arg(long = "exclude-cidr", value_name = "CIDR")]
    exclude_cidrs: Vec<String>,
    /// iptables mode: interface workloads' traffic arrives on; `+` is a wildcard (repeatable).
    #[arg(long = "iptables-interface", value_name = "IFACE")]
    iptables_interfaces: Vec<String>,
    /// Admin server address (health, metrics, debug) [default: 127.0.0.1:15020].
    #[arg(long, value_name = "ADDR:PORT")]
    admin_address: Option<String>,
    /// SOCKHASH size; 4 entries carry one short-circuited connection [default: 65536].
    #[arg(long, value_name = "N")]
    sockhash_entries: Option<u32>,
    /// Log filter: error, warn, info, debug, trace [default: info].
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Kernel programs log each connect decision (aya-log) as proxy::kernel [default: off].
    #[arg(long)]
    kernel_log: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Ebpf,
    Iptables,
}

#[derive(Clone, Copy, ValueEnum)]
enum FailArg {
    Open,
    Closed,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    Adaptive,
    Naive,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => with_config(&args, true, run),
        Command::Ca { cmd } => identity_cli::ca(cmd),
        Command::Identity { cmd } => identity_cli::identity_cmd(cmd),
        Command::Check(args) => with_config(&args, true, |cfg| check(&cfg)),
        Command::Clean(args) => with_config(&args, false, |cfg| clean(&cfg)),
        Command::Counters { pin_dir, json } => counters(&pin_dir, json),
        Command::Status { admin, json } => status(&admin, json),
        Command::Top {
            admin,
            interval,
            count,
        } => top(&admin, interval, count),
        Command::Tap {
            admin,
            src,
            dst,
            count,
            json,
        } => tap(&admin, src.as_deref(), dst.as_deref(), count, json),
    };
    ExitCode::from(code)
}

fn with_config(args: &ConfigArgs, intercepts: bool, f: impl FnOnce(Config) -> u8) -> u8 {
    let loaded = load_config(args).and_then(|cfg| {
        if intercepts {
            cfg.require_interception()?;
        }
        Ok(cfg)
    });
    match loaded {
        Ok(cfg) => {
            init_logging(&cfg);
            f(cfg)
        }
        Err(e) => {
            eprintln!("proxy: {e}");
            exit::CONFIG
        }
    }
}

fn load_config(args: &ConfigArgs) -> Result<Config, config::ConfigError> {
    let default = Path::new(config::DEFAULT_CONFIG_PATH);
    let file = match &args.config {
        Some(path) => File::load(path)?,
        // A node's config lives at the default path; without one, flags alone configure.
        None if default.exists() => File::load(default)?,
        None => File::default(),
    };
    let o = Overrides {
        port: args.port,
        redirect_ipv4: args.redirect_ipv4.clone(),
        redirect_ipv6: args.redirect_ipv6.clone(),
        mode: args.mode.map(|m| match m {
            ModeArg::Ebpf => "ebpf".to_string(),
            ModeArg::Iptables => "iptables".to_string(),
        }),
        workload_cgroup: args.workload_cgroup.clone(),
        proxy_cgroup: args.proxy_cgroup.clone(),
        pin_dir: args.pin_dir.clone(),
        fail_mode: args.fail_mode.map(|m| match m {
            FailArg::Open => "open".to_string(),
            FailArg::Closed => "closed".to_string(),
        }),
        sockmap: args.sockmap.map(|s| matches!(s, OnOff::On)),
        kernel_path: args.kernel_path.map(|s| matches!(s, OnOff::On)),
        sockmap_exclude_ports: args.sockmap_exclude_ports.clone(),
        sockmap_blocking_sockets: args
            .sockmap_blocking_sockets
            .map(|s| matches!(s, OnOff::On)),
        sockmap_queue_limit: args.sockmap_queue_limit,
        sockmap_small_streak: args.sockmap_small_streak,
        sockmap_small_write: args.sockmap_small_write,
        sockmap_policy: args.sockmap_policy.map(|p| {
            match p {
                PolicyArg::Adaptive => "adaptive",
                PolicyArg::Naive => "naive",
            }
            .to_string()
        }),
        workloads_only: args.workloads_only.map(|s| matches!(s, OnOff::On)),
        exclude_ports: args.exclude_ports.clone(),
        exclude_cidrs: args.exclude_cidrs.clone(),
        iptables_interfaces: args.iptables_interfaces.clone(),
        sockhash_entries: args.sockhash_entries,
        admin_address: args.admin_address.clone(),
        log_level: args.log_level.clone(),
        log_json: args.log_json,
        log_kernel: args.kernel_log,
    };
    let mut cfg = Config::resolve(file, o)?;
    cfg.file_path = match &args.config {
        Some(p) => Some(p.clone()),
        None if default.exists() => Some(default.to_owned()),
        None => None,
    };
    Ok(cfg)
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cfg.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

// === proxy run ===

fn run(cfg: Config) -> u8 {
    let mount = match cgroup::cgroup2_mount() {
        Ok(m) => m,
        Err(e) => {
            error!("{e}");
            return exit::PREFLIGHT;
        }
    };
    let workload_cg = cgroup::resolve(&mount, &cfg.workload_cgroup);
    let proxy_cg = cgroup::resolve(&mount, &cfg.proxy_cgroup);
    let original_cg = cgroup::current(&mount);
    if cfg.mode == Mode::Ebpf {
        // Before any socket exists: sockets belong to the cgroup of the task creating them.
        for p in [&workload_cg, &proxy_cg] {
            if let Err(e) = cgroup::ensure(p) {
                error!("{e}");
                return exit::SETUP;
            }
        }
        if let Err(e) = cgroup::join(&proxy_cg) {
            error!("{e}");
            return exit::SETUP;
        }
    }

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("proxy-data")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the tokio runtime");
            return exit::RUNTIME;
        }
    };
    let code = rt.block_on(serve(&cfg, &workload_cg, &proxy_cg));

    if cfg.mode == Mode::Ebpf {
        // Leave our cgroup and remove it, so a clean stop leaves nothing behind.
        if let Some(orig) = original_cg.filter(|o| *o != proxy_cg)
            && cgroup::join(&orig).is_ok()
        {
            let _ = std::fs::remove_dir(&proxy_cg);
        }
    }
    code
}

async fn serve(cfg: &Config, workload_cg: &Path, proxy_cg: &Path) -> u8 {
    // Signal handlers first: a SIGTERM during start-up must lead to an orderly stop (after
    // start-up completes), not to the default action that would leave pins behind.
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return exit::RUNTIME;
        }
    };
    // One future for the whole life of the process: start-up steps that can wait (fetching
    // certificates) race it, and the final wait reuses it, so no signal is lost in between.
    let mut stop_signal = Box::pin(signals.wait());
    // The pin directory lock first: a second proxy on it is refused with the clearest
    // message before it binds ports that the first one holds.
    let mut pins = None;
    if cfg.mode == Mode::Ebpf {
        match ebpf::PinDir::lock(&cfg.pin_dir) {
            Ok(p) => pins = Some(p),
            Err(e) => {
                error!("{e}");
                return match e {
                    ebpf::PinError::Locked(_) => exit::ALREADY_RUNNING,
                    ebpf::PinError::NotBpffs { .. } => exit::PREFLIGHT,
                    ebpf::PinError::Io { .. } => exit::SETUP,
                };
            }
        }
    }
    let mut addrs = vec![SocketAddr::new(IpAddr::V4(cfg.bind_ipv4), cfg.port)];
    if cfg.redirect_ipv6.is_some() || cfg.mode == Mode::Iptables {
        addrs.push(SocketAddr::new(IpAddr::V6(cfg.bind_ipv6), cfg.port));
    }
    let mut listeners = Vec::new();
    for a in &addrs {
        match transport::listen(*a) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                error!(address = %a, error = %e, "cannot listen; is another process using proxy.port? choose another with --port");
                return exit::SETUP;
            }
        }
    }
    let Some(first) = listeners.first() else {
        return exit::SETUP;
    };
    let netns = match transport::netns_cookie(first) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "cannot read the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14+)");
            return exit::PREFLIGHT;
        }
    };

    // The admin server comes up before interception, not ready, so a readiness probe sees
    // the transition.
    let kernel = Arc::new(std::sync::OnceLock::new());
    let (metrics, mut registry) = metrics::Metrics::new(Arc::clone(&kernel));
    metrics::set_data_runtime(tokio::runtime::Handle::current());
    let conns = Arc::new(outbound::ConnTable::default());
    let (tap, _) = tokio::sync::broadcast::channel(outbound::TAP_CAPACITY);
    let config_json = Arc::new(std::sync::RwLock::new(cfg.to_json()));
    let mut discovery = Discovery::new(cfg.catalog.clone());
    if cfg.mode == Mode::Ebpf
        && let Ok(mount) = cgroup::cgroup2_mount()
    {
        // The kernel records the connecting task's cgroup id; workloads are found by it.
        discovery = discovery.with_cgroup_root(mount);
    }
    let discovery = Arc::new(discovery);
    metrics
        .config_generation
        .set(discovery.snapshot().generation as i64);
    metrics::register_discovery(&mut registry, Arc::clone(&discovery));
    // Staleness of discovery mode `kubernetes`: the unix time of the last watch event.
    let kube_last_event = prometheus_client::metrics::gauge::Gauge::default();
    if cfg.kubernetes.is_some() {
        registry.register(
            "kubernetes_last_event_timestamp_seconds",
            "Unix time of the last event from the Kubernetes API watches (0: none yet)",
            kube_last_event.clone(),
        );
    }
    let identity_slot = Arc::new(std::sync::OnceLock::new());
    metrics::register_identity(&mut registry, Arc::clone(&identity_slot));
    let admin_state = Arc::new(admin::AdminState {
        ready: AtomicBool::new(false),
        registry,
        metrics: Arc::clone(&metrics),
        kernel: Arc::clone(&kernel),
        config: Arc::clone(&config_json),
        conns: Arc::clone(&conns),
        pin_dir: (cfg.mode == Mode::Ebpf).then(|| cfg.pin_dir.clone()),
        tap: tap.clone(),
        taps: std::sync::atomic::AtomicUsize::new(0),
        discovery: Arc::clone(&discovery),
        identity: Arc::clone(&identity_slot),
        kube_last_event: cfg.kubernetes.is_some().then(|| kube_last_event.clone()),
    });
    if let Err(e) = admin::start(cfg.admin_address, Arc::clone(&admin_state)) {
        error!("{e}");
        return exit::SETUP;
    }

    // Certificates before interception: a node that cannot get its workloads' certificates
    // must not start taking their traffic.
    let identity = match &cfg.identity {
        Some(i) => {
            let ids: Vec<proxy::identity::SpiffeId> = cfg
                .catalog
                .workloads
                .iter()
                .filter_map(|w| proxy::identity::SpiffeId::parse(&w.identity).ok())
                .collect();
            let mut icfg = proxy::identity::IdentityConfig::new(
                i.trust_domain.clone(),
                i.issuer,
                i.anchors.clone(),
                i.token_file.clone(),
                cfg.mesh.node_name.clone(),
            );
            icfg.rotate_fraction = i.rotate_fraction;
            let started = tokio::select! {
                r = proxy::identity::IdentityManager::start(icfg, ids) => r,
                signal = &mut stop_signal => {
                    info!(signal, "stopping during start-up, before anything was attached");
                    return 0;
                }
            };
            match started {
                Ok(m) => {
                    info!(node = %m.node_identity(), identities = m.identities().len(), "certificates ready");
                    let _ = identity_slot.set(Arc::clone(&m));
                    Some(m)
                }
                Err(e) => {
                    error!("{e}");
                    return exit::SETUP;
                }
            }
        }
        None => None,
    };
    let tunnels = identity.as_ref().map(|m| {
        Arc::new(proxy::tunnel::Tunnels::new(
            Arc::clone(m),
            Arc::clone(&metrics),
            cfg.connect_timeout,
        ))
    });
    let tunnel_listener = match &identity {
        Some(_) => match tokio::net::TcpListener::bind(cfg.mesh.inbound).await {
            Ok(l) => Some(l),
            Err(e) => {
                error!(address = %cfg.mesh.inbound, error = %e, "cannot listen for tunnels from other nodes; is mesh.inbound_port in use?");
                return exit::SETUP;
            }
        },
        None => None,
    };

    // Interception last: listeners exist, so no redirected connect finds a closed port.
    let (mut datapath, rules, orig_dst) = match cfg.mode {
        Mode::Ebpf => {
            // The adaptive short-circuit reads each peer's queue length at offsets only the
            // running kernel's BTF knows.
            let kernel_offsets = if cfg.needs_kernel_offsets() {
                match ebpf::btf::kernel_offsets(Path::new(ebpf::btf::VMLINUX)) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        error!("{e}");
                        return exit::PREFLIGHT;
                    }
                }
            } else {
                None
            };
            let plan = ebpf::Plan {
                config: cfg,
                proxy_netns: netns,
                workload_cgroup: workload_cg,
                proxy_cgroup: proxy_cg,
                kernel_offsets,
            };
            let Some(pins) = pins else {
                return exit::SETUP;
            };
            match ebpf::Datapath::start(&plan, pins) {
                Ok((dp, maps)) => {
                    let maps = Arc::new(maps);
                    let _ = kernel.set(Arc::clone(&maps));
                    (Some(dp), None, OrigDstSource::Ebpf(maps))
                }
                Err(e) => {
                    error!("{e}");
                    return match e {
                        ebpf::EbpfError::PinDir(ebpf::PinError::Locked(_)) => exit::ALREADY_RUNNING,
                        ebpf::EbpfError::PinDir(ebpf::PinError::NotBpffs { .. }) => exit::PREFLIGHT,
                        _ => exit::SETUP,
                    };
                }
            }
        }
        Mode::Iptables => match iptables::Rules::install(cfg) {
            Ok(r) => (None, Some(r), OrigDstSource::Conntrack),
            Err(e) => {
                error!("{e}");
                return exit::SETUP;
            }
        },
    };
    // Declared workloads' cgroups into MESH_WORKLOADS, kept in step with the catalog (and
    // with pods whose cgroup appears after the config named it) once a second. Until the
    // first pass, connects go direct (fail-open), as before the proxy started.
    if cfg.workloads_only
        && let OrigDstSource::Ebpf(maps) = &orig_dst
    {
        let maps = Arc::clone(maps);
        let discovery = Arc::clone(&discovery);
        tokio::spawn(async move {
            let mut last = std::collections::HashSet::new();
            loop {
                let wanted = discovery.workload_cgroup_ids();
                if wanted != last {
                    match maps.set_workloads(&wanted) {
                        Ok((added, removed)) => {
                            info!(
                                added,
                                removed,
                                workloads = wanted.len(),
                                "intercepted workload cgroups updated"
                            );
                            last = wanted;
                        }
                        Err(e) => warn!(error = %e, "cannot update MESH_WORKLOADS; retrying"),
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    if cfg.log_kernel
        && let Some(dp) = datapath.as_mut()
    {
        match dp.kernel_logger() {
            Ok(mut logger) => {
                // A small thread of its own: the records are rare debug output, and a
                // blocking poll needs no unsafe fd registration with the runtime.
                let spawned =
                    std::thread::Builder::new()
                        .name("kernel-log".into())
                        .spawn(move || {
                            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
                            use std::os::fd::AsFd;
                            loop {
                                let ready = {
                                    let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
                                    poll(&mut fds, PollTimeout::from(1000u16))
                                };
                                match ready {
                                    Ok(n) if n > 0 => logger.flush(),
                                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                                    Err(_) => return,
                                }
                            }
                        });
                if let Err(e) = spawned {
                    warn!(error = %e, "cannot start the kernel log reader; log.kernel has no effect");
                }
                info!("kernel debug records on (log.kernel): logged as proxy::kernel");
            }
            Err(e) => {
                warn!(error = %e, "cannot read the kernel programs' log records; log.kernel has no effect")
            }
        }
    }
    let own_addrs = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let pools = Arc::new(http::upstream::Pools::new(cfg.sockmap));
    let http = Arc::new(http::HttpProxy {
        discovery: Arc::clone(&discovery),
        pools: Arc::clone(&pools),
        metrics: Arc::clone(&metrics),
        limits: cfg.http,
        tap: tap.clone(),
        mesh: cfg.mesh.clone(),
        tunnels: tunnels.clone(),
    });
    let kernel_path = match &orig_dst {
        OrigDstSource::Ebpf(maps) if cfg.kernel_path => Some(Arc::clone(maps)),
        _ => None,
    };
    let short_circuit = match &orig_dst {
        OrigDstSource::Ebpf(maps) if cfg.sockmap => Some(Arc::clone(maps)),
        _ => None,
    };
    let outbound = Arc::new(Outbound {
        kernel_path,
        short_circuit,
        discovery: Arc::clone(&discovery),
        http,
        mesh: cfg.mesh.clone(),
        tunnels,
        detect_timeout: cfg.detect_timeout,
        opaque_ports: cfg.opaque_ports.clone(),
        orig_dst,
        connect_timeout: cfg.connect_timeout,
        copy_buffer: cfg.copy_buffer_bytes,
        recheck_io: cfg.sockmap,
        own_addrs,
        metrics,
        conns,
        tap,
        path: if cfg.sockmap {
            "short-circuit"
        } else {
            "proxied"
        },
    });
    admin_state.ready.store(true, Ordering::Relaxed);
    info!(
        listen = ?addrs,
        mode = %cfg.mode,
        redirect_ipv4 = ?cfg.redirect_ipv4,
        redirect_ipv6 = ?cfg.redirect_ipv6,
        "proxy ready"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    // Idle upstream connections are closed after their service's idle timeout.
    tokio::spawn({
        let pools = Arc::clone(&pools);
        let mut stop = stop_rx.clone();
        async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => pools.reap(std::time::Instant::now()),
                    _ = stop.changed() => return,
                }
            }
        }
    });
    if let (Some(listener), Some(m)) = (tunnel_listener, identity.as_ref()) {
        let inbound = Arc::new(proxy::tunnel::Inbound {
            identity: Arc::clone(m),
            discovery: Arc::clone(&discovery),
            metrics: Arc::clone(&outbound.metrics),
            connect_timeout: cfg.connect_timeout,
            copy_buffer: cfg.copy_buffer_bytes,
            recheck_io: cfg.sockmap,
        });
        tokio::spawn(proxy::tunnel::serve_inbound(
            listener,
            inbound,
            stop_rx.clone(),
        ));
    }
    if let Some(k) = &cfg.kubernetes {
        // Services and workloads from the API server; the file's other sections (policies
        // included) are read once at start-up.
        let watcher = discovery::kubernetes::Watcher {
            settings: k.clone(),
            trust_domain: cfg.trust_domain.clone(),
            policies: cfg.catalog.policies.clone(),
            discovery: Arc::clone(&discovery),
            metrics: Arc::clone(&outbound.metrics),
            config_json: Arc::clone(&config_json),
            identity: identity.clone(),
            last_event: kube_last_event,
        };
        tokio::spawn(watcher.run(stop_rx.clone()));
    } else if let Some(path) = cfg.file_path.clone() {
        let reloader = discovery::watch::Reloader {
            identity: identity.clone(),
            path,
            overrides: cfg.overrides.clone(),
            interval: cfg.reload_interval,
            discovery: Arc::clone(&discovery),
            metrics: Arc::clone(&outbound.metrics),
            config_json: Arc::clone(&config_json),
            started_with: cfg.to_json(),
        };
        tokio::spawn(reloader.run(stop_rx.clone()));
    }
    let server = tokio::spawn(outbound::serve(
        listeners,
        Arc::clone(&outbound),
        stop_rx,
        DRAIN,
    ));
    let signal = stop_signal.await;
    admin_state.ready.store(false, Ordering::Relaxed);
    let kernel_counters = match &outbound.orig_dst {
        OrigDstSource::Ebpf(maps) => maps.counters().ok(),
        OrigDstSource::Conntrack => None,
    };
    info!(
        signal,
        "stopping: detaching interception, then draining connections"
    );
    // Detach first: in fail-open mode new connects go direct from here on.
    if let Some(dp) = datapath {
        dp.shutdown();
    }
    if let Some(r) = rules {
        r.remove();
    }
    let _ = stop_tx.send(true);
    if let Err(e) = server.await {
        warn!(error = %e, "server task ended abnormally");
    }
    info!(open_connections = outbound.conns.len(), "stopped");
    if let Some(values) = kernel_counters {
        let summary: Vec<String> = proxy_common::counter::NAMES
            .iter()
            .zip(values)
            .filter(|(_, v)| *v > 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        info!(counters = %summary.join(" "), "kernel counters at stop");
    }
    0
}

/// How long open connections may finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(5);

/// SIGTERM and SIGINT, registered once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: tokio::signal::unix::signal(SignalKind::terminate())?,
            int: tokio::signal::unix::signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

// === proxy check / clean / counters ===

fn check(cfg: &Config) -> u8 {
    let findings = check::run(cfg);
    let mut failed = 0;
    for f in &findings {
        println!(
            "[{}] {}: {}",
            if f.ok { " ok " } else { "FAIL" },
            f.what,
            f.detail
        );
        if !f.ok {
            failed += 1;
        }
    }
    if failed == 0 {
        println!("all {} checks passed", findings.len());
        0
    } else {
        println!(
            "{failed} of {} checks failed; fix them and run `proxy check` again",
            findings.len()
        );
        exit::PREFLIGHT
    }
}

fn clean(cfg: &Config) -> u8 {
    let mut code = 0;
    if cfg.pin_dir.exists() {
        match ebpf::clean(&cfg.pin_dir) {
            Ok(n) => println!("removed {n} pins under {}", cfg.pin_dir.display()),
            Err(e) => {
                eprintln!("proxy: {e}");
                code = match e {
                    ebpf::EbpfError::PinDir(ebpf::PinError::Locked(_)) => exit::ALREADY_RUNNING,
                    _ => exit::RUNTIME,
                };
            }
        }
    } else {
        println!("no pin directory at {}", cfg.pin_dir.display());
    }
    if cfg.mode == Mode::Iptables {
        let chain = iptables::Rules::chain_name(cfg.port);
        iptables::remove_chain("iptables", &chain);
        iptables::remove_chain("ip6tables", &chain);
        println!("removed iptables chain {chain} and its jumps (if present)");
    }
    code
}

fn counters(pin_dir: &Path, json: bool) -> u8 {
    match ebpf::read_pinned_counters(pin_dir) {
        Ok(values) => {
            let names = proxy_common::counter::NAMES;
            if json {
                let obj: serde_json::Map<String, serde_json::Value> = names
                    .iter()
                    .zip(values.iter())
                    .map(|(n, v)| ((*n).to_string(), serde_json::Value::from(*v)))
                    .collect();
                println!("{}", serde_json::Value::Object(obj));
            } else {
                for (n, v) in names.iter().zip(values.iter()) {
                    println!("{n:<28} {v}");
                }
            }
            0
        }
        Err(e) => {
            eprintln!(
                "proxy: {e}; is a proxy running with --pin-dir {}?",
                pin_dir.display()
            );
            exit::RUNTIME
        }
    }
}

/// `proxy status`: a running proxy's state, from its admin API.
fn status(admin: &str, json: bool) -> u8 {
    let get = |path: &str| admin_get(admin, path);
    let ready = match get("/ready") {
        Ok((code, _)) => code == 200,
        Err(e) => {
            eprintln!(
                "proxy: cannot reach the admin API at {admin}: {e}; is the proxy running, and is --admin its admin.address?"
            );
            return exit::RUNTIME;
        }
    };
    let ebpf = get("/debug/ebpf")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    let conns = get("/debug/connections")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    let config = get("/config")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    let ident = get("/debug/identity")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    let services = get("/debug/services")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({"ready": ready, "config": config, "ebpf": ebpf, "identity": ident, "services": services, "connections": conns})
        );
        return 0;
    }
    println!(
        "proxy at {admin}: {}",
        if ready { "ready" } else { "NOT ready" }
    );
    println!(
        "mode {}, sockmap {}, fail_mode {}, pin dir {}",
        config["intercept"]["mode"],
        config["intercept"]["sockmap"],
        config["intercept"]["fail_mode"],
        config["intercept"]["pin_dir"]
    );
    if let Some(progs) = ebpf["programs"].as_array() {
        println!("programs:");
        for p in progs {
            println!("  {:<18} id {}", p["name"].as_str().unwrap_or("?"), p["id"]);
        }
    }
    if let Some(maps) = ebpf["maps"].as_array() {
        println!("maps:");
        for m in maps {
            println!(
                "  {:<18} {} entries",
                m["name"].as_str().unwrap_or("?"),
                m["entries"]
            );
        }
    }
    if let Some(c) = ebpf["counters"].as_object() {
        println!("kernel counters (non-zero):");
        for (k, v) in c.iter().filter(|(_, v)| v.as_u64().unwrap_or(0) > 0) {
            println!("  {k:<28} {v}");
        }
    }
    if ident["enabled"].as_bool().unwrap_or(false) {
        println!(
            "identity: {} (trust domain {}), {} renewals, {} failed",
            ident["node"].as_str().unwrap_or("?"),
            ident["trust_domain"].as_str().unwrap_or("?"),
            ident["rotations"],
            ident["rotation_failures"]
        );
        for c in ident["certificates"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            println!(
                "  {:<60} serial {}  expires in {} s",
                c["identity"].as_str().unwrap_or("?"),
                c["serial"].as_str().unwrap_or("?"),
                c["expires_in_seconds"]
            );
        }
        for a in ident["anchors"].as_array().cloned().unwrap_or_default() {
            println!("  anchor {}", a["subject"].as_str().unwrap_or("?"));
        }
    } else {
        println!("identity: off (no [identity] section: no mTLS to other nodes)");
    }
    let workloads = config["workloads"].as_array().cloned().unwrap_or_default();
    println!("workloads: {}", workloads.len());
    for w in &workloads {
        println!(
            "  {:<24} {}  cgroups {}  addresses {}",
            format!(
                "{}/{}",
                w["namespace"].as_str().unwrap_or("?"),
                w["name"].as_str().unwrap_or("?")
            ),
            w["identity"].as_str().unwrap_or("?"),
            w["cgroups"],
            w["addresses"]
        );
    }
    let svcs = services["services"].as_array().cloned().unwrap_or_default();
    println!(
        "services: {} (config generation {})",
        svcs.len(),
        services["generation"]
    );
    for s in &svcs {
        let eps = s["endpoints"].as_array().cloned().unwrap_or_default();
        let healthy = eps.iter().filter(|e| e["state"] == "healthy").count();
        println!(
            "  {:<20} {:<7} {} port {}  endpoints {healthy}/{} healthy",
            s["name"].as_str().unwrap_or("?"),
            s["protocol"].as_str().unwrap_or("?"),
            s["addresses"],
            s["ports"],
            eps.len()
        );
        for e in eps.iter().take(20) {
            println!(
                "    {:<28} {:<8} pending {:<4} latency {:>8.2} ms  ejections {}",
                e["address"].as_str().unwrap_or("?"),
                e["state"].as_str().unwrap_or("?"),
                e["pending"],
                e["latency_ewma_ms"].as_f64().unwrap_or(0.0),
                e["ejections"]
            );
        }
    }
    let list = conns.as_array().cloned().unwrap_or_default();
    println!("open connections: {}", list.len());
    for c in list.iter().take(20) {
        println!(
            "  {} -> {}  {} {}  up {} B  down {} B  {:.1} s",
            c["client"].as_str().unwrap_or("?"),
            c["original_dst"].as_str().unwrap_or("?"),
            c["protocol"].as_str().unwrap_or("?"),
            c["path"].as_str().unwrap_or("?"),
            c["bytes_to_upstream"],
            c["bytes_to_client"],
            c["age_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    0
}

/// A minimal HTTP/1.1 GET to the admin API (loopback, tiny responses): status and body.
fn admin_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| std::io::Error::other(format!("{addr:?} is not ADDRESS:PORT")))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// `proxy top`: polls /debug/summary and redraws a table.
fn top(admin: &str, interval: f64, count: Option<u64>) -> u8 {
    if !(0.1..=3600.0).contains(&interval) {
        eprintln!("proxy: --interval {interval} is out of range 0.1..=3600 seconds");
        return 2;
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut prev: Option<(std::time::Instant, f64, f64)> = None;
    let mut prev_routes: HashMap<String, RoutePoll> = HashMap::new();
    let mut n = 0u64;
    loop {
        let summary = match admin_get(admin, "/debug/summary") {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
            Ok((code, _)) => {
                eprintln!("proxy: the admin API at {admin} answered {code} for /debug/summary");
                return exit::RUNTIME;
            }
            Err(e) => {
                eprintln!(
                    "proxy: cannot reach the admin API at {admin}: {e}; is the proxy running, and is --admin its admin.address?"
                );
                return exit::RUNTIME;
            }
        };
        let now = std::time::Instant::now();
        let bytes = summary["bytes_moved"].as_f64().unwrap_or(0.0);
        let opened = summary["connections_opened"].as_f64().unwrap_or(0.0);
        let (bps, cps) = match prev {
            Some((t, b, c)) => {
                let dt = now.duration_since(t).as_secs_f64().max(1e-6);
                ((bytes - b).max(0.0) / dt, (opened - c).max(0.0) / dt)
            }
            None => (0.0, 0.0),
        };
        if tty {
            // Clear the screen and go home: a redrawn table, like top(1).
            print!("\x1b[2J\x1b[H");
        }
        println!(
            "proxy at {admin}  {}  mode {}  sockmap {}",
            if summary["ready"].as_bool().unwrap_or(false) {
                "ready"
            } else {
                "NOT READY"
            },
            summary["mode"],
            summary["sockmap"]
        );
        let share = summary["short_circuit_byte_share"]
            .as_f64()
            .map(|s| format!("{:.1}%", s * 100.0))
            .unwrap_or_else(|| "n/a".into());
        println!(
            "connections: {} open, {} opened ({cps:.1}/s), {} failed   bytes: {} ({}/s)   short-circuit share: {share}",
            summary["connections_active"],
            opened,
            summary["connections_failed"],
            human_bytes(bytes),
            human_bytes(bps)
        );
        let routes = summary["routes"]["services"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let bounds: Vec<f64> = summary["routes"]["bucket_bounds"]
            .as_array()
            .map(|b| b.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        println!(
            "{:<36} {:>10} {:>9} {:>10} {:>10}",
            "ROUTE (workload -> service)", "REQ/S", "SUCCESS", "P50", "P99"
        );
        let mut next_routes = HashMap::new();
        for r in &routes {
            let name = format!(
                "{} -> {}",
                r["source"].as_str().unwrap_or("?"),
                r["service"].as_str().unwrap_or("?")
            );
            let cur = RoutePoll::from_json(r);
            let rate = match (&prev_routes.get(&name), prev) {
                (Some(p), Some(_)) => cur.delta(p),
                _ => cur.clone(),
            };
            let dt = prev
                .map(|(t, _, _)| now.duration_since(t).as_secs_f64().max(1e-6))
                .unwrap_or(1.0);
            let fmt_q = |q: f64| {
                rate.quantile(&bounds, q)
                    .map(|s| format!("{:.2} ms", s * 1000.0))
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "{:<36} {:>10.1} {:>9} {:>10} {:>10}",
                name,
                rate.requests as f64 / dt,
                if rate.requests > 0 {
                    format!(
                        "{:.1}%",
                        100.0 * (rate.requests - rate.failures.min(rate.requests)) as f64
                            / rate.requests as f64
                    )
                } else {
                    "-".into()
                },
                fmt_q(0.5),
                fmt_q(0.99)
            );
            next_routes.insert(name, cur);
        }
        prev_routes = next_routes;
        println!(
            "{:<40} {:>6} {:>12} {:>12}",
            "EDGE (workload -> destination)", "OPEN", "BYTES UP", "BYTES DOWN"
        );
        for e in summary["edges"].as_array().cloned().unwrap_or_default() {
            println!(
                "{:<40} {:>6} {:>12} {:>12}",
                format!(
                    "{} -> {}",
                    e["source"].as_str().unwrap_or("?"),
                    e["destination"].as_str().unwrap_or("?")
                ),
                e["connections"],
                human_bytes(e["bytes_to_upstream"].as_f64().unwrap_or(0.0)),
                human_bytes(e["bytes_to_client"].as_f64().unwrap_or(0.0))
            );
        }
        prev = Some((now, bytes, opened));
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return 0;
        }
        std::thread::sleep(Duration::from_secs_f64(interval));
    }
}

/// One service's cumulative request counts as /debug/summary reports them.
#[derive(Clone, Default)]
struct RoutePoll {
    requests: u64,
    failures: u64,
    buckets: Vec<u64>,
}

impl RoutePoll {
    fn from_json(v: &serde_json::Value) -> RoutePoll {
        RoutePoll {
            requests: v["requests"].as_u64().unwrap_or(0),
            failures: v["failures"].as_u64().unwrap_or(0),
            buckets: v["buckets"]
                .as_array()
                .map(|b| b.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
                .unwrap_or_default(),
        }
    }

    /// What happened since `earlier` (a reload that reset nothing still never goes
    /// negative: counters only grow, and a shorter list is padded with zeros).
    fn delta(&self, earlier: &RoutePoll) -> RoutePoll {
        RoutePoll {
            requests: self.requests.saturating_sub(earlier.requests),
            failures: self.failures.saturating_sub(earlier.failures),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| b.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// The upper bound of the bucket holding quantile `q` (None without requests; the
    /// +Inf bucket reports the largest finite bound).
    fn quantile(&self, bounds: &[f64], q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= rank {
                return bounds.get(i).or(bounds.last()).copied();
            }
        }
        bounds.last().copied()
    }
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `proxy tap`: streams /debug/tap. HTTP/1.0 so the body is plain lines until close.
fn tap(admin: &str, src: Option<&str>, dst: Option<&str>, count: Option<u64>, json: bool) -> u8 {
    use std::io::{BufRead, BufReader, Write};
    let bad = |v: &str| {
        !v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".:[]".contains(c))
    };
    if src.is_some_and(bad) || dst.is_some_and(bad) {
        eprintln!(
            "proxy: --src/--dst take an address or part of one (digits, letters, '.', ':', '[', ']')"
        );
        return 2;
    }
    let Ok(addr) = admin.parse::<SocketAddr>() else {
        eprintln!("proxy: --admin {admin:?} is not ADDRESS:PORT");
        return 2;
    };
    let mut query = Vec::new();
    if let Some(s) = src {
        query.push(format!("src={s}"));
    }
    if let Some(d) = dst {
        query.push(format!("dst={d}"));
    }
    let mut stream = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("proxy: cannot reach the admin API at {admin}: {e}; is the proxy running?");
            return exit::RUNTIME;
        }
    };
    if write!(
        stream,
        "GET /debug/tap?{} HTTP/1.0\r\nHost: {admin}\r\n\r\n",
        query.join("&")
    )
    .is_err()
    {
        eprintln!("proxy: the admin API at {admin} closed the connection");
        return exit::RUNTIME;
    }
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    if reader.read_line(&mut status).is_err() || !status.contains(" 200 ") {
        eprintln!("proxy: the admin API refused the tap: {}", status.trim());
        return exit::RUNTIME;
    }
    // Skip the response head.
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && line.trim() != "" {
        line.clear();
    }
    let mut seen = 0u64;
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if json {
            println!("{line}");
        } else {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(lost) = v["lost"].as_u64() {
                println!("... {lost} events lost (this tap read too slowly)");
                continue;
            }
            if v["kind"] == "request" {
                let grpc = v["grpc_status"]
                    .as_u64()
                    .map(|g| format!(" grpc-status {g}"))
                    .unwrap_or_default();
                let err = v["proxy_error"]
                    .as_str()
                    .map(|e| format!(" proxy-error {e}"))
                    .unwrap_or_default();
                println!(
                    "{} -> {} ({} via {})  {} {} {}  {}{grpc}{err}  {:.2} ms",
                    v["client"].as_str().unwrap_or("?"),
                    v["service"].as_str().unwrap_or("?"),
                    v["original_dst"].as_str().unwrap_or("?"),
                    v["endpoint"].as_str().unwrap_or("-"),
                    v["protocol"].as_str().unwrap_or("?"),
                    v["method"].as_str().unwrap_or("?"),
                    v["path"].as_str().unwrap_or("?"),
                    v["status"],
                    v["latency_ms"].as_f64().unwrap_or(0.0)
                );
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
                continue;
            }
            println!(
                "{} -> {}  {}  {}  up {} B  down {} B  {:.2} ms",
                v["client"].as_str().unwrap_or("?"),
                v["original_dst"].as_str().unwrap_or("?"),
                v["outcome"].as_str().unwrap_or("?"),
                v["path"].as_str().unwrap_or("?"),
                v["bytes_to_upstream"],
                v["bytes_to_client"],
                v["duration_ms"].as_f64().unwrap_or(0.0)
            );
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    0
}
