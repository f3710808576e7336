//! End-to-end tests of services: a workload calls a service's virtual address and the node
//! proxy detects the protocol, balances per request, retries, times out and ejects, with
//! real clients (curl, h2load, wrk, a Python gRPC client, a Python WebSocket client).
//!
//! Each test builds its own node: a client pod, backend pods running `meshhttp` (HTTP/1.1 +
//! h2c, WebSocket echo, banners) or the Python gRPC server, and the proxy started with a
//! config file that declares the services.

use std::{
    collections::HashMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use tests::{
    Background, Binaries, Node, Pod, ProxyOptions, metric_sum, require_privileges, run_bounded,
};

const BACKEND_PORT: u16 = 8080;
const GRPC_PORT: u16 = 50051;
const BANNER_PORT: u16 = 3306;
/// The web service's virtual addresses (nothing listens there: connects are intercepted).
const WEB_VIP: &str = "10.96.0.10";
const WEB_VIP6: &str = "fd00:96::10";
const GRPC_VIP: &str = "10.96.0.11";
const DB_VIP: &str = "10.96.0.12";
const LIMIT: Duration = Duration::from_secs(120);
const PYTHON: &str = "/usr/bin/python3";

fn bins() -> Result<Binaries> {
    Binaries::locate(Path::new(env!("CARGO_BIN_EXE_meshtest")))
}

fn meshhttp() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshhttp"))
}

fn py(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(script)
}

macro_rules! require {
    () => {
        if !require_privileges()? {
            return Ok(());
        }
    };
}

/// Fails loudly (under CI=true, where every tool is installed by `cargo xtask test`) or
/// explains what to install.
fn require_tool(tool: &str) -> Result<()> {
    if tests::which(tool).is_none() {
        bail!(
            "{tool} is not installed; `cargo xtask test` installs it (apt-get install the package that provides {tool})"
        );
    }
    Ok(())
}

/// A node with a client pod and `backends` backend pods, each running `meshhttp serve` on
/// port 8080 (backend i is named b<i>), and the proxy started with `config`.
struct Mesh {
    node: Node,
    client: Pod,
    backends: Vec<Pod>,
    servers: HashMap<String, Background>,
    config: PathBuf,
}

impl Mesh {
    fn new(backends: usize) -> Result<Mesh> {
        let mut node = Node::new(&bins()?)?;
        let client = node.add_pod("client")?;
        let mut pods = Vec::new();
        for i in 1..=backends {
            pods.push(node.add_pod(&format!("b{i}"))?);
        }
        let config = node.scratch.join("proxy.toml");
        Ok(Mesh {
            node,
            client,
            backends: pods,
            servers: HashMap::new(),
            config,
        })
    }

    /// Starts `meshhttp serve` in backend `i` (1-based) with extra args.
    fn serve_http(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let pod = self.backends.get(i - 1).context("no such backend")?;
        let name = format!("b{i}");
        let mut cmd = pod.command(meshhttp());
        cmd.args([
            "serve",
            "--listen",
            &format!("[::]:{BACKEND_PORT}"),
            "--name",
            &name,
        ])
        .args(extra);
        let mut bg = Background::spawn(cmd, self.node.scratch.join(format!("{name}.out")))?;
        bg.wait_for("ready")?;
        self.servers.insert(name, bg);
        Ok(())
    }

    fn stop_server(&mut self, name: &str) {
        self.servers.remove(name);
    }

