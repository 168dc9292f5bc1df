use super::*;
use crate::resp::MAX_ARGS;

struct Harness {
    _mem: Vec<u64>,
    srv: Server<'static>,
    conn: Conn<'static>,
}

fn harness(max_bytes: u64) -> Harness {
    let mut mem = vec![0u64; 1 << 19];
    let base = mem.as_mut_ptr() as usize;
    let store = unsafe { Store::new(base, base + mem.len() * 8, max_bytes).unwrap() };
    let args = Box::leak(vec![(0u32, 0u32); MAX_ARGS].into_boxed_slice());
    let inb = Box::leak(vec![0u8; MIN_IN].into_boxed_slice());
    let out = Box::leak(vec![0u8; MIN_OUT].into_boxed_slice());
    Harness {
        _mem: mem,
        srv: Server { store, args, commands: 0, connections: 1, clients: 1, port: 6379, arena_size: 4 << 20 },
        conn: Conn::new(inb, out),
    }
}

impl Harness {
    /// Feeds `input` in chunks of `chunk` bytes, draining all output; returns it.
    fn feed_chunked(&mut self, input: &[u8], chunk: usize) -> Vec<u8> {
        let mut reply = Vec::new();
        let mut rest = input;
        loop {
            let space = self.conn.rx_space();
            let n = rest.len().min(chunk).min(space.len());
            space[..n].copy_from_slice(&rest[..n]);
            self.conn.rx_commit(n);
            rest = &rest[n..];
            self.conn.process(&mut self.srv, 7);
            let out = self.conn.tx_pending().to_vec();
            self.conn.tx_commit(out.len());
            reply.extend_from_slice(&out);
            if n == 0 && out.is_empty() {
                return reply;
            }
        }
    }

    fn feed(&mut self, input: &[u8]) -> Vec<u8> {
        self.feed_chunked(input, usize::MAX)
    }

