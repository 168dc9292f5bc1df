//! The kv demo's clients: connections to the serving VM from the client
//! namespace of the testbed, each a thread that sends a mix of `SET`, `INCR`
//! and `GET` on keys of its own for the whole run, one request at a time, and
//! records every operation (what it sent, what came back, when). A broken
//! connection (an error or no answer within `ANSWER_TIMEOUT`) is aborted with
//! a TCP reset and made again; the operation it carried stays in doubt.
//!
//! At the end the store is read back (every key the clients touched, and its
//! digest) and the history checked (`vm_fixtures::kv::history`): no
//! acknowledged write lost, no stale read, and a store that holds nothing
//! else.

use crate::cli::netns::enter_netns;
use crate::cli::{run_failure, Failure};
use anyhow::anyhow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_fixtures::kv;
use vm_fixtures::kv::history::{self, Answer, Findings, Op, Request};
use vm_fixtures::kv::resp::{Client, Reply};

/// How long a client waits for an answer before it gives the connection up:
/// longer than a failover, so a connection can ride one out on TCP's retransmissions.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Register keys per connection (each client also has one counter).
const REGISTERS: u64 = 8;

/// The running clients.
pub struct Clients {
    stop: Arc<AtomicBool>,
    /// Answers received so far, by all connections.
    answered: Arc<AtomicU64>,
    threads: Vec<JoinHandle<ConnectionLog>>,
    ns: String,
    guest: SocketAddr,
    /// When the clients started (the history's times count from it).
    t0: Instant,
}

/// What one connection did.
#[derive(Default)]
struct ConnectionLog {
    ops: Vec<Op>,
    /// Connections made again after the first (each after a broken one).
    reconnects: u32,
    /// Why it could not start (e.g. the namespace could not be entered).
    error: Option<String>,
}

impl ConnectionLog {
    /// Whether the connection carried on to the end: never made again, its last request answered.
    fn survived(&self) -> bool {
        let last_answered = self.ops.last().is_some_and(|op| !matches!(op.answer, Answer::Indeterminate(_)));
        self.error.is_none() && self.reconnects == 0 && last_answered
    }
}

/// Percentiles of the time from a request to its answer, in ms (None: no answer).
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Latency {
    /// Of the answered operations among `ops`.
    fn of<'a>(ops: impl Iterator<Item = &'a Op>) -> Latency {
        let mut ms: Vec<f64> = ops
            .filter(|op| !matches!(op.answer, Answer::Indeterminate(_)))
            .map(|op| (op.completed - op.invoked).as_secs_f64() * 1e3)
            .collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms.get(((ms.len().max(1) - 1) as f64 * q).round() as usize).copied();
        Latency { p50_ms: at(0.5), p99_ms: at(0.99) }
    }
}

/// What the clients saw, and what the check found.
pub struct ClientReport {
    pub connections: u32,
    pub reconnects: u32,
    /// Connections that never broke.
    pub connections_survived: u32,
    pub findings: Findings,
    /// The longest time no client got an answer.
    pub max_gap: Duration,
    /// How long answers took: over the whole run, and for requests sent while the VM migrated.
    pub latency: Latency,
    pub latency_migrating: Latency,
    /// The store's digest (`PCFT.DIGEST`) at the end, and whether it is that of the values read.
    pub store_digest: Option<String>,
    pub digest_matches: bool,
    /// Why the store could not be read at the end (the VM does not serve), or a client failed.
    pub error: Option<String>,
}

impl ClientReport {
    /// Why the clients' history does not hold, in words (None if it holds:
    /// consistent, the store read at the end, and nothing else in it).
    pub fn problem(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        let f = &self.findings;
        if !f.consistent() {
            return Some(format!(
                "the clients' history is inconsistent: {} acknowledged write(s) lost, {} stale read(s), {} \
                 unexplained read(s), e.g. {}",
                f.acked_writes_lost,
                f.stale_reads,
                f.unexplained_reads,
                f.examples.join("; ")
            ));
        }
        (!self.digest_matches).then(|| {
            format!(
                "the store's digest {} is not that of the values the clients read back: it holds writes no client made",
                self.store_digest.as_deref().unwrap_or("?")
            )
        })
    }
}

