//! The eBPF dirty tracker's kernel side, seen from user space: loading and attaching the
//! `agent-ebpf` program (on `kvm:kvm_dirty_ring_push`), registering each VM's
//! vCPU threads and memslots in its maps, and taking the dirty bitmap it keeps.
//! This is kernel-facing code (BPF maps, an mmap of the bitmap) and nothing else.
//!
//! One program serves every VM of the agent (it is loaded once per process).
//! A VM's pages are bits in one shared, mmapped `DIRTY` array: each memslot
//! gets a range of 64-bit words. The program sets bits with an atomic OR; a
//! take swaps each word with zero atomically, so a write racing the take lands
//! either in this take or in the next one, never nowhere. VMs are told apart
//! by the kernel thread ids of their vCPU threads (the push runs on the vCPU's
//! thread), the one key the tracepoint's context gives that no other VM shares.

use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, Clone, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this pcft was built without its eBPF programs: run `cargo xtask build-ebpf`, rebuild pcft, or use --dirty-tracker ring"
    )]
    NotBuilt,
    #[error("cannot load the eBPF dirty tracker: {0} (it needs root, tracefs with kvm:kvm_dirty_ring_push, and a kernel with BPF); use --dirty-tracker ring or auto")]
    Load(String),
    #[error("the eBPF dirty tracker is full: {0}")]
    Full(String),
}

/// The number of pages and first bitmap word of one memslot of a followed VM.
#[derive(Clone, Copy, Debug)]
struct SlotRange {
    gpa: u64,
    pages: u64,
    first_word: u64,
}

/// One VM's part of the shared eBPF program: its vCPU threads and its words
/// of the program's dirty bitmap. (The `DirtyTracker`
/// over it is `EbpfTracker` in ebpf.rs, which also resets the ring.)
pub struct BpfVmBitmap {
    shared: Arc<imp::Loaded>,
    vm: u32,
    slots: Vec<SlotRange>,
    threads: Mutex<Vec<u32>>,
}

impl BpfVmBitmap {
    /// Starts following `memory`'s memslots for a new VM (its threads come with
    /// [`follow_thread`](Self::follow_thread)).
    pub fn new(memory: &GuestMemory) -> Result<BpfVmBitmap, EbpfError> {
        let shared = imp::global()?;
        let (vm, slots) = shared.add_vm(memory)?;
        Ok(BpfVmBitmap { shared, vm, slots, threads: Mutex::new(Vec::new()) })
    }

    /// Counts the pages that thread `tid` (a vCPU thread of this VM) dirties from now on.
    pub fn follow_thread(&self, tid: u32) -> Result<(), EbpfError> {
        self.shared.follow_thread(tid, self.vm)?;
        self.threads.lock().expect("threads lock").push(tid);
        Ok(())
    }

    /// Dirty-ring pushes the program saw from this VM's threads (all CPUs).
    pub fn pushes(&self) -> u64 {
        self.shared.pushes(self.vm)
    }

    /// The pages the program marked since the last take, sorted; their bits
    /// are swapped out word by word.
    pub fn take(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for slot in &self.slots {
            let words = slot.pages.div_ceil(64);
            for w in 0..words {
                let mut bits = self.shared.take_word(slot.first_word + w);
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let page = w * 64 + bit;
                    if page < slot.pages {
                        pages.push(slot.gpa + page * PAGE_SIZE);
                    }
                }
            }
        }
        pages
    }
}

impl Drop for BpfVmBitmap {
    fn drop(&mut self) {
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        self.shared.remove_vm(self.vm, &threads, &self.slots);
    }
}

/// Loads the programs now (to fail early, or to warm up), if they are built in.
pub fn preload() -> Result<(), EbpfError> {
    imp::global().map(|_| ())
}

/// Pushes the program could not place (an unregistered memslot or page), over
/// every VM of this process; 0 if the program is not loaded.
pub fn misses() -> u64 {
    match LOADED.get() {
        Some(Ok(loaded)) => loaded.misses(),
        _ => 0,
    }
}

static LOADED: OnceLock<Result<Arc<imp::Loaded>, EbpfError>> = OnceLock::new();

#[cfg(not(pcft_ebpf))]
mod imp {
    use super::*;

    pub struct Loaded;

    pub fn global() -> Result<Arc<Loaded>, EbpfError> {
        LOADED.get_or_init(|| Err(EbpfError::NotBuilt)).clone()
    }

    impl Loaded {
        pub fn add_vm(&self, _: &GuestMemory) -> Result<(u32, Vec<SlotRange>), EbpfError> {
            Err(EbpfError::NotBuilt)
        }
        pub fn follow_thread(&self, _: u32, _: u32) -> Result<(), EbpfError> {
            Err(EbpfError::NotBuilt)
        }
        pub fn take_word(&self, _: u64) -> u64 {
            0
        }
        pub fn pushes(&self, _: u32) -> u64 {
            0
        }
        pub fn misses(&self) -> u64 {
            0
        }
        pub fn remove_vm(&self, _: u32, _: &[u32], _: &[SlotRange]) {}
    }
}

