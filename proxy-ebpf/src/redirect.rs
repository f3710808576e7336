//! sk_msg: move bytes from a registered socket straight into its peer's receive queue, while
//! that is safe and faster than TCP.
//!
//! Attached to MESH_SOCKS, so it runs for every sendmsg on a registered socket, under that
//! socket's lock (`tcp_bpf_sendmsg`): the messages of one socket are judged one at a time, in
//! order. A redirected message skips TCP/IP: `tcp_bpf_sendmsg_redir` -> `bpf_tcp_ingress`
//! appends it to the peer's psock ingress list before the sender's sendmsg returns, and the
//! peer's `tcp_bpf_recvmsg` reads that list before its TCP receive queue.
//!
//! That read order decides everything here:
//! - redirect then TCP is in order (the receiver drains the list first), so a direction may
//!   leave the short-circuit at any message;
//! - TCP then redirect is not (the redirected bytes would be read first, and a blocking
//!   MSG_WAITALL reader in `tcp_recvmsg` would never see them), so a direction comes back
//!   only when its receiver is the proxy and has consumed every TCP-path byte (`may_resume`),
//!   or, for the proxy's direction into a workload client held on TCP until the client's
//!   first send was judged, when the client is non-blocking and has read every TCP byte
//!   (`judged_receiver`).
//!
//! A direction leaves when: the peer is not in the SOCKHASH (yet); the peer's queue would go
//! past `Config::queue_limit`, counting a `struct sk_msg` per message (the kernel charges
//! ingress bytes only against the machine-wide `tcp_mem`, never the receiver's buffer, and
//! the structs not at all: without this a sender that outruns its reader queues without
//! limit; see `queued_cost`); TCP's machine-wide memory is past half of `tcp_mem`'s low
//! threshold (`memory_tight`). On TCP the receiver's window holds the sender back as usual.
//! Before that, a proxy socket's direction is held back by the proxy itself: past 3/4 of the
//! limit its message still goes but `Flow::held` asks the proxy to pause (see `policy`).
//! A workload whose direction is a stream (`Config::small_streak`) or keeps meeting the limit
//! (`note_pressure`) asks for its whole connection to leave the SOCKHASH; the proxy takes
//! it off, socket by socket (`detach`, `release`; proxy/src/transport/splice.rs, `Pacer`).

use crate::key::sock_key;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns, bpf_msg_apply_bytes, bpf_probe_read_kernel},
    programs::SkMsgContext,
};
use proxy_common::{
    Config, DETACH_PEER_EMPTY, DETACH_READY, DETACH_STREAM, DETACH_WANTED, FLAG_SOCKMAP_BLOCKING,
    FLOW_DIRECT, FLOW_REDIRECT, FLOW_TCP_BACKPRESSURE, FLOW_TCP_BLOCKING, FLOW_TCP_DETACHING,
    FLOW_TCP_MEMORY, FLOW_TCP_NO_PEER, FLOW_TCP_STREAM, FLOW_TCP_UNJUDGED, Flow, GUARD_CLIENT,
    GUARD_INGRESS, GUARD_LEAVING, GUARD_MODE_CHECKED, PROXY_LEAVES, Queued, STREAM_SENT_KNOWN,
    SockKey, counter,
};

use crate::guard;
use crate::maps::{MESH_DIRECT, MESH_FLOWS, MESH_PEERS, MESH_SOCKS, MESH_SPLICE, config, count};
use crate::sockops::is_blocking;

/// The only verdict this program gives: a message is either redirected (the helper set the
/// target) or takes the TCP path. It never drops.
pub const PASS: u32 = SK_PASS;

/// From this fill level of a workload's queue (in sixteenths of `Config::queue_limit`: 3/4)
/// the proxy's writes into it ask for a pause (`Flow::held`).
const HELD_FROM: u64 = 12;

/// `sk_user_data` keeps flags in its low bits (`SK_USER_DATA_NOCOPY`, `_BPF`, `_PSOCK`,
/// include/net/sock.h); the pointer is the rest.
const SK_USER_DATA_PSOCK: u64 = 4;
const SK_USER_DATA_PTRMASK: u64 = !7;

