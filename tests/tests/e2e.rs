//! End-to-end tests: the real proxy binary, the real kernel programs, pods made of network
//! namespaces and cgroups, and the meshtest client/server inside them.
//!
//! Each test builds its own node, so they run in parallel and clean up on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use tests::{
    Background, Binaries, Node, Pod, ProxyOptions, client_ok, require_privileges, run_bounded,
};

const SERVER_PORT: u16 = 8080;
const CLIENT_LIMIT: Duration = Duration::from_secs(240);

fn bins() -> Result<Binaries> {
    Binaries::locate(Path::new(env!("CARGO_BIN_EXE_meshtest")))
}

/// A node with a client pod and a server pod running `meshtest serve` on [::]:8080, plus
/// the proxy started with `opts`. The listener is dual-stack on purpose: IPv4 clients
/// arrive on AF_INET6 sockets with v4-mapped addresses, which the short-circuit must pair.
struct Setup {
    node: Node,
    /// meshtest I/O mode: event-driven (poll) with the short-circuit on, because a
    /// blocking reader on a SOCKHASH socket can get a spurious EAGAIN on this kernel
    /// (ARCHITECTURE.md, "Kernel facts"); plain blocking sockets otherwise.
    io: &'static str,
    client: Pod,
    server: Pod,
    servers: Vec<Background>,
}

impl Setup {
    fn new(opts: &ProxyOptions, greet: u64) -> Result<Setup> {
        let mut node = Node::new(&bins()?)?;
        let client = node.add_pod("client")?;
        let server = node.add_pod("server")?;
        let io = if opts.sockmap { "poll" } else { "blocking" };
        let mut servers = Vec::new();
        for (i, listen) in [format!("[::]:{SERVER_PORT}")].iter().enumerate() {
            let mut cmd = server.command(&node.bins.meshtest);
            cmd.args([
                "serve",
                "--listen",
                listen,
                "--greet",
                &greet.to_string(),
                "--io",
                io,
            ]);
            let mut bg = Background::spawn(cmd, node.scratch.join(format!("server{i}.out")))?;
            bg.wait_for("listening")?;
            servers.push(bg);
        }
        node.start_proxy(opts)?;
        Ok(Setup {
            node,
            io,
            client,
            server,
            servers,
        })
    }

    /// Runs `meshtest client` in the client pod (in its cgroup, so it is intercepted).
    fn client(&self, target: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.client.command(&self.node.bins.meshtest);
        cmd.args(["client", "--connect", target, "--io", self.io])
            .args(args);
        self.node.client_ok(run_bounded(cmd, CLIENT_LIMIT)?)
    }

    /// What the servers printed, one line per connection. A server prints a connection's
    /// line after closing it, so a client can return first: the lines are read once their
    /// count has been stable for 200 ms (at most 5 s).
    fn server_lines(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut last = self.read_server_lines();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.read_server_lines();
            if now.len() == last.len() || std::time::Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    fn read_server_lines(&self) -> Vec<String> {
        self.servers.iter().flat_map(conn_lines).collect()
    }

    /// The servers' lines once there are at least `n` (waiting up to 10 s), or what there is.
    fn server_lines_at_least(&self, n: usize) -> Vec<String> {
        lines_at_least(n, || self.read_server_lines())
    }

    fn v4(&self) -> String {
        format!("{}:{SERVER_PORT}", self.server.ipv4)
    }
}

/// What `read` returns once it has at least `n` lines (waiting up to 10 s), or what there is:
/// a server prints a connection's line after closing it, maybe after its client ended.
fn lines_at_least(n: usize, read: impl Fn() -> Vec<String>) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines = read();
        if lines.len() >= n || std::time::Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `conn ` lines a `meshtest serve` printed.
fn conn_lines(server: &Background) -> Vec<String> {
    server
        .output()
        .lines()
        .filter(|l| l.starts_with("conn "))
        .map(String::from)
        .collect()
}

/// Fails unless `lines` are `n` server lines, each of a connection whose upload it verified.
fn all_verified(lines: &[String], n: u64) -> Result<()> {
    ensure!(
        lines.len() as u64 == n && lines.iter().all(|l| l.contains("verified=true")),
        "the server saw {} connections (expected {n}), not all intact: {:?}",
        lines.len(),
        lines.iter().find(|l| !l.contains("verified=true"))
    );
    Ok(())
}

macro_rules! require {
    () => {
        if !require_privileges()? {
            return Ok(());
        }
    };
}

/// `meshtest serve` on [`SERVER_PORT`] in `pod`, once it listens.
fn meshtest_server(node: &Node, pod: &Pod, extra: &[&str]) -> Result<Background> {
    let mut cmd = pod.command(&node.bins.meshtest);
    cmd.args(["serve", "--listen", &format!("[::]:{SERVER_PORT}")])
        .args(extra);
    let mut bg = Background::spawn(cmd, node.scratch.join("server.out"))?;
    bg.wait_for("listening")?;
    Ok(bg)
}

fn counter(node: &Node, name: &str) -> Result<u64> {
    node.counter(name)
}

// === forwarding ===

#[test]
fn pod_reaches_pod_through_proxy_with_original_destination() -> Result<()> {
    require!();
    let s = Setup::new(&ProxyOptions::default(), 0)?;
    let before = counter(&s.node, "connect4_redirected")?;
    s.client(&s.v4(), &["--send", "1000", "--reply", "2000"])?;
    // The server sees the node's address, not the client pod's: the bytes came through
    // the proxy.
    let lines = s.server_lines();
    ensure!(lines.len() == 1, "one connection expected: {lines:?}");
    ensure!(
        lines[0].contains(&format!("peer={}:", s.server.gateway4))
            && lines[0].contains("received=1000 verified=true"),
        "server line: {}",
        lines[0]
    );
    let log = s.node.proxy_log_text();
    let want = format!("client={}:", s.client.ipv4);
    let dst = format!("original_dst={}", s.v4());
    ensure!(
        log.lines().any(|l| l.contains("connection closed")
            && l.contains(&want)
            && l.contains(&dst)
            && l.contains("to_upstream=1032")
            && l.contains("to_client=2001")),
        "proxy log lacks the connection with original_dst {dst}:\n{log}"
    );
    // Exactly one redirect: the proxy's own upstream connect was not intercepted.
    ensure!(
        counter(&s.node, "connect4_redirected")? == before + 1,
        "connect4_redirected should grow by exactly 1"
    );
    ensure!(counter(&s.node, "orig_dst_recorded")? >= 1);
    Ok(())
}

/// `meshtest client` in the client pod with blocking I/O after a connect with a timeout
/// (Rust's `connect_timeout`: non-blocking during the connect, blocking after), against the
/// server of `s`, with `args`.
fn timed_connect_blocking_client(s: &Setup, args: &[&str]) -> Result<String> {
    let mut cmd = s.client.command(&s.node.bins.meshtest);
    cmd.args(["client", "--connect", &s.v4(), "--io", "blocking"])
        .args(args);
    s.node.client_ok(run_bounded(cmd, CLIENT_LIMIT)?)
}

/// The kernel counters of client sockets judged blocking: (kept off at connect, left by
/// themselves at their first send, removed by sock_ops, asked the proxy).
fn blocking_counts(node: &Node) -> Result<[u64; 4]> {
    Ok([
        counter(node, "sockhash_skipped_blocking")?,
        counter(node, "turned_blocking_leaving")?,
        counter(node, "sockhash_self_removed")?,
        counter(node, "turned_blocking_asked")?,
    ])
}

/// How much each of `blocking_counts` grew since `before`.
fn blocking_counts_since(node: &Node, before: [u64; 4]) -> Result<[u64; 4]> {
    let after = blocking_counts(node)?;
    Ok([0, 1, 2, 3].map(|i| after[i] - before[i]))
}

fn softirq_name(rps: bool) -> &'static str {
    if rps {
        "softirq spread (RPS)"
    } else {
        "default softirq"
    }
}

