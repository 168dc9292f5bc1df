//! The source's side of PostCopyFT checkpoints: the store that keeps one
//! consistent VM image while the VM runs at the destination.
//!
//! The source's guest memory is the base image: pages the destination never
//! wrote are still the source's own. Each incremental checkpoint (epoch) brings
//! the pages the guest wrote at the destination since the last one, then its
//! commit record with the VM's state at the epoch's pause. Pages are staged as
//! they arrive and touch guest memory only once the whole epoch is there: the
//! commit record's page count matches, its epoch is the next one, its state
//! decodes. So memory plus the committed state is always one consistent VM
//! state, and a half-received epoch is never applied. Staged pages take at
//! most the staging budget of memory; the rest of an epoch waits in a file
//! (see [`super::staging`]).

use crate::migration::ft::staging::{Staging, StagingLimits};
use crate::vmm::machine::MachineState;
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};
use crate::wire::frame::PageBatch;
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("checkpoint {got} arrived while {expected} is the next epoch")]
    Epoch { expected: u64, got: u64 },
    #[error("checkpoint {epoch} commits {claimed} pages but {staged} arrived")]
    PageCount { epoch: u64, claimed: u64, staged: u64 },
    #[error("checkpoint page {gpa:#x} is outside the VM's {size} bytes")]
    OutOfRange { gpa: u64, size: u64 },
    #[error("checkpoint {epoch}'s state does not decode: {reason}")]
    State { epoch: u64, reason: String },
    #[error("cannot write checkpoint {epoch} into guest memory: {reason}")]
    Apply { epoch: u64, reason: String },
    #[error("cannot stage checkpoint pages: {0}")]
    Staging(String),
}

/// A commit failed half-way: guest memory holds no committed state (why).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TornStore(String);

/// The last committed checkpoint: the VM state to restore over guest memory.
pub struct Committed {
    /// 0: the state captured at the switchover, before any checkpoint.
    pub epoch: u64,
    pub state: MachineState,
}

/// Stages incoming epochs and commits them into guest memory.
pub struct CheckpointStore {
    memory: Arc<GuestMemory>,
    staging: Staging,
    staged_pages: u64,
    committed: Committed,
    /// A commit failed after writing part of its epoch into guest memory:
    /// memory is no longer any committed state.
    torn: Option<String>,
    /// Pages and bytes of every committed epoch, for the report.
    pub pages_committed: u64,
    pub bytes_received: u64,
}

impl CheckpointStore {
    /// A store over `memory`, whose committed state is `switchover` (epoch 0).
    pub fn new(memory: Arc<GuestMemory>, switchover: MachineState, limits: StagingLimits) -> Self {
        CheckpointStore {
            memory,
            staging: Staging::new(limits),
            staged_pages: 0,
            committed: Committed { epoch: 0, state: switchover },
            torn: None,
            pages_committed: 0,
            bytes_received: 0,
        }
    }

    /// Stages a batch of the open epoch's pages.
    pub fn stage(&mut self, batch: PageBatch) -> Result<(), CheckpointError> {
        let size = self.memory.size();
        for run in batch.runs() {
            let end = run.gpa.checked_add(run.pages as u64 * PAGE_SIZE);
            if end.is_none_or(|end| end > size) {
                return Err(CheckpointError::OutOfRange { gpa: run.gpa, size });
            }
        }
        self.staged_pages += batch.len() as u64;
        self.bytes_received += batch.payload_len() as u64;
        self.staging.push(batch).map_err(|e| CheckpointError::Staging(e.to_string()))
    }

    /// Bytes of the open epoch staged in memory and in the staging file.
    pub fn staged_bytes(&self) -> (u64, u64) {
        (self.staging.memory_bytes(), self.staging.file_bytes())
    }

