//! Two nodes, mutual TLS between their proxies: certificates from a real issuer
//! (`proxy identity serve`), HTTP and opaque TCP from a pod on node 0 to a pod on node 1
//! through the HBONE-style tunnel, refusals at the tunnel port checked with openssl and curl,
//! authorization by the verified identity, and a capture of the link between the nodes that
//! must never show the client's bytes.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use tests::{
    Background, Binaries, Issuer, Node, Pod, ProxyOptions, link, metric_sum, require_privileges,
    run_bounded,
};

const BACKEND_PORT: u16 = 8080;
const VIP: &str = "10.96.0.50";
const API_VIP: &str = "10.96.0.51";
const TD: &str = "cluster.local";
const LIMIT: Duration = Duration::from_secs(60);
const TUNNEL_PORT: u16 = 15008;

macro_rules! require {
    () => {
        if !require_privileges()? {
            return Ok(());
        }
    };
}

fn bins() -> Result<Binaries> {
    Binaries::locate(Path::new(env!("CARGO_BIN_EXE_meshtest")))
}

fn out(o: &std::process::Output) -> String {
    format!(
        "status {}: {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `proxy ARGS` on the host (CA commands touch only files).
fn proxy(bins: &Binaries, args: &[&str]) -> Result<String> {
    let mut cmd = std::process::Command::new(&bins.proxy);
    cmd.args(args);
    let o = run_bounded(cmd, LIMIT)?;
    ensure!(o.status.success(), "proxy {args:?}: {}", out(&o));
    Ok(stdout(&o))
}

fn metrics(node: &Node) -> Result<String> {
    let mut cmd = node.node_command("curl");
    cmd.args(["-s", "http://127.0.0.1:15020/metrics"]);
    Ok(stdout(&run_bounded(cmd, Duration::from_secs(20))?))
}

/// Two linked nodes with a CA, an issuer on node 0, a client and an intruder pod on node 0,
/// a meshhttp backend on node 1, and both proxies running with mTLS.
struct Mesh {
    node0: Node,
    node1: Node,
    client: Pod,
    intruder: Pod,
    backend: Pod,
    ca: PathBuf,
    _issuer: Issuer,
    _server: Background,
    _opaque: Background,
    _api: Background,
}

impl Mesh {
    /// `lifetime`: of issued leaves, in seconds; `node1_anchors`: extra anchors node 1
    /// trusts besides the mesh CA's bundle.
    fn new(lifetime: u64, node1_extra_anchor: Option<&Path>) -> Result<Mesh> {
        let bins = bins()?;
        let mut node0 = Node::new(&bins)?;
        let mut node1 = Node::with_number(&bins, 1)?;
        let client = node0.add_pod("client")?;
        let intruder = node0.add_pod("intruder")?;
        let backend = node1.add_pod("web")?;
        let api = node1.add_pod("api")?;
        link(&mut node0, &mut node1)?;

        let ca = node0.scratch.join("ca");
        proxy(
            &bins,
            &[
                "ca",
                "init",
                "--dir",
                &ca.display().to_string(),
                "--trust-domain",
                TD,
            ],
        )?;
        let issuer = Issuer::start(
            &node0,
            &[&node0, &node1],
            &ca,
            TD,
            &format!("spiffe://{TD}/ns/shop/sa/*"),
            Some(lifetime),
        )?;
        let issuer_addr = issuer.address.clone();

        let mut cmd = backend.command(env!("CARGO_BIN_EXE_meshhttp"));
        cmd.args([
            "serve",
            "--listen",
            &format!("[::]:{BACKEND_PORT}"),
            "--name",
            "web-on-node1",
        ]);
        let mut server = Background::spawn(cmd, node1.scratch.join("web.out"))?;
        server.wait_for("ready")?;
        let mut cmd = api.command(env!("CARGO_BIN_EXE_meshhttp"));
        cmd.args([
            "serve",
            "--listen",
            &format!("[::]:{BACKEND_PORT}"),
            "--name",
            "api-on-node1",
        ]);
        let mut api_server = Background::spawn(cmd, node1.scratch.join("api.out"))?;
        api_server.wait_for("ready")?;
        let mut cmd = backend.command(&bins.meshtest);
        cmd.args(["serve", "--listen", "[::]:9090"]);
        let mut opaque = Background::spawn(cmd, node1.scratch.join("opaque.out"))?;
        opaque.wait_for("listening")?;

        let anchors = ca.join("anchors.pem");
        let node1_anchors = match node1_extra_anchor {
            Some(extra) => {
                let p = node1.scratch.join("anchors.pem");
                let mut bundle = fs::read(&anchors)?;
                bundle.extend(fs::read(extra)?);
                fs::write(&p, bundle)?;
                p
            }
            None => anchors.clone(),
        };
        let identity = |node: &Node, anchors: &Path| {
            format!(
                "[identity]\ntrust_domain = \"{TD}\"\nissuer = \"{issuer_addr}\"\nanchors = \"{}\"\ntoken_file = \"{}\"\n",
                anchors.display(),
                node.scratch.join("token").display()
            )
        };
        let rel0 = node0.workload_cgroup_rel.clone();
        let config0 = format!(
            r#"{identity}
[mesh]
node_name = "node0"
inbound_port = {TUNNEL_PORT}
[[mesh.peer]]
name = "node1"
address = "{peer}:{TUNNEL_PORT}"
pod_cidrs = ["10.78.0.0/16"]

[[service]]
name = "web"
addresses = ["{VIP}"]
ports = [80]
endpoints = [ {{ address = "{web}", port = {BACKEND_PORT}, identity = "spiffe://{TD}/ns/shop/sa/web" }} ]

[[service]]
name = "api"
addresses = ["{API_VIP}"]
ports = [80]
endpoints = [ {{ address = "{api_ip}", port = {BACKEND_PORT}, identity = "spiffe://{TD}/ns/shop/sa/api" }} ]

[[workload]]
name = "frontend"
namespace = "shop"
cgroups = ["{rel0}/client"]

[[workload]]
name = "intruder"
namespace = "shop"
cgroups = ["{rel0}/intruder"]
"#,
            identity = identity(&node0, &anchors),
            peer = node1.link_addr4(),
            web = backend.ipv4,
            api_ip = api.ipv4,
        );
        let rel1 = node1.workload_cgroup_rel.clone();
        let config1 = format!(
            r#"{identity}
[mesh]
node_name = "node1"
inbound_port = {TUNNEL_PORT}
[[mesh.peer]]
name = "node0"
address = "{peer}:{TUNNEL_PORT}"
pod_cidrs = ["10.77.0.0/16"]

[[workload]]
name = "web"
namespace = "shop"
cgroups = ["{rel1}/web"]
addresses = ["{web}"]

[[policy]]
name = "web-from-frontend"
workload = "web"
namespace = "shop"
allow = ["spiffe://{TD}/ns/shop/sa/frontend"]

[[workload]]
name = "api"
namespace = "shop"
cgroups = ["{rel1}/api"]
addresses = ["{api_ip}"]

[[policy]]
name = "api-read-only"
workload = "api"
namespace = "shop"
allow = ["spiffe://{TD}/ns/shop/*"]
rules = [ {{ methods = ["GET"], path_prefix = "/public" }} ]
"#,
            identity = identity(&node1, &node1_anchors),
            peer = node0.link_addr4(),
            web = backend.ipv4,
            api_ip = api.ipv4,
        );
        for (node, config) in [(&mut node0, config0), (&mut node1, config1)] {
            let path = node.scratch.join("proxy.toml");
            fs::write(&path, config)?;
            node.start_proxy(&ProxyOptions {
                sockmap: false,
                ipv6: false,
                extra_args: vec!["--config".into(), path.display().to_string()],
                ..ProxyOptions::default()
            })?;
        }
        Ok(Mesh {
            node0,
            node1,
            client,
            intruder,
            backend,
            ca,
            _issuer: issuer,
            _server: server,
            _opaque: opaque,
            _api: api_server,
        })
    }

    fn curl(&self, pod: &Pod, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = pod.command("curl");
        cmd.args(["-s", "--max-time", "20"]).args(args);
        run_bounded(cmd, LIMIT)
    }

    /// `openssl s_client` from node 0 to node 1's tunnel port, with extra args; returns the
    /// server certificate's text and s_client's output.
    fn s_client(&self, extra: &[&str]) -> Result<String> {
        let target = format!("{}:{TUNNEL_PORT}", self.node1.link_addr4());
        let script = format!(
            "echo | timeout 20 openssl s_client -connect {target} -tls1_3 -alpn h2 {} 2>&1",
            extra.join(" ")
        );
        let mut cmd = self.node0.node_command("sh");
        cmd.args(["-c", &script]);
        Ok(stdout(&run_bounded(cmd, LIMIT)?))
    }
}

fn server_cert_text(s_client_output: &str, bins_dir: &Path) -> Result<String> {
    let begin = s_client_output
        .find("-----BEGIN CERTIFICATE-----")
        .context("no server certificate in s_client output")?;
    let end = s_client_output
        .find("-----END CERTIFICATE-----")
        .context("truncated certificate")?;
    let pem = &s_client_output[begin..end + "-----END CERTIFICATE-----".len()];
    let f = bins_dir.join(format!("server-{}.pem", std::process::id()));
    fs::write(&f, pem)?;
    let o = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&f)
        .output()?;
    Ok(stdout(&o))
}

#[test]
fn pods_on_two_nodes_talk_over_mutual_tls_and_the_tunnel_refuses_strangers() -> Result<()> {
    require!();
    if tests::which("openssl").is_none() {
        bail!("openssl is not installed; apt-get install openssl");
    }
    // A CA of another trust domain, which node 1 is told to trust too: its certificates
    // chain to an anchor, but their SPIFFE IDs are outside the mesh's trust domain.
    let foreign_root = std::env::temp_dir().join(format!("mtls-foreign-{}", std::process::id()));
    let _ = fs::remove_dir_all(&foreign_root);
    let b = bins()?;
    let foreign = foreign_root.join("ca");
    proxy(
        &b,
        &[
            "ca",
            "init",
            "--dir",
            &foreign.display().to_string(),
            "--trust-domain",
            "other.domain",
        ],
    )?;
    let m = Mesh::new(3600, Some(&foreign.join("ca.crt")))?;
    let scratch = m.node0.scratch.clone();
    let capture = m.node0.capture_link()?;

    // HTTP through the service: balanced to the pod on node 1, over the tunnel.
    let marker = "MARKER-7f3a9c-never-in-cleartext";
    let o = m.curl(
        &m.client,
        &[
            "-i",
            "-H",
            &format!("x-marker: {marker}"),
            &format!("http://{VIP}/headers"),
        ],
    )?;
    let text = stdout(&o);
    ensure!(
        text.contains("HTTP/1.1 200")
            && text.contains("x-backend: web-on-node1")
            && text.contains(marker),
        "{}",
        out(&o)
    );
    // Opaque TCP straight to the pod's address (not a service): tunnelled too.
    let o = m.curl(
        &m.client,
        &["-i", &format!("http://{}:{BACKEND_PORT}/", m.backend.ipv4)],
    )?;
    ensure!(
        stdout(&o).contains("web-on-node1"),
        "plain GET through the tunnel: {}",
        out(&o)
    );
    // And a body comes back byte for byte.
    let body = format!("{marker}-{}", "x".repeat(100_000));
    let o = m.curl(
        &m.client,
        &[
            "--data-binary",
            &body,
            &format!("http://{}:{BACKEND_PORT}/echo", m.backend.ipv4),
        ],
    )?;
    ensure!(
        stdout(&o) == body,
        "echo through the tunnel differs: {}",
        out(&o).len()
    );

    // The link never carried the marker in cleartext (a positive control: the capture saw
    // the tunnel's bytes).
    let pcap = capture.stop_and_read()?;
    ensure!(
        pcap.len() > 100_000,
        "the capture missed the traffic: {} bytes",
        pcap.len()
    );
    ensure!(
        !pcap.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker crossed the link in cleartext"
    );

    // The tunnel port, seen by openssl: TLS 1.3, the node's SPIFFE ID as URI SAN.
    let s = m.s_client(&[])?;
    ensure!(s.contains("TLSv1.3"), "{s}");
    let cert = server_cert_text(&s, &scratch)?;
    ensure!(
        cert.contains(&format!("URI:spiffe://{TD}/ns/ebpf-mesh/sa/node-node1")),
        "{cert}"
    );
    // Refused: no client certificate, a certificate of another CA, an expired one, one of
    // another trust domain (its CA is trusted by node 1, its identity is not ours), and
    // plaintext.
    let issue = |dir: &Path, id: &str, out_dir: &Path, extra: &[&str]| -> Result<()> {
        let mut args = vec![
            "ca".to_string(),
            "issue".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--identity".into(),
            id.into(),
            "--out".into(),
            out_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        proxy(&b, &refs).map(|_| ())
    };
    let rogue_ca = foreign_root.join("rogue");
    proxy(
        &b,
        &[
            "ca",
            "init",
            "--dir",
            &rogue_ca.display().to_string(),
            "--trust-domain",
            TD,
        ],
    )?;
    let frontend = format!("spiffe://{TD}/ns/shop/sa/frontend");
    issue(&rogue_ca, &frontend, &foreign_root.join("rogue-leaf"), &[])?;
    issue(
        &m.ca,
        &frontend,
        &foreign_root.join("expired-leaf"),
        &["--not-before-secs", "-7200", "--not-after-secs", "-3600"],
    )?;
    issue(
        &foreign,
        "spiffe://other.domain/ns/shop/sa/frontend",
        &foreign_root.join("foreign-leaf"),
        &[],
    )?;
    issue(&m.ca, &frontend, &foreign_root.join("good-leaf"), &[])?;
    for leaf in ["rogue-leaf", "expired-leaf", "foreign-leaf", "good-leaf"] {
        let d = foreign_root.join(leaf);
        let _ = m.s_client(&[
            "-cert",
            &d.join("cert.pem").display().to_string(),
            "-key",
            &d.join("key.pem").display().to_string(),
        ])?;
    }
    let mut cmd = m.node0.node_command("curl");
    cmd.args([
        "-s",
        "--max-time",
        "10",
        &format!("http://{}:{TUNNEL_PORT}/", m.node1.link_addr4()),
    ]);
    let o = run_bounded(cmd, LIMIT)?;
    ensure!(
        !o.status.success() || !stdout(&o).contains("200"),
        "plaintext got an answer: {}",
        out(&o)
    );
    // Handshake results are counted as they finish on node 1.
    let mut last = String::new();
    let want = [
        ("ok", 1.0),
        ("no_certificate", 1.0),
        ("unknown_ca", 1.0),
        ("expired", 1.0),
        ("wrong_trust_domain", 1.0),
        ("not_tls", 1.0),
    ];
    for _ in 0..50 {
        last = metrics(&m.node1)?;
        if want.iter().all(|(r, n)| {
            metric_sum(
                &last,
                "mesh_tunnel_handshakes_total",
                &["direction=\"inbound\"", &format!("result=\"{r}\"")],
            ) >= *n
        }) {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    for (r, n) in want {
        ensure!(
            metric_sum(
                &last,
                "mesh_tunnel_handshakes_total",
                &["direction=\"inbound\"", &format!("result=\"{r}\"")]
            ) >= n,
            "no inbound handshake counted as {r}: {}",
            last.lines()
                .filter(|l| l.contains("tunnel"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    // Authorization on node 1 by the verified identity: the intruder workload gets 403
    // over HTTP and a refused connection over TCP; the frontend passes.
    let o = m.curl(&m.intruder, &["-i", &format!("http://{VIP}/")])?;
    let text = stdout(&o);
    ensure!(
        text.contains("HTTP/1.1 403") && text.contains("x-mesh-policy: web-from-frontend"),
        "{}",
        out(&o)
    );
    let o = m.curl(
        &m.intruder,
        &[&format!("http://{}:{BACKEND_PORT}/", m.backend.ipv4)],
    )?;
    ensure!(
        !stdout(&o).contains("web-on-node1"),
        "the intruder reached the pod: {}",
        out(&o)
    );
    let o = m.curl(&m.client, &["-i", &format!("http://{VIP}/")])?;
    ensure!(stdout(&o).contains("HTTP/1.1 200"), "{}", out(&o));
    let m1 = metrics(&m.node1)?;
    ensure!(
        metric_sum(
            &m1,
            "mesh_authz_decisions_total",
            &[
                "decision=\"deny\"",
                "source=\"spiffe://cluster.local/ns/shop/sa/intruder\""
            ]
        ) >= 1.0
            && metric_sum(
                &m1,
                "mesh_authz_decisions_total",
                &[
                    "decision=\"allow\"",
                    "source=\"spiffe://cluster.local/ns/shop/sa/frontend\""
                ]
            ) >= 1.0,
        "{}",
        m1.lines()
            .filter(|l| l.contains("authz"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // HTTP rules are decided on node 1 (the destination), per request, with the verified
    // identity: GET /public passes, POST and other paths get 403 naming the policy.
    let o = m.curl(
        &m.client,
        &["-i", &format!("http://{API_VIP}/public/items")],
    )?;
    ensure!(
        stdout(&o).contains("HTTP/1.1 200") && stdout(&o).contains("api-on-node1"),
        "{}",
        out(&o)
    );
    for args in [vec!["-i", "-X", "POST"], vec!["-i"]] {
        let url = if args.len() == 1 {
            format!("http://{API_VIP}/private")
        } else {
            format!("http://{API_VIP}/public/items")
        };
        let mut a = args.clone();
        a.push(&url);
        let o = m.curl(&m.client, &a)?;
        let text = stdout(&o);
        ensure!(
            text.contains("HTTP/1.1 403") && text.contains("x-mesh-policy: api-read-only"),
            "{}",
            out(&o)
        );
    }
    let m1 = metrics(&m.node1)?;
    ensure!(
        metric_sum(
            &m1,
            "mesh_authz_decisions_total",
            &[
                "level=\"http\"",
                "decision=\"deny\"",
                "policy=\"api-read-only\""
            ]
        ) >= 2.0
            && metric_sum(
                &m1,
                "mesh_authz_decisions_total",
                &[
                    "level=\"http\"",
                    "decision=\"allow\"",
                    "policy=\"api-read-only\""
                ]
            ) >= 1.0,
        "{}",
        m1.lines()
            .filter(|l| l.contains("authz"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every family (identity, tunnel, authorization, HTTP, kernel) passes promtool.
    if tests::which("promtool").is_none() {
        bail!("promtool is not installed; apt-get install prometheus");
    }
    for node in [&m.node0, &m.node1] {
        let mut cmd = node.node_command("sh");
        cmd.args([
            "-c",
            "curl -s http://127.0.0.1:15020/metrics | promtool check metrics",
        ]);
        let o = run_bounded(cmd, LIMIT)?;
        ensure!(o.status.success(), "promtool: {}", out(&o));
    }
    let _ = fs::remove_dir_all(&foreign_root);
    drop(m);
    Ok(())
}

/// Serial and issuer of the certificate node 1 presents to a new handshake.
fn presented(m: &Mesh) -> Result<(String, String)> {
    let s = m.s_client(&[])?;
    let begin = s.find("-----BEGIN CERTIFICATE-----").context(s.clone())?;
    let end = s.find("-----END CERTIFICATE-----").context(s.clone())?;
    let pem = &s[begin..end + "-----END CERTIFICATE-----".len()];
    let f = m.node0.scratch.join("presented.pem");
    fs::write(&f, pem)?;
    let o = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-issuer", "-in"])
        .arg(&f)
        .output()?;
    let text = stdout(&o);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Ok((field("serial="), field("issuer=")))
}

#[test]
fn certificates_rotate_under_a_long_lived_connection_and_the_ca_rolls_over_without_a_failed_request()
-> Result<()> {
    require!();
    // Leaves live 4 s and are renewed at half their lifetime.
    let m = Mesh::new(4, None)?;
    let (serial0, issuer0) = presented(&m)?;
    ensure!(
        !serial0.is_empty() && !issuer0.is_empty(),
        "no certificate from node 1"
    );

    // One keep-alive HTTP connection through the tunnel for 10 s, a request every 250 ms.
    let script = format!(
        "import http.client,time\nc=http.client.HTTPConnection('{}',{BACKEND_PORT},timeout=10)\nports=set()\nok=0\nfor i in range(40):\n    c.request('GET','/')\n    r=c.getresponse()\n    b=r.read()\n    ok+= r.status==200 and b'web-on-node1' in b\n    ports.add(c.sock.getsockname()[1])\n    time.sleep(0.25)\nprint('ok',ok,'connections',len(ports))\n",
        m.backend.ipv4
    );
    let mut cmd = m.client.command("/usr/bin/python3");
    cmd.args(["-c", &script]);
    let mut long_lived = Background::spawn(cmd, m.node0.scratch.join("long.out"))?;

    // Meanwhile: the CA rolls over, and new requests keep flowing through the service.
    thread::sleep(Duration::from_secs(2));
    let b = bins()?;
    proxy(&b, &["ca", "rotate", "--dir", &m.ca.display().to_string()])?;
    let mut codes = Vec::new();
    for _ in 0..40 {
        let o = m.curl(
            &m.client,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{VIP}/"),
            ],
        )?;
        codes.push(stdout(&o));
        thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        codes.iter().all(|c| c == "200"),
        "a request failed during the rollover: {codes:?}"
    );
    long_lived.wait_for("ok ")?;
    let text = long_lived.output();
    ensure!(
        text.contains("ok 40 connections 1"),
        "the long-lived connection broke: {text}"
    );

    // New handshakes show new certificates, now from the new CA.
    let (serial1, issuer1) = presented(&m)?;
    ensure!(serial1 != serial0, "node 1 still presents serial {serial0}");
    ensure!(
        issuer1 != issuer0,
        "node 1's certificate is still issued by {issuer0}"
    );
    let metrics1 = metrics(&m.node1)?;
    ensure!(
        metric_sum(&metrics1, "mesh_identity_rotations_total", &[]) >= 3.0,
        "{}",
        metrics1
            .lines()
            .filter(|l| l.contains("identity"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // End of the rollover: the old anchor goes; every leaf is from the new CA by now.
    proxy(
        &b,
        &[
            "ca",
            "retire-previous",
            "--dir",
            &m.ca.display().to_string(),
        ],
    )?;
    thread::sleep(Duration::from_secs(3));
    for _ in 0..10 {
        let o = m.curl(
            &m.client,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{VIP}/"),
            ],
        )?;
        ensure!(
            stdout(&o) == "200",
            "after retiring the old anchor: {}",
            out(&o)
        );
    }
    Ok(())
}

fn admin_code(node: &Node, path: &str) -> Result<String> {
    let mut cmd = node.node_command("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        &format!("http://127.0.0.1:15020{path}"),
    ]);
    Ok(stdout(&run_bounded(cmd, Duration::from_secs(20))?))
}

/// Start-up order, seen from outside: the admin server answers /live at once and /ready 503
/// while the proxy waits for its certificates (an issuer that accepts and never answers);
/// nothing is attached yet; SIGTERM then stops it cleanly, and without SIGTERM it gives up
/// with an error that names the issuer.
#[test]
fn not_ready_before_certificates_and_interception_and_stoppable_meanwhile() -> Result<()> {
    require!();
    let bins = bins()?;
    let mut node = Node::new(&bins)?;
    let _pod = node.add_pod("client")?;
    let ca = node.scratch.join("ca");
    proxy(
        &bins,
        &[
            "ca",
            "init",
            "--dir",
            &ca.display().to_string(),
            "--trust-domain",
            TD,
        ],
    )?;
    let token = node.scratch.join("token");
    fs::write(&token, "t")?;
    fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mut cmd = node.node_command("/usr/bin/python3");
    cmd.args([
        "-c",
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('127.0.0.1',15012))\ns.listen()\nprint('listening',flush=True)\nheld=[]\nwhile True:\n    c,_=s.accept()\n    held.append(c)\n",
    ]);
    let mut silent_issuer = Background::spawn(cmd, node.scratch.join("silent.out"))?;
    silent_issuer.wait_for("listening")?;
    let config = node.scratch.join("proxy.toml");
    fs::write(
        &config,
        format!(
            "[identity]\ntrust_domain = \"{TD}\"\nissuer = \"127.0.0.1:15012\"\nanchors = \"{}\"\ntoken_file = \"{}\"\n",
            ca.join("anchors.pem").display(),
            token.display()
        ),
    )?;
    let opts = ProxyOptions {
        sockmap: false,
        extra_args: vec!["--config".into(), config.display().to_string()],
        ..ProxyOptions::default()
    };

    node.spawn_proxy(&opts)?;
    let mut live = String::new();
    for _ in 0..100 {
        live = admin_code(&node, "/live")?;
        if live == "200" {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        live == "200",
        "the admin server never came up: {}",
        node.proxy_log_text()
    );
    ensure!(
        admin_code(&node, "/ready")? == "503",
        "ready before certificates and interception"
    );
    // The pin directory is locked and laid out, but no program or map is pinned (or
    // attached) yet.
    let pinned: Vec<String> = ["progs", "maps", "links"]
        .iter()
        .flat_map(|sub| {
            fs::read_dir(node.pin_dir.join(sub))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    ensure!(
        pinned.is_empty(),
        "pinned before start-up completed: {pinned:?}"
    );
    let status = node.stop_proxy("TERM")?;
    ensure!(status.success(), "SIGTERM during start-up: {status}");
    ensure!(
        node.proxy_log_text().contains("stopping during start-up"),
        "{}",
        node.proxy_log_text()
    );

    // Left alone, the proxy gives up on the silent issuer and says which one.
    node.spawn_proxy(&opts)?;
    let mut exited = None;
    for _ in 0..600 {
        if !node.proxy_running() {
            exited = Some(());
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    ensure!(exited.is_some(), "the proxy kept waiting for the issuer");
    let log = node.proxy_log_text();
    ensure!(
        log.contains("127.0.0.1:15012"),
        "the error should name the issuer: {log}"
    );
    Ok(())
}