pub fn handle(ctx: &SkMsgContext) {
    let size = ctx.size();
    let Some(key) = own_key(ctx) else {
        passed(size);
        return;
    };
    let Some(flow) = MESH_FLOWS.get_ptr_mut(key) else {
        count(counter::MSG_PASSED_NO_FLOW, 1);
        passed(size);
        return;
    };
    // SAFETY: the pointer comes from the map lookup; only this socket's messages (serialised
    // by its lock) and its own close callback touch its entry.
    let flow = unsafe { &mut *flow };
    let Some(cfg) = config() else {
        leave(ctx, flow, FLOW_TCP_NO_PEER, size);
        return;
    };
    // SAFETY: the value is copied out at once.
    let peer = (unsafe { MESH_PEERS.get(key) }).copied();
    if flow.proxy == 0
        && cfg.flags & FLAG_SOCKMAP_BLOCKING == 0
        && guard::load(flow) & GUARD_MODE_CHECKED == 0
        && turned_blocking(ctx, cfg, flow, peer.as_ref(), size)
    {
        return;
    }
    if flow.proxy != 0 && flow.state == FLOW_TCP_DETACHING {
        // The proxy is taking this connection off the short-circuit: this message goes by
        // TCP like every later one; the program keeps running only to tell the proxy when
        // the next socket may leave.
        count(counter::MSG_PASSED_TAINTED, 1);
        passed(size);
        if release(cfg, flow, peer.as_ref()) {
            stop_judging(ctx);
        }
        return;
    }
    if flow.detach != 0 && detach(cfg, flow, peer.as_ref()) {
        passed(size);
        stop_judging(ctx);
        return;
    }
    if flow.proxy == 0
        && let Some(receiver) = peer.as_ref()
    {
        match splice_target(cfg, flow, receiver, size) {
            Ok(mut target) => {
                if MESH_SOCKS.redirect_msg(ctx, &mut target, u64::from(BPF_F_INGRESS))
                    == i64::from(SK_PASS)
                {
                    if flow.state != FLOW_DIRECT {
                        flow.state = FLOW_DIRECT;
                        count(counter::SPLICE_STARTED, 1);
                    }
                    note_queued(&mut flow.to_far, size);
                    count_direct(receiver, size);
                    count(counter::MSG_DIRECT, 1);
                    count(counter::MSG_DIRECT_BYTES, u64::from(size));
                } else {
                    // The far workload closed since we looked.
                    leave(ctx, flow, FLOW_TCP_NO_PEER, size);
                }
                return;
            }
            // Off the kernel-only path, bytes go to the proxy over TCP: in order, since the
            // far workload reads its psock list (our earlier direct bytes) first, and the
            // proxy's copies of later bytes land behind them.
            Err(reason) if flow.state == FLOW_DIRECT => {
                leave(ctx, flow, reason, size);
                return;
            }
            Err(_) => {}
        }
    }
    if flow.proxy != 0 && flow.state == FLOW_TCP_UNJUDGED {
        match judged_receiver(cfg, flow, peer.as_ref()) {
            Judged::Yes => {
                flow.state = FLOW_REDIRECT;
                count(counter::FLOW_RESUMED, 1);
            }
            Judged::NotYet(why) => {
                count(why, 1);
                passed(size);
                return;
            }
            Judged::Never => {
                leave(ctx, flow, FLOW_TCP_NO_PEER, size);
                return;
            }
        }
    }
    if flow.state != FLOW_REDIRECT {
        if !may_resume(cfg, flow, peer.as_ref(), size) {
            if let Some(peer) = peer.as_ref()
                && stream_on_tcp(cfg, flow, peer, size)
            {
                leave(ctx, flow, FLOW_TCP_STREAM, size);
                return;
            }
            count(counter::MSG_PASSED_TAINTED, 1);
            passed(size);
            if !resumable(flow) {
                stop_judging(ctx);
            } else if let Some(peer) = peer.as_ref() {
                // On TCP `streak` counts the messages that found the proxy still behind.
                flow.streak = flow.streak.saturating_add(1);
                if flow.streak >= RESUME_TRIES {
                    flow.streak = 0;
                    note_pressure(cfg, flow, peer, size);
                }
            }
            return;
        }
        flow.state = FLOW_REDIRECT;
        flow.streak = 0;
        flow.behind = 0;
        count(counter::FLOW_RESUMED, 1);
    }
    let Some(mut peer) = peer else {
        leave(ctx, flow, FLOW_TCP_NO_PEER, size);
        return;
    };
    if let Some(reason) = policy(cfg, flow, &peer, size) {
        if reason == FLOW_TCP_BACKPRESSURE {
            note_pressure(cfg, flow, &peer, size);
        }
        leave(ctx, flow, reason, size);
        return;
    }
    let ret = MESH_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS));
    if ret == i64::from(SK_PASS) {
        note_queued(&mut flow.to_peer, size);
        flow.redirected_bytes += u64::from(size);
        count(counter::MSG_REDIRECTED, 1);
        count(counter::MSG_REDIRECTED_BYTES, u64::from(size));
    } else {
        // The peer left the SOCKHASH since the policy looked (it closed).
        leave(ctx, flow, FLOW_TCP_NO_PEER, size);
    }
}

/// The far workload's key if this workload's message may go straight to it (the kernel-only
/// path), or the reason it may not. `receiver` is the proxy socket that gets this workload's
/// bytes; the proxy's `MESH_SPLICE` entry for it names the proxy's socket on the other side,
/// whose peer is the far workload.
///
/// Switching a direction to this path is safe only when nothing of it can still arrive at the
/// far workload after the direct bytes: the proxy has read and finished writing every byte
/// this workload sent towards it (`Splice::relayed` equals what we sent over TCP plus what we
/// redirected to the proxy; compared modulo 2^32, exact since the difference is at most the
/// bytes in flight), and the proxy's direction into the far workload never took the TCP
/// path (its `write_seq` never moved), so the far workload has no TCP bytes it could read
/// after ours and cannot be waiting in `tcp_recvmsg`, which does not look at the psock list.
/// Once switched, only the memory rules of `policy` apply.
#[inline(always)]
fn splice_target(
    cfg: &Config,
    flow: &mut Flow,
    receiver: &SockKey,
    size: u32,
) -> Result<SockKey, u32> {
    if cfg.off_tcp_write_seq == 0 || flow.sk == 0 {
        return Err(FLOW_TCP_NO_PEER);
    }
    // SAFETY (three lookups): each value is copied out at once.
    let Some(splice) = (unsafe { MESH_SPLICE.get(receiver) }).copied() else {
        return Err(FLOW_TCP_NO_PEER);
    };
    let Some(target) = (unsafe { MESH_PEERS.get(splice.out) }).copied() else {
        return Err(FLOW_TCP_NO_PEER);
    };
    let Some(far_entry) = MESH_FLOWS.get_ptr_mut(target) else {
        return Err(FLOW_TCP_NO_PEER);
    };
    // SAFETY: a map value pointer, copied out at once (its guard is changed only through
    // `claim_ingress`).
    let far = unsafe { *far_entry };
    if far.proxy != 0 || far.sk == 0 {
        return Err(FLOW_TCP_NO_PEER);
    }
    if flow.state != FLOW_DIRECT {
        let Some(sent) = sent32(cfg, flow) else {
            return Err(FLOW_TCP_NO_PEER);
        };
        if sent != splice.relayed as u32 {
            return Err(FLOW_TCP_NO_PEER);
        }
        // SAFETY: copied out at once.
        let Some(out) = (unsafe { MESH_FLOWS.get(splice.out) }).copied() else {
            return Err(FLOW_TCP_NO_PEER);
        };
        let Some(out_written) = read_kernel::<u32>(out.sk, cfg.off_tcp_write_seq) else {
            return Err(FLOW_TCP_NO_PEER);
        };
        // Or it did (a server's greeting, sent before the far workload, a client, was
        // judged: `FLOW_TCP_UNJUDGED`), and the far workload has read all of it and is
        // non-blocking, so it cannot be waiting in `tcp_recvmsg` either. The proxy wrote
        // everything this workload sent (above), so its socket writes nothing meanwhile.
        if out_written != out.seq0
            && !(judged_non_blocking(cfg, &far)
                && read_kernel::<u32>(far.sk, cfg.off_tcp_copied_seq) == Some(out_written))
        {
            return Err(FLOW_TCP_NO_PEER);
        }
    }
    // Direct writes may fill only half the far queue: when this direction leaves, the proxy
    // relays what then reaches it into the same queue, and it needs room to do that on the
    // short-circuit (paced, see `policy`) rather than meet the limit at once and leave for TCP.
    // The far queue may still hold this socket's direct messages from an earlier stay on
    // this path (`to_far` is kept across leaving and coming back).
    if cfg.queue_limit != 0 {
        let cost = settle_cost(cfg, &mut flow.to_far, queue_len(cfg, far.sk), size);
        if let Some(reason) = memory_rules(cfg, flow.sk, cost, cfg.queue_limit / 2) {
            return Err(reason);
        }
    }
    claim_ingress(far_entry)?;
    Ok(target)
}

