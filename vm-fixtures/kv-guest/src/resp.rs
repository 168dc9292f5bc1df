//! The RESP2 request parser: multibulk requests (`*N` then N `$len` bulk
//! strings) and inline commands (one line split at whitespace, with Redis's
//! quoting rules), as Redis's `processMultibulkBuffer`/`processInlineBuffer`
//! read them. It parses one request at the start of a buffer, recording the
//! arguments as `(offset, length)` spans into it (inline arguments are
//! unquoted in place), and never panics on any input.

use crate::num::parse_i64;

/// The longest bulk string accepted (keys and values).
pub const MAX_BULK: usize = 64 * 1024;
/// The most arguments in one request.
pub const MAX_ARGS: usize = 4096;
/// The longest inline request line.
pub const MAX_INLINE: usize = 64 * 1024;
/// The longest `*N` / `$N` line accepted (digits and sign).
const MAX_NUMBER_LINE: usize = 32;

/// A protocol error: the reply is `-ERR Protocol error: <message>`, then the connection closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoError {
    InvalidMultibulkLength,
    InvalidBulkLength,
    /// The byte found where a `$` should be.
    ExpectedDollar(u8),
    ExpectedCrlf,
    TooBigInline,
    UnbalancedQuotes,
    /// A request that does not fit the connection's input buffer.
    TooBigRequest,
}

impl ProtoError {
    /// The message after `Protocol error: ` (and the byte to append, then `'`, for `ExpectedDollar`).
    pub fn message(self) -> &'static [u8] {
        match self {
            ProtoError::InvalidMultibulkLength => b"invalid multibulk length",
            ProtoError::InvalidBulkLength => b"invalid bulk length",
            ProtoError::ExpectedDollar(_) => b"expected '$', got '",
            ProtoError::ExpectedCrlf => b"expected CRLF after bulk data",
            ProtoError::TooBigInline => b"too big inline request",
            ProtoError::UnbalancedQuotes => b"unbalanced quotes in request",
            ProtoError::TooBigRequest => b"request bigger than the input buffer",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A request with no arguments (empty line, `*0`): `consumed` bytes, no reply.
    Empty(usize),
    /// A request of `argc` arguments (spans in `args[..argc]`) in the first `consumed` bytes.
    Command {
        argc: usize,
        consumed: usize,
    },
    Error(ProtoError),
}

/// Parses the `\r\n`-terminated number line starting at `buf[at]` (after the
/// `*`/`$`): `Ok(None)` if incomplete, else the number and the index after the line.
fn number_line(buf: &[u8], at: usize, err: ProtoError) -> Result<Option<(i64, usize)>, ProtoError> {
    let rest = buf.get(at..).unwrap_or(&[]);
    let window = &rest[..rest.len().min(MAX_NUMBER_LINE + 1)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if window.len() > MAX_NUMBER_LINE { Err(err) } else { Ok(None) };
    };
    match rest.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => parse_i64(&rest[..cr]).map(|n| Some((n, at + cr + 2))).ok_or(err),
        Some(_) => Err(err),
    }
}

/// Parses one request at the start of `buf`.
pub fn parse(buf: &mut [u8], args: &mut [(u32, u32)]) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'*') => match multibulk(buf, args) {
            Ok(p) => p,
            Err(e) => Parsed::Error(e),
        },
        Some(_) => match inline(buf, args) {
            Ok(p) => p,
            Err(e) => Parsed::Error(e),
        },
    }
}

