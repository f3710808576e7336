//! sock_ops: hand original destinations to the proxy and register sockets for the
//! short-circuit.
//!
//! Two programs share this code: one on the workload cgroup parent, one on the proxy's own
//! cgroup. They pair sockets like this (T is a 4-tuple, N a network namespace cookie):
//!
//! - workload client -> proxy inbound: the client's ACTIVE_ESTABLISHED knows both ends (its
//!   own {N_pod, T} and the proxy's {N_proxy, reverse T}) and writes PEERS both ways.
//!   It runs before the client sends its final ACK, so before the proxy's socket exists.
//! - proxy outbound -> workload server: the proxy's ACTIVE_ESTABLISHED writes EXPECT[reverse
//!   T]; the server's PASSIVE_ESTABLISHED (strictly later, on that ACK) finds it and writes
//!   PEERS both ways.
//!
//! A socket that already carried payload when it became established (TCP Fast Open data in
//! the SYN) is not registered: its first bytes took the TCP path and redirecting later bytes
//! would overtake them.
//!
//! Nor is a blocking workload socket (unless `FLAG_SOCKMAP_BLOCKING`): once in a SOCKHASH its
//! `recvmsg` is `tcp_bpf_recvmsg`, which returns EAGAIN to a blocking reader woken with
//! nothing in its psock queue (by the ACK of its own FIN, by write space, by a state change)
//! instead of waiting on. A client is judged by its own file at ACTIVE_ESTABLISHED (connect
//! runs in its process, so the file is there). An accepted socket has no file until
//! `accept()`, after PASSIVE_ESTABLISHED, so a server is judged by its listener's mode at
//! that moment (the listener's address is recorded at `listen()`: TCP_LISTEN, `MESH_LISTEN`).
//! A registered workload socket is judged again at its first send (sk_msg,
//! `redirect::turned_blocking`): one that turned blocking since (a connect with a timeout)
//! leaves the SOCKHASH there, removed by this program while that send goes out
//! (`BPF_SOCK_OPS_HDR_OPT_LEN_CB`, `leave_if_asked`); so does a stream that nothing was
//! redirected into.

use core::ptr::read_volatile;

use crate::key::sock_key;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, BPF_TCP_CLOSE,
        BPF_TCP_LISTEN, bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_delete_elem},
    programs::SockOpsContext,
};
use proxy_common::{
    Config, DETACH_READY, FLAG_SOCKMAP, FLAG_SOCKMAP_BLOCKING, FLOW_TCP_DETACHING, Flow,
    GUARD_CLIENT, GUARD_INGRESS, GUARD_LEAVING, ListenKey, O_NONBLOCK, OrigKey, PROXY_LEAVES,
    SockKey, counter,
};

use crate::guard;
use crate::maps::{
    MESH_DIRECT, MESH_EXPECT, MESH_FLOWS, MESH_LISTEN, MESH_ORIG_CK, MESH_ORIG_DST, MESH_PEERS,
    MESH_SOCKS, MESH_SPLICE, config, count,
};
use crate::redirect::{has_psock, kernel_address, queue_len, read_kernel};

/// Which cgroup the program is attached to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Workload,
    Proxy,
}

/// sock_ops programs return 1; the value is ignored for the callbacks used here.
pub const SOCKOPS_OK: u32 = 1;

/// Marker value for EXPECT entries.
const EXPECTED: u64 = 1;

