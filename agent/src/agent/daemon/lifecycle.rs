//! A VM's life on one agent: start, stop, wait for its workload, remove, and
//! the release of the memory of a VM that no longer runs (`--release-after`).

use super::error::{not_running, Failure, Refusal};
use super::server::{Daemon, Reply};
use super::table::{self, Released, VmSlot};
use crate::host::format_size;
use crate::vmm::dirty::DirtyTracking;
use crate::vmm::machine::{Machine, MachineConfig};
use crate::vmm::runner::{OutputGate, VmRunner};
use crate::wire::control::ControlMessage;
use crate::wire::payload::VmPhase;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the daemon looks for VMs that stopped running (to log them and release their memory).
const REAP_EVERY: Duration = Duration::from_millis(250);

impl Daemon {
    pub(super) async fn start_vm(
        self: &Arc<Self>,
        name: String,
        config: MachineConfig,
        tracking: DirtyTracking,
    ) -> Reply {
        self.refuse_if_draining()?;
        config.fixture.validate().map_err(Refusal::from)?;
        let replaced = {
            // The name and the memory are taken before the boot allocates
            // anything, under the lock that counts them: a flood of starts
            // past the limit is refused here, not after each one has booted.
            let mut vms = self.vms();
            table::admit(&vms, &name, &config, &self.room())?;
            table::insert(&mut vms, name.clone(), VmSlot::new(VmPhase::Starting, config.clone(), tracking))
        };
        table::retire(replaced).await;
        let runner = match self.boot(&name, config, tracking).await {
            Ok(runner) => runner,
            Err(failure) => {
                self.vms().remove(&name);
                return Err(failure.into());
            }
        };
        let config = {
            // A starting VM's record is its own: no stop, rm or migration takes a live phase's.
            let mut vms = self.vms();
            let Some(slot) = vms.get_mut(&name) else {
                drop(vms);
                tokio::task::spawn_blocking(move || drop(runner));
                return Err(self.no_such_vm(name).into());
            };
            slot.phase = VmPhase::Running;
            slot.attach(Arc::clone(&runner));
            slot.config.clone()
        };
        if let Err(e) = runner.resume().await {
            self.vms().remove(&name);
            tokio::task::spawn_blocking(move || drop(runner));
            return Err(Failure::from(e).into());
        }
        tracing::info!(vm = %name, fixture = %config.fixture.kind, mem = %format_size(config.mem_bytes), "started");
        Ok(ControlMessage::Ok)
    }

    /// Boots VM `name` (paused) and records the configuration the boot
    /// completed in its starting record: a paced `dirty` guest's TSC ticks per
    /// write, which is what a migration must send.
    async fn boot(&self, name: &str, config: MachineConfig, tracking: DirtyTracking) -> Result<Arc<VmRunner>, Failure> {
        tracing::info!(vm = %name, mem = %format_size(config.mem_bytes), "booting");
        let machine = tokio::task::spawn_blocking(move || Machine::boot_with(config, tracking))
            .await?
            .map_err(|source| Failure::Boot { vm: name.to_string(), source })?;
        if let Some(slot) = self.vms().get_mut(name) {
            slot.config = machine.config().clone();
        }
        let gate = OutputGate { sink: self.sink.clone(), released: 0, hold: false };
        let runner = Arc::new(VmRunner::spawn(name, machine, gate)?);
        if tracking != DirtyTracking::Bitmap {
            // The ring (and eBPF, which reads its pushes) logs only with logging on: on from
            // the start, it gives the VM a live dirty rate (`pcft vm status`, metrics).
            if let Err(e) = runner.set_dirty_logging(true).await {
                tokio::task::spawn_blocking(move || drop(runner));
                return Err(e.into());
            }
        }
        Ok(runner)
    }

    /// `pcft vm stop`: stops a running VM's guest for good; its record stays
    /// (and its memory, until `--release-after` or `pcft vm rm`).
    pub(super) async fn stop_vm(&self, name: &str) -> Reply {
        let (runner, was) = {
            let mut vms = self.vms();
            let Some(slot) = vms.get_mut(name) else {
                drop(vms);
                return Err(self.no_such_vm(name.to_string()).into());
            };
            let phase = slot.phase();
            match phase {
                VmPhase::Running => {
                    slot.phase = VmPhase::Stopped;
                    slot.ended_at = Some(Instant::now());
                    (slot.runner.clone(), phase)
                }
                VmPhase::Starting | VmPhase::MigratingOut | VmPhase::MigratingIn => {
                    return Err(self.wrong_phase(name, "stop", phase, None).into());
                }
                // Not running here already: nothing to do.
                _ => return Ok(ControlMessage::Stopped { name: name.to_string(), was: phase }),
            }
        };
        if let Some(runner) = runner {
            runner.pause().await.map_err(|source| Failure::Stop { vm: name.into(), source })?;
        }
        crate::metrics::get().vm_left(name);
        tracing::info!(vm = %name, "stopped by the operator");
        Ok(ControlMessage::Stopped { name: name.to_string(), was })
    }

    /// `pcft vm rm`: forgets a VM that no longer runs here and frees what it holds.
    pub(super) async fn remove_vm(&self, name: &str) -> Reply {
        let slot = {
            let mut vms = self.vms();
            let Some(slot) = vms.get(name) else {
                drop(vms);
                return Err(self.no_such_vm(name.to_string()).into());
            };
            let phase = slot.phase();
            if phase.is_live() {
                let why = match phase {
                    VmPhase::Running => "it is running: stop it first (pcft vm stop)".to_string(),
                    _ => not_running(phase, None),
                };
                return Err(Refusal::WrongPhase {
                    vm: name.into(),
                    agent: self.name.clone(),
                    action: "be removed",
                    why,
                }
                .into());
            }
            vms.remove(name).expect("checked")
        };
        let freed = slot.held_bytes();
        if let Some(runner) = slot.runner {
            tokio::task::spawn_blocking(move || drop(runner)).await.map_err(Failure::from)?;
        }
        crate::metrics::get().vm_left(name);
        tracing::info!(vm = %name, freed = %format_size(freed), "removed");
        Ok(ControlMessage::Removed { name: name.to_string() })
    }