/// True if workload `w` (a copy of its entry) had its first send judged non-blocking, is
/// not leaving the SOCKHASH, and is non-blocking now.
#[inline(always)]
fn judged_non_blocking(cfg: &Config, w: &Flow) -> bool {
    w.guard & (GUARD_MODE_CHECKED | GUARD_LEAVING) == GUARD_MODE_CHECKED
        && cfg.off_tcp_copied_seq != 0
        && !is_blocking(cfg, w.sk)
}

/// Whether a proxy direction held on TCP for a workload client not judged yet
/// (`FLOW_TCP_UNJUDGED`) may come back to the short-circuit with this message.
enum Judged {
    /// The client's first send found it non-blocking, it is still so, and it has read
    /// every byte this socket sent over TCP (its `copied_seq` equals our `write_seq`; we
    /// hold our lock, so ours cannot move): redirected bytes land behind nothing unread, and
    /// it is not waiting in `tcp_recvmsg`, which does not look at the psock list.
    Yes,
    /// Not yet (the counter to count this message under): not judged, or bytes unread.
    NotYet(u32),
    /// Never: the client left or is leaving the SOCKHASH, or turned blocking.
    Never,
}

#[inline(always)]
fn judged_receiver(cfg: &Config, flow: &Flow, peer: Option<&SockKey>) -> Judged {
    let Some(peer) = peer else {
        return Judged::Never;
    };
    // SAFETY: copied out at once (the guard bits are only read).
    let Some(client) = (unsafe { MESH_FLOWS.get(peer) }).copied() else {
        return Judged::Never;
    };
    if client.guard & GUARD_LEAVING != 0 {
        return Judged::Never;
    }
    if client.guard & GUARD_MODE_CHECKED == 0 {
        return Judged::NotYet(counter::MSG_PASSED_UNJUDGED);
    }
    if !judged_non_blocking(cfg, &client) || cfg.off_tcp_write_seq == 0 {
        return Judged::Never;
    }
    match (
        read_kernel::<u32>(flow.sk, cfg.off_tcp_write_seq),
        read_kernel::<u32>(client.sk, cfg.off_tcp_copied_seq),
    ) {
        (Some(written), Some(read)) if written == read => Judged::Yes,
        (Some(_), Some(_)) => Judged::NotYet(counter::MSG_PASSED_TAINTED),
        _ => Judged::Never,
    }
}

/// Called right before redirecting a message into a workload socket: the reason to
/// send it by TCP instead if the receiver is leaving the SOCKHASH by itself
/// (`GUARD_LEAVING`: nothing may go into its queue) or is a client whose first send was not
/// judged yet (`GUARD_CLIENT`: it may be about to leave so); else marks it `GUARD_INGRESS`,
/// so that it never will leave by itself. One atomic `or` decides which came first
/// (`turned_blocking` sets `GUARD_LEAVING` only while `GUARD_INGRESS` is clear): a redirect
/// decided here is queued (under the receiver's lock, in `bpf_tcp_ingress`) after this
/// program returns, too late for the receiver to see it. `entry` is the receiver's
/// `MESH_FLOWS` value, which the caller looked up for its own checks.
///
/// A pointer into another socket's entry could meet it freed and reused by a socket that
/// registered since (`MESH_FLOWS` is preallocated). That socket then carries a stray
/// `GUARD_INGRESS` (it asks the proxy instead of leaving by itself if it turns blocking), or
/// this message goes by TCP: both safe.
#[inline(always)]
fn claim_ingress(entry: *mut Flow) -> Result<(), u32> {
    let seen = guard::load(entry);
    if seen & GUARD_LEAVING != 0 {
        return Err(FLOW_TCP_NO_PEER);
    }
    if seen & (GUARD_CLIENT | GUARD_MODE_CHECKED) == GUARD_CLIENT {
        return Err(FLOW_TCP_UNJUDGED);
    }
    if seen & GUARD_INGRESS != 0 {
        return Ok(()); // claimed before: GUARD_LEAVING can no longer be set
    }
    if guard::fetch_or(entry, GUARD_INGRESS) & GUARD_LEAVING != 0 {
        return Err(FLOW_TCP_NO_PEER);
    }
    Ok(())
}

/// For a workload socket's first send (`GUARD_MODE_CHECKED` clear): true if the socket turned
/// blocking since sock_ops registered it and leaves the SOCKHASH now (this message went to
/// TCP). A client is judged non-blocking in `connect()`, but a connect with a timeout makes
/// the socket non-blocking only for the connect (Rust's `connect_timeout`, hiredis,
/// libmysqlclient, a C program with `select()`), and its blocking reads then wait in
/// `tcp_bpf_recvmsg`, which can return a spurious EAGAIN (ARCHITECTURE.md, "Kernel facts").
/// Likewise a server whose accepted socket is blocking under a non-blocking listener
/// (Python's `accept()` on a listener with a timeout).
///
/// Leaving at once is safe only while nothing was ever redirected into this socket (its
/// queue is empty and stays so): `GUARD_LEAVING` is set with one compare-and-swap only
/// while `GUARD_INGRESS` is clear, and senders check it (`claim_ingress`). This message and
/// every later one go by TCP, in order (none was redirected before). The removal itself is
/// sock_ops' (an sk_msg program may not delete from a SOCKHASH): it runs while this message
/// goes out (`BPF_SOCK_OPS_HDR_OPT_LEN_CB`), inside this `sendmsg`, so the program's next
/// read finds a plain TCP socket. Nothing goes into a client before this moment
/// (`GUARD_CLIENT`); a server has had its request redirected in by now, so a blocking one
/// asks the proxy to take its connection off instead (`DETACH_WANTED`), which waits until
/// its queue is read; false then, and the message is judged as usual.
#[inline(always)]
fn turned_blocking(
    ctx: &SkMsgContext,
    cfg: &Config,
    flow: &mut Flow,
    peer: Option<&SockKey>,
    size: u32,
) -> bool {
    guard::fetch_or(flow, GUARD_MODE_CHECKED);
    if !is_blocking(cfg, flow.sk) {
        return false;
    }
    if leave_by_itself(flow) {
        leave(ctx, flow, FLOW_TCP_BLOCKING, size);
        return true;
    }
    count(counter::TURNED_BLOCKING_ASKED, 1);
    if let Some(peer) = peer {
        want_detach(cfg, flow, peer, DETACH_WANTED, size);
    }
    false
}

