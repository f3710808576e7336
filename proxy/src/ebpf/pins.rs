//! The pin directory: its lock, its layout, stale pins and their removal.
//!
//! The lock is an flock(2) on the directory itself. The kernel drops it when the holder
//! dies, however it dies, so a proxy restarted after SIGKILL takes the lock, finds the old
//! pins and replaces them; a second proxy started while the first runs is refused.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    sys::statfs::statfs,
};
use tracing::warn;

/// statfs f_type of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const MAPS: &str = "maps";
const PROGS: &str = "progs";
const LINKS: &str = "links";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{dir} is not on a bpffs mount (found filesystem type {found:#x}); mount one with `mount -t bpf bpf /sys/fs/bpf`, or set intercept.pin_dir below an existing bpffs mount"
    )]
    NotBpffs { dir: PathBuf, found: i64 },
    #[error(
        "another proxy is running with pin directory {0} (it holds the lock on it); stop that proxy first, or give this one its own --pin-dir and cgroups"
    )]
    Locked(PathBuf),
    #[error("pin directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub struct PinDir {
    dir: PathBuf,
    _lock: Flock<File>,
}

/// Attachments of a proxy that did not shut down cleanly, kept attached (but unpinned)
/// until the caller drops this.
pub struct Stale {
    pub removed: usize,
    _links: Vec<FdLink>,
}

/// statfs f_type of the filesystem holding `path`.
pub fn filesystem_type(path: &Path) -> io::Result<i64> {
    let st = statfs(path).map_err(io::Error::from)?;
    // fs_type_t is c_long on x86_64 but narrower on other targets.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.filesystem_type().0 as i64)
}

/// True if `path` is on bpffs.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(filesystem_type(path)? == BPF_FS_MAGIC)
}

pub fn map_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(MAPS).join(name)
}

impl PinDir {
    /// Creates (if needed) and locks the pin directory.
    pub fn lock(dir: &Path) -> Result<PinDir, PinError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| PinError::Io { path, source }
        };
        // The parent must already be bpffs: creating directories on another filesystem
        // would "work" and then every pin would fail with a less helpful error.
        let parent = dir.parent().unwrap_or(dir);
        let found = filesystem_type(parent).map_err(|source| PinError::Io {
            path: parent.to_owned(),
            source,
        })?;
        if found != BPF_FS_MAGIC {
            return Err(PinError::NotBpffs {
                dir: parent.to_owned(),
                found,
            });
        }
        for sub in [MAPS, PROGS, LINKS] {
            fs::create_dir_all(dir.join(sub)).map_err(io_err(&dir.join(sub)))?;
        }
        let file = File::open(dir).map_err(io_err(dir))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == Errno::EWOULDBLOCK {
                PinError::Locked(dir.to_owned())
            } else {
                PinError::Io {
                    path: dir.to_owned(),
                    source: io::Error::from(errno),
                }
            }
        })?;
        Ok(PinDir {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        map_path(&self.dir, name)
    }

    pub fn prog_path(&self, name: &str) -> PathBuf {
        self.dir.join(PROGS).join(name)
    }

    pub fn link_path(&self, name: &str) -> PathBuf {
        self.dir.join(LINKS).join(name)
    }

    /// Unpins whatever a previous proxy left. Links are unpinned but kept open (still
    /// attached) in the returned value; maps and programs are simply unpinned (they live on
    /// while anything still uses them, e.g. established short-circuited sockets).
    pub fn take_stale(&self) -> Result<Stale, PinError> {
        let mut removed = 0;
        let mut links = Vec::new();
        for entry in list(&self.dir.join(LINKS))? {
            match PinnedLink::from_pin(&entry) {
                Ok(l) => match l.unpin() {
                    Ok(fd) => links.push(fd),
                    Err(e) => warn!(path = %entry.display(), error = %e, "cannot unpin stale link"),
                },
                Err(e) => {
                    warn!(path = %entry.display(), error = %e, "not a link; removing");
                    let _ = fs::remove_file(&entry);
                }
            }
            removed += 1;
        }
        for sub in [PROGS, MAPS] {
            for entry in list(&self.dir.join(sub))? {
                fs::remove_file(&entry).map_err(|source| PinError::Io {
                    path: entry.clone(),
                    source,
                })?;
                removed += 1;
            }
        }
        Ok(Stale {
            removed,
            _links: links,
        })
    }

    /// Removes every pin except the links and programs named in `keep`; the directory goes
    /// too if that left it empty. Errors are logged: this runs on the way out.
    pub fn remove_all_except(self, keep: &[&str]) {
        for sub in [LINKS, PROGS, MAPS] {
            let entries = match list(&self.dir.join(sub)) {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, "cannot list pins");
                    continue;
                }
            };
            for entry in entries {
                let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if sub != MAPS && keep.contains(&name) {
                    continue;
                }
                if let Err(e) = fs::remove_file(&entry) {
                    warn!(path = %entry.display(), error = %e, "cannot remove pin");
                }
            }
        }
        // The now empty directories go with `self` (Drop).
    }
}

impl Drop for PinDir {
    /// A proxy that locked the directory but stopped before pinning anything (a port in
    /// use, a bad admin address) leaves no empty directories behind. Only empty
    /// directories are removed: pins that must outlive the proxy stay.
    fn drop(&mut self) {
        for sub in [LINKS, PROGS, MAPS] {
            let _ = fs::remove_dir(self.dir.join(sub));
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PinError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| PinError::Io {
            path: dir.to_owned(),
            source,
        })?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}