#[cfg(pcft_ebpf)]
mod imp {
    use super::*;
    use agent_common::{counters, SlotBits, SlotKey, BITMAP_WORDS, MAX_VMS};
    use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
    use aya::programs::TracePoint;
    use std::os::fd::{AsFd, AsRawFd};
    use std::sync::atomic::{AtomicU64, Ordering};

    static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PCFT_EBPF_OBJECT"));

    pub struct Loaded {
        state: Mutex<State>,
        /// The mmapped `DIRTY` array: `BITMAP_WORDS` u64 words shared with the program.
        bitmap: *mut u64,
        bitmap_len: usize,
    }

    // SAFETY: `bitmap` is a shared mapping touched only through atomics; the rest is behind the mutex.
    unsafe impl Send for Loaded {}
    // SAFETY: as above.
    unsafe impl Sync for Loaded {}

    struct State {
        ebpf: aya::Ebpf,
        /// Bitmap words handed out so far (a bump allocator; freed ranges go to `free`).
        next_word: u64,
        free: Vec<(u64, u64)>,
        vms_in_use: Vec<bool>,
    }

    pub fn global() -> Result<Arc<Loaded>, EbpfError> {
        LOADED.get_or_init(|| load().map(Arc::new)).clone()
    }

    fn load() -> Result<Loaded, EbpfError> {
        let e = |what: &str, err: &dyn std::fmt::Display| EbpfError::Load(format!("{what}: {err}"));
        let mut ebpf = aya::Ebpf::load(OBJECT).map_err(|err| e("loading the object", &err))?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_flusher(logger),
            Err(err) => tracing::warn!("eBPF program logs are not available: {err}"),
        }
        ensure_tracefs()?;
        let program: &mut TracePoint = ebpf
            .program_mut("kvm_dirty_ring_push")
            .ok_or_else(|| EbpfError::Load("the object has no kvm_dirty_ring_push program".into()))?
            .try_into()
            .map_err(|err| e("the program", &err))?;
        program.load().map_err(|err| e("loading the program (verifier)", &err))?;
        program.attach("kvm", "kvm_dirty_ring_push").map_err(|err| e("attaching to kvm:kvm_dirty_ring_push", &err))?;
        let bitmap_len = BITMAP_WORDS as usize * 8;
        let map = ebpf.map("DIRTY").ok_or_else(|| EbpfError::Load("no DIRTY map".into()))?;
        let fd = map_fd(map)?;
        // SAFETY: maps the BPF array map (created BPF_F_MMAPABLE) shared and writable,
        // for its whole size; the mapping lives as long as `Loaded`, which keeps the map.
        let bitmap = unsafe {
            libc::mmap(std::ptr::null_mut(), bitmap_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if bitmap == libc::MAP_FAILED {
            return Err(e("mapping the dirty bitmap", &std::io::Error::last_os_error()));
        }
        let state = State { ebpf, next_word: 0, free: Vec::new(), vms_in_use: vec![false; MAX_VMS as usize] };
        Ok(Loaded { state: Mutex::new(state), bitmap: bitmap.cast(), bitmap_len })
    }

    /// Tracepoints attach through tracefs: mount it at its usual place if nothing has.
    fn ensure_tracefs() -> Result<(), EbpfError> {
        const TRACEFS: &str = "/sys/kernel/tracing";
        let mounted = std::fs::read_to_string("/proc/mounts")
            .map(|m| m.lines().any(|l| l.split_whitespace().nth(2) == Some("tracefs")))
            .unwrap_or(false);
        if mounted {
            return Ok(());
        }
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (source, target, fstype) = (c("nodev"), c(TRACEFS), c("tracefs"));
        // SAFETY: mount(2) with valid NUL-terminated strings and no data.
        let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(EbpfError::Load(format!(
                "tracefs is not mounted and mounting it at {TRACEFS} failed: {} (mount -t tracefs nodev {TRACEFS})",
                std::io::Error::last_os_error()
            )));
        }
        tracing::info!("mounted tracefs at {TRACEFS} for the eBPF dirty tracker");
        Ok(())
    }

    fn map_fd(map: &aya::maps::Map) -> Result<i32, EbpfError> {
        let data: &MapData = match map {
            aya::maps::Map::Array(d) => d,
            _ => return Err(EbpfError::Load("DIRTY is not an array map".into())),
        };
        Ok(data.fd().as_fd().as_raw_fd())
    }