/// Sets `GUARD_LEAVING` if nothing was redirected into this workload socket
/// (`GUARD_INGRESS` clear: one compare-and-swap, against `claim_ingress`); true if it did.
/// The caller then puts this message and every later one on TCP, and sock_ops removes the
/// socket from the SOCKHASH while this message goes out (`leave_if_asked`): nothing can be
/// in its queue, nor come, so nothing is lost.
#[inline(always)]
fn leave_by_itself(flow: &mut Flow) -> bool {
    let seen = guard::load(flow);
    seen & (GUARD_INGRESS | GUARD_LEAVING) == 0 && guard::replace(flow, seen, seen | GUARD_LEAVING)
}

/// Adds a direct message to the count of the proxy socket it skipped (`MESH_DIRECT`), which
/// the proxy reads when the connection ends: by then the workloads' and even the proxy's own
/// `MESH_FLOWS` entries may be gone (a socket that received and sent FIN closes before its
/// file does). Only this workload's messages, one at a time under its lock, touch the entry.
#[inline(always)]
fn count_direct(skipped: &SockKey, size: u32) {
    match MESH_DIRECT.get_ptr_mut(skipped) {
        // SAFETY: a map value pointer; see above for who writes it.
        Some(n) => unsafe { *n += u64::from(size) },
        None => {
            let _ = MESH_DIRECT.insert(skipped, u64::from(size), 0);
        }
    }
}

/// `None` to redirect this message, or the reason its direction must leave for TCP. A proxy
/// socket's message into a workload is claimed last (`claim_ingress`): a workload client not
/// judged yet (resumable), or one leaving the SOCKHASH by itself, gets it by TCP.
#[inline(always)]
fn policy(cfg: &Config, flow: &mut Flow, peer: &SockKey, size: u32) -> Option<u32> {
    let entry = MESH_FLOWS.get_ptr_mut(peer);
    if cfg.queue_limit == 0 && cfg.small_streak == 0 {
        // The naive policy: measured by the bench, never the default.
        return match entry {
            Some(entry) if flow.proxy != 0 => claim_ingress(entry).err(),
            _ => None,
        };
    }
    let Some(entry) = entry else {
        return Some(FLOW_TCP_NO_PEER);
    };
    // SAFETY: a map value pointer, copied out at once (its guard is changed only through
    // `claim_ingress`).
    let receiver = unsafe { *entry };
    let queued = queue_len(cfg, receiver.sk);
    let cost = settle_cost(cfg, &mut flow.to_peer, queued, size);
    // Only workloads' writes count for the stream rule: the proxy writes what it read, up to
    // a whole buffer at once, so its small writes mean there is little to send; and the
    // direction into a workload stays on the short-circuit whenever it can, because a
    // workload's blocking reader that waits in tcp_bpf_recvmsg can be woken by TCP-path data
    // with nothing in the psock queue (ARCHITECTURE.md, "Kernel facts"). Only where the proxy
    // will take the connection off (`PROXY_LEAVES`): elsewhere the direction stays as it was.
    let stream_rule =
        cfg.small_streak != 0 && flow.proxy == 0 && receiver.proxy & PROXY_LEAVES != 0;
    if let Some(reason) = memory_rules(cfg, flow.sk, cost, cfg.queue_limit) {
        // With the stream rule on, a workload that writes a whole queue limit ahead of its
        // reader is a stream as well. Large writes meet the limit before they make a streak
        // (4 MiB is four 1 MiB writes), then stay on TCP without ever asking, and with
        // their sockets still in the SOCKHASH pay sk_msg's cost on every send: measured
        // (cubic, interleaved), 1 MiB streams at x0.84 to x0.95 of plain TCP.
        if reason == FLOW_TCP_BACKPRESSURE && stream_rule {
            want_detach(cfg, flow, peer, DETACH_STREAM, size);
            if flow.detach == DETACH_STREAM {
                return Some(FLOW_TCP_STREAM);
            }
        }
        return Some(reason);
    }
    // The proxy's writes into a workload that reads more slowly: past 3/4 of the limit this
    // message still goes, and the proxy, which reads the fill level after each write, pauses
    // before its next one, longer the fuller the queue. A redirect has no flow control of its
    // own; without the pause the proxy reaches the limit within milliseconds and the
    // direction leaves for TCP for good (a proxy direction never comes back: its receiver is
    // a workload, which may be blocked in `tcp_recvmsg` where redirected bytes are
    // invisible). The limit still holds if the workload stops reading altogether.
    if flow.proxy != 0 && cfg.queue_limit != 0 {
        // In sixteenths of the limit; memory_rules above keeps it at 16 or below.
        let fill = cost * 16 / u64::from(cfg.queue_limit);
        flow.held = if fill >= HELD_FROM { fill as u32 } else { 0 };
        if flow.held != 0 {
            count(counter::MSG_PROXY_HELD, 1);
        }
    }
    if stream_rule {
        // A reply in between (request/response) resets the count: it shows as bytes the
        // proxy's socket sent this one since its last message, and a request after it finds
        // the queue empty. Without a reply the writes are one-way: measured (`cargo xtask
        // bench --streams-only --cpu-per-pod`, where the proxy has CPU enough to read every
        // message at once), streams judged by the queue alone asked 0.3 to 0.7 s into a 2 s
        // stream of 64 B writes, all of it on the slower path.
        let sent = peer_sent(cfg, &receiver);
        let replied = sent != flow.peer_sent;
        flow.peer_sent = sent;
        if size < cfg.small_msg && (queued > 0 || !replied) {
            flow.streak = flow.streak.saturating_add(1);
            if flow.streak >= cfg.small_streak {
                // A stream: its whole connection is better off on plain TCP (the proxy's
                // sockets too, which keep paying for sk_msg while they stay in the
                // SOCKHASH). It asks, and its direction goes to TCP at once, where the
                // proxy's receive window paces it while the proxy takes the connection off
                // (`detach`).
                want_detach(cfg, flow, peer, DETACH_STREAM, size);
                if flow.detach == DETACH_STREAM {
                    return Some(FLOW_TCP_STREAM);
                }
            }
        } else {
            flow.streak = 0;
        }
    }
    if flow.proxy != 0 {
        return claim_ingress(entry).err();
    }
    None
}

