//! A real Kubernetes API server for tests: etcd plus kube-apiserver 1.20 on 127.0.0.1,
//! on free ports, with their data, keys and logs in a temporary directory.
//!
//! `deploy/install-kube-apiserver.sh` builds the kube-apiserver binary (from Debian's
//! `kubernetes` source package; no registry ships one) into
//! `$HOME/.cache/ebpf-mesh/kube/kube-apiserver` and installs etcd; see
//! `../shared/notes/kube-apiserver.md`.
//!
//! Clients authenticate with a bearer token ([`ApiServer::token`], user `admin` in group
//! `system:masters`) and trust the API server's self-signed serving certificate
//! ([`ApiServer::ca_cert`]). [`ApiServer::kubeconfig`] holds the same in a kubeconfig file.
//!
//! What 1.20 does and does not do, compared with a current cluster (checked against it):
//! - EndpointSlices are served only as `discovery.k8s.io/v1beta1` (`v1` is 404); a client
//!   must discover the version ([`ApiServer::endpoint_slice_version`]). In v1beta1 an
//!   endpoint's `nodeName` and its `serving`/`terminating` conditions are behind feature
//!   gates that are off, so the server silently drops them; `topology:
//!   {kubernetes.io/hostname: NODE}` and `conditions.ready` are kept.
//! - No controller-manager and no scheduler run: nothing creates EndpointSlices, Endpoints,
//!   ServiceAccounts or their token Secrets, and Pods keep the `nodeName` they were created
//!   with. A Pod is refused unless its ServiceAccount exists ([`ApiServer::create_namespace`]
//!   creates `default`), and unless it has `automountServiceAccountToken: false` (no token
//!   Secret ever appears). Its status is only what a test sets with the `status`
//!   subresource ([`ApiServer::set_pod_running`]); a plain patch of `status` is ignored.
//! - The API server itself keeps `default/kubernetes` (Service 10.96.0.1:443, Endpoints and
//!   a v1beta1 EndpointSlice) pointing at the host's primary address, not 127.0.0.1.
//! - The self-signed serving certificate names 127.0.0.1, the host's address, 10.96.0.1
//!   and `kubernetes.default.svc`, but not `localhost`: use the 127.0.0.1 URL.
//! - kubectl on the machine is 1.32; it works against 1.20 (`patch --subresource=status`,
//!   `apply --server-side` and `create token` included); only `kubectl version` warns
//!   about the version skew, on stderr.

use std::{
    fs,
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

use crate::{PREFIX, run_bounded, which};

/// The script that builds and caches the binary.
pub const INSTALL_SCRIPT: &str = "deploy/install-kube-apiserver.sh";

/// How long [`ApiServer::start`] and [`ApiServer::restart_apiserver`] wait for `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a kubectl or curl call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Where `deploy/install-kube-apiserver.sh` caches the kube-apiserver binary.
pub fn apiserver_binary() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/ebpf-mesh/kube/kube-apiserver")
}

/// Checks what [`ApiServer::start`] needs: the cached kube-apiserver binary, etcd, kubectl,
/// openssl and curl. Like [`crate::require_privileges`]: outside CI a missing piece skips
/// the test with a loud message (returns `false`); under `CI=true` it is an error.
pub fn require_apiserver() -> Result<bool> {
    let missing = missing_tools();
    if missing.is_empty() {
        return Ok(true);
    }
    let msg = format!("API server test needs: {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        bail!("{msg} (CI=true: failing instead of skipping)");
    }
    eprintln!("SKIPPED (not a pass): {msg}");
    Ok(false)
}

fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    let bin = apiserver_binary();
    if !bin.is_file() {
        missing.push(format!(
            "{} (build it with `sudo {INSTALL_SCRIPT}`, about 7 minutes)",
            bin.display()
        ));
    }
    for tool in ["etcd", "openssl", "curl"] {
        if which(tool).is_none() {
            missing.push(format!("{tool} (`sudo {INSTALL_SCRIPT}` installs it)"));
        }
    }
    if which("kubectl").is_none() {
        missing.push("kubectl".into());
    }
    missing
}

