//! Types shared by the kernel programs (`proxy-ebpf`) and the node proxy (`proxy`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding: the same bytes are
//! written by one side and read by the other, so a layout change must happen on both sides
//! at once. Addresses are stored as the kernel hands them to BPF programs: each `u32` of an
//! address holds four bytes in network order (the in-memory byte order of the address).
//! Ports are stored in host order.
#![no_std]
#![deny(unsafe_code)]

// === names ===

/// Names of the programs in the object file, as `bpftool prog show` lists them.
/// The kernel keeps 15 characters of a program name, so each is at most that long.
pub mod program {
    /// cgroup/connect4 on the workload cgroup parent.
    pub const CONNECT4: &str = "mesh_connect4";
    /// cgroup/connect6 on the workload cgroup parent.
    pub const CONNECT6: &str = "mesh_connect6";
    /// sock_ops on the workload cgroup parent.
    pub const SOCKOPS_WORKLOAD: &str = "mesh_sockops_wl";
    /// sock_ops on the proxy's own cgroup.
    pub const SOCKOPS_PROXY: &str = "mesh_sockops_px";
    /// sk_msg attached to the SOCKHASH.
    pub const MSG_REDIRECT: &str = "mesh_msg_redir";
    /// iter/task_file, run once at start-up with the short-circuit on: records in
    /// `MESH_LISTEN` the TCP listeners that called `listen()` before sock_ops was attached.
    pub const LISTENERS: &str = "mesh_listeners";
    /// iter/tcp over the proxy's own sockets, run when the proxy asks (with the short-circuit
    /// on): lets leaving proxy sockets go that no write of the proxy's reaches.
    pub const RELEASE: &str = "mesh_release";
    /// Every program, in load order.
    pub const ALL: [&str; 7] = [
        CONNECT4,
        CONNECT6,
        SOCKOPS_WORKLOAD,
        SOCKOPS_PROXY,
        MSG_REDIRECT,
        LISTENERS,
        RELEASE,
    ];
}

/// Names of the maps in the object file (the names of the statics in `proxy-ebpf/src/maps.rs`).
pub mod map {
    pub const CONFIG: &str = "MESH_CONFIG";
    pub const COUNTERS: &str = "MESH_COUNTERS";
    pub const ORIG_BY_COOKIE: &str = "MESH_ORIG_CK";
    pub const ORIG_DST: &str = "MESH_ORIG_DST";
    pub const SOCKS: &str = "MESH_SOCKS";
    pub const PEERS: &str = "MESH_PEERS";
    pub const EXPECT: &str = "MESH_EXPECT";
    pub const FLOWS: &str = "MESH_FLOWS";
    pub const EXCLUDED_PORTS: &str = "MESH_EXCL_PORT";
    pub const EXCLUDED_V4: &str = "MESH_EXCL_V4";
    pub const EXCLUDED_V6: &str = "MESH_EXCL_V6";
    pub const WORKLOADS: &str = "MESH_WORKLOADS";
    pub const SPLICE: &str = "MESH_SPLICE";
    pub const DIRECT: &str = "MESH_DIRECT";
    pub const LISTEN: &str = "MESH_LISTEN";
    /// Every map.
    pub const ALL: [&str; 15] = [
        LISTEN,
        WORKLOADS,
        SPLICE,
        DIRECT,
        CONFIG,
        COUNTERS,
        ORIG_BY_COOKIE,
        ORIG_DST,
        SOCKS,
        PEERS,
        EXPECT,
        FLOWS,
        EXCLUDED_PORTS,
        EXCLUDED_V4,
        EXCLUDED_V6,
    ];
}

/// Address families as the kernel numbers them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

// === config ===

/// `Config::flags`: the sock_ops programs register sockets in the SOCKHASH.
pub const FLAG_SOCKMAP: u32 = 1;
/// `Config::flags`: the connect programs write debug records through aya-log (`log.kernel`).
/// Off by default: a record costs a ring-buffer write per connect.
pub const FLAG_KERNEL_LOG: u32 = 2;
/// `Config::flags`: only tasks in a declared workload's cgroup (or below it) are intercepted
/// (`MESH_WORKLOADS`); the rest of the workload cgroup parent connects directly.
pub const FLAG_WORKLOADS_ONLY: u32 = 4;
/// `Config::flags`: the sock_ops programs register blocking workload sockets too. Off by
/// default: a blocking reader on a SOCKHASH socket can get a spurious EAGAIN from the kernel
/// (`tcp_bpf_recvmsg`; ARCHITECTURE.md, "Kernel facts"), so blocking clients (by their file's
/// mode at connect) and servers behind a blocking listener (by its mode when the connection
/// arrives, `MESH_LISTEN`) stay on plain TCP.
pub const FLAG_SOCKMAP_BLOCKING: u32 = 8;

/// `O_NONBLOCK` in `struct file::f_flags` (include/uapi/asm-generic/fcntl.h; the value on
/// x86 and arm64, the architectures the proxy is built for).
pub const O_NONBLOCK: u32 = 0o4000;

