//! The key-value store: an open-addressing hash table (linear probing,
//! backward-shift deletion, no tombstones) of `(key hash, entry)` slots, with
//! each entry one block of its own arena holding
//! `[digest term u64][key len u32][value len u32][key][value]`.
//!
//! The digest that `PCFT.DIGEST` reports (the wrapping sum over entries of
//! `mix(fnv1a64(key ‖ 0xff ‖ value) + GOLDEN)`, vm-fixtures/src/kv.rs) is kept
//! up to date on every write, so reading it is O(1); the FNV state after the
//! key doubles as the table hash. `FLUSHALL` resets the arena.
//!
//! Bound: the sum of key and value lengths never exceeds `max_bytes`; a
//! write that would grow it past the bound, or that finds the arena
//! exhausted, fails with [`Oom`] and changes nothing.

use crate::arena::Arena;
use core::ptr;

pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const MIX_MUL1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX_MUL2: u64 = 0x94D0_49BB_1331_11EB;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const HEADER: usize = 16;
const INITIAL_BITS: u32 = 10;

/// splitmix64's finalizer (vm-fixtures/src/lib.rs `mix`).
#[inline]
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(MIX_MUL1);
    x ^= x >> 27;
    x = x.wrapping_mul(MIX_MUL2);
    x ^ (x >> 31)
}

#[inline]
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a 64 of the key alone: the table hash, and the digest's starting state.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    fnv(FNV_OFFSET, key)
}

/// One entry's share of the digest, given the key's hash.
#[inline]
pub fn entry_term(key_hash: u64, value: &[u8]) -> u64 {
    let h = fnv((key_hash ^ 0xff).wrapping_mul(FNV_PRIME), value);
    mix(h.wrapping_add(GOLDEN))
}

/// The store is full: the write was not applied.
#[derive(Debug, PartialEq, Eq)]
pub struct Oom;

#[derive(Debug, PartialEq, Eq)]
pub enum IncrError {
    NotInteger,
    Overflow,
    Oom,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    hash: u64,
    /// Null: empty.
    entry: *mut u8,
}

pub struct Store {
    arena: Arena,
    slots: *mut Slot,
    bits: u32,
    len: usize,
    bytes: u64,
    max_bytes: u64,
    digest: u64,
}

#[inline]
fn entry_size(klen: usize, vlen: usize) -> usize {
    HEADER + klen + vlen
}

/// # Safety (all `e_*`): `e` is a live entry.
#[inline]
unsafe fn e_klen(e: *const u8) -> usize {
    (e.add(8) as *const u32).read() as usize
}
#[inline]
unsafe fn e_vlen(e: *const u8) -> usize {
    (e.add(12) as *const u32).read() as usize
}
#[inline]
unsafe fn e_term(e: *const u8) -> u64 {
    (e as *const u64).read()
}
#[inline]
unsafe fn e_key<'a>(e: *const u8) -> &'a [u8] {
    core::slice::from_raw_parts(e.add(HEADER), e_klen(e))
}
#[inline]
unsafe fn e_value<'a>(e: *const u8) -> &'a [u8] {
    core::slice::from_raw_parts(e.add(HEADER + e_klen(e)), e_vlen(e))
}
#[inline]
unsafe fn e_size(e: *const u8) -> usize {
    entry_size(e_klen(e), e_vlen(e))
}
/// Writes the value (and its length and term) into an entry whose block holds it.
#[inline]
unsafe fn e_set_value(e: *mut u8, value: &[u8], term: u64) {
    (e as *mut u64).write(term);
    (e.add(12) as *mut u32).write(value.len() as u32);
    let klen = e_klen(e);
    ptr::copy_nonoverlapping(value.as_ptr(), e.add(HEADER + klen), value.len());
}

impl Store {
    /// A store over the memory `[base, end)`, holding at most `max_bytes` of keys and values.
    /// `None` if the region cannot even hold the initial table.
    ///
    /// # Safety
    /// `[base, end)` is memory that nothing else uses while the store lives.
    pub unsafe fn new(base: usize, end: usize, max_bytes: u64) -> Option<Self> {
        let mut s = Store {
            arena: Arena::new(base, end),
            slots: ptr::null_mut(),
            bits: 0,
            len: 0,
            bytes: 0,
            max_bytes,
            digest: 0,
        };
        s.slots = s.new_table(INITIAL_BITS)?;
        s.bits = INITIAL_BITS;
        Some(s)
    }

    fn new_table(&mut self, bits: u32) -> Option<*mut Slot> {
        let n = 1usize << bits;
        let p = self.arena.alloc(n * core::mem::size_of::<Slot>())? as *mut Slot;
        // SAFETY: the block holds n slots; zero is "empty" (null entry).
        unsafe { ptr::write_bytes(p, 0, n) };
        Some(p)
    }

