//! Fault injection for tests of the delivery guarantees: with
//! `QUIVER_FAULT_CRASH_AFTER_WRITES=N` in its environment, a process running pipeline
//! instances aborts (like `kill -9`) right after the output of the N-th poll with input
//! records is written and before its input offsets are committed — the window where
//! at-least-once writes twice and exactly-once must not. Unset (always, outside tests), it
//! does nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable.
pub const CRASH_AFTER_WRITES: &str = "QUIVER_FAULT_CRASH_AFTER_WRITES";

static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
static WRITES: AtomicU64 = AtomicU64::new(0);

/// Called between the writes of a poll with input records and its commit.
pub fn after_write() {
    let limit = LIMIT.get_or_init(|| {
        std::env::var(CRASH_AFTER_WRITES)
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(n) = limit {
        if WRITES.fetch_add(1, Ordering::Relaxed) + 1 >= *n {
            eprintln!("{CRASH_AFTER_WRITES}: aborting after {n} writes, before their commit");
            std::process::abort();
        }
    }
}
