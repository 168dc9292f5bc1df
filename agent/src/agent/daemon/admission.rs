//! Which connections an agent serves: at most `--max-connections` that have
//! not greeted yet and at most as many that have. A connection that has not
//! greeted costs a peer nothing to open, so at the limit a new one evicts the
//! *oldest* such connection instead of being refused itself: a flood of
//! silent connections then churns through this pool, while a peer that
//! greets promptly (the CLI, a source starting a migration, its demand
//! channel) gets through. A greeted connection has passed authentication
//! (when the agent has a key); past the limit of those, the peer is refused
//! with the reason, and a greeted connection is never evicted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

/// The connections of one listener.
pub struct Admission {
    limit: usize,
    ungreeted: Mutex<Ungreeted>,
    greeted: Arc<Semaphore>,
}

#[derive(Default)]
struct Ungreeted {
    next: u64,
    /// Oldest first.
    tasks: BTreeMap<u64, AbortHandle>,
}

/// A connection's place among those that have not greeted yet.
pub struct Ticket {
    id: u64,
    admission: Arc<Admission>,
}

impl Admission {
    pub fn new(limit: usize) -> Arc<Admission> {
        Arc::new(Admission { limit, ungreeted: Mutex::default(), greeted: Arc::new(Semaphore::new(limit)) })
    }

    /// The most connections served in each state.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes a new connection in: `spawn` starts its task (given its ticket)
    /// and returns the task's abort handle, so that a later arrival can evict
    /// it. At the limit, the oldest connection that has not greeted goes
    /// first; whether one did.
    pub fn arrive(self: &Arc<Self>, spawn: impl FnOnce(Ticket) -> AbortHandle) -> bool {
        let mut ungreeted = self.ungreeted.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = if ungreeted.tasks.len() >= self.limit { ungreeted.tasks.pop_first() } else { None };
        let id = ungreeted.next;
        ungreeted.next += 1;
        // Spawned under the lock: the task cannot leave the pool before it is in it.
        let task = spawn(Ticket { id, admission: Arc::clone(self) });
        ungreeted.tasks.insert(id, task);
        drop(ungreeted);
        // Aborted outside the lock, which the evicted task's ticket takes when it is dropped.
        oldest.map(|(_, task)| task.abort()).is_some()
    }

    /// Connections that have not greeted yet.
    #[cfg(test)]
    fn ungreeted(&self) -> usize {
        self.ungreeted.lock().unwrap_or_else(|e| e.into_inner()).tasks.len()
    }
}

impl Ticket {
    /// The connection greeted (or gave up): it leaves the ungreeted pool and
    /// takes a place among the greeted ones, if one is free (None: the limit
    /// of greeted connections is reached; refuse the peer with the reason).
    pub fn greeted(self) -> Option<OwnedSemaphorePermit> {
        self.leave();
        Arc::clone(&self.admission.greeted).try_acquire_owned().ok()
    }

    fn leave(&self) {
        self.admission.ungreeted.lock().unwrap_or_else(|e| e.into_inner()).tasks.remove(&self.id);
    }
}

impl Drop for Ticket {
    /// A task that ends (or is aborted) before it greets leaves the pool too.
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connection task that waits for its peer's greeting (`greet`) and then holds its place.
    fn connection(
        admission: &Arc<Admission>,
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
