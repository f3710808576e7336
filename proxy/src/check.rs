//! `proxy check`: preflight of everything the proxy needs from this machine, each failure
//! with the fix.

use std::{fs, path::Path, process::Command};

use crate::{cgroup, config::Config, config::Mode, ebpf};

/// Oldest kernel with bpf_get_netns_cookie() in sock_ops and sk_msg programs.
const MIN_KERNEL: (u32, u32) = (5, 15);

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

pub struct Finding {
    pub ok: bool,
    pub what: String,
    pub detail: String,
}

fn pass(what: &str, detail: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        what: what.into(),
        detail: detail.into(),
    }
}

fn fail(what: &str, detail: impl Into<String>) -> Finding {
    Finding {
        ok: false,
        what: what.into(),
        detail: detail.into(),
    }
}

pub fn run(cfg: &Config) -> Vec<Finding> {
    let mut out = vec![kernel_version(), btf()];
    let mount = cgroup::cgroup2_mount();
    out.push(match &mount {
        Ok(m) => pass(
            "cgroup v2",
            format!("mounted at {} (from /proc/self/mountinfo)", m.display()),
        ),
        Err(e) => fail("cgroup v2", e.to_string()),
    });
    out.push(capabilities());
    if cfg.mode == Mode::Ebpf || cfg.sockmap {
        out.push(bpffs(&cfg.pin_dir));
        out.push(match ebpf::verify_loadable() {
            Ok(n) => pass(
                "eBPF programs",
                format!("{n} programs accepted by this kernel's verifier"),
            ),
            Err(e) => fail("eBPF programs", e.to_string()),
        });
        if cfg.sockmap {
            out.push(pid_namespace());
        }
        if cfg.needs_kernel_offsets() {
            out.push(
                match ebpf::btf::kernel_offsets(Path::new(ebpf::btf::VMLINUX)) {
                    Ok(k) => pass(
                        "short-circuit offsets",
                        format!(
                            "sock.sk_user_data at {}, sk_psock.msg_tot_len at {}, tcp_sock.write_seq/copied_seq at {}/{} (from BTF)",
                            k.sock_user_data, k.psock_msg_tot_len, k.tcp_write_seq, k.tcp_copied_seq
                        ),
                    ),
                    Err(e) => fail("short-circuit offsets", e.to_string()),
                },
            );
        }
        if let Ok(m) = &mount {
            out.push(other_programs(
                &cgroup::resolve(m, &cfg.workload_cgroup),
                &cfg.pin_dir,
            ));
        }
    } else {
        out.push(iptables());
    }
    out
}