    /// aya-log's records (the program's warnings) go to our log, read by a thread of their own.
    fn spawn_log_flusher(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
        let _ = std::thread::Builder::new().name("ebpf-log".into()).spawn(move || loop {
            logger.flush();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
    }

    impl Drop for Loaded {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping made in `load`.
            unsafe { libc::munmap(self.bitmap.cast(), self.bitmap_len) };
        }
    }

    impl Loaded {
        fn word(&self, index: u64) -> &AtomicU64 {
            assert!(index < u64::from(BITMAP_WORDS), "bitmap word {index} out of range");
            // SAFETY: in range of the live mapping; u64-aligned (page-aligned base);
            // the program and we access it only atomically.
            unsafe { AtomicU64::from_ptr(self.bitmap.add(index as usize)) }
        }

        pub fn take_word(&self, index: u64) -> u64 {
            if self.word(index).load(Ordering::Relaxed) == 0 {
                return 0;
            }
            self.word(index).swap(0, Ordering::AcqRel)
        }

        pub fn add_vm(&self, memory: &GuestMemory) -> Result<(u32, Vec<SlotRange>), EbpfError> {
            let mut state = self.state.lock().expect("ebpf state lock");
            let vm = state
                .vms_in_use
                .iter()
                .position(|used| !used)
                .ok_or_else(|| EbpfError::Full(format!("it follows at most {MAX_VMS} VMs")))?
                as u32;
            let mut slots = Vec::new();
            for slot in memory.slots() {
                let pages = slot.size / PAGE_SIZE;
                let words = pages.div_ceil(64);
                let first_word = match state.free.iter().position(|&(_, len)| len >= words) {
                    Some(i) => {
                        let (start, len) = state.free.remove(i);
                        if len > words {
                            state.free.push((start + words, len - words));
                        }
                        start
                    }
                    None => {
                        let start = state.next_word;
                        if start + words > u64::from(BITMAP_WORDS) {
                            return Err(EbpfError::Full("its dirty bitmap has no room for this VM's memory".into()));
                        }
                        state.next_word += words;
                        start
                    }
                };
                for w in first_word..first_word + words {
                    self.word(w).store(0, Ordering::Relaxed);
                }
                slots.push((slot.id, SlotRange { gpa: slot.gpa, pages, first_word }));
            }
            let mut map: BpfHashMap<_, SlotKey, SlotBits> =
                BpfHashMap::try_from(state.ebpf.map_mut("SLOTS").expect("SLOTS map")).expect("SLOTS is a hash map");
            for (id, range) in &slots {
                let bits = SlotBits { first_word: range.first_word as u32, pages: range.pages as u32 };
                map.insert(SlotKey { vm, slot: *id }, bits, 0)
                    .map_err(|e| EbpfError::Full(format!("cannot register a memslot: {e}")))?;
            }
            state.vms_in_use[vm as usize] = true;
            Ok((vm, slots.into_iter().map(|(_, r)| r).collect()))
        }

        pub fn follow_thread(&self, tid: u32, vm: u32) -> Result<(), EbpfError> {
            let mut state = self.state.lock().expect("ebpf state lock");
            let mut map: BpfHashMap<_, u32, u32> =
                BpfHashMap::try_from(state.ebpf.map_mut("VCPU_THREADS").expect("map"))
                    .expect("VCPU_THREADS is a hash map");
            map.insert(tid, vm, 0).map_err(|e| EbpfError::Full(format!("cannot follow vCPU thread {tid}: {e}")))
        }

        fn counter(&self, index: u32) -> u64 {
            let state = self.state.lock().expect("ebpf state lock");
            let Some(map) = state.ebpf.map("COUNTERS") else { return 0 };
            let Ok(array) = PerCpuArray::<_, u64>::try_from(map) else { return 0 };
            array.get(&index, 0).map(|values| values.iter().sum()).unwrap_or(0)
        }

        pub fn pushes(&self, vm: u32) -> u64 {
            self.counter(counters::PUSHES_BASE + vm)
        }

        pub fn misses(&self) -> u64 {
            self.counter(counters::MISSES)
        }

        pub fn remove_vm(&self, vm: u32, threads: &[u32], slots: &[SlotRange]) {
            let mut state = self.state.lock().expect("ebpf state lock");
            if let Ok(mut map) = BpfHashMap::<_, u32, u32>::try_from(state.ebpf.map_mut("VCPU_THREADS").expect("map")) {
                for tid in threads {
                    let _ = map.remove(tid);
                }
            }
            if let Ok(mut map) = BpfHashMap::<_, SlotKey, SlotBits>::try_from(state.ebpf.map_mut("SLOTS").expect("map"))
            {
                let keys: Vec<SlotKey> = map.keys().filter_map(Result::ok).filter(|k| k.vm == vm).collect();
                for key in keys {
                    let _ = map.remove(&key);
                }
            }
            for range in slots {
                state.free.push((range.first_word, range.pages.div_ceil(64)));
            }
            state.vms_in_use[vm as usize] = false;
        }
    }
}
