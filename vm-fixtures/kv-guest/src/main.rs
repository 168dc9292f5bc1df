//! The `kv` fixture: a key-value server speaking a subset of Redis's RESP2
//! over TCP (smoltcp) on virtio-net, for `x86_64-unknown-none`.
//!
//! Entered at its first byte in 64-bit mode with `rdi` = the parameter block
//! (vm-fixtures/src/abi.rs) and `rsi` = the vCPU index. No IDT, no interrupts:
//! everything is polled. The guest's instructions are emulated (~1 M/s), so
//! the loop calls `iface.poll` only when there is work: a received frame in
//! the RX used ring (a memory read), replies to send, or a smoltcp timer due.
//! Otherwise it leaves the vCPU with `out PORT_NET_IDLE` for the time until
//! the next timer (at most 50 ms).
//!
//! Memory: the working-set region is the heap. Setup (virtqueues, buffers,
//! sockets, connection buffers) takes its first few MiB from the global
//! allocator; the rest is the store's own arena (kv_guest::store).
#![no_std]
#![no_main]

mod virtio;

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use kv_guest::arena::Arena;
use kv_guest::resp::MAX_ARGS;
use kv_guest::server::{Conn, Server, MIN_IN, MIN_OUT};
use kv_guest::store::Store;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

// The ABI (vm-fixtures/src/abi.rs).
const P_MAGIC: usize = 0;
const P_WS_BASE: usize = 24;
const P_WS_PAGES: usize = 32;
const P_NET_MAC: usize = 104;
const P_NET_IP: usize = 112;
const P_NET_GATEWAY: usize = 120;
const P_NET_PREFIX: usize = 128;
const P_NET_PORT: usize = 136;
const P_TSC_KHZ: usize = 144;
const P_KV_MAX_BYTES: usize = 152;
const PARAMS_MAGIC: u64 = 0x5043_4654_5041_524d;
const VIRTIO_NET_MMIO_GPA: usize = 0x4_0000_0000;
const PORT_CONTROL: u16 = 0x511;
const PORT_CONSOLE: u16 = 0x512;
const PORT_NET_IDLE: u16 = 0x513;
const CONTROL_BAD_PARAMS: u32 = 2;
const CONTROL_SERVING: u32 = 3;
const CONTROL_PANIC: u32 = 4;

/// TCP connections served at once (one listening socket each). Sockets of
/// connections that are closing are not listening, so a client that closes
/// N connections and opens N new ones at once (redis-benchmark between its
/// tests) needs 2N: past that, new connections are refused (RST).
const SOCKETS: usize = 32;
const TCP_RX: usize = 8 * 1024;
const TCP_TX: usize = 16 * 1024;
/// Heap kept for the global allocator after setup (smoltcp should not allocate then).
const GLOBAL_SLACK: usize = 256 * 1024;
/// The longest idle exit.
const MAX_IDLE_US: u64 = 50_000;

global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    // Zero .bss (memory there may hold anything), keeping rdi/rsi.
    "    mov r12, rdi",
    "    mov r13, rsi",
    "    lea rdi, [rip + __bss_start]",
    "    lea rcx, [rip + __bss_end]",
    "    sub rcx, rdi",
    "    xor eax, eax",
    "    cld",
    "    rep stosb",
    "    mov rdi, r12",
    "    mov rsi, r13",
    // rsp is 16-aligned at entry: `call` leaves it as a function expects.
    "    and rsp, -16",
    "    call {main}",
    "2:  jmp 2b",
    main = sym kv_main,
);

#[inline]
fn out32(port: u16, value: u32) {
    // SAFETY: port I/O to the VMM's devices; no memory is touched.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

fn console(s: &[u8]) {
    for &b in s {
        out32(PORT_CONSOLE, u32::from(b));
    }
}

fn console_num(v: u64) {
    let mut d = [0u8; 20];
    let n = kv_guest::num::write_u64(&mut d, v);
    console(&d[..n]);
}

fn stop(code: u32) -> ! {
    out32(PORT_CONTROL, code);
    loop {
        out32(PORT_NET_IDLE, 1_000_000);
    }
}

/// The global allocator: an arena over the start of the working set.
struct Global(UnsafeCell<Arena>);

// SAFETY: one vCPU, no interrupts: never used concurrently.
unsafe impl Sync for Global {}

#[global_allocator]
static HEAP: Global = Global(UnsafeCell::new(Arena::empty()));

impl Global {
    #[allow(clippy::mut_from_ref)]
    fn arena(&self) -> &mut Arena {
        // SAFETY: single-threaded, and no caller holds the reference across another call.
        unsafe { &mut *self.0.get() }
    }
}

unsafe impl GlobalAlloc for Global {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let a = self.arena();
        let p =
            if layout.align() <= 16 { a.alloc(layout.size()) } else { a.alloc_aligned(layout.size(), layout.align()) };
        p.unwrap_or(core::ptr::null_mut())
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // Blocks from alloc_aligned are never reused.
        if layout.align() <= 16 {
            self.arena().free(p, layout.size());
        }
    }
}

