//! Running child processes and small facts about the machine, shared by the commands.
//!
//! Every child gets a PATH that contains the cargo bin directory: `sudo` and fresh CI shells
//! often drop it, and bpf-linker, rustup and the rustup proxies live there. Changing our own
//! environment would need `std::env::set_var`, which is unsafe in edition 2024, so the PATH is
//! set on each `Command` instead.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// Prints a progress line. Everything goes to stderr so stdout stays clean for the children.
pub fn say(message: impl std::fmt::Display) {
    eprintln!("xtask: {message}");
}

/// The workspace root: the parent of this crate's directory, fixed at compile time, so the
/// commands work from any current directory.
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent; run xtask from the workspace")
}

/// `$HOME`, required for the cargo bin directory and the LLVM prefix cache.
pub fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set; set it to the home directory that holds .cargo and .rustup")
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin`, `~/.cargo/bin` by default.
pub fn cargo_bin_dir() -> Result<PathBuf> {
    match env::var_os("CARGO_HOME").filter(|dir| !dir.is_empty()) {
        Some(cargo_home) => Ok(PathBuf::from(cargo_home).join("bin")),
        None => Ok(home()?.join(".cargo").join("bin")),
    }
}

/// Our PATH with the cargo bin directory in front, unless it is already on it.
fn child_path() -> Result<OsString> {
    let bin = cargo_bin_dir()?;
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if !dirs.contains(&bin) {
        dirs.insert(0, bin);
    }
    env::join_paths(dirs).context("a PATH entry contains ':'; fix PATH")
}

/// The first `name` on the children's PATH, as their `execvp` would find it.
pub fn which(name: &str) -> Result<Option<PathBuf>> {
    let path = child_path()?;
    Ok(env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file()))
}

/// A command for `program` with the cargo bin directory on its PATH.
pub fn command(program: impl AsRef<OsStr>) -> Result<Command> {
    let mut command = Command::new(program);
    command.env("PATH", child_path()?);
    Ok(command)
}

/// The cargo that runs xtask (`$CARGO`), for the host workspace: same toolchain, same flags.
pub fn host_cargo() -> Result<Command> {
    command(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

/// Variables the outer `cargo xtask` (and rustup) set that would override the toolchain, the
/// target, the flags or the target directory of a nested cargo for another workspace. With
/// them, the kernel crate would build with stable, for the host, into the host's target dir.
/// The `CARGO_BUILD_*` names are the same settings spelled as cargo config variables.
const TOOLCHAIN_OVERRIDES: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO",
    "CARGO_MAKEFLAGS",
];

/// A command for `program` (cargo, rustc, rustup: the rustup proxies) that picks its own
/// toolchain from `rust-toolchain.toml` or `+toolchain`, not from the outer cargo.
pub fn clean_toolchain_command(program: &str) -> Result<Command> {
    let mut command = command(program)?;
    for name in TOOLCHAIN_OVERRIDES {
        command.env_remove(name);
    }
    Ok(command)
}

/// `program arg arg` for progress lines and errors.
pub fn display(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    // `$CARGO` is a long toolchain path; the short name reads better and is what users type.
    if Path::new(&line).file_name() == Some(OsStr::new("cargo")) {
        line = "cargo".to_owned();
    }
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `command` with inherited stdio; a failure names the command and its exit status.
pub fn run(command: &mut Command) -> Result<()> {
    let line = display(command);
    match command.get_current_dir() {
        Some(dir) => say(format_args!("$ {line}    (in {})", dir.display())),
        None => say(format_args!("$ {line}")),
    }
    let status = command
        .status()
        .with_context(|| format!("cannot start `{line}`: is it installed and on PATH?"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a probe quietly and returns its stdout if it succeeded; `None` if it could not start
/// or failed. For "is X installed" questions, where failure is an answer, not an error.
pub fn probe(command: &mut Command) -> Option<String> {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `command` quietly and returns its stdout; a failure includes its stderr.
pub fn capture(command: &mut Command) -> Result<String> {
    let line = display(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`: is it installed and on PATH?"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

/// Whether we run with effective uid 0, read from /proc so no unsafe `geteuid` is needed.
pub fn is_root() -> Result<bool> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    effective_uid(&status)
        .map(|uid| uid == 0)
        .context("no Uid line in /proc/self/status")
}

/// The effective uid from /proc/self/status: `Uid:\treal\teffective\tsaved\tfs`.
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether we run under CI (`CI=true`, as GitHub, GitLab and `.ci/run` set it). There, a step
/// that cannot be done is an error instead of a warning: a skipped step must not look green.
pub fn is_ci() -> bool {
    env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}

/// `1m05s`, `12.3s`: short enough for progress lines and summaries.
pub fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        let whole = duration.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// On Ctrl-C (SIGINT) or SIGTERM, remove the namespaces, cgroups and pins of the nodes this
/// process made, then exit with 130. Destructors do not run when a signal ends a process,
/// so without this an interrupted demo or bench would leave them behind. The proxy and the
/// peers, in the same process group, get the terminal's SIGINT and stop by themselves.
pub fn cleanup_on_interrupt() -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("xtask: interrupted: removing pods, cgroups and pins");
        for r in ::tests::cleanup_live_nodes() {
            eprintln!("xtask: removed {r}");
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tcat\nUid:\t1000\t0\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tcat\n"), None);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m05s");
    }

    #[test]
    fn nested_cargo_loses_the_outer_toolchain() -> Result<()> {
        let command = clean_toolchain_command("cargo")?;
        let removed: Vec<_> = command
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        for name in ["RUSTUP_TOOLCHAIN", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO"] {
            assert!(removed.iter().any(|r| r == name), "{name} is not removed");
        }
        Ok(())
    }
}
