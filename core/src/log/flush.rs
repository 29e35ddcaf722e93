//! Group commit. An append that must be durable takes a ticket after its sled insert and
//! waits until a flush that started after the ticket completes. One flush covers every
//! ticket taken before it began, so N concurrent appends cost one flush, not N.
//!
//! sled's own `flush` writes its log buffers with `sync_file_range`, which neither records a
//! grown file's size nor empties the disk's write cache; sled calls `fsync` only from its
//! periodic flusher (every 500 ms). A flusher made with [`Flusher::syncing`] therefore also
//! `fdatasync`s sled's log file in every flush, so an acknowledged append survives a power
//! loss, not only a killed process.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Coordinates sled flushes for one database.
pub struct Flusher {
    db: sled::Db,
    /// sled's log file, synced after each flush (see the module doc).
    log_file: Option<Arc<File>>,
    requested: AtomicU64,
    completed: watch::Sender<u64>,
    wake: Notify,
    dirty: AtomicBool,
    flushes: AtomicU64,
}

impl Flusher {
    /// A flusher for `db`; call [`Flusher::run`] in a task.
    pub fn new(db: sled::Db) -> Arc<Flusher> {
        Self::with_log_file(db, None)
    }

    /// A flusher for the database opened at `dir` whose flushes also `fdatasync` its log
    /// file (sled's `dir/db`), as the broker's is.
    pub fn syncing(db: sled::Db, dir: &Path) -> std::io::Result<Arc<Flusher>> {
        let file = File::open(dir.join("db"))?;
        Ok(Self::with_log_file(db, Some(Arc::new(file))))
    }

    fn with_log_file(db: sled::Db, log_file: Option<Arc<File>>) -> Arc<Flusher> {
        Arc::new(Flusher {
            db,
            log_file,
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
        flush_and_sync(&self.db, self.log_file.as_deref())
    }

    /// A blocking flush of everything written so far, for `spawn_blocking`.
    fn flush_job(&self) -> impl FnOnce() -> Result<(), sled::Error> + Send + 'static {
        let (db, file) = (self.db.clone(), self.log_file.clone());
        move || flush_and_sync(&db, file.as_deref())
    }

    /// The flush loop: serves tickets at once, and interval writes every `interval`.
    pub async fn run(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let target = self.requested.load(Ordering::SeqCst);
            if target > *self.completed.borrow() {
                self.dirty.store(false, Ordering::Relaxed);
                let res = tokio::task::spawn_blocking(self.flush_job()).await;
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
                        let _ = tokio::task::spawn_blocking(self.flush_job()).await;
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

/// sled's flush, then (when known) an `fdatasync` of its log file: the data sled wrote is
/// then on the disk with the file size that reaches it.
fn flush_and_sync(db: &sled::Db, log_file: Option<&File>) -> Result<(), sled::Error> {
    db.flush()?;
    if let Some(f) = log_file {
        f.sync_data()?;
    }
    Ok(())
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

    #[tokio::test]
    async fn a_syncing_flusher_syncs_the_file_sled_writes_its_log_to() {
        let dir = tempfile::tempdir().unwrap();
        let gone = Flusher::syncing(
            sled::open(dir.path().join("a")).unwrap(),
            &dir.path().join("b"),
        );
        assert!(
            gone.is_err(),
            "no log file where it should be is an error, not a silent no-sync"
        );
        let db = sled::open(dir.path().join("log")).unwrap();
        let f = Flusher::syncing(db.clone(), &dir.path().join("log")).unwrap();
        let log_len = || {
            std::fs::metadata(dir.path().join("log").join("db"))
                .unwrap()
                .len()
        };
        let before = log_len();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(f.clone().run(Duration::from_secs(3600), rx));
        // 4 MiB that sled must put in its log: the file synced is the one that grows.
        for i in 0..64u32 {
            db.insert(i.to_be_bytes(), vec![i as u8; 64 * 1024])
                .unwrap();
        }
        f.wait(f.ticket()).await;
        assert!(
            log_len() >= before + 4 * 1024 * 1024,
            "sled's log is not {}/log/db any more: the flusher would sync the wrong file",
            dir.path().display()
        );
        assert_eq!(f.flush_count(), 1);
        f.flush_now().unwrap();
    }
}
