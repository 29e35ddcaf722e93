//! Exponential backoff with jitter, used for reconnects and retried requests.
//!
//! Pure arithmetic plus a cheap random source; it never sleeps itself, so it is unit-tested
//! without a clock.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential backoff: `initial`, doubling up to `max`, each delay jittered to 50–100 %.
///
/// ```
/// use std::time::Duration;
/// use quiver_client::Backoff;
/// let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
/// let d = b.next_delay();
/// assert!(d <= Duration::from_millis(50));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    attempts: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
            attempts: 0,
        }
    }

    /// The delay before the next attempt; each call doubles the base delay up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        self.attempts += 1;
        // Jitter to 50–100 % of the base so reconnecting clients do not move in lockstep.
        let frac = 0.5 + (random_u64() % 1000) as f64 / 2000.0;
        base.mul_f64(frac)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
        self.attempts = 0;
    }
}

/// A random u64 from the std hasher's per-process random keys (no extra dependency).
pub(crate) fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let bases = [100u64, 200, 400, 800, 800, 800];
        for base in bases {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(base), "{d:?} > {base}ms");
            assert!(d >= Duration::from_millis(base / 2), "{d:?} < {base}/2 ms");
        }
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn random_values_differ() {
        let a: Vec<u64> = (0..8).map(|_| random_u64()).collect();
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }
}