fn multibulk(buf: &[u8], args: &mut [(u32, u32)]) -> Result<Parsed, ProtoError> {
    let Some((count, mut pos)) = number_line(buf, 1, ProtoError::InvalidMultibulkLength)? else {
        return Ok(Parsed::Incomplete);
    };
    if count <= 0 {
        // As Redis: `*0` and `*-1` are empty requests.
        return Ok(Parsed::Empty(pos));
    }
    if count as u64 > MAX_ARGS.min(args.len()) as u64 {
        return Err(ProtoError::InvalidMultibulkLength);
    }
    let count = count as usize;
    for arg in args.iter_mut().take(count) {
        match buf.get(pos) {
            None => return Ok(Parsed::Incomplete),
            Some(b'$') => {}
            Some(&other) => return Err(ProtoError::ExpectedDollar(other)),
        }
        let Some((len, data)) = number_line(buf, pos + 1, ProtoError::InvalidBulkLength)? else {
            return Ok(Parsed::Incomplete);
        };
        if len < 0 || len as u64 > MAX_BULK as u64 {
            return Err(ProtoError::InvalidBulkLength);
        }
        let len = len as usize;
        let end = data + len;
        match (buf.get(end), buf.get(end + 1)) {
            (Some(b'\r'), Some(b'\n')) => {}
            (None, _) | (Some(b'\r'), None) => return Ok(Parsed::Incomplete),
            _ => return Err(ProtoError::ExpectedCrlf),
        }
        *arg = (data as u32, len as u32);
        pos = end + 2;
    }
    Ok(Parsed::Command { argc: count, consumed: pos })
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// An inline request: one line (ending in `\n`, an `\r` before it dropped),
/// split into arguments as Redis's `sdssplitargs` does; unquoted in place.
fn inline(buf: &mut [u8], args: &mut [(u32, u32)]) -> Result<Parsed, ProtoError> {
    let window = &buf[..buf.len().min(MAX_INLINE + 1)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        return if window.len() > MAX_INLINE { Err(ProtoError::TooBigInline) } else { Ok(Parsed::Incomplete) };
    };
    let consumed = nl + 1;
    let end = if nl > 0 && buf[nl - 1] == b'\r' { nl - 1 } else { nl };
    let line = &mut buf[..end];
    let mut argc = 0;
    let mut p = 0; // read position
    let mut w = 0; // write position (never ahead of p)
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            break;
        }
        let start = w;
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            let Some(&c) = line.get(p) else {
                if in_dq || in_sq {
                    return Err(ProtoError::UnbalancedQuotes);
                }
                break;
            };
            if in_dq {
                let next = line.get(p + 1).copied();
                if c == b'\\' && next == Some(b'x') {
                    if let (Some(h), Some(l)) =
                        (line.get(p + 2).copied().and_then(hex_val), line.get(p + 3).copied().and_then(hex_val))
                    {
                        line[w] = h * 16 + l;
                        w += 1;
                        p += 4;
                        continue;
                    }
                }
                if c == b'\\' && next.is_some() {
                    let n = next.unwrap_or(b'\\');
                    line[w] = match n {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    };
                    w += 1;
                    p += 2;
                } else if c == b'"' {
                    // The closing quote must be followed by a space or the end.
                    if next.is_some_and(|n| !is_space(n)) {
                        return Err(ProtoError::UnbalancedQuotes);
                    }
                    p += 1;
                    break;
                } else {
                    line[w] = c;
                    w += 1;
                    p += 1;
                }
            } else if in_sq {
                let next = line.get(p + 1).copied();
                if c == b'\\' && next == Some(b'\'') {
                    line[w] = b'\'';
                    w += 1;
                    p += 2;
                } else if c == b'\'' {
                    if next.is_some_and(|n| !is_space(n)) {
                        return Err(ProtoError::UnbalancedQuotes);
                    }
                    p += 1;
                    break;
                } else {
                    line[w] = c;
                    w += 1;
                    p += 1;
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => break,
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    _ => {
                        line[w] = c;
                        w += 1;
                    }
                }
                p += 1;
            }
        }
        let Some(slot) = args.get_mut(argc) else {
            return Err(ProtoError::InvalidMultibulkLength);
        };
        *slot = (start as u32, (w - start) as u32);
        argc += 1;
    }
    if argc == 0 {
        Ok(Parsed::Empty(consumed))
    } else {
        Ok(Parsed::Command { argc, consumed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> (Parsed, Vec<Vec<u8>>) {
        let mut buf = input.to_vec();
        let mut args = vec![(0u32, 0u32); MAX_ARGS];
        let p = parse(&mut buf, &mut args);
        let v = match p {
            Parsed::Command { argc, .. } => {
                args[..argc].iter().map(|&(o, l)| buf[o as usize..(o + l) as usize].to_vec()).collect()
            }
            _ => vec![],
        };
        (p, v)
    }

    fn strs(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_requests() {
        let r = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
        assert_eq!(run(r), (Parsed::Command { argc: 3, consumed: r.len() }, strs(&["SET", "key", "value"])));
        // Every strict prefix is incomplete.
        for n in 0..r.len() {
            assert_eq!(run(&r[..n]).0, Parsed::Incomplete, "{n}");
        }
        // Pipelined: the first request only.
        let mut two = r.to_vec();
        two.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(run(&two).0, Parsed::Command { argc: 3, consumed: r.len() });
        // Empty and binary bulk strings.
        assert_eq!(run(b"*2\r\n$0\r\n\r\n$2\r\n\r\n\r\n").1, vec![vec![], b"\r\n".to_vec()]);
        assert_eq!(run(b"*0\r\n").0, Parsed::Empty(4));
        assert_eq!(run(b"*-1\r\n").0, Parsed::Empty(5));
    }

    #[test]
    fn malformed_multibulk() {
        use ProtoError::*;
        let cases: [(&[u8], ProtoError); 14] = [
            (b"*x\r\n", InvalidMultibulkLength),
            (b"*1x\r\n", InvalidMultibulkLength),
            (b"*\r\n", InvalidMultibulkLength),
            (b"*01\r\n", InvalidMultibulkLength),
            (b"*1\rx", InvalidMultibulkLength),
            (b"*99999999999999999999999\r\n", InvalidMultibulkLength),
            (b"*4097\r\n", InvalidMultibulkLength),
            (b"*1111111111111111111111111111111111111111", InvalidMultibulkLength),
            (b"*1\r\nx3\r\n", ExpectedDollar(b'x')),
            (b"*1\r\n$-1\r\n", InvalidBulkLength),
            (b"*1\r\n$x\r\n", InvalidBulkLength),
            (b"*1\r\n$65537\r\n", InvalidBulkLength),
            (b"*1\r\n$3\r\nabcd\r\n", ExpectedCrlf),
            (b"*1\r\n$3\r\nabc\rx", ExpectedCrlf),
        ];
        for (input, err) in cases {
            assert_eq!(run(input).0, Parsed::Error(err), "{:?}", String::from_utf8_lossy(input));
        }
        assert_eq!(run(b"*1\r\n$65536\r\n").0, Parsed::Incomplete);
    }

    #[test]
    fn inline_requests() {
        assert_eq!(run(b"PING\r\n"), (Parsed::Command { argc: 1, consumed: 6 }, strs(&["PING"])));
        assert_eq!(run(b"PING\n").0, Parsed::Command { argc: 1, consumed: 5 });
        assert_eq!(run(b"  set  a \t b  \r\n").1, strs(&["set", "a", "b"]));
        assert_eq!(run(b"PING").0, Parsed::Incomplete);
        assert_eq!(run(b"\r\n").0, Parsed::Empty(2));
        assert_eq!(run(b"   \n").0, Parsed::Empty(4));
        assert_eq!(run(b"set k \"a b\\n\\x41\\\"\"\r\n").1, vec![b"set".to_vec(), b"k".to_vec(), b"a b\nA\"".to_vec()]);
        assert_eq!(run(b"set k 'it\\'s'\n").1, strs(&["set", "k", "it's"]));
        assert_eq!(run(b"set \"\" ''\n").1, strs(&["set", "", ""]));
        assert_eq!(run(b"set \"abc\n").0, Parsed::Error(ProtoError::UnbalancedQuotes));
        assert_eq!(run(b"set \"abc\"x\n").0, Parsed::Error(ProtoError::UnbalancedQuotes));
        assert_eq!(run(b"set 'abc\n").0, Parsed::Error(ProtoError::UnbalancedQuotes));
        assert_eq!(run(&vec![b'a'; MAX_INLINE]).0, Parsed::Incomplete);
        assert_eq!(run(&vec![b'a'; MAX_INLINE + 1]).0, Parsed::Error(ProtoError::TooBigInline));
        let many = "a ".repeat(MAX_ARGS + 1) + "\n";
        assert_eq!(run(many.as_bytes()).0, Parsed::Error(ProtoError::InvalidMultibulkLength));
    }

    #[test]
    fn never_panics_on_noise() {
        let mut x = 99u64;
        let alphabet = b"*$\r\n0123456789-x \"'\\";
        for _ in 0..20_000 {
            let mut v = Vec::new();
            for _ in 0..(x % 40) {
                x = crate::store::mix(x.wrapping_add(crate::store::GOLDEN));
                v.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            x = crate::store::mix(x.wrapping_add(1));
            let (p, _) = run(&v);
            if let Parsed::Command { consumed, .. } | Parsed::Empty(consumed) = p {
                assert!(consumed > 0 && consumed <= v.len());
            }
        }
    }
}
