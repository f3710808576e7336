//! The proxies a user would pick instead (HAProxy, nginx), configured by the bench in the
//! node namespace, and the nginx HTTP origin in the server pod.
//!
//! All run in the foreground (`haproxy -db`, `daemon off;`), in a cgroup of their own so
//! their CPU time can be read from `cpu.stat`, and are killed on drop.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Ports the bench uses on the server pod.
pub const TCP_PINNED: u16 = 7000;
pub const TCP_UNPINNED: u16 = 7001;
pub const HTTP1: u16 = 8080;
pub const HTTP2: u16 = 8081;

/// A process tree in its own cgroup, killed (cgroup.kill) on drop.
pub struct Managed {
    pub name: String,
    pub cgroup: PathBuf,
    child: Child,
}

impl Managed {
    /// Starts `cmd` (argv) inside `cgroup` (and the CPU group `cpu`, if any), in network
    /// namespace `netns`, pinned to `cpus` if given.
    pub fn start(
        name: &str,
        cgroup: &Path,
        cpu: Option<&Path>,
        netns: &str,
        cpus: Option<&str>,
        argv: &[String],
        log: &Path,
    ) -> Result<Managed> {
        fs::create_dir_all(cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        // As `tests::Pod::command` does: the CPU group (or an empty argument) comes after the
        // namespace, passed as an argument rather than written into the script.
        let mut script = String::from(
            r#"echo $$ > "$0/cgroup.procs" && { [ -z "$2" ] || echo $$ > "$2/cgroup.procs"; } && ns=$1 && shift 2 && "#,
        );
        if cpus.is_some() {
            script.push_str(r#"cpus=$1 && shift && exec taskset -c "$cpus" nsenter --net="/run/netns/$ns" -- "$@""#);
        } else {
            script.push_str(r#"exec nsenter --net="/run/netns/$ns" -- "$@""#);
        }
        let out = fs::File::create(log)?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg(cgroup)
            .arg(netns)
            .arg(cpu.map(Path::as_os_str).unwrap_or_default());
        if let Some(c) = cpus {
            cmd.arg(c);
        }
        let child = cmd
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Managed {
            name: name.to_string(),
            cgroup: cgroup.to_owned(),
            child,
        })
    }

    /// Fails if the process already exited (a bad config, a port in use).
    pub fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}): {}",
                self.name,
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// PIDs in the cgroup (the master and its workers).
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.cgroup)
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.cgroup).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn pids_in(cgroup: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits until something listens on `port` in namespace `netns` (bounded).
pub fn wait_listening(netns: &str, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "ss", "-Htln"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text
            .split_whitespace()
            .any(|w| w.ends_with(&format!(":{port}")))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} in {netns} after 15 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// HAProxy: TCP frontends for both meshbench ports, HTTP/1.1 and HTTP/2 (h2c) frontends.
pub fn haproxy_config(listen: Ipv4Addr, server: Ipv4Addr, base: u16) -> String {
    format!(
        "global
    maxconn 8192
defaults
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend tcp_pinned
    mode tcp
    bind {listen}:{tp}
    default_backend tcp_pinned
backend tcp_pinned
    mode tcp
    server s1 {server}:{TCP_PINNED}
frontend tcp_unpinned
    mode tcp
    bind {listen}:{tu}
    default_backend tcp_unpinned
backend tcp_unpinned
    mode tcp
    server s1 {server}:{TCP_UNPINNED}
frontend http1
    mode http
    bind {listen}:{h1}
    default_backend http1
backend http1
    mode http
    http-reuse always
    server s1 {server}:{HTTP1}
frontend http2
    mode http
    bind {listen}:{h2} proto h2
    default_backend http2
backend http2
    mode http
    http-reuse always
    server s1 {server}:{HTTP2} proto h2
",
        tp = base + TCP_PINNED,
        tu = base + TCP_UNPINNED,
        h1 = base + HTTP1,
        h2 = base + HTTP2,
    )
}

/// nginx as a stream (TCP) proxy and an HTTP proxy. nginx talks HTTP/1.1 to upstreams, so
/// its HTTP/2 frontend proxies to the HTTP/1.1 origin.
pub fn nginx_proxy_config(dir: &Path, listen: Ipv4Addr, server: Ipv4Addr, base: u16) -> String {
    let d = dir.display();
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes 1;
pid {d}/nginx-proxy.pid;
error_log {d}/nginx-proxy.err warn;
events {{ worker_connections 8192; }}
stream {{
    # Pass a client's half-close on instead of closing both ways (nginx's default), as
    # every other scenario does.
    proxy_half_close on;
    server {{ listen {listen}:{tp}; proxy_pass {server}:{TCP_PINNED}; }}
    server {{ listen {listen}:{tu}; proxy_pass {server}:{TCP_UNPINNED}; }}
}}
http {{
    access_log off;
    # nginx closes an HTTP/2 (and 1.1) connection after 1000 requests by default; the
    # load generators do not reconnect, so that would count as failed requests.
    keepalive_requests 1000000;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    upstream origin {{ server {server}:{HTTP1}; keepalive 64; }}
    server {{
        listen {listen}:{h1};
        listen {listen}:{h2} http2;
        location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}
    }}
}}
",
        tp = base + TCP_PINNED,
        tu = base + TCP_UNPINNED,
        h1 = base + HTTP1,
        h2 = base + HTTP2,
    )
}

/// The HTTP origin in the server pod: a fixed small response, HTTP/1.1 and h2c.
pub fn nginx_origin_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;
worker_processes 1;
pid {d}/origin.pid;
error_log {d}/origin.err warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {d}/obody; proxy_temp_path {d}/oproxy;
    fastcgi_temp_path {d}/ofcgi; uwsgi_temp_path {d}/ouwsgi; scgi_temp_path {d}/oscgi;
    server {{
        listen {HTTP1};
        listen {HTTP2} http2;
        location / {{ return 200 \"hello from the origin\\n\"; }}
    }}
}}
"
    )
}
