//! The record values a bench sends: each record a different window of random bytes (so a
//! compressed batch is not flattered by records that repeat each other), or every record
//! the same text.

use bytes::Bytes;

/// What the bench's record values hold.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PayloadKind {
    /// Each record's value is a different window of random bytes: compression gains only
    /// what real incompressible data would give it.
    #[default]
    Random,
    /// Every record's value is the same `abc…` text (what Kafka's perf tool does): a
    /// compressed batch shrinks to almost nothing, so compression figures are flattered.
    Repeated,
}

/// Random bytes a random payload's windows are cut from: larger than a producer batch
/// (1 MiB by default), so no window repeats inside one compressed batch.
const POOL_BYTES: usize = 4 << 20;

/// The values of one bench run: `nth(i)` is record `i`'s value, each `size` bytes.
#[derive(Clone)]
pub struct Payloads {
    pool: Bytes,
    size: usize,
    /// Distinct window starts (1 for a repeated payload).
    windows: u64,
}

impl Payloads {
    /// Values of `size` bytes of the given kind.
    pub fn new(kind: PayloadKind, size: usize) -> Payloads {
        match kind {
            PayloadKind::Repeated => Payloads {
                pool: (0..size).map(|i| b'a' + (i % 26) as u8).collect(),
                size,
                windows: 1,
            },
            PayloadKind::Random => {
                // Whole windows laid end to end, at least `POOL_BYTES` of them.
                let windows = (POOL_BYTES / size.max(1)).max(4) as u64;
                let mut state = 0x9E37_79B9_7F4A_7C15_u64;
                let pool = (0..windows as usize * size)
                    .map(|_| {
                        // xorshift64: fast, and random enough that LZ4 and zstd find
                        // nothing to shorten.
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 32) as u8
                    })
                    .collect();
                Payloads {
                    pool,
                    size,
                    windows,
                }
            }
        }
    }

    /// Record `i`'s value (consecutive records get consecutive, different windows).
    pub fn nth(&self, i: u64) -> &[u8] {
        let start = (i % self.windows) as usize * self.size;
        &self.pool[start..start + self.size]
    }

    /// [`Payloads::nth`] as shared bytes (no copy).
    pub fn nth_bytes(&self, i: u64) -> Bytes {
        let start = (i % self.windows) as usize * self.size;
        self.pool.slice(start..start + self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::batch::{BatchBuilder, Compression};

    #[test]
    fn random_values_differ_and_do_not_compress() {
        let p = Payloads::new(PayloadKind::Random, 100);
        assert_ne!(p.nth(0), p.nth(1));
        assert_eq!(p.nth(3), &p.nth_bytes(3)[..]);
        let batch = |c| {
            let mut b = BatchBuilder::new(c);
            (0..10_000).for_each(|i| b.push(None, p.nth(i), 0, &[]));
            b.build().len()
        };
        let (plain, packed) = (batch(Compression::None), batch(Compression::Lz4));
        assert!(packed as f64 > plain as f64 * 0.95, "{packed} of {plain}");
    }

    #[test]
    fn repeated_values_are_the_same_text() {
        let p = Payloads::new(PayloadKind::Repeated, 30);
        assert_eq!(p.nth(0), p.nth(7));
        assert_eq!(&p.nth(0)[..3], b"abc");
        assert_eq!(p.nth(0).len(), 30);
    }

    #[test]
    fn a_value_larger_than_the_pool_still_has_windows() {
        let p = Payloads::new(PayloadKind::Random, 5 << 20);
        assert_eq!(p.nth(5).len(), 5 << 20);
        assert_ne!(p.nth(0), p.nth(1));
    }
}