fn kernel_version() -> Finding {
    let release = match nix::sys::utsname::uname() {
        Ok(u) => u.release().to_string_lossy().into_owned(),
        Err(e) => return fail("kernel", format!("uname failed: {e}")),
    };
    match parse_kernel(&release) {
        Some(v) if v >= MIN_KERNEL => pass(
            "kernel",
            format!("{release} (>= {}.{} needed)", MIN_KERNEL.0, MIN_KERNEL.1),
        ),
        Some(_) => fail(
            "kernel",
            format!(
                "{release} is older than {}.{}, which added bpf_get_netns_cookie() for sock_ops and sk_msg; upgrade the kernel, or use --mode iptables --sockmap off",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        None => fail("kernel", format!("cannot parse kernel release {release:?}")),
    }
}

pub fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn btf() -> Finding {
    let p = Path::new("/sys/kernel/btf/vmlinux");
    if p.exists() {
        pass("BTF", p.display().to_string())
    } else {
        fail(
            "BTF",
            "no /sys/kernel/btf/vmlinux; use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    }
}

fn capabilities() -> Finding {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return fail("capabilities", "cannot read CapEff from /proc/self/status");
    };
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| eff & (1u64 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        pass("capabilities", "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN")
    } else {
        fail(
            "capabilities",
            format!(
                "missing {}; run as root or grant them (Kubernetes: a privileged DaemonSet)",
                missing.join(", ")
            ),
        )
    }
}

fn bpffs(pin_dir: &Path) -> Finding {
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    let fix = format!("mount -t bpf bpf {}", parent.display());
    match ebpf::is_bpffs(parent) {
        Ok(true) => pass("bpffs", format!("{} is bpffs", parent.display())),
        Ok(false) => fail("bpffs", format!("{} is not bpffs; {fix}", parent.display())),
        Err(e) => fail("bpffs", format!("{}: {e}; {fix}", parent.display())),
    }
}

/// Lists programs on the workload cgroup's connect/sock_ops hooks that are not ours.
fn other_programs(workload_cgroup: &Path, pin_dir: &Path) -> Finding {
    let what = "cgroup hooks";
    // The nearest existing ancestor carries the programs the workload cgroup will inherit.
    let mut dir = workload_cgroup.to_path_buf();
    while !dir.exists() {
        if !dir.pop() {
            return fail(what, "workload cgroup has no existing ancestor");
        }
    }
    let out = match Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&dir)
        .arg("effective")
        .output()
    {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return fail(
                what,
                format!(
                    "bpftool cgroup show {} failed: {}",
                    dir.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            );
        }
        Err(e) => {
            return fail(
                what,
                format!(
                    "cannot run bpftool ({e}); install it (Debian: apt-get install bpftool) to inspect attached programs"
                ),
            );
        }
    };
    let ours = our_program_ids(pin_dir);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let conflicts: Vec<String> = list
        .iter()
        .filter(|p| {
            let t = p["attach_type"].as_str().unwrap_or("");
            matches!(
                t,
                "cgroup_inet4_connect" | "cgroup_inet6_connect" | "sock_ops"
            )
        })
        .filter(|p| !p["id"].as_u64().is_some_and(|id| ours.contains(&id)))
        .map(|p| {
            format!(
                "{} (id {}, {})",
                p["name"].as_str().unwrap_or("?"),
                p["id"],
                p["attach_type"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if conflicts.is_empty() {
        pass(
            what,
            format!(
                "no foreign programs on connect4/connect6/sock_ops of {}",
                dir.display()
            ),
        )
    } else {
        fail(
            what,
            format!(
                "{} already has {}; another mesh or proxy is intercepting the same workloads. Stop it, or give this proxy a different intercept.workload_cgroup (inspect with `bpftool cgroup tree`)",
                dir.display(),
                conflicts.join(", ")
            ),
        )
    }
}

/// With the short-circuit on, the start-up scan for listeners older than the proxy walks the
/// processes of the proxy's PID namespace: only the host's holds the workloads'.
fn pid_namespace() -> Finding {
    const WHAT: &str = "PID namespace";
    match ebpf::in_host_pid_namespace() {
        Some(true) => pass(
            WHAT,
            "the host's: the start-up listener scan sees every workload's listeners",
        ),
        Some(false) => fail(WHAT, ebpf::OWN_PID_NAMESPACE),
        None => fail(
            WHAT,
            "cannot read /proc/self/ns/pid; mount /proc, or turn the short-circuit off",
        ),
    }
}

fn our_program_ids(pin_dir: &Path) -> Vec<u64> {
    proxy_common::program::ALL
        .iter()
        .filter_map(|name| {
            aya::programs::ProgramInfo::from_pin(pin_dir.join("progs").join(name)).ok()
        })
        .map(|info| u64::from(info.id()))
        .collect()
}

fn iptables() -> Finding {
    match Command::new("iptables").args(["-t", "nat", "-S"]).output() {
        Ok(o) if o.status.success() => pass("iptables", "nat table usable"),
        Ok(o) => fail(
            "iptables",
            format!(
                "iptables -t nat -S failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ),
        Err(e) => fail(
            "iptables",
            format!("cannot run iptables ({e}); install it (Debian: apt-get install iptables)"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_parsing() {
        assert_eq!(parse_kernel("6.18.44-fc-v769"), Some((6, 18)));
        assert_eq!(parse_kernel("5.15.0"), Some((5, 15)));
        assert_eq!(parse_kernel("garbage"), None);
        assert_eq!(parse_kernel(""), None);
        assert!(parse_kernel("5.4.0").is_some_and(|v| v < MIN_KERNEL));
    }
}
