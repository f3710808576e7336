//! cgroup/connect4 and cgroup/connect6: send workloads' outbound TCP connects to the proxy.
//!
//! The program runs in the connecting task's context before the kernel picks a route, so
//! rewriting the user address is enough to reach the proxy; no iptables, no conntrack. The
//! original destination is recorded under the socket's cookie and moved to a key the proxy
//! can compute (`OrigKey`) once the socket is established (see sockops.rs).

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use proxy_common::{AF_INET, OrigDst, counter, normalise_ip6};

use crate::maps::{
    MESH_EXCL_PORT, MESH_EXCL_V4, MESH_EXCL_V6, MESH_ORIG_CK, MESH_WORKLOADS, config, count,
};

/// Verdicts of cgroup/connect programs.
pub const ALLOW: i32 = 1;

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const LOOPBACK_V4_FIRST_OCTET: u8 = 127;

/// Why a connect was not redirected.
pub struct Bypass(u32);

pub fn try_connect4(ctx: &SockAddrContext) -> Result<(), Bypass> {
    let sa = ctx.sock_addr;
    check_tcp(sa)?;
    let cfg = config().ok_or(Bypass(counter::BYPASS_UNCONFIGURED))?;
    if cfg.redirect_port == 0 || cfg.redirect_ip4 == 0 {
        return Err(Bypass(counter::BYPASS_UNCONFIGURED));
    }
    check_workload(cfg.flags)?;
    // SAFETY: `sa` is the context pointer the kernel passed in; user_ip4/user_port are
    // readable and writable with 4-byte accesses in connect4.
    let (dst, port) = unsafe {
        (
            read_volatile(&(*sa).user_ip4),
            u16::from_be(read_volatile(&(*sa).user_port) as u16),
        )
    };
    check_v4(dst, port, cfg.redirect_ip4, cfg.redirect_port)?;
    record(
        ctx,
        OrigDst {
            family: AF_INET,
            port: u32::from(port),
            ip: [dst, 0, 0, 0],
            cgroup_id: 0, // filled in by record()
        },
    )?;
    // SAFETY: as above.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, cfg.redirect_ip4);
        write_volatile(
            &mut (*sa).user_port,
            u32::from((cfg.redirect_port as u16).to_be()),
        );
    }
    count(counter::CONNECT4_REDIRECTED, 1);
    Ok(())
}

pub fn try_connect6(ctx: &SockAddrContext) -> Result<(), Bypass> {
    let sa = ctx.sock_addr;
    check_tcp(sa)?;
    let cfg = config().ok_or(Bypass(counter::BYPASS_UNCONFIGURED))?;
    if cfg.redirect_port == 0 {
        return Err(Bypass(counter::BYPASS_UNCONFIGURED));
    }
    check_workload(cfg.flags)?;
    // The verifier allows user_ip6 only as 4-byte loads and stores, one word at a time;
    // volatile accesses keep LLVM from merging them into 8-byte ones.
    // SAFETY: `sa` is the context pointer; user_ip6[0..4] and user_port are 4-byte accessible.
    let (raw, port) = unsafe {
        (
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ],
            u16::from_be(read_volatile(&(*sa).user_port) as u16),
        )
    };
    let (family, ip) = normalise_ip6(raw);
    let target = if family == AF_INET {
        // An AF_INET6 socket connecting to ::ffff:a.b.c.d talks IPv4 on the wire: send it to
        // the proxy's IPv4 address, in its mapped form.
        if cfg.redirect_ip4 == 0 {
            return Err(Bypass(counter::BYPASS_UNCONFIGURED));
        }
        check_v4(ip[0], port, cfg.redirect_ip4, cfg.redirect_port)?;
        [0, 0, 0x0000_ffff_u32.to_be(), cfg.redirect_ip4]
    } else {
        let r = cfg.redirect_ip6;
        if r == [0; 4] {
            return Err(Bypass(counter::BYPASS_UNCONFIGURED));
        }
        if is_loopback_or_unspecified_v6(ip) {
            return Err(Bypass(counter::BYPASS_LOOPBACK));
        }
        if ip == r && u32::from(port) == cfg.redirect_port {
            return Err(Bypass(counter::BYPASS_PROXY_ADDRESS));
        }
        check_port(port)?;
        if MESH_EXCL_V6.get(Key::new(128, ip)).is_some() {
            return Err(Bypass(counter::BYPASS_EXCLUDED_CIDR));
        }
        r
    };
    record(
        ctx,
        OrigDst {
            family,
            port: u32::from(port),
            ip,
            cgroup_id: 0, // filled in by record()
        },
    )?;
    // SAFETY: as above.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], target[0]);
        write_volatile(&mut (*sa).user_ip6[1], target[1]);
        write_volatile(&mut (*sa).user_ip6[2], target[2]);
        write_volatile(&mut (*sa).user_ip6[3], target[3]);
        write_volatile(
            &mut (*sa).user_port,
            u32::from((cfg.redirect_port as u16).to_be()),
        );
    }
    count(counter::CONNECT6_REDIRECTED, 1);
    Ok(())
}

