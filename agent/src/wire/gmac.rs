//! GMAC over a frame in pieces: AES-256-GCM from AWS-LC's EVP interface with
//! the pieces as associated data and no plaintext. The tag is the one
//! aws-lc-rs's sealing of the whole frame gives (GCM hashes associated data
//! as one stream, whatever its pieces; a test checks it against
//! `LessSafeKey`), so a sender can tag a frame whose pages stay in guest
//! memory without gathering them into one buffer first.
//!
//! The one `unsafe` of the wire layer: calls into AWS-LC's C API, each
//! checked, on a context this type owns alone.

use aws_lc_sys as lc;
use std::os::raw::c_int;

/// Bytes of a GCM nonce.
pub const NONCE_BYTES: usize = 12;
/// Bytes of a GCM tag.
pub const TAG_BYTES: usize = 16;

/// An AES-256-GCM key schedule that computes GMAC tags over scattered pieces.
pub struct ScatterGmac {
    ctx: *mut lc::EVP_CIPHER_CTX,
}

// SAFETY: the context is owned by this value alone (never shared or aliased),
// and AWS-LC's cipher contexts hold no thread-local state: moving one between
// threads is moving plain heap memory.
unsafe impl Send for ScatterGmac {}

impl ScatterGmac {
    /// The key schedule of `key` (AES-256).
    pub fn new(key: &[u8; 32]) -> ScatterGmac {
        // SAFETY: allocates a fresh context; a null result is checked below.
        let ctx = unsafe { lc::EVP_CIPHER_CTX_new() };
        assert!(!ctx.is_null(), "AWS-LC could not allocate a cipher context (out of memory)");
        let gmac = ScatterGmac { ctx };
        // SAFETY: `ctx` is a fresh context; the cipher is AWS-LC's static
        // AES-256-GCM; `key` is 32 readable bytes; no IV yet (set per tag).
        let set = unsafe {
            lc::EVP_EncryptInit_ex(ctx, lc::EVP_aes_256_gcm(), std::ptr::null_mut(), key.as_ptr(), std::ptr::null())
        };
        assert_eq!(set, 1, "AWS-LC refused an AES-256-GCM key of 32 bytes");
        gmac
    }

    /// The GMAC tag of the concatenation of `pieces` under `nonce` (which the
    /// caller never uses twice with this key).
    pub fn tag<'a>(
        &mut self,
        nonce: &[u8; NONCE_BYTES],
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> [u8; TAG_BYTES] {
        // SAFETY: the context holds a key (new); a null cipher and key keep
        // them, and `nonce` is the 12 readable bytes GCM's default IV length asks.
        let started = unsafe {
            lc::EVP_EncryptInit_ex(self.ctx, std::ptr::null(), std::ptr::null_mut(), std::ptr::null(), nonce.as_ptr())
        };
        assert_eq!(started, 1, "AWS-LC refused a GCM nonce");
        for piece in pieces {
            // Pieces are frames' parts: a frame is at most 32 MiB, far below c_int's range.
            for part in piece.chunks(c_int::MAX as usize) {
                let mut written: c_int = 0;
                // SAFETY: a null output makes the input associated data (GCM
                // only hashes it, writes nothing but `written`); `part` is
                // readable for its length, which fits a c_int.
                let hashed = unsafe {
                    lc::EVP_EncryptUpdate(
                        self.ctx,
                        std::ptr::null_mut(),
                        &mut written,
                        part.as_ptr(),
                        part.len() as c_int,
                    )
                };
                assert_eq!(hashed, 1, "AWS-LC refused associated data (over GCM's 2^61 bytes?)");
            }
        }
        let mut tail = [0u8; 16];
        let mut written: c_int = 0;
        let mut tag = [0u8; TAG_BYTES];
        // SAFETY: with no plaintext GCM's final writes no bytes to `tail` (a
        // block's room regardless) and computes the tag; the control call
        // copies TAG_BYTES of it into `tag`, which has that room.
        let finished = unsafe {
            lc::EVP_EncryptFinal_ex(self.ctx, tail.as_mut_ptr(), &mut written) == 1
                && lc::EVP_CIPHER_CTX_ctrl(
                    self.ctx,
                    lc::EVP_CTRL_GCM_GET_TAG,
                    TAG_BYTES as c_int,
                    tag.as_mut_ptr().cast(),
                ) == 1
        };
        assert!(finished, "AWS-LC did not finish a GCM tag");
        tag
    }
}

impl Drop for ScatterGmac {
    fn drop(&mut self) {
        // SAFETY: the context came from EVP_CIPHER_CTX_new and is freed once, here.
        unsafe { lc::EVP_CIPHER_CTX_free(self.ctx) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

    fn whole(key: &[u8; 32], nonce: [u8; 12], frame: &[u8]) -> [u8; 16] {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
        let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(frame), &mut []);
        tag.unwrap().as_ref().try_into().unwrap()
    }

    #[test]
    fn pieces_tag_as_the_whole_frame_does_in_aws_lc_rs() {
        let key = [9u8; 32];
        let frame: Vec<u8> = (0..(3 * 4096 + 16 + 9 * 3 + 4)).map(|i| (i * 7 + 3) as u8).collect();
        let mut gmac = ScatterGmac::new(&key);
        for seq in 0..3u8 {
            let nonce = [seq, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            let expected = whole(&key, nonce, &frame);
            // Split as a page frame is (header, pages, entries and count), at odd places, and whole.
            let (header, rest) = frame.split_at(16);
            let (pages, trailer) = rest.split_at(3 * 4096);
            let (a, b) = pages.split_at(4096);
            assert_eq!(gmac.tag(&nonce, [header, a, b, trailer]), expected, "frame {seq} as a page frame's parts");
            let (x, y) = frame.split_at(5);
            let (y, z) = y.split_at(1001);
            assert_eq!(gmac.tag(&nonce, [x, &[][..], y, z]), expected, "frame {seq} at odd places");
            assert_eq!(gmac.tag(&nonce, [&frame[..]]), expected, "frame {seq} whole");
        }
        assert_eq!(gmac.tag(&[0; 12], []), whole(&key, [0; 12], &[]), "no bytes at all");
        let mut other = ScatterGmac::new(&[8u8; 32]);
        assert_ne!(other.tag(&[0; 12], [&frame[..]]), whole(&key, [0; 12], &frame), "another key");
    }
}