/// For a workload's direction on the TCP path that may not come back yet (`may_resume`: the
/// proxy has not read everything it sent): true once it turns out to be a stream, as on the
/// short-circuit (`policy`), with `Config::small_streak` small messages in a row that found
/// the proxy behind; it then asks for its connection to leave (`DETACH_STREAM`) and stays on
/// TCP (`FLOW_TCP_STREAM`). Only where the stream rule applies (`PROXY_LEAVES`).
///
/// Why: a direction whose first bytes took TCP (written right after connect, before the proxy
/// socket was in the SOCKHASH), or that met the limit before the proxy marked its sockets,
/// stays there while its writer keeps the proxy behind, never reaching `policy`. Otherwise it
/// asks only after 2 x `RESUME_TRIES` messages (`note_pressure`: `DETACH_WANTED`).
#[inline(always)]
fn stream_on_tcp(cfg: &Config, flow: &mut Flow, peer: &SockKey, size: u32) -> bool {
    if cfg.small_streak == 0
        || flow.proxy != 0
        || flow.detach != 0
        || flow.state == FLOW_TCP_STREAM
        || size >= cfg.small_msg
    {
        flow.behind = 0;
        return false;
    }
    // Counted before the proxy marks its sockets too, so that a stream asks with its first
    // message after the mark.
    flow.behind = flow.behind.saturating_add(1);
    if flow.behind < cfg.small_streak {
        return false;
    }
    // SAFETY: the value is copied out at once.
    let Some(receiver) = (unsafe { MESH_FLOWS.get(peer) }).copied() else {
        return false;
    };
    if receiver.proxy & PROXY_LEAVES == 0 {
        return false;
    }
    want_detach(cfg, flow, peer, DETACH_STREAM, size);
    flow.detach == DETACH_STREAM
}

/// What the proxy's socket `receiver` has sent its workload: redirected bytes plus TCP bytes
/// (`write_seq - seq0`, modulo 2^32), wrapping; only compared for equality.
#[inline(always)]
fn peer_sent(cfg: &Config, receiver: &Flow) -> u64 {
    let tcp = if cfg.off_tcp_write_seq != 0 && receiver.sk != 0 {
        read_kernel::<u32>(receiver.sk, cfg.off_tcp_write_seq)
            .map_or(0, |w| w.wrapping_sub(receiver.seq0))
    } else {
        0
    };
    receiver.redirected_bytes.wrapping_add(u64::from(tcp))
}

/// True if a direction on the TCP path may come back to the short-circuit with this message
/// without overtaking anything: its receiver is the proxy, whose reads are non-blocking (a
/// workload blocked in `tcp_recvmsg` with MSG_WAITALL would never see psock bytes), it has
/// read every byte this socket ever queued to TCP (its `copied_seq` equals our `write_seq`;
/// the short-circuit moves neither, so both count TCP-path bytes only, in one sequence
/// space), and its queue is at most half the limit. We hold our socket's lock, so our
/// `write_seq` cannot move meanwhile; the receiver's `copied_seq` only grows.
/// A stream (`FLOW_TCP_STREAM`) stays on TCP: its connection is leaving the short-circuit.
#[inline(always)]
fn may_resume(cfg: &Config, flow: &Flow, peer: Option<&SockKey>, size: u32) -> bool {
    if flow.proxy != 0
        || flow.state == FLOW_TCP_STREAM
        || flow.state == FLOW_TCP_BLOCKING
        || cfg.off_tcp_write_seq == 0
        || cfg.off_tcp_copied_seq == 0
        || flow.sk == 0
    {
        return false;
    }
    let Some(peer) = peer else { return false };
    // SAFETY: the value is copied out at once.
    let Some(receiver) = (unsafe { MESH_FLOWS.get(peer) }).copied() else {
        return false;
    };
    if receiver.proxy == 0 || receiver.sk == 0 {
        return false;
    }
    let (Some(written), Some(consumed)) = (
        read_kernel::<u32>(flow.sk, cfg.off_tcp_write_seq),
        read_kernel::<u32>(receiver.sk, cfg.off_tcp_copied_seq),
    ) else {
        return false;
    };
    if written != consumed {
        return false;
    }
    let queued = queue_len(cfg, receiver.sk);
    queued_cost(cfg, &flow.to_peer, queued, size) <= u64::from(cfg.queue_limit / 2)
        && !memory_tight(cfg, flow.sk)
}

/// True if TCP's machine-wide memory in use is past half of `tcp_mem`'s low threshold (below
/// which the kernel applies no pressure at all). Redirected bytes are charged to the same
/// count (`bpf_tcp_ingress` → `sk_mem_charge`), but a sender on the short-circuit that hits
/// the limit waits in `sk_stream_wait_memory` for a wake-up only its own TCP queue could
/// give: so the short-circuit stops adding well before the kernel would refuse.
/// Read through the socket: `sk->sk_prot->memory_allocated` and `->sysctl_mem[0]` (the
/// tcp_bpf protos copy both pointers from tcp_prot).
#[inline(always)]
fn memory_tight(cfg: &Config, sk: u64) -> bool {
    if cfg.off_sock_prot == 0 || sk == 0 {
        return false;
    }
    let Some(prot) = read_kernel::<u64>(sk, cfg.off_sock_prot) else {
        return false;
    };
    let (Some(allocated_at), Some(limits_at)) = (
        read_kernel::<u64>(prot, cfg.off_proto_memory_allocated),
        read_kernel::<u64>(prot, cfg.off_proto_sysctl_mem),
    ) else {
        return false;
    };
    match (
        read_kernel::<i64>(allocated_at, 0),
        read_kernel::<i64>(limits_at, 0),
    ) {
        (Some(allocated), Some(low)) => allocated > low / 2,
        _ => false,
    }
}

/// The `T` at `base + offset` in kernel memory; `None` if `base` is 0 or the probe read fails
/// (probe reads never fault: a wrong or stale address reads an error or a wrong number, and
/// every use here only steers the policy; the redirect itself goes through the SOCKHASH).
#[inline(always)]
pub(crate) fn read_kernel<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: as above; the helper copies size_of::<T>() bytes into a local.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(u64::from(offset)) as *const T) }.ok()
}

