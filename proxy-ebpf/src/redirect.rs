//! sk_msg: move bytes from a registered socket straight into its peer's receive queue.
//!
//! Attached to MESH_SOCKS, so it runs for every sendmsg on a registered socket. The
//! redirected bytes skip TCP/IP entirely: they are queued on the peer's psock ingress list,
//! which the peer's recvmsg (tcp_bpf_recvmsg) reads before its ordinary TCP receive queue.
//! That ordering is why a direction that ever used the TCP path must keep using it.

use crate::key::sock_key;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    programs::SkMsgContext,
};
use proxy_common::{SockKey, counter};

use crate::maps::{MESH_PEERS, MESH_SOCKS, MESH_TAINTED, count};

/// The only verdict this program gives: a message is either redirected (the helper set the
/// target) or takes the TCP path. It never drops.
pub const PASS: u32 = SK_PASS;

const TAINTED: u32 = 1;

pub fn handle(ctx: &SkMsgContext) {
    let size = u64::from(ctx.size());
    let Some(key) = own_key(ctx) else {
        passed(size);
        return;
    };
    // SAFETY: only tested for presence.
    if unsafe { MESH_TAINTED.get(key) }.is_some() {
        count(counter::MSG_PASSED_TAINTED, 1);
        passed(size);
        return;
    }
    // SAFETY: the value is copied out at once.
    let Some(mut peer) = (unsafe { MESH_PEERS.get(key) }).copied() else {
        no_peer(key, size);
        return;
    };
    let ret = MESH_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS));
    if ret == i64::from(SK_PASS) {
        count(counter::MSG_REDIRECTED, 1);
        count(counter::MSG_REDIRECTED_BYTES, size);
    } else {
        // The peer is not (or no longer) in the SOCKHASH: the message goes by TCP, and so
        // does every later one in this direction.
        no_peer(key, size);
    }
}

#[inline(always)]
fn no_peer(key: SockKey, size: u64) {
    let _ = MESH_TAINTED.insert(key, TAINTED, 0);
    count(counter::MSG_PASSED_NO_PEER, 1);
    passed(size);
}

#[inline(always)]
fn passed(size: u64) {
    count(counter::MSG_PASSED, 1);
    count(counter::MSG_PASSED_BYTES, size);
}

#[inline(always)]
fn own_key(ctx: &SkMsgContext) -> Option<SockKey> {
    // SAFETY: bpf_get_netns_cookie is allowed in sk_msg programs (kernel 5.15+, checked by
    // `proxy check`), and ctx.msg is the context pointer the kernel passed in.
    unsafe {
        let netns = bpf_get_netns_cookie(ctx.as_ptr());
        sock_key!(ctx.msg, netns)
    }
}