/// A running etcd and kube-apiserver; both are stopped and their directory removed on drop.
pub struct ApiServer {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// Bearer token of user `admin` in group `system:masters` (allowed everything).
    pub token: String,
    /// The API server's self-signed serving certificate (with the CA that signed it): what
    /// a client trusts. It stays the same across [`ApiServer::restart_apiserver`].
    pub ca_cert: PathBuf,
    /// A kubeconfig with `url`, `token` and `ca_cert` (current context set).
    pub kubeconfig: PathBuf,
    /// Temporary directory: etcd data, keys, certificates, logs.
    pub dir: PathBuf,
    /// The etcd client URL (`http://127.0.0.1:PORT`).
    pub etcd_url: String,
    etcd: Child,
    apiserver: Option<Child>,
    apiserver_args: Vec<String>,
    binary: PathBuf,
    /// Number of kube-apiserver starts, for the log file names.
    starts: u32,
}

impl ApiServer {
    /// Starts etcd, then kube-apiserver, and waits (at most 60 s) for `/readyz`.
    pub fn start() -> Result<ApiServer> {
        let binary = apiserver_binary();
        if !binary.is_file() {
            bail!(
                "kube-apiserver not found at {}; build it with `sudo {INSTALL_SCRIPT}` (about 7 minutes)",
                binary.display()
            );
        }
        for tool in ["etcd", "openssl", "curl", "kubectl"] {
            if which(tool).is_none() {
                bail!("{tool} not found; `sudo {INSTALL_SCRIPT}` installs etcd and openssl");
            }
        }
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{PREFIX}kube-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on a failure removes the directory (and kills etcd) via `Starting`.
        let mut starting = Starting {
            dir: Some(dir.clone()),
            etcd: None,
        };

        let [etcd_port, peer_port, api_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let url = format!("https://127.0.0.1:{api_port}");

        // Service account signing key pair and the static token file.
        let (sa_key, sa_pub) = (dir.join("sa.key"), dir.join("sa.pub"));
        run_ok(
            Command::new("openssl")
                .args(["genrsa", "-out"])
                .arg(&sa_key)
                .arg("2048"),
        )?;
        run_ok(
            Command::new("openssl")
                .args(["rsa", "-pubout", "-in"])
                .arg(&sa_key)
                .arg("-out")
                .arg(&sa_pub),
        )?;
        let token = random_hex(16)?;
        let tokens = dir.join("tokens.csv");
        fs::write(&tokens, format!("{token},admin,admin,system:masters\n"))?;

        // etcd.
        let etcd_log = dir.join("etcd.log");
        let mut etcd_cmd = Command::new("etcd");
        etcd_cmd
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--initial-cluster-state=new");
        // etcd serves /metrics on its client URL; no `--listen-metrics-urls`, no other port.
        let etcd = spawn_logged(etcd_cmd, &etcd_log)?;
        let etcd = starting.etcd.insert(etcd);
        wait_until(Duration::from_secs(15), "etcd /health", || {
            if let Some(s) = etcd.try_wait()? {
                bail!("etcd exited ({s}): {}", log_tail(&etcd_log));
            }
            let mut curl = Command::new("curl");
            curl.args(["-sS", "--max-time", "2", &format!("{etcd_url}/health")]);
            let out = run_bounded(curl, CALL_TIMEOUT)?;
            Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("true"))
        })
        .with_context(|| format!("etcd log: {}", log_tail(&etcd_log)))?;

        let cert_dir = dir.join("certs");
        fs::create_dir_all(&cert_dir)?;
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", cert_dir.display()),
            format!("--token-auth-file={}", tokens.display()),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
        ];
        let ca_cert = cert_dir.join("apiserver.crt");
        let kubeconfig = dir.join("kubeconfig");
        fs::write(&kubeconfig, kubeconfig_text(&url, &token, &ca_cert))?;