/// A client that connects with a timeout (non-blocking during the connect, as Rust's
/// `connect_timeout`, hiredis or libmysqlclient do) and then does blocking I/O is registered
/// by sock_ops, which judges it inside `connect()`. Its first send finds it blocking and, as
/// nothing was redirected into it yet, it leaves the SOCKHASH inside that send (sock_ops
/// removes it while the message goes out), so its blocking read after `shutdown(SHUT_WR)` is
/// plain TCP's. On the SOCKHASH that read can be woken by the ACK of its FIN with nothing to
/// read, and the kernel's `tcp_bpf_recvmsg` then returns EAGAIN (ARCHITECTURE.md, "Spurious
/// EAGAIN"); with softirq spread over the CPUs (RPS) that ACK often comes while it waits.
/// With RPS the handshake's end may also be handled after the client switched back to
/// blocking, and sock_ops then keeps it off at once. Either way no client socket may stay
/// registered, and every connection must deliver its bytes.
///
/// Then a server that speaks first: a greeting redirected into the client before its first
/// send would keep it from leaving by itself (that would drop unread bytes), so the proxy's
/// socket sends to a client not judged yet by TCP (`msg_passed_unjudged`), and the client
/// leaves at its first send as before.
#[test]
fn clients_that_turn_blocking_after_a_timed_connect_leave_at_their_first_send() -> Result<()> {
    require!();
    const CONNECTIONS: u64 = 200;
    let s = Setup::new(&ProxyOptions::default(), 0)?;
    for rps in [false, true] {
        if rps {
            s.node.spread_softirq()?;
        }
        let before = blocking_counts(&s.node)?;
        let out = timed_connect_blocking_client(
            &s,
            &[
                "--send",
                "1000",
                "--reply",
                "10",
                "--connections",
                &CONNECTIONS.to_string(),
            ],
        )?;
        ensure!(
            out.contains(&format!("\"connections\":{CONNECTIONS}")),
            "the client did not report {CONNECTIONS} connections: {out}"
        );
        let [kept_off, leaving, removed, asked] = blocking_counts_since(&s.node, before)?;
        let softirq = softirq_name(rps);
        println!(
            "{CONNECTIONS} blocking clients after a timed connect, {softirq}: {kept_off} kept off at connect, {leaving} left at their first send, {removed} removed by sock_ops, {asked} asked the proxy"
        );
        ensure!(
            kept_off + leaving == CONNECTIONS && removed == leaving && asked == 0 && leaving > 0,
            "{softirq}: of {CONNECTIONS} blocking client sockets, {kept_off} were kept off at connect, {leaving} left by themselves at their first send, {removed} were removed from the SOCKHASH and {asked} asked the proxy; expected every one kept off or removed, some of them at their first send"
        );
    }
    let metrics = s.node.admin_metrics()?;
    let exported = tests::metric_sum(&metrics, "mesh_ebpf_sockhash_self_removed_total", &[]);
    ensure!(
        exported > 0.0,
        "the admin metrics show no socket that left the SOCKHASH by itself (mesh_ebpf_sockhash_self_removed_total)"
    );
    drop(s);

    // A server that speaks first: its greeting goes by TCP (the client was not judged yet),
    // so the client can still leave by itself at its first send.
    const GREETED: u64 = 100;
    let s = Setup::new(&ProxyOptions::default(), 100)?;
    for rps in [false, true] {
        if rps {
            s.node.spread_softirq()?;
        }
        let held = counter(&s.node, "msg_passed_unjudged")?;
        let before = blocking_counts(&s.node)?;
        timed_connect_blocking_client(
            &s,
            &[
                "--expect-greet",
                "100",
                "--send",
                "1000",
                "--reply",
                "10",
                "--connections",
                &GREETED.to_string(),
            ],
        )?;
        let held = counter(&s.node, "msg_passed_unjudged")? - held;
        let [kept_off, leaving, removed, asked] = blocking_counts_since(&s.node, before)?;
        let softirq = softirq_name(rps);
        println!(
            "{GREETED} blocking clients greeted first, {softirq}: {held} greetings held on TCP, {kept_off} kept off at connect, {leaving} left at their first send, {removed} removed by sock_ops, {asked} asked the proxy"
        );
        ensure!(
            kept_off + leaving == GREETED && removed == leaving && asked == 0 && held >= leaving,
            "{softirq}: of {GREETED} blocking clients greeted first, {kept_off} were kept off at connect, {leaving} left by themselves at their first send, {removed} were removed and {asked} asked the proxy, {held} greetings went by TCP; expected every registered one to get its greeting by TCP and leave"
        );
    }
    Ok(())
}

