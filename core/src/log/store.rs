//! How a broker's sled database is opened: its cache, its mode and its segment size, and
//! keeping the segment size an existing database was made with (sled refuses to open a
//! database with another).
//!
//! sled writes any log entry larger than a quarter of a segment to a file of its own (a
//! blob), and rewrites a leaf (up to 17 entries) whole when it splits or consolidates. With
//! sled's default 512 KiB segments every 256 KiB chunk of a batch, and every leaf of them,
//! was a file created and later deleted: a profile of a pipeline draining a backlog spent
//! about a fifth of its CPU in ext4 allocating inodes, and throughput fell as the database
//! grew (docs/NOTES.md, "Storage: segments and chunks"). With 4 MiB segments, entries up to
//! 1 MiB stay in the log, and with 32 KiB slots ([`super::keyspace::SLOT_BYTES`]) so does
//! a whole leaf.

use std::path::Path;

/// Segment size of a database this broker creates.
pub const SEGMENT_BYTES: usize = 4 * 1024 * 1024;

/// sled's page cache.
pub const CACHE_BYTES: u64 = 512 * 1024 * 1024;

/// The sled configuration for the database at `path`: a new one gets [`SEGMENT_BYTES`],
/// an existing one the segment size it was made with.
pub fn config(path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        .segment_size(existing_segment_size(path).unwrap_or(SEGMENT_BYTES))
}

/// Opens (or creates) the database at `path` as the broker does.
pub fn open(path: &Path) -> sled::Result<sled::Db> {
    config(path).open()
}

/// The segment size recorded in an existing database's `conf` file (text lines, then a
/// 4-byte CRC), if there is one that says it.
pub fn existing_segment_size(path: &Path) -> Option<usize> {
    let bytes = std::fs::read(path.join("conf")).ok()?;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().checked_sub(4)?]).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("segment_size: "))
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n.is_power_of_two())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_gets_large_segments_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        open(&new).unwrap().flush().unwrap();
        assert_eq!(existing_segment_size(&new), Some(SEGMENT_BYTES));

        // A database made before (sled's default segments) opens, data and all.
        let old = dir.path().join("old");
        {
            let db = sled::open(&old).unwrap();
            db.insert(b"k", b"v".to_vec()).unwrap();
            db.flush().unwrap();
        }
        assert_eq!(existing_segment_size(&old), Some(512 * 1024));
        let db = open(&old).unwrap();
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn a_missing_or_damaged_conf_says_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(existing_segment_size(dir.path()), None);
        std::fs::write(dir.path().join("conf"), b"xy").unwrap();
        assert_eq!(existing_segment_size(dir.path()), None);
        std::fs::write(dir.path().join("conf"), b"segment_size: 1000\n\0\0\0\0").unwrap();
        assert_eq!(
            existing_segment_size(dir.path()),
            None,
            "not a power of two"
        );
    }
}
