//! `cargo xtask clean`: placeholder until the cleanup of namespaces, cgroups and pins lands.

/// Removes what an interrupted demo or test run left behind.
pub fn run() -> anyhow::Result<()> {
    eprintln!("xtask: clean: not yet wired");
    anyhow::bail!("`cargo xtask clean` is not yet wired")
}