/// A server whose listener is non-blocking but which serves each connection with blocking
/// I/O (Python's `accept()` on a listener with a timeout) is registered by its listener's
/// mode. The request is redirected into it before its first send, so when that send finds
/// it blocking it may not leave by itself (unread bytes would be dropped): it asks the proxy
/// to take the connection off (`turned_blocking_asked`, `detach_wanted`). Every byte of
/// every connection arrives.
#[test]
fn servers_that_serve_blocking_under_a_non_blocking_listener_ask_the_proxy() -> Result<()> {
    require!();
    const CONNECTIONS: u64 = 100;
    let mut node = Node::new(&bins()?)?;
    let client = node.add_pod("client")?;
    let server = node.add_pod("server")?;
    let bg = meshtest_server(&node, &server, &["--io", "poll", "--blocking-connections"])?;
    node.start_proxy(&ProxyOptions::default())?;
    let (before, wanted) = (blocking_counts(&node)?, counter(&node, "detach_wanted")?);
    let mut c = client.command(&node.bins.meshtest);
    c.args([
        "client",
        "--connect",
        &format!("{}:{SERVER_PORT}", server.ipv4),
        "--send",
        "1000",
        "--reply",
        "100000",
        "--connections",
        &CONNECTIONS.to_string(),
        "--io",
        "poll",
    ]);
    node.client_ok(run_bounded(c, CLIENT_LIMIT)?)?;
    let [kept_off, leaving, removed, asked] = blocking_counts_since(&node, before)?;
    let wanted = counter(&node, "detach_wanted")? - wanted;
    println!(
        "{CONNECTIONS} blocking connections of a non-blocking listener: {asked} asked the proxy ({wanted} asks in all), {leaving} left by themselves, {removed} removed by their sock_ops (leaving with their connection), {kept_off} kept off"
    );
    ensure!(
        asked + leaving + kept_off == CONNECTIONS && asked > 0 && wanted >= asked,
        "of {CONNECTIONS} server sockets that were blocking at their first send, {asked} asked the proxy ({wanted} asks counted), {leaving} left by themselves and {kept_off} were kept off; expected each to ask or leave, most to ask (the request was redirected into them first)"
    );
    all_verified(
        &lines_at_least(CONNECTIONS as usize, || conn_lines(&bg)),
        CONNECTIONS,
    )?;
    Ok(())
}

/// An upload of small writes is a stream (the stream rule), and nothing was redirected into
/// its client (the server answers only at the end), so the client's socket leaves the
/// SOCKHASH by itself with the message that made it a stream (`detach_self`, removed by
/// sock_ops: `sockhash_self_removed`), without waiting for the proxy; the proxy takes the
/// other three sockets off. Every byte arrives: the server verifies each upload, the client
/// each reply. Per hop (the kernel-only path off: there streams do not leave).
#[test]
fn small_write_uploads_leave_the_sockhash_by_themselves_and_lose_nothing() -> Result<()> {
    require!();
    const CONNECTIONS: u64 = 20;
    let opts = ProxyOptions {
        extra_args: ["--kernel-path", "off"].map(String::from).into(),
        ..ProxyOptions::default()
    };
    let s = Setup::new(&opts, 0)?;
    let before = [
        counter(&s.node, "detach_self")?,
        counter(&s.node, "sockhash_self_removed")?,
    ];
    s.client(
        &s.v4(),
        &[
            "--send",
            &(1u64 << 20).to_string(),
            "--reply",
            "1000",
            "--max-write",
            "64",
            "--connections",
            &CONNECTIONS.to_string(),
        ],
    )?;
    let (left, removed) = (
        counter(&s.node, "detach_self")? - before[0],
        counter(&s.node, "sockhash_self_removed")? - before[1],
    );
    // Servers' sockets may leave by themselves too, once the proxy marked the connection
    // leaving and their queue is empty (`removed` counts both).
    println!(
        "{CONNECTIONS} uploads of 64-byte writes: {left} client sockets left by themselves, {removed} workload sockets removed by their sock_ops"
    );
    ensure!(
        left > 0 && removed >= left,
        "{left} of {CONNECTIONS} uploading clients left the SOCKHASH by themselves and their sock_ops removed {removed} workload sockets; expected some to leave, all of them removed"
    );
    all_verified(&s.server_lines_at_least(CONNECTIONS as usize), CONNECTIONS)?;
    Ok(())
}

