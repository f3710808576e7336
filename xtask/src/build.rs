//! Installs what building and running the proxy needs, then builds the kernel object and the
//! host workspace. `ensure_built` is the entry point for `build`, `test` and `demo`.
//!
//! Every installer checks first and does nothing when its tool is present, so the whole thing is
//! cheap to run again. The bpf-linker recipe follows shared/notes/ebpf-toolchain.md (verified on
//! this kind of machine): Debian's LLVM (14-16) cannot read the nightly's LLVM 22 bitcode, so
//! bpf-linker links against the LLVM shared library that ships inside the nightly toolchain.

use std::{
    fs, io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

use crate::sh::{self, say};

/// Debian packages the proxy, the demo and the end-to-end tests call: bpftool (inspect pinned
/// programs and maps), iproute2 (`ip netns`, veth pairs), iptables (the proxy's iptables
/// mode), util-linux (`nsenter`, `mount`), curl and socat (clients in the pods), procps
/// (`sysctl`, `ps`), kmod (`modprobe`).
pub const BUILD_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "iptables",
    "util-linux",
    "curl",
    "socat",
    "procps",
    "kmod",
];

/// bpf-linker version that works with the preinstalled nightly (LLVM 22).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM major of the nightly's libLLVM; bpf-linker's cargo feature must name the same major.
const LLVM_MAJOR: &str = "22";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// The kernel crate's own workspace, relative to the workspace root.
const EBPF_CRATE_DIR: &str = "proxy-ebpf";
/// The object `cargo build --release` writes inside the kernel crate (target from its
/// .cargo/config.toml).
const EBPF_OBJECT: &str = "target/bpfel-unknown-none/release/proxy-ebpf";

/// Where the proxy pins its programs and maps.
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

/// ELF machine number of eBPF (`EM_BPF` in elf.h), to catch an object built for the host.
const EM_BPF: u16 = 247;

/// What a build produced, for the commands that run it.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// Absolute path of the kernel object (bpfel ELF) that the proxy binary embeds.
    pub ebpf_object: PathBuf,
    /// The host workspace's target directory (honours CARGO_TARGET_DIR and cargo config).
    pub target_dir: PathBuf,
    /// `target_dir/debug` or `target_dir/release`: where the host binaries (`proxy`) are.
    pub profile_dir: PathBuf,
}

/// Installs whatever is missing, then builds the kernel object and the host workspace.
///
/// Installing Debian packages and mounting bpffs need root; as another user those steps are
/// reported with the command to run, and the build goes on (it does not need them), except
/// under CI where a skipped step is an error.
pub fn ensure_built(release: bool) -> Result<BuildOutput> {
    let started = Instant::now();
    ensure_packages(BUILD_PACKAGES)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs()?;
    let ebpf_object = build_ebpf()?;
    let output = build_host(release, &ebpf_object)?;
    say(format_args!(
        "build done in {}: kernel object {}, host target directory {} (binaries in {})",
        sh::human_duration(started.elapsed()),
        output.ebpf_object.display(),
        output.target_dir.display(),
        output.profile_dir.display()
    ));
    Ok(output)
}

// === Debian packages ===

/// `apt-get update` runs at most once per xtask run, and only when something is missing.
static APT_INDEX_UPDATED: AtomicBool = AtomicBool::new(false);

/// Installs the Debian packages among `packages` that are not installed yet.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let Some(missing) = missing_packages(packages)? else {
        return skipped(&format!(
            "dpkg-query not found: cannot check the Debian packages {}; this xtask installs \
             them with apt on Debian/Ubuntu, elsewhere install them yourself",
            packages.join(" ")
        ));
    };
    if missing.is_empty() {
        say(format_args!(
            "Debian packages present: {}",
            packages.join(" ")
        ));
        return Ok(());
    }
    let list = missing.join(" ");
    if !sh::is_root()? {
        return skipped(&format!(
            "missing Debian packages: {list}; run `sudo apt-get install -y {list}` \
             (installing needs root)"
        ));
    }
    say(format_args!(
        "installing Debian packages {list} (apt-get, usually under a minute)..."
    ));
    if !APT_INDEX_UPDATED.swap(true, Ordering::SeqCst) {
        sh::run(sh::command("apt-get")?.arg("update"))
            .context("`apt-get update` failed: check the network and /etc/apt/sources.list")?;
    }
    sh::run(
        sh::command("apt-get")?
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
    .with_context(|| format!("cannot install {list}: see apt-get's message above"))?;
    let still_missing = missing_packages(&missing)?.unwrap_or_default();
    ensure!(
        still_missing.is_empty(),
        "apt-get succeeded but {} are still not installed; run `dpkg -l {}`",
        still_missing.join(" "),
        still_missing.join(" ")
    );
    Ok(())
}

