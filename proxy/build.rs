//! Embeds the kernel object (`proxy-ebpf`) into the proxy binary.
//!
//! The kernel crate needs the pinned nightly and bpf-linker, which plain `cargo build` on the
//! host must not require. So this script only embeds an object that already exists:
//! `$PROXY_EBPF_OBJECT` if set (cargo xtask build sets it), otherwise the kernel crate's
//! default output path. Without one the proxy still builds, and `proxy run` in eBPF mode
//! and `proxy check` say exactly how to get it (`cargo xtask build`).
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let default = manifest.join("../proxy-ebpf/target/bpfel-unknown-none/release/proxy-ebpf");
    let source = env::var_os("PROXY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", source.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default()).join("proxy-ebpf.o");
    let bytes = match fs::read(&source) {
        Ok(bytes) => bytes,
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}: the proxy is built without its kernel programs; run `cargo xtask build`",
                source.display()
            );
            Vec::new()
        }
    };
    if let Err(e) = fs::write(&out, bytes) {
        println!("cargo:warning=cannot write {}: {e}", out.display());
        std::process::exit(1);
    }
}