/// `Node::share_cpu_per_pod` (the bench's `--cpu-per-pod`): each pod's processes and the
/// proxy land in CPU groups of their own (cgroup v1 `cpu`), traffic still flows, and the
/// groups are gone with the node.
#[test]
fn cpu_groups_per_pod_hold_the_pods_and_the_proxy() -> Result<()> {
    require!();
    let mut node = Node::new(&bins()?)?;
    node.share_cpu_per_pod()?;
    let client = node.add_pod("client")?;
    let server = node.add_pod("server")?;
    let bg = meshtest_server(&node, &server, &[])?;
    node.start_proxy(&ProxyOptions::default())?;
    let mut cat = client.command("cat");
    cat.arg("/proc/self/cgroup");
    let out = run_bounded(cat, Duration::from_secs(10))?;
    let groups = String::from_utf8_lossy(&out.stdout).into_owned();
    let want = format!(":cpu:/{}/client\n", node.id);
    ensure!(
        groups.contains(&want),
        "the client pod's process is not in its CPU group ({want:?}): {groups}"
    );
    let proxy_group = node
        .proxy_cpu_cgroup()
        .context("the node has no proxy CPU group")?;
    let procs = std::fs::read_to_string(proxy_group.join("cgroup.procs"))?;
    let names: Vec<String> = procs
        .lines()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    ensure!(
        names.iter().any(|n| n == "proxy"),
        "the proxy is not in its CPU group {}: {names:?}",
        proxy_group.display()
    );
    let target = format!("{}:{SERVER_PORT}", server.ipv4);
    let mut c = client.command(&node.bins.meshtest);
    // A blocking client after a connect with a timeout: before it left the SOCKHASH at its
    // first send, its read after shutdown(SHUT_WR) failed with a spurious EAGAIN here twice,
    // once in CI, the CPU groups making the wake-up by the ACK of its FIN likelier.
    c.args([
        "client",
        "--connect",
        &target,
        "--send",
        "1000",
        "--reply",
        "10",
        "--io",
        "blocking",
    ]);
    node.client_ok(run_bounded(c, CLIENT_LIMIT)?)?;
    let root = proxy_group
        .parent()
        .context("the proxy CPU group has no parent")?
        .to_path_buf();
    drop(bg);
    drop(node);
    ensure!(
        !root.exists(),
        "the node's CPU groups outlived it: {}",
        root.display()
    );
    Ok(())
}

#[test]
fn ipv6_and_v4_mapped_end_to_end() -> Result<()> {
    require!();
    let s = Setup::new(&ProxyOptions::default(), 0)?;
    let v6 = format!("[{}]:{SERVER_PORT}", s.server.ipv6);
    s.client(
        &v6,
        &["--send", "70000", "--reply", "70000", "--connections", "5"],
    )?;
    let log = s.node.proxy_log_text();
    ensure!(
        log.contains(&format!("original_dst={v6}"))
            && log.contains(&format!("client=[{}]:", s.client.ipv6)),
        "proxy log lacks the IPv6 original destination {v6}:\n{log}"
    );
    ensure!(counter(&s.node, "connect6_redirected")? >= 5);
    // An AF_INET6 socket dialling a v4-mapped address talks IPv4 on the wire.
    let mapped = format!("[::ffff:{}]:{SERVER_PORT}", s.server.ipv4);
    s.client(&mapped, &["--send", "5000", "--reply", "5000"])?;
    ensure!(
        s.node
            .proxy_log_text()
            .contains(&format!("original_dst={}", s.v4())),
        "v4-mapped connect not recorded as its IPv4 destination"
    );
    for l in s.server_lines() {
        ensure!(l.contains("verified=true"), "{l}");
        ensure!(
            l.contains(&s.server.gateway4.to_string()) || l.contains(&full_v6(&s.server.gateway6)),
            "connection did not come from the node: {l}"
        );
    }
    Ok(())
}

/// The server's log prints IPv6 peers the way std formats them.
fn full_v6(ip: &std::net::Ipv6Addr) -> String {
    ip.to_string()
}

// === integrity ===

fn integrity(opts: ProxyOptions) -> Result<()> {
    let s = Setup::new(&opts, 0)?;
    let sizes: [u64; 5] = [1, 1024, 64 * 1024, 1 << 20, 64 << 20];
    for (i, size) in sizes.iter().enumerate() {
        let sz = size.to_string();
        let seed = (100 + i).to_string();
        // Both directions at once in size, random write splits, half-close in the middle.
        s.client(
            &s.v4(),
            &[
                "--send",
                &sz,
                "--reply",
                &sz,
                "--seed",
                &seed,
                "--max-write",
                "70000",
            ],
        )
        .with_context(|| format!("{size} bytes, {} mode", opts.mode))?;
    }
    // Tiny writes: every byte its own write on a 64 KiB stream.
    s.client(
        &s.v4(),
        &[
            "--send",
            "65536",
            "--reply",
            "65536",
            "--max-write",
            "1",
            "--seed",
            "7",
        ],
    )?;
    // Concurrency.
    s.client(
        &s.v4(),
        &[
            "--send",
            "65536",
            "--reply",
            "32768",
            "--connections",
            "100",
            "--seed",
            "9000",
        ],
    )
    .context("100 concurrent connections")?;
    // The server prints a connection's line after it closed it, so the client can finish
    // first: wait (bounded) for the lines, then require the exact count.
    let lines = s.server_lines_at_least(sizes.len() + 1 + 100);
    ensure!(
        lines.len() == sizes.len() + 1 + 100,
        "server saw {} connections",
        lines.len()
    );
    for l in &lines {
        ensure!(l.contains("verified=true"), "{l}");
        ensure!(
            l.contains(&format!("peer={}:", s.server.gateway4)),
            "not proxied: {l}"
        );
    }
    Ok(())
}

#[test]
fn integrity_ebpf_with_sockmap() -> Result<()> {
    require!();
    integrity(ProxyOptions::default())
}

#[test]
fn integrity_ebpf_without_sockmap() -> Result<()> {
    require!();
    integrity(ProxyOptions {
        sockmap: false,
        ..ProxyOptions::default()
    })
}

#[test]
fn integrity_iptables() -> Result<()> {
    require!();
    integrity(ProxyOptions {
        mode: "iptables",
        sockmap: false,
        ..ProxyOptions::default()
    })
}

// === the short-circuit ===

