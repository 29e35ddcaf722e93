//! The plugin worker pool: every plugin call the broker makes runs on a small set of
//! dedicated threads, apart from the async runtime and from the blocking threads that do
//! storage and flush work, so plugins can use at most `threads` cores between them.
//!
//! A call waits at most `queue_wait` for a free thread (else [`PoolError::Busy`]) and runs
//! at most its `deadline` (else [`PoolError::TimedOut`]). A call past its deadline is
//! abandoned: the caller gets its answer at once, a replacement thread keeps the pool at
//! full strength, and the stuck thread exits as soon as its call returns. Abandoned
//! threads are capped (`max_abandoned`); past the cap no replacement is made, so a plugin
//! that never returns can shrink the pool but never grow the broker's thread count.
//! Plugin threads run at a lower scheduling priority (nice 10) than the broker's own.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// Why a call did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Every thread stayed busy for `queue_wait`, or the queue is full.
    #[error("every plugin thread is busy; try again later")]
    Busy,
    /// The call ran past its deadline and was abandoned.
    #[error("the call did not return within {0} ms and was abandoned")]
    TimedOut(u64),
    /// The call panicked.
    #[error("the call panicked: {0}")]
    Panicked(String),
}

struct Job {
    run: Box<dyn FnOnce() + Send>,
    /// Set by the caller when it stopped waiting; the worker then skips or retires.
    abandoned: Arc<AtomicBool>,
    /// Told when the job starts running.
    started: oneshot::Sender<()>,
}

struct Shared {
    rx: Mutex<Receiver<Job>>,
    abandoned_threads: AtomicUsize,
    max_abandoned: usize,
    next_id: AtomicUsize,
}

/// A fixed set of plugin threads; see the module docs.
pub struct PluginPool {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
    queue_wait: Duration,
}

impl PluginPool {
    /// Starts `threads` workers (at least one) with room for `queue` waiting calls.
    pub fn new(threads: usize, queue: usize, queue_wait: Duration) -> Arc<PluginPool> {
        let (tx, rx) = sync_channel(queue.max(1));
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            rx: Mutex::new(rx),
            abandoned_threads: AtomicUsize::new(0),
            max_abandoned: threads * 4,
            next_id: AtomicUsize::new(0),
        });
        for _ in 0..threads {
            spawn_worker(shared.clone());
        }
        Arc::new(PluginPool {
            tx,
            shared,
            queue_wait,
        })
    }

    /// How long a call waits for a free thread before it is refused as busy.
    pub fn queue_wait(&self) -> Duration {
        self.queue_wait
    }

    /// How many threads are stuck in abandoned calls now.
    pub fn abandoned_threads(&self) -> usize {
        self.shared.abandoned_threads.load(Ordering::Relaxed)
    }

    /// Runs `f` on a pool thread; waits for a thread at most the pool's queue wait, then
    /// for the call at most `deadline`.
    pub async fn run<T, F>(&self, deadline: Duration, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (result_tx, result_rx) = oneshot::channel();
        let (started_tx, started_rx) = oneshot::channel();
        let abandoned = Arc::new(AtomicBool::new(false));
        let span = tracing::Span::current();
        let job = Job {
            run: Box::new(move || {
                let _enter = span.enter();
                let r = std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
                    p.downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into())
                });
                let _ = result_tx.send(r);
            }),
            abandoned: abandoned.clone(),
            started: started_tx,
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                return Err(PoolError::Busy)
            }
        }
        if tokio::time::timeout(self.queue_wait, started_rx)
            .await
            .map_or(true, |r| r.is_err())
        {
            abandoned.store(true, Ordering::SeqCst);
            return Err(PoolError::Busy);
        }
        match tokio::time::timeout(deadline, result_rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(panic))) => Err(PoolError::Panicked(panic)),
            Ok(Err(_)) => Err(PoolError::Panicked(
                "the call ended without an answer".into(),
            )),
            Err(_) => {
                abandoned.store(true, Ordering::SeqCst);
                let n = self.shared.abandoned_threads.fetch_add(1, Ordering::SeqCst) + 1;
                if n <= self.shared.max_abandoned {
                    spawn_worker(self.shared.clone());
                    tracing::warn!(
                        abandoned_threads = n,
                        "plugin call abandoned; replacement thread started"
                    );
                } else {
                    tracing::error!(
                        abandoned_threads = n,
                        "plugin call abandoned; too many stuck plugin threads to replace this one"
                    );
                }
                Err(PoolError::TimedOut(deadline.as_millis() as u64))
            }
        }
    }
}