pub fn handle(ctx: &SockOpsContext, side: Side) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
        && op != BPF_SOCK_OPS_TCP_LISTEN_CB
        && op != BPF_SOCK_OPS_HDR_OPT_LEN_CB
    {
        return;
    }
    let Some(key) = own_key(ctx) else { return };
    if op == BPF_SOCK_OPS_HDR_OPT_LEN_CB {
        leave_if_asked(ctx, key);
        return;
    }
    let Some(cfg) = config() else { return };
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        // Remember the listener, to ask its file for its mode when a connection arrives:
        // programs often make it non-blocking only after listen() (Rust's std, Java's
        // ServerSocketChannel), and may switch it later. The close callback removes it.
        let sk = socket_address(ctx);
        if side == Side::Workload && cfg.flags & FLAG_SOCKMAP != 0 && sk != 0 {
            let _ = MESH_LISTEN.insert(listen_key(&key), sk, 0);
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        return;
    }
    if op == BPF_SOCK_OPS_STATE_CB {
        // arg 1 is the new state. Sockets leave MESH_SOCKS by themselves when they close
        // (the kernel unlinks them); the side tables are ours to clean.
        if ctx.arg(1) == BPF_TCP_CLOSE && ctx.arg(0) == BPF_TCP_LISTEN {
            // A listener (arg 0 is the old state). Only its own entry: another socket may
            // listen on the port now (SO_REUSEPORT).
            let lk = listen_key(&key);
            // SAFETY: the value is copied out at once.
            if unsafe { MESH_LISTEN.get(lk) }.copied() == Some(socket_address(ctx)) {
                let _ = MESH_LISTEN.remove(lk);
            }
            return;
        }
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let _ = MESH_PEERS.remove(key);
            let _ = MESH_FLOWS.remove(key);
            if side == Side::Proxy {
                let _ = MESH_SPLICE.remove(key);
            }
            if side == Side::Workload {
                let _ = MESH_ORIG_DST.remove(orig_key(&key));
            }
        }
        return;
    }
    // Ask for the close callback of this socket, to clean the tables above.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);

    let sockmap = cfg.flags & FLAG_SOCKMAP != 0;
    match (side, op) {
        (Side::Workload, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) => {
            // SAFETY: bpf_get_socket_cookie is allowed in sock_ops and takes the ctx.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: the value is read by copy right away; a concurrent delete of the same
            // cookie cannot happen (only this socket's own callbacks use it).
            let Some(orig) = (unsafe { MESH_ORIG_CK.get(cookie) }).copied() else {
                return; // not a redirected connect
            };
            let _ = MESH_ORIG_CK.remove(cookie);
            if MESH_ORIG_DST.insert(orig_key(&key), orig, 0).is_ok() {
                count(counter::ORIG_DST_RECORDED, 1);
            }
            // orig.port: the port the workload asked for (a service's, or its server's).
            let sk = socket_address(ctx);
            if sockmap
                && !cfg.sockmap_excluded(orig.port)
                && !carried_early_data(ctx, op)
                && !kept_off_as_blocking(cfg, is_blocking(cfg, sk))
            {
                let peer = key.reversed_in(cfg.proxy_netns);
                // Judged in connect(): a connect with a timeout turns blocking right after,
                // so nothing goes into it before its first send is judged (GUARD_CLIENT).
                let guard = if cfg.flags & FLAG_SOCKMAP_BLOCKING == 0 {
                    GUARD_CLIENT
                } else {
                    0
                };
                if register(ctx, key, side, sk, guard) {
                    let _ = MESH_PEERS.insert(key, peer, 0);
                    let _ = MESH_PEERS.insert(peer, key, 0);
                }
            }
        }
        (Side::Workload, _) => {
            // PASSIVE_ESTABLISHED: a server socket. Only pair it if the proxy connected to it
            // (and then the proxy's side already checked the excluded ports).
            let plain = key.without_netns();
            // The delete is the claim: the proxy deletes the same entry when it finds its
            // socket unpaired (`Maps::release_unpaired`) and then takes that socket out of
            // the SOCKHASH. Exactly one delete succeeds, so a server never pairs with a
            // proxy socket that left, whose short-circuit queue would be dropped with it.
            if !sockmap || MESH_EXPECT.remove(plain).is_err() {
                return;
            }
            if carried_early_data(ctx, op) {
                return;
            }
            // The listener's mode now: the accepted socket has no file yet. One that
            // listened before the proxy attached was recorded by the start-up scan
            // (listeners.rs); one missing altogether (a failed scan) leaves its server
            // registered.
            // SAFETY: the value is copied out at once.
            let listener = unsafe { MESH_LISTEN.get(listen_key(&key)) }.copied();
            let blocking = listener.is_some_and(|sk| is_blocking(cfg, sk));
            if kept_off_as_blocking(cfg, blocking) {
                // The proxy's socket stays registered without a peer: its sk_msg passes
                // (no peer) and stops judging after its first message.
                return;
            }
            let peer = key.reversed_in(cfg.proxy_netns);
            if register(ctx, key, side, socket_address(ctx), 0) {
                let _ = MESH_PEERS.insert(key, peer, 0);
                let _ = MESH_PEERS.insert(peer, key, 0);
            }
        }
        (Side::Proxy, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) => {
            // The proxy's upstream connect. If the server is a workload on this node, its
            // PASSIVE_ESTABLISHED will find this and complete the pair.
            if !sockmap || cfg.sockmap_excluded(key.remote_port) || carried_early_data(ctx, op) {
                return;
            }
            if register(ctx, key, side, socket_address(ctx), 0) {
                let _ = MESH_EXPECT.insert(key.reversed_in(0), EXPECTED, 0);
            }
        }
        (Side::Proxy, _) => {
            // An accepted connection. Only those on the redirect port come from workloads, and
            // only those whose client registered (its ACTIVE_ESTABLISHED, which ran before
            // this, wrote our PEERS entry; not for an excluded port or a full map).
            if !sockmap || key.local_port != cfg.redirect_port || carried_early_data(ctx, op) {
                return;
            }
            // SAFETY: only tested for presence.
            if unsafe { MESH_PEERS.get(key) }.is_none() {
                return;
            }
            register(ctx, key, side, socket_address(ctx), 0);
        }
    }
}

