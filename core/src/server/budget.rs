//! Each connection's budget of answer bytes. A fetch (or a subscription chunk) reserves
//! what it may read before reading, keeps what it read, and holds that until its answer is
//! off the stream. A client that opens a thousand large fetches and reads none of them
//! holds at most the budget of its connection; its later reads wait for room instead.
//! An answer a processor made larger than what was read holds room for its own size.
//! Requests that arrive in process (the broker's own pipelines) have no budget.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits count kibibytes.
const UNIT: usize = 1024;

tokio::task_local! {
    static BUDGET: Arc<Budget>;
}

/// One connection's budget.
#[derive(Debug)]
pub struct Budget {
    room: Arc<Semaphore>,
    units: u32,
}

impl Budget {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: usize) -> Arc<Budget> {
        let units = bytes
            .div_ceil(UNIT)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)) as u32;
        Arc::new(Budget {
            room: Arc::new(Semaphore::new(units as usize)),
            units,
        })
    }

    /// Bytes not reserved now.
    pub fn available_bytes(&self) -> usize {
        self.room.available_permits() * UNIT
    }

    /// Runs `f` with this budget as the one [`reserve`] draws from.
    pub async fn scope<F: Future>(self: &Arc<Self>, f: F) -> F::Output {
        BUDGET.scope(self.clone(), f).await
    }
}

/// Room reserved in a connection's budget; given back when dropped.
#[derive(Debug, Default)]
pub struct Held(Option<OwnedSemaphorePermit>);

impl Held {
    /// Keeps room for `bytes` only and gives the rest back.
    pub fn shrink_to(&mut self, bytes: usize) {
        if let Some(p) = &mut self.0 {
            let keep = bytes.div_ceil(UNIT).max(1);
            if let Some(kept) = p.split(keep) {
                *p = kept;
            }
        }
    }
}

/// Reserves room for `bytes` in the current connection's budget, waiting until there is
/// some (a request larger than the whole budget takes all of it). Outside a connection's
/// scope nothing is reserved.
pub async fn reserve(bytes: usize) -> Held {
    let Ok(budget) = BUDGET.try_with(Arc::clone) else {
        return Held(None);
    };
    let units = bytes.div_ceil(UNIT).clamp(1, budget.units as usize) as u32;
    Held(budget.room.clone().acquire_many_owned(units).await.ok())
}

/// Room for an answer that came out larger than what was read (a processor's output):
/// `held` (room for `read` bytes) is given back first and room for `answer` bytes reserved
/// whole, so no request holds room while it waits for more (two such could wait on each
/// other for ever).
pub async fn regrow(held: Held, read: usize, answer: usize) -> Held {
    if answer <= read {
        return held;
    }
    drop(held);
    reserve(answer).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn reads_wait_for_room_and_what_is_kept_is_what_was_read() {
        let b = Budget::new(100 * UNIT);
        b.scope(async {
            let mut first = reserve(80 * UNIT).await;
            assert_eq!(b.available_bytes(), 20 * UNIT);
            // A second large read waits while the first holds its room.
            let waiting = tokio::time::timeout(Duration::from_millis(50), reserve(50 * UNIT)).await;
            assert!(waiting.is_err(), "no room for 50 KiB with 20 free");
            // The first read turned out small: it keeps only that.
            first.shrink_to(3 * UNIT);
            assert_eq!(b.available_bytes(), 97 * UNIT);
            let second = reserve(50 * UNIT).await;
            assert_eq!(b.available_bytes(), 47 * UNIT);
            // More than the whole budget takes all of it rather than waiting forever.
            drop((first, second));
            let all = reserve(1000 * UNIT).await;
            assert_eq!(b.available_bytes(), 0);
            drop(all);
            assert_eq!(b.available_bytes(), 100 * UNIT);
        })
        .await;
        // Outside a scope: nothing reserved, nothing waited for.
        let none = reserve(usize::MAX).await;
        assert!(none.0.is_none());
    }
}
