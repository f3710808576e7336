//! Two nodes on one machine joined by a link: the harness's addressing and routing between
//! nodes, checked without any proxy so that a failure here points at the harness.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use tests::{
    Background, Binaries, Node, PCAP_HEADER_LEN, Pod, link, require_privileges, run_bounded,
};

const SERVER_PORT: u16 = 8080;
const CLIENT_LIMIT: Duration = Duration::from_secs(60);

macro_rules! require {
    () => {
        if !require_privileges()? {
            return Ok(());
        }
    };
}

fn client(node: &Node, pod: &Pod, target: &str) -> Result<String> {
    let mut cmd = pod.command(&node.bins.meshtest);
    cmd.args([
        "client",
        "--connect",
        target,
        "--send",
        "100000",
        "--reply",
        "50000",
    ]);
    tests::client_ok(run_bounded(cmd, CLIENT_LIMIT)?).with_context(|| format!("client {target}"))
}

#[test]
fn two_nodes_route_between_their_pods() -> Result<()> {
    require!();
    // No proxy runs here, so no freshness check of the proxy binary either.
    let bins = Binaries {
        proxy: PathBuf::new(),
        meshtest: env!("CARGO_BIN_EXE_meshtest").into(),
    };
    let mut node0 = Node::new(&bins)?;
    let mut node1 = Node::with_number(&bins, 1)?;
    let client_pod = node0.add_pod("client")?;
    let server_pod = node1.add_pod("server")?;

    // Node 0 keeps the addresses of a single-node test; node 1's are shifted by one.
    ensure!(client_pod.ipv4 == Ipv4Addr::new(10, 77, 1, 2));
    ensure!(client_pod.ipv6 == Ipv6Addr::new(0xfd00, 0x77, 1, 0, 0, 0, 0, 2));
    ensure!(server_pod.ipv4 == Ipv4Addr::new(10, 78, 1, 2));
    ensure!(server_pod.ipv6 == Ipv6Addr::new(0xfd00, 0x78, 1, 0, 0, 0, 0, 2));
    ensure!(node1.pod_prefix4() == (Ipv4Addr::new(10, 78, 0, 0), 16));
    ensure!(node1.link_addr4() == Ipv4Addr::new(10, 99, 0, 2));
    // Nothing of one node is shared with the other.
    ensure!(node0.netns != node1.netns && node0.cgroup_root != node1.cgroup_root);
    ensure!(node0.pin_dir != node1.pin_dir && node0.scratch != node1.scratch);
    ensure!(node0.proxy_log != node1.proxy_log);
    ensure!(node0.link_ifname() != node1.link_ifname());
    ensure!(node0.link_ifname().len() <= 15 && node0.pod_interfaces().len() < 15);

    ensure!(
        Node::with_number(&bins, 16).is_err(),
        "node numbers end at 15"
    );
    {
        let mut another0 = Node::new(&bins)?;
        ensure!(
            link(&mut node0, &mut another0).is_err(),
            "linking two nodes with the same number must fail"
        );
    }
    link(&mut node0, &mut node1)?;
    ensure!(
        link(&mut node0, &mut node1).is_err(),
        "a second link must fail"
    );
    let capture = node0.capture_link()?;

    let mut serve = server_pod.command(&node1.bins.meshtest);
    serve.args(["serve", "--listen", &format!("[::]:{SERVER_PORT}")]);
    let mut server = Background::spawn(serve, node1.scratch.join("server.out"))?;
    server.wait_for("listening")?;

    // Pod of node 0 -> node 0 -> link -> node 1 -> pod of node 1, over both families.
    client(
        &node0,
        &client_pod,
        &format!("{}:{SERVER_PORT}", server_pod.ipv4),
    )?;
    client(
        &node0,
        &client_pod,
        &format!("[{}]:{SERVER_PORT}", server_pod.ipv6),
    )?;
    let output = server.output();
    let lines: Vec<&str> = output.lines().filter(|l| l.starts_with("conn ")).collect();
    ensure!(lines.len() == 2, "two connections expected: {output}");
    // No NAT and no proxy on the way: the server sees the client pod itself.
    ensure!(
        lines[0].contains(&format!("{}:", client_pod.ipv4)) && lines[0].contains("verified=true"),
        "server line: {}",
        lines[0]
    );
    ensure!(
        lines[1].contains(&format!("[{}]:", client_pod.ipv6)) && lines[1].contains("verified=true"),
        "server line: {}",
        lines[1]
    );

    let pcap = capture.stop_and_read()?;
    ensure!(
        pcap.len() > PCAP_HEADER_LEN,
        "no packets captured on the link"
    );
    // The positive control for tests that assert a marker never crosses in cleartext:
    // without a proxy, meshtest's protocol magic is plainly on the wire.
    ensure!(
        pcap.windows(4).filter(|w| w == b"MTv1").count() >= 2,
        "meshtest's header not found in {} bytes of capture",
        pcap.len()
    );
    Ok(())
}