/// Inserts the socket (kernel address `sk`, from `socket_address`) into MESH_SOCKS with a
/// fresh MESH_FLOWS entry (redirecting, nothing sent). A failure (either map full) is counted
/// and leaves the connection on the TCP path: the peer's sk_msg finds no entry and passes, and
/// so does this socket's without a flow.
#[inline(always)]
fn register(ctx: &SockOpsContext, mut key: SockKey, side: Side, sk: u64, guard: u64) -> bool {
    // Overwrites what a closed socket with the same 4-tuple may have left (its close
    // callback normally removes it).
    // SAFETY: ctx.ops is the context pointer; snd_nxt is a readable field in sock_ops. At
    // establishment no payload has been queued (early-data sockets are not registered), so
    // it is where write_seq starts.
    let seq0 = unsafe { read_volatile(&(*ctx.ops).snd_nxt) };
    let flow = Flow {
        sk,
        proxy: u32::from(side == Side::Proxy),
        seq0,
        guard,
        ..Flow::default()
    };
    if side == Side::Proxy {
        let _ = MESH_SPLICE.remove(key);
        let _ = MESH_DIRECT.remove(key);
    }
    if MESH_FLOWS.insert(key, flow, 0).is_err() {
        count(counter::FLOW_INSERT_FAILED, 1);
        return false;
    }
    // SAFETY: ctx.ops is the context pointer the kernel passed to this sock_ops program.
    let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
    match MESH_SOCKS.update(&mut key, ops, 0) {
        Ok(()) => {
            count(counter::SOCKHASH_INSERTED, 1);
            // A workload socket may leave by itself (turned blocking, or a stream) while
            // nothing was redirected into it: this callback, run for each segment it sends
            // until then (`leave_if_asked`), removes it before the send that decided it
            // returns.
            if side == Side::Workload {
                let _ =
                    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
            }
            true
        }
        Err(_) => {
            let _ = MESH_FLOWS.remove(key);
            count(counter::SOCKHASH_INSERT_FAILED, 1);
            false
        }
    }
}

