//! Discovery mode `kubernetes` end to end: a real kube-apiserver 1.20 (tests/src/kube.rs)
//! holds a Service and its (v1beta1) EndpointSlice; the proxy, started with
//! `discovery.mode = "kubernetes"`, learns them, balances a client pod's requests to the
//! backend pods, follows an endpoint turning not ready, and keeps serving the last known
//! state while the API server is down.
//!
//! The proxy runs in the node's network namespace and the API server listens on the host's
//! loopback, so the test relays 127.0.0.1:PORT inside the node namespace to it (the API
//! server's certificate names 127.0.0.1, so TLS verification stays on).

use std::{
    fs,
    io::ErrorKind,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nix::sched::{CloneFlags, setns};
use serde_json::Value;
use tests::{
    Background, Binaries, Node, Pod, ProxyOptions,
    kube::{ApiServer, require_apiserver},
    require_privileges, run_bounded,
};

const NS: &str = "shop";
const VIP: &str = "10.96.0.70";
const BACKEND_PORT: u16 = 8080;
/// The node's pods get 10.77.<i+1>.2 in order: client, b1, b2.
const B1: &str = "10.77.2.2";
const B2: &str = "10.77.3.2";
const CLIENT_IP: &str = "10.77.1.2";
const LIMIT: Duration = Duration::from_secs(120);
/// How long the proxy may take to follow a change in the API.
const FOLLOW: Duration = Duration::from_secs(30);

fn bins() -> Result<Binaries> {
    Binaries::locate(Path::new(env!("CARGO_BIN_EXE_meshtest")))
}

fn meshhttp() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshhttp"))
}

// === relay from the node namespace to the API server ===

/// Listens on 127.0.0.1 inside a network namespace and forwards each connection to
/// `target` in the test's own namespace. Stops accepting on drop.
struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(netns: &str, target: SocketAddr) -> Result<Relay> {
        let path = format!("/run/netns/{netns}");
        // A thread of its own enters the node namespace just to create the listener (a
        // socket stays in the namespace it was made in) and goes back.
        let listener = thread::spawn(move || -> Result<TcpListener> {
            let own = fs::File::open("/proc/thread-self/ns/net")?;
            let node = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            setns(&node, CloneFlags::CLONE_NEWNET).context("entering the node namespace")?;
            let l = TcpListener::bind("127.0.0.1:0");
            setns(&own, CloneFlags::CLONE_NEWNET).context("leaving the node namespace")?;
            Ok(l?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("relay set-up thread panicked"))??;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        thread::spawn(move || pipe(down, target));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Relay { port, stop })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pipe(down: TcpStream, target: SocketAddr) {
    let Ok(up) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
        let _ = down.shutdown(Shutdown::Both);
        return;
    };
    let (Ok(mut down2), Ok(mut up2)) = (down.try_clone(), up.try_clone()) else {
        return;
    };
    let t = thread::spawn(move || {
        let _ = std::io::copy(&mut down2, &mut up2);
        let _ = up2.shutdown(Shutdown::Both);
    });
    let (mut down, mut up) = (down, up);
    let _ = std::io::copy(&mut up, &mut down);
    let _ = down.shutdown(Shutdown::Both);
    let _ = t.join();
}

// === objects ===

fn service_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: {NS}
spec:
  clusterIP: {VIP}
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: {BACKEND_PORT}
    protocol: TCP
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: {NS}
spec:
  nodeName: node-1
  automountServiceAccountToken: false
  containers:
  - name: app
    image: example.invalid/client:1
"#
    )
}

fn slice_yaml(version: &str, b2_ready: bool) -> String {
    format!(
        r#"apiVersion: discovery.k8s.io/{version}
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: {NS}
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: {BACKEND_PORT}
  protocol: TCP
endpoints:
- addresses: ["{B1}"]
  conditions:
    ready: true
- addresses: ["{B2}"]
  conditions:
    ready: {b2_ready}
"#
    )
}

// === the node ===

struct Cluster {
    node: Node,
    client: Pod,
    _backends: Vec<Pod>,
    _servers: Vec<Background>,
}

