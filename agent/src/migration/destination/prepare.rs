//! Before `Ready`: guest memory, its userfaultfd registration (post-copy),
//! and the VM built up to its state, so that the switchover only has to restore.

use crate::migration::error::{MigrationError, VmError};
use crate::migration::postcopy::install::IncomingPages;
use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::{Machine, MachineConfig, MachineError, PreparedMachine};
use crate::vmm::memory::GuestMemory;
use crate::vmm::uffd::FaultRegion;
use crate::wire::payload::{MigrationOptions, Mode};
use std::sync::Arc;

/// Guest memory (in `IncomingPages`) and the machine prepared over it.
pub async fn prepare_incoming(
    config: &MachineConfig,
    mode: Mode,
    options: &MigrationOptions,
) -> Result<(IncomingPages, PreparedMachine), MigrationError> {
    let memory = Arc::new(GuestMemory::new(config.mem_bytes, config.slot_bytes).map_err(MigrationError::vm)?);
    let region = if mode.uses_postcopy() {
        Some(Arc::new(FaultRegion::register(Arc::clone(&memory)).map_err(MigrationError::vm)?))
    } else {
        None
    };
    let incoming = IncomingPages::new(Arc::clone(&memory), region);
    let (prep_config, prep_memory) = (config.clone(), memory);
    let track = mode.checkpoints();
    let tracking = if track { options.checkpoint_tracker } else { DirtyTracking::Bitmap };
    let prepare = move || {
        let prepared = Machine::prepare_with(prep_config, prep_memory, tracking)?;
        if track {
            // Track the guest's writes from its first instruction here, and do it
            // now rather than in the downtime (re-registering memslots takes a while).
            prepared.set_dirty_logging(true)?;
        }
        Ok::<_, MachineError>(prepared)
    };
    let prepared = match tokio::task::spawn_blocking(prepare).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(MigrationError::vm(e)),
        Err(e) => return Err(MigrationError::vm(VmError::Panicked(e.to_string()))),
    };
    Ok((incoming, prepared))
}
