//! One connection's request/reply pipeline and the commands.
//!
//! A connection owns a linear input buffer (bytes received, not yet parsed)
//! and a linear output buffer (replies not yet handed to TCP). `process`
//! parses and executes requests in order while the output buffer has room for
//! any reply (`RESERVE`), so pipelined requests are answered in order and a
//! slow reader only stalls its own connection. Replies are formatted as
//! Redis formats them, without `core::fmt` and without allocating.

use crate::num::{hex16, write_i64, write_u64};
use crate::resp::{self, Parsed, ProtoError, MAX_BULK};
use crate::store::{IncrError, Oom, Store};

/// Room kept free in the output buffer before a request is executed: the
/// largest reply other than `MGET`'s (a `MAX_BULK` value, or an error quoting
/// arguments, or `INFO`).
pub const RESERVE: usize = MAX_BULK + 2048;
/// The output buffer must hold at least this.
pub const MIN_OUT: usize = 2 * RESERVE;
/// The input buffer must hold at least one request with a `MAX_BULK` value.
pub const MIN_IN: usize = MAX_BULK + 1024;

const OOM: &[u8] = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n";
const NOT_INT: &[u8] = b"-ERR value is not an integer or out of range\r\n";
const OVERFLOW: &[u8] = b"-ERR increment or decrement would overflow\r\n";
const SYNTAX: &[u8] = b"-ERR syntax error\r\n";

/// What all connections share.
pub struct Server<'a> {
    pub store: Store,
    /// Scratch for argument spans (at least `resp::MAX_ARGS`).
    pub args: &'a mut [(u32, u32)],
    pub commands: u64,
    pub connections: u64,
    pub clients: u64,
    pub port: u16,
    /// Bytes of guest memory the store may use (its arena), for `INFO`.
    pub arena_size: u64,
}

/// Appends to the output buffer; never panics (an overflow drops bytes and is
/// counted, which `RESERVE` keeps from happening).
struct Out<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Out<'_> {
    #[inline]
    fn put(&mut self, b: &[u8]) {
        if let Some(dst) = self.buf.get_mut(self.len..self.len + b.len()) {
            dst.copy_from_slice(b);
            self.len += b.len();
        }
    }
    fn free(&self) -> usize {
        self.buf.len() - self.len
    }
    fn uint(&mut self, v: u64) {
        let mut d = [0u8; 20];
        let n = write_u64(&mut d, v);
        self.put(&d[..n]);
    }
    fn int_reply(&mut self, v: i64) {
        let mut d = [0u8; 20];
        let n = write_i64(&mut d, v);
        self.put(b":");
        self.put(&d[..n]);
        self.put(b"\r\n");
    }
    fn count_reply(&mut self, prefix: u8, v: u64) {
        self.put(&[prefix]);
        self.uint(v);
        self.put(b"\r\n");
    }
    fn bulk(&mut self, v: &[u8]) {
        self.count_reply(b'$', v.len() as u64);
        self.put(v);
        self.put(b"\r\n");
    }
    fn opt_bulk(&mut self, v: Option<&[u8]>) {
        match v {
            Some(v) => self.bulk(v),
            None => self.put(b"$-1\r\n"),
        }
    }
    /// Bytes of an error message: no CR/LF (they would end the reply line).
    fn sanitized(&mut self, s: &[u8], max: usize) {
        for &b in s.iter().take(max) {
            self.put(&[if b == b'\r' || b == b'\n' { b' ' } else { b }]);
        }
    }
    fn wrong_args(&mut self, lower_name: &[u8]) {
        self.put(b"-ERR wrong number of arguments for '");
        self.put(lower_name);
        self.put(b"' command\r\n");
    }
}

#[inline]
fn eq_ic(a: &[u8], lower: &[u8]) -> bool {
    a.len() == lower.len() && a.iter().zip(lower).all(|(x, y)| x.to_ascii_lowercase() == *y)
}

/// The size of a bulk reply of `n` bytes.
fn bulk_size(n: usize) -> usize {
    let mut digits = 1;
    let mut v = n;
    while v >= 10 {
        v /= 10;
        digits += 1;
    }
    1 + digits + 2 + n + 2
}

/// The outcome of executing one request.
enum Exec {
    Done,
    /// Not executed: the reply needs more output room than is free now.
    Wait,
    /// Executed; close the connection once the reply is sent.
    Close,
}

/// A connection's buffers and state.
pub struct Conn<'a> {
    inb: &'a mut [u8],
    in_len: usize,
    out: &'a mut [u8],
    out_pos: usize,
    out_len: usize,
    closing: bool,
}