/// The packages that dpkg does not report as installed; `None` if dpkg-query is unavailable.
fn missing_packages<S: AsRef<str>>(packages: &[S]) -> Result<Option<Vec<String>>> {
    let mut missing = Vec::new();
    for package in packages {
        let package = package.as_ref();
        // A package dpkg never heard of makes dpkg-query fail; that also means "missing".
        let output = sh::command("dpkg-query")?
            .args(["-W", "-f=${Status}", package])
            .output();
        let output = match output {
            Ok(output) => output,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error).context("cannot run dpkg-query"),
        };
        if !is_installed_status(&String::from_utf8_lossy(&output.stdout)) {
            missing.push(package.to_owned());
        }
    }
    Ok(Some(missing))
}

/// dpkg's status for a fully installed package ("deinstall ok config-files" and
/// "install ok half-configured" are not).
fn is_installed_status(status: &str) -> bool {
    status.trim() == "install ok installed"
}

// === Rust toolchain ===

/// The kernel crate's rust-toolchain.toml asks for rust-src (build-std), but rustup does not
/// add components on its own when RUSTUP_AUTO_INSTALL=0, as on this machine.
fn ensure_nightly_rust_src() -> Result<()> {
    ensure_rustup_component(Some("nightly"), "rust-src")
}

/// Adds `component` to `toolchain` (the active one if `None`) unless it is installed.
pub fn ensure_rustup_component(toolchain: Option<&str>, component: &str) -> Result<()> {
    // With an explicit toolchain, drop RUSTUP_TOOLCHAIN & co. so nothing overrides it;
    // without one, keep them: the active toolchain is the one that runs xtask.
    let rustup = || match toolchain {
        Some(_) => sh::clean_toolchain_command("rustup"),
        None => sh::command("rustup"),
    };
    let mut list = rustup()?;
    list.args(["component", "list", "--installed"]);
    let mut add = rustup()?;
    add.args(["component", "add", component]);
    if let Some(toolchain) = toolchain {
        list.args(["--toolchain", toolchain]);
        add.args(["--toolchain", toolchain]);
    }
    let name = toolchain.map_or_else(
        || "the active toolchain".to_owned(),
        |toolchain| format!("the {toolchain} toolchain"),
    );
    let installed = sh::capture(&mut list).with_context(|| {
        format!(
            "cannot list the components of {name}; is it installed? (`rustup toolchain list`; \
             the kernel crate needs a nightly with rust-src)"
        )
    })?;
    if has_component(&installed, component) {
        say(format_args!("{component} present in {name}"));
        return Ok(());
    }
    say(format_args!(
        "adding {component} to {name} (a few seconds)..."
    ));
    sh::run(&mut add).with_context(|| {
        format!("cannot add {component} to {name}: rustup needs to reach static.rust-lang.org")
    })
}

/// Whether `rustup component list --installed` lists `component` ("rust-src", or with a
/// target suffix as in "clippy-x86_64-unknown-linux-gnu").
fn has_component(installed: &str, component: &str) -> bool {
    let with_target = format!("{component}-");
    installed
        .lines()
        .map(str::trim)
        .any(|line| line == component || line.starts_with(&with_target))
}

// === bpf-linker ===

