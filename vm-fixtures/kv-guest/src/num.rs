//! Integers as Redis reads and writes them, without `core::fmt`.

/// Parses `s` as Redis's `string2ll` does: an optional `-`, then `0` alone or
/// a digit 1-9 followed by digits, nothing else (no `+`, no spaces, no
/// leading zeros, no `-0`), within `i64`.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [] => return None,
        [b'0'] => return Some(0),
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') if digits.len() <= 19 => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    if neg {
        if v > 1u64 << 63 {
            None
        } else {
            Some((v as i64).wrapping_neg())
        }
    } else if v > i64::MAX as u64 {
        None
    } else {
        Some(v as i64)
    }
}

/// Writes `v` in decimal at the start of `buf` (20 bytes suffice); returns the length.
pub fn write_u64(buf: &mut [u8; 20], mut v: u64) -> usize {
    let mut tmp = [0u8; 20];
    let mut n = 0;
    loop {
        tmp[19 - n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 || n == 20 {
            break;
        }
    }
    buf[..n].copy_from_slice(&tmp[20 - n..]);
    n
}

/// Writes `v` in decimal (with a `-` when negative); returns the length (at most 20).
pub fn write_i64(buf: &mut [u8; 20], v: i64) -> usize {
    if v < 0 {
        let mut digits = [0u8; 20];
        let n = write_u64(&mut digits, v.unsigned_abs());
        buf[0] = b'-';
        buf[1..=n].copy_from_slice(&digits[..n]);
        n + 1
    } else {
        write_u64(buf, v as u64)
    }
}

/// `v` as 16 lower-case hex digits.
pub fn hex16(v: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let nib = ((v >> (60 - 4 * i)) & 0xf) as u8;
        *o = if nib < 10 { b'0' + nib } else { b'a' + nib - 10 };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_like_string2ll() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"12"), Some(12));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"1x",
            b"x",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"99999999999999999999",
            b"123456789012345678901",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", core::str::from_utf8(bad));
        }
    }

    #[test]
    fn write_decimal_and_hex() {
        let mut b = [0u8; 20];
        for v in [0i64, 7, -7, 10, 1234567890, i64::MAX, i64::MIN] {
            let n = write_i64(&mut b, v);
            assert_eq!(&b[..n], v.to_string().as_bytes());
        }
        let n = write_u64(&mut b, u64::MAX);
        assert_eq!(&b[..n], u64::MAX.to_string().as_bytes());
        assert_eq!(&hex16(0x98a8619112fac85a), b"98a8619112fac85a");
        assert_eq!(&hex16(0), b"0000000000000000");
    }
}