#[test]
fn short_circuit_carries_the_bytes() -> Result<()> {
    require!();
    // The per-hop short-circuit: every byte through the proxy (tests/tests/kernel_path.rs
    // has the kernel-only path, on by default, where bytes skip the proxy). The stream rule
    // off: on, the default, the 1 MiB upload is a stream and leaves for plain TCP
    // (tests/tests/short_circuit.rs has that).
    let opts = ProxyOptions {
        extra_args: ["--kernel-path", "off", "--sockmap-small-streak", "0"]
            .map(String::from)
            .into(),
        ..ProxyOptions::default()
    };
    let s = Setup::new(&opts, 1)?;
    let before = counter(&s.node, "msg_redirected_bytes")?;
    const N: u64 = 1 << 20;
    // The client waits for the server's greeting before it writes, so all four sockets
    // (client, proxy in, proxy out, server) are registered before the first upload byte.
    s.client(
        &s.v4(),
        &[
            "--send",
            &N.to_string(),
            "--reply",
            &N.to_string(),
            "--expect-greet",
            "1",
        ],
    )?;
    let grown = counter(&s.node, "msg_redirected_bytes")? - before;
    // Each direction crosses two same-node hops (client->proxy, proxy->server), both
    // redirected: at least 2 x (upload + reply).
    ensure!(
        grown >= 4 * N,
        "msg_redirected_bytes grew by {grown}, expected at least {}",
        4 * N
    );
    ensure!(counter(&s.node, "sockhash_inserted")? >= 4);
    Ok(())
}

#[test]
fn no_short_circuit_with_sockmap_off() -> Result<()> {
    require!();
    let s = Setup::new(
        &ProxyOptions {
            sockmap: false,
            ..ProxyOptions::default()
        },
        1,
    )?;
    s.client(
        &s.v4(),
        &[
            "--send",
            "100000",
            "--reply",
            "100000",
            "--expect-greet",
            "1",
        ],
    )?;
    let c = s.node.counters()?;
    for name in [
        "msg_redirected",
        "msg_redirected_bytes",
        "sockhash_inserted",
    ] {
        ensure!(
            c.get(name) == Some(&0),
            "{name} = {:?} with sockmap off",
            c.get(name)
        );
    }
    ensure!(c.get("connect4_redirected") >= Some(&1));
    Ok(())
}

#[test]
fn server_speaks_first_and_data_right_after_connect() -> Result<()> {
    require!();
    let s = Setup::new(&ProxyOptions::default(), 512)?;
    // The client reads a 512-byte greeting the server writes on accept.
    s.client(
        &s.v4(),
        &["--send", "10", "--reply", "10", "--expect-greet", "512"],
    )?;
    // Separately: many connections that write immediately after connect() returns, while
    // the peer sockets may not be registered yet. Every byte must arrive, in order.
    let s2 = Setup::new(&ProxyOptions::default(), 0)?;
    s2.client(
        &s2.v4(),
        &[
            "--send",
            "4096",
            "--reply",
            "4096",
            "--connections",
            "200",
            "--max-write",
            "512",
        ],
    )?;
    for l in s2.server_lines() {
        ensure!(l.contains("verified=true"), "{l}");
    }
    Ok(())
}

// === what is not intercepted ===

#[test]
fn excluded_ports_outside_processes_and_udp_are_not_intercepted() -> Result<()> {
    require!();
    let mut s = Setup::new(
        &ProxyOptions {
            exclude_ports: vec![9090],
            ..ProxyOptions::default()
        },
        0,
    )?;
    let mut cmd = s.server.command(&s.node.bins.meshtest);
    cmd.args(["serve", "--listen", "0.0.0.0:9090"]);
    let mut excluded = Background::spawn(cmd, s.node.scratch.join("server9090.out"))?;
    excluded.wait_for("listening")?;

    // Excluded port: straight to the server, which sees the client pod's own address.
    let before = counter(&s.node, "bypass_excluded_port")?;
    s.client(
        &format!("{}:9090", s.server.ipv4),
        &["--send", "100", "--reply", "100"],
    )?;
    ensure!(
        excluded
            .output()
            .contains(&format!("peer={}:", s.client.ipv4)),
        "excluded port went through the proxy: {}",
        excluded.output()
    );
    ensure!(counter(&s.node, "bypass_excluded_port")? == before + 1);

    // A process in the pod's network namespace but outside the workload cgroups.
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", s.client.netns))
        .arg("--")
        .arg(&s.node.bins.meshtest)
        .args([
            "client",
            "--connect",
            &s.v4(),
            "--send",
            "100",
            "--reply",
            "100",
        ]);
    let redirected = counter(&s.node, "connect4_redirected")?;
    client_ok(run_bounded(cmd, CLIENT_LIMIT)?)?;
    ensure!(
        s.server_lines()
            .iter()
            .any(|l| l.contains(&format!("peer={}:", s.client.ipv4))),
        "a process outside the workload cgroups was intercepted: {:?}",
        s.server_lines()
    );
    ensure!(counter(&s.node, "connect4_redirected")? == redirected);

    // UDP: connect() on a UDP socket runs connect4 too; it must be left alone.
    let before = counter(&s.node, "bypass_not_tcp")?;
    let mut cmd = s.client.command("python3");
    cmd.args([
        "-c",
        &format!(
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('{}', 5353)); print(s.getpeername())",
            s.server.ipv4
        ),
    ]);
    let out = run_bounded(cmd, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "udp connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains(&s.server.ipv4.to_string()),
        "UDP destination was rewritten: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(counter(&s.node, "bypass_not_tcp")? == before + 1);
    drop(excluded);
    s.node.cleanup();
    Ok(())
}

// === lifecycle ===

fn cgroup_has_programs(cgroup: &Path) -> Result<bool> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.contains("\"id\""))
}

fn pin_dir_entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["maps", "progs", "links"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            out.extend(rd.flatten().map(|e| e.path()));
        }
    }
    out
}

