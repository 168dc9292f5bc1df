//! A minimal QMP client (QEMU's JSON monitor protocol, one JSON object a
//! line) and the fields of `query-migrate` the peer benchmark reads.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A QMP session: commands go out on `writer`, answers come on `reader`.
pub struct Qmp<R, W> {
    reader: R,
    writer: W,
}

impl Qmp<BufReader<UnixStream>, UnixStream> {
    /// Connects to the QMP socket at `path` (QEMU creates it shortly after it
    /// starts: retried until `timeout`) and leaves capability negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("cannot connect to QEMU's QMP socket {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Qmp::start(reader, stream)
    }
}

impl<R: BufRead, W: Write> Qmp<R, W> {
    /// Reads QEMU's greeting and sends `qmp_capabilities`.
    pub fn start(reader: R, writer: W) -> Result<Self> {
        let mut qmp = Qmp { reader, writer };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("reading from QMP")? == 0 {
            bail!("QEMU closed its QMP socket (did it exit?)");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent something that is not JSON: {line:?}"))
    }

    /// Runs `command` with `arguments`; its `return` value. Events that come
    /// in between are skipped; an `error` answer is an error naming the command.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}").context("writing to QMP")?;
        self.writer.flush()?;
        loop {
            let mut answer = self.read_message()?;
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(error) = answer.get("error") {
                bail!("QMP {command}: {}", error["desc"].as_str().unwrap_or("an error without a description"));
            }
            return match answer.get_mut("return") {
                Some(value) => Ok(value.take()),
                None => bail!("QMP {command}: an answer with neither return nor error: {answer}"),
            };
        }
    }
}

/// What `query-migrate` says of a migration, as far as the benchmark uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrateStatus {
    /// `setup`, `active`, `postcopy-active`, `completed`, `failed`…
    pub status: String,
    /// From `migrate` to completion, setup included (ms; set once completed).
    pub total_ms: Option<f64>,
    /// The VM's stop at the source to its start at the destination, as the source sees it (ms).
    pub downtime_ms: Option<f64>,
    pub setup_ms: Option<f64>,
    /// Bytes sent (`ram.transferred`).
    pub bytes: u64,
    /// Of them, before post-copy started (`ram.precopy-bytes`) and after (`ram.postcopy-bytes`).
    pub precopy_bytes: u64,
    pub postcopy_bytes: u64,
    /// Pages the destination asked for (`ram.postcopy-requests`).
    pub postcopy_requests: u64,
    /// Pages sent whole (`ram.normal`) and as zero pages (`ram.duplicate`).
    pub normal_pages: u64,
    pub zero_pages: u64,
    /// QEMU's reason, when it failed.
    pub error: Option<String>,
}

impl MigrateStatus {
    /// Reads the `return` value of `query-migrate`.
    pub fn parse(value: &Value) -> Result<MigrateStatus> {
        let status = value["status"].as_str().with_context(|| format!("query-migrate without a status: {value}"))?;
        let ram = &value["ram"];
        let count = |key: &str| ram[key].as_u64().unwrap_or(0);
        Ok(MigrateStatus {
            status: status.to_string(),
            total_ms: value["total-time"].as_f64(),
            downtime_ms: value["downtime"].as_f64(),
            setup_ms: value["setup-time"].as_f64(),
            bytes: count("transferred"),
            precopy_bytes: count("precopy-bytes"),
            postcopy_bytes: count("postcopy-bytes"),
            postcopy_requests: count("postcopy-requests"),
            normal_pages: count("normal"),
            zero_pages: count("duplicate"),
            error: value["error-desc"].as_str().map(str::to_string),
        })
    }

    pub fn completed(&self) -> bool {
        self.status == "completed"
    }

    /// Whether it ended without completing.
    pub fn failed(&self) -> bool {
        matches!(self.status.as_str(), "failed" | "cancelled" | "cancelling")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// What QEMU 7.2 answered on this machine after a 256 MiB post-copy.
    const COMPLETED: &str = r#"{"return": {"status": "completed", "setup-time": 27, "downtime": 1,
        "total-time": 270, "ram": {"total": 268771328, "postcopy-requests": 59, "dirty-sync-count": 2,
        "pages-per-second": 219584, "page-size": 4096, "remaining": 0, "postcopy-bytes": 268587951,
        "mbps": 8842.8, "transferred": 268587951, "precopy-bytes": 0, "duplicate": 173, "skipped": 0,
        "normal-bytes": 268062720, "normal": 65445}}}"#;

    #[test]
    fn query_migrate_is_read_field_by_field() {
        let answer: Value = serde_json::from_str(COMPLETED).unwrap();
        let status = MigrateStatus::parse(&answer["return"]).unwrap();
        assert!(status.completed() && !status.failed());
        assert_eq!(status.total_ms, Some(270.0));
        assert_eq!(status.downtime_ms, Some(1.0));
        assert_eq!(status.setup_ms, Some(27.0));
        assert_eq!(status.bytes, 268_587_951);
        assert_eq!((status.precopy_bytes, status.postcopy_bytes), (0, 268_587_951));
        assert_eq!((status.postcopy_requests, status.normal_pages, status.zero_pages), (59, 65_445, 173));
        // While it runs there is no total yet; a failure says why.
        let active = MigrateStatus::parse(&json!({"status": "postcopy-active", "ram": {"transferred": 5}})).unwrap();
        assert_eq!((active.total_ms, active.bytes, active.completed()), (None, 5, false));
        let failed = MigrateStatus::parse(&json!({"status": "failed", "error-desc": "Unable to write"})).unwrap();
        assert!(failed.failed());
        assert_eq!(failed.error.as_deref(), Some("Unable to write"));
        assert!(MigrateStatus::parse(&json!({})).is_err());
    }

    #[test]
    fn a_session_skips_events_and_reports_errors_by_command() {
        let from_qemu = [
            r#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#,
            r#"{"return": {}}"#,
            r#"{"timestamp": {"seconds": 1}, "event": "MIGRATION", "data": {"status": "setup"}}"#,
            COMPLETED.replace('\n', " ").as_str(),
            r#"{"error": {"class": "GenericError", "desc": "Postcopy must be started after migration has been started"}}"#,
        ]
        .join("\n");
        let mut sent = Vec::new();
        let mut qmp = Qmp::start(Cursor::new(from_qemu.into_bytes()), &mut sent).unwrap();
        let status = MigrateStatus::parse(&qmp.execute("query-migrate", json!({})).unwrap()).unwrap();
        assert_eq!(status.total_ms, Some(270.0));
        let err = qmp.execute("migrate-start-postcopy", json!({})).unwrap_err().to_string();
        assert!(err.starts_with("QMP migrate-start-postcopy: Postcopy must be started"), "{err}");
        assert!(qmp.execute("query-status", json!({})).unwrap_err().to_string().contains("closed"));
        let sent = String::from_utf8(sent).unwrap();
        let commands: Vec<Value> = sent.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(commands[0]["execute"], "qmp_capabilities");
        assert_eq!(commands[1]["execute"], "query-migrate");
        assert_eq!(commands.len(), 4);
    }
}