    /// `pcft vm wait`: waits (at most `timeout_ms`) for VM `name`'s workload
    /// to finish here, then checks it against its oracle.
    pub(super) async fn wait_finished(self: &Arc<Self>, name: &str, timeout_ms: u64) -> Reply {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            let found = self.vms().get(name).map(|slot| {
                (
                    slot.runner.clone(),
                    slot.phase(),
                    slot.error.clone(),
                    slot.released.clone(),
                    slot.migration.as_ref().map(|m| m.to.clone()),
                )
            });
            let Some((runner, phase, error, released, to)) = found else {
                return Err(self.no_such_vm(name.to_string()).into());
            };
            if let Some(error) = error.or_else(|| runner.as_ref().and_then(|r| r.status().error)) {
                return Err(Failure::VmFailed { vm: name.into(), error }.into());
            }
            match phase {
                VmPhase::MigratedAway => {
                    return Err(Refusal::MigratedAway { vm: name.into(), agent: self.name.clone(), to }.into())
                }
                VmPhase::Stopped => return Err(self.wrong_phase(name, "finish", phase, None).into()),
                VmPhase::Finished => return self.verified(name, runner, released).await,
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Failure::NotFinished { vm: name.into(), timeout_ms }.into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The oracle's verdict on finished VM `name`: from its runner, or what its release kept.
    async fn verified(&self, name: &str, runner: Option<Arc<VmRunner>>, released: Option<Released>) -> Reply {
        let verdict = match (runner, released.and_then(|r| r.verified)) {
            (Some(runner), _) => {
                let verified = runner.verify().await.map_err(|source| Failure::Verify { vm: name.into(), source })?;
                (verified.records as u64, verified.memory_digest)
            }
            (None, Some(Ok(verdict))) => verdict,
            (None, Some(Err(error))) => return Err(Failure::VmFailed { vm: name.into(), error }.into()),
            (None, None) => {
                let error = "its memory was released before it could be checked".to_string();
                return Err(Failure::VmFailed { vm: name.into(), error }.into());
            }
        };
        Ok(ControlMessage::Verified { name: name.to_string(), records: verdict.0, memory_digest: verdict.1 })
    }

    /// Looks for VMs that stopped running here until the daemon goes: logs each
    /// once, and releases its memory `--release-after` later.
    pub(super) async fn reap(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REAP_EVERY).await;
            for (name, runner, phase) in self.ended_vms() {
                self.release(name, runner, phase).await;
            }
        }
    }

    /// Notes VMs whose guest stopped running (finished or failed) and returns
    /// the runners of those due for release.
    fn ended_vms(&self) -> Vec<(String, Arc<VmRunner>, VmPhase)> {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut vms = self.vms();
        for (name, slot) in vms.iter_mut() {
            let phase = slot.phase();
            if slot.runner.is_none() || !matches!(phase, VmPhase::Finished | VmPhase::Failed | VmPhase::Stopped) {
                continue;
            }
            if slot.ended_at.is_none() {
                slot.ended_at = Some(now);
                slot.phase = phase;
                match phase {
                    VmPhase::Failed => {
                        let error = slot.runner.as_ref().and_then(|r| r.status().error);
                        slot.error = slot.error.take().or(error);
                        tracing::warn!(vm = %name, error = slot.error.as_deref().unwrap_or(""), "failed");
                    }
                    _ => tracing::info!(vm = %name, "workload finished"),
                }
                crate::metrics::get().vm_left(name);
            }
            if slot.ended_at.is_some_and(|at| now.duration_since(at) >= self.limits.release_after) {
                due.push((name.clone(), Arc::clone(slot.runner.as_ref().expect("checked")), phase));
            }
        }
        due
    }

    /// Gives `runner`'s memory back to the host; a finished VM is checked against its oracle first.
    async fn release(&self, name: String, runner: Arc<VmRunner>, phase: VmPhase) {
        let records = runner.status().records;
        let verified = match phase {
            VmPhase::Finished => {
                Some(runner.verify().await.map(|v| (v.records as u64, v.memory_digest)).map_err(|e| e.to_string()))
            }
            _ => None,
        };
        let mem = runner.memory().size();
        // The runner leaves the record together with what it left, so that no
        // reader sees a VM with neither.
        let taken = match self.vms().get_mut(&name) {
            Some(slot) if slot.runner.as_ref().is_some_and(|r| Arc::ptr_eq(r, &runner)) => {
                slot.released = Some(Released { records, verified });
                slot.runner.take()
            }
            _ => None,
        };
        drop(runner);
        let Some(taken) = taken else { return };
        let _ = tokio::task::spawn_blocking(move || drop(taken)).await;
        let after = self.limits.release_after.as_secs();
        tracing::info!(vm = %name, freed = %format_size(mem), "released the memory of a VM that no longer runs ({after} s after it ended; --release-after)");
    }

    /// The refusal for `action` on VM `name`, which is in `phase`.
    pub(super) fn wrong_phase(&self, name: &str, action: &'static str, phase: VmPhase, error: Option<&str>) -> Refusal {
        Refusal::WrongPhase { vm: name.into(), agent: self.name.clone(), action, why: not_running(phase, error) }
    }
}