#[test]
fn sigterm_detaches_everything() -> Result<()> {
    require!();
    let mut s = Setup::new(&ProxyOptions::default(), 0)?;
    s.client(&s.v4(), &["--send", "1000", "--reply", "1000"])?;
    ensure!(
        cgroup_has_programs(&s.node.workload_cgroup)?,
        "nothing attached while running"
    );
    ensure!(
        !pin_dir_entries(&s.node.pin_dir).is_empty(),
        "nothing pinned while running"
    );
    let status = s.node.stop_proxy("TERM")?;
    ensure!(status.success(), "proxy exit status {status}");
    ensure!(
        !cgroup_has_programs(&s.node.workload_cgroup)?,
        "programs left attached after SIGTERM"
    );
    ensure!(
        !s.node.pin_dir.exists(),
        "pin dir left: {:?}",
        pin_dir_entries(&s.node.pin_dir)
    );
    ensure!(
        !s.node.cgroup_root.join("proxy").exists(),
        "proxy cgroup left after SIGTERM"
    );
    // Connects go direct again.
    s.client(&s.v4(), &["--send", "10", "--reply", "10"])?;
    ensure!(
        s.server_lines()
            .iter()
            .any(|l| l.contains(&format!("peer={}:", s.client.ipv4)))
    );
    Ok(())
}

#[test]
fn fail_open_after_sigkill_then_restart_recovers() -> Result<()> {
    require!();
    let mut s = Setup::new(&ProxyOptions::default(), 0)?;
    s.node.stop_proxy("KILL")?;
    // The connect programs went with the process: workloads connect directly.
    s.client(&s.v4(), &["--send", "100", "--reply", "100"])?;
    ensure!(
        s.server_lines()
            .last()
            .is_some_and(|l| l.contains(&format!("peer={}:", s.client.ipv4))),
        "after SIGKILL in fail-open mode the connect should go direct: {:?}",
        s.server_lines()
    );
    // A restart on the same pin directory replaces the stale pins by itself.
    s.node.start_proxy(&ProxyOptions::default())?;
    ensure!(
        s.node
            .proxy_log_text()
            .contains("did not shut down cleanly"),
        "restart did not report the stale pins"
    );
    s.client(&s.v4(), &["--send", "100", "--reply", "100"])?;
    ensure!(
        s.server_lines()
            .last()
            .is_some_and(|l| l.contains(&format!("peer={}:", s.server.gateway4))),
        "after restart the connect should go through the proxy: {:?}",
        s.server_lines()
    );
    Ok(())
}

#[test]
fn fail_closed_refuses_while_down() -> Result<()> {
    require!();
    let closed = ProxyOptions {
        fail_mode: "closed",
        ..ProxyOptions::default()
    };
    let mut s = Setup::new(&closed, 0)?;
    s.client(&s.v4(), &["--send", "100", "--reply", "100"])?;
    s.node.stop_proxy("KILL")?;
    let mut cmd = s.client.command(&s.node.bins.meshtest);
    cmd.args([
        "client",
        "--connect",
        &s.v4(),
        "--send",
        "1",
        "--reply",
        "1",
    ]);
    let out = run_bounded(cmd, CLIENT_LIMIT)?;
    ensure!(
        !out.status.success(),
        "fail-closed: a connect succeeded while the proxy was down"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("refused"),
        "expected connection refused: {text}"
    );
    // Restart: served again, through the proxy.
    s.node.start_proxy(&closed)?;
    s.client(&s.v4(), &["--send", "100", "--reply", "100"])?;
    // Stop cleanly: fail-closed keeps the connect programs; `proxy clean` removes them.
    s.node.stop_proxy("TERM")?;
    ensure!(
        cgroup_has_programs(&s.node.workload_cgroup)?,
        "fail-closed should keep connect programs after SIGTERM"
    );
    let out = Command::new(&s.node.bins.proxy)
        .args(["clean", "--pin-dir"])
        .arg(&s.node.pin_dir)
        .output()?;
    ensure!(
        out.status.success(),
        "proxy clean: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !cgroup_has_programs(&s.node.workload_cgroup)?,
        "proxy clean left programs attached"
    );
    ensure!(!s.node.pin_dir.exists(), "proxy clean left the pin dir");
    s.client(&s.v4(), &["--send", "10", "--reply", "10"])?;
    Ok(())
}

#[test]
fn second_instance_on_same_pin_dir_is_refused() -> Result<()> {
    require!();
    let s = Setup::new(&ProxyOptions::default(), 0)?;
    let mut cmd = s.node.node_command(&s.node.bins.proxy);
    cmd.args([
        "run",
        "--redirect-ipv4",
        "10.77.255.1",
        "--port",
        "15002",
        "--workload-cgroup",
        &s.node.workload_cgroup_rel,
        "--proxy-cgroup",
        &format!("{}/proxy2", s.node.id),
        "--pin-dir",
    ])
    .arg(&s.node.pin_dir);
    let out = run_bounded(cmd, Duration::from_secs(60))?;
    ensure!(out.status.code() == Some(5), "exit status {}", out.status);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("another proxy is running with pin directory"),
        "{err}"
    );
    // The first one is unaffected.
    s.client(&s.v4(), &["--send", "100", "--reply", "100"])?;
    Ok(())
}

