//! Incoming migrations: admission (name, memory, a free migration place) and
//! the VM's record while it arrives and after.

use super::error::{DaemonError, Refusal};
use super::server::{refuse, Daemon};
use super::table::{self, VmSlot};
use crate::migration::destination::{migrate_in, IncomingMigration};
use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::MachineConfig;
use crate::vmm::runner::VmRunner;
use crate::wire::frame::{Frame, FrameReader, FrameWriter};
use crate::wire::migration::MigrationMessage;
use crate::wire::payload::{MigrationOptions, Mode, VmPhase};
use std::sync::Arc;
use tracing::Instrument;

impl Daemon {
    /// Admits an incoming migration of VM `name`: room, a sound fixture and
    /// timings, and a free migration place, taken under the same lock as the
    /// count, so two incoming migrations cannot both take the last place.
    /// The copy of an earlier record it replaced, to retire before the VM is built.
    fn admit(
        &self,
        name: &str,
        config: &MachineConfig,
        mode: Mode,
        options: &MigrationOptions,
    ) -> Result<Option<Arc<VmRunner>>, Refusal> {
        self.refuse_if_draining()?;
        config.fixture.validate()?;
        options.validate(mode)?;
        let mut vms = self.vms();
        table::admit(&vms, name, config, &self.room())?;
        self.check_migrations(&vms)?;
        let tracking = if mode.checkpoints() { options.checkpoint_tracker } else { DirtyTracking::Bitmap };
        Ok(table::insert(&mut vms, name.to_string(), VmSlot::new(VmPhase::MigratingIn, config.clone(), tracking)))
    }

    pub(super) async fn incoming(
        self: Arc<Self>,
        mut rd: FrameReader,
        mut wr: FrameWriter,
        from: &str,
    ) -> Result<(), DaemonError> {
        let refuse_with = |reason| MigrationMessage::Refuse { reason };
        let (name, config, mode, options, demand_token) = match rd.read::<MigrationMessage>().await {
            Ok(Frame::Message(MigrationMessage::Begin { name, config, mode, options, demand_token })) => {
                (name, *config, mode, options, demand_token)
            }
            Ok(other) => {
                return refuse(&mut wr, Refusal::ExpectedBegin { got: format!("{other:?}") }, refuse_with).await
            }
            Err(e) => return refuse(&mut wr, Refusal::Protocol(e), refuse_with).await,
        };
        // Expected from now on (the source opens it once `Ready` is out), until this migration ends.
        let (_claim, demand) = match demand_token.map(|token| self.demand_channels.expect(token)).transpose() {
            Ok(expected) => expected.unzip(),
            Err(refusal) => return refuse(&mut wr, refusal, refuse_with).await,
        };
        match self.admit(&name, &config, mode, &options) {
            Ok(replaced) => table::retire(replaced).await,
            Err(refusal) => {
                tracing::warn!(vm = %name, %from, "refused an incoming migration: {refusal}");
                return refuse(&mut wr, refusal, refuse_with).await;
            }
        }
        tracing::info!(vm = %name, %from, mode = mode.name(), "migrating in");
        let table = Arc::clone(&self);
        let vm = name.clone();
        let span = tracing::info_span!("migration", vm = %name, from = %from, mode = mode.name(), side = "destination");
        let incoming =
            IncomingMigration { rd, wr, demand, name: name.clone(), config, mode, options, sink: self.sink.clone() };
        let result = migrate_in(incoming, move |runner| {
            if let Some(slot) = table.vms().get_mut(&vm) {
                slot.attach(runner);
            }
        })
        .instrument(span)
        .await;
        let mut vms = self.vms();
        match result {
            Ok(stats) => {
                if let Some(slot) = vms.get_mut(&name) {
                    slot.phase = VmPhase::Running;
                }
                tracing::info!(vm = %name, %from, faulted = stats.pages_faulted, "migration in complete");
                Ok(())
            }
            Err(source) => {
                let ran_here = vms.get(&name).is_some_and(|s| s.runner.is_some());
                if ran_here {
                    let slot = vms.get_mut(&name).expect("checked");
                    slot.phase = VmPhase::Failed;
                    slot.error = Some(source.to_string());
                    slot.fenced = source.fenced_here();
                } else {
                    vms.remove(&name);
                }
                drop(vms);
                crate::metrics::get().vm_left(&name);
                Err(DaemonError::Incoming { vm: name, source })
            }
        }
    }
}
