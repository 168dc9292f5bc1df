//! The source's post-copy push: what is still unsent, what the destination
//! asked for (sent first), and where the background push goes next.

use crate::vmm::memory::PAGE_SIZE;
use crate::vmm::page_set::PageSet;

/// Pages per batch frame of the background push: small enough that a demand
/// request waits for at most one batch on the wire.
pub const PUSH_BATCH_PAGES: usize = 256;

/// Post-copy at the source: the unsent pages, the demand queue, and the push's cursor.
pub struct Push {
    unsent: PageSet,
    demand: Vec<u64>,
    cursor: u64,
}

impl Push {
    /// A push of the pages in `unsent`, from the lowest address on.
    pub fn new(unsent: PageSet) -> Push {
        Push { unsent, demand: Vec::new(), cursor: 0 }
    }

    /// Pages left to send (not yet pushed nor asked for).
    pub fn unsent_pages(&self) -> u64 {
        self.unsent.len()
    }

    /// Whether every page went out (requested pages leave `unsent` when asked
    /// for: they count until they are sent).
    pub fn done(&self) -> bool {
        self.unsent.is_empty() && self.demand.is_empty()
    }

    /// Whether the destination waits for requested pages.
    pub fn has_demand(&self) -> bool {
        !self.demand.is_empty()
    }

    /// The requested pages, to send now (before any push batch).
    pub fn take_demand(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.demand)
    }

    /// The destination asked for `gpas`: those still unsent go to the demand queue.
    pub fn request(&mut self, gpas: Vec<u64>) {
        for gpa in gpas {
            if self.unsent.remove(gpa) {
                self.demand.push(gpa);
            }
            // Push on from the latest fault: the guest is likely to touch what follows.
            self.cursor = gpa.wrapping_add(PAGE_SIZE);
        }
    }

    /// The next pages of the background push, in address order from the cursor.
    pub fn next_batch(&mut self) -> Vec<u64> {
        let mut batch = Vec::with_capacity(PUSH_BATCH_PAGES);
        while batch.len() < PUSH_BATCH_PAGES {
            let Some(gpa) = self.unsent.next_from(self.cursor) else { break };
            self.unsent.remove(gpa);
            batch.push(gpa);
            self.cursor = gpa + PAGE_SIZE;
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_pages_go_first_and_the_push_goes_on_after_the_fault() {
        let mut push = Push::new(PageSet::full(8 * PAGE_SIZE));
        push.request(vec![5 * PAGE_SIZE, 5 * PAGE_SIZE]);
        assert_eq!(push.take_demand(), vec![5 * PAGE_SIZE], "a page is asked for once");
        assert_eq!(
            push.next_batch(),
            vec![6 * PAGE_SIZE, 7 * PAGE_SIZE, 0, PAGE_SIZE, 2 * PAGE_SIZE, 3 * PAGE_SIZE, 4 * PAGE_SIZE]
        );
        assert!(push.done());
    }
}