/// The single entry of `MESH_CONFIG`, written by the proxy before it attaches anything.
/// A zeroed entry (the state right after load) means "not configured": nothing is redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Network namespace cookie of the proxy's listening sockets (`SO_NETNS_COOKIE`).
    pub proxy_netns: u64,
    /// IPv4 address workloads are sent to (network order). 0: IPv4 connects are not redirected.
    pub redirect_ip4: u32,
    /// Port the proxy accepts redirected connections on (host order). 0: nothing is redirected.
    pub redirect_port: u32,
    /// IPv6 address workloads are sent to (network order). All zero: IPv6 connects are not redirected.
    pub redirect_ip6: [u32; 4],
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Bytes that may wait unread in one socket's short-circuit queue (its psock ingress
    /// list). A message that would go past it takes the TCP path instead, where the
    /// receiver's window holds the sender back. 0: no bound (the naive policy).
    pub queue_limit: u32,
    /// Messages smaller than this many bytes count towards `small_streak`.
    pub small_msg: u32,
    /// A direction that sends this many small messages in a row, each while its receiver
    /// still has unread short-circuit bytes or with no reply since the one before, is a
    /// stream of small writes, which TCP carries faster: it moves to the TCP path. 0: never.
    pub small_streak: u32,
    /// Byte offset of `sk_user_data` in `struct sock` on the running kernel (from its BTF).
    pub off_sk_user_data: u32,
    /// Byte offset of `msg_tot_len` in `struct sk_psock` on the running kernel (from its BTF).
    /// With `off_sk_user_data`, lets sk_msg read how many bytes wait in the peer's queue.
    /// 0: unknown; the queue reads as empty (only allowed with `queue_limit` and
    /// `small_streak` 0, which the proxy checks).
    pub off_psock_msg_len: u32,
    /// Byte offsets of `write_seq` and `copied_seq` in `struct tcp_sock`: a direction whose
    /// receiver is the proxy may come back to the short-circuit once the proxy has read every
    /// byte that took the TCP path (the receiver's `copied_seq` equals the sender's
    /// `write_seq`). 0: never comes back.
    pub off_tcp_write_seq: u32,
    pub off_tcp_copied_seq: u32,
    /// Byte offsets of `sk_prot` in `struct sock` and of `memory_allocated` and `sysctl_mem`
    /// in `struct proto`: through them sk_msg reads TCP's machine-wide memory in use and its
    /// `tcp_mem` "low" threshold (pages), and leaves redirected bytes out once the machine is
    /// past half of it, so the short-circuit never drives TCP into memory pressure.
    /// 0: not checked.
    pub off_sock_prot: u32,
    pub off_proto_memory_allocated: u32,
    pub off_proto_sysctl_mem: u32,
    /// Kernel memory one redirected message holds besides its bytes: `bpf_tcp_ingress`
    /// allocates a `struct sk_msg` (712 bytes on 6.18, a kmalloc-1k object) for every message
    /// it queues, and charges only the bytes to TCP's accounting. The queue limit counts it
    /// per message, so a stream of tiny writes cannot pin sixteen times its bytes in slab.
    /// 0: not counted (the naive policy).
    pub msg_cost: u32,
    /// Ports whose connections stay off the short-circuit (host order; 0: unused slot): a
    /// workload connecting to one of them (its original destination port) and a workload
    /// server listening on one are never registered, so their sockets keep the kernel's own
    /// TCP receive path (see `intercept.sockmap_exclude_ports`).
    pub sockmap_exclude_ports: [u16; SOCKMAP_EXCLUDE_PORTS_MAX],
    /// A workload direction that has met the queue limit this many times asks for its
    /// connection to leave the SOCKHASH (`Flow::detach`): its reader (the proxy) cannot keep
    /// up with it on the short-circuit, where a sender is never made to wait, and every stay
    /// on the TCP path still pays for sk_msg. 0: never, for streams too (the naive policy).
    pub detach_after: u32,
    /// Byte offsets of `sk_socket` in `struct sock`, `file` in `struct socket` and `f_flags`
    /// in `struct file`: through them sock_ops reads whether a workload's socket is blocking
    /// (no `O_NONBLOCK`), and leaves blocking ones off the short-circuit unless
    /// `FLAG_SOCKMAP_BLOCKING`. 0: unknown; every socket counts as non-blocking.
    pub off_sock_socket: u32,
    pub off_socket_file: u32,
    pub off_file_flags: u32,
    /// Byte offsets the start-up listener scan (`program::LISTENERS`) reads a socket's
    /// listener key through: `sk` in `struct socket`, `sk_protocol` in `struct sock`, and in
    /// `struct sock_common` (at the start of `struct sock`) `skc_state`, `skc_num` (the local
    /// port, host order) and `skc_net` (a `struct net *`), whose `net_cookie` is the
    /// namespace cookie. 0: unknown; the scan records nothing.
    pub off_socket_sk: u32,
    pub off_sock_protocol: u32,
    pub off_skc_state: u32,
    pub off_skc_num: u32,
    pub off_skc_net: u32,
    pub off_net_cookie: u32,
    /// Byte offsets in `struct sock` (its `__sk_common`) of `skc_family`, `skc_dport` (the
    /// remote port, network order), `skc_rcv_saddr` and `skc_daddr` (IPv4 local and remote
    /// addresses), `skc_v6_rcv_saddr` and `skc_v6_daddr` (IPv6): the release sweep
    /// (`program::RELEASE`) builds a proxy socket's `SockKey` from them. `off_skc_family` 0:
    /// unknown, and the sweep does nothing (`skc_daddr` is at 0 on x86-64).
    pub off_skc_family: u32,
    pub off_skc_dport: u32,
    pub off_skc_rcv_saddr: u32,
    pub off_skc_daddr: u32,
    pub off_skc_v6_rcv_saddr: u32,
    pub off_skc_v6_daddr: u32,
}

