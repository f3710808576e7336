//! `cargo xtask test`: the checks CI runs (`.ci/run` calls exactly this), cheapest first, so a
//! formatting slip fails in seconds instead of after the build.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{
    build,
    sh::{self, say},
};

/// Clients the end-to-end tests run inside the pods' namespaces (prometheus: promtool;
/// chromium: the dashboard test).
const TEST_PACKAGES: &[&str] = &[
    "curl",
    "socat",
    "python3",
    "prometheus",
    "chromium",
    // End-to-end HTTP tests: real clients (h2load, wrk), gRPC and WebSocket from Python.
    "nghttp2-client",
    "wrk",
    "python3-grpcio",
    "python3-websockets",
    // Two-node tests capture the link between the nodes and inspect the tunnel with openssl.
    "tcpdump",
    "openssl",
    // Short-circuit tests: iperf3 --bidir at several write sizes.
    "iperf3",
];

/// The steps in order, for a summary that also lists those a failure kept from running.
const STEPS: &[&str] = &["fmt", "build", "clippy", "tests", "bench --quick"];

/// Runs fmt, build, clippy and the tests; `extra` is appended to `cargo test --workspace`.
pub fn run(extra: &[String]) -> Result<()> {
    if !sh::is_root()? {
        bail!(
            "run as root: sudo -E env PATH=\"$PATH\" cargo xtask test \
             (the end-to-end tests create network namespaces and cgroups and load eBPF programs; \
             -E and PATH keep your rustup and cargo under sudo)"
        );
    }
    let started = Instant::now();
    let mut summary = Summary::default();
    let result = run_steps(&mut summary, extra);
    summary.print(started.elapsed());
    result
}

fn run_steps(summary: &mut Summary, extra: &[String]) -> Result<()> {
    let root = sh::workspace_root()?;

    summary.step("fmt", || {
        build::ensure_rustup_component(None, "rustfmt")?;
        sh::run(
            sh::host_cargo()?
                .args(["fmt", "--all", "--", "--check"])
                .current_dir(&root),
        )
        .context("formatting differs from rustfmt's: run `cargo fmt --all`")?;
        // The kernel crate is its own workspace, so `--all` above does not reach it.
        sh::run(
            sh::clean_toolchain_command("cargo")?
                .args(["fmt", "--", "--check"])
                .current_dir(root.join("proxy-ebpf")),
        )
        .context("formatting of proxy-ebpf differs: run `cargo fmt` in proxy-ebpf/")
    })?;

    let built = summary.step("build", || {
        build::ensure_packages(TEST_PACKAGES)?;
        // Kubernetes tests: kubernetes-validate and helm (seconds), and a real
        // kube-apiserver built from Debian's sources (about 8 minutes once, then cached
        // under ~/.cache/ebpf-mesh). Both scripts are idempotent.
        for script in [
            "deploy/install-k8s-tools.sh",
            "deploy/install-kube-apiserver.sh",
        ] {
            sh::run(std::process::Command::new("bash").arg(root.join(script)))
                .with_context(|| format!("{script} failed; run it by hand to see why"))?;
        }
        build::ensure_built(false)
    })?;

    // Same PROXY_EBPF_OBJECT as the build: the proxy's build script reruns when it changes,
    // so a different value would rebuild the proxy at every step.
    summary.step("clippy", || {
        build::ensure_rustup_component(None, "clippy")?;
        sh::run(
            sh::host_cargo()?
                .args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])
                .env("PROXY_EBPF_OBJECT", &built.ebpf_object)
                .current_dir(&root),
        )
        .context(
            "clippy found problems: fix them (`cargo clippy --fix --workspace --all-targets` \
             does some), then rerun",
        )?;
        // The kernel crate, with its own (nightly) toolchain.
        sh::run(
            sh::clean_toolchain_command("cargo")?
                .args(["clippy", "--release", "--", "-D", "warnings"])
                .current_dir(root.join("proxy-ebpf")),
        )
        .context("clippy found problems in proxy-ebpf: run `cargo clippy --release` in proxy-ebpf/")
    })?;

    summary.step("tests", || {
        sh::run(
            sh::host_cargo()?
                .args(["test", "--workspace"])
                .args(extra)
                .env("PROXY_EBPF_OBJECT", &built.ebpf_object)
                .current_dir(&root),
        )
        .context(
            "tests failed: see the failures above; rerun a subset with \
             `cargo xtask test -- NAME_FILTER`",
        )
    })?;

    // The bench's own smoke test: every scenario once with tiny counts, then the files it
    // wrote must parse and hold a number for every scenario and workload. Skipped when the
    // caller filtered the tests (a subset run is not the full suite).
    if extra.is_empty() {
        summary.step("bench --quick", || {
            let dir = crate::bench::run(crate::bench::Options {
                quick: true,
                reps: 1,
                tcp_congestion: None,
                streams_only: false,
                sockmap_args: Vec::new(),
                scenarios: Vec::new(),
                cpu_per_pod: false,
                stream_sizes: Vec::new(),
                stream_connections: Vec::new(),
                stream_seconds: None,
            })?;
            crate::bench::validate(&dir)
        })?;
    }
    Ok(())
}

/// How each step went, printed as one line at the end whatever happened.
#[derive(Default)]
struct Summary {
    done: Vec<(&'static str, Duration, bool)>,
}

impl Summary {
    fn step<T>(&mut self, name: &'static str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        say(format_args!("=== {name} ==="));
        let started = Instant::now();
        let result = step();
        self.done.push((name, started.elapsed(), result.is_ok()));
        result
    }

    fn print(&self, total: Duration) {
        let passed = self.done.len() == STEPS.len() && self.done.iter().all(|(_, _, ok)| *ok);
        let mut parts: Vec<String> = self
            .done
            .iter()
            .map(|(name, duration, ok)| {
                let verdict = if *ok { "ok" } else { "FAILED" };
                format!("{name} {verdict} ({})", sh::human_duration(*duration))
            })
            .collect();
        parts.extend(
            STEPS
                .iter()
                .skip(self.done.len())
                .map(|name| format!("{name} not run")),
        );
        say(format_args!(
            "test summary: {} in {}: {}",
            if passed { "PASSED" } else { "FAILED" },
            sh::human_duration(total),
            parts.join(", ")
        ));
    }
}
