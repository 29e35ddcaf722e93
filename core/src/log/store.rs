//! How a broker's sled database is opened: its cache, its mode and its segment size, and
//! keeping the segment size an existing database was made with (sled refuses to open a
//! database with another). It also owns the one way to make the database's writes durable:
//! [`Database::flush`].
//!
//! sled writes any log entry larger than a quarter of a segment to a file of its own (a
//! blob), and rewrites a leaf (up to 17 entries) whole when it splits or consolidates. With
//! sled's default 512 KiB segments every 256 KiB chunk of a batch, and every leaf of them,
//! was a file created and later deleted: a profile of a pipeline draining a backlog spent
//! about a fifth of its CPU in ext4 allocating inodes, and throughput fell as the database
//! grew (docs/NOTES.md, "Storage: segments and chunks"). With 4 MiB segments, entries up to
//! 1 MiB stay in the log, and with 32 KiB slots ([`super::keyspace::SLOT_BYTES`]) so does
//! a whole leaf.
//!
//! sled's own `flush` writes its log buffers with `sync_file_range`, which neither records a
//! grown file's size nor empties the disk's write cache; sled calls `fsync` only from its
//! periodic flusher (every 500 ms). [`Database::flush`] therefore also `fdatasync`s sled's
//! log file, so what it covers survives a power loss, not only a killed process. sled's own
//! `flush` and `flush_async` are refused by clippy (`clippy.toml`) outside tests.
//!
//! sled never syncs its blob files (entries over 1 MiB: plugin archives, large partition
//! metadata, leaves of databases with small segments) nor their directory. After a power
//! loss a blob the log names could come back empty, and sled's recovery stops at the first
//! unreadable entry: every later entry, acknowledged or not, would be dropped. So a flush
//! also `fsync`s each blob file it has not synced yet, and the directory, before the log.
//! Blobs written after the last flush can still be lost, with the unacknowledged entries
//! after them.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Segment size of a database this broker creates.
pub const SEGMENT_BYTES: usize = 4 * 1024 * 1024;

/// sled's page cache.
pub const CACHE_BYTES: u64 = 512 * 1024 * 1024;

/// A sled database and the file sled writes its log to. Cheap to clone; clones share both.
/// It derefs to [`sled::Db`] for everything but flushing.
#[derive(Clone)]
pub struct Database {
    db: sled::Db,
    log_file: Arc<File>,
    /// sled's blob directory, and the blob files already synced.
    blobs: Arc<(PathBuf, Mutex<HashSet<OsString>>)>,
    /// The first failed flush, shared by every clone: after it, every flush fails.
    failed: Arc<OnceLock<String>>,
}

impl Database {
    /// Wraps `db`, opened at `dir`; fails when sled's log file (`dir/db`) is not there, so
    /// that no flush is silently left unsynced.
    pub fn new(db: sled::Db, dir: &Path) -> std::io::Result<Database> {
        let log_file = File::open(dir.join("db")).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot open sled's log file {} to sync it: {e}",
                    dir.join("db").display()
                ),
            )
        })?;
        Ok(Database::with_log_file(db, log_file, dir))
    }

    /// A database in `dir` whose every sync fails, as a failing disk's would: its "log
    /// file" is a FIFO, and `fdatasync` of a FIFO fails (EINVAL).
    #[cfg(test)]
    pub(crate) fn failing_to_sync(dir: &Path) -> Database {
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        let log = dir.join("log");
        Database::with_log_file(config(&log).open().unwrap(), file, &log)
    }

    fn with_log_file(db: sled::Db, log_file: File, dir: &Path) -> Database {
        Database {
            db,
            log_file: Arc::new(log_file),
            blobs: Arc::new((dir.join("blobs"), Mutex::default())),
            failed: Arc::default(),
        }
    }

    /// The sled database itself.
    pub fn sled(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every write made so far durable: sled's flush, then an `fdatasync` of its log
    /// file (see the module doc). Blocks; call it from `spawn_blocking` on a hot path.
    ///
    /// Once a flush failed, every later flush of the database (through any clone) fails
    /// too, without trying: after a failed `fsync` Linux may mark the lost pages clean and
    /// let the next one succeed ("fsyncgate"), so a success then would not mean the earlier
    /// writes are on disk. Only reopening the database (a restart) clears it.
    pub fn flush(&self) -> sled::Result<()> {
        if let Some(first) = self.failed.get() {
            return Err(std::io::Error::other(format!("an earlier flush failed: {first}")).into());
        }
        self.flush_and_sync().inspect_err(|e| {
            let _ = self.failed.set(e.to_string());
        })
    }

    // The one place sled's own flush is called.
    #[allow(clippy::disallowed_methods)]
    fn flush_and_sync(&self) -> sled::Result<()> {
        self.db.flush()?;
        if let Some(e) = injected_sync_failure() {
            return Err(e.into());
        }
        self.sync_new_blobs()?;
        self.log_file.sync_data()?;
        Ok(())
    }

    /// `fsync`s the blob files not synced by an earlier flush, then (if there were any) the
    /// blob directory. A blob deleted meanwhile needs nothing. Returns how many it synced.
    fn sync_new_blobs(&self) -> std::io::Result<usize> {
        let (dir, synced) = &*self.blobs;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut synced = synced.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = HashSet::new();
        let mut new = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new += 1;
            }
            present.insert(name);
        }
        if new > 0 {
            File::open(dir)?.sync_all()?;
        }
        // Forget the names of deleted blobs.
        *synced = present;
        Ok(new)
    }

    /// [`Database::flush`] for async callers: the blocking work runs on tokio's blocking
    /// threads.
    pub async fn flush_async(&self) -> sled::Result<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.flush())
            .await
            .map_err(|e| sled::Error::Io(std::io::Error::other(format!("flush task: {e}"))))?
    }
}

