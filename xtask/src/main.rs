//! Developer tasks for the workspace, run as `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! Plain cargo builds and tests the host crates without any of this; xtask adds what plain cargo
//! cannot do: install the eBPF toolchain (nightly rust-src, bpf-linker built against the
//! nightly's LLVM, Debian tools), build the kernel crate in its own workspace, and run the
//! privileged end-to-end tests with the same checks as CI (`.ci/run`).
#![forbid(unsafe_code)]

mod bench;
mod build;
mod clean;
mod demo;
mod sh;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks: build, test, demo, clean, bench",
    long_about = "Developer tasks for the eBPF node proxy.\n\n\
        Every command installs what it is missing first (Debian packages, the nightly's rust-src, \
        bpf-linker) and skips what is already there, so running one twice is cheap. Installing \
        system packages and mounting bpffs need root; as another user those steps are reported \
        with the command to run instead."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what is missing, build the kernel programs and the host workspace.
    #[command(
        long_about = "Install what is missing, then build the kernel programs and the host workspace.\n\n\
        Installs, only when missing: the Debian packages bpftool iproute2 iptables util-linux curl \
        socat procps kmod (root only); rust-src for the nightly toolchain; bpf-linker 0.13.0 built \
        against the nightly's own LLVM (about 2 minutes, once). Mounts bpffs at /sys/fs/bpf if it \
        is not mounted (root only).\n\n\
        Then builds proxy-ebpf (nightly, bpfel-unknown-none, always release: that is the object the \
        proxy embeds) and `cargo build --workspace` with PROXY_EBPF_OBJECT pointing at the \
        object, so the proxy binary embeds it."
    )]
    Build {
        /// Build the host workspace with the release profile (the kernel object is always release).
        #[arg(long)]
        release: bool,
    },

    /// Check formatting and lints, build, then run every test (needs root).
    #[command(
        long_about = "Check formatting and lints, build, then run every test.\n\n\
        Steps, stopping at the first failure: `cargo fmt --all -- --check`; the installs and \
        builds of `cargo xtask build` (plus python3, curl and socat, which the end-to-end tests \
        use as clients); `cargo clippy --workspace --all-targets -- -D warnings`; \
        `cargo test --workspace`. Ends with a one-line summary and a non-zero exit code if \
        anything failed.\n\n\
        Must run as root: the end-to-end tests create network namespaces and cgroups and load \
        eBPF programs. Use `sudo -E env PATH=\"$PATH\" cargo xtask test`.\n\n\
        RUST_TEST_THREADS and the other test variables are passed through untouched."
    )]
    Test {
        /// Extra arguments appended to `cargo test --workspace`, after `--`.
        /// Examples: `cargo xtask test -- redirect` (filter by name),
        /// `cargo xtask test -- -- --nocapture` (arguments for the test binaries).
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        args: Vec<String>,
    },

    /// Build, then run a small mesh on this machine and show traffic going through the proxy.
    #[command(
        long_about = "Build, then run a small mesh on this machine and show traffic \
        going through the proxy: pods as network namespaces and cgroups, the real proxy binary, \
        real clients. Needs root. With --two-nodes: two nodes joined by a link, a CA and an \
        issuer, and a pod on node 0 calling a service on node 1 over mutual TLS."
    )]
    Demo {
        /// Two nodes with mutual TLS between their proxies instead of one node.
        #[arg(long)]
        two_nodes: bool,
    },

    /// Remove what the demo and the tests leave behind: namespaces, cgroups, pinned maps.
    #[command(
        long_about = "Remove what the demo and the tests leave behind if they were \
        interrupted: network namespaces, cgroups, programs and maps pinned under /sys/fs/bpf. \
        Needs root. Does not touch build outputs (use `cargo clean`)."
    )]
    Clean,

    /// Measure every scenario side by side: direct, the proxy (eBPF, eBPF + short-circuit,
    /// iptables), HAProxy and nginx.
    #[command(
        long_about = "Measure every scenario side by side in one run on the same pods: direct \
        (no proxy), the proxy with eBPF interception (short-circuit off and on) and with iptables \
        interception, and HAProxy and nginx as TCP and HTTP proxies. Workloads: 1 B and 1 KiB \
        ping-pong latency (pinned, split across CPUs, unpinned), stream throughput by write size and \
        concurrency, connection rate, HTTP/1.1 (wrk) and HTTP/2 (h2load) request rates, CPU \
        per GiB and per 10k requests, RSS. Prints a table of medians with ratios to direct and \
        writes target/bench/<time>/{results.json,results.csv,summary.md,*.svg}. Needs root. \
        Never asserts targets: it reports."
    )]
    Bench {
        /// Every scenario once with tiny counts (a smoke test of the bench; debug build).
        #[arg(long)]
        quick: bool,
        /// Repetitions per figure (median, min and max are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// TCP congestion control in the bench's network namespaces (node and pods), e.g.
        /// cubic or bbr; by default what new namespaces inherit from the host
        /// (net.ipv4.tcp_congestion_control). Recorded in the results either way: figures at
        /// many concurrent streams depend on it (README, "Benchmarks").
        #[arg(long, value_name = "NAME")]
        tcp_congestion: Option<String>,
        /// Only the interleaved stream comparison of direct TCP, TCP through the proxy and
        /// the short-circuit scenarios (every size and connection count; a few minutes),
        /// for tuning the short-circuit's stream policy.
        #[arg(long)]
        streams_only: bool,
        /// An extra argument for the proxies of the short-circuit scenarios (repeatable),
        /// e.g. --sockmap-arg=--sockmap-small-streak=16 to measure a policy setting.
        #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
        sockmap_arg: Vec<String>,
        /// Only these scenarios (repeatable; direct, ebpf, ebpf+sockmap, ebpf+kernel,
        /// ebpf+naive, haproxy, nginx, iptables); by default all of them.
        #[arg(long, value_name = "NAME")]
        scenario: Vec<String>,
        /// Give each pod and the proxies a CPU group of their own with equal weight (the
        /// cgroup v1 cpu controller), as a node's kubelet does, instead of this machine's
        /// default of sharing the CPUs per thread, where 100 connections' load threads leave
        /// a proxy of a few threads a few per cent of the CPU. Recorded in the results.
        #[arg(long)]
        cpu_per_pod: bool,
        /// Only this stream write size in bytes (repeatable; 64, 1024, 16384, 65536 and
        /// 1048576 by default), e.g. to study one size of `--streams-only` at length.
        #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..=16 << 20))]
        stream_size: Vec<u64>,
        /// Only this number of concurrent stream connections (repeatable; 1, 10 and 100 by
        /// default).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
        stream_connections: Vec<u64>,
        /// Seconds each stream run lasts (2 by default, 0.2 with --quick). Longer runs
        /// weigh what a connection does once settled more than how it starts.
        #[arg(long, value_name = "SECONDS")]
        stream_seconds: Option<f64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build { release } => build::ensure_built(release).map(|_| ()),
        Command::Test { args } => test::run(&args),
        Command::Demo { two_nodes } => {
            if two_nodes {
                demo::run_two_nodes()
            } else {
                demo::run()
            }
        }
        Command::Clean => clean::run(),
        Command::Bench {
            quick,
            reps,
            tcp_congestion,
            streams_only,
            sockmap_arg,
            scenario,
            cpu_per_pod,
            stream_size,
            stream_connections,
            stream_seconds,
        } => bench::run(bench::Options {
            stream_sizes: stream_size,
            stream_connections,
            stream_seconds,
            scenarios: scenario,
            cpu_per_pod,
            quick,
            reps,
            tcp_congestion,
            streams_only,
            sockmap_args: sockmap_arg,
        })
        .map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_args_after_double_dash_pass_through() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "redirect", "--", "--nocapture"])?;
        match cli.command {
            Command::Test { args } => assert_eq!(args, ["redirect", "--", "--nocapture"]),
            other => anyhow::bail!("parsed as {other:?}"),
        }
        Ok(())
    }
}
