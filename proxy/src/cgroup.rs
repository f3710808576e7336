//! cgroup v2: find the mount, create the workload parent and the proxy's own cgroup, and
//! move the proxy into its cgroup.
//!
//! The proxy must sit in its own cgroup for two reasons: connect4/connect6 are attached to
//! the workload parent only, so the proxy's upstream connects are never intercepted (no
//! loops); and the proxy-side sock_ops program is attached to this cgroup, so the proxy's
//! sockets can be paired with workload sockets. A socket belongs to the cgroup of the task
//! that created it, so the move must happen before any socket is created.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 (cgroup2) mount found in /proc/self/mountinfo; mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoMount,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(io::Error),
    #[error("cannot create cgroup {path}: {source}; run as root with the cgroup v2 mount writable")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot move the proxy (pid {pid}) into cgroup {path}: {source}")]
    Join {
        pid: u32,
        path: PathBuf,
        source: io::Error,
    },
}

/// Finds the cgroup v2 mount point from mountinfo text (not assumed: it is
/// /sys/fs/cgroup on most Kubernetes nodes and /sys/fs/cgroup/unified on hybrid hosts).
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 98:0 / /mnt1 rw,noatime master:1 - cgroup2 none rw"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest.get(pos + 1..pos + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup v2 mount of this machine.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    find_cgroup2_mount(&text).ok_or(CgroupError::NoMount)
}

/// Resolves a configured (relative) cgroup path against the mount.
pub fn resolve(mount: &Path, rel: &Path) -> PathBuf {
    // Accept an absolute path that already includes the mount.
    match rel.strip_prefix(mount.strip_prefix("/").unwrap_or(mount)) {
        Ok(inner) => mount.join(inner),
        Err(_) => mount.join(rel),
    }
}

/// Creates a cgroup directory (and its parents) if missing.
pub fn ensure(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Create {
        path: path.to_owned(),
        source,
    })
}

/// Moves this whole process (all threads) into `path`.
pub fn join(path: &Path) -> Result<(), CgroupError> {
    let pid = std::process::id();
    fs::write(path.join("cgroup.procs"), pid.to_string()).map_err(|source| CgroupError::Join {
        pid,
        path: path.to_owned(),
        source,
    })
}

/// The cgroup this process is in now (relative to the v2 mount), from /proc/self/cgroup.
pub fn current(mount: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let rel = l.strip_prefix("0::")?;
        Some(mount.join(rel.trim_start_matches('/')))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_v1_mounts() {
        let text = "\
25 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(
            find_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_cgroup2_mount("garbage\n - \n"), None);
        assert_eq!(find_cgroup2_mount(""), None);
    }

    #[test]
    fn unescapes_spaces() {
        let text = "1 1 0:1 / /mnt/with\\040space rw - cgroup2 none rw\n";
        assert_eq!(
            find_cgroup2_mount(text),
            Some(PathBuf::from("/mnt/with space"))
        );
        assert_eq!(unescape_mountinfo("a\\9"), "a\\9");
    }

    #[test]
    fn resolves_relative_and_absolute() {
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            resolve(m, Path::new("mesh/w")),
            PathBuf::from("/sys/fs/cgroup/unified/mesh/w")
        );
        assert_eq!(
            resolve(m, Path::new("sys/fs/cgroup/unified/mesh/w")),
            PathBuf::from("/sys/fs/cgroup/unified/mesh/w")
        );
    }
}