/// How many ports `Config::sockmap_exclude_ports` holds.
pub const SOCKMAP_EXCLUDE_PORTS_MAX: usize = 8;

impl Config {
    /// True if connections on `port` stay off the short-circuit.
    #[inline(always)]
    pub fn sockmap_excluded(&self, port: u32) -> bool {
        let mut i = 0;
        while i < SOCKMAP_EXCLUDE_PORTS_MAX {
            let p = u32::from(self.sockmap_exclude_ports[i]);
            if p != 0 && p == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

// === original destination ===

/// The original destination of an intercepted connect, as the workload asked for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// `AF_INET` or `AF_INET6`. A v4-mapped IPv6 destination is stored as `AF_INET`.
    pub family: u32,
    /// Destination port, host order.
    pub port: u32,
    /// Destination address, network order; IPv4 uses `ip[0]` only.
    pub ip: [u32; 4],
    /// cgroup v2 id of the connecting task (`bpf_get_current_cgroup_id`, the inode number of
    /// its cgroup directory): the kernel's word on which workload connected, for identity.
    pub cgroup_id: u64,
}

/// Key of `MESH_ORIG_DST`: the redirected connection as the proxy's accepted socket sees it.
/// Pods on one node have distinct addresses, so the client address and port identify the
/// connection; the proxy address and port make the key exact for several listeners.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigKey {
    /// `AF_INET` or `AF_INET6` (v4-mapped addresses are normalised to `AF_INET`).
    pub family: u32,
    /// Client (workload) port, host order.
    pub client_port: u32,
    /// Proxy (redirect target) port, host order.
    pub proxy_port: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
    /// Client address, network order.
    pub client_ip: [u32; 4],
    /// Proxy address, network order.
    pub proxy_ip: [u32; 4],
}

// === short-circuit ===

/// Key of `MESH_SOCKS`, `MESH_PEERS`, `MESH_FLOWS` and `MESH_SPLICE`: one TCP socket.
///
/// The network namespace cookie is part of the key because the same 4-tuple can exist in two
/// namespaces at once (two pods each talking to themselves over 127.0.0.1); without it
/// sk_msg could hand one pod's bytes to another pod's socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network namespace cookie of the socket.
    pub netns: u64,
    /// `AF_INET` or `AF_INET6` (v4-mapped addresses are normalised to `AF_INET`).
    pub family: u32,
    /// Local port, host order.
    pub local_port: u32,
    /// Remote port, host order.
    pub remote_port: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
    /// Local address, network order.
    pub local_ip: [u32; 4],
    /// Remote address, network order.
    pub remote_ip: [u32; 4],
}

impl SockKey {
    /// A key with its padding zeroed: `(family, local, remote)` as the kernel hands them to
    /// programs (addresses network order, ports host order; see the fields).
    #[inline(always)]
    pub const fn new(
        netns: u64,
        family: u32,
        (local_port, remote_port): (u32, u32),
        local_ip: [u32; 4],
        remote_ip: [u32; 4],
    ) -> SockKey {
        SockKey {
            netns,
            family,
            local_port,
            remote_port,
            _pad: 0,
            local_ip,
            remote_ip,
        }
    }

    /// The key the other end of this connection has, if it lives in namespace `netns`.
    pub const fn reversed_in(&self, netns: u64) -> SockKey {
        SockKey::new(
            netns,
            self.family,
            (self.remote_port, self.local_port),
            self.remote_ip,
            self.local_ip,
        )
    }

    /// The same 4-tuple with the namespace left out, as `MESH_EXPECT` keys it.
    pub const fn without_netns(&self) -> SockKey {
        SockKey { netns: 0, ..*self }
    }
}

