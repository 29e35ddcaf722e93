//! The clock a plugin call's CPU limit (`cpu_ms`) is measured on: the CPU time of the thread
//! that runs the call, so a call that waits for a core on a loaded machine is not charged for
//! the wait, and a correct plugin is not stopped (and, after a few such calls, quarantined)
//! because the machine was busy.
//!
//! Reading a thread's CPU clock is a system call, and a thread cannot use more CPU time than
//! the wall time that passes. So the CPU clock is read only once the wall clock passes a
//! checkpoint: the call's start plus its limit at first, then each reading plus what is left
//! of the limit. A call within its limit on an idle machine never reads it.
//!
//! A wall-clock backstop ([`WALL_BACKSTOP`] times the limit) stops a call whatever its CPU
//! time, so a call held up off the CPU cannot keep its thread for ever. Where a thread has no
//! CPU clock (platforms other than Linux), the limit is on the wall clock.
//!
//! Every field is atomic: the Lua watchdog thread checks the clock of a call running on
//! another thread.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A call is stopped once its wall time reaches this many times its CPU limit, whatever CPU
/// time it used.
pub(crate) const WALL_BACKSTOP: u64 = 10;

/// No CPU clock for the calling thread: the limit is on the wall clock.
const NO_CLOCK: i64 = i64::MIN;

/// The CPU budget of the current call of one plugin instance.
#[derive(Debug)]
pub(crate) struct CallClock {
    base: Instant,
    /// The call's CPU limit, nanoseconds.
    limit_ns: AtomicU64,
    /// Wall time (nanoseconds since `base`) when the call started.
    started_ns: AtomicU64,
    /// The calling thread's CPU time when the call started, nanoseconds.
    cpu_started_ns: AtomicU64,
    /// The calling thread's CPU clock, or [`NO_CLOCK`].
    clock: AtomicI64,
    /// Wall time (nanoseconds since `base`) before which the call cannot be past its limit.
    checkpoint_ns: AtomicU64,
}

impl Default for CallClock {
    fn default() -> Self {
        CallClock {
            base: Instant::now(),
            limit_ns: AtomicU64::new(0),
            started_ns: AtomicU64::new(0),
            cpu_started_ns: AtomicU64::new(0),
            clock: AtomicI64::new(NO_CLOCK),
            checkpoint_ns: AtomicU64::new(0),
        }
    }
}

impl CallClock {
    /// Starts a call with a limit of `cpu_ms` on the calling thread, which must be the
    /// thread that runs it.
    pub(crate) fn start(&self, cpu_ms: u64) {
        let limit = cpu_ms.saturating_mul(1_000_000);
        let clock = ThreadClock::current();
        let cpu = clock.and_then(|c| c.read_ns()).unwrap_or(0);
        let now = self.wall_ns();
        self.limit_ns.store(limit, Ordering::Relaxed);
        self.started_ns.store(now, Ordering::Relaxed);
        self.cpu_started_ns.store(cpu, Ordering::Relaxed);
        self.clock
            .store(clock.map_or(NO_CLOCK, |c| c.0 as i64), Ordering::Relaxed);
        self.checkpoint_ns
            .store(now.saturating_add(limit), Ordering::Release);
    }

    fn wall_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// True once the call has used its CPU limit (or reached the wall-clock backstop).
    pub(crate) fn past_limit(&self) -> bool {
        self.past(Duration::ZERO)
    }

    /// True once the call has used its CPU limit plus `slack` (or reached the backstop).
    pub(crate) fn past(&self, slack: Duration) -> bool {
        let slack = slack.as_nanos() as u64;
        let now = self.wall_ns();
        if now
            < self
                .checkpoint_ns
                .load(Ordering::Acquire)
                .saturating_add(slack)
        {
            return false;
        }
        let limit = self.limit_ns.load(Ordering::Relaxed);
        let wall = now.saturating_sub(self.started_ns.load(Ordering::Relaxed));
        if wall >= limit.saturating_mul(WALL_BACKSTOP).saturating_add(slack) {
            return true;
        }
        let clock = self.clock.load(Ordering::Relaxed);
        if clock == NO_CLOCK {
            return true; // past the checkpoint, which is the wall-clock limit
        }
        // A clock that cannot be read (its thread just ended the call) tells nothing; the
        // backstop still holds.
        let Some(cpu) = ThreadClock(clock as libc::clockid_t).read_ns() else {
            return false;
        };
        let used = cpu.saturating_sub(self.cpu_started_ns.load(Ordering::Relaxed));
        if used >= limit.saturating_add(slack) {
            return true;
        }
        // The call cannot reach its limit before the rest of it has passed on the wall clock.
        self.checkpoint_ns.fetch_max(
            now.saturating_add(limit - used.min(limit)),
            Ordering::AcqRel,
        );
        false
    }

