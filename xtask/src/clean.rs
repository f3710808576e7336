//! `cargo xtask clean`: remove what an interrupted demo or test run left behind.

/// Removes namespaces, cgroups, pins and scratch directories named `mtest-*`.
pub fn run() -> anyhow::Result<()> {
    if !crate::sh::is_root()? {
        anyhow::bail!(
            "cleaning namespaces, cgroups and pins needs root: sudo -E env PATH=\"$PATH\" cargo xtask clean"
        );
    }
    let removed = tests::cleanup_leftovers()?;
    if removed.is_empty() {
        println!("xtask: clean: nothing to remove");
    }
    for r in &removed {
        println!("xtask: clean: removed {r}");
    }
    Ok(())
}
