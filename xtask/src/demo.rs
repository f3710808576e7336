//! `cargo xtask demo`: placeholder until the demo lands. The real one starts with
//! `crate::build::ensure_built(false)` and runs the proxy between namespaced pods.

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    eprintln!("xtask: demo: not yet wired");
    anyhow::bail!("`cargo xtask demo` is not yet wired")
}