/// Makes sure `bpf-linker --version` says 0.13.0, building it against the nightly's LLVM if not.
fn ensure_bpf_linker() -> Result<()> {
    let cargo_bin = sh::cargo_bin_dir()?.join("bpf-linker");
    let is_wanted = |linker: &BpfLinker| linker.version.as_deref() == Some(BPF_LINKER_VERSION);
    let found = find_bpf_linker(&cargo_bin)?;
    if let Some(linker) = found.as_ref().filter(|linker| is_wanted(linker)) {
        say(format_args!(
            "bpf-linker {BPF_LINKER_VERSION} present ({})",
            linker.path.display()
        ));
        return Ok(());
    }

    // Recreate the libLLVM links first (the install needs them too): a binary that could not
    // start because they were gone (cache cleaned, nightly reinstalled) may now, and that costs
    // nothing where a rebuild costs minutes.
    let prefix = llvm_prefix()?;
    if let Some(linker) = find_bpf_linker(&cargo_bin)?.filter(|linker| is_wanted(linker)) {
        say(format_args!(
            "bpf-linker {BPF_LINKER_VERSION} present ({}; its libLLVM links were repaired)",
            linker.path.display()
        ));
        return Ok(());
    }

    match &found {
        Some(BpfLinker {
            path,
            version: Some(version),
        }) => say(format_args!(
            "{} is version {version}, {BPF_LINKER_VERSION} needed",
            path.display()
        )),
        Some(BpfLinker {
            path,
            version: None,
        }) => say(format_args!(
            "{} does not run (`ldd {}` shows what is missing)",
            path.display(),
            path.display()
        )),
        None => say("bpf-linker not found"),
    }
    say(format_args!(
        "installing bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM (about 2 minutes)..."
    ));
    let started = Instant::now();
    let mut install = sh::clean_toolchain_command("cargo")?;
    install
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
        ])
        .env("LLVM_PREFIX", &prefix)
        // From $HOME, so no rust-toolchain.toml in the current directory picks the toolchain:
        // the recipe builds bpf-linker with the default (stable) toolchain.
        .current_dir(sh::home()?);
    if cargo_bin.exists() {
        // A wrong or broken binary of the same version would make cargo install a no-op.
        install.arg("--force");
    }
    sh::run(&mut install).context(
        "cannot build bpf-linker; the recipe is in shared/notes/ebpf-toolchain.md \
         (it needs crates.io and the nightly's libLLVM)",
    )?;
    match find_bpf_linker(&cargo_bin)? {
        Some(linker) if is_wanted(&linker) => {
            say(format_args!(
                "bpf-linker {BPF_LINKER_VERSION} installed in {} ({})",
                linker.path.display(),
                sh::human_duration(started.elapsed())
            ));
            Ok(())
        }
        Some(BpfLinker {
            path,
            version: Some(version),
        }) => bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed in {}, but the first bpf-linker on \
             PATH is {} (version {version}); remove it or put {} first on PATH",
            cargo_bin.display(),
            path.display(),
            sh::cargo_bin_dir()?.display()
        ),
        _ => bail!(
            "bpf-linker was installed but `{} --version` does not run; `ldd {}` shows whether \
             libLLVM is found (it should resolve into {})",
            cargo_bin.display(),
            cargo_bin.display(),
            prefix.join("lib").display()
        ),
    }
}

/// A bpf-linker binary and the version it reports (`None` if it does not run).
struct BpfLinker {
    path: PathBuf,
    version: Option<String>,
}

/// The bpf-linker rustc will run: the first on the children's PATH (where the cargo bin
/// directory comes first unless PATH already has it), else `cargo_bin`; `None` if neither
/// exists.
fn find_bpf_linker(cargo_bin: &Path) -> Result<Option<BpfLinker>> {
    let path = match sh::which("bpf-linker")? {
        Some(path) => path,
        None if cargo_bin.is_file() => cargo_bin.to_path_buf(),
        None => return Ok(None),
    };
    let version = sh::probe(sh::command(&path)?.arg("--version"))
        .and_then(|output| parse_bpf_linker_version(&output).map(str::to_owned));
    Ok(Some(BpfLinker { path, version }))
}

/// "bpf-linker 0.13.0" -> "0.13.0".
fn parse_bpf_linker_version(output: &str) -> Option<&str> {
    let mut words = output.split_whitespace();
    (words.next()? == "bpf-linker").then_some(())?;
    words.next()
}

/// Prepares `$HOME/.cache/ebpf-mesh/llvm` as bpf-linker's LLVM_PREFIX: `lib/libLLVM.so` for
/// the link step (`-lLLVM`) and `lib/<SONAME>` for the runtime loader (bpf-linker's rpath points
/// there). Both point into the nightly's sysroot; without the SONAME link, `ldd bpf-linker`
/// shows `libLLVM... => not found`.
fn llvm_prefix() -> Result<PathBuf> {
    let sysroot =
        sh::capture(sh::clean_toolchain_command("rustc")?.args(["+nightly", "--print", "sysroot"]))
            .context("cannot find the nightly toolchain (`rustc +nightly --print sysroot`)")?;
    let sysroot_lib = PathBuf::from(sysroot.trim()).join("lib");
    let soname = nightly_libllvm(&sysroot_lib)?;
    let llvm = soname
        .strip_prefix("libLLVM.so.")
        .unwrap_or_default()
        .split(['.', '-'])
        .next()
        .unwrap_or_default();
    ensure!(
        llvm == LLVM_MAJOR,
        "the nightly ships LLVM {llvm} ({soname}), but bpf-linker is built with feature \
         {BPF_LINKER_LLVM_FEATURE}; update LLVM_MAJOR, BPF_LINKER_LLVM_FEATURE and maybe \
         BPF_LINKER_VERSION in xtask/src/build.rs"
    );

    let prefix = sh::home()?.join(".cache").join("ebpf-mesh").join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let target = sysroot_lib.join(&soname);
    force_symlink(&target, &lib.join("libLLVM.so"))?;
    force_symlink(&target, &lib.join(&soname))?;
    Ok(prefix)
}

