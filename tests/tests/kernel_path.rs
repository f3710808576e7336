//! The kernel-only path (issue 9): an authorized same-node opaque TCP connection goes from
//! workload to workload in the kernel once the proxy has relayed what reached it. Through the
//! real proxy with the short-circuit and the kernel-only path on (the harness default), between
//! declared workloads of one node: every byte at every size, close and reset passed on both
//! ways, authorization keeping denied connections off it (also after a reload), and the bytes
//! in the metrics although the proxy never copied them.

use std::{fs, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use tests::{
    Background, Binaries, Node, Pod, ProxyOptions, metric_sum, require_privileges, run_bounded,
};

const PORT: u16 = 8070;
const LIMIT: Duration = Duration::from_secs(300);
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py/close_reset.py");

macro_rules! require {
    () => {
        if !require_privileges()? {
            return Ok(());
        }
    };
}

/// A node with two declared workloads (client, server) and the proxy reading a config file.
struct Kp {
    node: Node,
    client: Pod,
    server: Pod,
    config: PathBuf,
}

impl Kp {
    /// `allow`: whether the policy lets the client reach the server.
    fn new(allow: bool) -> Result<Kp> {
        let mut node = Node::new(&Binaries::locate(std::path::Path::new(env!(
            "CARGO_BIN_EXE_meshtest"
        )))?)?;
        let client = node.add_pod("client")?;
        let server = node.add_pod("server")?;
        let config = node.scratch.join("mesh.toml");
        let kp = Kp {
            node,
            client,
            server,
            config,
        };
        kp.write_config(allow)?;
        Ok(kp)
    }

    fn start(&mut self) -> Result<()> {
        self.start_with(&[])
    }

    /// `start` with more proxy flags.
    fn start_with(&mut self, extra: &[&str]) -> Result<()> {
        let mut extra_args = vec!["--config".into(), self.config.display().to_string()];
        extra_args.extend(extra.iter().map(|a| a.to_string()));
        let opts = ProxyOptions {
            extra_args,
            ..ProxyOptions::default()
        };
        self.node.start_proxy(&opts)
    }

    /// Default deny; the server's policy allows the client's identity, or only another one.
    fn write_config(&self, allow: bool) -> Result<()> {
        let rel = &self.node.workload_cgroup_rel;
        let allowed = if allow { "client" } else { "someone-else" };
        let text = format!(
            r#"[authorization]
default = "deny-all"

[[workload]]
name = "client"
namespace = "kp"
cgroups = ["{rel}/client"]

[[workload]]
name = "server"
namespace = "kp"
addresses = ["{server_ip}", "{server_ip6}"]
cgroups = ["{rel}/server"]

[[policy]]
name = "server-from-{allowed}"
workload = "server"
namespace = "kp"
allow = ["spiffe://cluster.local/ns/kp/sa/{allowed}"]
"#,
            server_ip = self.server.ipv4,
            server_ip6 = self.server.ipv6,
        );
        // Write then rename: the proxy never reads a half-written file.
        let tmp = self.config.with_extension("tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    fn counter(&self, name: &str) -> Result<u64> {
        self.node.counter(name)
    }

    fn serve(&self, program: &str, args: &[&str], ready: &str, name: &str) -> Result<Background> {
        let mut cmd = self.server.command(program);
        cmd.args(args);
        let mut bg = Background::spawn(cmd, self.node.scratch.join(format!("{name}.out")))?;
        bg.wait_for(ready)?;
        Ok(bg)
    }

    /// `target`: the server's address and port as meshtest takes it.
    fn meshtest_client(&self, target: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.client.command(&self.node.bins.meshtest);
        cmd.args(args).args(["--connect", target]);
        self.node.client_ok(run_bounded(cmd, LIMIT)?)
    }

    /// The script's client side in the client pod.
    fn script_command(&self, mode: &str) -> std::process::Command {
        let mut cmd = self.client.command("/usr/bin/python3");
        cmd.args([
            SCRIPT,
            "connect",
            &self.server.ipv4.to_string(),
            &PORT.to_string(),
            mode,
        ]);
        cmd
    }

    /// Runs the script's client side; returns its result line.
    fn script_client(&self, mode: &str) -> Result<String> {
        let out = run_bounded(self.script_command(mode), Duration::from_secs(60))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(
            out.status.success(),
            "client {mode}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    }

    fn script_server(&self, mode: &str, name: &str) -> Result<Background> {
        self.serve(
            "/usr/bin/python3",
            &[SCRIPT, "serve", &PORT.to_string(), mode],
            "listening",
            name,
        )
    }
}

/// Waits (bounded) for a background process to print a result line other than "listening".
fn result_line(bg: &Background) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = bg.output();
        if let Some(l) = out.lines().find(|l| !l.starts_with("listening")) {
            return Ok(l.trim().to_string());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no result within 30 s: {out}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_size_arrives_intact_on_the_kernel_path_and_the_metrics_count_it() -> Result<()> {
    require!();
    let mut kp = Kp::new(true)?;
    // rr is a blocking program (recv with MSG_WAITALL, no half-close, which is safe on the
    // short-circuit); blocking sockets stay off it unless allowed.
    kp.start_with(&["--sockmap-blocking-sockets", "on"])?;
    let _server = kp.serve(
        &kp.node.bins.meshtest.display().to_string(),
        &["rr-serve", "--listen", &format!("[::]:{PORT}")],
        "listening",
        "rr-serve",
    )?;
    let started = kp.counter("splice_started")?;
    // (request size, requests per connection): about 10-40 MB each way per size.
    let sizes: [(u64, u64); 5] = [
        (64, 2000),
        (1024, 2000),
        (16 * 1024, 500),
        (64 * 1024, 150),
        (1024 * 1024, 10),
    ];
    let connections = 4u64;
    let mut payload = 0u64;
    // Both families: the kernel keys IPv6 sockets (and v4-mapped ones) its own way.
    let targets = [
        format!("{}:{PORT}", kp.server.ipv4),
        format!("[{}]:{PORT}", kp.server.ipv6),
    ];
    for ((size, requests), target) in sizes
        .iter()
        .flat_map(|s| targets.iter().map(move |t| (*s, t)))
    {
        let out = kp
            .meshtest_client(
                target,
                &[
                    "rr",
                    "--connections",
                    &connections.to_string(),
                    "--concurrency",
                    &connections.to_string(),
                    "--requests",
                    &requests.to_string(),
                    "--size",
                    &size.to_string(),
                ],
            )
            .with_context(|| format!("{size}-byte requests to {target}"))?;
        ensure!(
            out.contains("\"mismatches\":0"),
            "{size} B to {target}: {out}"
        );
        // Each frame is a 4-byte length and the payload, echoed back.
        payload += 2 * connections * requests * (size + 4);
    }
    // Full duplex, both sides writing at once in pieces up to 64 KiB, then half-close.
    let _order = kp.serve(
        &kp.node.bins.meshtest.display().to_string(),
        &[
            "order-serve",
            "--listen",
            &format!("[::]:{}", PORT + 1),
            "--bytes",
            "4194304",
            "--io",
            "poll",
        ],
        "listening",
        "order-serve",
    )?;
    let mut cmd = kp.client.command(&kp.node.bins.meshtest);
    cmd.args([
        "order",
        "--connections",
        "8",
        "--concurrency",
        "4",
        "--bytes",
        "4194304",
        "--max-write",
        "65536",
        "--io",
        "poll",
        "--connect",
        &format!("{}:{}", kp.server.ipv4, PORT + 1),
    ]);
    let out = kp.node.client_ok(run_bounded(cmd, LIMIT)?)?;
    ensure!(out.contains("\"mismatches\":0"), "order: {out}");

    let switched = kp.counter("splice_started")? - started;
    let direct = kp.counter("msg_direct_bytes")?;
    eprintln!(
        "kernel-only path: {direct} of {payload} request/response bytes, {switched} switches"
    );
    ensure!(
        switched >= 2,
        "no direction switched to the kernel-only path ({switched})"
    );
    // The proxy relays only what reached it before a direction switched.
    ensure!(
        direct * 2 >= payload,
        "only {direct} of {payload} request/response bytes went workload to workload"
    );
    // The proxy never copied those bytes, yet counts them, and says which connections.
    let metrics = kp.node.admin_metrics()?;
    let kernel_only = metric_sum(
        &metrics,
        "mesh_ebpf_msg_bytes_total",
        &["path=\"kernel_only\""],
    );
    ensure!(
        kernel_only as u64 == direct,
        "kernel-only bytes in the metrics {kernel_only}, counters {direct}"
    );
    let transferred = metric_sum(&metrics, "mesh_tcp_transferred_bytes_total", &[]);
    ensure!(
        transferred as u64 >= payload,
        "the proxy accounts {transferred} bytes for {payload} sent"
    );
    let spliced = metric_sum(&metrics, "mesh_tcp_kernel_path_connections_total", &[]);
    ensure!(
        spliced >= 20.0,
        "{spliced} connections counted on the kernel-only path"
    );
    Ok(())
}

#[test]
fn close_and_reset_pass_through_in_both_directions() -> Result<()> {
    require!();
    let mut kp = Kp::new(true)?;
    kp.start()?;
    let started = kp.counter("splice_started")?;

    // The client sends and half-closes: the server reads everything, then end of stream;
    // its reply and its close come back the same way.
    let server = kp.script_server("read", "close")?;
    let client = kp.script_client("close")?;
    ensure!(
        result_line(&server)? == "eof 65536",
        "server: {}",
        server.output()
    );
    ensure!(client == "eof 1000", "client: {client}");
    drop(server);

    // The client resets: the server sees a reset, not a clean end.
    let server = kp.script_server("read", "client-reset")?;
    ensure!(kp.script_client("reset")? == "sent");
    let line = result_line(&server)?;
    ensure!(
        line.starts_with("reset "),
        "server after a client reset: {line}"
    );
    drop(server);

    // The server resets: the client sees a reset, not a clean end.
    let server = kp.script_server("abort", "server-reset")?;
    let client = kp.script_client("wait")?;
    ensure!(
        result_line(&server)? == "aborted",
        "server: {}",
        server.output()
    );
    ensure!(
        client.starts_with("reset "),
        "client after a server reset: {client}"
    );

    ensure!(
        kp.counter("splice_started")? > started,
        "nothing took the kernel-only path: the test would not show its close and reset"
    );
    Ok(())
}

#[test]
fn authorization_keeps_denied_connections_off_and_a_reload_takes_them_back() -> Result<()> {
    require!();
    // Denied from the start: the connection is refused, nothing reaches the server, and no
    // direction ever switches to the kernel-only path.
    let mut kp = Kp::new(false)?;
    kp.start()?;
    let server = kp.script_server("echo", "denied")?;
    let started = kp.counter("splice_started")?;
    let direct = kp.counter("msg_direct_bytes")?;
    let line = kp.script_client("ticks")?;
    ensure!(
        line.starts_with("reset 0") || line.starts_with("eof 0"),
        "a denied client got through: {line}"
    );
    ensure!(kp.counter("splice_started")? == started);
    ensure!(kp.counter("msg_direct_bytes")? == direct);
    drop(server);

    // Allowed: a long-lived connection takes the kernel-only path; a reload that denies it
    // takes it back and ends it, as the proxy would refuse it now.
    kp.write_config(true)?;
    kp.node.wait_for_log("config reloaded", 1)?;
    let server = kp.script_server("echo", "allowed")?;
    let client = Background::spawn(
        kp.script_command("ticks"),
        kp.node.scratch.join("ticks.out"),
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kp.counter("splice_started")? < started + 2 {
        ensure!(
            std::time::Instant::now() < deadline,
            "the allowed connection never took the kernel-only path; proxy warnings:\n{}",
            kp.node.proxy_warnings()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    kp.write_config(false)?;
    kp.node.wait_for_log("config reloaded", 2)?;
    let line = result_line(&client)?;
    ensure!(
        line.starts_with("reset ") || line.starts_with("eof "),
        "the connection outlived the reload that denied it: {line}"
    );
    ensure!(
        kp.node
            .proxy_log_text()
            .contains("a reload denies this kernel-path connection"),
        "the proxy did not say why it ended the connection"
    );
    drop(server);
    Ok(())
}

/// A one-way stream never takes the kernel-only path (with the stream rule on, the default,
/// the path opens only after a turn: both directions carried bytes) and leaves the SOCKHASH
/// whole like any per-hop stream: direct small writes are what the kernel-only path does
/// worst. Uploads of 32 MiB in writes up to 1 KiB, the server's one-byte verdict after the
/// client's half-close: every byte verified, directions asked to leave as streams, and not
/// one direction switched to the kernel-only path (the only turn comes with the server's
/// last write, after which nothing is left to switch). Every proxy socket leaves with its
/// workload, also the one facing the client, which no write of the proxy's reaches before
/// the upload ends: the release sweep lets it go (`mesh_release`, iter/tcp).
#[test]
fn one_way_streams_stay_off_the_kernel_only_path_and_leave_the_sockhash_whole() -> Result<()> {
    require!();
    const CONNECTIONS: u64 = 8;
    const UPLOAD: u64 = 32 << 20;
    let mut kp = Kp::new(true)?;
    kp.start()?;
    let server = kp.serve(
        &kp.node.bins.meshtest.display().to_string(),
        &["serve", "--listen", &format!("[::]:{PORT}"), "--io", "poll"],
        "listening",
        "serve",
    )?;
    let (switched, streams) = (kp.counter("splice_started")?, kp.counter("detach_stream")?);
    let out = kp.meshtest_client(
        &format!("{}:{PORT}", kp.server.ipv4),
        &[
            "client",
            "--connections",
            &CONNECTIONS.to_string(),
            "--send",
            &UPLOAD.to_string(),
            "--reply",
            "0",
            "--max-write",
            "1024",
            "--io",
            "poll",
        ],
    )?;
    ensure!(out.contains("\"ok\":true"), "client: {out}");
    let verified = format!("received={UPLOAD} verified=true");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (server.output().lines())
        .filter(|l| l.contains(&verified))
        .count()
        < CONNECTIONS as usize
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "the server did not verify every upload: {}",
            server.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let switched = kp.counter("splice_started")? - switched;
    let streams = kp.counter("detach_stream")? - streams;
    let metrics = kp.node.admin_metrics()?;
    let sum = |name| metric_sum(&metrics, name, &[]);
    let detached = sum("mesh_tcp_short_circuit_detached_sockets_total");
    let detached_proxy = sum("mesh_tcp_short_circuit_detached_proxy_sockets_total");
    eprintln!(
        "{streams} stream directions asked to leave; {detached} workload and {detached_proxy} proxy sockets left the SOCKHASH; {switched} kernel-only path switches"
    );
    ensure!(
        switched == 0,
        "{switched} directions of one-way streams switched to the kernel-only path"
    );
    ensure!(streams > 0, "no direction was taken for a stream");
    ensure!(
        detached >= 2.0 && detached_proxy >= 2.0,
        "{detached} workload and {detached_proxy} proxy sockets left the SOCKHASH: no connection left it whole"
    );
    ensure!(
        detached_proxy == detached,
        "{detached} workload but {detached_proxy} proxy sockets left the SOCKHASH: a proxy socket facing a client that only sends stayed"
    );
    // How long leaving took, per connection that left whole (two workload sockets each).
    let started = sum("mesh_tcp_short_circuit_leave_start_seconds_count");
    let moved = sum("mesh_tcp_short_circuit_leave_move_seconds_count");
    eprintln!(
        "leave times: {started} connections started leaving (mean {:.1} ms in), {moved} moved whole (mean {:.1} ms)",
        sum("mesh_tcp_short_circuit_leave_start_seconds_sum") * 1000.0 / started.max(1.0),
        sum("mesh_tcp_short_circuit_leave_move_seconds_sum") * 1000.0 / moved.max(1.0),
    );
    ensure!(
        moved * 2.0 == detached && started >= moved,
        "{started} leave starts and {moved} whole moves recorded for {detached} workload sockets out"
    );
    // Each socket's time out, recorded once per socket that got out.
    let mut out = Vec::new();
    for socket in ["client", "client_proxy", "server", "server_proxy"] {
        let label = format!("socket=\"{socket}\"");
        let per = |suffix: &str| {
            metric_sum(
                &metrics,
                &format!("mesh_tcp_short_circuit_leave_socket_seconds_{suffix}"),
                &[label.as_str()],
            )
        };
        let n = per("count");
        out.push((socket, n, per("sum") * 1000.0 / n.max(1.0)));
    }
    eprintln!("sockets out after leaving began (count, mean ms): {out:?}");
    let count = |i: usize| out[i].1;
    ensure!(
        count(0) + count(2) == detached && count(1) + count(3) == detached_proxy,
        "per-socket leave times recorded {out:?} for {detached} workload and {detached_proxy} proxy sockets out"
    );
    Ok(())
}
