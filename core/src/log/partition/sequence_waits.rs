//! Batches waiting for their producer's earlier batches (a producer's requests overtaking
//! each other on their way): each waits on its own producer's signal, so an append wakes
//! only the waiting batches of the producer that wrote it, not every parked batch of the
//! partition. (Waking them all let a client that parks many batches under made-up producer
//! ids turn every append into that many retries.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The signals of the producers that have batches waiting, by producer id.
#[derive(Debug, Default)]
pub(super) struct SequenceWaiters {
    by_producer: Mutex<HashMap<i64, Arc<Notify>>>,
}

/// A batch's place among the waiters of its producer, from before its first try until it
/// is appended or gives up (dropping it leaves).
#[derive(Debug)]
pub(super) struct Waiting<'a> {
    waiters: &'a SequenceWaiters,
    producer_id: i64,
    signal: Option<Arc<Notify>>,
}

impl SequenceWaiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Arc<Notify>>> {
        self.by_producer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the waiters of `producer_id`. Take [`Waiting::signal`]'s `notified()` before
    /// each try, so an append between the try and the wait is not missed.
    pub fn join(&self, producer_id: i64) -> Waiting<'_> {
        let signal = self.lock().entry(producer_id).or_default().clone();
        Waiting {
            waiters: self,
            producer_id,
            signal: Some(signal),
        }
    }

    /// A batch of `producer_id` was appended: its waiting batches try again.
    pub fn moved(&self, producer_id: i64) {
        if let Some(signal) = self.lock().get(&producer_id) {
            signal.notify_waiters();
        }
    }

    /// Every waiting batch tries again (the partition was deleted).
    pub fn wake_all(&self) {
        for signal in self.lock().values() {
            signal.notify_waiters();
        }
    }

    /// Producers with batches waiting.
    #[cfg(test)]
    pub fn producers(&self) -> usize {
        self.lock().len()
    }
}

impl Waiting<'_> {
    /// The signal an append of this producer's batches gives.
    pub fn signal(&self) -> &Notify {
        self.signal.as_deref().expect("held until dropped")
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        drop(self.signal.take());
        // Under the lock nobody can clone it meanwhile: held by the map alone, nobody waits.
        if map
            .get(&self.producer_id)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            map.remove(&self.producer_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn an_append_wakes_only_its_producers_batches_and_leaving_forgets_them() {
        let waiters = SequenceWaiters::default();
        let (a1, a2, b) = (waiters.join(1), waiters.join(1), waiters.join(2));
        assert_eq!(waiters.producers(), 2);
        let (wa1, wa2, wb) = (
            a1.signal().notified(),
            a2.signal().notified(),
            b.signal().notified(),
        );
        waiters.moved(1);
        assert!(wa1.now_or_never().is_some());
        assert!(wa2.now_or_never().is_some());
        assert!(wb.now_or_never().is_none(), "producer 2 did not move");
        waiters.moved(3); // nobody waits for it: nothing to do
        let wb = b.signal().notified();
        waiters.wake_all();
        assert!(wb.now_or_never().is_some());
        drop(a1);
        assert_eq!(waiters.producers(), 2, "a2 still waits for producer 1");
        drop((a2, b));
        assert_eq!(waiters.producers(), 0);
    }
}