impl<'a> Conn<'a> {
    /// `inb` must hold `MIN_IN` bytes and `out` `MIN_OUT`.
    pub fn new(inb: &'a mut [u8], out: &'a mut [u8]) -> Self {
        Conn { inb, in_len: 0, out, out_pos: 0, out_len: 0, closing: false }
    }

    /// Forgets the previous connection's state.
    pub fn reset(&mut self) {
        self.in_len = 0;
        self.out_pos = 0;
        self.out_len = 0;
        self.closing = false;
    }

    /// The connection is to be closed once its output is sent; input is ignored.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Where received bytes go (empty when full or closing).
    pub fn rx_space(&mut self) -> &mut [u8] {
        if self.closing {
            return &mut [];
        }
        &mut self.inb[self.in_len..]
    }

    pub fn rx_commit(&mut self, n: usize) {
        self.in_len = (self.in_len + n).min(self.inb.len());
    }

    /// Whether unparsed input is waiting.
    pub fn has_input(&self) -> bool {
        self.in_len > 0 && !self.closing
    }

    /// Replies not yet sent.
    pub fn tx_pending(&self) -> &[u8] {
        &self.out[self.out_pos..self.out_len]
    }

    pub fn tx_commit(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out_len);
        if self.out_pos == self.out_len {
            self.out_pos = 0;
            self.out_len = 0;
        }
    }

    /// Parses and executes the buffered requests while the output has room.
    /// `uptime` is in seconds. Returns whether anything was consumed or replied.
    pub fn process(&mut self, srv: &mut Server, uptime: u64) -> bool {
        if self.closing || self.in_len == 0 {
            return false;
        }
        if self.out_pos > 0 {
            self.out.copy_within(self.out_pos..self.out_len, 0);
            self.out_len -= self.out_pos;
            self.out_pos = 0;
        }
        let start_out = self.out_len;
        let mut pos = 0;
        while pos < self.in_len {
            if self.out.len() - self.out_len < RESERVE {
                break;
            }
            let req = &mut self.inb[pos..self.in_len];
            let mut out = Out { buf: &mut *self.out, len: self.out_len };
            match resp::parse(req, srv.args) {
                Parsed::Incomplete => {
                    if pos == 0 && self.in_len == self.inb.len() {
                        protocol_error(&mut out, ProtoError::TooBigRequest);
                        self.out_len = out.len;
                        self.closing = true;
                    }
                    break;
                }
                Parsed::Empty(n) => pos += n,
                Parsed::Error(e) => {
                    protocol_error(&mut out, e);
                    self.out_len = out.len;
                    self.closing = true;
                    break;
                }
                Parsed::Command { argc, consumed } => {
                    let req = &req[..consumed];
                    let args = &srv.args[..argc];
                    let arg = |i: usize| {
                        let (o, l) = args[i];
                        req.get(o as usize..(o + l) as usize).unwrap_or(&[])
                    };
                    let parts = Parts {
                        store: &mut srv.store,
                        commands: &mut srv.commands,
                        connections: srv.connections,
                        clients: srv.clients,
                        port: srv.port,
                        arena_size: srv.arena_size,
                    };
                    let r = execute(&mut out, parts, argc, arg, uptime);
                    self.out_len = out.len;
                    match r {
                        Exec::Done => pos += consumed,
                        Exec::Wait => break,
                        Exec::Close => {
                            pos += consumed;
                            self.closing = true;
                            break;
                        }
                    }
                }
            }
        }
        if self.closing {
            self.in_len = 0;
        } else if pos > 0 {
            self.inb.copy_within(pos..self.in_len, 0);
            self.in_len -= pos;
        }
        pos > 0 || self.out_len != start_out
    }
}

fn protocol_error(out: &mut Out, e: ProtoError) {
    out.put(b"-ERR Protocol error: ");
    out.put(e.message());
    if let ProtoError::ExpectedDollar(b) = e {
        out.sanitized(&[b], 1);
        out.put(b"'");
    }
    out.put(b"\r\n");
}

/// The server state `execute` needs (everything but the argument scratch).
struct Parts<'s> {
    store: &'s mut Store,
    commands: &'s mut u64,
    connections: u64,
    clients: u64,
    port: u16,
    arena_size: u64,
}

