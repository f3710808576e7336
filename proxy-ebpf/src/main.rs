//! Kernel programs of the node proxy. Entry points only; each hook lives in its own file.
//! See ARCHITECTURE.md for the connection path and the maps.
#![no_std]
#![no_main]
// Atomic read-modify-write on map values (guard.rs).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connect;
mod guard;
mod key;
mod listeners;
mod maps;
mod redirect;
mod sockops;
mod sweep;

use aya_ebpf::{
    macros::{cgroup_sock_addr, sk_msg, sock_ops},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};

use connect::ALLOW;
use sockops::{SOCKOPS_OK, Side};

/// Redirects outbound IPv4 TCP connects of workloads to the proxy. Never rejects: a bypass
/// means the connect goes direct (fail-closed is the job of the pinned attachment, see
/// ARCHITECTURE.md).
#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let result = connect::try_connect4(&ctx);
    log_connect(&ctx, 4, &result);
    if let Err(bypass) = result {
        bypass.count();
    }
    ALLOW
}

/// IPv6 (and v4-mapped) counterpart of `mesh_connect4`.
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let result = connect::try_connect6(&ctx);
    log_connect(&ctx, 6, &result);
    if let Err(bypass) = result {
        bypass.count();
    }
    ALLOW
}

/// One debug record per connect when `log.kernel` is on (`FLAG_KERNEL_LOG`): the decision
/// and, for a bypass, its counter index (`proxy_common::counter`). The flag is checked first
/// so that with logging off nothing is formatted or written.
#[inline(always)]
fn log_connect(ctx: &SockAddrContext, family: u32, result: &Result<(), connect::Bypass>) {
    if !connect::kernel_log() {
        return;
    }
    match result {
        Ok(()) => aya_log_ebpf::debug!(ctx, "connect{}: redirected to the proxy", family),
        Err(b) => aya_log_ebpf::debug!(
            ctx,
            "connect{}: bypassed, reason counter {}",
            family,
            b.reason()
        ),
    }
}

/// sock_ops on the workload cgroup parent.
#[sock_ops]
pub fn mesh_sockops_wl(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx, Side::Workload);
    SOCKOPS_OK
}

/// sock_ops on the proxy's own cgroup.
#[sock_ops]
pub fn mesh_sockops_px(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx, Side::Proxy);
    SOCKOPS_OK
}

/// sk_msg on MESH_SOCKS.
#[sk_msg]
pub fn mesh_msg_redir(ctx: SkMsgContext) -> u32 {
    redirect::handle(&ctx);
    redirect::PASS
}

/// iter/task_file, run once at start-up: records listeners that predate the proxy
/// (`listeners.rs`). aya-ebpf 0.2 has no macro for iterators; this is what its `fentry`
/// macro expands to, with the section aya's loader reads as an iterator.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn mesh_listeners(ctx: *mut core::ffi::c_void) -> i32 {
    listeners::visit(ctx);
    0
}

/// iter/tcp over the proxy's network namespace, run when the proxy asks: lets leaving proxy
/// sockets go that no write of the proxy's would reach (`sweep.rs`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn mesh_release(ctx: *mut core::ffi::c_void) -> i32 {
    sweep::visit(ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects code that could get here.
    loop {}
}

/// GPL-compatible licence string: required for the socket helpers used here.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