/// A typed kernel pointer's value as a plain number, for `read_kernel` and for map values.
/// The verifier forbids arithmetic on (and storing into maps of) a pointer it has typed (a
/// socket, a `struct socket`); copying the pointer's own stack slot through
/// `bpf_probe_read_kernel` yields the same address, untyped. 0 if the copy fails.
#[inline(always)]
pub(crate) fn kernel_address<T>(ptr: *const T) -> u64 {
    let raw = ptr as u64;
    // SAFETY: the source is a live local; the helper copies its 8 bytes.
    unsafe { bpf_probe_read_kernel(core::ptr::from_ref(&raw)) }.unwrap_or(0)
}

/// The memory rules every redirect obeys, on either path: what the receiver's queue would
/// hold with this message (`cost`, from `queued_cost`) may not pass `limit` (backpressure;
/// `Config::queue_limit`, half of it for direct writes), and the machine's TCP memory must
/// not be tight (`memory_tight`, read through the sender's socket). `None`: this message may go.
#[inline(always)]
fn memory_rules(cfg: &Config, sender_sk: u64, cost: u64, limit: u32) -> Option<u32> {
    if limit != 0 && cost > u64::from(limit) {
        return Some(FLOW_TCP_BACKPRESSURE);
    }
    if memory_tight(cfg, sender_sk) {
        return Some(FLOW_TCP_MEMORY);
    }
    None
}

/// Kernel memory the receiver's queue would hold with this message: its `queued` bytes, this
/// message, and a `struct sk_msg` (`Config::msg_cost`) for this message and for each of this
/// socket's earlier ones that may still wait there (`q`, this socket's record for that
/// receiver). `bpf_tcp_ingress` allocates one per redirected message and charges only the
/// bytes to TCP's accounting (and `msg_tot_len`): without this a stream of 64-byte writes
/// into a reader that fell behind pinned 3.7 GB of kmalloc-1k slab across 100 connections
/// while TCP's count showed 230 MB.
///
/// The count is a bound from what this socket knows (the queue does not count its messages):
/// at most `queued` bytes of its `q.msgs` messages can still wait, each at most `q.max`
/// bytes, and a message is read whole or partly, so at least `(q.bytes - queued) / q.max` of
/// them are gone; an empty queue holds none of them, whatever the record still counts (with
/// mixed sizes it stays pessimistic until `settle_cost` resets it). Exact for a stream of
/// equal writes, and it corrects itself as the queue drains.
#[inline(always)]
fn queued_cost(cfg: &Config, q: &Queued, queued: u32, size: u32) -> u64 {
    let mut waiting = if queued == 0 { 0 } else { q.msgs };
    let queued64 = u64::from(queued);
    if q.max != 0 && q.bytes > queued64 {
        let gone = (q.bytes - queued64) / u64::from(q.max);
        waiting = waiting.saturating_sub(gone);
    }
    // Capped so the product fits in 64 bits without a 128-bit multiply (which BPF lacks).
    let waiting = if waiting > u64::from(u32::MAX - 1) {
        u64::from(u32::MAX - 1)
    } else {
        waiting
    };
    queued64 + u64::from(size) + (waiting + 1).wrapping_mul(u64::from(cfg.msg_cost))
}

/// This socket's message of `size` bytes was queued at the receiver `q` describes.
#[inline(always)]
fn note_queued(q: &mut Queued, size: u32) {
    q.msgs = q.msgs.saturating_add(1);
    q.bytes = q.bytes.saturating_add(u64::from(size));
    if size > q.max {
        q.max = size;
    }
}

/// `queued_cost` for a sender about to judge a message, which also starts its record for
/// that receiver afresh when the queue is seen empty (none of its messages waits there).
#[inline(always)]
fn settle_cost(cfg: &Config, q: &mut Queued, queued: u32, size: u32) -> u64 {
    if queued == 0 {
        *q = Queued::default();
    }
    queued_cost(cfg, q, queued, size)
}

/// Messages in a row that a workload's direction sends over TCP finding the proxy still
/// behind (`may_resume` says no) that count as meeting the queue limit once
/// (`note_pressure`). A direction that went to TCP before its pair was complete (its first
/// bytes, written right after connect) and whose writer never lets the proxy catch up
/// otherwise stays there for good, paying for sk_msg on every message: measured with 100
/// connections of 64 B writes, 96 % of messages. Request/response finds the proxy caught up
/// at its next request.
const RESUME_TRIES: u32 = 256;

/// A workload's direction (per hop, into the proxy) met the queue limit once more. At
/// `Config::detach_after` times it asks to leave the SOCKHASH (`Flow::detach`): the proxy
/// cannot drain it as fast as it writes, and a redirect never makes a writer wait (only
/// TCP's window does), so such a writer burns the CPU the proxy needs, then meets the limit
/// and goes on over TCP through `tcp_bpf_sendmsg`, which still pays for sk_msg (a copy into
/// an `sk_msg`, this program, `tcp_bpf_push`). Not for a connection the proxy has opened to
/// the kernel-only path (`MESH_SPLICE` of its socket): the far workload could then write
/// straight into this socket's queue, which the proxy cannot stop (see `detach`).
#[inline(always)]
fn note_pressure(cfg: &Config, flow: &mut Flow, peer: &SockKey, size: u32) {
    if flow.proxy != 0 || cfg.detach_after == 0 {
        return;
    }
    flow.pressure = flow.pressure.saturating_add(1);
    if u32::from(flow.pressure) >= cfg.detach_after {
        want_detach(cfg, flow, peer, DETACH_WANTED, size);
    }
}

/// The largest write with which a workload that asks may leave the SOCKHASH by itself
/// (`want_detach`). Measured (`cargo xtask bench --streams-only`, per thread, x100, 3 to 5
/// repetitions): 64 B streams went from x0.63-x0.76 of TCP through the proxy to x1.07-x1.11
/// when their sockets left at once, 1 KiB ones ran at x0.97 with TCP memory peaking at 288k
/// pages (pressure starts at 384k here). 16 KiB streams that left at once drove TCP's
/// memory to 320k-380k pages, into pressure: the proxy's sockets facing them held 6 to
/// 26 MB unread each, their receive buffers grown to 16-33 MB, and with drops and
/// retransmission timeouts a connection stalled for 2 to 3 s in 4 of 5 runs (x0.44). Left
/// to the proxy they peaked at 240k pages, with no stall. Why an earlier leave lets those
/// buffers grow so far is not understood yet; the bound keeps larger writes on the
/// measured path.
const SELF_LEAVE_MAX_WRITE: u32 = 1024;

