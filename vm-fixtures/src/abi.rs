// The guest ABI: the memory map, the I/O ports and the parameter block that the
// VMM and the guest workloads agree on. This file is the single source of truth:
// `build.rs` includes it to generate `abi.inc` for the assembler, and the crate
// re-exports it as `vm_fixtures::abi`. Only `pub const NAME: u64 = <literal>;`
// lines are allowed here (build.rs parses them).

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;

/// Parameter block written by the VMM before the first vCPU runs.
pub const PARAMS_GPA: u64 = 0x1000;
/// Global descriptor table built by the VMM.
pub const GDT_GPA: u64 = 0x2000;
/// Per-vCPU mailboxes (`MAILBOX_STRIDE` bytes each): the output device reads records here.
pub const MAILBOX_GPA: u64 = 0x3000;
pub const MAILBOX_STRIDE: u64 = 64;
/// Identity-mapped page tables: one PML4, one PDPT, then one page directory per GiB.
pub const PML4_GPA: u64 = 0x4000;
pub const PDPT_GPA: u64 = 0x5000;
pub const PD_GPA: u64 = 0x6000;
/// Page directories that fit before `CODE_GPA`: the most guest memory the boot layout maps, in GiB.
pub const MAX_MEM_GIB: u64 = 16;
/// The guest program is loaded here and entered at its first byte.
pub const CODE_GPA: u64 = 0x20000;
/// The code area runs up to the stacks: image, `.data` and `.bss` must end below `STACKS_GPA`.
pub const CODE_MAX_BYTES: u64 = 0x20000;
/// vCPU stacks: vCPU `v` starts with `rsp = STACKS_GPA + (v + 1) * STACK_BYTES`.
pub const STACKS_GPA: u64 = 0x40000;
pub const STACK_BYTES: u64 = 0x4000;
pub const MAX_VCPUS: u64 = 16;
/// The first byte of guest memory that belongs to the workload's working set.
pub const WORKING_SET_GPA: u64 = 0x100000;
/// Device MMIO windows start here, right above the most memory a guest can have
/// (`MAX_MEM_GIB`); the boot page tables identity-map their first 2 MiB with the
/// page directory at `MMIO_PD_GPA`. No memory backs them: every access exits to the VMM.
pub const MMIO_GPA: u64 = 0x4_0000_0000;
pub const MMIO_PD_GPA: u64 = 0x16000;
/// The virtio-net device (virtio 1.x over virtio-mmio, register layout version 2).
pub const VIRTIO_NET_MMIO_GPA: u64 = 0x4_0000_0000;
pub const VIRTIO_MMIO_WINDOW_BYTES: u64 = 0x1000;

/// Parameter block field offsets (each field is a little-endian u64).
pub const P_MAGIC: u64 = 0;
pub const P_VCPUS: u64 = 8;
pub const P_STEPS: u64 = 16;
pub const P_WS_BASE: u64 = 24;
pub const P_WS_PAGES: u64 = 32;
pub const P_RECORD_EVERY: u64 = 40;
pub const P_SEED: u64 = 48;
pub const P_WRITES_PER_STEP: u64 = 56;
pub const P_PATTERN: u64 = 64;
pub const P_TICKS_PER_WRITE: u64 = 72;
pub const P_HOT_PAGES: u64 = 80;
pub const P_HOT_THRESHOLD: u64 = 88;
pub const P_SPIN: u64 = 96;
/// `kv` fixture (network guests): the MAC address (the low 6 bytes, first octet in the
/// lowest byte), the guest's and the host's (gateway's) IPv4 address (`a.b.c.d` as
/// `a << 24 | b << 16 | c << 8 | d`), the prefix length, the TCP port it serves on,
/// the TSC frequency in kHz (its clock), and the most bytes of keys and values it stores.
pub const P_NET_MAC: u64 = 104;
pub const P_NET_IP: u64 = 112;
pub const P_NET_GATEWAY: u64 = 120;
pub const P_NET_PREFIX: u64 = 128;
pub const P_NET_PORT: u64 = 136;
pub const P_TSC_KHZ: u64 = 144;
pub const P_KV_MAX_BYTES: u64 = 152;
/// Size of the parameter block in bytes.
pub const PARAMS_BYTES: u64 = 160;
pub const PARAMS_MAGIC: u64 = 0x5043_4654_5041_524d;

/// Mailbox field offsets (little-endian u64 each).
pub const M_STEP: u64 = 0;
pub const M_DIGEST: u64 = 8;
/// Last completed step, written by the guest after every step (progress without an exit).
pub const M_PROGRESS: u64 = 16;

/// Output device doorbell: `out` of the vCPU index emits the record in that vCPU's mailbox.
pub const PORT_OUTPUT: u64 = 0x510;
/// Control port: the guest reports its status here (`CONTROL_*` values).
pub const PORT_CONTROL: u64 = 0x511;
pub const CONTROL_DONE: u64 = 1;
pub const CONTROL_BAD_PARAMS: u64 = 2;
/// A network guest is up: its device is ready and it listens on its port.
pub const CONTROL_SERVING: u64 = 3;
/// The guest panicked (it wrote its message to `PORT_CONSOLE` first) and stops.
pub const CONTROL_PANIC: u64 = 4;
/// Console: `out` of one byte appends it to the guest's console line (a newline ends it).
pub const PORT_CONSOLE: u64 = 0x512;
/// Network idle: `out` of a timeout in microseconds (32 bits). The vCPU leaves the
/// guest until a frame has arrived for it (and was placed in a posted receive
/// buffer), the timeout passes, or the VMM needs the vCPU; the guest must
/// tolerate an early return. Received frames are delivered at the vCPU's exits
/// (this one, and queue notifications): the device raises no interrupts.
pub const PORT_NET_IDLE: u64 = 0x513;

/// `dirty` fixture write patterns.
pub const PATTERN_SEQUENTIAL: u64 = 0;
pub const PATTERN_RANDOM: u64 = 1;
pub const PATTERN_HOT_COLD: u64 = 2;

/// `--prefill`: before boot, the VMM writes every word of guest memory that the
/// boot image leaves untouched with `gpa ^ PREFILL_TAG` (non-zero, and
/// different at every address), and the oracle expects it wherever the guest
/// has not written. The tag is "PFIL" in the high half.
pub const PREFILL_TAG: u64 = 0x5046_494C_0000_0000;

/// Constants of the mixing function (splitmix64) shared by guest and oracle.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
pub const MIX_MUL1: u64 = 0xBF58_476D_1CE4_E5B9;
pub const MIX_MUL2: u64 = 0x94D0_49BB_1331_11EB;
