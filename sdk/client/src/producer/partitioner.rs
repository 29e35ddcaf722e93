//! Choosing a partition for a record: Kafka's murmur2 for keyed records (so a key lands on
//! the same partition as with Kafka's default partitioner), "sticky" for keyless ones.

/// Picks a partition for a record.
///
/// Returning `None` means "no preference": the producer then uses its sticky partition
/// (one partition per batch, switched each time a batch is sent).
///
/// ```
/// use quiver_client::{DefaultPartitioner, Partitioner};
/// let p = DefaultPartitioner;
/// // murmur2("foobar") = -790332482 (Kafka's UtilsTest); positive part modulo 4:
/// assert_eq!(p.partition("t", Some(b"foobar"), 4), Some(1_357_151_166 % 4));
/// assert_eq!(p.partition("t", None, 4), None);
/// ```
pub trait Partitioner: Send + Sync + 'static {
    /// The partition of a record with `key` in a topic of `partitions` partitions.
    fn partition(&self, topic: &str, key: Option<&[u8]>, partitions: u32) -> Option<u32>;
}

/// Kafka's default: `(murmur2(key) & 0x7fffffff) % partitions` for keyed records.
///
/// ```
/// use quiver_client::{DefaultPartitioner, Partitioner};
/// // murmur2("21") = -973932308; & 0x7fffffff = 1173551340
/// assert_eq!(DefaultPartitioner.partition("t", Some(b"21"), 7), Some(1_173_551_340 % 7));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPartitioner;

impl Partitioner for DefaultPartitioner {
    fn partition(&self, _topic: &str, key: Option<&[u8]>, partitions: u32) -> Option<u32> {
        let key = key?;
        if partitions == 0 {
            return None;
        }
        Some(partition_for_key(key, partitions))
    }
}

/// The partition Kafka's default partitioner gives `key` among `partitions` (> 0).
///
/// ```
/// assert_eq!(quiver_client::partition_for_key(b"foobar", 3), (-790332482i32 & 0x7fffffff) as u32 % 3);
/// ```
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions.max(1)
}

/// Kafka's `Utils.murmur2` (32-bit MurmurHash2, seed `0x9747b28c`), bit for bit.
///
/// ```
/// assert_eq!(quiver_client::murmur2(b"21"), -973932308);
/// ```
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka_test_vectors() {
        // Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (input, want) in cases {
            assert_eq!(murmur2(input), want, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn keyed_records_use_positive_hash_modulo() {
        // -973932308 & 0x7fffffff = 1173551340
        assert_eq!(partition_for_key(b"21", 7), 1173551340 % 7);
        for n in 1..20 {
            assert!(partition_for_key(b"any key", n) < n);
        }
        assert_eq!(DefaultPartitioner.partition("t", None, 3), None);
        assert_eq!(DefaultPartitioner.partition("t", Some(b"k"), 0), None);
        assert_eq!(
            DefaultPartitioner.partition("t", Some(b"foobar"), 5),
            Some(((-790332482i32 & 0x7fffffff) as u32) % 5)
        );
    }

    #[test]
    fn empty_key_hashes() {
        // Kafka hashes an empty key too (it is not the same as no key). With no 4-byte
        // block and no tail, murmur2 is the seed's final mix:
        // h = 0x9747b28c ^ 0; h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15 = 275646681,
        // the value kafka-python's test_pure_murmur2 (a port of Kafka's Utils.murmur2)
        // expects for b''.
        assert_eq!(murmur2(b""), 275_646_681);
        assert_eq!(partition_for_key(b"", 3), 275_646_681 % 3);
        assert_eq!(partition_for_key(b"", 7), 275_646_681 % 7);
        assert_eq!(
            DefaultPartitioner.partition("t", Some(b""), 7),
            Some(275_646_681 % 7),
            "an empty key is hashed, not treated as no key"
        );
    }

    #[test]
    fn murmur2_matches_kafka_python_vectors_for_every_tail_length() {
        // kafka-python test_partitioner.py test_pure_murmur2 (unsigned results): tails of
        // 0 to 3 bytes after whole 4-byte blocks.
        let cases: [(&[u8], u32); 7] = [
            (b"", 275646681),
            (b"testing", 2291530147),
            (b"PEACH!", 2546348827),
            (b"Gorz!", 1742407956),
            (b"987654321", 577579727),
            (b"_!!_", 2335345241),
            (b"CRINOID", 3603193626),
        ];
        for (input, want) in cases {
            assert_eq!(
                murmur2(input) as u32,
                want,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