/// UDP and raw sockets are never intercepted.
#[inline(always)]
fn check_tcp(sa: *mut bpf_sock_addr) -> Result<(), Bypass> {
    // SAFETY: `sa` is the context pointer; type and protocol are readable in connect4/6.
    let (ty, proto) = unsafe { (read_volatile(&(*sa).type_), read_volatile(&(*sa).protocol)) };
    if ty == SOCK_STREAM && proto == IPPROTO_TCP {
        Ok(())
    } else {
        Err(Bypass(counter::BYPASS_NOT_TCP))
    }
}

#[inline(always)]
fn check_v4(dst: u32, port: u16, redirect_ip4: u32, redirect_port: u32) -> Result<(), Bypass> {
    // Network order: the first octet is the lowest-addressed byte.
    let first = dst.to_ne_bytes()[0];
    if first == LOOPBACK_V4_FIRST_OCTET || dst == 0 {
        return Err(Bypass(counter::BYPASS_LOOPBACK));
    }
    if dst == redirect_ip4 && u32::from(port) == redirect_port {
        return Err(Bypass(counter::BYPASS_PROXY_ADDRESS));
    }
    check_port(port)?;
    if MESH_EXCL_V4.get(Key::new(32, dst)).is_some() {
        return Err(Bypass(counter::BYPASS_EXCLUDED_CIDR));
    }
    Ok(())
}

#[inline(always)]
fn check_port(port: u16) -> Result<(), Bypass> {
    if MESH_EXCL_PORT.get_ptr(u32::from(port)).is_some() {
        Err(Bypass(counter::BYPASS_EXCLUDED_PORT))
    } else {
        Ok(())
    }
}

#[inline(always)]
fn is_loopback_or_unspecified_v6(ip: [u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == 1u32.to_be())
}

/// Remembers the original destination under the socket's cookie. If that fails the connect
/// goes direct: redirecting a connection the proxy cannot route would break it.
#[inline(always)]
fn record(ctx: &SockAddrContext, mut orig: OrigDst) -> Result<(), Bypass> {
    // SAFETY: bpf_get_socket_cookie is allowed in cgroup_sock_addr programs and takes the ctx.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The connecting task's cgroup, read here because this is the only hook that runs in
    // the workload's own context (sock_ops runs in softirq for the SYN-ACK). With it the
    // proxy knows which workload connected from the kernel, not from a spoofable address.
    // SAFETY: bpf_get_current_cgroup_id takes no arguments and is allowed in cgroup
    // programs (Linux 4.18+).
    orig.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    MESH_ORIG_CK
        .insert(cookie, orig, 0)
        .map_err(|_| Bypass(counter::BYPASS_RECORD_FAILED))
}

/// cgroup levels searched for a declared workload: pod cgroups sit two or three levels below
/// the root (`kubepods.slice/kubepods-<qos>.slice/…pod<uid>.slice`), container scopes one
/// more; 8 leaves room for nested hierarchies. A fixed bound keeps the verifier's walk short.
const MAX_CGROUP_LEVEL: i32 = 8;

/// With `FLAG_WORKLOADS_ONLY`, a connect is intercepted only when the task's cgroup or one of
/// its ancestors is a declared workload's. `bpf_get_current_ancestor_cgroup_id` returns 0
/// past the task's own depth, which ends the walk.
#[inline(always)]
fn check_workload(flags: u32) -> Result<(), Bypass> {
    if flags & proxy_common::FLAG_WORKLOADS_ONLY == 0 {
        return Ok(());
    }
    for level in 1..=MAX_CGROUP_LEVEL {
        // SAFETY: the helper takes a plain integer; allowed in cgroup programs (Linux 5.7+).
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        // SAFETY: a read of a value copied out by the helper; the entry is never aliased.
        if unsafe { MESH_WORKLOADS.get(id) }.is_some() {
            return Ok(());
        }
    }
    Err(Bypass(counter::BYPASS_NOT_WORKLOAD))
}

/// Whether the proxy asked for kernel debug records (`FLAG_KERNEL_LOG`).
#[inline(always)]
pub fn kernel_log() -> bool {
    config().is_some_and(|c| c.flags & proxy_common::FLAG_KERNEL_LOG != 0)
}

impl Bypass {
    /// The counter index naming the reason.
    pub fn reason(&self) -> u32 {
        self.0
    }

    /// Counts the reason. The connect itself is always allowed: bypass means "go direct".
    pub fn count(self) {
        count(self.0, 1);
    }
}