impl Deref for Database {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        &self.db
    }
}

/// Fault injection for tests of a failing disk: with `QUIVER_FAULT_FAIL_SYNC_AFTER=N` in its
/// environment, the N-th durable flush of the process fails as a disk's would (EIO), and
/// later ones succeed again, as Linux may let them after losing the data ("fsyncgate").
/// Unset (always, outside tests), it does nothing.
pub const FAIL_SYNC_AFTER: &str = "QUIVER_FAULT_FAIL_SYNC_AFTER";

fn injected_sync_failure() -> Option<std::io::Error> {
    static AFTER: OnceLock<Option<u64>> = OnceLock::new();
    static SYNCS: AtomicU64 = AtomicU64::new(0);
    let after = (*AFTER.get_or_init(|| std::env::var(FAIL_SYNC_AFTER).ok()?.parse().ok()))?;
    (SYNCS.fetch_add(1, Ordering::Relaxed) + 1 == after).then(|| {
        std::io::Error::other(format!(
            "{FAIL_SYNC_AFTER}={after}: this fdatasync fails as a failing disk's would (EIO)"
        ))
    })
}

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
pub fn open(path: &Path) -> sled::Result<Database> {
    let db = config(path).open()?;
    Ok(Database::new(db, path)?)
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
    fn a_flush_syncs_the_blob_files_sled_wrote_since_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).unwrap();
        // Over a quarter of a 4 MiB segment: sled writes it to a blob file of its own.
        db.insert(b"big", vec![7u8; 2 << 20]).unwrap();
        db.flush().unwrap();
        let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert!(blobs >= 1, "sled wrote no blob");
        let synced = db.blobs.1.lock().unwrap().len();
        assert_eq!(synced, blobs, "every blob present was synced");
        // Nothing new: nothing synced again.
        assert_eq!(db.sync_new_blobs().unwrap(), 0);
    }

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

    #[test]
    fn a_flush_syncs_the_file_sled_writes_its_log_to() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = Database::new(
            config(&dir.path().join("a")).open().unwrap(),
            &dir.path().join("b"),
        );
        assert!(
            elsewhere.is_err(),
            "no log file where it should be is an error, not a silent no-sync"
        );
        let db = open(&dir.path().join("log")).unwrap();
        let log_len = || {
            std::fs::metadata(dir.path().join("log").join("db"))
                .unwrap()
                .len()
        };
        let before = log_len();
        // 4 MiB that sled must put in its log: the file synced is the one that grows.
        for i in 0..64u32 {
            db.insert(i.to_be_bytes(), vec![i as u8; 64 * 1024])
                .unwrap();
        }
        db.flush().unwrap();
        assert!(
            log_len() >= before + 4 * 1024 * 1024,
            "sled's log is not {}/log/db any more: a flush would sync the wrong file",
            dir.path().display()
        );
    }

    #[test]
    fn after_a_failed_flush_every_flush_of_the_database_fails() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::failing_to_sync(dir.path());
        let other = db.clone();
        let first = db.flush().unwrap_err().to_string();
        assert!(!first.contains("an earlier flush failed"), "{first}");
        // Another holder of the database (the topic registry beside the flusher) cannot
        // flush either: its success could hide what the first failure lost.
        let later = other.flush().unwrap_err().to_string();
        assert!(later.contains("an earlier flush failed"), "{later}");
        assert!(db.flush().is_err());
    }
}