/// `BPF_SOCK_OPS_HDR_OPT_LEN_CB` of a registered workload socket, run for each segment it
/// sends (in `tcp_established_options`, under the socket's lock) until it left the SOCKHASH
/// or never can by itself. Two ways out, both before anything could be lost:
///
/// - sk_msg decided it (`GUARD_LEAVING`: it turned blocking at its first send, or asked as
///   a stream of small writes, and nothing was ever redirected into it; set before sk_msg
///   passed the deciding message to TCP): it leaves while that message goes out, before its
///   `sendmsg` returns. Nothing was redirected into it, nor can be
///   (`redirect::claim_ingress`).
/// - Its connection is leaving (`leaves_with_its_connection`): the proxy marked its socket
///   facing this one `FLOW_TCP_DETACHING` and this socket's queue is empty. That is the
///   verdict the proxy waits for (`DETACH_READY`, which sk_msg gives at this socket's next
///   send, or the proxy's socket's at the proxy's next write to it); here the segment that
///   gives it is one this socket sends anyway, typically the ACK of the first bytes the
///   proxy sent it by TCP after the mark, and the socket leaves at once instead of waiting
///   for the proxy to look again.
///
/// The kernel drops the psock once no send holds it any more, and the socket's reads and
/// writes are plain TCP's again. sk_msg programs may not delete from a SOCKHASH; sock_ops
/// programs may (`may_update_sockmap`). Segments before either (the handshake's last ACK,
/// ACKs of TCP-path bytes) cost a map lookup or three each.
///
/// A socket the proxy took out of the SOCKHASH (no psock any more) stops the callback at its
/// next segment. Left on, it ran for every segment of every stream the proxy had taken off
/// for the rest of the connection: measured with `kernel.bpf_stats_enabled` during 100
/// streams of 16 KiB writes, 230k runs a second at 113 ns each, long after all had left.
#[inline(always)]
fn leave_if_asked(ctx: &SockOpsContext, key: SockKey) {
    // Looked up once per segment, for both checks below that need it.
    let cfg = config();
    let done = match MESH_FLOWS.get_ptr_mut(key) {
        None => true,
        // SAFETY: a map value pointer; `sk` is written only when the entry is made.
        Some(entry) if out_of_sockhash(cfg, unsafe { (*entry).sk }) => true,
        Some(entry) => {
            let seen = guard::load(entry);
            if seen & GUARD_LEAVING != 0 {
                remove_self(&key);
                true
            } else if seen & GUARD_INGRESS != 0 {
                // SAFETY: a map value pointer; this socket's own sk_msg, the only other
                // writer of its non-atomic fields, runs under the socket's lock, which
                // this callback holds too.
                leaves_with_its_connection(cfg, &key, unsafe { &mut *entry })
            } else {
                false
            }
        }
    };
    if done {
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    }
}

/// For a workload socket that things were redirected into: true once it left the SOCKHASH
/// because its connection is leaving and its queue is empty, or once that can never happen
/// here (its proxy socket is gone, or its connection is not one the proxy takes off,
/// `PROXY_LEAVES`); false to look again at its next segment. The proxy's socket facing it
/// is the only one that redirects into it (a connection the proxy takes off never takes the
/// kernel-only path), and the proxy marks it `FLOW_TCP_DETACHING` from the task that writes
/// on it, between writes: from the mark on no redirect into this socket is under way or can
/// come, and an empty queue stays empty.
#[inline(always)]
fn leaves_with_its_connection(cfg: Option<&Config>, key: &SockKey, flow: &mut Flow) -> bool {
    let Some(cfg) = cfg else { return true };
    if cfg.off_psock_msg_len == 0 {
        return true; // an empty queue cannot be shown
    }
    // SAFETY (both): copied out at once.
    let Some(peer) = (unsafe { MESH_PEERS.get(key) }).copied() else {
        return true;
    };
    let Some(proxy) = (unsafe { MESH_FLOWS.get(peer) }).copied() else {
        return true;
    };
    if proxy.proxy & PROXY_LEAVES == 0 {
        return true;
    }
    if proxy.state != FLOW_TCP_DETACHING || queue_len(cfg, flow.sk) != 0 {
        return false;
    }
    guard::fetch_or(flow, GUARD_LEAVING);
    // Counted once per workload, whoever finds it: its own sk_msg (`detach`, which then set
    // `DETACH_READY`) or the proxy socket's (`release`, which then set `DETACH_PEER_EMPTY`).
    if flow.detach != DETACH_READY && proxy.detach == 0 {
        count(counter::DETACH_READY, 1);
    }
    flow.detach = DETACH_READY;
    remove_self(key);
    true
}

/// True if the socket at kernel address `sk` (its `Flow::sk`) has no psock: it is out of
/// the SOCKHASH for good (the proxy removed it, or it removed itself; no socket is added
/// again). False if that cannot be read.
#[inline(always)]
fn out_of_sockhash(cfg: Option<&Config>, sk: u64) -> bool {
    let Some(cfg) = cfg else { return false };
    cfg.off_sk_user_data != 0 && sk != 0 && !has_psock(cfg, sk)
}

