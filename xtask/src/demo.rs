//! `cargo xtask demo`: builds everything, makes a node with pods, sends traffic from one
//! pod to another through the proxy and calls an HTTP service by its virtual address, and
//! shows what happened: original destinations, bytes, per-request balancing, the services'
//! endpoints, the kernel counters and what bpftool sees. Cleans up at the end,
//! also on failure (the harness's guards run on drop).

use std::{process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use tests::{Background, Binaries, Node, ProxyOptions, require_privileges, run_bounded};

use crate::{build, sh};

const PORT: u16 = 8080;
/// The demo service's virtual address (nothing listens there: connects are intercepted).
const VIP: &str = "10.96.0.10";

/// What both demos do first: root and privileges checked, binaries built, Ctrl-C cleanup.
/// `command` is how the user ran it, for the hint to rerun as root.
fn prepare(command: &str) -> Result<(build::BuildOutput, Binaries)> {
    if !sh::is_root()? {
        bail!(
            "the demo creates network namespaces, cgroups and loads eBPF programs: run it as root (sudo -E env PATH=\"$PATH\" {command})"
        );
    }
    let out = build::ensure_built(false)?;
    if !require_privileges()? {
        bail!("this machine lacks what the demo needs (see above)");
    }
    sh::cleanup_on_interrupt()?;
    let bins = Binaries {
        proxy: out.profile_dir.join("proxy"),
        meshtest: out.profile_dir.join("meshtest"),
    };
    Ok((out, bins))
}

pub fn run() -> Result<()> {
    let (out, bins) = prepare("cargo xtask demo")?;

    step("making a node (network namespace) with two pods (namespaces + cgroups)");
    let mut node = Node::new(&bins)?;
    let client = node.add_pod("client")?;
    let server = node.add_pod("server")?;
    println!(
        "  node      {}  proxy at {}:{} and [{}]:{}",
        node.netns,
        tests::PROXY_V4,
        tests::PROXY_PORT,
        tests::PROXY_V6,
        tests::PROXY_PORT
    );
    println!(
        "  pod client {} / {}  cgroup {}",
        client.ipv4,
        client.ipv6,
        client.cgroup.display()
    );
    println!(
        "  pod server {} / {}  cgroup {}",
        server.ipv4,
        server.ipv6,
        server.cgroup.display()
    );

    step(&format!(
        "starting a server in the server pod on [::]:{PORT}"
    ));
    let mut cmd = server.command(&bins.meshtest);
    cmd.args([
        "serve",
        "--listen",
        &format!("[::]:{PORT}"),
        "--io",
        "poll",
        "--greet",
        "1",
    ]);
    let mut srv = Background::spawn(cmd, node.scratch.join("server.out"))?;
    srv.wait_for("listening")?;

    step("starting two HTTP backends (meshhttp, HTTP/1.1 + h2c) in pods web-a and web-b");
    let mut backends = Vec::new();
    let mut endpoints = Vec::new();
    for name in ["web-a", "web-b"] {
        let pod = node.add_pod(name)?;
        let mut cmd = pod.command(out.profile_dir.join("meshhttp"));
        cmd.args(["serve", "--listen", &format!("[::]:{PORT}"), "--name", name]);
        let mut bg = Background::spawn(cmd, node.scratch.join(format!("{name}.out")))?;
        bg.wait_for("ready")?;
        println!("  pod {name} {}:{PORT}", pod.ipv4);
        endpoints.push(format!("{{ address = \"{}\", port = {PORT} }}", pod.ipv4));
        backends.push(bg);
    }
    let config = node.scratch.join("proxy.toml");
    let config_text = format!(
        "[[service]]\nname = \"web\"\naddresses = [\"{VIP}\"]\nports = [80]\nendpoints = [{}]\n",
        endpoints.join(", ")
    );
    std::fs::write(&config, &config_text)?;
    println!(
        "  config {}:\n    {}",
        config.display(),
        config_text.trim().replace('\n', "\n    ")
    );

    step("starting the proxy (eBPF interception, sockmap short-circuit on, the config above)");
    node.start_proxy(&ProxyOptions {
        extra_args: vec!["--config".into(), config.display().to_string()],
        ..ProxyOptions::default()
    })?;

    step(&format!(
        "client pod calls the service's virtual address http://{VIP}/ 10 times with curl (HTTP/1.1 and HTTP/2)"
    ));
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..10 {
        let mut cmd = client.command("curl");
        cmd.args(["-s", "-i", "--max-time", "10"]);
        if i % 2 == 1 {
            cmd.arg("--http2-prior-knowledge");
        }
        cmd.arg(format!("http://{VIP}/"));
        let o = run_bounded(cmd, Duration::from_secs(30))?;
        let text = String::from_utf8_lossy(&o.stdout);
        let status = text.lines().next().unwrap_or("").trim().to_string();
        let backend = text
            .lines()
            .find_map(|l| l.strip_prefix("x-backend: "))
            .unwrap_or("?")
            .trim()
            .to_string();
        println!("  {status:<16} from {backend}");
        *seen.entry(backend).or_insert(0) += 1;
    }
    println!("  balanced per request: {seen:?}");
    let mut cmd = node.node_command(&bins.proxy);
    cmd.arg("status");
    let o = run_bounded(cmd, Duration::from_secs(30))?;
    println!("  $ proxy status   (services part)");
    for l in String::from_utf8_lossy(&o.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("services:"))
        .take_while(|l| !l.starts_with("open connections"))
    {
        println!("  {l}");
    }

    for target in [
        format!("{}:{PORT}", server.ipv4),
        format!("[{}]:{PORT}", server.ipv6),
    ] {
        step(&format!(
            "client pod connects to {target} (an ordinary address): 4 connections, 1 MiB each way"
        ));
        let mut cmd = client.command(&bins.meshtest);
        cmd.args([
            "client",
            "--connect",
            &target,
            "--send",
            "1048576",
            "--reply",
            "1048576",
            "--connections",
            "4",
            "--io",
            "poll",
            "--expect-greet",
            "1",
        ]);
        let o = run_bounded(cmd, Duration::from_secs(120))?;
        let text = String::from_utf8_lossy(&o.stdout);
        println!("  client: {}", text.trim());
        if !o.status.success() {
            bail!("the client failed: {}", String::from_utf8_lossy(&o.stderr));
        }
    }

    step("what the server saw (peer = the node's address: the bytes came through the proxy)");
    for l in srv.output().lines().filter(|l| l.starts_with("conn ")) {
        println!("  {l}");
    }

    step("what the proxy logged (original destinations recovered from the kernel)");
    for l in node
        .proxy_log_text()
        .lines()
        .filter(|l| l.contains("connection closed"))
    {
        let fields: Vec<&str> = l
            .split_whitespace()
            .filter(|w| {
                w.starts_with("client=") || w.starts_with("original_dst=") || w.starts_with("to_")
            })
            .collect();
        println!("  {}", fields.join("  "));
    }

    step("kernel counters (proxy counters --pin-dir ...), summed over CPUs");
    let counters = node.counters()?;
    let mut names: Vec<_> = counters.iter().filter(|(_, v)| **v > 0).collect();
    names.sort();
    for (n, v) in names {
        println!("  {n:<28} {v}");
    }

    step("bpftool: the programs, where they are attached, and the pinned maps");
    let pin = node.pin_dir.display().to_string();
    for prog in proxy_common::program::ALL {
        let path = format!("{pin}/progs/{prog}");
        show(
            Command::new("bpftool").args(["prog", "show", "pinned", &path]),
            |l| !l.trim().is_empty(),
        )?;
    }
    cgroup_tree(&node.id)?;
    show(
        Command::new("bpftool").args([
            "map",
            "show",
            "pinned",
            &format!("{pin}/maps/MESH_COUNTERS"),
        ]),
        |_| true,
    )?;
    show(Command::new("ls").args(["-R", &pin]), |_| true)?;

    step("stopping the proxy with SIGTERM: everything it attached and pinned goes");
    let status = node.stop_proxy("TERM")?;
    println!(
        "  proxy exited: {status}; pin dir exists: {}",
        node.pin_dir.exists()
    );
    cgroup_tree(&node.id)?;

    step("cleaning up the pods and the node");
    drop(srv);
    drop(backends);
    node.cleanup();
    println!("\nxtask: demo done. Run the tests with `cargo xtask test`.");
    Ok(())
}

/// `bpftool cgroup tree`, only the cgroups of this node (a path line, then its programs).
fn cgroup_tree(id: &str) -> Result<()> {
    let o = Command::new("bpftool").args(["cgroup", "tree"]).output()?;
    let text = String::from_utf8_lossy(&o.stdout);
    println!("  $ bpftool cgroup tree   (cgroups of {id} only)");
    let mut ours = false;
    let mut any = false;
    for l in text.lines() {
        if l.starts_with('/') {
            ours = l.contains(id);
        }
        if ours {
            any = true;
            println!("  {l}");
        }
    }
    if !any {
        println!("  (nothing attached)");
    }
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn show(cmd: &mut Command, keep: impl Fn(&str) -> bool) -> Result<()> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
    println!("  $ {}", format!("{cmd:?}").replace('"', ""));
    if lines.is_empty() {
        println!("  (nothing)");
    }
    for l in lines {
        println!("  {l}");
    }
    Ok(())
}

/// `cargo xtask demo --two-nodes`: two nodes joined by a link, a CA and an issuer, certificates
/// for the workloads, and a pod on node 0 calling a service whose endpoint is a pod on node 1:
/// the request crosses the link inside mutual TLS.
pub fn run_two_nodes() -> Result<()> {
    let (out, bins) = prepare("cargo xtask demo --two-nodes")?;
    let td = "cluster.local";
    step("making two nodes joined by a link, a client pod on node 0, a web pod on node 1");
    let mut node0 = Node::new(&bins)?;
    let mut node1 = Node::with_number(&bins, 1)?;
    let client = node0.add_pod("client")?;
    let web = node1.add_pod("web")?;
    tests::link(&mut node0, &mut node1)?;
    println!(
        "  node0 link {}  pods 10.77.0.0/16   node1 link {}  pods 10.78.0.0/16",
        node0.link_addr4(),
        node1.link_addr4()
    );
    let mut cmd = web.command(out.profile_dir.join("meshhttp"));
    cmd.args([
        "serve",
        "--listen",
        &format!("[::]:{PORT}"),
        "--name",
        "web-on-node1",
    ]);
    let mut server = Background::spawn(cmd, node1.scratch.join("web.out"))?;
    server.wait_for("ready")?;

    step("a CA (proxy ca init) and the issuer (proxy identity serve) on node 0");
    let ca = node0.scratch.join("ca");
    let proxy = |args: &[&str]| -> Result<String> {
        let o = Command::new(&bins.proxy).args(args).output()?;
        if !o.status.success() {
            bail!("proxy {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    print!(
        "{}",
        proxy(&[
            "ca",
            "init",
            "--dir",
            &ca.display().to_string(),
            "--trust-domain",
            td
        ])?
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect::<String>()
    );
    let issuer = tests::Issuer::start(
        &node0,
        &[&node0, &node1],
        &ca,
        td,
        &format!("spiffe://{td}/ns/shop/sa/*"),
        None,
    )?;
    let issuer_addr = issuer.address.clone();
    println!("  issuer on {issuer_addr}");

    step(
        "starting both proxies with [identity] and [mesh]; node 1 allows only the frontend identity",
    );
    let anchors = ca.join("anchors.pem");
    let ident = |node: &Node| {
        format!(
            "[identity]\ntrust_domain = \"{td}\"\nissuer = \"{issuer_addr}\"\nanchors = \"{}\"\ntoken_file = \"{}\"\n",
            anchors.display(),
            node.scratch.join("token").display()
        )
    };
    let config0 = format!(
        "{}[mesh]\nnode_name = \"node0\"\n[[mesh.peer]]\nname = \"node1\"\naddress = \"{}:15008\"\npod_cidrs = [\"10.78.0.0/16\"]\n\n[[service]]\nname = \"web\"\naddresses = [\"{VIP}\"]\nports = [80]\nendpoints = [ {{ address = \"{}\", port = {PORT}, identity = \"spiffe://{td}/ns/shop/sa/web\" }} ]\n\n[[workload]]\nname = \"frontend\"\nnamespace = \"shop\"\ncgroups = [\"{}/client\"]\n",
        ident(&node0),
        node1.link_addr4(),
        web.ipv4,
        node0.workload_cgroup_rel
    );
    let config1 = format!(
        "{}[mesh]\nnode_name = \"node1\"\n[[mesh.peer]]\nname = \"node0\"\naddress = \"{}:15008\"\npod_cidrs = [\"10.77.0.0/16\"]\n\n[[workload]]\nname = \"web\"\nnamespace = \"shop\"\ncgroups = [\"{}/web\"]\naddresses = [\"{}\"]\n\n[[policy]]\nname = \"web-from-frontend\"\nworkload = \"web\"\nnamespace = \"shop\"\nallow = [\"spiffe://{td}/ns/shop/sa/frontend\"]\n",
        ident(&node1),
        node0.link_addr4(),
        node1.workload_cgroup_rel,
        web.ipv4
    );
    for (node, config) in [(&mut node0, config0), (&mut node1, config1)] {
        let path = node.scratch.join("proxy.toml");
        std::fs::write(&path, config)?;
        node.start_proxy(&ProxyOptions {
            sockmap: false,
            ipv6: false,
            quiet: true,
            extra_args: vec!["--config".into(), path.display().to_string()],
            ..ProxyOptions::default()
        })?;
    }

    step(&format!(
        "the client pod on node 0 calls http://{VIP}/ (endpoint: the web pod on node 1)"
    ));
    let capture = node0.capture_link()?;
    let mut cmd = client.command("curl");
    cmd.args([
        "-s",
        "-i",
        "--max-time",
        "10",
        "-H",
        "x-secret: visible-only-inside-tls",
        &format!("http://{VIP}/headers"),
    ]);
    let o = run_bounded(cmd, Duration::from_secs(30))?;
    for l in String::from_utf8_lossy(&o.stdout).lines().take(12) {
        println!("  {l}");
    }
    let pcap = capture.stop_and_read()?;
    let seen = pcap
        .windows(b"visible-only-inside-tls".len())
        .any(|w| w == b"visible-only-inside-tls");
    println!(
        "  link capture: {} bytes, header value in cleartext: {}",
        pcap.len(),
        if seen { "YES (bug!)" } else { "no" }
    );

    step("what node 1 presents on its tunnel port (openssl s_client)");
    let mut cmd = node0.node_command("sh");
    cmd.args(["-c", &format!("echo | timeout 10 openssl s_client -connect {}:15008 -tls1_3 2>/dev/null | openssl x509 -noout -ext subjectAltName -issuer -enddate", node1.link_addr4())]);
    let o = run_bounded(cmd, Duration::from_secs(30))?;
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        println!("  {l}");
    }

    step("node 1's metrics: tunnel handshakes and authorization decisions");
    let mut cmd = node1.node_command("curl");
    cmd.args(["-s", "http://127.0.0.1:15020/metrics"]);
    let o = run_bounded(cmd, Duration::from_secs(30))?;
    for l in String::from_utf8_lossy(&o.stdout).lines().filter(|l| {
        !l.starts_with('#')
            && (l.contains("tunnel_handshakes")
                || l.contains("authz_decisions")
                || l.contains("identity_certificate_expiry"))
    }) {
        println!("  {l}");
    }

    step("cleaning up");
    drop(server);
    drop(issuer);
    node0.cleanup();
    node1.cleanup();
    println!("\nxtask: two-node demo done.");
    Ok(())
}
