//! `key-hash-partitioner`: partition = FNV-1a (32-bit) of the key, modulo the partition count;
//! records without a key are hashed by value. Same key, same partition, on every producer.

use quiver_plugin_sdk::partitioner;

#[partitioner]
fn partition(key: Option<&[u8]>, value: &[u8], partition_count: u32) -> u32 {
    fnv1a(key.unwrap_or(value)) % partition_count
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}