    /// Applies the staged epoch if its commit record says it is whole, and makes it current.
    /// On an error nothing of the epoch was applied, and its pages stay staged (the
    /// source then drops the connection, and the store's open epoch with it).
    pub fn commit(&mut self, epoch: u64, pages: u64, state: &[u8]) -> Result<u64, CheckpointError> {
        let expected = self.committed.epoch + 1;
        if epoch != expected {
            return Err(CheckpointError::Epoch { expected, got: epoch });
        }
        if pages != self.staged_pages {
            return Err(CheckpointError::PageCount { epoch, claimed: pages, staged: self.staged_pages });
        }
        let state =
            MachineState::from_bytes(state).map_err(|e| CheckpointError::State { epoch, reason: e.to_string() })?;
        if state.config != self.committed.state.config {
            return Err(CheckpointError::State { epoch, reason: "it is of another machine configuration".into() });
        }
        let memory = &self.memory;
        let applied = self.staging.drain(|batch| {
            // The push may be sending pages straight from this memory: wait for
            // its frames in flight, so that none sees a page change under its
            // tag (a batch at a time: pushed frames go out between them).
            let _views = memory.hold_views();
            for run in batch.runs() {
                match run.data {
                    Some(data) => memory.write(run.gpa, data)?,
                    None => {
                        for i in 0..run.pages as u64 {
                            memory.write(run.gpa + i * PAGE_SIZE, &[0u8; PAGE_SIZE as usize])?;
                        }
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = applied {
            let error = CheckpointError::Apply { epoch, reason: e.to_string() };
            if self.staging.torn() {
                self.torn = Some(error.to_string());
            }
            return Err(error);
        }
        self.bytes_received += state_len(&state);
        self.pages_committed += self.staged_pages;
        self.staged_pages = 0;
        self.committed = Committed { epoch, state };
        Ok(epoch)
    }

    /// Pages of the open epoch staged so far (dropped if it never commits).
    pub fn staged_pages(&self) -> u64 {
        self.staged_pages
    }

    pub fn committed_epoch(&self) -> u64 {
        self.committed.epoch
    }

    /// Ends the store: the last committed checkpoint (the staged epoch is
    /// dropped), or why guest memory holds none (a commit failed half-way).
    pub fn into_committed(self) -> Result<Committed, TornStore> {
        match self.torn {
            None => Ok(self.committed),
            Some(reason) => Err(TornStore(reason)),
        }
    }
}

fn state_len(state: &MachineState) -> u64 {
    state.to_bytes().len() as u64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vmm::devices::DeviceState;
    use crate::vmm::kvm::state::VmKernelState;
    use crate::wire::frame::PageData;
    use vm_fixtures::{FixtureKind, OutputRecord};

    pub(crate) fn state(records: u64) -> MachineState {
        let mut devices = DeviceState::new(1);
        for step in 0..records {
            devices.output_log.push(OutputRecord { vcpu: 0, step, digest: step });
        }
        MachineState {
            config: crate::vmm::machine::tests::config(FixtureKind::Ledger, 1, 100),
            vcpus: Vec::new(),
            kernel: VmKernelState { irqchips: Vec::new(), clock: None },
            devices,
        }
    }

    fn page(byte: u8) -> PageData {
        PageData::Bytes(vec![byte; PAGE_SIZE as usize])
    }

    fn store() -> (Arc<GuestMemory>, CheckpointStore) {
        let memory = Arc::new(GuestMemory::new(4 << 20, 4 << 20).unwrap());
        memory.write(0x1000, &[7; PAGE_SIZE as usize]).unwrap();
        (Arc::clone(&memory), CheckpointStore::new(memory, state(0), StagingLimits::default()))
    }

    fn byte_at(memory: &GuestMemory, gpa: u64) -> u8 {
        let mut b = [0u8; 1];
        memory.read(gpa, &mut b).unwrap();
        b[0]
    }

    #[test]
    fn a_whole_epoch_becomes_current_at_its_commit_record() {
        let (memory, mut store) = store();
        store.stage(PageBatch::from_pages(vec![(0x2000, page(1)), (0x1000, PageData::Zero)])).unwrap();
        store.stage(PageBatch::from_pages(vec![(0x3000, page(3))])).unwrap();
        // Staged pages do not touch guest memory.
        assert_eq!((byte_at(&memory, 0x1000), byte_at(&memory, 0x2000)), (7, 0));
        assert_eq!(store.commit(1, 3, &state(4).to_bytes()), Ok(1));
        assert_eq!((byte_at(&memory, 0x1000), byte_at(&memory, 0x2000), byte_at(&memory, 0x3000)), (0, 1, 3));
        assert_eq!(store.committed_epoch(), 1);
        assert_eq!(store.into_committed().unwrap().state.devices.output_log.len(), 4);
    }

    #[test]
    fn a_cut_off_epoch_is_never_applied() {
        let (memory, mut store) = store();
        store.stage(PageBatch::from_pages(vec![(0x1000, page(1))])).unwrap();
        store.commit(1, 1, &state(1).to_bytes()).unwrap();
        // Epoch 2: two pages staged, then the destination dies before the commit record.
        store.stage(PageBatch::from_pages(vec![(0x1000, page(2)), (0x2000, page(2))])).unwrap();
        assert_eq!(store.staged_pages(), 2);
        let committed = store.into_committed().unwrap();
        assert_eq!(committed.epoch, 1);
        assert_eq!((byte_at(&memory, 0x1000), byte_at(&memory, 0x2000)), (1, 0));
    }

    #[test]
    fn a_commit_record_that_does_not_match_applies_nothing() {
        let (memory, mut store) = store();
        store.stage(PageBatch::from_pages(vec![(0x2000, page(9))])).unwrap();
        assert_eq!(
            store.commit(1, 2, &state(1).to_bytes()),
            Err(CheckpointError::PageCount { epoch: 1, claimed: 2, staged: 1 })
        );
        assert_eq!(store.commit(2, 1, &state(1).to_bytes()), Err(CheckpointError::Epoch { expected: 1, got: 2 }));
        assert!(matches!(store.commit(1, 1, b"garbage"), Err(CheckpointError::State { .. })));
        assert_eq!(byte_at(&memory, 0x2000), 0);
        assert_eq!(store.committed_epoch(), 0);
        let outside = PageBatch::from_pages(vec![(4 << 20, page(1))]);
        assert_eq!(store.stage(outside), Err(CheckpointError::OutOfRange { gpa: 4 << 20, size: 4 << 20 }));
    }
}