/// `Flow::state`: this sending direction is redirected while the policy allows.
pub const FLOW_REDIRECT: u32 = 0;
/// `Flow::state`: this direction took the TCP path for good; the value says why
/// (a `counter::MSG_PASSED_*` index). Redirecting later bytes would let them overtake the
/// ones on the TCP path, so there is no way back.
pub const FLOW_TCP_NO_PEER: u32 = counter::MSG_PASSED_NO_PEER;
pub const FLOW_TCP_BACKPRESSURE: u32 = counter::MSG_PASSED_BACKPRESSURE;
pub const FLOW_TCP_MEMORY: u32 = counter::MSG_PASSED_MEMORY_PRESSURE;
/// A workload's direction that is a stream and asked its connection to leave (`DETACH_STREAM`).
pub const FLOW_TCP_STREAM: u32 = counter::DETACH_STREAM;
/// A workload socket registered while non-blocking that was blocking at its first send: it
/// leaves the SOCKHASH by itself (`GUARD_LEAVING`), its bytes on TCP from that send on.
pub const FLOW_TCP_BLOCKING: u32 = counter::TURNED_BLOCKING_LEAVING;
/// A proxy socket's direction into a workload client whose first send was not judged yet
/// (`GUARD_CLIENT`): on TCP until then, and back on the short-circuit once the client is
/// judged non-blocking and has read every TCP byte (the only proxy direction that comes back).
pub const FLOW_TCP_UNJUDGED: u32 = counter::MSG_PASSED_UNJUDGED;

/// Bit of `Flow::proxy`, set by the proxy on both of its sockets of a connection it will take
/// off the short-circuit when a workload asks (per hop, opaque TCP: `Pacer` in
/// proxy/src/transport/splice.rs). A stream asks only then; elsewhere (the proxy's HTTP
/// path, the kernel-only path) asking would change nothing.
pub const PROXY_LEAVES: u32 = 2;
/// `Flow::state`: this workload's bytes go straight to the workload at the far end of the
/// proxy (the kernel-only path, `MESH_SPLICE`), skipping the proxy. Not a counter index.
pub const FLOW_DIRECT: u32 = 0x100;
/// `Flow::state` of a proxy socket, written by the proxy (never by sk_msg): the proxy will
/// never again redirect into the workload behind this socket, whose connection is leaving
/// the SOCKHASH (`Flow::detach`). Like every proxy direction on TCP, it does not come back.
pub const FLOW_TCP_DETACHING: u32 = 0x200;

/// `Flow::detach` of a workload socket: its direction has met the queue limit
/// `Config::detach_after` times; it asks for its connection to leave the SOCKHASH so all
/// four sockets are plain TCP again.
pub const DETACH_WANTED: u16 = 1;
/// `Flow::detach`: nothing can reach this socket's short-circuit queue any more and that
/// queue is empty: the proxy may remove the socket from the SOCKHASH without losing a byte.
/// A workload socket's own sk_msg says so; a proxy socket's says so once, in addition, the
/// workload behind it is out of the SOCKHASH with no send of its own still under way.
pub const DETACH_READY: u16 = 2;
/// `Flow::detach` of a proxy socket marked `FLOW_TCP_DETACHING`: its sk_msg found the
/// workload behind it with an empty short-circuit queue, which nothing can refill (only this
/// socket redirects into it): the proxy may remove that workload's socket.
pub const DETACH_PEER_EMPTY: u16 = 3;
/// `Flow::detach` of a workload socket: like `DETACH_WANTED`, because its direction is a
/// stream (`Config::small_streak` writes in a row found its reader behind); the proxy takes
/// the connection off without waiting to see more.
pub const DETACH_STREAM: u16 = 4;