/// The one `libLLVM.so.*` in the nightly's lib directory, e.g.
/// `libLLVM.so.22.1-rust-1.97.0-nightly` (its SONAME).
fn nightly_libllvm(sysroot_lib: &Path) -> Result<String> {
    let entries = fs::read_dir(sysroot_lib)
        .with_context(|| format!("cannot list {}", sysroot_lib.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let name = entry
            .with_context(|| format!("cannot list {}", sysroot_lib.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("libLLVM.so.") {
            found.push(name);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM.so.* in {}: this nightly does not ship LLVM as a shared library, so \
             bpf-linker cannot link against it",
            sysroot_lib.display()
        ),
        many => bail!(
            "several libLLVM.so.* in {}: {}; keep one",
            sysroot_lib.display(),
            many.join(", ")
        ),
    }
}

/// `ln -sf target link`, but leaves a link that already points at `target` alone.
fn force_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("cannot replace {}", link.display()));
        }
    }
    symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

// === bpffs ===

/// The proxy pins its programs and maps in bpffs so they outlive a restart.
fn ensure_bpffs() -> Result<()> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    if is_bpffs_mounted(&mountinfo, BPFFS_MOUNT_POINT) {
        say(format_args!("bpffs mounted at {BPFFS_MOUNT_POINT}"));
        return Ok(());
    }
    if !sh::is_root()? {
        return skipped(&format!(
            "bpffs is not mounted at {BPFFS_MOUNT_POINT}; run \
             `sudo mount -t bpf bpf {BPFFS_MOUNT_POINT}` (mounting needs root)"
        ));
    }
    say(format_args!("mounting bpffs at {BPFFS_MOUNT_POINT}..."));
    sh::run(sh::command("mount")?.args(["-t", "bpf", "bpf", BPFFS_MOUNT_POINT])).context(
        "cannot mount bpffs: the kernel needs CONFIG_BPF_SYSCALL, and a container needs \
         CAP_SYS_ADMIN (docker run --privileged)",
    )
}

/// Whether /proc/self/mountinfo has a mount of type `bpf` at `mount_point`.
/// A line reads `id parent major:minor root MOUNT_POINT options [optional...] - FSTYPE source
/// superoptions`; the optional fields vary, hence the split at " - ".
fn is_bpffs_mounted(mountinfo: &str, mount_point: &str) -> bool {
    mountinfo.lines().any(|line| {
        let Some((before, after)) = line.split_once(" - ") else {
            return false;
        };
        before.split_whitespace().nth(4) == Some(mount_point)
            && after.split_whitespace().next() == Some("bpf")
    })
}

// === builds ===

/// Builds the kernel crate in its own workspace and returns the absolute object path.
///
/// Always `--release`, whatever the host profile: the release object is the one the proxy's
/// build script embeds by default, and BPF code gains nothing from a debug build (the kernel
/// crate's dev profile is optimised too, to keep the verifier's instruction count down).
fn build_ebpf() -> Result<PathBuf> {
    let crate_dir = sh::workspace_root()?.join(EBPF_CRATE_DIR);
    say(
        "building the kernel programs (proxy-ebpf: nightly, bpfel-unknown-none; about 1 minute from clean)...",
    );
    let started = Instant::now();
    sh::run(
        sh::clean_toolchain_command("cargo")?
            .args(["build", "--release"])
            .current_dir(&crate_dir),
    )
    .context(
        "the kernel crate did not build; if the linker failed, check `bpf-linker --version` \
         (cargo xtask build installs it) and `rustup component list --toolchain nightly \
         --installed` (needs rust-src)",
    )?;
    let object = crate_dir.join(EBPF_OBJECT);
    let bytes = fs::read(&object).with_context(|| {
        format!(
            "the kernel build succeeded but {} is missing; did the crate's name or target change?",
            object.display()
        )
    })?;
    check_bpf_elf(&bytes).with_context(|| format!("{} is not a BPF object", object.display()))?;
    say(format_args!(
        "kernel object: {} ({} bytes, built in {})",
        object.display(),
        bytes.len(),
        sh::human_duration(started.elapsed())
    ));
    Ok(object)
}