    /// Wall time until the next checkpoint (zero when it has passed).
    pub(crate) fn until_checkpoint(&self) -> Duration {
        let left = self
            .checkpoint_ns
            .load(Ordering::Acquire)
            .saturating_sub(self.wall_ns());
        Duration::from_nanos(left)
    }

    /// Wall time the call has run beyond its limit (zero within it).
    pub(crate) fn overrun(&self) -> Duration {
        let wall = self
            .wall_ns()
            .saturating_sub(self.started_ns.load(Ordering::Relaxed));
        Duration::from_nanos(wall.saturating_sub(self.limit_ns.load(Ordering::Relaxed)))
    }
}

/// The CPU clock of one thread, readable from any thread of the process while it lives.
#[derive(Debug, Clone, Copy)]
struct ThreadClock(libc::clockid_t);

impl ThreadClock {
    /// The calling thread's clock.
    #[cfg(target_os = "linux")]
    fn current() -> Option<ThreadClock> {
        let mut id: libc::clockid_t = 0;
        // SAFETY: `id` is a valid, writable clockid_t, and pthread_self() is this thread.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) };
        (rc == 0 && i64::from(id) != NO_CLOCK).then_some(ThreadClock(id))
    }

    #[cfg(not(target_os = "linux"))]
    fn current() -> Option<ThreadClock> {
        None
    }

    fn read_ns(self) -> Option<u64> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; an invalid clock id is an error return.
        let rc = unsafe { libc::clock_gettime(self.0, &mut ts) };
        (rc == 0).then(|| (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64)
    }
}

/// CPU time consumed so far by the calling thread.
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        ThreadClock(libc::CLOCK_THREAD_CPUTIME_ID)
            .read_ns()
            .map(Duration::from_nanos)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin_cpu(d: Duration) {
        let start = thread_cpu_time().unwrap();
        while thread_cpu_time().unwrap() - start < d {
            std::hint::black_box(0u64);
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn waiting_off_the_cpu_is_not_charged_but_running_is() {
        let c = CallClock::default();
        c.start(40);
        // Sleeping past the limit on the wall clock uses no CPU time.
        std::thread::sleep(Duration::from_millis(80));
        assert!(!c.past_limit(), "a call charged for time off the CPU");
        assert!(c.until_checkpoint() > Duration::from_millis(30));
        spin_cpu(Duration::from_millis(45));
        assert!(c.past_limit(), "a call that used its limit is not past it");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn another_thread_reads_the_calls_clock() {
        let c = std::sync::Arc::new(CallClock::default());
        let (started, go) = std::sync::mpsc::channel();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let call = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.start(30);
                started.send(()).unwrap();
                spin_cpu(Duration::from_millis(40));
                finished.recv().unwrap(); // stay alive, and so the clock readable
            })
        };
        go.recv().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.past_limit() {
            assert!(Instant::now() < deadline, "never seen past its limit");
            std::thread::sleep(Duration::from_millis(2));
        }
        done.send(()).unwrap();
        call.join().unwrap();
    }

    #[test]
    fn the_wall_clock_backstop_stops_a_call_that_waits() {
        let c = CallClock::default();
        c.start(2);
        std::thread::sleep(Duration::from_millis(2 * WALL_BACKSTOP + 10));
        assert!(c.past_limit());
        assert!(c.overrun() >= Duration::from_millis(2 * WALL_BACKSTOP - 2));
    }
}
