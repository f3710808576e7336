//! Building a socket's `SockKey` from a program context.
//!
//! `bpf_sock_ops` and `sk_msg_md` name their address fields the same way, so one macro
//! serves both. The verifier allows these context fields only as 4-byte loads, one word at a
//! time: volatile reads keep LLVM from merging them into wider loads it would reject.
//! `remote_port` holds the network-order port in its upper 16 bits; `local_port` is host order.

/// Reads `SockKey` fields from a context pointer `$ctx` (`*mut bpf_sock_ops` or
/// `*mut sk_msg_md`), with namespace cookie `$netns`. Evaluates to `Option<SockKey>`:
/// `None` for a family other than IPv4/IPv6. Must be used inside an `unsafe` block whose
/// SAFETY comment states that `$ctx` is the program's context pointer.
macro_rules! sock_key {
    ($ctx:expr, $netns:expr) => {{
        use core::ptr::read_volatile as rv;
        use proxy_common::{AF_INET, AF_INET6, SockKey, normalise_ip6};
        let c = $ctx;
        let family = rv(&(*c).family);
        let local_port = rv(&(*c).local_port);
        let remote_port = u32::from_be(rv(&(*c).remote_port)) & 0xffff;
        let ends = if family == AF_INET {
            Some((
                AF_INET,
                [rv(&(*c).local_ip4), 0, 0, 0],
                [rv(&(*c).remote_ip4), 0, 0, 0],
            ))
        } else if family == AF_INET6 {
            let l = [
                rv(&(*c).local_ip6[0]),
                rv(&(*c).local_ip6[1]),
                rv(&(*c).local_ip6[2]),
                rv(&(*c).local_ip6[3]),
            ];
            let r = [
                rv(&(*c).remote_ip6[0]),
                rv(&(*c).remote_ip6[1]),
                rv(&(*c).remote_ip6[2]),
                rv(&(*c).remote_ip6[3]),
            ];
            // v4-mapped addresses (an AF_INET6 socket talking IPv4) are keyed as IPv4 so
            // both ends of one connection agree.
            let (fl, l) = normalise_ip6(l);
            let (_, r) = normalise_ip6(r);
            Some((fl, l, r))
        } else {
            None
        };
        ends.map(|(family, local_ip, remote_ip)| {
            SockKey::new(
                $netns,
                family,
                (local_port, remote_port),
                local_ip,
                remote_ip,
            )
        })
    }};
}

pub(crate) use sock_key;