impl Cluster {
    fn new() -> Result<Cluster> {
        let mut node = Node::new(&bins()?)?;
        let client = node.add_pod("client")?;
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for i in 1..=2 {
            let name = format!("b{i}");
            let pod = node.add_pod(&name)?;
            let mut cmd = pod.command(meshhttp());
            cmd.args([
                "serve",
                "--listen",
                &format!("[::]:{BACKEND_PORT}"),
                "--name",
                &name,
            ]);
            let mut bg = Background::spawn(cmd, node.scratch.join(format!("{name}.out")))?;
            bg.wait_for("ready")?;
            servers.push(bg);
            backends.push(pod);
        }
        ensure!(
            client.ipv4.to_string() == CLIENT_IP
                && backends[0].ipv4.to_string() == B1
                && backends[1].ipv4.to_string() == B2,
            "pod addresses changed: client {}, b1 {}, b2 {}",
            client.ipv4,
            backends[0].ipv4,
            backends[1].ipv4
        );
        Ok(Cluster {
            node,
            client,
            _backends: backends,
            _servers: servers,
        })
    }

    /// Starts the proxy in discovery mode `kubernetes` against `api` (through a relay in
    /// the node's namespace), with `intercept` prepended to its config and `kubernetes`
    /// appended to its `[kubernetes]` section.
    fn start_proxy(&mut self, api: &ApiServer, intercept: &str, kubernetes: &str) -> Result<Relay> {
        let api_addr: SocketAddr = api
            .url
            .trim_start_matches("https://")
            .parse()
            .context("API server URL")?;
        let relay = Relay::start(&self.node.netns, api_addr)?;
        let token = self.node.scratch.join("kube-token");
        fs::write(&token, &api.token)?;
        let config = self.node.scratch.join("proxy.toml");
        fs::write(
            &config,
            format!(
                "{intercept}[discovery]\nmode = \"kubernetes\"\n\n[kubernetes]\napi_server = \"https://127.0.0.1:{}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\nnode_name = \"node-1\"\n{kubernetes}",
                relay.port,
                token.display(),
                api.ca_cert.display()
            ),
        )?;
        self.node.start_proxy(&ProxyOptions {
            sockmap: false,
            extra_args: vec!["--config".into(), config.display().to_string()],
            ..ProxyOptions::default()
        })?;
        Ok(relay)
    }

