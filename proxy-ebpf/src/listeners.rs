//! iter/task_file: the start-up scan for listeners that predate the proxy.
//!
//! sock_ops judges a workload server's socket by its listener's mode when the connection
//! arrives (`sockops.rs`), through the listener's address that `BPF_SOCK_OPS_TCP_LISTEN_CB`
//! records in `MESH_LISTEN` during `listen()`. A program that called `listen()` before the
//! proxy attached sock_ops never ran that callback, and no later callback reaches a
//! listener, so without this scan its blocking servers would be registered and meet the
//! kernel's spurious EAGAIN (ARCHITECTURE.md, "Kernel facts"). The proxy runs this iterator
//! once, after attaching sock_ops: it visits every open file of every process on the node
//! (a task_file iterator is not bound to a network namespace, unlike iter/tcp, which sees
//! only the namespace of the process that creates it) and records each TCP listener it
//! finds, unless its port already has an entry (a `listen()` seen by sock_ops is newer).
//!
//! No close callback was asked for these listeners, so their entries stay after they close
//! until a later `listen()` on the port replaces them or the LRU drops them. A stale
//! address then only misjudges a mode (probe reads never fault): a server may be kept off
//! the short-circuit, or registered as it was before this scan existed.

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, file},
    helpers::bpf_sock_from_file,
};
use proxy_common::{FLAG_SOCKMAP, ListenKey};

use crate::{
    maps::{MESH_LISTEN, config},
    redirect::{kernel_address, read_kernel},
};

/// `sk_protocol` of a TCP socket, and `skc_state` of a listening one (include/net/tcp_states.h).
const IPPROTO_TCP: u16 = 6;
const TCP_LISTEN: u8 = 10;

/// One file of one process: `ctx` is the kernel's `struct bpf_iter__task_file` (meta, task,
/// fd, file: the file pointer is its fourth 8-byte word, NULL once the walk is over).
pub fn visit(ctx: *mut c_void) {
    let Some(cfg) = config() else { return };
    if cfg.flags & FLAG_SOCKMAP == 0
        || cfg.off_socket_sk == 0
        || cfg.off_skc_net == 0
        || cfg.off_net_cookie == 0
    {
        return;
    }
    // SAFETY: ctx is the iterator's context; the verifier types this 8-byte load of its
    // `file` member as a nullable pointer to `struct file`, checked before use.
    let f = unsafe { read_volatile(ctx.cast::<*mut file>().add(3)) };
    if f.is_null() {
        return;
    }
    // SAFETY: f is the non-null file the kernel handed the iterator.
    let socket = unsafe { bpf_sock_from_file(f) };
    if socket.is_null() {
        return; // not a socket
    }
    // The verifier allows no variable offsets on a typed kernel pointer: probe reads from a
    // plain number accept any.
    let Some(sk) = read_kernel::<u64>(kernel_address(socket), cfg.off_socket_sk) else {
        return;
    };
    if read_kernel::<u16>(sk, cfg.off_sock_protocol) != Some(IPPROTO_TCP)
        || read_kernel::<u8>(sk, cfg.off_skc_state) != Some(TCP_LISTEN)
    {
        return;
    }
    let (Some(port), Some(net)) = (
        read_kernel::<u16>(sk, cfg.off_skc_num),
        read_kernel::<u64>(sk, cfg.off_skc_net),
    ) else {
        return;
    };
    let Some(netns) = read_kernel::<u64>(net, cfg.off_net_cookie) else {
        return;
    };
    let key = ListenKey {
        netns,
        port: u32::from(port),
        _pad: 0,
    };
    let _ = MESH_LISTEN.insert(key, sk, u64::from(BPF_NOEXIST));
}
