//! Group commit. An append that must be durable takes a ticket after its sled insert and
//! waits until a flush that started after the ticket completes. One flush covers every
//! ticket taken before it began, so N concurrent appends cost one flush, not N. Each flush is
//! a [`Database::flush`]: sled's flush, then an `fdatasync` of its log file.
//!
//! A flush that fails ends this flusher: every waiting and later ticket gets
//! [`FlushFailed`], and nothing is acknowledged until the broker restarts. Retrying is not
//! safe: after a failed `fsync`, Linux may mark the lost pages clean and let the next
//! `fsync` succeed without them ("fsyncgate"), so a retry could acknowledge data that never
//! reached the disk. A restart recovers from what is on disk, and producers resend what was
//! not acknowledged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::store::Database;

/// A disk flush failed: this broker acknowledges no more durable writes until it restarts.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "a disk flush failed ({0}); this broker acknowledges no more writes, since the kernel may \
     have dropped unflushed data without reporting it again: restart the broker (it recovers \
     from what is on disk) and check the disk"
)]
pub struct FlushFailed(Arc<str>);

/// How far flushing got: every ticket up to `completed` is durable, unless it `failed`.
#[derive(Debug, Default)]
struct Progress {
    completed: u64,
    failed: Option<FlushFailed>,
}

/// Coordinates sled flushes for one database.
pub struct Flusher {
    db: Database,
    requested: AtomicU64,
    progress: watch::Sender<Progress>,
    wake: Notify,
    dirty: AtomicBool,
    flushes: AtomicU64,
}

impl Flusher {
    /// A flusher for `db`; call [`Flusher::run`] in a task.
    pub fn new(db: Database) -> Arc<Flusher> {
        Arc::new(Flusher {
            db,
            requested: AtomicU64::new(0),
            progress: watch::Sender::new(Progress::default()),
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

    /// Waits until a flush covering `ticket` completed, or any flush failed.
    pub async fn wait(&self, ticket: u64) -> Result<(), FlushFailed> {
        let mut rx = self.progress.subscribe();
        // The sender lives as long as self, so this cannot fail while we hold &self.
        let progress = rx
            .wait_for(|p| p.completed >= ticket || p.failed.is_some())
            .await;
        match progress.as_deref().map(|p| p.failed.clone()) {
            Ok(Some(failed)) => Err(failed),
            _ => Ok(()),
        }
    }

    /// True once a flush covering `ticket` completed (never after a flush failed).
    pub fn is_done(&self, ticket: u64) -> bool {
        let p = self.progress.borrow();
        p.failed.is_none() && p.completed >= ticket
    }

    /// Waits until a flush fails (forever, while none does).
    pub async fn failure(&self) -> FlushFailed {
        let mut rx = self.progress.subscribe();
        loop {
            if let Some(f) = rx.borrow_and_update().failed.clone() {
                return f;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// How many flushes ran (metrics; shows the group-commit ratio).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Flushes now, blocking (used at shutdown).
    pub fn flush_now(&self) -> Result<(), sled::Error> {
        self.db.flush()
    }

    /// One flush of everything written so far; a failure ends the flusher.
    async fn flush(&self) -> Result<(), FlushFailed> {
        let res = self.db.flush_async().await;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = res {
            let failed = FlushFailed(e.to_string().into());
            tracing::error!(error = %failed, "disk flush failed");
            self.progress
                .send_modify(|p| p.failed = Some(failed.clone()));
            return Err(failed);
        }
        Ok(())
    }

    /// The flush loop: serves tickets at once, and interval writes every `interval`. It
    /// ends when `stop` is set, or after a failed flush.
    pub async fn run(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let target = self.requested.load(Ordering::SeqCst);
            if target > self.progress.borrow().completed {
                self.dirty.store(false, Ordering::Relaxed);
                if self.flush().await.is_err() {
                    return;
                }
                self.progress.send_modify(|p| p.completed = target);
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tick.tick() => {
                    if self.dirty.swap(false, Ordering::Relaxed) && self.flush().await.is_err() {
                        return;
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
    use crate::log::store;

    #[tokio::test]
    async fn tickets_taken_before_a_flush_share_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = store::open(dir.path()).unwrap();
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
            f.wait(t).await.unwrap();
        }
        assert_eq!(f.flush_count(), 1, "50 waiting appends cost one flush");
        // A ticket taken after that flush needs a flush of its own.
        db.insert(b"late", &b"y"[..]).unwrap();
        let t = f.ticket();
        f.wait(t).await.unwrap();
        assert_eq!(f.flush_count(), 2);
    }

    #[tokio::test]
    async fn a_failed_flush_ends_the_flusher_and_nothing_after_it_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        // Every sync of this database fails, as a failing disk's would.
        let db = Database::failing_to_sync(dir.path());
        let f = Flusher::new(db.clone());
        let (_tx, rx) = watch::channel(false);
        let task = tokio::spawn(f.clone().run(Duration::from_millis(5), rx));
        db.insert(b"k", &b"v"[..]).unwrap();
        let first = f.wait(f.ticket()).await;
        assert!(first.is_err(), "the failed flush is reported to its waiter");
        let said = first.unwrap_err().to_string();
        assert!(said.contains("restart the broker"), "{said}");
        // The flusher has ended: no retry can acknowledge what the failure may have lost.
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the flush loop ends after a failure")
            .unwrap();
        let t = f.ticket();
        assert!(f.wait(t).await.is_err(), "later tickets fail too");
        assert!(!f.is_done(t));
        assert!(
            tokio::time::timeout(Duration::from_secs(30), f.failure())
                .await
                .is_ok(),
            "the failure is there for the broker to see"
        );
        assert_eq!(f.flush_count(), 1, "no retry");
    }
}
