//! Tunes glibc's allocator for a broker's allocation pattern, once, at start-up.
//!
//! A broker allocates and frees buffers of megabytes all the time: fetch responses, decoded
//! polls, producer batches, the storage engine's log buffers. glibc serves anything above
//! its mmap threshold (128 KiB at first, raised up to 32 MiB as it sees such frees) with a
//! fresh `mmap` and gives it back with `munmap` on free, and trims the top of its heap past
//! twice that threshold; every such buffer is then zero-filled page by page by the kernel
//! on first touch. Measured on the pipeline bench (2 cores), page faults on fresh buffers
//! were about a tenth of all CPU, and fixing these two limits cut the pipeline's CPU per
//! record by about a sixth (0.89 → 0.74 µs). Fixed limits keep freed buffers in the heap for
//! the next allocation. The cost is memory kept after a burst: the main heap keeps up to
//! the trim threshold free at its top, and the threads' heaps (64 MiB each at most) are
//! no longer shrunk, only dropped whole when they empty; so the process keeps about its
//! peak use of heap memory.
//!
//! A user's own settings win: `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or any
//! `glibc.malloc` tunable in `GLIBC_TUNABLES`. Other allocators and platforms are left
//! alone.

/// Buffers up to this size come from the heap, not from `mmap` (glibc's largest allowed
/// value on 64-bit: half its 64 MiB heap size).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory at the top of a heap is returned to the kernel past this.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 256 << 20;

/// Applies the tuning (see the module doc). Call before any thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let set_by_user = |name: &str, tunable: &str| {
            std::env::var_os(name).is_some() || tunables.contains(tunable)
        };
        if !set_by_user("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold") {
            // SAFETY: mallopt only sets allocator parameters; called before other threads.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        }
        if !set_by_user("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold") {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
        }
    }
}