/// The guest's clock: microseconds from the TSC, never going backwards (a
/// migration may move the guest to a host whose TSC is behind).
struct Clock {
    khz: u64,
    last: u64,
}

impl Clock {
    fn now_us(&mut self) -> u64 {
        // SAFETY: rdtsc has no side effects (rdtscp is fatal here; not used).
        let t = unsafe { core::arch::x86_64::_rdtsc() };
        let us = t / self.khz * 1000 + (t % self.khz) * 1000 / self.khz;
        self.last = self.last.max(us);
        self.last
    }
}

fn param(params: usize, off: usize) -> u64 {
    // SAFETY: the VMM's parameter block (identity-mapped RAM).
    unsafe { core::ptr::read_volatile((params + off) as *const u64) }
}

/// A connection slot: its socket and buffers.
struct Slot {
    handle: SocketHandle,
    conn: Conn<'static>,
    /// A connection is (or was) established on this socket since it last listened.
    active: bool,
}

fn leak_buffer(n: usize) -> &'static mut [u8] {
    vec![0u8; n].leak()
}

extern "C" fn kv_main(params: u64, _vcpu: u64) -> ! {
    let params = params as usize;
    let ws_base = param(params, P_WS_BASE) as usize;
    let ws_bytes = (param(params, P_WS_PAGES) as usize).saturating_mul(4096);
    let mac_word = param(params, P_NET_MAC);
    let mac = EthernetAddress::from_bytes(&mac_word.to_le_bytes()[..6]);
    let prefix = param(params, P_NET_PREFIX);
    let port = param(params, P_NET_PORT);
    let tsc_khz = param(params, P_TSC_KHZ);
    let max_bytes = param(params, P_KV_MAX_BYTES);
    let min_heap = 16 << 20;
    if param(params, P_MAGIC) != PARAMS_MAGIC
        || ws_bytes < min_heap
        || ws_base < 0x10_0000
        || !mac.is_unicast()
        || !(1..=32).contains(&prefix)
        || !(1..=65535).contains(&port)
        || tsc_khz == 0
    {
        console(b"kv: bad parameters\n");
        stop(CONTROL_BAD_PARAMS);
    }
    let ip = Ipv4Address::from_bits(param(params, P_NET_IP) as u32);
    let gateway = Ipv4Address::from_bits(param(params, P_NET_GATEWAY) as u32);
    let port = port as u16;
    let mut clock = Clock { khz: tsc_khz, last: 0 };

    HEAP.arena().init(ws_base, ws_base + ws_bytes);
    let mut net = match virtio::Net::new(VIRTIO_NET_MMIO_GPA, HEAP.arena()) {
        Ok(n) => n,
        Err(e) => {
            console(b"kv: ");
            console(e.as_bytes());
            console(b"\n");
            stop(CONTROL_BAD_PARAMS);
        }
    };

    let now = Instant::from_micros(clock.now_us() as i64);
    let mut config = Config::new(HardwareAddress::Ethernet(mac));
    // SAFETY: rdtsc, as above.
    config.random_seed = unsafe { core::arch::x86_64::_rdtsc() } ^ mac_word;
    let mut iface = Interface::new(config, &mut net, now);
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(ip.into(), prefix as u8));
    });
    let _ = iface.routes_mut().add_default_ipv4_route(gateway);

    let mut sockets = SocketSet::new(Vec::with_capacity(SOCKETS));
    let mut slots: Vec<Slot> = Vec::with_capacity(SOCKETS);
    for _ in 0..SOCKETS {
        let mut s =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0u8; TCP_RX]), tcp::SocketBuffer::new(vec![0u8; TCP_TX]));
        s.set_nagle_enabled(false);
        let _ = s.listen(port);
        let handle = sockets.add(s);
        slots.push(Slot { handle, conn: Conn::new(leak_buffer(MIN_IN), leak_buffer(MIN_OUT)), active: false });
    }
    let args: &'static mut [(u32, u32)] = vec![(0u32, 0u32); MAX_ARGS].leak();

    // The rest of the working set is the store's.
    let heap = HEAP.arena();
    let store_base = (heap.bump() + GLOBAL_SLACK + 4095) & !4095;
    let ws_end = ws_base + ws_bytes;
    heap.set_end(store_base);
    // SAFETY: [store_base, ws_end) is no longer the global allocator's.
    let store = match unsafe { Store::new(store_base, ws_end, max_bytes) } {
        Some(s) => s,
        None => {
            console(b"kv: no memory left for the store\n");
            stop(CONTROL_BAD_PARAMS);
        }
    };
    let mut srv =
        Server { store, args, commands: 0, connections: 0, clients: 0, port, arena_size: (ws_end - store_base) as u64 };
    let start_us = clock.now_us();

    console(b"kv: serving on port ");
    console_num(u64::from(port));
    console(b", store ");
    console_num(srv.arena_size >> 20);
    console(b" MiB (max ");
    console_num(max_bytes);
    console(b" bytes)\n");
    out32(PORT_CONTROL, CONTROL_SERVING);

    let mut poll_now = true;
    let mut busy = true;
    let mut deadline = 0u64;
    loop {
        let now_us = clock.now_us();
        if poll_now || net.rx_pending() || now_us >= deadline {
            poll_now = false;
            let now = Instant::from_micros(now_us as i64);
            let changed = iface.poll(now, &mut net, &mut sockets) == PollResult::SocketStateChanged;
            // Visiting the sockets costs instructions: only after a change, or
            // while a connection has replies or requests waiting.
            if changed || busy {
                let uptime = (now_us - start_us) / 1_000_000;
                let (egress, still_busy, again) = serve(&mut sockets, &mut slots, &mut srv, port, uptime);
                busy = still_busy;
                poll_now = again;
                if egress {
                    iface.poll_egress(now, &mut net, &mut sockets);
                }
            }
            // Sends what the polls queued; frames may arrive during this exit.
            net.flush();
            deadline = match iface.poll_at(now, &sockets) {
                Some(t) => t.total_micros().max(0) as u64,
                None => u64::MAX,
            };
            continue;
        }
        let wait = (deadline - now_us).min(MAX_IDLE_US);
        out32(PORT_NET_IDLE, wait as u32);
    }
}