/// Value of `MESH_FLOWS`: the sending direction of one registered socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// `FLOW_REDIRECT` or a `FLOW_TCP_*` reason.
    pub state: u32,
    /// Small messages sent in a row while the receiver had unread short-circuit bytes.
    pub streak: u32,
    /// Bytes this socket sent through the short-circuit.
    pub redirected_bytes: u64,
    /// Kernel address of the socket (`struct sock *`), taken by sock_ops when it registered
    /// the socket. sk_msg of the peer reads this socket's queue length through it with probe
    /// reads (a BPF program may not look a socket up in a SOCKHASH from sk_msg: it could not
    /// release the reference). The entry is removed when the socket closes, before it is freed.
    pub sk: u64,
    /// 0 if the socket is a workload's; else the proxy's, 1 with `PROXY_LEAVES` or'd in
    /// once the proxy takes its connection off the short-circuit when a workload asks.
    pub proxy: u32,
    /// `tcp_sock.write_seq` when the socket registered (its `snd_nxt` at establishment: no
    /// payload had been queued). `write_seq - seq0` is what it has sent over TCP.
    pub seq0: u32,
    /// Proxy sockets only: 0, or how full this socket's last redirected message left its
    /// receiver's queue, in sixteenths of `Config::queue_limit`, when that was 12 (3/4) or
    /// more (at most 16). The proxy reads it after each write and pauses before the next one,
    /// longer the fuller the queue (the only way to slow a redirect down: the kernel gives a
    /// redirected write no flow control), so that a fast writer into a slower workload stays
    /// on the short-circuit instead of reaching the limit and leaving for TCP for good.
    pub held: u32,
    /// Workload sockets only: how many times this direction met the queue limit and left
    /// for TCP (saturating). At `Config::detach_after` it asks to leave the SOCKHASH
    /// (`detach`).
    pub pressure: u16,
    /// Written by this socket's own sk_msg. A workload's: `DETACH_WANTED` or `DETACH_STREAM`
    /// once it asks for its connection to leave the SOCKHASH for plain TCP, `DETACH_READY`
    /// once its own leaving is safe (the proxy stopped redirecting into it,
    /// `FLOW_TCP_DETACHING`, and its queue is empty). A leaving proxy socket's:
    /// `DETACH_PEER_EMPTY` once the workload it faces may be removed, `DETACH_READY` once it
    /// may be removed itself. The proxy reads them and removes the sockets (see
    /// proxy-ebpf/src/redirect.rs, `detach` and `release`).
    pub detach: u16,
    /// Workload sockets only: small messages (below `Config::small_msg`) sent in a row over
    /// TCP while the proxy had not read everything this socket sent (the direction cannot
    /// come back yet). `Config::small_streak` of them make the direction a stream, as
    /// `streak` does on the short-circuit.
    pub behind: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
    /// Workload sockets only: what the proxy's socket facing this one had sent it (redirected
    /// plus TCP bytes, wrapping) at this socket's last judged message. Unchanged at the next
    /// message means no reply came in between: the writes are one-way, a stream's mark even
    /// when the proxy keeps up (`Config::small_streak`).
    pub peer_sent: u64,
    /// This socket's messages that may still wait at its peer (the per-hop short-circuit:
    /// the proxy, or for a proxy socket the workload) and at the far workload (the
    /// kernel-only path). Kept per receiver and across changes of path: a direction that
    /// leaves the kernel-only path and comes back must still count what it left unread there.
    pub to_peer: Queued,
    pub to_far: Queued,
    /// Workload sockets only: 0, or [`STREAM_SENT_KNOWN`] with, in the low 32 bits, what this
    /// socket had sent (redirected plus TCP bytes, modulo 2^32) before the message from which
    /// its direction stays on TCP for good: the one that made it a stream (`DETACH_STREAM`),
    /// or for one that asked as `DETACH_WANTED`, its first after the proxy began taking the
    /// connection off. Every redirect into the proxy's socket facing it came before that
    /// message, under this socket's lock; none comes after. So once the proxy has read that
    /// many bytes from its socket, that socket's short-circuit queue is empty for good, and it
    /// may leave the SOCKHASH without waiting for the kernel's verdict
    /// (proxy/src/transport/splice.rs, `Pacer`).
    pub stream_sent: u64,
    /// Workload sockets only: `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when it asked to leave
    /// (`detach` set), 0 before. The proxy times how long it took to notice
    /// (`mesh_tcp_short_circuit_leave_notice_seconds`).
    pub asked_ns: u64,
    /// Workload sockets only: `GUARD_*` bits, changed only with atomic operations (the
    /// socket's own sk_msg, and the sk_msg of any socket about to redirect into it, write
    /// them concurrently; 64 bits because the BPF target has no 32-bit atomics). 0 when
    /// registered.
    pub guard: u64,
}

/// `Flow::guard` bit: a message is being or was redirected into this workload socket (set
/// by the sender's sk_msg before its redirect, never cleared). Its queue may hold bytes, so
/// it may not leave the SOCKHASH by itself (that would drop them).
pub const GUARD_INGRESS: u64 = 1;
/// `Flow::guard` bit: this workload socket leaves the SOCKHASH by itself (its sock_ops
/// removes it while the message that decided it goes out): it was found blocking at its
/// first send, or its writes became a stream. Nothing may be redirected into it any more.
/// Set only while `GUARD_INGRESS` is clear (one compare and swap), so of a sender and this
/// socket exactly one wins.
pub const GUARD_LEAVING: u64 = 2;
/// `Flow::guard` bit: this workload socket's mode was looked at (its first send).
pub const GUARD_MODE_CHECKED: u64 = 4;
/// `Flow::guard` bit, set at registration: a workload client, judged non-blocking inside
/// `connect()`, which a connect with a timeout switches back to blocking right after. Until
/// its first send has been judged (`GUARD_MODE_CHECKED`), nothing is redirected into it (a
/// server's greeting goes by TCP, `FLOW_TCP_UNJUDGED`), so that if it turned blocking it
/// can leave by itself.
pub const GUARD_CLIENT: u64 = 8;

/// `Flow::stream_sent` holds a count.
pub const STREAM_SENT_KNOWN: u64 = 1 << 32;

