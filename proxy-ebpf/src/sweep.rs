//! iter/tcp over the proxy's network namespace: moves leaving proxy sockets on where no
//! write of the proxy's would.
//!
//! A proxy socket `P` of a connection that leaves the SOCKHASH may go only once the kernel
//! has seen it safe (`redirect::release`: the workload `W` it faces has no psock left, and
//! `P`'s own queue is empty), and sk_msg runs only on `P`'s sends, the proxy's writes to `W`.
//! A workload that only sends (an upload, a one-way stream) gets none, so its `P` stayed in
//! the SOCKHASH until the connection ended: every read of the stream went through
//! `tcp_bpf_recvmsg`, and the copy kept its readiness rechecks. The proxy runs this iterator
//! when a leaving connection's proxy socket waits for that verdict (`proxy/src/ebpf/mod.rs`,
//! `Maps::sweep`): it visits every TCP socket of the namespace it is read from (the proxy's),
//! builds each one's `SockKey` as sk_msg and sock_ops do, and runs the same `release` on each
//! proxy socket marked `FLOW_TCP_DETACHING`.
//!
//! An iterator, not a SOCKHASH iterator: aya 0.14 cannot give an iterator link its target
//! map, and the proxy's userspace has no `unsafe` to do it by hand.
//!
//! `release` holds without `P`'s lock (sk_msg runs it under that lock, which orders nothing it
//! relies on): once the proxy marked `P` leaving, `P` redirects nothing into `W` (the proxy
//! marks it only between its own writes), so `W`'s queue only shrinks; once `W` has no psock,
//! no redirect into `P` is decided or on its way (a spliced connection, whose far workload
//! could also write into `P`, never leaves), so `P`'s queue only shrinks too. What it saw
//! stays true. The one field both may write, `P`'s `Flow::detach`, only moves towards
//! `DETACH_READY`, which either writes only when it holds; a `DETACH_PEER_EMPTY` written over
//! it by the other (each read it before) delays the proxy until the next verdict, no more.

use core::{ffi::c_void, ptr::read_volatile};

use proxy_common::{AF_INET, AF_INET6, DETACH_READY, FLOW_TCP_DETACHING, SockKey, normalise_ip6};

use crate::{
    maps::{MESH_FLOWS, MESH_PEERS, config},
    redirect::{kernel_address, read_kernel, release},
};

/// One socket: `ctx` is the kernel's `struct bpf_iter__tcp` (meta, sk_common, uid: the socket
/// pointer is its second 8-byte word, NULL once the walk is over).
pub fn visit(ctx: *mut c_void) {
    // SAFETY: ctx is the iterator's context; the verifier types this 8-byte load of its
    // `sk_common` member as a nullable pointer, checked before use.
    let sk = unsafe { read_volatile(ctx.cast::<*const u8>().add(1)) };
    if sk.is_null() {
        return;
    }
    let Some(key) = key_of(kernel_address(sk)) else {
        return;
    };
    let Some(cfg) = config() else { return };
    let Some(flow) = MESH_FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a map value pointer; see the module comment for who else writes the entry.
    let flow = unsafe { &mut *flow };
    if flow.proxy == 0 || flow.state != FLOW_TCP_DETACHING || flow.detach == DETACH_READY {
        return;
    }
    // SAFETY: copied out at once.
    let peer = (unsafe { MESH_PEERS.get(key) }).copied();
    release(cfg, flow, peer.as_ref());
}

/// The `SockKey` of the socket at kernel address `sk`, read through the `sock_common` offsets
/// the proxy took from the kernel's BTF; `None` without them, for a family other than IPv4
/// and IPv6, or if a read fails.
#[inline(always)]
fn key_of(sk: u64) -> Option<SockKey> {
    let cfg = config()?;
    if cfg.off_skc_family == 0 || cfg.off_skc_num == 0 || cfg.off_net_cookie == 0 {
        return None;
    }
    let family = u32::from(read_kernel::<u16>(sk, cfg.off_skc_family)?);
    let local_port = u32::from(read_kernel::<u16>(sk, cfg.off_skc_num)?);
    let remote_port = u32::from(u16::from_be(read_kernel::<u16>(sk, cfg.off_skc_dport)?));
    let net = read_kernel::<u64>(sk, cfg.off_skc_net)?;
    let netns = read_kernel::<u64>(net, cfg.off_net_cookie)?;
    let (family, local_ip, remote_ip) = if family == AF_INET {
        (
            AF_INET,
            [read_kernel::<u32>(sk, cfg.off_skc_rcv_saddr)?, 0, 0, 0],
            [read_kernel::<u32>(sk, cfg.off_skc_daddr)?, 0, 0, 0],
        )
    } else if family == AF_INET6 {
        // v4-mapped addresses are keyed as IPv4, as sock_ops and sk_msg key them.
        let (family, local) = normalise_ip6(read_kernel::<[u32; 4]>(sk, cfg.off_skc_v6_rcv_saddr)?);
        let (_, remote) = normalise_ip6(read_kernel::<[u32; 4]>(sk, cfg.off_skc_v6_daddr)?);
        (family, local, remote)
    } else {
        return None;
    };
    Some(SockKey::new(
        netns,
        family,
        (local_port, remote_port),
        local_ip,
        remote_ip,
    ))
}