/// Moves data between the sockets and the connections and runs the
/// requests. Returns whether a socket has new data or a state change to send,
/// whether a connection is open (its sockets need visits at each poll), and
/// whether a connection was still making progress when its turn ended.
fn serve(sockets: &mut SocketSet, slots: &mut [Slot], srv: &mut Server, port: u16, uptime: u64) -> (bool, bool, bool) {
    let mut egress = false;
    let mut busy = false;
    let mut again = false;
    let mut clients = 0;
    for slot in slots.iter_mut() {
        let s = sockets.get_mut::<tcp::Socket>(slot.handle);
        match s.state() {
            tcp::State::Closed => {
                // Listen again (a failure is retried at the next visit).
                busy |= s.listen(port).is_err();
                slot.active = false;
                continue;
            }
            tcp::State::Listen | tcp::State::SynReceived => {
                slot.active = false;
                continue;
            }
            tcp::State::TimeWait | tcp::State::LastAck | tcp::State::Closing => {
                // Visit again until it is closed, to listen again.
                busy = true;
                continue;
            }
            _ => {}
        }
        if !slot.active {
            slot.active = true;
            slot.conn.reset();
            srv.connections += 1;
        }
        clients += 1;
        let conn = &mut slot.conn;
        // Receive and run, then send; again while both make progress (replies
        // larger than the socket's send buffer, long pipelines).
        for round in 0..4 {
            let mut progress = false;
            if s.can_recv() {
                let space = conn.rx_space();
                if !space.is_empty() {
                    if let Ok(n) = s.recv_slice(space) {
                        conn.rx_commit(n);
                    }
                }
            }
            if conn.has_input() {
                srv.clients = clients;
                progress |= conn.process(srv, uptime);
            }
            let pending = conn.tx_pending();
            if !pending.is_empty() && s.can_send() {
                if let Ok(n) = s.send_slice(pending) {
                    if n > 0 {
                        conn.tx_commit(n);
                        egress = true;
                        progress = true;
                    }
                }
            }
            if !progress {
                break;
            }
            // Still going after the last round: come back without waiting.
            again |= round == 3;
        }
        if conn.closing() && s.can_recv() {
            // After a protocol error: discard what the peer still sends (no
            // copy), so a client blocked in a send can finish and read the error.
            let _ = s.recv(|b| (b.len(), ()));
        }
        let drained = conn.tx_pending().is_empty();
        // An open connection keeps the sockets visited at each poll (a state
        // change without a segment to send does not report a change).
        busy = true;
        if drained && (conn.closing() || (!s.may_recv() && !conn.has_input())) {
            // A protocol error, QUIT, or the peer closed its side: close ours
            // (FIN after the queued replies).
            if matches!(s.state(), tcp::State::Established | tcp::State::CloseWait | tcp::State::SynReceived) {
                s.close();
                egress = true;
            }
        }
    }
    srv.clients = clients;
    (egress, busy, again)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    struct Console;
    impl core::fmt::Write for Console {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            console(s.as_bytes());
            Ok(())
        }
    }
    console(b"kv: panic: ");
    let _ = core::fmt::write(&mut Console, format_args!("{}", info));
    console(b"\n");
    stop(CONTROL_PANIC);
}