#[test]
fn check_and_config_errors() -> Result<()> {
    require!();
    let b = bins()?;
    let out = Command::new(&b.proxy)
        .args(["check", "--redirect-ipv4", "10.0.0.1"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "proxy check failed on this machine:\n{text}"
    );
    ensure!(
        text.contains("programs accepted by this kernel's verifier"),
        "{text}"
    );
    // With the short-circuit on, the start-up listener scan needs the host's PID namespace:
    // in a namespace of its own (as a pod without hostPID), check says so and names the fix.
    let out = Command::new("unshare")
        .args(["--pid", "--fork"])
        .arg(&b.proxy)
        .args(["check", "--redirect-ipv4", "10.0.0.1", "--sockmap", "on"])
        .output()
        .context("running unshare (util-linux)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success()
            && text.contains("[FAIL] PID namespace")
            && text.contains("hostPID: true"),
        "proxy check in a PID namespace of its own: {}\n{text}",
        out.status
    );
    let out = Command::new(&b.proxy)
        .args(["run", "--redirect-ipv4", "10.0.0.300"])
        .output()?;
    ensure!(
        out.status.code() == Some(3),
        "bad config exit status {}",
        out.status
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("proxy.redirect_ipv4") && err.contains("10.0.0.300") && err.contains("fix:"),
        "{err}"
    );
    Ok(())
}

#[test]
fn full_sockhash_degrades_to_the_tcp_path() -> Result<()> {
    require!();
    // 64 entries carry 16 short-circuited connections; 400 concurrent ones overflow it.
    // 400 also guards the original-destination map: it was once sized with the SOCKHASH
    // (here 128 entries) and held every open connection, so an LRU eviction reset
    // connections the proxy had not accepted yet.
    let s = Setup::new(
        &ProxyOptions {
            extra_args: vec!["--sockhash-entries".into(), "64".into()],
            ..ProxyOptions::default()
        },
        0,
    )?;
    s.client(
        &s.v4(),
        &[
            "--send",
            "50000",
            "--reply",
            "50000",
            "--connections",
            "400",
        ],
    )?;
    // The flow table has the SOCKHASH's size and is filled first, so either may say it.
    ensure!(
        counter(&s.node, "sockhash_insert_failed")? + counter(&s.node, "flow_insert_failed")? > 0,
        "100 connections should overflow a 64-entry SOCKHASH"
    );
    for l in s.server_lines() {
        ensure!(l.contains("verified=true"), "{l}");
    }
    Ok(())
}

#[test]
fn two_proxies_on_one_machine_do_not_interfere() -> Result<()> {
    require!();
    let a = Setup::new(&ProxyOptions::default(), 0)?;
    let b = Setup::new(&ProxyOptions::default(), 0)?;
    let b_before = b.node.counters()?;
    a.client(
        &a.v4(),
        &[
            "--send",
            "100000",
            "--reply",
            "100000",
            "--connections",
            "3",
        ],
    )?;
    ensure!(counter(&a.node, "connect4_redirected")? >= 3);
    ensure!(
        b.node.counters()? == b_before,
        "traffic on node A moved node B's counters"
    );
    b.client(&b.v4(), &["--send", "1000", "--reply", "1000"])?;
    ensure!(b.server_lines().len() == 1 && a.server_lines().len() == 3);
    // Checked against B's pin directory, A's programs on A's workload cgroup are foreign:
    // `proxy check` must name them.
    let out = Command::new(&a.node.bins.proxy)
        .args([
            "check",
            "--redirect-ipv4",
            "10.77.255.1",
            "--workload-cgroup",
            &a.node.workload_cgroup_rel,
            "--pin-dir",
        ])
        .arg(&b.node.pin_dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == Some(4), "check should fail: {text}");
    ensure!(
        text.contains("mesh_connect4") && text.contains("already has"),
        "{text}"
    );
    Ok(())
}

// === admin API ===

/// GET from the admin API inside the node namespace, with curl (as an operator would).
fn admin_get(node: &Node, path: &str) -> Result<(u16, String)> {
    let mut cmd = node.node_command("curl");
    cmd.args([
        "-s",
        "-w",
        "\n%{http_code}",
        &format!("http://127.0.0.1:15020{path}"),
    ]);
    let out = run_bounded(cmd, Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// The value of the first sample line that starts with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn admin_api_reports_readiness_exact_metrics_and_connections() -> Result<()> {
    require!();
    let s = Setup::new(&ProxyOptions::default(), 0)?;
    let (code, body) = admin_get(&s.node, "/ready")?;
    ensure!(
        code == 200 && body.contains("ready"),
        "/ready: {code} {body}"
    );
    let (code, _) = admin_get(&s.node, "/live")?;
    ensure!(code == 200);

    // Exactly known bytes: 3 connections, each 32 header + 12345 up, 1 status + 54321 down.
    s.client(
        &s.v4(),
        &["--send", "12345", "--reply", "54321", "--connections", "3"],
    )?;
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = admin_get(&s.node, "/metrics")?.1;
        if sample(&metrics, "mesh_tcp_connections_closed_total") == Some(3.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let up = sample(
        &metrics,
        "mesh_tcp_transferred_bytes_total{direction=\"outbound\",protocol=\"tcp\",source_workload=\"unknown\",destination=\"external\",flow=\"to_upstream\"}",
    );
    let down = sample(
        &metrics,
        "mesh_tcp_transferred_bytes_total{direction=\"outbound\",protocol=\"tcp\",source_workload=\"unknown\",destination=\"external\",flow=\"to_client\"}",
    );
    ensure!(
        up == Some(3.0 * (32.0 + 12345.0)),
        "to_upstream {up:?}:\n{metrics}"
    );
    ensure!(
        down == Some(3.0 * (1.0 + 54321.0)),
        "to_client {down:?}:\n{metrics}"
    );
    ensure!(
        sample(&metrics, "mesh_tcp_connections_opened_total") == Some(3.0),
        "{metrics}"
    );
    ensure!(
        sample(&metrics, "mesh_tcp_connections_active") == Some(0.0),
        "{metrics}"
    );
    ensure!(
        sample(
            &metrics,
            "mesh_ebpf_connects_redirected_total{family=\"ipv4\"}"
        ) == Some(3.0),
        "kernel counters missing or wrong:\n{metrics}"
    );
    // Through the proxy's sockets, or (the kernel-only path, on by default) past the proxy.
    let skipped_tcp = ["redirected", "kernel_only"]
        .iter()
        .filter_map(|p| {
            sample(
                &metrics,
                &format!("mesh_ebpf_msg_bytes_total{{path=\"{p}\"}}"),
            )
        })
        .sum::<f64>();
    ensure!(skipped_tcp > 0.0, "{metrics}");
    ensure!(
        metrics.contains("mesh_process_resident_memory_bytes"),
        "{metrics}"
    );

    // promtool, the Prometheus project's own checker, accepts the exposition.
    let mut cmd = s.node.node_command("sh");
    cmd.args([
        "-c",
        "curl -s http://127.0.0.1:15020/metrics | promtool check metrics",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A long-lived connection shows up with its original destination. (A socket timeout
    // makes the client's socket non-blocking, as event-driven programs are: blocking ones
    // stay off the short-circuit, and this one's four sockets are counted below.)
    let mut cmd = s.client.command("python3");
    cmd.args([
        "-c",
        &format!(
            "import socket,time; s=socket.create_connection(('{}', {SERVER_PORT}), timeout=120); s.sendall(b'MTv1'); print('open', flush=True); time.sleep(60)",
            s.server.ipv4
        ),
    ]);
    let mut held = Background::spawn(cmd, s.node.scratch.join("held.out"))?;
    held.wait_for("open")?;
    let mut listed = String::new();
    for _ in 0..100 {
        listed = admin_get(&s.node, "/debug/connections")?.1;
        if listed.contains(&s.v4()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        listed.contains(&format!("\"original_dst\": \"{}\"", s.v4()))
            && listed.contains(&format!("\"client\": \"{}:", s.client.ipv4)),
        "/debug/connections: {listed}"
    );
    // The held connection's four sockets are registered (client, proxy in, proxy out, server).
    let metrics = admin_get(&s.node, "/metrics")?.1;
    ensure!(
        sample(&metrics, "mesh_ebpf_sockhash_entries") == Some(4.0),
        "{metrics}"
    );
    let (_, ebpf) = admin_get(&s.node, "/debug/ebpf")?;
    ensure!(
        ebpf.contains("mesh_connect4") && ebpf.contains("MESH_SOCKS"),
        "/debug/ebpf: {ebpf}"
    );
    let (_, config) = admin_get(&s.node, "/config")?;
    ensure!(config.contains("\"sockmap\": true"), "/config: {config}");

    // `proxy status` reads the same API.
    let mut cmd = s.node.node_command(&s.node.bins.proxy);
    cmd.arg("status");
    let out = run_bounded(cmd, Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && text.contains("ready")
            && text.contains("mesh_connect4")
            && text.contains("open connections: 1"),
        "proxy status:\n{text}"
    );
    drop(held);
    Ok(())
}

/// Kernel debug records (aya-log) are off by default and, with `--kernel-log`, name each
/// connect decision in the proxy's log.
#[test]
fn kernel_log_is_off_by_default_and_on_with_the_flag() -> Result<()> {
    require!();
    let s = Setup::new(&ProxyOptions::default(), 0)?;
    s.client(&s.v4(), &["--send", "10", "--reply", "10"])?;
    ensure!(
        !s.node.proxy_log_text().contains("proxy::kernel"),
        "kernel records without --kernel-log"
    );
    drop(s);
    let s = Setup::new(
        &ProxyOptions {
            extra_args: vec!["--kernel-log".into()],
            ..ProxyOptions::default()
        },
        0,
    )?;
    s.client(&s.v4(), &["--send", "10", "--reply", "10"])?;
    let mut log = String::new();
    for _ in 0..100 {
        log = s.node.proxy_log_text();
        if log.contains("connect4: redirected to the proxy") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        log.contains("proxy::kernel") && log.contains("connect4: redirected to the proxy"),
        "{log}"
    );
    Ok(())
}

/// `--workloads-only on`: only declared workloads' cgroups are intercepted; the rest of the
/// workload cgroup parent connects directly, and the set follows config reloads (a new
/// workload is intercepted, a removed one released) without a restart.
#[test]
fn workloads_only_intercepts_declared_workloads_and_follows_reloads() -> Result<()> {
    require!();
    let mut node = Node::new(&bins()?)?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = node.add_pod("server")?;
    let srv = meshtest_server(&node, &server, &[])?;
    let config = node.scratch.join("proxy.toml");
    let rel = node.workload_cgroup_rel.clone();
    let workloads = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("[[workload]]\nname = \"{n}\"\ncgroups = [\"{rel}/{n}\"]\n"))
            .collect::<String>()
    };
    let write = |text: String| -> Result<()> {
        let tmp = config.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &config)?;
        Ok(())
    };
    write(workloads(&["a"]))?;
    node.start_proxy(&ProxyOptions {
        sockmap: false,
        extra_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--workloads-only".into(),
            "on".into(),
        ],
        ..ProxyOptions::default()
    })?;
    node.wait_for_log("intercepted workload cgroups updated", 1)?;
    let target = format!("{}:{SERVER_PORT}", server.ipv4);
    let meshtest = node.bins.meshtest.clone();
    // Which address the server saw for the last connection: the node's (through the
    // proxy) or the pod's own (direct).
    let peer_of = |pod: &Pod, srv: &Background| -> Result<String> {
        let before = srv
            .output()
            .lines()
            .filter(|l| l.starts_with("conn "))
            .count();
        let mut cmd = pod.command(&meshtest);
        cmd.args([
            "client",
            "--connect",
            &target,
            "--send",
            "100",
            "--reply",
            "100",
        ]);
        client_ok(run_bounded(cmd, CLIENT_LIMIT)?)?;
        for _ in 0..100 {
            let lines: Vec<String> = srv
                .output()
                .lines()
                .filter(|l| l.starts_with("conn "))
                .map(String::from)
                .collect();
            if lines.len() > before {
                return Ok(lines[before].clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the server printed no line for the connection")
    };
    let via_proxy = format!("peer={}:", server.gateway4);
    let line = peer_of(&a, &srv)?;
    ensure!(
        line.contains(&via_proxy),
        "a (declared) went direct: {line}"
    );
    let line = peer_of(&b, &srv)?;
    ensure!(
        line.contains(&format!("peer={}:", b.ipv4)),
        "b (not declared) was intercepted: {line}"
    );
    ensure!(counter(&node, "bypass_not_workload")? >= 1);

    // Declare b, release a.
    write(workloads(&["b"]))?;
    node.wait_for_log("intercepted workload cgroups updated", 2)?;
    let line = peer_of(&b, &srv)?;
    ensure!(
        line.contains(&via_proxy),
        "b (now declared) went direct: {line}"
    );
    let line = peer_of(&a, &srv)?;
    ensure!(
        line.contains(&format!("peer={}:", a.ipv4)),
        "a (no longer declared) was still intercepted: {line}"
    );
    drop(srv);
    Ok(())
}