/// What one sender knows of its messages in one receiver's short-circuit queue (`Flow`).
/// The queue counts bytes (`msg_tot_len`) but not messages, and the kernel holds a
/// `struct sk_msg` per message (`Config::msg_cost`); with the queue's length `Q` these bound
/// how many of the sender's messages still wait there: at most `Q` of their bytes do, so at
/// least `(bytes - Q) / max` of them were read whole (proxy-ebpf/src/redirect.rs,
/// `queued_cost`). Reset only when the queue is seen empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queued {
    /// The largest of those messages.
    pub max: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
    /// Messages and bytes sent to this receiver since its queue was last seen empty.
    pub msgs: u64,
    pub bytes: u64,
}

/// Value of `MESH_SPLICE`, keyed by a proxy socket that receives a workload's bytes (written
/// by the proxy): the connection may take the kernel-only path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Splice {
    /// The proxy's socket on the other side of the copy; its peer is the far workload.
    pub out: SockKey,
    /// Bytes the proxy has read from the key's socket and finished writing to `out`. When it
    /// equals what the workload sent towards the proxy, nothing of the workload's is left in
    /// the proxy or in flight from it, and the next message can go straight to the far end.
    pub relayed: u64,
}

/// Key of `MESH_LISTEN`: a workload's listening port in its network namespace. A server socket
/// is accepted long after sock_ops registers it (it has no file yet at PASSIVE_ESTABLISHED),
/// so whether it is blocking is judged by its listener's mode when the connection arrives,
/// through the listener's address recorded at `listen()` (`BPF_SOCK_OPS_TCP_LISTEN_CB`).
/// One port is one entry: the last `listen()` on it decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenKey {
    /// Network namespace cookie.
    pub netns: u64,
    /// Listening port, host order.
    pub port: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
}

/// Normalises an IPv6 address that is v4-mapped (`::ffff:a.b.c.d`) to its IPv4 form.
/// Returns the family and the address in the `[u32; 4]` layout used by the keys.
/// A server listening on `::` accepts IPv4 clients on AF_INET6 sockets: without this the two
/// ends of one connection would be keyed under different families and never pair.
pub const fn normalise_ip6(ip: [u32; 4]) -> (u32, [u32; 4]) {
    // Network-order bytes 0..10 zero and bytes 10..12 = 0xff 0xff. In the u32 that holds bytes
    // 8..12, those two bytes are the high half on a big-endian reading of memory order.
    if ip[0] == 0 && ip[1] == 0 && u32::from_be(ip[2]) == 0x0000_ffff {
        (AF_INET, [ip[3], 0, 0, 0])
    } else {
        (AF_INET6, ip)
    }
}

// === counters ===