/// This workload asks for its connection to leave the SOCKHASH (`why`: `DETACH_WANTED` or
/// `DETACH_STREAM`), unless leaving is off (`Config::detach_after` 0) or the connection may
/// take the kernel-only path (`MESH_SPLICE` of its peer: see `note_pressure`).
#[inline(always)]
fn want_detach(cfg: &Config, flow: &mut Flow, peer: &SockKey, why: u16, size: u32) {
    // SAFETY: only tested for presence.
    if flow.detach == 0 && cfg.detach_after != 0 && unsafe { MESH_SPLICE.get(peer) }.is_none() {
        flow.detach = why;
        // SAFETY: bpf_ktime_get_ns takes no arguments and is allowed in every program type.
        flow.asked_ns = unsafe { bpf_ktime_get_ns() };
        if why == DETACH_WANTED {
            count(counter::DETACH_WANTED, 1); // a stream is counted by `leave`
        }
        // Nothing was ever redirected into it (an upload, say), and it writes small pieces:
        // it need not wait for the proxy to notice and to stop redirecting into it; it
        // leaves the SOCKHASH with this message, which goes by TCP like every later one.
        // The proxy still takes the other sockets off, and its own socket facing this one
        // leaves on the byte count (`stream_sent`, recorded here for `DETACH_WANTED` too).
        // `detach` keeps the ask: that is what the proxy acts on; it sees `GUARD_LEAVING`
        // and takes this socket for gone. A workload that met the limit leaves only with the
        // stream rule on, where the proxy takes its connection off at once as well.
        let left = (why == DETACH_STREAM || cfg.small_streak != 0)
            && size <= SELF_LEAVE_MAX_WRITE
            && leave_by_itself(flow);
        if left {
            count(counter::DETACH_SELF, 1);
            count(counter::DETACH_READY, 1);
        }
        if why == DETACH_STREAM || left {
            flow.stream_sent = sent_so_far(cfg, flow);
        }
    }
}

/// `Flow::stream_sent` for this workload's direction, which stays on TCP from the message
/// being judged on (judged a stream, or its connection is leaving): what it sent before
/// (`sent32`) with `STREAM_SENT_KNOWN`; 0 if `write_seq` cannot be read.
/// The proxy compares it with what it read (modulo 2^32, as a signed difference: what it is
/// behind by is bounded by the queue limit and TCP's buffers, far below 2^31).
#[inline(always)]
fn sent_so_far(cfg: &Config, flow: &Flow) -> u64 {
    sent32(cfg, flow).map_or(0, |sent| STREAM_SENT_KNOWN | u64::from(sent))
}

/// What this socket has sent, modulo 2^32: redirected bytes plus TCP bytes (`write_seq -
/// seq0`; the message being judged is not queued yet). `None` if `write_seq` cannot be read.
#[inline(always)]
fn sent32(cfg: &Config, flow: &Flow) -> Option<u32> {
    if cfg.off_tcp_write_seq == 0 || flow.sk == 0 {
        return None;
    }
    let written = read_kernel::<u32>(flow.sk, cfg.off_tcp_write_seq)?;
    Some(
        written
            .wrapping_sub(flow.seq0)
            .wrapping_add(flow.redirected_bytes as u32),
    )
}

/// For a proxy socket the proxy marked `FLOW_TCP_DETACHING` (its connection is leaving the
/// SOCKHASH), run on each of the proxy's writes on it, and by the sweep when the proxy asks
/// (`sweep.rs`: for a socket facing a workload that only sends, which no write of the proxy's
/// reaches): tells the proxy, through this socket's own `Flow::detach` (only this socket's
/// messages, under its lock, the sweep, and the proxy between its writes, write that entry),
/// when the next socket may leave. True once nothing is left
/// to tell (this program then stops running for the socket).
///
/// - `DETACH_PEER_EMPTY`: the workload `peer` behind this socket has an empty queue. Nothing
///   else can fill it (only this socket redirects into it, and this socket no longer does),
///   so the proxy may remove it, whether or not it ever writes again. Written here, in this
///   socket's entry, not in the workload's: the workload's sk_msg may be running at this
///   moment (it holds its own lock, not ours), and a pointer into its entry could meet an
///   entry freed and reused by another socket (`MESH_FLOWS` is preallocated).
/// - `DETACH_READY`: in addition the workload is out of the SOCKHASH with no send of its own
///   still under way, and this socket's own queue is empty. A workload's send holds a
///   reference on its psock from before its verdict until after its redirect is queued
///   (`tcp_bpf_sendmsg`), and the psock is dropped, clearing `sk_user_data`, only when the
///   last reference goes: so no psock behind `sk_user_data` means no redirect into this
///   socket is decided or on its way, and none can come. Removing this socket earlier
///   could drop such a redirect (`sk_psock_queue_msg` frees a message for a psock being
///   dropped) or the bytes still in its queue.
#[inline(always)]
pub(crate) fn release(cfg: &Config, flow: &mut Flow, peer: Option<&SockKey>) -> bool {
    if flow.detach == DETACH_READY {
        return true;
    }
    if cfg.off_psock_msg_len == 0 {
        return true; // without the queue's length nothing can be shown safe
    }
    let Some(peer) = peer else { return true };
    // SAFETY: copied out at once.
    let workload = (unsafe { MESH_FLOWS.get(peer) }).copied();
    let (workload_sk, found_ready) = match workload {
        // A workload that left by itself (`GUARD_LEAVING`) was counted when it did.
        Some(w) if w.proxy == 0 => (
            w.sk,
            w.detach == DETACH_READY || w.guard & GUARD_LEAVING != 0,
        ),
        Some(_) => return true,
        // Closed: its close callback removed the entry after its last send.
        None => (0, false),
    };
    if flow.detach == 0 && workload_sk != 0 {
        if queue_len(cfg, workload_sk) != 0 {
            return false;
        }
        flow.detach = DETACH_PEER_EMPTY;
        if !found_ready {
            count(counter::DETACH_READY, 1); // once per workload, whoever finds it
        }
    }
    if workload_sk != 0 && has_psock(cfg, workload_sk) {
        return false;
    }
    if queue_len(cfg, flow.sk) != 0 {
        return false;
    }
    flow.detach = DETACH_READY;
    count(counter::DETACH_PROXY_READY, 1);
    true
}

