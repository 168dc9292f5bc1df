//! A serving VM's outside world (the kv fixture): its clients (`clients`) and
//! the capture of the frames that reached them (`capture`), started together
//! on the testbed's client network and checked together once the migration
//! is over.

use super::capture::{Capture, FrameAudit};
use super::clients::{ClientReport, Clients};
use super::plan::ClientPlan;
use crate::cli::netns::ClientLan;
use crate::cli::{run_failure, Failure};
use pcft_agent::fault::frame_trace::FrameTrace;
use std::path::Path;
use std::time::Instant;

/// The clients and the capture, running.
pub struct Serving {
    clients: Clients,
    capture: Capture,
}

/// What they found.
pub struct ServingReport {
    pub clients: ClientReport,
    pub frames: FrameAudit,
}

/// The file the destination agent traces the guest's frames to (`--frame-trace`), removed when dropped.
pub fn frame_trace_file() -> Result<tempfile::NamedTempFile, Failure> {
    tempfile::Builder::new().prefix("pcft-demo-frames-").tempfile().map_err(run_failure)
}

impl ServingReport {
    /// Whether the clients' history held and no uncommitted frame reached them.
    pub fn ok(&self) -> bool {
        self.problem().is_none()
    }

    /// Why not, in words (None if `ok`).
    pub fn problem(&self) -> Option<String> {
        let frames = &self.frames;
        self.clients.problem().or_else(|| match (&frames.error, frames.uncommitted) {
            (Some(e), _) => Some(format!("the capture of what reached the clients failed: {e}")),
            (None, 0) if frames.out_of_turn > 0 => Some(format!(
                "{} frame(s) reached the clients from the destination after the source answered them again: \
                 two copies answered",
                frames.out_of_turn
            )),
            (None, 0) => None,
            (None, n) => Some(format!(
                "{n} frame(s) from epochs that never committed reached the clients from the destination \
                 (network output commit let them out)"
            )),
        })
    }
}

impl Serving {
    /// Starts the clients of `plan` and the capture of frames from the VM's `mac`, on `lan`.
    pub fn start(plan: &ClientPlan, lan: &ClientLan, mac: [u8; 6]) -> Serving {
        Serving {
            clients: Clients::start(&lan.ns, plan.guest, plan.connections),
            capture: Capture::start(&lan.ns, &lan.source_port, &lan.destination_port, mac),
        }
    }

    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// Stops the clients (checking their history) and the capture (auditing
    /// it against the destination's frame `trace`, whose VM the source
    /// restored from `restored_epoch` if it failed over); the clients'
    /// latencies also within the migration's `window`.
    pub fn finish(
        self,
        trace: &Path,
        restored_epoch: Option<u64>,
        window: Option<(Instant, Instant)>,
    ) -> ServingReport {
        let clients = self.clients.finish(window);
        let captured = self.capture.finish();
        let trace = FrameTrace::parse(&std::fs::read_to_string(trace).unwrap_or_default());
        ServingReport { clients, frames: FrameAudit::new(&captured, &trace, restored_epoch) }
    }
}