/// Indexes of `MESH_COUNTERS`, a per-CPU array of `u64`. The proxy sums the CPUs.
pub mod counter {
    /// IPv4 connects sent to the proxy.
    pub const CONNECT4_REDIRECTED: u32 = 0;
    /// IPv6 connects sent to the proxy.
    pub const CONNECT6_REDIRECTED: u32 = 1;
    /// Connects left alone: not TCP.
    pub const BYPASS_NOT_TCP: u32 = 2;
    /// Connects left alone: loopback destination (stays inside the pod).
    pub const BYPASS_LOOPBACK: u32 = 3;
    /// Connects left alone: destination port is excluded.
    pub const BYPASS_EXCLUDED_PORT: u32 = 4;
    /// Connects left alone: destination address is in an excluded CIDR.
    pub const BYPASS_EXCLUDED_CIDR: u32 = 5;
    /// Connects left alone: already addressed to the proxy.
    pub const BYPASS_PROXY_ADDRESS: u32 = 6;
    /// Connects left alone: the proxy has not configured this address family.
    pub const BYPASS_UNCONFIGURED: u32 = 7;
    /// Connects left alone: the original destination could not be recorded.
    pub const BYPASS_RECORD_FAILED: u32 = 8;
    /// Original destinations handed from the connect cookie to the proxy's lookup key.
    pub const ORIG_DST_RECORDED: u32 = 9;
    /// Sockets inserted into the SOCKHASH.
    pub const SOCKHASH_INSERTED: u32 = 10;
    /// SOCKHASH inserts that failed (map full, ...): the connection stays on the TCP path.
    pub const SOCKHASH_INSERT_FAILED: u32 = 11;
    /// Sockets not inserted because they carried payload before they were established (TCP Fast Open).
    pub const SOCKHASH_SKIPPED_EARLY_DATA: u32 = 12;
    /// sk_msg messages redirected to the peer socket.
    pub const MSG_REDIRECTED: u32 = 13;
    /// Bytes of those messages.
    pub const MSG_REDIRECTED_BYTES: u32 = 14;
    /// sk_msg messages passed to the TCP path.
    pub const MSG_PASSED: u32 = 15;
    /// Bytes of those messages.
    pub const MSG_PASSED_BYTES: u32 = 16;
    /// Messages passed because the peer was not (yet) in the SOCKHASH; that direction stays on TCP.
    pub const MSG_PASSED_NO_PEER: u32 = 17;
    /// Messages passed because an earlier message of the same direction took the TCP path.
    pub const MSG_PASSED_TAINTED: u32 = 18;
    /// Connects left alone: `FLAG_WORKLOADS_ONLY` is on and no cgroup of the task is a
    /// declared workload's (`MESH_WORKLOADS`).
    pub const BYPASS_NOT_WORKLOAD: u32 = 19;
    /// Messages passed (and their direction moved to TCP for good) because the receiver's
    /// short-circuit queue would have gone past `Config::queue_limit`: backpressure.
    pub const MSG_PASSED_BACKPRESSURE: u32 = 20;
    /// Workload directions that turned out to be streams (`Config::small_streak` writes in a
    /// row found the reader behind) and asked for their connection to leave the SOCKHASH:
    /// on plain TCP a stream is as fast or faster, and the request/response latency gain the
    /// short-circuit exists for does not apply to it.
    pub const DETACH_STREAM: u32 = 21;
    /// Messages of a socket with no `MESH_FLOWS` entry (map full): passed, never redirected.
    pub const MSG_PASSED_NO_FLOW: u32 = 22;
    /// Sockets not registered because `MESH_FLOWS` was full.
    pub const FLOW_INSERT_FAILED: u32 = 23;
    /// Directions into the proxy that came back from the TCP path to the short-circuit once
    /// the proxy had read every byte sent over TCP (backpressure relieved, or the first bytes
    /// written before the pair was complete); and proxy directions into a workload client
    /// that came back once its first send was judged and it had read every TCP byte
    /// (`FLOW_TCP_UNJUDGED`).
    pub const FLOW_RESUMED: u32 = 24;
    /// Messages passed (direction moved to TCP) because the machine's TCP memory in use was
    /// past half of `tcp_mem`'s low threshold: TCP handles pressure with its own waits.
    pub const MSG_PASSED_MEMORY_PRESSURE: u32 = 25;
    /// Directions that switched to the kernel-only path (workload to workload).
    pub const SPLICE_STARTED: u32 = 26;
    /// Messages sent on the kernel-only path.
    pub const MSG_DIRECT: u32 = 27;
    /// Bytes of those messages.
    pub const MSG_DIRECT_BYTES: u32 = 28;
    /// The proxy's redirected writes that left their receiving workload with more than 3/4
    /// of the queue limit unread: the proxy pauses before its next write (`Flow::held`).
    pub const MSG_PROXY_HELD: u32 = 29;
    /// Workload directions that met the queue limit `Config::detach_after` times and asked
    /// for their connection to leave the SOCKHASH.
    pub const DETACH_WANTED: u32 = 30;
    /// Workload sockets of leaving connections (the asking one and the other) found safe to
    /// remove (the proxy had stopped redirecting into them and their queue was empty); the
    /// proxy then removes the socket. Up to two per asking workload (`DETACH_WANTED`,
    /// `DETACH_STREAM`).
    pub const DETACH_READY: u32 = 31;
    /// Workload sockets left off the SOCKHASH because they are blocking (a client by its
    /// own mode at connect, a server by its listener's when the connection arrives): a
    /// blocking reader there can get a spurious EAGAIN (`Config::flags`,
    /// `FLAG_SOCKMAP_BLOCKING`).
    pub const SOCKHASH_SKIPPED_BLOCKING: u32 = 32;
    /// The proxy's own sockets of a leaving connection that found leaving safe (the
    /// workload behind them out of the SOCKHASH, their own queue empty); the proxy then
    /// removes them too.
    pub const DETACH_PROXY_READY: u32 = 33;
    /// Workload sockets registered while non-blocking (a connect with a timeout: Rust's
    /// `connect_timeout`, hiredis, libmysqlclient) and blocking at their first send, that
    /// nothing had been redirected into: they leave the SOCKHASH at once (`GUARD_LEAVING`),
    /// so their blocking reads never meet `tcp_bpf_recvmsg`'s spurious EAGAIN.
    pub const TURNED_BLOCKING_LEAVING: u32 = 34;
    /// Workload sockets that their own sock_ops removed from the SOCKHASH (`GUARD_LEAVING`),
    /// at a segment they sent: turned blocking (`TURNED_BLOCKING_LEAVING`) or a stream of
    /// small writes (`DETACH_SELF`) that nothing was redirected into, while the message
    /// that decided it went out; or, with their connection leaving (the proxy's socket
    /// facing them marked `FLOW_TCP_DETACHING`), once their queue was empty.
    pub const SELF_REMOVED: u32 = 35;
    /// Workload sockets blocking at their first send that bytes had already been
    /// redirected into (a server that spoke first): they ask the proxy to take their
    /// connection off (`DETACH_WANTED`) instead, which waits until their queue is read.
    pub const TURNED_BLOCKING_ASKED: u32 = 36;
    /// Proxy messages put on the TCP path because the workload client they go to has not
    /// sent yet, so its mode was not judged (`GUARD_CLIENT`): a server's greeting.
    pub const MSG_PASSED_UNJUDGED: u32 = 37;
    /// Workloads that asked (`DETACH_STREAM`; `DETACH_WANTED` with the stream rule on) and
    /// that nothing had been redirected into: they leave the SOCKHASH by themselves at once
    /// (`GUARD_LEAVING`) instead of waiting for the proxy to notice and remove them (also
    /// counted as `DETACH_READY`).
    pub const DETACH_SELF: u32 = 38;
    /// Number of counters.
    pub const COUNT: u32 = 39;