/// Checks the ELF magic and machine, so an object built for the host (a toolchain override
/// leaking into the nested cargo) fails here and not in the kernel loader.
fn check_bpf_elf(bytes: &[u8]) -> Result<()> {
    ensure!(bytes.starts_with(b"\x7fELF"), "no ELF magic");
    // e_machine: 2 bytes at offset 18, little-endian for bpfel.
    let machine = bytes
        .get(18..20)
        .and_then(|field| <[u8; 2]>::try_from(field).ok())
        .map(u16::from_le_bytes)
        .context("truncated ELF header")?;
    ensure!(
        machine == EM_BPF,
        "ELF machine is {machine}, not {EM_BPF} (eBPF): the nested cargo built for another \
         target; check for RUSTFLAGS or CARGO_BUILD_TARGET in the environment"
    );
    Ok(())
}

/// `cargo build --workspace` with the kernel object to embed.
fn build_host(release: bool, ebpf_object: &Path) -> Result<BuildOutput> {
    let root = sh::workspace_root()?;
    let profile = if release { "release" } else { "debug" };
    say(format_args!("building the host workspace ({profile})..."));
    let started = Instant::now();
    let mut cargo = sh::host_cargo()?;
    cargo
        .args(["build", "--workspace"])
        .env("PROXY_EBPF_OBJECT", ebpf_object)
        .current_dir(&root);
    if release {
        cargo.arg("--release");
    }
    sh::run(&mut cargo).context("the host workspace did not build: see the errors above")?;
    say(format_args!(
        "host workspace built in {}",
        sh::human_duration(started.elapsed())
    ));
    let target_dir = target_dir(&root)?;
    Ok(BuildOutput {
        ebpf_object: ebpf_object.to_path_buf(),
        profile_dir: target_dir.join(profile),
        target_dir,
    })
}

/// The host target directory as cargo resolves it (CARGO_TARGET_DIR, config, default).
fn target_dir(root: &Path) -> Result<PathBuf> {
    let metadata = sh::capture(
        sh::host_cargo()?
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(root),
    )?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("cannot parse `cargo metadata` output")?;
    metadata
        .get("target_directory")
        .and_then(serde_json::Value::as_str)
        .map(PathBuf::from)
        .context("`cargo metadata` output has no target_directory")
}

// === helpers ===

/// Reports a step that cannot be done here: a warning, or an error under CI.
fn skipped(message: &str) -> Result<()> {
    if sh::is_ci() {
        bail!("{message} (CI=true: a skipped step is an error)");
    }
    say(format_args!("warning: {message}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status() {
        assert!(is_installed_status("install ok installed"));
        assert!(!is_installed_status("unknown ok not-installed"));
        assert!(!is_installed_status("deinstall ok config-files"));
        assert!(!is_installed_status(""));
    }

    #[test]
    fn rustup_components() {
        let installed = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\n\
                         rust-src\nrust-std-x86_64-unknown-linux-gnu\n";
        assert!(has_component(installed, "rust-src"));
        assert!(has_component(installed, "clippy"));
        assert!(!has_component(installed, "rustfmt"));
        assert!(!has_component(
            "rust-std-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
    }

    #[test]
    fn bpf_linker_versions() {
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.13.0\n"),
            Some("0.13.0")
        );
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.9.13"),
            Some("0.9.13")
        );
        assert_eq!(parse_bpf_linker_version("rustc 1.95.0"), None);
        assert_eq!(parse_bpf_linker_version(""), None);
    }

    #[test]
    fn bpffs_in_mountinfo() {
        let mounted = "22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                       42 23 0:39 / /sys/fs/bpf rw,relatime - bpf bpf rw\n";
        assert!(is_bpffs_mounted(mounted, "/sys/fs/bpf"));
        let elsewhere = "42 23 0:39 / /run/bpf rw,relatime shared:9 - bpf bpf rw\n";
        assert!(!is_bpffs_mounted(elsewhere, "/sys/fs/bpf"));
        let other_fs = "42 23 0:39 / /sys/fs/bpf rw,relatime - tmpfs tmpfs rw\n";
        assert!(!is_bpffs_mounted(other_fs, "/sys/fs/bpf"));
    }

    #[test]
    fn bpf_elf_check() {
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[18..20].copy_from_slice(&EM_BPF.to_le_bytes());
        assert!(check_bpf_elf(&header).is_ok());
        header[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        assert!(check_bpf_elf(&header).is_err());
        assert!(check_bpf_elf(b"\x7fELF").is_err());
        assert!(check_bpf_elf(b"#!/bin/sh").is_err());
    }
}
