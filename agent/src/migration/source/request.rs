//! What a migration out needs: the VM, where it goes, and how.

use crate::migration::ft::staging::StagingLimits;
use crate::migration::progress::Progress;
use crate::vmm::machine::MachineConfig;
use crate::vmm::runner::VmRunner;
use crate::wire::auth::Psk;
use crate::wire::payload::{MigrationOptions, Mode};
use std::sync::Arc;
use std::time::Duration;

/// A request to migrate the VM that `runner` runs to the agent at `to`.
pub struct MigrateOut<'a> {
    pub runner: &'a VmRunner,
    /// The VM's name.
    pub vm: &'a str,
    pub config: &'a MachineConfig,
    /// The destination agent's address.
    pub to: &'a str,
    pub mode: Mode,
    pub options: MigrationOptions,
    /// This agent's name.
    pub agent: &'a str,
    /// This agent's key, which the destination must hold too.
    pub psk: Option<&'a Psk>,
    /// PostCopyFT: where the source stages checkpoint epochs.
    pub staging: &'a StagingLimits,
    /// Where the migration reports how far it has got.
    pub progress: Arc<Progress>,
}

impl MigrateOut<'_> {
    /// How long the destination may take to answer before the commit.
    pub fn reply_timeout(&self) -> Duration {
        Duration::from_millis(self.options.reply_timeout_ms)
    }
}