/// Removes this workload socket from the SOCKHASH (counted once removed).
#[inline(always)]
fn remove_self(key: &SockKey) {
    // SAFETY: the map pointer is the SOCKHASH's definition (the loader relocates it) and
    // the key a live value of the map's key type.
    let gone = unsafe {
        bpf_map_delete_elem(
            core::ptr::from_ref(&MESH_SOCKS).cast_mut().cast(),
            core::ptr::from_ref(key).cast(),
        )
    };
    if gone == 0 {
        count(counter::SELF_REMOVED, 1);
    }
}

/// The kernel address of the socket (`ctx->sk`) as a plain number, 0 if unavailable.
#[inline(always)]
fn socket_address(ctx: &SockOpsContext) -> u64 {
    // SAFETY: ctx.ops is the context pointer; `sk` is a readable 8-byte field in sock_ops.
    let sk = unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return 0;
    }
    kernel_address(sk)
}

/// True if the socket at kernel address `sk` has a file without `O_NONBLOCK`
/// (`sk->sk_socket->file->f_flags`, offsets from the kernel's BTF). False when unknown: no
/// offsets, no `struct socket` or file yet (an accepted socket before `accept()`), a failed
/// read.
#[inline(always)]
pub(crate) fn is_blocking(cfg: &Config, sk: u64) -> bool {
    if cfg.off_sock_socket == 0 || cfg.off_socket_file == 0 || cfg.off_file_flags == 0 {
        return false;
    }
    let Some(socket) = read_kernel::<u64>(sk, cfg.off_sock_socket) else {
        return false;
    };
    let Some(file) = read_kernel::<u64>(socket, cfg.off_socket_file) else {
        return false;
    };
    match read_kernel::<u32>(file, cfg.off_file_flags) {
        Some(flags) => flags & O_NONBLOCK == 0,
        None => false,
    }
}

/// True (and counted) if a workload socket judged `blocking` stays off the SOCKHASH.
#[inline(always)]
fn kept_off_as_blocking(cfg: &Config, blocking: bool) -> bool {
    if blocking && cfg.flags & FLAG_SOCKMAP_BLOCKING == 0 {
        count(counter::SOCKHASH_SKIPPED_BLOCKING, 1);
        return true;
    }
    false
}

#[inline(always)]
fn listen_key(key: &SockKey) -> ListenKey {
    ListenKey {
        netns: key.netns,
        port: key.local_port,
        _pad: 0,
    }
}

/// True if payload already moved before the socket was established (TCP Fast Open).
#[inline(always)]
fn carried_early_data(ctx: &SockOpsContext, op: u32) -> bool {
    // SAFETY: ctx.ops is the context pointer; these fields are readable in sock_ops.
    let (out, inb) = unsafe {
        (
            read_volatile(&(*ctx.ops).data_segs_out),
            read_volatile(&(*ctx.ops).data_segs_in),
        )
    };
    let early = if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        out > 0
    } else {
        inb > 0
    };
    if early {
        count(counter::SOCKHASH_SKIPPED_EARLY_DATA, 1);
    }
    early
}

/// The socket's key: its namespace and its 4-tuple, v4-mapped addresses normalised.
#[inline(always)]
fn own_key(ctx: &SockOpsContext) -> Option<SockKey> {
    // SAFETY: bpf_get_netns_cookie is allowed in sock_ops programs (kernel 5.15+, checked by
    // `proxy check`), and ctx.ops is the context pointer the kernel passed in.
    unsafe {
        let netns = bpf_get_netns_cookie(ctx.as_ptr());
        sock_key!(ctx.ops, netns)
    }
}

/// The proxy-side view of a workload client socket, as the proxy computes it after accept().
#[inline(always)]
fn orig_key(key: &SockKey) -> OrigKey {
    OrigKey {
        family: key.family,
        client_port: key.local_port,
        proxy_port: key.remote_port,
        _pad: 0,
        client_ip: key.local_ip,
        proxy_ip: key.remote_ip,
    }
}