    fn cmd(&mut self, args: &[&[u8]]) -> String {
        String::from_utf8_lossy(&self.feed(&encode(args))).into_owned()
    }
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

#[test]
fn basic_commands_reply_as_redis() {
    let mut h = harness(1 << 20);
    assert_eq!(h.cmd(&[b"PING"]), "+PONG\r\n");
    assert_eq!(h.cmd(&[b"ping", b"hi there"]), "$8\r\nhi there\r\n");
    assert_eq!(h.cmd(&[b"ping", b"a", b"b"]), "-ERR wrong number of arguments for 'ping' command\r\n");
    assert_eq!(h.cmd(&[b"SET", b"key", b"value"]), "+OK\r\n");
    assert_eq!(h.cmd(&[b"get", b"key"]), "$5\r\nvalue\r\n");
    assert_eq!(h.cmd(&[b"GeT", b"nokey"]), "$-1\r\n");
    assert_eq!(h.cmd(&[b"PCFT.DIGEST"]), "$16\r\n98a8619112fac85a\r\n");
    assert_eq!(h.cmd(&[b"set", b"k"]), "-ERR wrong number of arguments for 'set' command\r\n");
    assert_eq!(h.cmd(&[b"set", b"k", b"v", b"NX"]), "-ERR syntax error\r\n");
    assert_eq!(h.cmd(&[b"INCR", b"n"]), ":1\r\n");
    assert_eq!(h.cmd(&[b"incr", b"n"]), ":2\r\n");
    assert_eq!(h.cmd(&[b"incr", b"key"]), "-ERR value is not an integer or out of range\r\n");
    assert_eq!(h.cmd(&[b"set", b"big", b"9223372036854775807"]), "+OK\r\n");
    assert_eq!(h.cmd(&[b"incr", b"big"]), "-ERR increment or decrement would overflow\r\n");
    assert_eq!(h.cmd(&[b"set", b"neg", b"-5"]), "+OK\r\n");
    assert_eq!(h.cmd(&[b"incr", b"neg"]), ":-4\r\n");
    assert_eq!(h.cmd(&[b"EXISTS", b"key", b"n", b"nokey", b"key"]), ":3\r\n");
    assert_eq!(h.cmd(&[b"dbsize"]), ":4\r\n");
    assert_eq!(h.cmd(&[b"MSET", b"a", b"1", b"b", b"2"]), "+OK\r\n");
    assert_eq!(h.cmd(&[b"mset", b"a", b"1", b"b"]), "-ERR wrong number of arguments for 'mset' command\r\n");
    assert_eq!(h.cmd(&[b"MGET", b"a", b"x", b"b"]), "*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n");
    assert_eq!(h.cmd(&[b"DEL", b"a", b"b", b"x", b"a"]), ":2\r\n");
    assert_eq!(h.cmd(&[b"CONFIG", b"GET", b"save"]), "*0\r\n");
    assert_eq!(h.cmd(&[b"config", b"get", b"*"]), "*0\r\n");
    assert_eq!(h.cmd(&[b"COMMAND"]), "*0\r\n");
    assert_eq!(h.cmd(&[b"COMMAND", b"DOCS"]), "*0\r\n");
    assert_eq!(h.cmd(&[b"echo", b""]), "$0\r\n\r\n");
    assert_eq!(h.cmd(&[b"select", b"0"]), "+OK\r\n");
    assert_eq!(
        h.cmd(&[b"foo", b"a\r\nb", b"c"]),
        "-ERR unknown command 'foo', with args beginning with: 'a  b' 'c' \r\n"
    );
    assert!(h.cmd(&[b"nosuch"]).starts_with("-ERR unknown command 'nosuch'"));
    assert_eq!(h.cmd(&[b"FLUSHALL"]), "+OK\r\n");
    assert_eq!(h.cmd(&[b"dbsize"]), ":0\r\n");
    assert_eq!(h.cmd(&[b"PCFT.DIGEST"]), "$16\r\n0000000000000000\r\n");
    assert_eq!(h.cmd(&[b"get", b"key"]), "$-1\r\n");
}

#[test]
fn info_is_a_well_formed_bulk() {
    let mut h = harness(1 << 20);
    h.cmd(&[b"set", b"a", b"b"]);
    let r = h.cmd(&[b"INFO"]);
    let (head, body) = r.split_once("\r\n").unwrap();
    let len: usize = head.strip_prefix('$').unwrap().parse().unwrap();
    assert_eq!(body.len(), len + 2, "{r:?}");
    assert!(body.ends_with("\r\n"));
    for needle in [
        "# Server\r\n",
        "# Stats\r\n",
        "# Keyspace\r\n",
        "\r\nkeys:1\r\n",
        "uptime_in_seconds:7\r\n",
        "total_commands_processed:2\r\n",
        "db0:keys=1,expires=0,avg_ttl=0",
    ] {
        assert!(body.contains(needle), "{needle:?} in {body}");
    }
}

#[test]
fn inline_and_pipelined_requests_answer_in_order() {
    let mut h = harness(1 << 20);
    assert_eq!(h.feed(b"PING\r\n"), b"+PONG\r\n");
    assert_eq!(h.feed(b"set x 10\nincr x\r\nget x\r\n\r\n"), b"+OK\r\n:11\r\n$2\r\n11\r\n");
    let mut pipeline = Vec::new();
    let mut expected = Vec::new();
    for i in 0..500 {
        pipeline.extend(encode(&[b"SET", format!("k{i}").as_bytes(), b"v"]));
        pipeline.extend(encode(&[b"INCR", b"c"]));
        expected.extend_from_slice(b"+OK\r\n");
        expected.extend_from_slice(format!(":{}\r\n", i + 1).as_bytes());
    }
    for chunk in [1, 7, 1460, usize::MAX] {
        h.cmd(&[b"flushall"]);
        assert_eq!(h.feed_chunked(&pipeline, chunk), expected, "chunk {chunk}");
    }
}

#[test]
fn big_values_and_reply_backpressure() {
    let mut h = harness(1 << 22);
    let v = vec![b'z'; MAX_BULK];
    assert_eq!(h.cmd(&[b"set", b"big", &v]), "+OK\r\n");
    // Many pipelined GETs of the biggest value: all answered, in order.
    let mut req = Vec::new();
    for _ in 0..5 {
        req.extend(encode(&[b"get", b"big"]));
    }
    let mut expected = Vec::new();
    for _ in 0..5 {
        expected.extend(format!("${}\r\n", v.len()).as_bytes());
        expected.extend(&v);
        expected.extend(b"\r\n");
    }
    let got = h.feed(&req);
    assert!(got == expected, "{} bytes, expected {}", got.len(), expected.len());
    // MGET bigger than the output buffer: an error, not a crash.
    let r = h.cmd(&[b"mget", b"big", b"big", b"big"]);
    assert!(r.starts_with("-ERR reply too large"), "{r}");
    assert_eq!(h.cmd(&[b"ping"]), "+PONG\r\n");
}

#[test]
fn store_bound_replies_oom() {
    let mut h = harness(30);
    assert_eq!(h.cmd(&[b"set", b"k1", b"0123456789"]), "+OK\r\n");
    assert_eq!(h.cmd(&[b"set", b"k2", b"0123456789"]), "+OK\r\n");
    let oom = "-OOM command not allowed when used memory > 'maxmemory'.\r\n";
    assert_eq!(h.cmd(&[b"set", b"k3", b"0123456789"]), oom);
    assert_eq!(h.cmd(&[b"mset", b"k3", b"0", b"k4", b"0123456"]), oom);
    assert_eq!(h.cmd(&[b"exists", b"k3", b"k4"]), ":0\r\n");
    assert_eq!(h.cmd(&[b"mset", b"k3", b"0", b"k4", b"0"]), "+OK\r\n");
    assert_eq!(h.cmd(&[b"incr", b"k5"]), oom);
    assert_eq!(h.cmd(&[b"incr", b"k3"]), ":1\r\n");
    assert_eq!(h.cmd(&[b"dbsize"]), ":4\r\n");
    assert_eq!(h.cmd(&[b"del", b"k1"]), ":1\r\n");
    assert_eq!(h.cmd(&[b"incr", b"k5"]), ":1\r\n");
}

#[test]
fn malformed_requests_get_a_protocol_error_and_close() {
    let cases: [(&[u8], &str); 8] = [
        (b"*x\r\n", "-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*1\r\n$-3\r\n", "-ERR Protocol error: invalid bulk length\r\n"),
        (b"*1\r\n$abc\r\n", "-ERR Protocol error: invalid bulk length\r\n"),
        (b"*2\r\n$3\r\nGET\r\n+x\r\n", "-ERR Protocol error: expected '$', got '+'\r\n"),
        (b"*1\r\n$4\r\nPINGxx", "-ERR Protocol error: expected CRLF after bulk data\r\n"),
        (b"*1000000\r\n", "-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*1\r\n$99999999999\r\n", "-ERR Protocol error: invalid bulk length\r\n"),
        (b"PING \"abc\r\n", "-ERR Protocol error: unbalanced quotes in request\r\n"),
    ];
    for (input, expected) in cases {
        let mut h = harness(1 << 20);
        // A good request first: it is answered before the error.
        let mut all = b"PING\r\n".to_vec();
        all.extend_from_slice(input);
        all.extend_from_slice(b"PING\r\n");
        let r = h.feed(&all);
        assert_eq!(String::from_utf8_lossy(&r), format!("+PONG\r\n{expected}"));
        assert!(h.conn.closing());
        assert!(h.conn.rx_space().is_empty());
        h.conn.reset();
        assert_eq!(h.feed(b"PING\r\n"), b"+PONG\r\n");
    }
}

#[test]
fn request_bigger_than_the_input_buffer_errors() {
    let mut h = harness(1 << 24);
    // Ten 60 KiB values in one MSET: each bulk is legal, the whole is not.
    let v = vec![b'v'; 60 * 1024];
    let mut args: Vec<&[u8]> = vec![b"mset"];
    for _ in 0..10 {
        args.push(b"k");
        args.push(&v);
    }
    let r = h.feed_chunked(&encode(&args), 1460);
    assert_eq!(String::from_utf8_lossy(&r), "-ERR Protocol error: request bigger than the input buffer\r\n");
    assert!(h.conn.closing());
    // And an inline line without end.
    let mut h = harness(1 << 20);
    let r = h.feed_chunked(&vec![b'a'; MIN_IN + 10], 1000);
    assert!(String::from_utf8_lossy(&r).starts_with("-ERR Protocol error: "), "{r:?}");
}
