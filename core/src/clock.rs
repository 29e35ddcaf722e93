//! The broker's wall clock, in the unit records use: milliseconds since the Unix epoch.

/// Now, in ms since the Unix epoch (0 if the clock is set before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
