//! `split-words`: a flat-map. Each input record becomes one record per whitespace-separated
//! word of its value (same key, headers, timestamp); an empty value yields nothing.

use quiver_plugin_sdk::{processor, Output, Record};

#[processor]
fn process(record: Record) -> Output {
    let words: Vec<Record> = record
        .value
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .map(|w| Record {
            value: w.to_vec(),
            ..record.clone()
        })
        .collect();
    Output::Many(words)
}
