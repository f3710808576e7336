//! Every map the kernel programs use, with its sizing.
//!
//! Names are the statics' names (`bpftool map show` prints them); `proxy_common::map` holds
//! the same names for the userspace side. The proxy pins all of them under its pin directory.
//! Map sizes here are defaults; the proxy may resize the big ones before load.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use proxy_common::{Config, Flow, ListenKey, OrigDst, OrigKey, SockKey, Splice, counter};

/// LPM tries must be created without preallocation (the kernel refuses otherwise).
const BPF_F_NO_PREALLOC: u32 = 1;

/// One entry: the proxy's addresses, port, namespace and flags. Written by the proxy before
/// any program is attached; read by every program.
#[map]
pub static MESH_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU `u64` counters indexed by `proxy_common::counter`; per-CPU so the hot path never
/// contends on a cache line. The proxy sums the CPUs when it reads them.
#[map]
pub static MESH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Socket cookie -> original destination, written by connect4/connect6 and moved to
/// `MESH_ORIG_DST` once the socket is established (the source port is not known at connect
/// time). LRU: a connect that never establishes must not leak an entry. 65,536 entries cover
/// far more connects in flight (SYN sent, not yet established) than a node has.
#[map]
pub static MESH_ORIG_CK: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// The proxy's view of a redirected connection -> its original destination. Written by the
/// workload sock_ops on ACTIVE_ESTABLISHED, taken (read and deleted) by the proxy right after
/// accept(), and deleted when the workload socket closes if the proxy never accepted it. So
/// it holds only connections waiting in the proxy's accept queues (at most `somaxconn` per
/// listener), and 65,536 entries leave room for an LRU map's early eviction: each CPU keeps
/// its own list of free entries, so eviction starts before the map is full. An evicted entry
/// would reset a connection. Not sized with the SOCKHASH: it serves every redirected
/// connection, short-circuited or not.
#[map]
pub static MESH_ORIG_DST: LruHashMap<OrigKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Established sockets that take part in the short-circuit. Each proxied same-node connection
/// uses four entries (workload client, proxy inbound, proxy outbound, workload server), so
/// 65,536 entries carry 16,384 short-circuited connections; a full map only means new
/// connections stay on the TCP path (counted as `sockhash_insert_failed`).
#[map]
pub static MESH_SOCKS: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);

/// Socket -> the key of its peer socket in `MESH_SOCKS`. Written by sock_ops when a pair is
/// known, removed when the socket closes. Same size as the SOCKHASH; LRU as a safety net.
#[map]
pub static MESH_PEERS: LruHashMap<SockKey, SockKey> = LruHashMap::with_max_entries(65536, 0);

/// 4-tuple (namespace left out) of a server socket the proxy is connecting to: written by the
/// proxy's sock_ops on ACTIVE_ESTABLISHED, consumed by the workload's PASSIVE_ESTABLISHED,
/// which is always later (the client's callback runs before its final ACK is sent).
/// Entries for servers on other nodes are never consumed; LRU ages them out.
#[map]
pub static MESH_EXPECT: LruHashMap<SockKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Kernel address (`struct sock *`) of a workload's listening socket, by namespace and port:
/// written by the workload's sock_ops on TCP_LISTEN, read on PASSIVE_ESTABLISHED (the
/// accepted socket has no file yet, so the server is judged by its listener's mode), removed
/// by the listener's own close callback. LRU ages out the rest. Listeners that called
/// `listen()` before the proxy attached are written by the start-up scan (`listeners.rs`,
/// never over an entry of TCP_LISTEN), and stay after they close until replaced or aged out.
#[map]
pub static MESH_LISTEN: LruHashMap<ListenKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// The sending direction of every registered socket: redirected or on the TCP path for good
/// (and why), and its short-circuit byte count. Written when sock_ops registers the socket,
/// updated by sk_msg, removed at close. A plain hash, not LRU: an evicted "on TCP for good"
/// entry would let later bytes overtake earlier ones. A socket whose entry cannot be created
/// (map full) is not registered at all; sk_msg never redirects without an entry.
/// Same size as the SOCKHASH, of which each entry is one socket.
#[map]
pub static MESH_FLOWS: HashMap<SockKey, Flow> = HashMap::with_max_entries(65536, 0);

/// The kernel-only path: a proxy socket that receives a workload's bytes -> the proxy's socket
/// on the other side and how many of those bytes the proxy has relayed (`Splice`). Written by
/// the proxy for an authorized opaque connection to a workload on this node, deleted by it to
/// take the connection back, and deleted here when the proxy socket registers (a stale entry
/// of an earlier socket with the same 4-tuple must not steer this one) or closes. A plain
/// hash: every entry is one live proxy socket. Sized like the SOCKHASH (the proxy sets both).
#[map]
pub static MESH_SPLICE: HashMap<SockKey, Splice> = HashMap::with_max_entries(65536, 0);

/// Bytes sent on the kernel-only path past each proxy socket (keyed like `MESH_SPLICE`):
/// added by sk_msg, taken by the proxy when the connection ends. Not in `MESH_FLOWS`, whose
/// entry goes when the socket reaches TCP_CLOSE, which can be before the proxy closes its
/// file. LRU: the entries of a proxy that died are never taken; an eviction only loses a
/// byte count. Removed when a proxy socket registers (a stale count of an earlier socket
/// with the same 4-tuple). Sized like the SOCKHASH.
#[map]
pub static MESH_DIRECT: LruHashMap<SockKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// cgroup ids of declared workloads (their pods' cgroup directories), written by the proxy
/// when `FLAG_WORKLOADS_ONLY` is on. 65536: far more pods than a node runs.
#[map]
pub static MESH_WORKLOADS: HashMap<u64, u32> = HashMap::with_max_entries(65536, 0);

/// Destination ports that are never intercepted (host order `u16` widened to `u32`).
#[map]
pub static MESH_EXCL_PORT: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// IPv4 CIDRs that are never intercepted.
#[map]
pub static MESH_EXCL_V4: LpmTrie<u32, u32> = LpmTrie::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// IPv6 CIDRs that are never intercepted.
#[map]
pub static MESH_EXCL_V6: LpmTrie<[u32; 4], u32> =
    LpmTrie::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// Adds `n` to counter `index` on this CPU.
///
/// Atomically, though the slot is this CPU's alone: programs nest on one CPU. A program run
/// in process context (sk_msg in `sendmsg`, sock_ops for a segment the socket sends, or for
/// a packet of the socket's backlog, which `release_sock` processes with softirqs on) can be
/// interrupted by a softirq that runs sock_ops for another socket and counts the same
/// counter, and a plain load-add-store then loses one of the two. Measured: with softirq
/// spread over both CPUs, `sockhash_inserted` read 7999 or 7998 for 8000 registrations in
/// 2 of 80 runs of `bytes_stay_in_order_on_the_per_hop_short_circuit_with_softirq_spread`,
/// every other counter of a missed registration at 0.
#[inline(always)]
pub fn count(index: u32, n: u64) {
    if let Some(p) = MESH_COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot
        // (BPF programs do not migrate mid-run); an aligned u64 every writer adds to
        // atomically (`BPF_ATOMIC` add, see guard.rs for the BPF target's atomics).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
    }
}

/// The configuration entry, if the proxy has written one.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    MESH_CONFIG.get(0)
}
