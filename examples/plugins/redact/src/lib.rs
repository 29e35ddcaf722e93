//! `redact`: replaces the string value of the top-level JSON field `config.field` with
//! `config.mask` (`{"user":"a","password":"x"}` → `{"user":"a","password":"***"}`). Values
//! that are not JSON or lack the field pass through unchanged.

use std::sync::OnceLock;

use quiver_plugin_sdk::{config, processor, Record};

/// Config is fixed for an instance's lifetime: read it once, not per record.
fn settings() -> &'static (String, String) {
    static SETTINGS: OnceLock<(String, String)> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        (
            config("field").unwrap_or_else(|| "password".into()),
            config("mask").unwrap_or_else(|| "***".into()),
        )
    })
}

#[processor]
fn process(mut record: Record) -> Record {
    let (field, mask) = settings();
    if let Some(v) = redact(&record.value, field, mask) {
        record.value = v;
    }
    record
}

/// Find `"field"` followed by `:` and a string; return the value with that string replaced.
fn redact(value: &[u8], field: &str, mask: &str) -> Option<Vec<u8>> {
    let needle = format!("\"{field}\"");
    let mut from = 0;
    while let Some(i) = find(&value[from..], needle.as_bytes()) {
        let mut p = from + i + needle.len();
        while value.get(p).is_some_and(|b| b.is_ascii_whitespace()) {
            p += 1;
        }
        if value.get(p) == Some(&b':') {
            p += 1;
            while value.get(p).is_some_and(|b| b.is_ascii_whitespace()) {
                p += 1;
            }
            if value.get(p) == Some(&b'"') {
                let start = p + 1;
                let mut q = start;
                while q < value.len() && value[q] != b'"' {
                    q += if value[q] == b'\\' { 2 } else { 1 };
                }
                let end = q.min(value.len());
                let mut out = Vec::with_capacity(value.len());
                out.extend_from_slice(&value[..start]);
                out.extend_from_slice(mask.as_bytes());
                out.extend_from_slice(&value[end..]);
                return Some(out);
            }
        }
        from = from + i + needle.len();
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
