//! Which connections an agent serves: at most `--max-connections` that have
//! not greeted yet and at most as many that have. A connection that has not
//! greeted costs a peer nothing to open, so at the limit a new one evicts the
//! *oldest* such connection instead of being refused itself: a flood of
//! silent connections then churns through this pool, while a peer that
//! greets promptly (the CLI, a source starting a migration, its demand
//! channel) gets through. A greeted connection has passed authentication
//! (when the agent has a key); past the limit of those, the peer is refused
//! with the reason, and a greeted connection is never evicted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

/// The connections of one listener.
pub struct Admission {
    limit: usize,
    /// Connections that had not greeted when they last were looked at, oldest first.
    ungreeted: Mutex<VecDeque<Waiting>>,
    greeted: Arc<Semaphore>,
}

/// A connection in the ungreeted pool.
struct Waiting {
    task: AbortHandle,
    /// Set once, by whichever comes first: its ticket (it greeted, or its
    /// task ended) or an eviction. So a connection that greets at the moment
    /// it is evicted is either served or evicted, never both.
    left: Arc<AtomicBool>,
}

/// A connection's place among those that have not greeted yet. It never
/// takes the pool's lock (it may be dropped under it: a task spawned while
/// the runtime shuts down is dropped at once).
pub struct Ticket {
    left: Arc<AtomicBool>,
    greeted: Arc<Semaphore>,
}

impl Admission {
    pub fn new(limit: usize) -> Admission {
        Admission { limit, ungreeted: Mutex::default(), greeted: Arc::new(Semaphore::new(limit)) }
    }

    /// The most connections served in each state.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes a new connection in: `spawn` starts its task (given its ticket)
    /// and returns the task's abort handle, so that a later arrival can evict
    /// it. At the limit, the oldest connection that has not greeted goes
    /// first; whether one did.
    pub fn arrive(&self, spawn: impl FnOnce(Ticket) -> AbortHandle) -> bool {
        let left = Arc::new(AtomicBool::new(false));
        let task = spawn(Ticket { left: Arc::clone(&left), greeted: Arc::clone(&self.greeted) });
        let mut ungreeted = self.ungreeted.lock().unwrap_or_else(|e| e.into_inner());
        ungreeted.retain(|waiting| !waiting.left.load(Ordering::Acquire));
        let mut evicted = None;
        while ungreeted.len() >= self.limit {
            let Some(oldest) = ungreeted.pop_front() else { break };
            // It may have greeted since the retain: then it is served, not evicted.
            if !oldest.left.swap(true, Ordering::AcqRel) {
                evicted = Some(oldest.task);
            }
        }
        ungreeted.push_back(Waiting { task, left });
        drop(ungreeted);
        evicted.map(|task| task.abort()).is_some()
    }

    /// Connections that have not greeted yet.
    #[cfg(test)]
    fn ungreeted(&self) -> usize {
        let ungreeted = self.ungreeted.lock().unwrap_or_else(|e| e.into_inner());
        ungreeted.iter().filter(|waiting| !waiting.left.load(Ordering::Acquire)).count()
    }
}

impl Ticket {
    /// The connection greeted: it leaves the ungreeted pool and takes a place
    /// among the greeted ones, if one is free (None: the limit of greeted
    /// connections is reached, refuse the peer with the reason; or a newer
    /// arrival evicted it a moment ago, and its task is being aborted).
    pub fn greeted(self) -> Option<OwnedSemaphorePermit> {
        if self.left.swap(true, Ordering::AcqRel) {
            return None;
        }
        Arc::clone(&self.greeted).try_acquire_owned().ok()
    }
}

impl Drop for Ticket {
    /// A task that ends (or is aborted) before it greets leaves the pool too.
    fn drop(&mut self) {
        self.left.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connection task that waits for its peer's greeting (`greet`) and then holds its place.
    fn connection(
        admission: &Admission,
        greet: tokio::sync::oneshot::Receiver<()>,
        placed: tokio::sync::oneshot::Sender<bool>,
    ) -> bool {
        admission.arrive(|ticket| {
            tokio::spawn(async move {
                if greet.await.is_ok() {
                    let permit = ticket.greeted();
                    let _ = placed.send(permit.is_some());
                    std::future::pending::<()>().await;
                    drop(permit);
                }
            })
            .abort_handle()
        })
    }

    #[tokio::test]
    async fn a_flood_of_silent_connections_evicts_the_oldest_and_lets_a_prompt_peer_in() {
        let admission = Admission::new(4);
        let mut silent = Vec::new();
        for i in 0..10 {
            let (greet, wait) = tokio::sync::oneshot::channel();
            let (placed, _) = tokio::sync::oneshot::channel();
            let evicted = connection(&admission, wait, placed);
            assert_eq!(evicted, i >= 4, "connection {i}: only arrivals past the limit evict");
            silent.push(greet);
        }
        assert_eq!(admission.ungreeted(), 4);
        tokio::task::yield_now().await;
        // The evicted tasks were aborted: their greeting channels are closed.
        let gone = silent.iter().filter(|greet| greet.is_closed()).count();
        assert_eq!(gone, 6, "the six oldest were evicted");
        assert!(silent[..6].iter().all(|g| g.is_closed()) && silent[6..].iter().all(|g| !g.is_closed()));

        // A prompt peer arrives in the middle of the flood and greets: it gets a place.
        let (greet, wait) = tokio::sync::oneshot::channel();
        let (placed, was_placed) = tokio::sync::oneshot::channel();
        assert!(connection(&admission, wait, placed));
        greet.send(()).unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(1), was_placed).await.unwrap().unwrap());
        assert_eq!(admission.ungreeted(), 3, "it left the ungreeted pool");
    }

    #[tokio::test]
    async fn a_connection_evicted_just_before_it_greets_gets_no_place() {
        let admission = Admission::new(1);
        let (ticket_tx, ticket_rx) = std::sync::mpsc::channel();
        // A task that never runs its ticket: the test plays its greeting.
        admission.arrive(|ticket| {
            ticket_tx.send(ticket).unwrap();
            tokio::spawn(std::future::pending::<()>()).abort_handle()
        });
        let first = ticket_rx.recv().unwrap();
        let evicted = admission.arrive(|ticket| {
            ticket_tx.send(ticket).unwrap();
            tokio::spawn(std::future::pending::<()>()).abort_handle()
        });
        assert!(evicted, "the second arrival evicts the first");
        let _second = ticket_rx.recv().unwrap();
        assert!(first.greeted().is_none(), "the evicted connection may not take a place on its way out");
        assert_eq!(admission.greeted.available_permits(), 1, "its place is still free");
        assert_eq!(admission.ungreeted(), 1, "only the newer one waits");
    }

    #[tokio::test]
    async fn past_the_limit_of_greeted_connections_a_peer_is_refused_and_none_is_evicted() {
        let admission = Admission::new(2);
        for _ in 0..2 {
            let (greet, wait) = tokio::sync::oneshot::channel();
            let (placed, was_placed) = tokio::sync::oneshot::channel();
            connection(&admission, wait, placed);
            greet.send(()).unwrap();
            assert!(was_placed.await.unwrap(), "a free place");
        }
        let (greet, wait) = tokio::sync::oneshot::channel();
        let (placed, was_placed) = tokio::sync::oneshot::channel();
        assert!(!connection(&admission, wait, placed), "greeted connections are not in the pool to evict");
        greet.send(()).unwrap();
        assert!(!was_placed.await.unwrap(), "no place among the greeted: refused");
        assert_eq!(admission.ungreeted(), 0);
    }
}