        let Some(etcd) = starting.etcd.take() else {
            bail!("etcd vanished");
        };
        starting.dir = None;
        // Owns etcd and the directory from here on: its Drop cleans up on failure.
        let mut api = ApiServer {
            url,
            token,
            ca_cert,
            kubeconfig,
            dir,
            etcd_url,
            etcd,
            apiserver: None,
            apiserver_args,
            binary,
            starts: 0,
        };
        api.restart_apiserver()?;
        Ok(api)
    }

    /// Log of the current (or last) kube-apiserver run.
    pub fn apiserver_log(&self) -> PathBuf {
        self.dir
            .join(format!("kube-apiserver.{}.log", self.starts.max(1)))
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after 5 s); etcd keeps running. Clients see
    /// connection refused until [`ApiServer::restart_apiserver`].
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            stop_child(&mut child);
        }
    }

    /// Starts kube-apiserver again with the same flags, port, token and serving certificate
    /// (stopping it first if it runs), and waits (at most 60 s) for `/readyz`. Everything
    /// stored survives: it lives in etcd, which keeps running.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        self.stop_apiserver();
        self.starts += 1;
        let log = self.apiserver_log();
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.apiserver_args);
        self.apiserver = Some(spawn_logged(cmd, &log)?);
        let started = Instant::now();
        let ready = wait_until(READY_TIMEOUT, "kube-apiserver /readyz", || {
            if let Some(child) = self.apiserver.as_mut()
                && let Some(s) = child.try_wait()?
            {
                bail!("kube-apiserver exited ({s})");
            }
            if !self.ca_cert.is_file() {
                return Ok(false);
            }
            Ok(self.api_get("/readyz").is_ok_and(|(code, _)| code == 200))
        });
        if let Err(e) = ready {
            self.stop_apiserver();
            return Err(e.context(format!(
                "kube-apiserver log ({}): {}",
                log.display(),
                log_tail(&log)
            )));
        }
        if std::env::var_os("MESH_TEST_LOG").is_some() {
            eprintln!(
                "kube-apiserver ready at {} in {} ms",
                self.url,
                started.elapsed().as_millis()
            );
        }
        Ok(())
    }

    /// Whether kube-apiserver is running (it may not be ready yet).
    pub fn apiserver_running(&mut self) -> bool {
        self.apiserver
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A `kubectl` command with the server, token and CA flags (and its own kubeconfig and
    /// cache directory, so nothing of the user's `~/.kube` is read or written).
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.env("KUBECONFIG", &self.kubeconfig)
            .arg(format!("--server={}", self.url))
            .arg(format!("--token={}", self.token))
            .arg(format!(
                "--certificate-authority={}",
                self.ca_cert.display()
            ))
            .arg(format!(
                "--cache-dir={}",
                self.dir.join("kubectl-cache").display()
            ))
            .args(args);
        c
    }

    /// Runs kubectl with `args` (at most 30 s) and returns its stdout; an error carries its
    /// stderr. The 1.32-vs-1.20 version-skew warning goes to stderr and is ignored.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = run_bounded(self.kubectl_command(args), CALL_TIMEOUT)
            .with_context(|| format!("kubectl {}", args.join(" ")))?;
        output_ok(&out, &format!("kubectl {}", args.join(" ")))
    }

    /// Runs kubectl with `args` plus `-o json` and parses the output.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.kubectl(&all)?;
        serde_json::from_str(&text).with_context(|| format!("parsing kubectl {all:?}: {text}"))
    }

    /// `kubectl apply -f -` with `yaml` on stdin (at most 30 s).
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let out = run_with_stdin(
            self.kubectl_command(&["apply", "-f", "-"]),
            yaml,
            CALL_TIMEOUT,
        )?;
        output_ok(&out, "kubectl apply").map(|_| ())
    }

    /// Creates namespace `ns` and its `default` ServiceAccount (which the controller-manager
    /// would create; none runs). Idempotent.
    pub fn create_namespace(&self, ns: &str) -> Result<()> {
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: {ns}\n"
        ))
    }

    /// Sets the status of pod `ns/name` as a kubelet would once it runs: phase Running,
    /// `podIP`/`podIPs`, conditions Ready and ContainersReady true (a merge patch of the
    /// `status` subresource; the rest of the status is replaced by this).
    pub fn set_pod_running(&self, ns: &str, name: &str, pod_ip: &str) -> Result<()> {
        let patch = serde_json::json!({
            "status": {
                "phase": "Running",
                "podIP": pod_ip,
                "podIPs": [{"ip": pod_ip}],
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
            }
        });
        self.kubectl(&[
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .map(|_| ())
    }

    /// The `discovery.k8s.io` version the server prefers for EndpointSlices (`v1beta1` on
    /// 1.20, `v1` on 1.21 and later), from API discovery.
    pub fn endpoint_slice_version(&self) -> Result<String> {
        let (code, body) = self.api_get("/apis/discovery.k8s.io")?;
        if code != 200 {
            bail!("GET /apis/discovery.k8s.io: HTTP {code}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        v["preferredVersion"]["version"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no preferredVersion in {body}"))
    }

    /// GETs `path` (e.g. `/readyz`, `/api/v1/pods`) with curl, trusting [`Self::ca_cert`]
    /// and sending the token; returns the HTTP status and the body. Connection failures are
    /// errors.
    pub fn api_get(&self, path: &str) -> Result<(u16, String)> {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
            .arg(&self.ca_cert)
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg(format!("{}{path}", self.url));
        let out = run_bounded(curl, CALL_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "curl {path}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
        Ok((code.trim().parse()?, body.to_string()))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("MESH_TEST_LOG").is_some() {
            eprintln!(
                "--- kube-apiserver log ({}) ---\n{}\n--- etcd log ---\n{}",
                self.apiserver_log().display(),
                log_tail(&self.apiserver_log()),
                log_tail(&self.dir.join("etcd.log"))
            );
        }
        self.stop_apiserver();
        stop_child(&mut self.etcd);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What [`ApiServer::start`] cleans up if it fails before the [`ApiServer`] exists (the
/// [`ApiServer`] takes both over).
struct Starting {
    dir: Option<PathBuf>,
    etcd: Option<Child>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut etcd) = self.etcd.take() {
            stop_child(&mut etcd);
        }
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

fn kubeconfig_text(url: &str, token: &str, ca: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\n\
         users:\n- name: admin\n  user:\n    token: {token}\n\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n",
        ca.display()
    )
}

/// Three distinct free TCP ports on 127.0.0.1 (all bound at once, so they differ).
fn free_ports() -> Result<[u16; 3]> {
    let listeners = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    Ok([
        listeners[0].local_addr()?.port(),
        listeners[1].local_addr()?.port(),
        listeners[2].local_addr()?.port(),
    ])
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Result<Child> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))
}

/// SIGTERM, then SIGKILL if the process has not exited within [`STOP_GRACE`]; reaps it.
fn stop_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `check` every 100 ms until it returns true, an error, or `limit` passes.
fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not ready within {} s", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The last 3000 bytes of a log file.
fn log_tail(path: &Path) -> String {
    let text = fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(3000);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().with_context(|| format!("running {program}"))?;
    output_ok(&out, &program).map(|_| ())
}

fn output_ok(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with `input` on its stdin, bounded by `limit` (killed after it).
fn run_with_stdin(mut cmd: Command, input: &str, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
    let writer = child.stdin.take().map(|mut stdin| {
        let input = input.to_owned();
        // Dropping stdin at the end of the thread closes it: the child sees end of input.
        thread::spawn(move || stdin.write_all(input.as_bytes()))
    });
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{}` did not finish within {} s",
                cmd.get_program().to_string_lossy(),
                limit.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let join = |h: thread::JoinHandle<Vec<u8>>| h.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}