    /// Metric-style name of each counter, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "connect4_redirected",
        "connect6_redirected",
        "bypass_not_tcp",
        "bypass_loopback",
        "bypass_excluded_port",
        "bypass_excluded_cidr",
        "bypass_proxy_address",
        "bypass_unconfigured",
        "bypass_record_failed",
        "orig_dst_recorded",
        "sockhash_inserted",
        "sockhash_insert_failed",
        "sockhash_skipped_early_data",
        "msg_redirected",
        "msg_redirected_bytes",
        "msg_passed",
        "msg_passed_bytes",
        "msg_passed_no_peer",
        "msg_passed_tainted",
        "bypass_not_workload",
        "msg_passed_backpressure",
        "detach_stream",
        "msg_passed_no_flow",
        "flow_insert_failed",
        "flow_resumed",
        "msg_passed_memory_pressure",
        "splice_started",
        "msg_direct",
        "msg_direct_bytes",
        "msg_proxy_held",
        "detach_wanted",
        "detach_ready",
        "sockhash_skipped_blocking",
        "detach_proxy_ready",
        "turned_blocking_leaving",
        "sockhash_self_removed",
        "turned_blocking_asked",
        "msg_passed_unjudged",
        "detach_self",
    ];
}

/// LPM trie key for IPv4 exclusions: prefix length, then the address in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lpm4 {
    pub prefix_len: u32,
    pub addr: u32,
}

/// LPM trie key for IPv6 exclusions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lpm6 {
    pub prefix_len: u32,
    pub addr: [u32; 4],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, made only of integers, and has no implicit padding
    // (padding fields are explicit), so every bit pattern is valid and no byte is uninitialised.
    #[allow(unsafe_code)]
    mod impls {
        use super::super::*;
        unsafe impl aya::Pod for Config {}
        unsafe impl aya::Pod for OrigDst {}
        unsafe impl aya::Pod for OrigKey {}
        unsafe impl aya::Pod for SockKey {}
        unsafe impl aya::Pod for Flow {}
        unsafe impl aya::Pod for Splice {}
        unsafe impl aya::Pod for ListenKey {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(
            size_of::<Config>(),
            8 + 4 + 4 + 16 + 4 + 11 * 4 + 2 * 8 + 4 * 4 + 12 * 4
        );
        assert_eq!(size_of::<ListenKey>(), 8 + 4 + 4);
        assert_eq!(size_of::<Queued>(), 4 + 4 + 8 + 8);
        assert_eq!(
            size_of::<Flow>(),
            4 + 4 + 8 + 8 + 4 + 4 + 4 + 2 + 2 + 4 + 4 + 8 + 2 * 24 + 8 + 8 + 8
        );
        assert_eq!(size_of::<Splice>(), size_of::<SockKey>() + 8);
        assert_eq!(size_of::<OrigDst>(), 4 + 4 + 16 + 8);
        assert_eq!(size_of::<OrigKey>(), 4 * 4 + 16 + 16);
        assert_eq!(size_of::<SockKey>(), 8 + 4 * 4 + 16 + 16);
        assert_eq!(size_of::<Lpm4>(), 8);
        assert_eq!(size_of::<Lpm6>(), 20);
    }

    #[test]
    fn mapped_v4_normalises() {
        let mapped = [0, 0, u32::to_be(0xffff), u32::from_ne_bytes([10, 0, 0, 1])];
        assert_eq!(
            normalise_ip6(mapped),
            (AF_INET, [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0])
        );
        let v6 = [u32::from_ne_bytes([0xfd, 0, 0, 0]), 0, 0, 1];
        assert_eq!(normalise_ip6(v6), (AF_INET6, v6));
    }

    #[test]
    fn reversed_key_swaps_ends() {
        let k = SockKey {
            netns: 7,
            family: AF_INET,
            local_port: 1,
            remote_port: 2,
            _pad: 0,
            local_ip: [3, 0, 0, 0],
            remote_ip: [4, 0, 0, 0],
        };
        let r = k.reversed_in(9);
        assert_eq!(r.netns, 9);
        assert_eq!((r.local_port, r.remote_port), (2, 1));
        assert_eq!((r.local_ip[0], r.remote_ip[0]), (4, 3));
        assert_eq!(r.reversed_in(7), k);
        assert_eq!(k.without_netns().netns, 0);
    }

    #[test]
    fn counter_names_are_unique() {
        for (i, a) in counter::NAMES.iter().enumerate() {
            for b in &counter::NAMES[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
