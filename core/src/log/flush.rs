//! Group commit. An append that must be durable takes a ticket after its sled insert and
//! waits until a flush that started after the ticket completes. One flush covers every
//! ticket taken before it began, so N concurrent appends cost one fsync, not N.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Coordinates sled flushes for one database.
pub struct Flusher {
    db: sled::Db,
    requested: AtomicU64,
    completed: watch::Sender<u64>,
    wake: Notify,
    dirty: AtomicBool,
    flushes: AtomicU64,
}

impl Flusher {
    /// A flusher for `db`; call [`Flusher::run`] in a task.
    pub fn new(db: sled::Db) -> Arc<Flusher> {
        Arc::new(Flusher {
            db,
            requested: AtomicU64::new(0),
            completed: watch::Sender::new(0),
            wake: Notify::new(),
            dirty: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
        })
    }

    /// Takes a ticket for writes already made; await [`Flusher::wait`] with it.
    pub fn ticket(&self) -> u64 {
        let t = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.wake.notify_one();
        t
    }

    /// Marks writes that an interval flush should cover.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Waits until a flush covering `ticket` completed.
    pub async fn wait(&self, ticket: u64) {
        let mut rx = self.completed.subscribe();
        // The sender lives as long as self, so this cannot fail while we hold &self.
        let _ = rx.wait_for(|done| *done >= ticket).await;
    }

    /// True once a flush covering `ticket` completed.
    pub fn is_done(&self, ticket: u64) -> bool {
        *self.completed.borrow() >= ticket
    }

    /// How many flushes ran (metrics; shows the group-commit ratio).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Flushes now, blocking (used at shutdown).
    pub fn flush_now(&self) -> Result<(), sled::Error> {
        self.db.flush().map(|_| ())
    }

    /// The flush loop: serves tickets at once, and interval writes every `interval`.
    pub async fn run(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let target = self.requested.load(Ordering::SeqCst);
            if target > *self.completed.borrow() {
                self.dirty.store(false, Ordering::Relaxed);
                let db = self.db.clone();
                let res = tokio::task::spawn_blocking(move || db.flush()).await;
                self.flushes.fetch_add(1, Ordering::Relaxed);
                match res {
                    Ok(Ok(_)) => {
                        self.completed.send_replace(target);
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "sled flush failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => tracing::error!(error = %e, "flush task failed"),
                }
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tick.tick() => {
                    if self.dirty.swap(false, Ordering::Relaxed) {
                        let db = self.db.clone();
                        let _ = tokio::task::spawn_blocking(move || db.flush()).await;
                    }
                }
                _ = stop.changed() => {
                    if *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tickets_taken_before_a_flush_share_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let f = Flusher::new(db.clone());
        // 50 appends and their tickets before the flush loop runs: one flush covers all.
        let tickets: Vec<u64> = (0..50u32)
            .map(|i| {
                db.insert(i.to_be_bytes(), &b"x"[..]).unwrap();
                f.ticket()
            })
            .collect();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(f.clone().run(Duration::from_secs(3600), rx));
        for t in tickets {
            f.wait(t).await;
        }
        assert_eq!(f.flush_count(), 1, "50 waiting appends cost one flush");
        // A ticket taken after that flush needs a flush of its own.
        db.insert(b"late", &b"y"[..]).unwrap();
        let t = f.ticket();
        f.wait(t).await;
        assert_eq!(f.flush_count(), 2);
    }
}