fn execute<'r>(out: &mut Out, p: Parts, argc: usize, arg: impl Fn(usize) -> &'r [u8], uptime: u64) -> Exec {
    let name = arg(0);
    let store = p.store;
    *p.commands += 1;
    // Dispatch on the length first: one comparison for most requests.
    match name.len() {
        3 if eq_ic(name, b"get") => {
            if argc != 2 {
                out.wrong_args(b"get");
            } else {
                out.opt_bulk(store.get(arg(1)));
            }
        }
        3 if eq_ic(name, b"set") => {
            if argc < 3 {
                out.wrong_args(b"set");
            } else if argc > 3 {
                out.put(SYNTAX);
            } else {
                match store.set(arg(1), arg(2)) {
                    Ok(()) => out.put(b"+OK\r\n"),
                    Err(Oom) => out.put(OOM),
                }
            }
        }
        3 if eq_ic(name, b"del") => {
            if argc < 2 {
                out.wrong_args(b"del");
            } else {
                let n = (1..argc).filter(|&i| store.del(arg(i))).count();
                out.count_reply(b':', n as u64);
            }
        }
        4 if eq_ic(name, b"incr") => {
            if argc != 2 {
                out.wrong_args(b"incr");
            } else {
                match store.incr(arg(1)) {
                    Ok(v) => out.int_reply(v),
                    Err(IncrError::NotInteger) => out.put(NOT_INT),
                    Err(IncrError::Overflow) => out.put(OVERFLOW),
                    Err(IncrError::Oom) => out.put(OOM),
                }
            }
        }
        4 if eq_ic(name, b"ping") => match argc {
            1 => out.put(b"+PONG\r\n"),
            2 => out.bulk(arg(1)),
            _ => out.wrong_args(b"ping"),
        },
        4 if eq_ic(name, b"mset") => {
            if argc < 3 || argc.is_multiple_of(2) {
                out.wrong_args(b"mset");
            } else {
                // All or nothing against the bound: the sum of each pair's growth
                // is at least the real growth, whatever repeats.
                let growth =
                    (1..argc).step_by(2).fold(0u64, |g, i| g.saturating_add(store.growth(arg(i), arg(i + 1).len())));
                if !store.fits(growth) {
                    out.put(OOM);
                } else if (1..argc).step_by(2).all(|i| store.set(arg(i), arg(i + 1)).is_ok()) {
                    out.put(b"+OK\r\n");
                } else {
                    // Only when guest memory itself ran out (the bound held).
                    out.put(OOM);
                }
            }
        }
        4 if eq_ic(name, b"mget") => {
            if argc < 2 {
                out.wrong_args(b"mget");
            } else {
                let size = 24 + (1..argc).map(|i| store.value_len(arg(i)).map_or(5, bulk_size)).sum::<usize>();
                if size > out.free() {
                    if out.len > 0 {
                        *p.commands -= 1;
                        return Exec::Wait;
                    }
                    out.put(b"-ERR reply too large for this server's output buffer\r\n");
                } else {
                    out.count_reply(b'*', (argc - 1) as u64);
                    for i in 1..argc {
                        out.opt_bulk(store.get(arg(i)));
                    }
                }
            }
        }
        4 if eq_ic(name, b"echo") => {
            if argc != 2 {
                out.wrong_args(b"echo");
            } else {
                out.bulk(arg(1));
            }
        }
        4 if eq_ic(name, b"info") => {
            info(out, &p_info(store, uptime, p.connections, *p.commands, p.clients, p.port, p.arena_size))
        }
        4 if eq_ic(name, b"quit") => {
            out.put(b"+OK\r\n");
            return Exec::Close;
        }
        6 if eq_ic(name, b"exists") => {
            if argc < 2 {
                out.wrong_args(b"exists");
            } else {
                let n = (1..argc).filter(|&i| store.exists(arg(i))).count();
                out.count_reply(b':', n as u64);
            }
        }
        6 if eq_ic(name, b"dbsize") => {
            if argc != 1 {
                out.wrong_args(b"dbsize");
            } else {
                out.count_reply(b':', store.len() as u64);
            }
        }
        6 if eq_ic(name, b"config") => {
            if argc < 2 {
                out.wrong_args(b"config");
            } else if eq_ic(arg(1), b"get") {
                if argc < 3 {
                    out.wrong_args(b"config|get");
                } else {
                    out.put(b"*0\r\n");
                }
            } else if eq_ic(arg(1), b"resetstat") {
                out.put(b"+OK\r\n");
            } else {
                out.put(b"-ERR unknown subcommand '");
                out.sanitized(arg(1), 128);
                out.put(b"'. Try CONFIG HELP.\r\n");
            }
        }
        6 if eq_ic(name, b"select") => {
            if argc != 2 {
                out.wrong_args(b"select");
            } else if arg(1) == b"0" {
                out.put(b"+OK\r\n");
            } else {
                out.put(b"-ERR DB index is out of range\r\n");
            }
        }
        7 if eq_ic(name, b"command") => out.put(b"*0\r\n"),
        7 | 8 if eq_ic(name, b"flushall") || eq_ic(name, b"flushdb") => {
            if argc > 2 || (argc == 2 && !eq_ic(arg(1), b"sync") && !eq_ic(arg(1), b"async")) {
                out.put(SYNTAX);
            } else {
                store.flush();
                out.put(b"+OK\r\n");
            }
        }
        11 if eq_ic(name, b"pcft.digest") => {
            if argc != 1 {
                out.wrong_args(b"pcft.digest");
            } else {
                out.bulk(&hex16(store.digest()));
            }
        }
        _ => {
            *p.commands -= 1;
            // Redis 7: the name and the first arguments, quoted, up to ~128 bytes.
            out.put(b"-ERR unknown command '");
            out.sanitized(name, 128);
            out.put(b"', with args beginning with: ");
            let mut used = 0;
            for i in 1..argc {
                if used >= 128 {
                    break;
                }
                let a = arg(i);
                let take = a.len().min(128 - used);
                out.put(b"'");
                out.sanitized(a, take);
                out.put(b"' ");
                used += take + 3;
            }
            out.put(b"\r\n");
        }
    }
    Exec::Done
}

