//! Atomic access to `Flow::guard`, the one field of a `MESH_FLOWS` entry that sockets other
//! than its owner write (proxy_common::GUARD_*).
//!
//! The BPF target offers no atomic read-modify-write through `core::sync::atomic` (its spec
//! says no compare-and-swap), yet the instructions exist (`BPF_ATOMIC` with `BPF_FETCH` and
//! `BPF_CMPXCHG`, kernel 5.12+, LLVM's `-mcpu=v3`, which bpf-linker targets): the compiler
//! intrinsics reach them. Fetching atomics are fully ordered in the BPF memory model, which
//! is what `SeqCst` asks for.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or};

use proxy_common::Flow;

/// The guard word of the entry behind `flow`.
#[inline(always)]
fn word(flow: *mut Flow) -> *mut u64 {
    // SAFETY: only a field address is computed; `flow` points into a live map value.
    unsafe { &raw mut (*flow).guard }
}

/// The current bits (a plain load: no order is needed to read a bit that only ever gets set).
#[inline(always)]
pub fn load(flow: *mut Flow) -> u64 {
    // SAFETY: an aligned u64 inside a live map value.
    unsafe { core::ptr::read_volatile(word(flow)) }
}

/// Sets `bits`; returns the bits before.
#[inline(always)]
pub fn fetch_or(flow: *mut Flow, bits: u64) -> u64 {
    // SAFETY: as in `load`; every writer of the word uses these atomics.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word(flow), bits) }
}

/// Replaces `old` with `new` if the word still holds `old`; true if it did.
#[inline(always)]
pub fn replace(flow: *mut Flow, old: u64, new: u64) -> bool {
    // SAFETY: as in `fetch_or`.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word(flow),
            old,
            new,
        )
    }
    .1
}
