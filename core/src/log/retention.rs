//! Retention decisions: given the partition's batches from the oldest, `now`, and the
//! topic's limits, how many to delete from the front. A pure function, so it is tested
//! without a clock or a disk.

/// What retention needs to know of a stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    /// Base offset.
    pub base_offset: i64,
    /// The offset after the batch.
    pub next_offset: i64,
    /// Largest timestamp in it.
    pub max_timestamp: i64,
    /// Stored bytes.
    pub size: u64,
}

/// How many batches to delete from the front of `oldest_first` (which holds the whole
/// partition when `retention_bytes` is set, else at least the expired prefix). Batches at
/// or above `high_watermark` are never deleted.
pub fn batches_to_delete(
    oldest_first: &[BatchSummary],
    total_size: u64,
    now_ms: i64,
    retention_ms: i64,
    retention_bytes: i64,
    high_watermark: i64,
) -> usize {
    let mut size = total_size;
    let mut n = 0;
    for b in oldest_first {
        if b.next_offset > high_watermark {
            break;
        }
        let expired = retention_ms > 0 && b.max_timestamp < now_ms.saturating_sub(retention_ms);
        let too_big = retention_bytes > 0 && size > retention_bytes as u64;
        if !(expired || too_big) {
            break;
        }
        size -= b.size;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batches() -> Vec<BatchSummary> {
        (0..5)
            .map(|i| BatchSummary {
                base_offset: i * 10,
                next_offset: i * 10 + 10,
                max_timestamp: 1000 + i * 100,
                size: 100,
            })
            .collect()
    }

    #[test]
    fn by_time() {
        assert_eq!(batches_to_delete(&batches(), 500, 1250, 100, -1, 50), 2);
        assert_eq!(batches_to_delete(&batches(), 500, 1250, -1, -1, 50), 0);
    }

    #[test]
    fn by_size() {
        assert_eq!(batches_to_delete(&batches(), 500, 0, -1, 250, 50), 3);
    }

    #[test]
    fn never_past_high_watermark() {
        assert_eq!(batches_to_delete(&batches(), 500, 99_999, 1, -1, 20), 2);
    }
}