struct InfoFields {
    uptime: u64,
    connections: u64,
    commands: u64,
    clients: u64,
    port: u16,
    keys: u64,
    bytes: u64,
    max_bytes: u64,
    used_memory: u64,
    arena_size: u64,
}

fn p_info(
    store: &Store,
    uptime: u64,
    connections: u64,
    commands: u64,
    clients: u64,
    port: u16,
    arena_size: u64,
) -> InfoFields {
    InfoFields {
        uptime,
        connections,
        commands,
        clients,
        port,
        keys: store.len() as u64,
        bytes: store.bytes(),
        max_bytes: store.max_bytes(),
        used_memory: store.arena_bytes() as u64,
        arena_size,
    }
}

/// `INFO`: Redis's sections and field names for what this server has.
fn info(out: &mut Out, f: &InfoFields) {
    // The body goes after a placeholder header "$00000\r\n" (it is far below
    // 10^5 bytes); then the header gets the real length and the body moves
    // left by the digits the length does not need.
    let header_at = out.len;
    out.put(b"$00000\r\n");
    let body_at = out.len;
    let lines: [(&[u8], Option<u64>); 12] = [
        (b"# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nos:PostCopyFT kv guest (smoltcp, virtio-net)\r\narch_bits:64\r\ntcp_port:", Some(u64::from(f.port))),
        (b"\r\nuptime_in_seconds:", Some(f.uptime)),
        (b"\r\nuptime_in_days:", Some(f.uptime / 86400)),
        (b"\r\n\r\n# Clients\r\nconnected_clients:", Some(f.clients)),
        (b"\r\n\r\n# Memory\r\nused_memory:", Some(f.used_memory)),
        (b"\r\nused_memory_dataset:", Some(f.bytes)),
        (b"\r\nmaxmemory:", Some(f.max_bytes)),
        (b"\r\nmaxmemory_policy:noeviction", None),
        (b"\r\ntotal_system_memory:", Some(f.arena_size)),
        (b"\r\n\r\n# Stats\r\ntotal_connections_received:", Some(f.connections)),
        (b"\r\ntotal_commands_processed:", Some(f.commands)),
        (b"\r\n\r\n# Keyspace\r\nkeys:", Some(f.keys)),
    ];
    for (text, value) in lines {
        out.put(text);
        if let Some(v) = value {
            out.uint(v);
        }
    }
    if f.keys > 0 {
        out.put(b"\r\ndb0:keys=");
        out.uint(f.keys);
        out.put(b",expires=0,avg_ttl=0");
    }
    out.put(b"\r\n");
    let body = out.len - body_at;
    let mut d = [0u8; 20];
    let n = write_u64(&mut d, body as u64);
    let shift = 5 - n.min(5);
    // New header: "$" + digits + "\r\n", `shift` bytes shorter.
    out.buf.copy_within(body_at..body_at + body, body_at - shift);
    out.buf[header_at + 1..header_at + 1 + n].copy_from_slice(&d[..n]);
    out.buf[header_at + 1 + n] = b'\r';
    out.buf[header_at + 2 + n] = b'\n';
    out.len -= shift;
    out.put(b"\r\n");
}

#[cfg(test)]
mod tests;