fn spawn_worker(shared: Arc<Shared>) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let spawned = std::thread::Builder::new()
        .name(format!("quiver-plugin-{id}"))
        .spawn(move || worker(shared));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start a plugin thread");
    }
}

/// Scheduling priority of plugin threads: below the broker's own threads (nice 0), so a
/// plugin burning its whole CPU limit slows other plugins, not produce, fetch or flushes.
const PLUGIN_NICE: i32 = 10;

fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions; setpriority on our own thread id only
        // changes this thread's nice value (Linux schedules threads individually).
        let r = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, PLUGIN_NICE)
        };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the plugin thread's priority");
        }
    }
}

fn worker(shared: Arc<Shared>) {
    lower_priority();
    loop {
        let job = {
            let rx = shared.rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return, // the pool was dropped
            }
        };
        if job.abandoned.load(Ordering::SeqCst) || job.started.send(()).is_err() {
            continue; // the caller gave up while the job was queued
        }
        (job.run)();
        if job.abandoned.load(Ordering::SeqCst) {
            // A replacement took this thread's place while it was stuck.
            shared.abandoned_threads.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn runs_calls_and_returns_values() {
        let pool = PluginPool::new(2, 8, Duration::from_secs(5));
        let r = pool.run(Duration::from_secs(5), || 40 + 2).await;
        assert_eq!(r, Ok(42));
        let r: Result<(), _> = pool
            .run(Duration::from_secs(5), || panic!("plugin host bug"))
            .await;
        assert!(matches!(r, Err(PoolError::Panicked(m)) if m.contains("plugin host bug")));
        assert_eq!(pool.run(Duration::from_secs(5), || 1).await, Ok(1));
    }

    #[tokio::test]
    async fn a_stuck_call_is_abandoned_and_the_pool_keeps_serving() {
        let pool = PluginPool::new(1, 8, Duration::from_secs(10));
        let release = Arc::new(AtomicBool::new(false));
        let r2 = release.clone();
        let stuck = pool
            .run(Duration::from_millis(100), move || {
                while !r2.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .await;
        assert_eq!(stuck, Err(PoolError::TimedOut(100)));
        assert_eq!(pool.abandoned_threads(), 1);
        // The only original thread is stuck, yet calls still run on its replacement.
        assert_eq!(pool.run(Duration::from_secs(10), || 7).await, Ok(7));
        release.store(true, Ordering::SeqCst);
        // The stuck thread retires once its call returns.
        let until = Instant::now() + Duration::from_secs(10);
        while pool.abandoned_threads() != 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.abandoned_threads(), 0);
    }

    #[tokio::test]
    async fn a_full_pool_answers_busy_instead_of_waiting_forever() {
        let pool = PluginPool::new(1, 4, Duration::from_millis(100));
        let gate = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicBool::new(false));
        let (g, r) = (gate.clone(), running.clone());
        let pool2 = pool.clone();
        let first = tokio::spawn(async move {
            pool2
                .run(Duration::from_secs(60), move || {
                    r.store(true, Ordering::SeqCst);
                    while !g.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
                .await
        });
        let until = Instant::now() + Duration::from_secs(30);
        while !running.load(Ordering::SeqCst) {
            assert!(Instant::now() < until, "the first call never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The only thread is taken: a call waits its queue time, then hears "busy".
        assert_eq!(
            pool.run(Duration::from_secs(1), || ()).await,
            Err(PoolError::Busy)
        );
        gate.store(true, Ordering::SeqCst);
        assert_eq!(first.await.unwrap(), Ok(()));
        assert_eq!(pool.run(Duration::from_secs(10), || 3).await, Ok(3));
    }
}
