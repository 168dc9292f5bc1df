//! The `kv` fixture's host-side model: the digest of a store, computed the
//! way the guest's `PCFT.DIGEST` command computes it, so a test can check
//! the guest's store against the writes its clients saw acknowledged; a
//! RESP2 client (`resp`); and the client history's check (`history`).

pub mod history;
pub mod resp;

use crate::abi::GOLDEN;
use crate::mix;

/// FNV-1a 64 over `key`, one `0xff` byte, then `value`.
fn entry_hash(key: &[u8], value: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.iter().chain(&[0xff]).chain(value) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The digest of a whole store: the wrapping sum over its entries of
/// `mix(fnv1a(key ‖ 0xff ‖ value) + GOLDEN)` (independent of order; 0 when empty).
/// `PCFT.DIGEST` replies with it as 16 lower-case hex digits.
pub fn store_digest<'a>(entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> u64 {
    entries.into_iter().fold(0u64, |sum, (k, v)| sum.wrapping_add(mix(entry_hash(k, v).wrapping_add(GOLDEN))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_order_independent_and_sees_every_byte() {
        let a: [(&[u8], &[u8]); 2] = [(b"k1", b"v1"), (b"k2", b"v2")];
        let b: [(&[u8], &[u8]); 2] = [(b"k2", b"v2"), (b"k1", b"v1")];
        assert_eq!(store_digest(a), store_digest(b));
        assert_eq!(store_digest([]), 0);
        assert_ne!(store_digest([(&b"k1"[..], &b"v1"[..])]), store_digest([(&b"k1"[..], &b"v2"[..])]));
        // The key/value boundary counts: ("ab", "c") is not ("a", "bc").
        assert_ne!(store_digest([(&b"ab"[..], &b"c"[..])]), store_digest([(&b"a"[..], &b"bc"[..])]));
        // Pinned, so the guest's implementation can be checked against this number.
        assert_eq!(format!("{:016x}", store_digest([(&b"key"[..], &b"value"[..])])), KEY_VALUE_DIGEST);
    }

    const KEY_VALUE_DIGEST: &str = "98a8619112fac85a";
}