    /// Removes every entry.
    pub fn flush(&mut self) {
        self.arena.reset();
        self.len = 0;
        self.bytes = 0;
        self.digest = 0;
        // The initial table was the first block of an empty arena: it fits again.
        self.slots = self.new_table(INITIAL_BITS).unwrap_or(ptr::null_mut());
        self.bits = if self.slots.is_null() { 0 } else { INITIAL_BITS };
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes of keys and values stored.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
    /// Bytes of the store's arena in use (entries and table, block sizes).
    pub fn arena_bytes(&self) -> usize {
        self.arena.live()
    }
    pub fn digest(&self) -> u64 {
        self.digest
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        (hash.wrapping_mul(GOLDEN) >> (64 - self.bits)) as usize
    }

    /// The slot index holding `key`, or the empty slot where it would go.
    #[inline]
    fn find(&self, key: &[u8], hash: u64) -> (usize, bool) {
        let mask = (1usize << self.bits) - 1;
        let mut i = self.home(hash);
        loop {
            // SAFETY: i <= mask; the table has mask + 1 slots.
            let s = unsafe { *self.slots.add(i) };
            if s.entry.is_null() {
                return (i, false);
            }
            if s.hash == hash && unsafe { e_key(s.entry) } == key {
                return (i, true);
            }
            i = (i + 1) & mask;
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if self.bits == 0 {
            return None;
        }
        let (i, found) = self.find(key, key_hash(key));
        // SAFETY: a found slot holds a live entry.
        found.then(|| unsafe { e_value((*self.slots.add(i)).entry) })
    }

    pub fn exists(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// The size of `key`'s value, if it exists.
    pub fn value_len(&self, key: &[u8]) -> Option<usize> {
        self.get(key).map(<[u8]>::len)
    }

    /// How much `SET key value` would grow the stored bytes (0 if it shrinks them).
    pub fn growth(&self, key: &[u8], value_len: usize) -> u64 {
        let new = (key.len() + value_len) as u64;
        match self.value_len(key) {
            Some(old) => (value_len as u64).saturating_sub(old as u64),
            None => new,
        }
    }

    /// Whether `growth` more bytes stay within the bound.
    pub fn fits(&self, growth: u64) -> bool {
        self.bytes.saturating_add(growth) <= self.max_bytes
    }

    /// Makes room for one more entry (grows the table at 3/4 load; a full
    /// arena tolerates up to 7/8 load before refusing).
    fn reserve_one(&mut self) -> Result<(), Oom> {
        if self.bits == 0 {
            self.slots = self.new_table(INITIAL_BITS).ok_or(Oom)?;
            self.bits = INITIAL_BITS;
        }
        let cap = 1usize << self.bits;
        if (self.len + 1) * 4 <= cap * 3 {
            return Ok(());
        }
        if self.grow().is_ok() || (self.len + 1) * 8 <= cap * 7 {
            Ok(())
        } else {
            Err(Oom)
        }
    }

    fn grow(&mut self) -> Result<(), Oom> {
        if self.bits >= 40 {
            return Err(Oom);
        }
        let old = self.slots;
        let old_n = 1usize << self.bits;
        let new = self.new_table(self.bits + 1).ok_or(Oom)?;
        self.slots = new;
        self.bits += 1;
        let mask = (1usize << self.bits) - 1;
        for j in 0..old_n {
            // SAFETY: j < old_n, the old table's size; i <= mask.
            unsafe {
                let s = *old.add(j);
                if s.entry.is_null() {
                    continue;
                }
                let mut i = self.home(s.hash);
                while !(*new.add(i)).entry.is_null() {
                    i = (i + 1) & mask;
                }
                *new.add(i) = s;
            }
        }
        // SAFETY: the old table came from alloc of this size and is no longer used.
        unsafe { self.arena.free(old as *mut u8, old_n * core::mem::size_of::<Slot>()) };
        Ok(())
    }

    /// `SET key value`.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), Oom> {
        if key.len() > u32::MAX as usize || value.len() > u32::MAX as usize {
            return Err(Oom);
        }
        let hash = key_hash(key);
        let term = entry_term(hash, value);
        if self.bits != 0 {
            let (i, found) = self.find(key, hash);
            if found {
                // SAFETY: a found slot holds a live entry.
                unsafe {
                    let slot = self.slots.add(i);
                    let e = (*slot).entry;
                    let old_vlen = e_vlen(e);
                    let grow = (value.len() as u64).saturating_sub(old_vlen as u64);
                    if !self.fits(grow) {
                        return Err(Oom);
                    }
                    let old_size = e_size(e);
                    let new_size = entry_size(key.len(), value.len());
                    let old_term = e_term(e);
                    if Arena::same_block(old_size, new_size) {
                        e_set_value(e, value, term);
                    } else {
                        let n = self.arena.alloc(new_size).ok_or(Oom)?;
                        ptr::copy_nonoverlapping(e, n, HEADER + key.len());
                        e_set_value(n, value, term);
                        self.arena.free(e, old_size);
                        (*slot).entry = n;
                    }
                    self.bytes = self.bytes - old_vlen as u64 + value.len() as u64;
                    self.digest = self.digest.wrapping_sub(old_term).wrapping_add(term);
                }
                return Ok(());
            }
        }
        let grow = (key.len() + value.len()) as u64;
        if !self.fits(grow) {
            return Err(Oom);
        }
        self.reserve_one()?;
        let (i, _) = self.find(key, hash);
        let size = entry_size(key.len(), value.len());
        let e = self.arena.alloc(size).ok_or(Oom)?;
        // SAFETY: e holds `size` bytes; i is an empty slot of the table.
        unsafe {
            (e.add(8) as *mut u32).write(key.len() as u32);
            ptr::copy_nonoverlapping(key.as_ptr(), e.add(HEADER), key.len());
            e_set_value(e, value, term);
            *self.slots.add(i) = Slot { hash, entry: e };
        }
        self.len += 1;
        self.bytes += grow;
        self.digest = self.digest.wrapping_add(term);
        Ok(())
    }

    /// `DEL key`: whether it existed.
    pub fn del(&mut self, key: &[u8]) -> bool {
        if self.bits == 0 {
            return false;
        }
        let (mut i, found) = self.find(key, key_hash(key));
        if !found {
            return false;
        }
        let mask = (1usize << self.bits) - 1;
        // SAFETY: indices are masked into the table; the found entry is live.
        unsafe {
            let e = (*self.slots.add(i)).entry;
            self.bytes -= (e_klen(e) + e_vlen(e)) as u64;
            self.digest = self.digest.wrapping_sub(e_term(e));
            self.arena.free(e, e_size(e));
            // Backward-shift deletion: pull later members of the cluster into the hole.
            let mut j = i;
            loop {
                j = (j + 1) & mask;
                let s = *self.slots.add(j);
                if s.entry.is_null() {
                    break;
                }
                let k = self.home(s.hash);
                let stays = if i <= j { i < k && k <= j } else { i < k || k <= j };
                if !stays {
                    *self.slots.add(i) = s;
                    i = j;
                }
            }
            (*self.slots.add(i)).entry = ptr::null_mut();
        }
        self.len -= 1;
        true
    }

    /// `INCR key`: the new value.
    pub fn incr(&mut self, key: &[u8]) -> Result<i64, IncrError> {
        let old = match self.get(key) {
            Some(v) => crate::num::parse_i64(v).ok_or(IncrError::NotInteger)?,
            None => 0,
        };
        let new = old.checked_add(1).ok_or(IncrError::Overflow)?;
        let mut buf = [0u8; 20];
        let n = crate::num::write_i64(&mut buf, new);
        self.set(key, &buf[..n]).map_err(|Oom| IncrError::Oom)?;
        Ok(new)
    }

    /// Every entry (for tests and checks; order unspecified).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        if self.bits == 0 {
            return;
        }
        for j in 0..1usize << self.bits {
            // SAFETY: j is within the table; non-null entries are live.
            unsafe {
                let s = *self.slots.add(j);
                if !s.entry.is_null() {
                    f(e_key(s.entry), e_value(s.entry));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_digest(s: &Store) -> u64 {
        let mut sum = 0u64;
        s.for_each(|k, v| {
            let mut h = FNV_OFFSET;
            for &b in k.iter().chain(&[0xff]).chain(v) {
                h ^= u64::from(b);
                h = h.wrapping_mul(FNV_PRIME);
            }
            sum = sum.wrapping_add(mix(h.wrapping_add(GOLDEN)));
        });
        sum
    }

    fn store(mem: &mut Vec<u64>, max: u64) -> Store {
        let base = mem.as_mut_ptr() as usize;
        unsafe { Store::new(base, base + mem.len() * 8, max).unwrap() }
    }

    #[test]
    fn digest_pinned_for_key_value() {
        let mut mem = vec![0u64; 1 << 16];
        let mut s = store(&mut mem, 1 << 20);
        assert_eq!(s.digest(), 0);
        s.set(b"key", b"value").unwrap();
        assert_eq!(s.digest(), 0x98a8619112fac85a);
        assert_eq!(reference_digest(&s), 0x98a8619112fac85a);
        s.set(b"key", b"other").unwrap();
        s.set(b"key", b"value").unwrap();
        assert_eq!(s.digest(), 0x98a8619112fac85a);
        assert!(s.del(b"key"));
        assert_eq!(s.digest(), 0);
    }

    #[test]
    fn random_ops_match_a_model() {
        use std::collections::HashMap;
        let mut mem = vec![0u64; 1 << 20];
        let mut s = store(&mut mem, 1 << 40);
        let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut x = 12345u64;
        for step in 0..60_000 {
            x = mix(x.wrapping_add(GOLDEN));
            let key = format!("k{}", x % 3000).into_bytes();
            match (x >> 20) % 5 {
                0 | 1 => {
                    let v = vec![b'a' + (step % 26) as u8; ((x >> 30) % 200) as usize];
                    s.set(&key, &v).unwrap();
                    model.insert(key, v);
                }
                2 => assert_eq!(s.del(&key), model.remove(&key).is_some()),
                3 => assert_eq!(s.get(&key), model.get(&key).map(|v| &v[..])),
                _ => {
                    let r = s.incr(&key);
                    match model.get(&key).map(|v| std::str::from_utf8(v).ok().and_then(|t| t.parse::<i64>().ok())) {
                        None => {
                            assert_eq!(r, Ok(1));
                            model.insert(key, b"1".to_vec());
                        }
                        Some(Some(n)) if !model[&key].starts_with(b"0") || model[&key] == b"0" => {
                            assert_eq!(r, Ok(n + 1));
                            model.insert(key, (n + 1).to_string().into_bytes());
                        }
                        _ => assert_eq!(r, Err(IncrError::NotInteger)),
                    }
                }
            }
        }
        assert_eq!(s.len(), model.len());
        let bytes: usize = model.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_eq!(s.bytes(), bytes as u64);
        assert_eq!(s.digest(), reference_digest(&s));
        for (k, v) in &model {
            assert_eq!(s.get(k), Some(&v[..]));
        }
        s.flush();
        assert_eq!((s.len(), s.bytes(), s.digest()), (0, 0, 0));
        assert_eq!(s.get(b"k1"), None);
        s.set(b"k1", b"v").unwrap();
        assert_eq!(s.get(b"k1"), Some(&b"v"[..]));
    }

    #[test]
    fn bound_and_exhaustion_refuse_without_change() {
        let mut mem = vec![0u64; 1 << 16];
        let mut s = store(&mut mem, 20);
        s.set(b"aaaa", b"0123456789").unwrap(); // 14 bytes
        assert_eq!(s.set(b"bbbb", b"0123"), Err(Oom)); // 22 > 20
        assert_eq!(s.set(b"aaaa", b"0123456789012345678"), Err(Oom));
        s.set(b"aaaa", b"0123456789012345").unwrap(); // exactly 20
        s.set(b"aaaa", b"").unwrap(); // shrinking is fine
        s.set(b"b", b"0123456789012").unwrap();
        assert_eq!(s.bytes(), 4 + 14);
        assert_eq!(s.incr(b"c"), Ok(1)); // 2 bytes: 20
        assert_eq!(s.incr(b"d"), Err(IncrError::Oom));
        assert_eq!(s.get(b"d"), None);
        assert_eq!(s.incr(b"b"), Err(IncrError::NotInteger));
        s.set(b"c", b"9223372036854775807").unwrap_err();
        assert!(s.del(b"b") && s.del(b"aaaa"));
        s.set(b"c", b"9223372036854775807").unwrap(); // 20 bytes again
        assert_eq!(s.incr(b"c"), Err(IncrError::Overflow));
        assert_eq!(s.digest(), reference_digest(&s));

        // A tiny arena: runs out of blocks before the byte bound, and says so.
        let mut small = vec![0u64; 2048 + 512]; // 16 KiB table + 4 KiB
        let mut t = store(&mut small, u64::MAX);
        let mut stored = 0;
        for i in 0..1000 {
            match t.set(format!("key{i}").as_bytes(), &[7u8; 100]) {
                Ok(()) => stored += 1,
                Err(Oom) => break,
            }
        }
        assert!(stored > 0 && stored < 1000);
        assert_eq!(t.len(), stored);
        assert_eq!(t.digest(), reference_digest(&t));
    }

    #[test]
    fn table_grows_and_deletes_keep_clusters_reachable() {
        let mut mem = vec![0u64; 1 << 21];
        let mut s = store(&mut mem, u64::MAX);
        for i in 0..20_000u32 {
            s.set(&i.to_le_bytes(), &i.to_be_bytes()).unwrap();
        }
        for i in (0..20_000u32).step_by(3) {
            assert!(s.del(&i.to_le_bytes()));
        }
        for i in 0..20_000u32 {
            assert_eq!(s.get(&i.to_le_bytes()).is_some(), i % 3 != 0, "{i}");
        }
        assert_eq!(s.digest(), reference_digest(&s));
    }
}