    /// The proxy's /config.
    fn config(&self) -> Result<Value> {
        let mut cmd = self.node.node_command("curl");
        cmd.args(["-s", "--max-time", "5", "http://127.0.0.1:15020/config"]);
        let out = run_bounded(cmd, Duration::from_secs(20))?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "/config is not JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Waits (bounded) until /config satisfies `pred`; returns the last /config.
    fn wait_config(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + FOLLOW;
        loop {
            let c = self.config();
            if let Ok(c) = &c
                && pred(c)
            {
                return Ok(c.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "the proxy's /config did not show {what} within {FOLLOW:?}: {c:?}\nproxy log:\n{}",
                    self.node.proxy_log_text()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `n` GETs of the service from the client pod on one curl: (200s, b1 answers, b2
    /// answers).
    fn requests(&self, n: usize) -> Result<(usize, usize, usize)> {
        let url = format!("http://{VIP}/");
        let mut cmd = self.client.command("curl");
        cmd.args(["-s", "-i", "--max-time", "30"]);
        for _ in 0..n {
            cmd.arg(&url);
        }
        let o = run_bounded(cmd, LIMIT)?;
        let text = String::from_utf8_lossy(&o.stdout);
        ensure!(
            o.status.success(),
            "curl: {}: {text}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        Ok((
            text.matches("HTTP/1.1 200").count(),
            text.matches("x-backend: b1").count(),
            text.matches("x-backend: b2").count(),
        ))
    }
}

fn web_endpoints(c: &Value) -> Option<Vec<String>> {
    let s = c["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "web.shop")?;
    Some(
        s["endpoints"]
            .as_array()?
            .iter()
            .map(|e| format!("{}:{}", e["address"].as_str().unwrap_or("?"), e["port"]))
            .collect(),
    )
}

#[test]
fn services_endpoints_and_workloads_come_from_the_api_server() -> Result<()> {
    if !require_privileges()? || !require_apiserver()? {
        return Ok(());
    }
    let mut api = ApiServer::start()?;
    let version = api.endpoint_slice_version()?;
    api.create_namespace(NS)?;
    api.kubectl(&["label", "namespace", NS, "ebpf-mesh.io/inject=enabled"])?;
    api.apply(&service_yaml())?;
    api.set_pod_running(NS, "client", CLIENT_IP)?;
    api.apply(&slice_yaml(&version, true))?;

    let mut c = Cluster::new()?;
    let relay = c.start_proxy(&api, "", "")?;

    // (1) The service, its endpoints and the local workload appear.
    let cfg = c.wait_config("service web.shop with two endpoints", |c| {
        web_endpoints(c).is_some_and(|e| e.len() == 2)
    })?;
    let eps = web_endpoints(&cfg).unwrap_or_default();
    ensure!(
        eps.contains(&format!("{B1}:{BACKEND_PORT}"))
            && eps.contains(&format!("{B2}:{BACKEND_PORT}")),
        "endpoints: {eps:?}"
    );
    let cfg = c.wait_config("workload shop/client", |c| {
        c["workloads"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["name"] == "client"))
    })?;
    let w = &cfg["workloads"][0];
    ensure!(
        w["identity"] == "spiffe://cluster.local/ns/shop/sa/default"
            && w["addresses"][0] == CLIENT_IP
            && w["cgroups"][0]
                .as_str()
                .is_some_and(|p| p.starts_with("kubepods.slice/kubepods-besteffort.slice/")),
        "workload: {w}"
    );

    // Staleness is visible: the time of the last watch event.
    let mut cmd = c.node.node_command("curl");
    cmd.args(["-s", "--max-time", "5", "http://127.0.0.1:15020/metrics"]);
    let metrics =
        String::from_utf8_lossy(&run_bounded(cmd, Duration::from_secs(20))?.stdout).into_owned();
    let last_event = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_kubernetes_last_event_timestamp_seconds "))
        .and_then(|v| v.trim().parse::<i64>().ok());
    ensure!(
        last_event.is_some_and(|t| t > 0),
        "mesh_kubernetes_last_event_timestamp_seconds: {last_event:?}"
    );

    // (2) Requests to the cluster IP reach both backends.
    let (mut ok, mut b1, mut b2) = c.requests(20)?;
    ensure!(
        ok == 20 && b1 + b2 == 20,
        "20 requests: {ok} ok, b1 {b1}, b2 {b2}"
    );
    // The balancer prefers the faster endpoint; a few more rounds (bounded) for the other.
    for _ in 0..3 {
        if b1 > 0 && b2 > 0 {
            break;
        }
        let (o, x, y) = c.requests(20)?;
        ensure!(o == 20, "20 more requests: {o} ok");
        (ok, b1, b2) = (ok + o, b1 + x, b2 + y);
    }
    ensure!(
        b1 > 0 && b2 > 0,
        "both backends should answer: b1 {b1}, b2 {b2} of {ok}"
    );

    // (3) b2 turns not ready: it leaves the endpoints, and requests go to b1 only.
    api.apply(&slice_yaml(&version, false))?;
    c.wait_config("one endpoint of web.shop", |c| {
        web_endpoints(c).is_some_and(|e| e == [format!("{B1}:{BACKEND_PORT}")])
    })?;
    let (ok, b1, b2) = c.requests(20)?;
    ensure!(
        ok == 20 && b1 == 20 && b2 == 0,
        "after b2 turned not ready: {ok} ok, b1 {b1}, b2 {b2}"
    );

    // (4) API outage: the last known state keeps serving, and a load running through the
    // stop and the restart of the API server loses no request.
    let mut load = c.client.command("h2load");
    load.args([
        "-n",
        "6000",
        "-c",
        "2",
        "-m",
        "2",
        &format!("http://{VIP}/"),
    ]);
    let load = thread::spawn(move || run_bounded(load, LIMIT));
    thread::sleep(Duration::from_millis(200));
    api.stop_apiserver();
    let (ok, b1, _) = c.requests(20)?;
    ensure!(
        ok == 20 && b1 == 20,
        "with the API server down: {ok} ok, b1 {b1}"
    );
    ensure!(
        web_endpoints(&c.config()?).is_some_and(|e| e.len() == 1),
        "the catalog changed during the outage"
    );
    // Still ready (it serves the last known state), and /ready says how old that is.
    let mut cmd = c.node.node_command("curl");
    cmd.args([
        "-s",
        "-w",
        "\n%{http_code}",
        "--max-time",
        "5",
        "http://127.0.0.1:15020/ready",
    ]);
    let ready =
        String::from_utf8_lossy(&run_bounded(cmd, Duration::from_secs(20))?.stdout).into_owned();
    ensure!(
        ready.contains("kubernetes: last watch event") && ready.trim_end().ends_with("200"),
        "/ready during the outage: {ready}"
    );
    api.restart_apiserver()?;
    let o = load
        .join()
        .map_err(|_| anyhow::anyhow!("h2load thread panicked"))??;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        text.contains("6000 succeeded, 0 failed, 0 errored"),
        "load across the API server restart: {text}"
    );
    // After the restart the watches resume: b2 back to ready shows up again.
    api.apply(&slice_yaml(&version, true))?;
    c.wait_config("two endpoints of web.shop after the restart", |c| {
        web_endpoints(c).is_some_and(|e| e.len() == 2)
    })?;
    let (ok, _, _) = c.requests(20)?;
    ensure!(ok == 20, "after the restart: {ok} ok");
    ensure!(
        c.node.proxy_running(),
        "proxy exited: {}",
        c.node.proxy_log_text()
    );
    if std::env::var_os("MESH_TEST_LOG").is_some() {
        eprintln!("--- proxy log ---\n{}", c.node.proxy_log_text());
    }
    drop(relay);
    Ok(())
}

/// With `workloads_only`, a pod is intercepted exactly while a running Pod object on this
/// node (in an opted-in namespace) names it: the proxy maps the Pod to its kubelet cgroup
/// (cgroupfs driver: `kubepods/besteffort/pod<uid>` below `cgroup_root`), puts that cgroup in
/// `MESH_WORKLOADS`, and takes it out when the Pod object is deleted.
#[test]
fn a_pod_is_intercepted_while_its_pod_object_runs_and_released_when_deleted() -> Result<()> {
    if !require_privileges()? || !require_apiserver()? {
        return Ok(());
    }
    let api = ApiServer::start()?;
    let version = api.endpoint_slice_version()?;
    api.create_namespace(NS)?;
    api.kubectl(&["label", "namespace", NS, "ebpf-mesh.io/inject=enabled"])?;
    // The service only (no client Pod object yet).
    let yaml = service_yaml();
    let service_only = yaml.split("\n---\n").next().unwrap_or_default().to_string();
    api.apply(&service_only)?;
    api.apply(&slice_yaml(&version, true))?;

    let mut c = Cluster::new()?;
    let cgroups = format!(
        "cgroup_driver = \"cgroupfs\"\ncgroup_root = \"{}\"\n",
        c.node.workload_cgroup_rel
    );
    let relay = c.start_proxy(&api, "[intercept]\nworkloads_only = true\n\n", &cgroups)?;
    c.wait_config("service web.shop", |c| {
        web_endpoints(c).is_some_and(|e| e.len() == 2)
    })?;

    // One GET of the cluster IP from the client: answered only when intercepted, since
    // nothing routes the virtual address.
    let tries = |c: &Cluster| -> Result<bool> {
        let mut cmd = c.client.command("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            &format!("http://{VIP}/"),
        ]);
        let o = run_bounded(cmd, LIMIT)?;
        Ok(String::from_utf8_lossy(&o.stdout) == "200")
    };

    // The Pod object appears, runs on this node: its cgroup is where the client pod's
    // processes now run.
    api.apply(&yaml)?;
    api.set_pod_running(NS, "client", CLIENT_IP)?;
    let uid = api.kubectl(&[
        "get",
        "pod",
        "client",
        "-n",
        NS,
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let kube_cgroup = c
        .node
        .workload_cgroup
        .join("kubepods")
        .join("besteffort")
        .join(format!("pod{}", uid.trim()));
    fs::create_dir_all(&kube_cgroup)?;
    c.client.cgroup = kube_cgroup.clone();
    // Until the proxy has seen the Pod, its cgroup is nobody's (connects go direct and
    // fail); then it is intercepted.
    let mut intercepted = false;
    for _ in 0..60 {
        if tries(&c)? {
            intercepted = true;
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    ensure!(
        intercepted,
        "the pod was never intercepted once its Pod object ran: {}",
        c.node.proxy_log_text()
    );
    let cfg = c.config()?;
    ensure!(
        cfg["workloads"]
            .to_string()
            .contains(&format!("pod{}", uid.trim())),
        "the workload's cgroup is not the kubelet's: {}",
        cfg["workloads"]
    );

    // Deleted: released again (connects go direct and the virtual address goes nowhere).
    api.kubectl(&[
        "delete",
        "pod",
        "client",
        "-n",
        NS,
        "--grace-period=0",
        "--force",
    ])?;
    let mut released = false;
    for _ in 0..60 {
        if !tries(&c)? {
            released = true;
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    ensure!(
        released,
        "the pod stayed intercepted after its Pod object was deleted"
    );
    let counters = c.node.counters()?;
    ensure!(
        counters.get("bypass_not_workload").copied().unwrap_or(0) >= 1,
        "{counters:?}"
    );
    drop(relay);
    Ok(())
}
