//! PostCopyFT's eBPF program: on every `kvm:kvm_dirty_ring_push` (KVM logging
//! a page a vCPU wrote into its dirty ring) from a vCPU thread the agent
//! follows, set that page's bit in a shared dirty bitmap with an atomic OR and
//! count the push per CPU. No event per page leaves the kernel: the agent
//! takes and clears the bitmap word by word with atomic swaps (a write racing
//! a take lands either in this take or in the next, never nowhere).
#![no_std]
#![no_main]
// The bpfel target has no `AtomicU64::fetch_or`; the intrinsic compiles to BPF's atomic OR.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use agent_common::{
    counters, SlotBits, SlotKey, BITMAP_WORDS, MAX_SLOTS, MAX_VCPU_THREADS, PUSH_PAGE_OFFSET, PUSH_SLOT_OFFSET,
};
use aya_ebpf::bindings::BPF_F_MMAPABLE;
use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray};
use aya_ebpf::programs::TracePointContext;
use aya_log_ebpf::warn;
use core::intrinsics::{atomic_or, AtomicOrdering};

/// Followed vCPU threads (kernel thread id) → the VM's index.
#[map]
static VCPU_THREADS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_VCPU_THREADS, 0);

/// (VM, memslot) → where its pages are in `DIRTY`.
#[map]
static SLOTS: HashMap<SlotKey, SlotBits> = HashMap::with_max_entries(MAX_SLOTS, 0);

/// One bit per followed guest page; mmapped by the agent.
#[map]
static DIRTY: Array<u64> = Array::with_max_entries(BITMAP_WORDS, BPF_F_MMAPABLE);

/// Per-CPU counters (see `agent_common::counters`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[tracepoint]
pub fn kvm_dirty_ring_push(ctx: TracePointContext) -> u32 {
    let _ = try_push(&ctx);
    0
}

fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, touched only by this CPU with preemption off.
        unsafe { *counter += 1 };
    }
}

fn try_push(ctx: &TracePointContext) -> Result<(), i64> {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: a map lookup; the value is plain data.
    let Some(&vm) = (unsafe { VCPU_THREADS.get(&tid) }) else {
        return Ok(());
    };
    count(counters::PUSHES_BASE + vm);
    // SAFETY: reads of the tracepoint record at offsets its format file gives.
    let slot: u32 = unsafe { ctx.read_at(PUSH_SLOT_OFFSET)? };
    // SAFETY: as above.
    let page: u64 = unsafe { ctx.read_at(PUSH_PAGE_OFFSET)? };
    // SAFETY: a map lookup; the value is plain data.
    let Some(&bits) = (unsafe { SLOTS.get(&SlotKey { vm, slot }) }) else {
        count(counters::MISSES);
        warn!(ctx, "dirty page in memslot {} of VM {} that the agent did not register", slot, vm);
        return Ok(());
    };
    if page >= u64::from(bits.pages) {
        count(counters::MISSES);
        return Ok(());
    }
    let word = u64::from(bits.first_word) + page / 64;
    if word >= u64::from(BITMAP_WORDS) {
        count(counters::MISSES);
        return Ok(());
    }
    let Some(ptr) = DIRTY.get_ptr_mut(word as u32) else {
        return Ok(());
    };
    // SAFETY: `ptr` points at a u64 of the array map, valid while the program runs;
    // the agent and other CPUs touch it only atomically.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, 1 << (page % 64)) };
    Ok(())
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