/// For a workload socket that asked to leave the SOCKHASH: true once leaving is safe, and
/// from then on its messages take the TCP path without this program judging them, until the
/// proxy removes the socket (the program then no longer runs for it at all).
///
/// Removing a socket from the SOCKHASH drops its psock, and with it every message still
/// queued in the psock's ingress list, unread (the "silently discarded"), and a
/// redirect already on its way into it fails. So it is safe only once nothing can be
/// redirected into this socket any more and its queue is empty:
/// - the only socket that redirects into it is its peer, the proxy's socket, and the proxy
///   marks that one `FLOW_TCP_DETACHING` (a proxy direction on TCP never comes back), from
///   the same task that writes on it and never while one of its writes is under way, so once
///   we see the mark no redirect into us is pending or will come (the kernel-only path,
///   whose far workload could also write here, is never asked for: `note_pressure`);
/// - then the queue can only shrink, and we read it empty (`msg_tot_len`).
///
/// From the first message that sees the mark, this direction stays on TCP too
/// (`FLOW_TCP_STREAM`), and what it sent before is recorded (`Flow::stream_sent`): the
/// proxy's socket facing it then leaves once the proxy relayed that much.
///
/// A reader in `tcp_bpf_recvmsg` when the socket leaves keeps its psock reference until it
/// returns and then reads the TCP queue, where every later byte is: nothing is reordered
/// (psock bytes are older than TCP bytes from the mark on).
#[inline(always)]
fn detach(cfg: &Config, flow: &mut Flow, peer: Option<&SockKey>) -> bool {
    if flow.detach == DETACH_READY {
        return true;
    }
    if (flow.detach != DETACH_WANTED && flow.detach != DETACH_STREAM) || flow.proxy != 0 {
        return false;
    }
    let Some(peer) = peer else { return false };
    // SAFETY: the value is copied out at once.
    let Some(receiver) = (unsafe { MESH_FLOWS.get(peer) }).copied() else {
        return false;
    };
    if receiver.proxy == 0 || receiver.state != FLOW_TCP_DETACHING {
        return false;
    }
    // The proxy is taking the connection off: from this message on the direction stays on
    // TCP (it never comes back: `may_resume` says no to a stream), so what it sent before is
    // all the proxy's socket facing it can ever get by redirect, and once the proxy relayed
    // that much, that socket may leave without waiting for the kernel's verdict
    // (`Flow::stream_sent`). A stream recorded it when it was judged (and has stayed on TCP
    // since); a workload that asked as `DETACH_WANTED` may have come back to the
    // short-circuit since it asked, and records it here.
    if flow.stream_sent & STREAM_SENT_KNOWN == 0 {
        flow.stream_sent = sent_so_far(cfg, flow);
    }
    flow.state = FLOW_TCP_STREAM;
    if cfg.off_psock_msg_len == 0 || queue_len(cfg, flow.sk) != 0 {
        return false;
    }
    flow.detach = DETACH_READY;
    count(counter::DETACH_READY, 1);
    true
}

/// True if `may_resume` can ever say yes for this direction (for a proxy direction, held
/// for a workload client not judged yet: `judged_receiver`).
#[inline(always)]
fn resumable(flow: &Flow) -> bool {
    if flow.proxy != 0 {
        return flow.state == FLOW_TCP_UNJUDGED;
    }
    flow.detach != DETACH_READY && flow.state != FLOW_TCP_BLOCKING
}

/// For a direction on TCP for good: the verdict (pass) applies to the next 4 GiB without
/// running this program again (`bpf_msg_apply_bytes`). Counters then stop seeing those
/// messages. The socket still pays the psock's send path (`tcp_bpf_sendmsg` copies each
/// send into an sk_msg and pushes it as page fragments) while it stays in the SOCKHASH:
/// measured 41-54 µs per small send against 12-16 µs on plain TCP (under `perf trace`),
/// which is why the proxy takes its unpaired upstream sockets out (`Maps::release_unpaired`).
#[inline(always)]
fn stop_judging(ctx: &SkMsgContext) {
    // SAFETY: ctx.msg is the context pointer; the helper only sets the psock's apply_bytes.
    unsafe { bpf_msg_apply_bytes(ctx.msg, u32::MAX) };
}

/// Bytes waiting unread in the psock ingress list of the socket at kernel address `sk`:
/// `sk->sk_user_data->msg_tot_len`, at offsets the proxy took from the kernel's BTF (no CO-RE
/// in Rust BPF). 0 if unknown (no offsets, no psock, a failed read).
#[inline(always)]
pub(crate) fn queue_len(cfg: &Config, sk: u64) -> u32 {
    if cfg.off_psock_msg_len == 0 {
        return 0;
    }
    match read_kernel::<u64>(sk, cfg.off_sk_user_data) {
        Some(user_data) if user_data & SK_USER_DATA_PSOCK != 0 => {
            read_kernel::<u32>(user_data & SK_USER_DATA_PTRMASK, cfg.off_psock_msg_len).unwrap_or(0)
        }
        _ => 0,
    }
}

/// True if the socket at kernel address `sk` still has a psock (`sk_user_data` flagged
/// `SK_USER_DATA_PSOCK`): it is in the SOCKHASH, or was removed while a send of its own
/// still holds a reference. True if the read fails (never unsafe).
#[inline(always)]
pub(crate) fn has_psock(cfg: &Config, sk: u64) -> bool {
    match read_kernel::<u64>(sk, cfg.off_sk_user_data) {
        Some(user_data) => user_data & SK_USER_DATA_PSOCK != 0,
        None => true,
    }
}

/// Moves this direction to the TCP path and passes the message.
#[inline(always)]
fn leave(ctx: &SkMsgContext, flow: &mut Flow, reason: u32, size: u32) {
    flow.state = reason;
    // On TCP the receiver's window paces the proxy; a fill level left from the last
    // redirected write would make it pause after every write from now on.
    flow.held = 0;
    count(reason, 1);
    passed(size);
    if !resumable(flow) {
        stop_judging(ctx);
    }
}

#[inline(always)]
fn passed(size: u32) {
    count(counter::MSG_PASSED, 1);
    count(counter::MSG_PASSED_BYTES, u64::from(size));
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