impl Clients {
    /// Starts `connections` clients in namespace `ns`, each connecting to
    /// `guest` (again and again until the VM serves).
    pub fn start(ns: &str, guest: SocketAddr, connections: u32) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let threads = (0..connections)
            .map(|id| {
                let worker = Worker {
                    id,
                    guest,
                    stop: Arc::clone(&stop),
                    answered: Arc::clone(&answered),
                    t0,
                    seq: 0,
                    rng: 0x9e37_79b9_7f4a_7c15 ^ (u64::from(id) + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
                };
                let ns = ns.to_string();
                std::thread::spawn(move || match enter_netns(&ns) {
                    Ok(()) => worker.run(),
                    Err(e) => ConnectionLog { error: Some(format!("{e:#}")), ..ConnectionLog::default() },
                })
            })
            .collect();
        Clients { stop, answered, threads, ns: ns.to_string(), guest, t0 }
    }

    /// Answers received so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Waits until the clients have `n` answers (the VM serves them), `patience` at most.
    pub async fn wait_serving(&self, n: u64, patience: Duration) -> Result<(), Failure> {
        let deadline = Instant::now() + patience;
        while self.answered() < n {
            if Instant::now() > deadline || self.threads.iter().all(|t| t.is_finished()) {
                return Err(run_failure(anyhow!(
                    "the kv VM did not serve its clients at {} within {patience:?} ({} answers)",
                    self.guest,
                    self.answered()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stops the clients, reads the store back and checks the history (with
    /// the latencies of requests sent within the migration's `window`).
    pub fn finish(self, window: Option<(Instant, Instant)>) -> ClientReport {
        self.stop.store(true, Ordering::Relaxed);
        let stopped = self.t0.elapsed();
        let logs: Vec<ConnectionLog> = self.threads.into_iter().map(|t| t.join().unwrap_or_default()).collect();
        let connections = logs.len() as u32;
        let reconnects = logs.iter().map(|l| l.reconnects).sum();
        let connections_survived = logs.iter().filter(|l| l.survived()).count() as u32;
        let client_error = logs.iter().find_map(|l| l.error.clone());
        let history: Vec<Op> = logs.into_iter().flat_map(|l| l.ops).collect();
        let keys: Vec<String> = {
            let mut keys: Vec<String> = history.iter().map(|op| op.key.clone()).collect();
            keys.sort_unstable();
            keys.dedup();
            keys
        };
        let (ns, guest) = (self.ns.clone(), self.guest);
        let read = std::thread::spawn(move || -> Result<StoreState, String> {
            enter_netns(&ns).map_err(|e| format!("{e:#}"))?;
            read_store(guest, &keys)
        })
        .join()
        .unwrap_or_else(|_| Err("the reading client panicked".into()));
        let max_gap = history::longest_gap(&history, stopped);
        let latency = Latency::of(history.iter());
        let in_window = |op: &&Op| {
            window.is_some_and(|(from, to)| {
                let (from, to) = (from.saturating_duration_since(self.t0), to.saturating_duration_since(self.t0));
                op.invoked >= from && op.invoked < to
            })
        };
        let latency_migrating = Latency::of(history.iter().filter(in_window));
        let (finals, store_digest, error) = match read {
            Ok(state) => (state.values, Some(state.digest), client_error),
            Err(e) => (BTreeMap::new(), None, Some(e)),
        };
        let findings = history::check(&history, &finals);
        let read_digest = format!(
            "{:016x}",
            kv::store_digest(finals.iter().filter_map(|(k, v)| v.as_ref().map(|v| (k.as_bytes(), v.as_bytes()))))
        );
        let digest_matches = store_digest.as_deref() == Some(read_digest.as_str());
        ClientReport {
            connections,
            reconnects,
            connections_survived,
            findings,
            max_gap,
            latency,
            latency_migrating,
            store_digest,
            digest_matches,
            error,
        }
    }
}

/// The store as read at the end.
struct StoreState {
    values: BTreeMap<String, Option<String>>,
    digest: String,
}

/// Reads every key in `keys` and the store's digest (30 s to connect: the VM may still be moving).
fn read_store(guest: SocketAddr, keys: &[String]) -> Result<StoreState, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match Client::connect(guest, ANSWER_TIMEOUT) {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("the VM does not serve at {guest} after the migration: {e}")),
        }
    };
    let mut values = BTreeMap::new();
    for key in keys {
        let value = match client.cmd(&["GET", key]) {
            Ok(Reply::Bulk(value)) => value.map(|v| String::from_utf8_lossy(&v).into_owned()),
            Ok(other) => return Err(format!("GET {key} at the end answered {other:?}")),
            Err(e) => return Err(format!("GET {key} at the end: {e}")),
        };
        values.insert(key.clone(), value);
    }
    let digest = match client.cmd(&["PCFT.DIGEST"]) {
        Ok(reply) => reply.bulk_text().ok_or_else(|| format!("PCFT.DIGEST answered {reply:?}"))?,
        Err(e) => return Err(format!("PCFT.DIGEST at the end: {e}")),
    };
    Ok(StoreState { values, digest })
}

/// One client connection's loop.
struct Worker {
    id: u32,
    guest: SocketAddr,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    t0: Instant,
    /// Values written so far (each SET's value is unique).
    seq: u64,
    rng: u64,
}

impl Worker {
    fn run(mut self) -> ConnectionLog {
        let mut log = ConnectionLog::default();
        let mut client: Option<Client> = None;
        let mut connected_before = false;
        while !self.stop.load(Ordering::Relaxed) {
            let connection = match client.as_mut() {
                Some(connection) => connection,
                None => match Client::connect(self.guest, ANSWER_TIMEOUT) {
                    Ok(fresh) => {
                        log.reconnects += u32::from(connected_before);
                        connected_before = true;
                        client.insert(fresh)
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                },
            };
            let (key, request) = self.next_request();
            let invoked = self.t0.elapsed();
            let sent = match &request {
                Request::Set(value) => connection.cmd(&["SET", &key, value]),
                Request::Incr => connection.cmd(&["INCR", &key]),
                Request::Get => connection.cmd(&["GET", &key]),
            };
            let answer = match sent {
                Ok(reply) => answer_of(&request, reply),
                Err(e) => {
                    // No answer: abort the connection (a reset, so the request cannot arrive later).
                    if let Some(broken) = client.take() {
                        broken.abort();
                    }
                    Answer::Indeterminate(e.to_string())
                }
            };
            if !matches!(answer, Answer::Indeterminate(_)) {
                self.answered.fetch_add(1, Ordering::Relaxed);
            }
            log.ops.push(Op { client: self.id, key, request, answer, invoked, completed: self.t0.elapsed() });
        }
        log
    }

    /// The next operation: half `SET`s of a register, a fifth `INCR`s of the
    /// counter, the rest `GET`s of either.
    fn next_request(&mut self) -> (String, Request) {
        let roll = self.next_random();
        let register = format!("c{}:r{}", self.id, (roll >> 8) % REGISTERS);
        let counter = format!("c{}:n", self.id);
        match roll % 10 {
            0..=4 => {
                self.seq += 1;
                (register, Request::Set(format!("v{}-{}", self.id, self.seq)))
            }
            5 | 6 => (counter, Request::Incr),
            7 => (counter, Request::Get),
            _ => (register, Request::Get),
        }
    }

    /// xorshift64*.
    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The answer `reply` gives to `request`.
fn answer_of(request: &Request, reply: Reply) -> Answer {
    match (request, reply) {
        (_, Reply::Error(e)) => Answer::Refused(e),
        (Request::Set(_), Reply::Simple(ok)) if ok == "OK" => Answer::Written,
        (Request::Incr, Reply::Integer(n)) => Answer::Counter(n),
        (Request::Get, Reply::Bulk(value)) => Answer::Read(value.map(|v| String::from_utf8_lossy(&v).into_owned())),
        (_, other) => Answer::Refused(format!("unexpected reply {other:?}")),
    }
}
