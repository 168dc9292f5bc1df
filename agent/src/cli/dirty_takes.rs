//! What the dirty takes of a `pcft vm run --take-dirty-every` cost and found:
//! measured by `vm`, printed by `report`.

use pcft_agent::vmm::machine::{Machine, MachineError};
use std::time::Instant;

/// What the dirty takes of a run cost and found.
#[derive(Default)]
pub struct TakeStats {
    /// Takes so far.
    pub takes: u64,
    /// Dirty pages found, all takes together.
    pub pages: u64,
    /// Time spent taking, in µs.
    pub total_us: u64,
    /// The longest take, in µs.
    pub max_us: u64,
}

impl TakeStats {
    /// Takes `machine`'s dirty pages now, and counts the take.
    pub fn take(&mut self, machine: &Machine) -> Result<(), MachineError> {
        let at = Instant::now();
        let pages = machine.take_dirty_pages()?;
        let us = at.elapsed().as_micros() as u64;
        self.takes += 1;
        self.pages += pages.len() as u64;
        self.total_us += us;
        self.max_us = self.max_us.max(us);
        Ok(())
    }
}