    fn write_config(&self, text: &str) -> Result<()> {
        // Write then rename: the proxy never reads a half-written file.
        let tmp = self.config.with_extension("tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    fn start_proxy(&mut self, sockmap: bool) -> Result<()> {
        let opts = ProxyOptions {
            sockmap,
            extra_args: vec!["--config".into(), self.config.display().to_string()],
            ..ProxyOptions::default()
        };
        self.node.start_proxy(&opts)
    }

    fn ip(&self, i: usize) -> Ipv4Addr {
        self.backends[i - 1].ipv4
    }

    /// Endpoint list of backends `which` for a config file.
    fn endpoints(&self, which: &[usize], port: u16) -> String {
        let eps: Vec<String> = which
            .iter()
            .map(|i| format!("{{ address = \"{}\", port = {port} }}", self.ip(*i)))
            .collect();
        format!("[{}]", eps.join(", "))
    }

    /// Runs a command in the client pod (intercepted), bounded.
    fn client(&self, program: &str, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = self.client.command(program);
        cmd.args(args);
        run_bounded(cmd, LIMIT)
    }

    /// `/stats` request count of backend `i`, asked directly from the node namespace (not
    /// intercepted: the node is outside the workload cgroups).
    fn served(&self, i: usize) -> Result<u64> {
        let mut cmd = self.node.node_command("curl");
        cmd.args([
            "-s",
            "--max-time",
            "10",
            &format!("http://{}:{BACKEND_PORT}/stats", self.ip(i)),
        ]);
        let out = run_bounded(cmd, Duration::from_secs(20))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let n = text
            .split("\"requests\":")
            .nth(1)
            .and_then(|r| {
                r.trim()
                    .trim_end_matches('}')
                    .trim()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .map(str::to_owned)
            })
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad /stats from b{i}: {text}"))?;
        Ok(n)
    }

    fn metrics(&self) -> Result<String> {
        let mut cmd = self.node.node_command("curl");
        cmd.args(["-s", "http://127.0.0.1:15020/metrics"]);
        let out = run_bounded(cmd, Duration::from_secs(20))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn web_service(m: &Mesh, which: &[usize], extra: &str) -> String {
    format!(
        r#"
[[service]]
name = "web"
addresses = ["{WEB_VIP}", "{WEB_VIP6}"]
ports = [80]
protocol = "auto"
endpoints = {eps}
{extra}
"#,
        eps = m.endpoints(which, BACKEND_PORT)
    )
}

/// curl arguments for `n` requests to `url`, each printing its status code on a line.
/// (`-o` applies to one URL only, so it is repeated.)
fn curl_many(url: &str, n: usize) -> Vec<&str> {
    let mut args = vec!["-s", "-w", "%{http_code}\n", "--max-time", "20"];
    for _ in 0..n {
        args.extend(["-o", "/dev/null", url]);
    }
    args
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn all_output(o: &std::process::Output) -> String {
    format!(
        "status {}: {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// === HTTP/1.1 and HTTP/2 through a VIP ===

#[test]
fn curl_http1_and_http2_reach_a_service_vip_and_other_destinations_pass_through() -> Result<()> {
    require!();
    require_tool("curl")?;
    let mut m = Mesh::new(2)?;
    m.serve_http(1, &[])?;
    m.serve_http(2, &[])?;
    // The client pod is a declared workload: the kernel's record of its cgroup names it.
    m.write_config(&format!(
        "{}\n[[workload]]\nname = \"frontend\"\nnamespace = \"shop\"\ncgroups = [\"{}/client\"]\n",
        web_service(&m, &[1, 2], ""),
        m.node.workload_cgroup_rel
    ))?;
    m.start_proxy(false)?;

    // HTTP/1.1, IPv4 and IPv6 VIPs, keep-alive: several requests on one connection.
    let url = format!("http://{WEB_VIP}/");
    let o = m.client(
        "curl",
        &["-s", "-i", "--max-time", "20", &url, &url, &url, &url],
    )?;
    let text = stdout(&o);
    ensure!(o.status.success(), "{}", all_output(&o));
    ensure!(text.matches("HTTP/1.1 200").count() == 4, "{text}");
    ensure!(text.contains("x-backend: b"), "{text}");
    ensure!(!text.contains("x-mesh-proxy-error"), "{text}");
    let o = m.client(
        "curl",
        &[
            "-s",
            "-i",
            "--max-time",
            "20",
            &format!("http://[{WEB_VIP6}]/"),
        ],
    )?;
    ensure!(stdout(&o).contains("HTTP/1.1 200"), "{}", all_output(&o));

    // HTTP/2 with prior knowledge. One request per curl: curl 7.88 fails (exit 16) when it
    // reuses a prior-knowledge connection for a second URL, even against the backend
    // directly; h2load below exercises multiplexing.
    let o = m.client(
        "curl",
        &[
            "-s",
            "-i",
            "--http2-prior-knowledge",
            "--max-time",
            "20",
            &url,
        ],
    )?;
    let text = stdout(&o);
    ensure!(text.contains("HTTP/2 200"), "{}", all_output(&o));

    // Hop-by-hop headers stop at the proxy; the Host the client sent reaches the backend.
    let o = m.client(
        "curl",
        &[
            "-s",
            "--max-time",
            "20",
            "-H",
            "Connection: keep-alive, x-hop",
            "-H",
            "x-hop: secret",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "x-end-to-end: yes",
            &format!("http://{WEB_VIP}/headers"),
        ],
    )?;
    let text = stdout(&o);
    ensure!(text.contains("x-end-to-end: yes"), "{text}");
    ensure!(text.contains(&format!("host: {WEB_VIP}")), "{text}");
    ensure!(
        !text.contains("x-hop") && !text.contains("keep-alive:"),
        "hop-by-hop headers leaked: {text}"
    );

    // A large chunked upload streams through and back (curl -T - sends chunked with
    // Expect: 100-continue), byte for byte.
    let data: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
    let src = m.node.scratch.join("upload.bin");
    fs::write(&src, &data)?;
    let dst = m.node.scratch.join("echoed.bin");
    let o = m.client(
        "curl",
        &[
            "-s",
            "--max-time",
            "60",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &format!("@{}", src.display()),
            "-o",
            &dst.display().to_string(),
            &format!("http://{WEB_VIP}/echo"),
        ],
    )?;
    ensure!(o.status.success(), "{}", all_output(&o));
    ensure!(
        fs::read(&dst)? == data,
        "echoed body differs from the upload"
    );

    // A large download with Content-Length.
    let o = m.client(
        "curl",
        &[
            "-s",
            "--max-time",
            "60",
            "-o",
            &dst.display().to_string(),
            "-w",
            "%{size_download}",
            &format!("http://{WEB_VIP}/bytes/5000000"),
        ],
    )?;
    ensure!(stdout(&o).trim() == "5000000", "{}", all_output(&o));

    // Not a service: forwarded to the original destination unchanged.
    let o = m.client(
        "curl",
        &[
            "-s",
            "-i",
            "--max-time",
            "20",
            &format!("http://{}:{BACKEND_PORT}/", m.ip(2)),
        ],
    )?;
    ensure!(stdout(&o).contains("x-backend: b2"), "{}", all_output(&o));

    // The operator's view: status lists the service and its healthy endpoints, top has a
    // row for it, tap streams request metadata with the caller's identity.
    let mut cmd = m.node.node_command(&m.node.bins.proxy);
    cmd.arg("status");
    let o = run_bounded(cmd, Duration::from_secs(20))?;
    let text = stdout(&o);
    ensure!(
        text.contains("web") && text.contains("endpoints 2/2 healthy"),
        "{}",
        all_output(&o)
    );
    let mut cmd = m.node.node_command(&m.node.bins.proxy);
    cmd.args(["tap", "--json", "--count", "1"]);
    let tap = Background::spawn(cmd, m.node.scratch.join("tap.out"))?;
    let mut tapped = String::new();
    for _ in 0..50 {
        let o = m.client(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "20",
                &format!("http://{WEB_VIP}/tapped?x=1"),
            ],
        )?;
        ensure!(o.status.success(), "{}", all_output(&o));
        tapped = tap.output();
        if tapped.contains("\"kind\":\"request\"") {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    drop(tap);
    ensure!(
        tapped.contains("\"method\":\"GET\"")
            && tapped.contains("\"path\":\"/tapped\"")
            && tapped.contains("\"status\":200")
            && tapped.contains("\"service\":\"web\"")
            && tapped
                .contains("\"source_identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\""),
        "tap: {tapped}"
    );
    let mut cmd = m.node.node_command(&m.node.bins.proxy);
    cmd.args(["top", "--count", "1"]);
    let o = run_bounded(cmd, Duration::from_secs(20))?;
    let text = stdout(&o);
    ensure!(
        text.lines()
            .any(|l| l.starts_with("frontend -> web ") && l.contains('%')),
        "{}",
        all_output(&o)
    );

    let metrics = m.metrics()?;
    ensure!(
        metric_sum(
            &metrics,
            "mesh_http_requests_total",
            &[
                "service=\"web\"",
                "source_workload=\"frontend\"",
                "status_class=\"2xx\""
            ]
        ) >= 9.0
            && metric_sum(
                &metrics,
                "mesh_tcp_connections_opened_total",
                &["source_workload=\"frontend\"", "destination=\"web\""]
            ) >= 5.0
            && metric_sum(
                &metrics,
                "mesh_tcp_transferred_bytes_total",
                &[
                    "source_workload=\"frontend\"",
                    "destination=\"web\"",
                    "flow=\"to_upstream\""
                ]
            ) > 8_000_000.0,
        "request metrics: {metrics}"
    );
    ensure!(
        metric_sum(
            &metrics,
            "mesh_protocol_detections_total",
            &["result=\"http1\""]
        ) >= 1.0
            && metric_sum(
                &metrics,
                "mesh_protocol_detections_total",
                &["result=\"http2\""]
            ) >= 1.0,
        "detection metrics: {metrics}"
    );
    ensure!(
        metric_sum(
            &metrics,
            "mesh_http_request_duration_seconds_bucket",
            &["service=\"web\"", "le=\"0.001\""]
        ) >= 0.0,
        "latency histogram missing"
    );
    Ok(())
}

/// The service's protocol decides the upstream's: an HTTP/1.1 client reaches an `http2`
/// service over HTTP/2 (its Host becomes `:authority`), an HTTP/2 client reaches an `http1`
/// service over HTTP/1.1 (`:authority` becomes Host).
#[test]
fn clients_reach_upstreams_of_the_other_http_version_where_the_service_says_so() -> Result<()> {
    require!();
    let mut m = Mesh::new(1)?;
    m.serve_http(1, &[])?;
    m.write_config(&format!(
        r#"
[[service]]
name = "h2only"
addresses = ["10.96.0.30"]
ports = [80]
protocol = "http2"
endpoints = {eps}

[[service]]
name = "h1only"
addresses = ["10.96.0.31"]
ports = [80]
protocol = "http1"
endpoints = {eps}
"#,
        eps = m.endpoints(&[1], BACKEND_PORT)
    ))?;
    m.start_proxy(false)?;
    let o = m.client(
        "curl",
        &[
            "-s",
            "--http1.1",
            "--max-time",
            "20",
            "http://10.96.0.30/headers",
        ],
    )?;
    let text = stdout(&o);
    ensure!(
        text.contains(":version: HTTP/2.0") && text.contains(":authority: 10.96.0.30"),
        "{}",
        all_output(&o)
    );
    let o = m.client(
        "curl",
        &[
            "-s",
            "--http2-prior-knowledge",
            "--max-time",
            "20",
            "http://10.96.0.31/headers",
        ],
    )?;
    let text = stdout(&o);
    ensure!(
        text.contains(":version: HTTP/1.1") && text.contains("host: 10.96.0.31"),
        "{}",
        all_output(&o)
    );
    Ok(())
}

#[test]
fn h2load_and_wrk_complete_every_request_with_the_short_circuit_on() -> Result<()> {
    require!();
    require_tool("h2load")?;
    require_tool("wrk")?;
    let mut m = Mesh::new(3)?;
    for i in 1..=3 {
        m.serve_http(i, &[])?;
    }
    m.write_config(&web_service(&m, &[1, 2, 3], ""))?;
    m.start_proxy(true)?;
    let url = format!("http://{WEB_VIP}/");
    let o = m.client("h2load", &["-n", "3000", "-c", "4", "-m", "10", &url])?;
    let text = stdout(&o);
    ensure!(
        text.contains("3000 total") && text.contains("3000 succeeded, 0 failed, 0 errored"),
        "{}",
        all_output(&o)
    );
    // The proxy knows the exact count: every request, once, all 2xx.
    let metrics = m.metrics()?;
    let counted = metric_sum(&metrics, "mesh_http_requests_total", &["service=\"web\""]);
    let ok = metric_sum(
        &metrics,
        "mesh_http_requests_total",
        &["service=\"web\"", "status_class=\"2xx\""],
    );
    ensure!(
        counted == 3000.0 && ok == 3000.0,
        "metrics counted {counted} requests ({ok} 2xx) for h2load's 3000"
    );
    ensure!(
        metric_sum(
            &metrics,
            "mesh_http_request_duration_seconds_count",
            &["service=\"web\""]
        ) == 3000.0,
        "latency histogram count differs from 3000"
    );
    // HTTP/1.1 pipelining-free load, bounded by time (wrk has no request count).
    let o = m.client("wrk", &["-t", "1", "-c", "8", "-d", "2s", &url])?;
    let text = stdout(&o);
    ensure!(
        o.status.success() && text.contains("requests in"),
        "{}",
        all_output(&o)
    );
    ensure!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "{text}"
    );
    // Every backend served a share: balancing is per request.
    for i in 1..=3 {
        ensure!(m.served(i)? > 100, "b{i} got too few requests");
    }
    Ok(())
}

// === gRPC ===

#[test]
fn grpc_unary_and_streaming_calls_keep_trailers_and_deadlines() -> Result<()> {
    require!();
    let mut m = Mesh::new(2)?;
    let mut grpc_servers = Vec::new();
    for i in 1..=2 {
        let mut cmd = m.backends[i - 1].command(PYTHON);
        cmd.arg(py("grpc_echo.py")).args([
            "serve",
            "--listen",
            &format!("[::]:{GRPC_PORT}"),
            "--name",
            &format!("g{i}"),
        ]);
        let mut bg = Background::spawn(cmd, m.node.scratch.join(format!("g{i}.out")))?;
        bg.wait_for("ready")?;
        grpc_servers.push(bg);
    }
    m.write_config(&format!(
        r#"
[[service]]
name = "echo"
addresses = ["{GRPC_VIP}"]
ports = [{GRPC_PORT}]
protocol = "grpc"
endpoints = {eps}
"#,
        eps = m.endpoints(&[1, 2], GRPC_PORT)
    ))?;
    m.start_proxy(false)?;
    let o = m.client(
        PYTHON,
        &[
            &py("grpc_echo.py").display().to_string(),
            "client",
            "--target",
            &format!("{GRPC_VIP}:{GRPC_PORT}"),
            "--calls",
            "4",
        ],
    )?;
    ensure!(o.status.success(), "{}", all_output(&o));
    let text = stdout(&o);
    ensure!(
        text.contains("g1") && text.contains("g2"),
        "both endpoints should serve calls: {text}"
    );
    let metrics = m.metrics()?;
    ensure!(
        metric_sum(
            &metrics,
            "mesh_grpc_responses_total",
            &["service=\"echo\"", "grpc_status=\"0\""]
        ) >= 16.0,
        "{metrics}"
    );
    ensure!(
        metric_sum(
            &metrics,
            "mesh_grpc_responses_total",
            &["service=\"echo\"", "grpc_status=\"9\""]
        ) >= 4.0,
        "FAILED_PRECONDITION from the server should be counted: {metrics}"
    );
    Ok(())
}

// === WebSocket and opaque TCP ===

#[test]
fn websocket_upgrade_is_tunnelled() -> Result<()> {
    require!();
    let mut m = Mesh::new(1)?;
    m.serve_http(1, &[])?;
    m.write_config(&web_service(&m, &[1], ""))?;
    m.start_proxy(false)?;
    let o = m.client(
        PYTHON,
        &[
            &py("ws_echo.py").display().to_string(),
            "--url",
            &format!("ws://{WEB_VIP}/ws"),
            "--messages",
            "20",
        ],
    )?;
    ensure!(o.status.success(), "{}", all_output(&o));
    Ok(())
}

/// A server-speaks-first protocol on a port listed as opaque: the proxy connects at once,
/// never waiting for the client, so the banner arrives although the client sends nothing.
#[test]
fn server_speaks_first_service_on_an_opaque_port_is_not_delayed_by_detection() -> Result<()> {
    require!();
    let mut m = Mesh::new(1)?;
    let mut cmd = m.backends[0].command(meshhttp());
    cmd.args([
        "banner",
        "--listen",
        &format!("[::]:{BANNER_PORT}"),
        "--text",
        "220 db ready",
    ]);
    let mut banner = Background::spawn(cmd, m.node.scratch.join("banner.out"))?;
    banner.wait_for("ready")?;
    m.write_config(&format!(
        r#"
[detect]
timeout_ms = 5000

[[service]]
name = "db"
addresses = ["{DB_VIP}"]
ports = [{BANNER_PORT}]
endpoints = {eps}
"#,
        eps = m.endpoints(&[1], BANNER_PORT)
    ))?;
    m.start_proxy(false)?;
    // The client waits for the banner before it writes; with detection on this port it
    // would get nothing for the 5 s detection timeout. socat -T limits the idle time to
    // 2 s, so a delayed banner fails the test without asserting on wall time.
    let o = m.client(
        PYTHON,
        &[
            "-c",
            &format!(
                "import socket,sys\ns=socket.create_connection(('{DB_VIP}',{BANNER_PORT}))\ns.settimeout(2.0)\nb=s.recv(100)\nsys.stdout.write(b.decode())\ns.sendall(b'ping')\nprint(s.recv(100).decode())"
            ),
        ],
    )?;
    let text = stdout(&o);
    ensure!(
        o.status.success() && text.contains("220 db ready") && text.contains("ping"),
        "{}",
        all_output(&o)
    );
    let metrics = m.metrics()?;
    ensure!(
        metric_sum(
            &metrics,
            "mesh_protocol_detections_total",
            &["result=\"skipped\""]
        ) >= 1.0
            && metric_sum(
                &metrics,
                "mesh_protocol_detections_total",
                &["result=\"timeout\""]
            ) == 0.0,
        "{metrics}"
    );
    Ok(())
}

// === balancing and resilience ===

#[test]
fn a_slow_endpoint_gets_a_smaller_share() -> Result<()> {
    require!();
    require_tool("h2load")?;
    let mut m = Mesh::new(3)?;
    m.serve_http(1, &[])?;
    m.serve_http(2, &[])?;
    m.serve_http(3, &["--delay-ms", "40"])?;
    m.write_config(&web_service(&m, &[1, 2, 3], ""))?;
    m.start_proxy(false)?;
    let url = format!("http://{WEB_VIP}/");
    let o = m.client("h2load", &["-n", "600", "-c", "2", "-m", "2", &url])?;
    ensure!(
        stdout(&o).contains("600 succeeded, 0 failed"),
        "{}",
        all_output(&o)
    );
    let (a, b, slow) = (m.served(1)?, m.served(2)?, m.served(3)?);
    ensure!(a + b + slow == 600, "counts {a} {b} {slow}");
    ensure!(
        slow * 4 < a && slow * 4 < b,
        "the slow endpoint should get far fewer requests: fast {a}, {b}; slow {slow}"
    );
    Ok(())
}

#[test]
fn a_dead_endpoint_is_ejected_requests_keep_succeeding_and_it_returns() -> Result<()> {
    require!();
    let mut m = Mesh::new(3)?;
    for i in 1..=3 {
        m.serve_http(i, &[])?;
    }
    m.write_config(&web_service(
        &m,
        &[1, 2, 3],
        "[service.circuit]\nconsecutive_failures = 2\nbase_ejection_ms = 300\nmax_ejection_ms = 600\n",
    ))?;
    m.start_proxy(false)?;
    m.stop_server("b2");
    let url = format!("http://{WEB_VIP}/");
    // 100 requests, one connection each (curl's --next would keep-alive): every one succeeds
    // through b1 and b3; connect failures to b2 are retried on another endpoint.
    let o = m.client("curl", &curl_many(&url, 100))?;
    let codes = stdout(&o);
    ensure!(
        codes.lines().count() == 100 && codes.lines().all(|c| c == "200"),
        "{codes}"
    );
    let metrics = m.metrics()?;
    ensure!(
        metric_sum(&metrics, "mesh_lb_ejections_total", &["service=\"web\""]) >= 1.0,
        "{metrics}"
    );
    // Back up: after its ejection ends the probe succeeds and it takes requests again.
    m.serve_http(2, &[])?;
    let mut back = false;
    for _ in 0..100 {
        let o = m.client("curl", &["-s", "-o", "/dev/null", "--max-time", "20", &url])?;
        ensure!(o.status.success(), "{}", all_output(&o));
        if m.served(2)? > 0 {
            back = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    ensure!(back, "b2 never received a request after it came back");
    Ok(())
}

#[test]
fn retries_stay_within_the_budget() -> Result<()> {
    require!();
    let mut m = Mesh::new(1)?;
    m.serve_http(1, &[])?;
    m.write_config(&web_service(
        &m,
        &[1],
        "[service.retry]\nattempts = 3\nbudget_ratio = 0.2\nbudget_min_per_sec = 1\n[service.circuit]\nconsecutive_failures = 0\n",
    ))?;
    m.start_proxy(false)?;
    let url = format!("http://{WEB_VIP}/status/503");
    let o = m.client("curl", &curl_many(&url, 100))?;
    let codes = stdout(&o);
    ensure!(
        codes.lines().count() == 100 && codes.lines().all(|c| c == "503"),
        "{codes}"
    );
    // Without a budget 3 retries each would make 400 requests. The budget allows 20 % of
    // the requests of the last 10 s plus 1 per second of window: at most 100 + 20 + 10.
    let served = m.served(1)?;
    ensure!(
        (101..=130).contains(&served),
        "backend saw {served} requests for 100 client requests"
    );
    let metrics = m.metrics()?;
    ensure!(
        metric_sum(
            &metrics,
            "mesh_http_retries_total",
            &["outcome=\"budget_exhausted\""]
        ) >= 1.0,
        "{metrics}"
    );
    // The upstream's 503 is passed on, not presented as the proxy's.
    let o = m.client("curl", &["-s", "-i", "--max-time", "20", &url])?;
    ensure!(
        !stdout(&o).contains("x-mesh-proxy-error"),
        "{}",
        all_output(&o)
    );
    Ok(())
}

#[test]
fn proxy_errors_are_marked_and_timeouts_answer_504() -> Result<()> {
    require!();
    let mut m = Mesh::new(1)?;
    m.serve_http(1, &[])?;
    m.write_config(&format!(
        "{}\n[[service]]\nname = \"empty\"\naddresses = [\"10.96.0.20\"]\nports = [80]\nendpoints = []\n",
        web_service(&m, &[1], "[service.timeouts]\nrequest_ms = 300\n")
    ))?;
    m.start_proxy(false)?;
    let o = m.client(
        "curl",
        &[
            "-s",
            "-i",
            "--max-time",
            "20",
            &format!("http://{WEB_VIP}/delay/3000"),
        ],
    )?;
    let text = stdout(&o);
    ensure!(
        text.contains("HTTP/1.1 504") && text.contains("x-mesh-proxy-error: timeout"),
        "{text}"
    );
    let o = m.client(
        "curl",
        &["-s", "-i", "--max-time", "20", "http://10.96.0.20/"],
    )?;
    let text = stdout(&o);
    ensure!(
        text.contains("HTTP/1.1 503") && text.contains("x-mesh-proxy-error: no-endpoints"),
        "{text}"
    );
    Ok(())
}

// === config reload ===

#[test]
fn a_config_reload_during_h2load_loses_no_request_and_a_bad_one_is_rejected() -> Result<()> {
    require!();
    require_tool("h2load")?;
    let mut m = Mesh::new(3)?;
    for i in 1..=3 {
        m.serve_http(i, &[])?;
    }
    m.write_config(&web_service(&m, &[1, 2], ""))?;
    m.start_proxy(false)?;
    let url = format!("http://{WEB_VIP}/");
    let mut cmd = m.client.command("h2load");
    cmd.args(["-n", "40000", "-c", "4", "-m", "4", &url]);
    let load = thread::spawn(move || run_bounded(cmd, LIMIT));
    // While the load runs: move the service to b2 + b3, then write an invalid file.
    thread::sleep(Duration::from_millis(300));
    m.write_config(&web_service(&m, &[2, 3], ""))?;
    m.node.wait_for_log("config reloaded", 1)?;
    m.write_config("[[service]]\nname = \"web\"\naddresses = [\"10.96.0.300\"]\nports = [80]\n")?;
    m.node.wait_for_log("config reload rejected", 1)?;
    let o = load
        .join()
        .map_err(|_| anyhow::anyhow!("h2load thread panicked"))??;
    let text = stdout(&o);
    ensure!(
        text.contains("40000 succeeded, 0 failed, 0 errored"),
        "{}",
        all_output(&o)
    );
    ensure!(m.served(3)? > 0, "the reloaded endpoint set was not used");
    let metrics = m.metrics()?;
    ensure!(
        metric_sum(
            &metrics,
            "mesh_config_reloads_total",
            &["result=\"applied\""]
        ) == 1.0
            && metric_sum(
                &metrics,
                "mesh_config_reloads_total",
                &["result=\"rejected\""]
            ) == 1.0,
        "{metrics}"
    );
    ensure!(
        m.node.proxy_log_text().contains("10.96.0.300"),
        "the rejection should name the bad value"
    );
    // The running config stayed: requests still succeed.
    let o = m.client(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
            &url,
        ],
    )?;
    ensure!(stdout(&o) == "200", "{}", all_output(&o));
    Ok(())
}

// === hostile and broken input ===

/// Sends raw bytes to a VIP from the client pod and returns what came back before the
/// proxy closed (Python, as a user would script it).
fn raw_exchange(m: &Mesh, script: &str) -> Result<String> {
    let o = m.client(PYTHON, &["-c", script])?;
    ensure!(o.status.success(), "{}", all_output(&o));
    Ok(stdout(&o))
}

#[test]
fn malformed_oversized_slow_and_truncated_http_is_handled() -> Result<()> {
    require!();
    let mut m = Mesh::new(1)?;
    m.serve_http(1, &[])?;
    m.write_config(&format!(
        "[http]\nheader_read_timeout_ms = 500\nmax_header_bytes = 16384\n{}",
        web_service(&m, &[1], "max_request_body_bytes = 1000\n")
    ))?;
    m.start_proxy(false)?;
    let sock = format!(
        "import socket,sys,time\ns=socket.create_connection(('{WEB_VIP}',80))\ns.settimeout(10)\n"
    );
    let read_all = "out=b''\nwhile True:\n    b=s.recv(65536)\n    if not b: break\n    out+=b\nprint(out.decode(errors='replace'))\n";

    // A malformed header line: 400, connection closed.
    let text = raw_exchange(
        &m,
        &format!(
            "{sock}s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nbad header line\\r\\n\\r\\n')\n{read_all}"
        ),
    )?;
    ensure!(text.starts_with("HTTP/1.1 400"), "{text}");

    // Oversized headers: 431.
    let text = raw_exchange(
        &m,
        &format!(
            "{sock}s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nx-big: ' + b'a'*40000 + b'\\r\\n\\r\\n')\n{read_all}"
        ),
    )?;
    ensure!(text.starts_with("HTTP/1.1 431"), "{text}");

    // Slowloris: one header byte every 100 ms; the 500 ms header timeout closes the
    // connection long before the 60 bytes are sent.
    let text = raw_exchange(
        &m,
        &format!(
            "{sock}s.sendall(b'GET / HTTP/1.1\\r\\n')\nsent=0\ntry:\n    for c in b'x-slow: ' + b'a'*52:\n        s.sendall(bytes([c])); sent+=1; time.sleep(0.1)\n        s.setblocking(False)\n        try:\n            if s.recv(1) == b'': break\n        except BlockingIOError: pass\n        s.setblocking(True)\nexcept OSError: pass\nprint('sent', sent)\n"
        ),
    )?;
    let sent: usize = text
        .trim()
        .strip_prefix("sent ")
        .and_then(|n| n.parse().ok())
        .context(text.clone())?;
    ensure!(sent < 60, "the slow client was never cut off: {text}");

    // A declared body over the service's limit: 413.
    let o = m.client(
        "curl",
        &[
            "-s",
            "-i",
            "--max-time",
            "20",
            "--data-binary",
            &"x".repeat(5000),
            &format!("http://{WEB_VIP}/echo"),
        ],
    )?;
    let text = stdout(&o);
    ensure!(
        text.contains("413") && text.contains("x-mesh-proxy-error: body-too-large"),
        "{text}"
    );

    // A backend that closes mid-response: the client sees an error, never a short success.
    for http2 in [false, true] {
        let mut args = vec!["-s", "-o", "/dev/null", "--max-time", "20"];
        if http2 {
            args.push("--http2-prior-knowledge");
        }
        let url = format!("http://{WEB_VIP}/close-mid");
        args.push(&url);
        let o = m.client("curl", &args)?;
        ensure!(
            !o.status.success(),
            "curl reported success for a truncated response (http2={http2})"
        );
    }
    // And the proxy still serves.
    let o = m.client(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
            &format!("http://{WEB_VIP}/"),
        ],
    )?;
    ensure!(stdout(&o) == "200", "{}", all_output(&o));
    Ok(())
}

#[test]
fn http2_rapid_reset_and_floods_are_bounded() -> Result<()> {
    require!();
    let mut m = Mesh::new(1)?;
    m.serve_http(1, &[])?;
    m.write_config(&format!(
        "[http]\nmax_concurrent_streams = 100\n{}",
        web_service(&m, &[1], "")
    ))?;
    m.start_proxy(false)?;
    let o = m.client(
        PYTHON,
        &[
            &py("h2_flood.py").display().to_string(),
            "--target",
            &format!("{WEB_VIP}:80"),
        ],
    )?;
    ensure!(o.status.success(), "{}", all_output(&o));
    let text = stdout(&o);
    ensure!(text.contains("\"rapid_reset\": \"goaway\""), "{text}");
    ensure!(text.contains("\"stream_flood\": \"refused\""), "{text}");
    ensure!(text.contains("\"settings_flood\": \"survived\""), "{text}");
    let o = m.client(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--http2-prior-knowledge",
            "--max-time",
            "20",
            &format!("http://{WEB_VIP}/"),
        ],
    )?;
    ensure!(stdout(&o) == "200", "{}", all_output(&o));
    ensure!(m.node.proxy_running(), "the proxy died");
    Ok(())
}

// === authorization on the same node ===

/// Same-node authorization without TLS: the source identity is the workload the kernel
/// recorded (its cgroup), the destination the declared workload at the endpoint's address.
#[test]
fn same_node_authorization_allows_by_identity_and_denies_with_403_or_reset() -> Result<()> {
    require!();
    let mut m = Mesh::new(2)?;
    m.serve_http(1, &[])?;
    m.serve_http(2, &[])?;
    let intruder = m.node.add_pod("intruder")?;
    let rel = m.node.workload_cgroup_rel.clone();
    m.write_config(&format!(
        r#"{web}
[[service]]
name = "api"
addresses = ["10.96.0.40"]
ports = [80]
endpoints = {api_eps}

[authorization]
default = "deny-all"

[[workload]]
name = "frontend"
namespace = "shop"
cgroups = ["{rel}/client"]

[[workload]]
name = "intruder"
namespace = "shop"
cgroups = ["{rel}/intruder"]

[[workload]]
name = "web"
namespace = "shop"
addresses = ["{web_ip}"]

[[workload]]
name = "api"
namespace = "shop"
addresses = ["{api_ip}"]

[[policy]]
name = "web-from-frontend"
workload = "web"
namespace = "shop"
allow = ["spiffe://cluster.local/ns/shop/sa/frontend"]

[[policy]]
name = "api-read-only"
workload = "api"
namespace = "shop"
allow = ["spiffe://cluster.local/ns/shop/*"]
rules = [ {{ methods = ["GET"], path_prefix = "/public" }} ]
"#,
        web = web_service(&m, &[1], ""),
        api_eps = m.endpoints(&[2], BACKEND_PORT),
        web_ip = m.ip(1),
        api_ip = m.ip(2),
    ))?;
    m.start_proxy(false)?;
    let curl = |pod: &Pod, args: &[&str]| -> Result<String> {
        let mut cmd = pod.command("curl");
        cmd.args(["-s", "-i", "--max-time", "20"]).args(args);
        let o = run_bounded(cmd, LIMIT)?;
        Ok(format!("exit={:?}\n{}", o.status.code(), stdout(&o)))
    };
    // HTTP through a service: allowed identity 200, other identity 403 naming the policy.
    let text = curl(&m.client, &[&format!("http://{WEB_VIP}/")])?;
    ensure!(text.contains("HTTP/1.1 200"), "{text}");
    let text = curl(&intruder, &[&format!("http://{WEB_VIP}/")])?;
    ensure!(
        text.contains("HTTP/1.1 403")
            && text.contains("x-mesh-policy: web-from-frontend")
            && text.contains("x-mesh-proxy-error: forbidden"),
        "{text}"
    );
    // HTTP rules: GET /public allowed, POST and other paths denied.
    let text = curl(&intruder, &["http://10.96.0.40/public/x"])?;
    ensure!(text.contains("HTTP/1.1 200"), "{text}");
    let text = curl(&m.client, &["-X", "POST", "http://10.96.0.40/public/x"])?;
    ensure!(
        text.contains("HTTP/1.1 403") && text.contains("x-mesh-policy: api-read-only"),
        "{text}"
    );
    let text = curl(&m.client, &["http://10.96.0.40/private"])?;
    ensure!(text.contains("HTTP/1.1 403"), "{text}");
    // Opaque TCP straight to the pod: allowed identity connects, the other is reset.
    let direct = format!("http://{}:{BACKEND_PORT}/", m.ip(1));
    let text = curl(&m.client, &[&direct])?;
    ensure!(text.contains("HTTP/1.1 200"), "{text}");
    let text = curl(&intruder, &[&direct])?;
    ensure!(
        !text.contains("HTTP/1.1") && !text.starts_with("exit=Some(0)"),
        "the denied connection should be refused: {text}"
    );
    let metrics = m.metrics()?;
    for (decision, level, policy) in [
        ("allow", "http", "web-from-frontend"),
        ("deny", "http", "web-from-frontend"),
        ("deny", "http", "api-read-only"),
        ("allow", "tcp", "web-from-frontend"),
        ("deny", "tcp", "web-from-frontend"),
    ] {
        ensure!(
            metric_sum(
                &metrics,
                "mesh_authz_decisions_total",
                &[
                    &format!("decision=\"{decision}\""),
                    &format!("level=\"{level}\""),
                    &format!("policy=\"{policy}\""),
                ]
            ) >= 1.0,
            "no {decision}/{level}/{policy} decision counted: {metrics}"
        );
    }
    // Policies reload like the rest of the config: allowing the intruder takes effect on
    // the next request, without a restart.
    let text = std::fs::read_to_string(&m.config)?.replace(
        "allow = [\"spiffe://cluster.local/ns/shop/sa/frontend\"]",
        "allow = [\"spiffe://cluster.local/ns/shop/sa/frontend\", \"spiffe://cluster.local/ns/shop/sa/intruder\"]",
    );
    m.write_config(&text)?;
    m.node.wait_for_log("config reloaded", 1)?;
    let text = curl(&intruder, &[&format!("http://{WEB_VIP}/")])?;
    ensure!(
        text.contains("HTTP/1.1 200"),
        "after the policy reload: {text}"
    );
    Ok(())
}

/// TLS from the application is detected (SNI read from the ClientHello), balanced per
/// connection and forwarded untouched: the client's handshake completes with the backend.
#[test]
fn tls_from_the_application_is_forwarded_as_opaque_with_its_sni_recorded() -> Result<()> {
    require!();
    require_tool("openssl")?;
    let mut m = Mesh::new(1)?;
    let dir = m.node.scratch.join("tls");
    fs::create_dir_all(&dir)?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let o = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=shop.example",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    ensure!(o.status.success(), "openssl req: {}", all_output(&o));
    let mut cmd = m.backends[0].command("openssl");
    cmd.args(["s_server", "-accept", "8443", "-www", "-cert"])
        .arg(&cert)
        .arg("-key")
        .arg(&key);
    let mut server = Background::spawn(cmd, m.node.scratch.join("s_server.out"))?;
    server.wait_for("ACCEPT")?;
    m.write_config(&format!(
        "[[service]]\nname = \"shop\"\naddresses = [\"10.96.0.60\"]\nports = [443]\nendpoints = {}\n",
        m.endpoints(&[1], 8443)
    ))?;
    m.start_proxy(false)?;
    let mut cmd = m.node.node_command(&m.node.bins.proxy);
    cmd.args(["tap", "--json", "--count", "1"]);
    let tap = Background::spawn(cmd, m.node.scratch.join("tap.out"))?;
    thread::sleep(Duration::from_millis(300));
    let mut cmd = m.client.command("sh");
    cmd.args([
        "-c",
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 20 openssl s_client -connect 10.96.0.60:443 -servername shop.example -quiet 2>/dev/null | head -5",
    ]);
    let o = run_bounded(cmd, LIMIT)?;
    ensure!(stdout(&o).contains("HTTP/1.0 200"), "{}", all_output(&o));
    let metrics = m.metrics()?;
    ensure!(
        metric_sum(
            &metrics,
            "mesh_protocol_detections_total",
            &["result=\"tls\""]
        ) >= 1.0
            && metric_sum(
                &metrics,
                "mesh_tcp_connections_opened_total",
                &["protocol=\"tls\""]
            ) >= 1.0,
        "{metrics}"
    );
    // The SNI of the ClientHello is recorded with the connection.
    let mut tapped = String::new();
    for _ in 0..50 {
        tapped = tap.output();
        if tapped.contains("\"sni\"") {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    ensure!(tapped.contains("\"sni\":\"shop.example\""), "tap: {tapped}");
    drop(tap);
    drop(server);
    Ok(())
}
