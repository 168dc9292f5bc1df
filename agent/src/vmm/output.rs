//! Where released guest output goes: the outside world. The fixtures' output
//! device is our stand-in for a guest's network, and an agent started with
//! `--output-sink ADDR` sends every record it releases there, one JSON line each,
//! over TCP. Under PostCopyFT a record is released only once the checkpoint
//! that produced it is committed at the source (see `vm_runner`), so the
//! outside never sees output from a state that a failover would undo.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use vm_fixtures::OutputRecord;

/// One released record, as the outside sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedRecord {
    pub vm: String,
    /// The agent that released it.
    pub agent: String,
    pub vcpu: u32,
    pub step: u64,
    pub digest: u64,
}

impl ReleasedRecord {
    pub fn record(&self) -> OutputRecord {
        OutputRecord { vcpu: self.vcpu, step: self.step, digest: self.digest }
    }
}

/// How far a VM's released output has gone out: the output-log length up to
/// which its records were written to the sink's connection (or, without one,
/// logged). The sink's writer moves it on after each write, so it never counts
/// a record still queued in this process: a destination that dies with records
/// queued must not tell the source they went out (PostCopyFT's heartbeat).
#[derive(Clone, Debug, Default)]
pub struct WrittenMark(Arc<AtomicU64>);

impl WrittenMark {
    pub fn new(upto: u64) -> Self {
        WrittenMark(Arc::new(AtomicU64::new(upto)))
    }

    /// Records of the output log written out so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn reached(&self, upto: u64) {
        self.0.fetch_max(upto, Ordering::AcqRel);
    }
}

/// A line for the writer, and the mark it moves once written.
type Line = (String, Option<(WrittenMark, u64)>);

/// A handle on the agent's output sink; cheap to clone. Without an address,
/// released records only go to the log.
#[derive(Clone)]
pub struct OutputSink {
    agent: String,
    lines: Option<mpsc::Sender<Line>>,
}

impl OutputSink {
    /// Records go nowhere but the log.
    pub fn log_only(agent: &str) -> Self {
        OutputSink { agent: agent.to_string(), lines: None }
    }

    /// Records go to the TCP listener at `addr`, from a writer thread of their own
    /// (it connects on the first record, and again after an error).
    pub fn tcp(agent: &str, addr: &str) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Line>();
        let addr = addr.to_string();
        std::thread::Builder::new().name("output-sink".into()).spawn(move || {
            let mut stream: Option<TcpStream> = None;
            for (line, mark) in rx {
                if stream.is_none() {
                    match TcpStream::connect(&addr) {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            tracing::error!(%addr, "output sink unreachable, a record is not released: {e}");
                            continue;
                        }
                    }
                }
                match stream.as_mut().map(|s| s.write_all(line.as_bytes())) {
                    Some(Err(e)) => {
                        tracing::error!(%addr, "output sink write failed, a record is not released: {e}");
                        stream = None;
                    }
                    Some(Ok(())) => {
                        if let Some((mark, upto)) = mark {
                            mark.reached(upto);
                        }
                    }
                    None => {}
                }
            }
        })?;
        Ok(OutputSink { agent: agent.to_string(), lines: Some(tx) })
    }

    /// Sends `record` of VM `vm` to the outside.
    pub fn release(&self, vm: &str, record: &OutputRecord) {
        self.send(vm, record, None);
    }

    /// Sends `record` of VM `vm` to the outside; once it is written, `mark`
    /// reaches `upto` (the record's index in the output log, plus one).
    pub fn release_marked(&self, vm: &str, record: &OutputRecord, mark: &WrittenMark, upto: u64) {
        self.send(vm, record, Some((mark.clone(), upto)));
    }

    fn send(&self, vm: &str, record: &OutputRecord, mark: Option<(WrittenMark, u64)>) {
        tracing::debug!(
            vm,
            vcpu = record.vcpu,
            step = record.step,
            digest = format_args!("{:#018x}", record.digest),
            "output"
        );
        if let Some(lines) = &self.lines {
            let released = ReleasedRecord {
                vm: vm.to_string(),
                agent: self.agent.clone(),
                vcpu: record.vcpu,
                step: record.step,
                digest: record.digest,
            };
            let mut line = serde_json::to_string(&released).expect("a record always encodes");
            line.push('\n');
            let _ = lines.send((line, mark));
        } else if let Some((mark, upto)) = mark {
            mark.reached(upto);
        }
    }
}
